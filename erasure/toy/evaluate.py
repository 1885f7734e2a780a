"""Evaluation on the toy world: generate images for every toy concept, label them with the oracle, tally.

Prompts come from the train templates and, separately, from the held-out templates that no training saw.
Scenes cycle through seeded permutations of all 100 (shape, colour, style) combinations, so every concept gets
the same number of samples; image i uses seed ``seed + i``, so two pipelines evaluated with the same settings see
exactly the same prompts and initial noise (which is what makes a base-vs-erased table meaningful).

Example:
    >>> from erasure.toy.evaluate import evaluate
    >>> report = evaluate(pipe, oracle, samples=100)
    >>> report.splits["train"].overall["shape"]
    0.93
"""

from __future__ import annotations

import dataclasses
from collections import Counter

import numpy as np

from ..sampling.generate import generate
from . import SAMPLING
from .oracle import Oracle
from .world import ATTRIBUTES, TEMPLATE_SPLITS, Scene, all_scenes, concept_attribute, prompt_for


@dataclasses.dataclass
class Sample:
    scene: Scene
    prompt: str
    seed: int


@dataclasses.dataclass
class SplitReport:
    overall: dict[str, float]  # attribute -> accuracy over all images
    per_concept: dict[str, float]  # concept -> accuracy of its attribute on images prompted with it
    counts: dict[str, int]  # concept -> number of images prompted with it
    readings: dict[str, dict[str, int]]  # concept -> histogram of what the oracle read for its attribute

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class EvalReport:
    splits: dict[str, SplitReport]
    settings: dict
    images: dict[str, list] = dataclasses.field(default_factory=dict, repr=False)
    samples: dict[str, list[Sample]] = dataclasses.field(default_factory=dict, repr=False)
    labels: dict[str, dict[str, list[str]]] = dataclasses.field(default_factory=dict, repr=False)  # per image

    def to_json(self) -> dict:
        """Top-level ``shape``/``color``/``style`` and ``per_concept`` are the train-template figures."""
        train = self.splits.get("train") or next(iter(self.splits.values()))
        out = {attr: train.overall[attr] for attr in ATTRIBUTES}
        out["per_concept"] = train.per_concept
        out["splits"] = {name: split.to_json() for name, split in self.splits.items()}
        out["settings"] = self.settings
        return out


def plan(samples: int, split: str, seed: int = 0) -> list[Sample]:
    """The prompts and seeds an evaluation of ``split`` uses (deterministic in ``seed``)."""
    if split not in TEMPLATE_SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {list(TEMPLATE_SPLITS)}")
    rng = np.random.default_rng([seed, list(TEMPLATE_SPLITS).index(split)])
    scenes = all_scenes()
    order: list[Scene] = []
    while len(order) < samples:
        order += [scenes[i] for i in rng.permutation(len(scenes))]
    offset = 0 if split == "train" else 1_000_000
    return [Sample(s, prompt_for(s, rng, split), seed + offset + i) for i, s in enumerate(order[:samples])]


def tally(samples: list[Sample], readings: dict[str, list[str]]) -> SplitReport:
    overall, per_concept, counts, hist = {}, {}, {}, {}
    for attr, values in ATTRIBUTES.items():
        truth = [getattr(s.scene, attr) for s in samples]
        read = readings[attr]
        overall[attr] = float(np.mean([t == r for t, r in zip(truth, read)]))
        for concept in values:
            got = [r for t, r in zip(truth, read) if t == concept]
            counts[concept] = len(got)
            per_concept[concept] = float(np.mean([r == concept for r in got])) if got else float("nan")
            hist[concept] = dict(Counter(got).most_common())
    return SplitReport(overall, per_concept, counts, hist)


def evaluate(pipe, oracle, samples: int = 300, splits=("train", "heldout"), seed: int = 0,
             steps: int = SAMPLING["steps"], guidance: float = SAMPLING["guidance"], batch_size: int = 50,
             progress: bool = True) -> EvalReport:
    from tqdm.auto import tqdm

    report = EvalReport(splits={}, settings=dict(samples=samples, seed=seed, steps=steps, guidance=guidance))
    for split in splits:
        todo = plan(samples, split, seed)
        images = []
        bar = tqdm(total=len(todo), desc=f"eval {split}", disable=not progress, unit="img")
        for i in range(0, len(todo), batch_size):
            chunk = todo[i : i + batch_size]
            images += generate(pipe, [s.prompt for s in chunk], [s.seed for s in chunk], steps=steps,
                               guidance=guidance)
            bar.update(len(chunk))
        bar.close()
        readings = oracle.classify(np.stack([np.asarray(im.convert("RGB")) for im in images]))
        report.splits[split] = tally(todo, readings)
        report.images[split] = images
        report.samples[split] = todo
        report.labels[split] = readings
    return report


def quick_table(base_pipe, erased_pipe, samples: int, steps: int = SAMPLING["steps"],
                guidance: float = SAMPLING["guidance"]) -> dict:
    """Oracle accuracy of every toy concept, base vs erased, on ``samples`` train-template images (the table a
    pack's manifest and card carry)."""
    oracle = Oracle.load()
    settings = dict(samples=samples, splits=("train",), steps=steps, guidance=guidance, progress=False)
    erased = evaluate(erased_pipe, oracle, **settings).splits["train"]
    base = evaluate(base_pipe, oracle, **settings).splits["train"]
    return {c: {"base": base.per_concept[c], "erased": erased.per_concept[c]} for c in base.per_concept}


def print_report(report: EvalReport, console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    names = list(report.splits)
    table = Table(title=f"oracle accuracy on generated images ({report.settings})")
    table.add_column("attribute")
    table.add_column("concept")
    for name in names:
        table.add_column(f"{name} templates", justify="right")
    for attr, values in ATTRIBUTES.items():
        table.add_row(attr, "[b]all[/b]", *[f"[b]{report.splits[n].overall[attr]:.1%}[/b]" for n in names])
        for concept in values:
            table.add_row("", concept, *[
                f"{report.splits[n].per_concept[concept]:.1%} (n={report.splits[n].counts[concept]})" for n in names
            ])
    console.print(table)


def _accuracy_apart(report: EvalReport, split: str, concept: str, erased: list[str]) -> tuple[float, int]:
    """Accuracy on ``concept``'s images whose prompt names no erased concept ("a dotted circle" but not "a dotted
    square" when square is erased): the paper's "other classes", free of the erased concept's own images."""
    attr = concept_attribute(concept)
    hits = [read == concept for s, read in zip(report.samples[split], report.labels[split][attr])
            if getattr(s.scene, attr) == concept and not {s.scene.shape, s.scene.color, s.scene.style} & set(erased)]
    return (float(np.mean(hits)) if hits else float("nan")), len(hits)


def _drawn_for_siblings(report: EvalReport, split: str, concept: str, erased: list[str]) -> dict[str, list[bool]]:
    """Per sibling of ``concept`` (not erased itself): whether each of its images reads as ``concept``."""
    attr = concept_attribute(concept)
    out: dict[str, list[bool]] = {}
    for s, read in zip(report.samples[split], report.labels[split][attr]):
        sibling = getattr(s.scene, attr)
        if sibling not in erased:
            out.setdefault(sibling, []).append(read == concept)
    return out


def drawn_instead(base: EvalReport, erased: EvalReport, split: str, concept: str, erased_concepts: list[str]) -> dict:
    """How often the erased ``concept`` is drawn for its siblings' prompts (a red pack that paints yellow circles
    red), base vs erased: overall and for the sibling where the pack adds the most."""
    b, e = (_drawn_for_siblings(r, split, concept, erased_concepts) for r in (base, erased))
    rate = lambda flags: float(np.mean(flags)) if flags else float("nan")  # noqa: E731
    worst = max(b, key=lambda c: (rate(e[c]) - rate(b[c]), c)) if b else None
    return {"base": rate(sum(b.values(), [])), "erased": rate(sum(e.values(), [])), "n": sum(map(len, b.values())),
            "worst": worst and {"concept": worst, "base": rate(b[worst]), "erased": rate(e[worst]), "n": len(b[worst])}}


def comparison(base: EvalReport, erased: EvalReport, erased_concepts: list[str]) -> dict:
    """The paper's Table 2 for the toy world: base vs erased accuracy for every concept, per template split.

    Each other concept is measured on all its images and, as ``apart``, on those whose prompt names no erased
    concept (an "outlined square" image counts for outlined, but it is also an erased square)."""
    out: dict = {"erased_concepts": erased_concepts, "splits": {}}
    for split in base.splits:
        b, e = base.splits[split], erased.splits[split]
        rows = {}
        for concept in b.per_concept:
            rows[concept] = {
                "base": b.per_concept[concept],
                "erased": e.per_concept[concept],
                "ratio": e.per_concept[concept] / b.per_concept[concept] if b.per_concept[concept] else None,
                "n": b.counts[concept],
                "erased_concept": concept in erased_concepts,
            }
            if concept not in erased_concepts:
                (base_apart, n), (erased_apart, _) = (_accuracy_apart(r, split, concept, erased_concepts)
                                                      for r in (base, erased))
                rows[concept]["apart"] = {"base": base_apart, "erased": erased_apart, "n": n}
        out["splits"][split] = {
            "concepts": rows,
            "overall": {a: {"base": b.overall[a], "erased": e.overall[a]} for a in b.overall},
            # Where the erased prompts' images go instead: the oracle's readings, base vs erased.
            "readings": {c: {"base": b.readings[c], "erased": e.readings[c]} for c in erased_concepts},
            # And where it comes from: the erased concept read on images prompted with its siblings.
            "drawn_instead": {c: drawn_instead(base, erased, split, c, erased_concepts) for c in erased_concepts},
        }
    return out


def print_comparison(table: dict, console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    splits = list(table["splits"])
    t = Table(title="oracle accuracy: base -> erased (ratio to base)")
    t.add_column("concept")
    for s in splits:
        t.add_column(f"{s} templates", justify="right")
    concepts = list(table["splits"][splits[0]]["concepts"])
    erased = table["erased_concepts"]
    for concept in erased + [c for c in concepts if c not in erased]:
        cells = []
        for s in splits:
            r = table["splits"][s]["concepts"][concept]
            ratio = f" ({r['ratio']:.0%})" if r["ratio"] is not None else ""
            apart = r.get("apart")
            if apart and apart["n"] != r["n"]:
                ratio += f"; apart {apart['base']:.0%} -> {apart['erased']:.0%} (n={apart['n']})"
            cells.append(f"{r['base']:.1%} -> {r['erased']:.1%}{ratio}")
        t.add_row(f"[b red]{concept} (erased)[/]" if concept in erased else concept, *cells)
    console.print(t)
    for concept in erased:
        for s in splits:
            h = table["splits"][s]["readings"][concept]
            console.print(f"{concept} prompts ({s}) read as: base {h['base']} -> erased {h['erased']}")
            d = table["splits"][s]["drawn_instead"][concept]
            if d["worst"]:
                w = d["worst"]
                console.print(f"{concept} drawn for other {concept_attribute(concept)}s' prompts ({s}): base "
                              f"{d['base']:.1%} -> erased {d['erased']:.1%} (n={d['n']}; most for {w['concept']}: "
                              f"{w['base']:.0%} -> {w['erased']:.0%}, n={w['n']})")


def run(base: str, specs, *, samples: int, splits, seed: int, steps: int, guidance: float, batch_size: int,
        device: str = "cpu", dtype=None, revision: str | None = None, json_out=None, grid_out=None) -> dict:
    """`erasure eval` end to end: the base's table and, with packs (``PACK[:SCALE]`` specs, composed together), the
    base-vs-erased comparison; printed, and written as JSON and a grid of images when asked. Returns the JSON."""
    import json

    import torch

    from ..base.loading import load_base
    from ..pack.compose import with_packs
    from ..pack.concept_pack import load_packs
    from ..sampling.generate import image_grid

    packs = load_packs(specs)  # refused before any generation if a pack is bad
    pipe = load_base(base, device, dtype or torch.float32, revision).pipe
    settings = dict(samples=samples, splits=splits, seed=seed, steps=steps, guidance=guidance, batch_size=batch_size)
    oracle = Oracle.load()
    base_report = evaluate(pipe, oracle, **settings)
    print_report(base_report)
    result = base_report.to_json()
    grid_images = [im for split in base_report.images.values() for im in split[:50]]
    if packs:
        erased = evaluate(with_packs(pipe, packs), oracle, **settings)
        concepts = [c for pack, _ in packs for c in pack.concepts]
        table = comparison(base_report, erased, concepts)
        print_comparison(table)
        result = {**erased.to_json(), "base": base_report.to_json(), "comparison": table,
                  "packs": [{"path": str(p.path), "name": p.name, "scale": s} for p, s in packs]}
        # Grid: each erased concept's prompts (of the first split asked for), base row over erased row.
        split = splits[0]
        grid_images = []
        for concept in concepts:
            picks = [i for i, smp in enumerate(base_report.samples[split])
                     if concept in (smp.scene.shape, smp.scene.color, smp.scene.style)][:10]
            grid_images += [base_report.images[split][i] for i in picks] + [erased.images[split][i] for i in picks]
    if json_out:
        json_out.write_text(json.dumps(result, indent=2))
        print(f"wrote {json_out}")
    if grid_out:
        image_grid(grid_images, cols=10).save(grid_out)
        print(f"wrote {grid_out}")
    return result
