"""How much an image served inside a mixed batch differs from the same request served alone. Prints JSON.

    python bench/batch_determinism.py [--requests 64] [--max-batch-size 16] [--torch-threads 1]

The service's batcher (service/batcher.py, in-process: the same engine `bentoml serve` runs, minus HTTP) serves
each request alone, then all of them at once (continuous batching: requests join as others finish, so rows at
different steps, with different pack sets, guidance scales, negative prompts and step counts share UNet calls),
then all of them at once again. Packs: the shipped lock (circle, red, striped: esd-x; square: esd-u). Figures: max
abs pixel difference (0-255) alone vs batched per image, the share of identical images, whether the toy oracle's
labels (shape, colour, style) agree, and whether the repeated batch gave identical bytes.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--max-batch-size", type=int, default=16)
    ap.add_argument("--torch-threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    import numpy as np
    import torch

    torch.set_num_threads(args.torch_threads)
    from erasure.base.loading import load_pipeline
    from erasure.pack.compose import compose_denoiser
    from erasure.pack.concept_pack import BaseWeights
    from erasure.toy.oracle import Oracle
    from erasure.toy.world import COLORS, SHAPES, STYLES
    from registry.lock import LockFile
    from service.batcher import Batcher, Job

    pipe = load_pipeline("toy")
    base = BaseWeights(pipe.unet)
    lock = LockFile.load(REPO / "service" / "packs.lock")
    packs = {n: p.pack for n, p in lock.fetch(list(lock.entries), base=base).items()}
    sets = [(), ("circle",), ("square",), ("red", "striped"), ("circle", "square")]
    unets = {s: compose_denoiser(base, [(packs[n], 1.0) for n in s]) for s in sets}
    rng = random.Random(args.seed)
    specs = []
    for i in range(args.requests):
        prompt = f"a {rng.choice(STYLES)} {rng.choice(COLORS)} {rng.choice(SHAPES)}"
        specs.append(dict(prompt=prompt, negative_prompt=rng.choice([None, None, "red", "a green square"]),
                          seeds=list(range(i * 10, i * 10 + rng.choice([1, 1, 2]))), steps=rng.choice([10, 20, 30]),
                          guidance=rng.choice([1.0, 3.0, 3.0, 7.5]), height=64, width=64,
                          pack_set=sets[i % len(sets)]))

    def job(spec):
        s = {k: v for k, v in spec.items() if k != "pack_set"}
        return Job(**s, denoiser=unets[spec["pack_set"]])

    def arrays(images):
        return [np.asarray(im.convert("RGB")) for im in images]

    batcher = Batcher(pipe, max_batch_size=args.max_batch_size, max_latency_ms=5)
    t0 = time.perf_counter()
    alone = [arrays(batcher.submit(job(s)).future.result()) for s in specs]
    t_alone = time.perf_counter() - t0
    runs, t_batched = [], []
    for _ in range(2):
        t0 = time.perf_counter()
        jobs = [batcher.submit(job(s)) for s in specs]
        runs.append([arrays(j.future.result()) for j in jobs])
        t_batched.append(time.perf_counter() - t0)
    stats = batcher.stats
    batcher.close()

    diffs, flat_alone, flat_batched = [], [], []
    for a, b in zip(alone, runs[0]):
        for x, y in zip(a, b):
            diffs.append(int(np.abs(x.astype(np.int16) - y.astype(np.int16)).max()))
            flat_alone.append(x)
            flat_batched.append(y)
    oracle = Oracle.load()
    la, lb = oracle.classify(np.stack(flat_alone)), oracle.classify(np.stack(flat_batched))
    agree = {k: sum(p == q for p, q in zip(la[k], lb[k])) for k in la}
    repeat = all(np.array_equal(x, y) for a, b in zip(runs[0], runs[1]) for x, y in zip(a, b))
    out = {
        "requests": len(specs), "images": len(diffs), "pack_sets": [list(s) for s in sets],
        "steps": [10, 20, 30], "guidance": [1.0, 3.0, 7.5], "negative_prompts": True,
        "max_batch_size": args.max_batch_size, "torch_threads": torch.get_num_threads(),
        "mean_images_per_step": round(stats.images_stepped / max(1, stats.steps), 2),
        "max_abs_pixel_diff": max(diffs), "identical_images": sum(d == 0 for d in diffs),
        "diff_histogram": {str(d): diffs.count(d) for d in sorted(set(diffs))},
        "oracle_labels_equal": {k: f"{v}/{len(diffs)}" for k, v in agree.items()},
        "repeated_batch_identical_bytes": repeat,
        "seconds": {"alone": round(t_alone, 2), "batched": [round(t, 2) for t in t_batched]},
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
