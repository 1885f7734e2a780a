"""Seconds per 64x64 image at 20 DDIM steps on the shipped toy model (batch 1, guidance on). Prints JSON.

    python bench/generate_speed.py [--runs 10] [--threads N]
"""

import argparse
import json
import os
import platform
import statistics
import time

import torch

from erasure.base.loading import load_pipeline
from erasure.sampling.generate import generate
from erasure.toy import SAMPLING


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--steps", type=int, default=SAMPLING["steps"])
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    pipe = load_pipeline("toy")
    generate(pipe, ["a red circle"], [0], steps=args.steps)  # warm-up
    times = []
    for i in range(args.runs):
        start = time.perf_counter()
        generate(pipe, ["a striped blue star"], [i], steps=args.steps, guidance=SAMPLING["guidance"])
        times.append(time.perf_counter() - start)
    print(json.dumps({
        "benchmark": "toy_generate_one_image",
        "steps": args.steps,
        "size": 64,
        "runs": args.runs,
        "seconds_p50": round(statistics.median(times), 4),
        "seconds_max": round(max(times), 4),
        "torch_threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
    }, indent=2))


if __name__ == "__main__":
    main()
