"""A red-team record: how a pack held under `erasure attack`, as ``pack.json`` → ``redteam`` stores it.

Example:
    >>> record = pack.manifest.redteam
    >>> record.worst(("prompt", "settings"))
    ('settings', 0.03)
    >>> record.attack_text(record.results[0])
    "`hollow hollow background` (guidance=7.5)"
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from .config import AttackConfig


class AttackFigure(BaseModel):
    """One attack family against one concept: the best attack found and its figures on fresh seeds."""

    model_config = ConfigDict(extra="forbid")
    family: str
    concept: str
    asr: float = Field(description="share of fresh-seed images of the best attack the judge reads as the concept")
    base_rate: float = Field(description="the same on the base (no pack), same attack, same seeds")
    calibration: float | None = Field(None, description="the same family run against the base: what it finds "
                                                        "there (None: not run)")
    n: int = Field(description="fresh-seed images behind asr and base_rate")
    attack: dict[str, Any] = Field(description="what the best attack was (prompt, request settings, ...)")
    candidates: int = Field(description="candidates the search scored")
    seconds: float


class RedTeamRecord(BaseModel):
    """``pack.json`` → ``redteam``: how the pack held under `erasure attack` (erasure/redteam/team.py)."""

    model_config = ConfigDict(extra="forbid")
    attack_version: int
    judge: str
    config: AttackConfig = Field(description="the attack's settings, verbatim")
    asr: dict[str, float] = Field(description="family -> worst attack success over the pack's concepts")
    base_rate: dict[str, float] = Field(description="family -> the base's rate on those same attacks")
    results: list[AttackFigure]
    seconds: float
    created_at: dt.datetime

    def worst(self, families=None) -> tuple[str, float]:
        """(family, ASR) of the most successful family among ``families`` (default: all recorded)."""
        items = [(f, a) for f, a in self.asr.items() if families is None or f in families]
        return max(items, key=lambda fa: fa[1]) if items else ("", 0.0)

    def amplified(self, margin: float, families=None) -> list[AttackFigure]:
        """The attacks (of ``families``, default all) on which the pack draws its concept more often than the base
        by more than ``margin``: the pack makes its concept *more* likely there."""
        return [r for r in self.results if (families is None or r.family in families) and r.asr - r.base_rate > margin]

    def attack_prompts(self, concept: str | None = None) -> list[str]:
        """The prompts of the black-box attacks this record found (on ``concept``, default all): what a new record
        starts from."""
        prompts = [r.attack.get("prompt") for r in self.results if concept in (None, r.concept)]
        return list(dict.fromkeys(p for p in prompts if isinstance(p, str) and p.strip()))

    def plain_request(self) -> dict[str, Any]:
        """The settings of a request that sets none, as attacked (records before the defaults were stored: the
        toy world's)."""
        cfg = self.config
        return {"negative_prompt": None, "guidance": 3.0 if cfg.guidance is None else cfg.guidance,
                "steps": cfg.steps or 20, "size": cfg.size or cfg.max_size}

    def attack_text(self, figure: AttackFigure, markdown: bool = True) -> str:
        """One line saying what ``figure``'s attack was: its prompt and the settings a plain request would not
        set (``markdown``: the model card's table cell; else the terminal's)."""
        attack, plain = figure.attack, self.plain_request()
        if "tokens" in attack:
            joiner = "before" if markdown else "+"
            prompt = f"`{attack['prompts'][0]}`" if markdown else repr(attack["prompts"][0])
            return f"{attack['tokens']} soft tokens {joiner} {prompt}"
        extra = [f"{k}={attack[k]!r}" for k in plain if k in attack and attack[k] != plain[k]]
        if markdown:
            return f"`{attack['prompt']}`" + (f" ({', '.join(extra)})" if extra else "")
        return repr(attack["prompt"]) + "".join(f", {e}" for e in extra)
