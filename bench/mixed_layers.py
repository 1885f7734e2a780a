"""Grouped weights vs low-rank deltas for a batch whose rows use different pack sets. Prints JSON.

    python bench/mixed_layers.py [--torch-threads 1] [--reps 20]

How a touched layer can serve rows of K pack sets in one batch (the issue's two candidates, plus the dense delta):
- grouped: each run of rows through its own set's weights θ* + Σ s·Δ (one matmul/conv per set, concatenated) —
  what erasure/mixed.py does; exact;
- low-rank: the base weights over the whole batch, plus per set a rank-r delta B·A applied to its rows (S-LoRA /
  Punica style); approximate unless r is the delta's full rank;
- dense delta: the base over the whole batch plus each set's full Δ on its rows; exact, two products per set.
Layer timings use the toy UNet's and SD 1.5's layer shapes at 32 rows (16 guided images) split over 1 or 4 sets.
Accuracy of low-rank: the share of each shipped pack's delta energy (Frobenius²) that rank r keeps. Whole-UNet:
one toy UNet step at 32 rows, one set vs 4 esd-x sets vs 4 sets one of which is esd-u (MixedDenoiser).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO)]


def timed(fn, reps: int, budget: float = 0.5) -> float:
    """Best of 3 means of up to ``reps`` calls (fewer when one call takes long), in ms."""
    t = time.perf_counter()
    fn()
    reps = max(1, min(reps, int(budget / max(time.perf_counter() - t, 1e-6))))
    best = []
    for _ in range(3):
        t = time.perf_counter()
        for _ in range(reps):
            fn()
        best.append((time.perf_counter() - t) / reps)
    return min(best) * 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--torch-threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--rows", type=int, default=32, help="UNet rows (2 per guided image)")
    args = ap.parse_args()

    import torch
    import torch.nn.functional as F

    torch.set_num_threads(args.torch_threads)
    g = torch.Generator().manual_seed(0)
    R, K = args.rows, 4
    runs = [(i * R // K, (i + 1) * R // K) for i in range(K)]

    def variants(op, x, w, a, b, rank):
        """op(x, weight) for one layer; w: each set's weights; a, b: each set's rank-r factors (b after a)."""

        def grouped():
            return torch.cat([op(x[s:e], w[k]) for k, (s, e) in enumerate(runs)])

        def dense_delta():
            y = op(x, w[0])
            return torch.cat([y[s:e] + op(x[s:e], w[k]) for k, (s, e) in enumerate(runs)])

        def low_rank():
            y = op(x, w[0])
            return torch.cat([y[s:e] + op.up(op(x[s:e], a[k]), b[k]) for k, (s, e) in enumerate(runs)])

        return {"one_set": lambda: op(x, w[0]), "grouped": grouped, "dense_delta": dense_delta,
                f"low_rank_r{rank}": low_rank}

    def linear_case(tokens, cin, cout, rank):
        op = type("Op", (), {"__call__": staticmethod(F.linear), "up": staticmethod(F.linear)})()
        x = torch.randn(R, tokens, cin, generator=g)
        w = [torch.randn(cout, cin, generator=g) * 0.02 for _ in range(K)]
        a = [torch.randn(rank, cin, generator=g) for _ in range(K)]
        b = [torch.randn(cout, rank, generator=g) for _ in range(K)]
        return variants(op, x, w, a, b, rank)

    def conv_case(hw, cin, cout, rank):
        op = type("Op", (), {"__call__": staticmethod(lambda x, w: F.conv2d(x, w, padding=1)),
                             "up": staticmethod(F.conv2d)})()  # LoRA for a conv: k x k down, 1 x 1 up
        x = torch.randn(R, cin, hw, hw, generator=g)
        w = [torch.randn(cout, cin, 3, 3, generator=g) * 0.02 for _ in range(K)]
        a = [torch.randn(rank, cin, 3, 3, generator=g) for _ in range(K)]
        b = [torch.randn(cout, rank, 1, 1, generator=g) for _ in range(K)]
        return variants(op, x, w, a, b, rank)

    cases = {
        "toy attn2.to_q (Linear 128->128, 16 tokens)": linear_case(16, 128, 128, 8),
        "toy attn2.to_k (Linear 64->128, 20 tokens)": linear_case(20, 64, 128, 8),
        "toy resnet conv (Conv2d 3x3 64->64, 8x8)": conv_case(8, 64, 64, 8),
        "SD1.5 attn2.to_q at 256 px (Linear 320->320, 1024 tokens)": linear_case(1024, 320, 320, 16),
        "SD1.5 attn2.to_k (Linear 768->320, 77 tokens)": linear_case(77, 768, 320, 16),
        "SD1.5 resnet conv at 256 px (Conv2d 3x3 320->320, 32x32)": conv_case(32, 320, 320, 16),
    }
    layers = {}
    for name, fns in cases.items():
        layers[name] = {k: round(timed(f, args.reps), 3) for k, f in fns.items()}
        print(name, layers[name], file=sys.stderr, flush=True)

    # accuracy of low-rank deltas: energy of the shipped packs' deltas kept at rank r
    from registry.lock import LockFile

    lock = LockFile.load(REPO / "service" / "packs.lock")
    energy = {}
    for name, pulled in lock.fetch(list(lock.entries)).items():
        kept = {r: [0.0, 0.0] for r in (4, 8, 16, 32)}
        for delta in pulled.pack.delta.values():
            if delta.ndim < 2:
                continue
            s = torch.linalg.svdvals(delta.float().reshape(delta.shape[0], -1)) ** 2
            for r in kept:
                kept[r][0] += float(s[:r].sum())
                kept[r][1] += float(s.sum())
        energy[f"{name} ({pulled.pack.manifest.method})"] = {f"r{r}": round(a / b, 4) for r, (a, b) in kept.items()}

    # a whole toy UNet step through MixedDenoiser
    from erasure.base.loading import load_pipeline
    from erasure.pack.compose import compose_denoiser
    from erasure.pack.concept_pack import BaseWeights
    from erasure.sampling.mixed import MixedDenoiser

    pipe = load_pipeline("toy")
    base = BaseWeights(pipe.unet)
    packs = {n: p.pack for n, p in lock.fetch(list(lock.entries), base=base).items()}
    unet = {s: compose_denoiser(base, [(packs[n], 1.0) for n in s]) for s in
            [("circle",), ("red",), ("circle", "red", "striped"), ("circle", "red", "square")]}
    mixed = MixedDenoiser(pipe.unet)
    x = torch.randn(R, 4, 16, 16, generator=g)
    h = torch.randn(R, 20, 64, generator=g)
    t = torch.full((R,), 500)
    q = R // 4
    plans = {"one_set": [(R, unet[("circle",)])],
             "four_esd_x_sets": [(q, pipe.unet), (q, unet[("circle",)]), (q, unet[("red",)]),
                                 (q, unet[("circle", "red", "striped")])],
             "four_sets_one_esd_u": [(q, pipe.unet), (q, unet[("circle",)]), (q, unet[("red",)]),
                                     (q, unet[("circle", "red", "square")])]}
    step = {}
    with torch.inference_mode():
        for name, segments in plans.items():
            run = lambda s=segments: mixed(x, t, s, encoder_hidden_states=h)  # noqa: E731
            step[name] = round(timed(run, max(3, args.reps // 4)), 2)
    out = {"rows": R, "pack_sets": K, "torch_threads": torch.get_num_threads(), "layer_ms": layers,
           "low_rank_energy_kept": energy, "toy_unet_step_ms": step,
           "toy_unet_step_vs_one_set": {k: round(v / step["one_set"], 3) for k, v in step.items()}}
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
