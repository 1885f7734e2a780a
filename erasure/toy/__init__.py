"""The toy world: the project's embedded default (renderer, tokenizer, base-model build, oracle)."""
