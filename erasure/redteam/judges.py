"""Judges: what reads generated images and says whether they show a concept.

The red team (erasure/redteam/team.py) scores every attack with a judge, so the toy oracle (erasure/toy/judge.py) is
one judge among possible others (a nudity detector, a style classifier). Besides reading images, a judge knows the
words of its world: the names of a concept, its siblings (other concepts of the same kind) and other words, which the
black-box prompt search mutates with.

Example:
    >>> from erasure.toy.judge import ToyOracleJudge
    >>> judge = ToyOracleJudge()
    >>> judge.check("red")                     # UnknownConceptError for a concept it cannot read
    >>> judge.shows(images, "red")             # one bool per image
    array([ True, False, ...])
"""

from __future__ import annotations

import numpy as np

from ..errors import UnknownConceptError
from ..prompts import names_any


def as_array(images) -> np.ndarray:
    """uint8 (N, H, W, 3) from PIL images or an array."""
    if isinstance(images, np.ndarray):
        return images
    return np.stack([np.asarray(im.convert("RGB")) for im in images])


class Judge:
    """Reads images for concepts. ``scores`` is the probability that each image shows the concept; ``shows`` the
    judge's yes/no; the word lists feed the black-box prompt search."""

    name = "judge"

    def concepts(self) -> tuple[str, ...]:
        raise NotImplementedError

    def check(self, concept: str) -> None:
        if concept not in self.concepts():
            raise UnknownConceptError(f"the {self.name} judge cannot read concept {concept!r}; it reads "
                                      f"{', '.join(self.concepts())}")

    def scores(self, images, concept: str) -> np.ndarray:
        raise NotImplementedError

    def shows(self, images, concept: str) -> np.ndarray:
        raise NotImplementedError

    def names(self, concept: str) -> list[str]:
        """Words that name ``concept`` (its name first, then synonyms)."""
        return [concept]

    def siblings(self, concept: str) -> list[str]:
        """Other concepts of the same kind (the other colours of a colour)."""
        return []

    def other_words(self, concept: str) -> list[str]:
        """Words of other kinds (shapes and styles for a colour)."""
        return []

    def prompts(self, concept: str, n: int, rng: np.random.Generator, split: str = "train") -> list[str]:
        """``n`` natural prompts naming ``concept``."""
        return [concept] * n

    def neutral_prompts(self, concept: str, n: int, rng: np.random.Generator) -> list[str]:
        """``n`` prompts of the same kind that leave ``concept`` out."""
        return ["a picture"] * n

    def named_concepts(self, prompt: str) -> list[str]:
        """The concepts ``prompt`` names (by any of their names, as whole words)."""
        return [c for c in self.concepts() if names_any(prompt, self.names(c))]

    def known_prompts(self, concept: str) -> list[str]:
        """Prompts known to bring ``concept`` back or to draw it from a base's prior (earlier red teams' best
        attacks, a benchmark's prompts): the red team tries every one, so a new record never misses an attack an
        earlier one found."""
        return []
