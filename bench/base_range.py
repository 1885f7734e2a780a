"""Where the base itself draws a concept for its siblings' prompts, per steps x guidance: what a service's limits
must leave out, since no pack can erase what the base draws when asked for something else.

For each concept, prompts naming each of its siblings (the toy world's train and held-out wording, no word of the
concept) are sampled on the base over a grid of steps and guidance scales; the table is the share of images the
judge reads as the concept. The shipped limits (service/config.yaml: 8 steps or more, guidance up to 7.5) come from
this table: with 4 steps and guidance 7.5, or 8 steps and 15, the toy base draws yellow prompts red.

    python bench/base_range.py                                  # the four shipped concepts, 32 images per cell
    python bench/base_range.py --concepts red --images 64 --steps 4 8 12 --guidance 5 7.5 10 15
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from rich.console import Console
from rich.table import Table
from tqdm.auto import tqdm

from erasure.base.loading import load_pipeline
from erasure.toy.judge import ToyOracleJudge


def sibling_prompts(judge, concept: str, n: int, rng: np.random.Generator) -> list[str]:
    """``n`` prompts naming the concept's siblings in turn, half in train and half in held-out wording."""
    siblings = judge.siblings(concept)
    return [judge.prompts(siblings[i % len(siblings)], 1, rng, ("train", "heldout")[i // len(siblings) % 2])[0]
            for i in range(n)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--concepts", nargs="+", default=["circle", "red", "striped", "square"])
    p.add_argument("--steps", nargs="+", type=int, default=[4, 8, 12, 20])
    p.add_argument("--guidance", nargs="+", type=float, default=[3.0, 5.0, 7.5, 10.0, 15.0, 20.0])
    p.add_argument("--images", type=int, default=32, help="images per cell (one sibling prompt each)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    pipe, judge = load_pipeline("toy"), ToyOracleJudge()
    table = Table(title="the base draws the concept for its siblings' prompts (share of images, judge: toy oracle)")
    table.add_column("concept")
    table.add_column("steps", justify="right")
    for g in args.guidance:
        table.add_column(f"g {g:g}", justify="right")
    cells = len(args.concepts) * len(args.steps) * len(args.guidance)
    with tqdm(total=cells, desc="base range", unit="cell") as bar:
        for concept in args.concepts:
            prompts = sibling_prompts(judge, concept, args.images, np.random.default_rng([args.seed, len(concept)]))
            for steps in args.steps:
                row = []
                for g in args.guidance:
                    generators = [torch.Generator().manual_seed(args.seed * 10_000 + i) for i in range(len(prompts))]
                    images = pipe(prompts, num_inference_steps=steps, guidance_scale=g, generator=generators).images
                    rate = float(judge.shows(images, concept).mean())
                    row.append(f"[bold red]{rate:.0%}[/]" if rate > 0.05 else f"{rate:.0%}")
                    bar.update()
                table.add_row(concept, str(steps), *row)
    Console().print(table)


if __name__ == "__main__":
    main()
