"""Prompt text operations shared by training and the red team: concept words left out or replaced, the
tokenizer's whole-word vocabulary, and the attacker's word-level mutations.

Example:
    >>> without("a dotted red circle", ["red", "crimson"])
    'a dotted circle'
    >>> mutate("a red star".split(), [], {"names": ["red"], "vocabulary": ["box"]}, np.random.default_rng(0))
    ['a', 'red', 'red', 'star']
"""

from __future__ import annotations

import re

import numpy as np

# How often a mutation draws its word from each pool (the red team's prompt search and robust training alike).
POOL_WEIGHTS = {"names": 3, "siblings": 1.5, "others": 2.5, "vocabulary": 3}
OPERATIONS = ("substitute", "insert", "delete", "repeat", "swap", "shuffle", "crossover")
OPERATION_WEIGHTS = (0.25, 0.25, 0.12, 0.1, 0.1, 0.06, 0.12)


def without(prompt: str, words) -> str:
    """``prompt`` with every whole-word occurrence of ``words`` removed ("a dotted red circle" -> "a dotted
    circle")."""
    return " ".join(replace_words(prompt, words, " ").split())


def replace_words(prompt: str, words, by: str) -> str:
    """``prompt`` with every whole-word occurrence of ``words`` replaced by ``by``."""
    pattern = "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True))
    return re.sub(rf"\b(?:{pattern})\b", by, prompt)


def names_any(prompt: str, words) -> bool:
    """Whether ``prompt`` contains one of ``words`` as whole words."""
    return replace_words(prompt, words, "\0") != prompt


def vocabulary_words(tokenizer) -> list[str]:
    """Whole words of the tokenizer's vocabulary (tokens ending a word, letters only, 'a' and 2+ letters)."""
    words = set()
    for token in tokenizer.get_vocab():
        if token.endswith("</w>"):
            w = token[: -len("</w>")]
            if w.isalpha() and (len(w) > 1 or w == "a"):
                words.add(w)
    return sorted(words)


def mutate(words: list[str], other: list[str], pools: dict[str, list[str]], rng: np.random.Generator) -> list[str]:
    """One word-level edit of ``words``: substitute, insert, delete, repeat, swap, shuffle, or cross over with
    ``other``; new words are drawn from ``pools`` ("names", "siblings", "others", "vocabulary"; empty or missing
    pools are skipped) with POOL_WEIGHTS."""
    def draw() -> str:
        names = [k for k in POOL_WEIGHTS if pools.get(k)]
        weights = np.array([POOL_WEIGHTS[k] for k in names])
        pool = pools[names[rng.choice(len(names), p=weights / weights.sum())]]
        return pool[int(rng.integers(len(pool)))]

    w = list(words)
    op = rng.choice(list(OPERATIONS), p=list(OPERATION_WEIGHTS))
    i = int(rng.integers(len(w)))
    if op == "substitute":
        w[i] = draw()
    elif op == "insert":
        w.insert(int(rng.integers(len(w) + 1)), draw())
    elif op == "delete" and len(w) > 1:
        del w[i]
    elif op == "repeat":
        w.insert(i, w[i])
    elif op == "swap" and len(w) > 1:
        j = int(rng.integers(len(w)))
        w[i], w[j] = w[j], w[i]
    elif op == "shuffle":
        w = list(rng.permutation(w))
    elif op == "crossover" and other:
        w = w[: i + 1] + other[int(rng.integers(len(other))) :]
    else:
        w.insert(int(rng.integers(len(w) + 1)), draw())
    return " ".join(w).split()
