"""The toy world: the project's embedded default (renderer, tokenizer, base-model build, oracle, judge, evaluation).

Nothing outside this package knows the toy world's settings: a base `erasure toy build` writes records them in its
``build_info.json`` (``SAMPLING`` below), and erasure/base/loading.py reads them from there like any base's.
"""

# How toy-world bases are sampled by default: the size they were trained at, and the steps / guidance their figures
# are measured with (docs/toy-world.md).
SAMPLING = {"steps": 20, "guidance": 3.0, "size": 64}
