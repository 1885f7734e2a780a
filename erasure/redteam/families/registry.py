"""The attack-family registry: every way the red team tries to bring an erased concept back, one object each.

A family carries its name, a one-line summary (the CLI's help, the model card), whether a /generate request can
mount it (``reachable``: the service's ``max_attack_success`` bar applies to those families only; a white-box attack
needs the weights, which the service never serves), its own options (a pydantic model: ``AttackConfig.family_options``
holds them, embedded verbatim in every red-team record) and how it finds its best attack. Adding a family is one
file that calls ``register_family``.

``best_attack(team, pipe, concept, prepared)`` returns (the family's best attack on ``pipe``, candidates scored); the
team measures it on fresh seeds, on ``pipe`` and on the base (erasure/redteam/team.py). ``prepare(team, concept)``
computes what the search needs once per concept, shared by the attack on the pack and the calibration on the base
(the soft prompt's images of the concept).

Example:
    >>> register_family(AttackFamily("fixed", "a fixed prompt list", reachable=True,
    ...                               best_attack=lambda team, pipe, concept, prepared: team.validated(...)))
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, ConfigDict

from ...errors import InvalidArgumentError


class NoOptions(BaseModel):
    """A family without options of its own."""

    model_config = ConfigDict(extra="forbid")


@dataclasses.dataclass(frozen=True)
class AttackFamily:
    """One attack family (see the module docstring)."""

    name: str
    summary: str
    reachable: bool
    best_attack: Callable[[Any, Any, str, Any], tuple[Any, int]]
    prepare: Callable[[Any, str], Any] | None = None
    options: type[BaseModel] = NoOptions


FAMILIES: dict[str, AttackFamily] = {}


def register_family(family: AttackFamily) -> AttackFamily:
    """Add ``family`` to the registry (a name registered twice is an error) and return it."""
    if family.name in FAMILIES:
        raise ValueError(f"attack family {family.name!r} is already registered")
    FAMILIES[family.name] = family
    return family


def unregister_family(name: str) -> None:
    FAMILIES.pop(name, None)


def get_family(name: str) -> AttackFamily:
    """The registered family ``name``, or InvalidArgumentError naming the known ones."""
    if name not in FAMILIES:
        raise InvalidArgumentError(f"unknown attack family {name!r}; choose one of {', '.join(FAMILIES)}")
    return FAMILIES[name]


def reachable_families() -> tuple[str, ...]:
    """The families a /generate request can mount."""
    return tuple(name for name, family in FAMILIES.items() if family.reachable)
