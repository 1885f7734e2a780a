"""Wall time of ESD training loops on the toy base, each run until the erased concept reaches the same accuracy.

The reference loop follows the official per-iteration algorithm (a fresh x_t every iteration: up to ddim_steps
guided UNet passes, then 3 UNet passes and 1 backward). The pooled loop (the default) reuses sampled
trajectories. Both train until the oracle reads the erased concept on at most --target of its prompts (checked
every --check-every iterations on a fixed set of train-template prompts; evaluation time is not counted).
Prints JSON.

    python bench/esd_loops.py [--concept circle] [--target 0.10] [--max-iterations 600] [--template toy]
        [--preserve square --preserve triangle --preserve-weight 5]
"""

import argparse
import json
import time

import numpy as np
import torch

from erasure.config import ESDConfig
from erasure.evaluate import plan
from erasure.pipeline import TOY_DEFAULTS, generate, load_pipeline
from erasure.toy.oracle import Oracle
from erasure.toy.world import concept_attribute


def concept_accuracy(pipe, oracle, samples, attr, concept):
    images = generate(pipe, [s.prompt for s in samples], [s.seed for s in samples], steps=TOY_DEFAULTS["steps"],
                      guidance=TOY_DEFAULTS["guidance"])
    read = oracle.classify(np.stack([np.asarray(im) for im in images]))[attr]
    return float(np.mean([r == concept for r in read]))


def run(loop: str, args, oracle, samples, attr):
    from erasure.esd import ESDTrainer

    pipe = load_pipeline("toy")
    cfg = ESDConfig(concepts=[args.concept], method=args.method, iterations=args.max_iterations, lr=args.lr,
                    loop=loop, seed=args.seed, ddim_steps=args.ddim_steps, templates=args.template,
                    preserve=args.preserve, preserve_weight=args.preserve_weight, batch_size=args.batch_size,
                    refresh_every=args.refresh_every, pool_trajectories=args.pool_trajectories)
    trainer = ESDTrainer(pipe, cfg, progress=False)
    history = []
    while trainer.iteration < args.max_iterations:
        trainer.train(until=trainer.iteration + args.check_every)
        trainer.unet.eval()
        acc = concept_accuracy(pipe, oracle, samples, attr, args.concept)
        trainer.unet.train()
        history.append({"iteration": trainer.iteration, "train_seconds": round(trainer.train_seconds, 2),
                        "accuracy": acc})
        print(json.dumps({"loop": loop, **history[-1]}), flush=True)
        if acc <= args.target:
            break
    reached = history[-1]["accuracy"] <= args.target
    return {"reached_target": reached, "iterations": trainer.iteration, "train_seconds": trainer.train_seconds,
            "seconds_per_iteration": trainer.train_seconds / trainer.iteration,
            "unet_sample_passes": trainer.unet_passes, "history": history}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--concept", default="circle")
    ap.add_argument("--method", default="esd-x")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--ddim-steps", type=int, default=50)
    ap.add_argument("--target", type=float, default=0.10)
    ap.add_argument("--check-every", type=int, default=25)
    ap.add_argument("--max-iterations", type=int, default=600)
    ap.add_argument("--samples", type=int, default=40, help="prompts of the concept used for each check")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--template", action="append", default=None, help="as erasure train (default: toy)")
    ap.add_argument("--preserve", action="append", default=[], help="as erasure train")
    ap.add_argument("--preserve-weight", type=float, default=5.0, help="as erasure train (default 5, as `make packs`)")
    defaults = ESDConfig.model_fields  # the pooled loop's options default to the trainer's defaults
    ap.add_argument("--batch-size", type=int, default=defaults["batch_size"].default,
                    help="pooled loop: x_t per step (default: as erasure train)")
    ap.add_argument("--refresh-every", type=int, default=defaults["refresh_every"].default,
                    help="pooled loop: resample the pool every N steps (default: as erasure train)")
    ap.add_argument("--pool-trajectories", type=int, default=defaults["pool_trajectories"].default,
                    help="pooled loop: trajectories per concept per refresh (default: as erasure train)")
    ap.add_argument("--loops", nargs="+", default=["pooled", "reference"])
    args = ap.parse_args()
    args.template = args.template or ["toy"]
    torch.manual_seed(0)
    oracle = Oracle.load()
    attr = concept_attribute(args.concept)
    samples = [s for s in plan(400, "train", seed=123) if getattr(s.scene, attr) == args.concept][: args.samples]
    base_acc = concept_accuracy(load_pipeline("toy"), oracle, samples, attr, args.concept)
    results = {}
    for loop in args.loops:
        start = time.perf_counter()
        results[loop] = run(loop, args, oracle, samples, attr)
        results[loop]["wall_seconds_including_checks"] = round(time.perf_counter() - start, 1)
    out = {"benchmark": "esd_loops", "concept": args.concept, "method": args.method, "lr": args.lr,
           "ddim_steps": args.ddim_steps,
           "templates": args.template, "preserve": args.preserve,
           "preserve_weight": args.preserve_weight,
           "pooled_batch_size": args.batch_size, "pooled_refresh_every": args.refresh_every,
           "pooled_trajectories": args.pool_trajectories,
           "target_accuracy": args.target,
           "base_accuracy": base_acc,
           "results": results}
    if all(r["reached_target"] for r in results.values()) and {"pooled", "reference"} <= set(results):
        out["speedup_reference_over_pooled"] = round(
            results["reference"]["train_seconds"] / results["pooled"]["train_seconds"], 2)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
