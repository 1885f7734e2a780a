"""AttackConfig: every option of `erasure attack`, declared once.

The CLI flags of `erasure attack` are generated from these fields and from each attack family's own options
(``family_options``: a pydantic model per family, erasure/redteam/families/), and a pack's red-team record embeds the
config verbatim, so the figures travel with how they were measured. The request range (``RequestRange``,
erasure/sampling/request.py) is what the settings family searches and what a service compares with its ``limits``.

Example:
    >>> from erasure.redteam.config import AttackConfig
    >>> AttackConfig(budget=32, seeds=48).families
    ['prompt', 'settings', 'soft-prompt']
    >>> AttackConfig(soft_steps=50).family_options["soft-prompt"].soft_steps
    50
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field, field_validator, model_validator

from ..sampling.request import RequestRange
from .families import FAMILIES, get_family


class AttackConfig(RequestRange):
    """Every option of `erasure attack` (see the module docstring)."""

    families: list[str] = Field(
        default_factory=lambda: list(FAMILIES), min_length=1,
        description="attack families to run (repeat): " + "; ".join(f"{f.name} ({f.summary})"
                                                                     for f in FAMILIES.values()))
    family_options: dict[str, Any] = Field(
        default_factory=dict, description="each family's own options, as its options model declares them (flat keys "
        "naming them are moved here)")
    budget: int = Field(64, gt=0, description="candidates each search family scores (prompts; request settings)")
    search_seeds: int = Field(4, gt=0, description="images per candidate during a search")
    finalists: int = Field(4, gt=0, description="best candidates re-scored on validation seeds; the best of them "
                           "is the family's attack")
    validation_seeds: int = Field(12, gt=0, description="images per finalist on seeds the search never saw")
    seeds: int = Field(64, gt=0, description="fresh seeds of the final test (the ASR), never seen by the search")
    seed: int = Field(0, ge=0, description="seeds the search (mutations, prompts, seed ranges)")
    restarts: int = Field(1, gt=0, description="independent black-box searches per family (seeded seed, seed + 1, "
                          "...), each within the budget; their finalists are validated together, so one unlucky "
                          "search cannot make the record")
    start_prompts: list[str] = Field(
        [], description="prompt both black-box searches also start from (repeat): attacks found before, on other "
        "packs or in a benchmark; the judge's known prompts and the pack's own record's attacks are always added")
    known_from: list[str] = Field(
        [], description="registry namespaces (repeat): every black-box attack recorded under any tag of any pack "
        "there, on the attacked concept or on any concept if it names neither that one nor a sibling, also starts "
        "both searches (packs given as NS/NAME add their namespace; what it added is recorded in start_prompts)")
    calibrate: bool = Field(True, description="also run each family against the base: it must find the concept "
                            "there for its figure on the pack to mean anything")
    steps: int | None = Field(None, gt=0, description="denoising steps of a request that sets none (None: the "
                              "base's default)")
    guidance: float | None = Field(None, ge=0, description="guidance of a request that sets none (None: the base's "
                                   "default)")
    size: int | None = Field(None, gt=0, description="image size of a request that sets none (None: the base's)")
    batch_size: int = Field(32, gt=0, description="images per pipeline call")
    guide_away: float | None = Field(
        None, ge=0, description="attack each pack as served with this guidance away from its concepts "
        "(erasure/sampling/guidance.py; None: the pack's own); with --record it is written into the pack with the "
        "figures")

    @model_validator(mode="before")
    @classmethod
    def _family_options(cls, data: Any) -> Any:
        """Each family's options as its own model; keys of those models given flat move into ``family_options``."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        given = {name: dict(o.model_dump() if isinstance(o, BaseModel) else o or {})
                 for name, o in (data.get("family_options") or {}).items()}
        for family in FAMILIES.values():
            for key in list(data):
                if key in family.options.model_fields and key not in cls.model_fields:
                    given.setdefault(family.name, {})[key] = data.pop(key)
        families = data.get("families") or list(FAMILIES)
        if isinstance(families, list):
            for name in families:
                if isinstance(name, str) and name in FAMILIES:
                    given.setdefault(name, {})
        data["family_options"] = {name: get_family(name).options.model_validate(o) for name, o in given.items()}
        return data

    @field_validator("families")
    @classmethod
    def _known_families(cls, families: list[str]) -> list[str]:
        for name in families:
            get_family(name)
        return families

    def options(self, family: str):
        """The options of ``family`` (its options model, with defaults where not given)."""
        found = self.family_options.get(family)
        return found if found is not None else get_family(family).options()
