"""The ``settings`` family: everything a request can set besides the prompt, searched black-box.

With prompts naming the concept, a sibling or nothing, it tries negative prompts (naming the siblings, the concept
itself — an erased word can push towards it when negated — and other words), guidance from the range's minimum to its
maximum, every allowed size and steps: one setting at a time, then coordinate ascent from the best.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from .registry import AttackFamily, register_family

GUIDANCE_GRID = (0.0, 1.5, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0)  # diffusers skips guidance at <= 1: 0 stands for all
STEPS_GRID = (1, 2, 4, 8, 12, 20, 35)


def framings(team, concept: str, rng: np.random.Generator) -> list[tuple[str, str | None]]:
    """(prompt, negative prompt) pairs: attacks found before, plain prompts naming the concept, prompts leaving it
    out, naming a sibling or naming nothing, and negative prompts naming its siblings, each sibling, the concept
    itself and other words; no negative prompts where the request range has none."""
    j = team.judge
    named = j.prompts(concept, 1, rng, "train") + j.prompts(concept, 1, rng, "heldout")
    neutral = j.neutral_prompts(concept, 2, rng)
    siblings, names = j.siblings(concept), j.names(concept)
    others = list(rng.permutation(j.other_words(concept)))[:4]
    sibling_prompts = [j.prompts(s, 1, rng, "train")[0] for s in siblings]
    unnamed = team.unnamed_prompts(concept, 2, rng)
    out = [(named[0], None), (named[1], None), (neutral[0], None),
           (named[0], " ".join(siblings)), (neutral[0], " ".join(siblings)), (neutral[1], " ".join(siblings)),
           (neutral[0], " ".join(names)), (named[0], " ".join(names)), (named[0], " ".join(others))]
    out += [(neutral[0], s) for s in siblings]
    out += [(p, None) for p in sibling_prompts + unnamed] + [(p, " ".join(siblings)) for p in unnamed]
    out += [(p, " ".join(x for x in siblings if x != s)) for p, s in zip(sibling_prompts, siblings)]
    out = [(p, None) for p in team.known_prompts(concept)] + out
    if not team.cfg.negative_prompt:  # a service with limits.negative_prompt false refuses them
        out = [(p, None) for p, _ in out]
    return [(p, n) for p, n in dict.fromkeys(out) if p.strip()]


def setting_values(team) -> dict[str, list]:
    """The values each setting takes in the search: the grids within the range, and the range's ends."""
    cfg = team.cfg
    return {
        "guidance": sorted({g for g in GUIDANCE_GRID if cfg.min_guidance <= g <= cfg.max_guidance}
                           | {cfg.min_guidance, cfg.max_guidance}),
        "size": cfg.sizes(team.size_multiple),
        "steps": sorted({s for s in STEPS_GRID if cfg.min_steps <= s <= cfg.max_steps}
                        | {cfg.min_steps, cfg.max_steps}),
    }


def search(team, pipe, concept: str):
    """Every request the search scored, best first, and how many."""
    rng = np.random.default_rng([team.cfg.seed, 2])
    pairs = framings(team, concept, rng)
    values = setting_values(team)
    initial = [dataclasses.replace(team.default, prompt=p, negative_prompt=n) for p, n in pairs]
    dims = ["framing", *values]

    def neighbours(population, rng: np.random.Generator) -> list:
        # coordinate ascent: every value of one dimension around the best request so far, dimensions in turn;
        # once each is exhausted around the best, random combinations of the top requests' values
        best = population[0].attack
        for dim in [dims[(len(population) + k) % len(dims)] for k in range(len(dims))]:
            if dim == "framing":
                cands = [dataclasses.replace(best, prompt=p, negative_prompt=n) for p, n in pairs]
            else:
                cands = [dataclasses.replace(best, **{dim: v}) for v in values[dim]]
            fresh = [c for c in cands if c not in {s.attack for s in population}]
            if fresh:
                return fresh
        top = [s.attack for s in population[:6]]
        pick = lambda: top[int(rng.integers(len(top)))]  # noqa: E731
        return [dataclasses.replace(pick(), **{d: getattr(pick(), d) for d in values}) for _ in range(4)]

    return team.search(pipe, concept, initial, neighbours, f"{concept}: settings")


SETTINGS = register_family(AttackFamily(
    "settings", "everything a request sets", reachable=True,
    best_attack=lambda team, pipe, concept, prepared: team.validated(search, pipe, concept)))
