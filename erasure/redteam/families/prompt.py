"""The ``prompt`` family: a black-box evolutionary search over the tokenizer's vocabulary.

It starts from attacks found before, natural prompts naming the concept (train and held-out wording), its bare name,
word lists mixing its names with other words, prompts naming each sibling and no word of the concept (a pack can make
the model draw the concept for a neighbour's prompt), prompts that leave the concept out and prompts naming nothing;
its mutations substitute, insert, delete, repeat and reorder words, drawing from the concept's names and synonyms,
its siblings, the other attributes' words and the whole vocabulary (erasure/prompts.py). It sees only images.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from ...prompts import mutate
from .registry import AttackFamily, register_family


def candidates(team, concept: str, rng: np.random.Generator) -> list:
    """The search's starting requests (see the module docstring)."""
    j = team.judge
    names, siblings, others = j.names(concept), j.siblings(concept), j.other_words(concept)
    prompts = team.known_prompts(concept) + j.prompts(concept, 4, rng, "train") + j.prompts(
        concept, 2, rng, "heldout") + [
        names[0], " ".join([names[0]] * 3), " ".join(names),
        " ".join(list(rng.permutation(siblings + names[:1]))),
        " ".join(list(rng.permutation(others))[:4] + names[1:2]),
        " ".join(list(rng.permutation(siblings))),
    ] + [j.prompts(s, 1, rng, ("train", "heldout")[i % 2])[0] for i, s in enumerate(siblings)] + (
        j.neutral_prompts(concept, 2, rng) + team.unnamed_prompts(concept, 3, rng))
    return [dataclasses.replace(team.default, prompt=p) for p in dict.fromkeys(prompts)
            if p.strip() and team.fits_tokenizer(p)]


def search(team, pipe, concept: str):
    """Every candidate the search scored, best first, and how many."""
    j = team.judge
    rng = np.random.default_rng([team.cfg.seed, 1])
    pools = {"names": j.names(concept), "siblings": j.siblings(concept), "others": j.other_words(concept),
             "vocabulary": team.vocabulary}

    def neighbours(population, rng: np.random.Generator) -> list:
        top = population[: max(2, min(8, len(population)))]
        out = []
        for _ in range(max(1, team.cfg.batch_size // team.cfg.search_seeds)):
            a, b = (top[int(rng.integers(len(top)))] for _ in range(2))
            parent = max(a, b, key=lambda s: s.key).attack
            other = top[int(rng.integers(len(top)))].attack.prompt.split()
            prompt = " ".join(mutate(parent.prompt.split(), other, pools, rng))
            if prompt and team.fits_tokenizer(prompt):
                out.append(dataclasses.replace(team.default, prompt=prompt))
        return out

    return team.search(pipe, concept, candidates(team, concept, rng), neighbours, f"{concept}: prompt")


PROMPT = register_family(AttackFamily(
    "prompt", "black-box search over the vocabulary", reachable=True,
    best_attack=lambda team, pipe, concept, prepared: team.validated(search, pipe, concept)))
