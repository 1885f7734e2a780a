"""Attack families, one registry (erasure/redteam/families/registry.py): ``prompt`` (black-box search over the
vocabulary), ``settings`` (everything a request sets) and ``soft-prompt`` (white-box token embeddings). A new family
is one module that calls ``register_family``, imported below.

Example:
    >>> from erasure.redteam.families import FAMILIES, reachable_families
    >>> list(FAMILIES), reachable_families()
    (['prompt', 'settings', 'soft-prompt'], ('prompt', 'settings'))
"""

from . import prompt, settings, soft_prompt  # noqa: F401  (the built-in families register themselves)
from .registry import (
    FAMILIES,
    AttackFamily,
    NoOptions,
    get_family,
    reachable_families,
    register_family,
    unregister_family,
)

__all__ = ["FAMILIES", "AttackFamily", "NoOptions", "get_family", "reachable_families", "register_family",
           "unregister_family"]
