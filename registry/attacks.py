"""The red-team attacks a registry's packs have on record: what a new red team starts from.

Every pack revision published with a red-team record (`erasure attack --record`, then `erasure push`) lists the
best attack each search found. A search is seeded and can miss what another run found, on another pack or on an
earlier revision, so `erasure attack --known-from NAMESPACE` starts its searches from every black-box attack
recorded under any tag of any pack in that namespace (``erasure.known_attacks`` entry point, ``load_known_attacks``).

    >>> from registry import open_registry
    >>> from registry.attacks import recorded_attacks
    >>> recorded_attacks(open_registry(), "toy")["red"][:2]
    ['hollow hollow background', 'drawing drawing line']
"""

from __future__ import annotations

import os

from .types import Registry


def recorded_attacks(registry: Registry, namespace: str) -> dict[str, list[str]]:
    """Concept -> the black-box attack prompts recorded for it over ``main`` and every tag of every pack in
    ``namespace`` (``main`` first, then the tags newest name first; revisions without a red-team record add
    nothing)."""
    out: dict[str, list[str]] = {}
    for info in registry.list(namespace):
        if info.method == "?":  # listed as a pack but holds no manifest
            continue
        tagged = [sha for _, sha in sorted(registry.tags(info.repo).items(), reverse=True)]
        for sha in dict.fromkeys([info.latest_sha, *tagged]):
            record = registry.read_manifest(info.repo, sha).manifest.redteam
            for concept in dict.fromkeys(r.concept for r in record.results) if record else []:
                out[concept] = list(dict.fromkeys(out.get(concept, []) + record.attack_prompts(concept)))
    return out


def load_known_attacks(namespace: str, *, endpoint: str | None = None,
                       registry_dir: str | os.PathLike | None = None) -> dict[str, list[str]]:
    """``recorded_attacks`` of ``open_registry(endpoint, registry_dir)`` (the ``erasure.known_attacks`` entry
    point: how ``erasure attack --known-from`` reaches the registry without importing it)."""
    from . import open_registry

    return recorded_attacks(open_registry(endpoint, registry_dir), namespace)
