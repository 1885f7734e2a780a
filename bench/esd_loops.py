"""Wall time of ESD training loops on the toy base, each run until the erased concept reaches the same accuracy.

The reference loop follows the official per-iteration algorithm (a fresh x_t every iteration: up to ddim_steps
guided UNet passes, then 3 UNet passes and 1 backward). The pooled loop (the default) reuses sampled
trajectories. Both train until the oracle reads the erased concept on at most --target of its prompts (checked
every --check-every iterations on a fixed set of train-template prompts; evaluation time is not counted).
Prints JSON.

    python bench/esd_loops.py [--concept circle] [--target 0.10] [--max-iterations 600] [--template toy]
        [--preserve square --preserve triangle --preserve-weight 5] [any other `erasure train` option]

Training options are ESDConfig's (the same flags as `erasure train`); the bench's own defaults: concept circle,
template toy, lr 1e-4, preserve weight 5 (as `make packs`).
"""

import argparse
import json
import time

import numpy as np
import torch

from erasure.base.loading import load_pipeline
from erasure.sampling.generate import generate
from erasure.toy import SAMPLING
from erasure.toy.evaluate import plan
from erasure.toy.oracle import Oracle
from erasure.toy.world import concept_attribute
from erasure.training.config import ESDConfig


def concept_accuracy(pipe, oracle, samples, attr, concept):
    images = generate(pipe, [s.prompt for s in samples], [s.seed for s in samples], steps=SAMPLING["steps"],
                      guidance=SAMPLING["guidance"])
    read = oracle.classify(np.stack([np.asarray(im) for im in images]))[attr]
    return float(np.mean([r == concept for r in read]))


def run(cfg: ESDConfig, args, oracle, samples, attr):
    from erasure.training.trainer import ESDTrainer

    pipe = load_pipeline("toy")
    loop = cfg.loop
    trainer = ESDTrainer(pipe, cfg, progress=False)
    history = []
    while trainer.iteration < args.max_iterations:
        trainer.train(until=trainer.iteration + args.check_every)
        trainer.denoiser.eval()
        acc = concept_accuracy(pipe, oracle, samples, attr, cfg.concepts[0])
        trainer.denoiser.train()
        history.append({"iteration": trainer.iteration, "train_seconds": round(trainer.train_seconds, 2),
                        "accuracy": acc})
        print(json.dumps({"loop": loop, **history[-1]}), flush=True)
        if acc <= args.target:
            break
    reached = history[-1]["accuracy"] <= args.target
    return {"reached_target": reached, "iterations": trainer.iteration, "train_seconds": trainer.train_seconds,
            "seconds_per_iteration": trainer.train_seconds / trainer.iteration,
            "unet_sample_passes": trainer.denoiser_passes, "history": history}


def main():
    from erasure.cli import add_model_options, model_from_args

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    defaults = {"concepts": ["circle"], "templates": ["toy"], "lr": 1e-4, "preserve_weight": 5.0}
    add_model_options(ap, ESDConfig, defaults)
    ap.add_argument("--target", type=float, default=0.10)
    ap.add_argument("--check-every", type=int, default=25)
    ap.add_argument("--max-iterations", type=int, default=600)
    ap.add_argument("--samples", type=int, default=40, help="prompts of the concept used for each check")
    ap.add_argument("--loops", nargs="+", default=["pooled", "reference"])
    args = ap.parse_args()
    cfg = model_from_args(ESDConfig, args, {**defaults, "iterations": args.max_iterations})
    concept = cfg.concepts[0]
    torch.manual_seed(0)
    oracle = Oracle.load()
    attr = concept_attribute(concept)
    samples = [s for s in plan(400, "train", seed=123) if getattr(s.scene, attr) == concept][: args.samples]
    base_acc = concept_accuracy(load_pipeline("toy"), oracle, samples, attr, concept)
    results = {}
    for loop in args.loops:
        start = time.perf_counter()
        results[loop] = run(cfg.model_copy(update={"loop": loop}), args, oracle, samples, attr)
        results[loop]["wall_seconds_including_checks"] = round(time.perf_counter() - start, 1)
    out = {"benchmark": "esd_loops", "training": cfg.model_dump(exclude={"loop"}), "target_accuracy": args.target,
           "base_accuracy": base_acc, "results": results}
    if all(r["reached_target"] for r in results.values()) and {"pooled", "reference"} <= set(results):
        out["speedup_reference_over_pooled"] = round(
            results["reference"]["train_seconds"] / results["pooled"]["train_seconds"], 2)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
