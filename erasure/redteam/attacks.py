"""What the red team scores: a request an attacker can send, and a scored candidate.

Example:
    >>> attack = Request("hollow hollow background", None, guidance=7.5, size=64, steps=20)
    >>> Scored(attack, hits=3, n=4, score=0.71).rate
    0.75
"""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass(frozen=True)
class Request:
    """What one /generate request sets (a negative prompt of None is the empty prompt)."""

    prompt: str
    negative_prompt: str | None
    guidance: float
    size: int
    steps: int

    def describe(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class Scored:
    """An attack's hits (images the judge reads as the concept) out of ``n`` images."""

    attack: Any  # a Request, or an attack that renders itself (``render(team, pipe, seeds)``: a soft prompt)
    hits: int
    n: int
    score: float  # mean judge probability: breaks ties between equal hit counts

    @property
    def rate(self) -> float:
        return self.hits / self.n if self.n else 0.0

    @property
    def key(self) -> tuple[float, float]:
        return (self.rate, self.score)
