"""The erasure table of packs exported as LoRAs, loaded with plain diffusers, at several ranks, vs the packs. JSON.

For each pack: the pack composed (`erasure eval --packs` settings) and its LoRA export at each rank, written by
`erasure.export.save_lora` and loaded onto a fresh toy pipeline with `pipe.load_lora_weights(dir)`, are evaluated
with the oracle on the same prompts and seeds as the base; plus each export's file size and relative Frobenius
error. A rank *holds* for a pack when, on every split, its erased concept's accuracy is at most the pack's + 5
points and the mean accuracy of all other concepts is at least the pack's - 2 points.

    python bench/lora_fidelity.py [--packs toy/circle@v3 ...] [--ranks 1 4 16 full] [--no-bias-variant]
        [--samples 100] [--json build/lora_fidelity.json] [--sizes-only]
"""

import argparse
import json
import math
import platform
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from erasure.base.loading import load_pipeline
from erasure.pack.compose import with_packs
from erasure.pack.concept_pack import load_packs
from erasure.pack.export import parse_rank, save_lora
from erasure.toy import SAMPLING
from erasure.toy.evaluate import comparison, evaluate
from erasure.toy.oracle import Oracle

SHIPPED = ["toy/circle@v3", "toy/red@v3", "toy/striped@v3", "toy/square@v3"]
ERASED_SLACK, OTHERS_SLACK = 0.05, 0.02


def summary(table: dict) -> dict:
    """Per split: the erased concepts' accuracy, and the mean and lowest accuracy (as share of base) of the others."""
    out = {}
    for split, part in table["splits"].items():
        rows = part["concepts"]
        others = {c: r for c, r in rows.items() if not r["erased_concept"]}
        lowest = min(others, key=lambda c: others[c]["ratio"] or 0.0)
        out[split] = {
            "erased": {c: rows[c]["erased"] for c in table["erased_concepts"]},
            "others_mean": float(np.nanmean([r["erased"] for r in others.values()])),
            "others_lowest": {"concept": lowest, "ratio": others[lowest]["ratio"]},
        }
    return out


def holds(variant: dict, pack: dict) -> bool:
    for split, s in variant.items():
        p = pack[split]
        if any(s["erased"][c] > p["erased"][c] + ERASED_SLACK + 1e-9 for c in s["erased"]):
            return False
        if s["others_mean"] < p["others_mean"] - OTHERS_SLACK - 1e-9:
            return False
    return True


def markdown(results: dict) -> str:
    """The table of docs/export.md from a results JSON."""
    def pct(x):
        return f"{100 * x:.1f} %" if x == x else "n/a"

    def cells(s):
        splits = [k for k in s if k in ("train", "heldout")]
        erased = " / ".join(", ".join(f"{pct(v)}" for v in s[k]["erased"].values()) for k in splits)
        mean = " / ".join(pct(s[k]["others_mean"]) for k in splits)
        low = " / ".join(f"{s[k]['others_lowest']['concept']} {s[k]['others_lowest']['ratio']:.0%}" for k in splits)
        return erased, mean, low

    rows = ["| pack | export | erased concept, train / held-out | other concepts, mean | lowest other (% of base) "
            "| rel. error | file | holds |", "|---|---|---|---|---|---:|---:|---|"]
    for spec, e in results["packs"].items():
        rows.append(f"| `{spec}` {e['method']} | the pack | {' | '.join(cells(e['pack']))} | 0 | "
                    f"{(e['delta_file_bytes'] or e['delta_bytes']) / 1e6:.2f} MB | |")
        for label, v in e["lora"].items():
            rows.append(f"| | LoRA {label} | {' | '.join(cells(v))} | {100 * v['relative_error']:.1f} % | "
                        f"{v['file_bytes'] / 1e6:.2f} MB | {'yes' if v['holds'] else '**no**'} |")
    return "\n".join(rows)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--table", metavar="JSON", help="only print the markdown table of an earlier run's JSON")
    ap.add_argument("--packs", nargs="+", default=SHIPPED)
    ap.add_argument("--ranks", nargs="+", type=parse_rank, default=[1, 4, 16, "full"])
    ap.add_argument("--sizes-only", action="store_true", help="only export: file sizes and relative errors, no eval")
    ap.add_argument("--no-bias-variant", action="store_true", help="also evaluate the full-rank LoRA without biases")
    ap.add_argument("--samples", type=int, default=100, help="prompts per template split (default 100)")
    ap.add_argument("--splits", nargs="+", default=["train", "heldout"])
    ap.add_argument("--steps", type=int, default=SAMPLING["steps"])
    ap.add_argument("--guidance", type=float, default=SAMPLING["guidance"])
    ap.add_argument("--batch-size", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--work", default="build/lora_fidelity", help="where the exports are written")
    ap.add_argument("--json", default="build/lora_fidelity.json")
    args = ap.parse_args()
    if args.table:
        print(markdown(json.loads(Path(args.table).read_text())))
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = dict(samples=args.samples, splits=args.splits, seed=args.seed, steps=args.steps,
                    guidance=args.guidance, batch_size=args.batch_size, progress=False)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    oracle = Oracle.load()
    start = time.perf_counter()
    base = None if args.sizes_only else evaluate(load_pipeline("toy"), oracle, **settings)
    results = {"settings": {k: v for k, v in settings.items() if k != "progress"},
               "criterion": {"erased_slack": ERASED_SLACK, "others_slack": OTHERS_SLACK},
               "torch_threads": torch.get_num_threads(), "machine": platform.machine(), "packs": {}}
    for spec in args.packs:
        [(pack, _)] = load_packs([spec])
        concepts = pack.concepts
        delta_bytes = sum(t.numel() * t.element_size() for t in pack.delta.values())
        pack_summary = None if args.sizes_only else summary(comparison(
            base, evaluate(with_packs(load_pipeline("toy"), [(pack, 1.0)]), oracle, **settings), concepts))
        delta_file = pack.path / "delta.safetensors" if pack.path else None
        entry = {"method": pack.training.method, "delta_bytes": delta_bytes, "pack": pack_summary, "lora": {},
                 "delta_file_bytes": delta_file.stat().st_size if delta_file and delta_file.exists() else None}
        variants = [(rank, True) for rank in args.ranks] + ([("full", False)] if args.no_bias_variant else [])
        for rank, biases in variants:
            label = f"{rank}" + ("" if biases else "-no-bias")
            out = work / f"{pack.name}-{label}"
            if out.exists():
                shutil.rmtree(out)
            t0 = time.perf_counter()
            export = save_lora(pack, out, rank=rank, biases=biases)
            export_s = time.perf_counter() - t0
            entry["lora"][label] = {
                "rank": rank, "biases": biases, "file_bytes": export.files["pytorch_lora_weights.safetensors"],
                "parameters": export.lora.num_parameters, "relative_error": export.lora.relative_error,
                "export_seconds": round(export_s, 2),
            }
            if not args.sizes_only:
                pipe = load_pipeline("toy")
                pipe.load_lora_weights(str(out))  # plain diffusers + peft, as a user would
                s = summary(comparison(base, evaluate(pipe, oracle, **settings), concepts))
                entry["lora"][label].update(holds=holds(s, pack_summary), **s)
            print(json.dumps({"pack": spec, "variant": label, **entry["lora"][label]}), flush=True)
            results["packs"][spec] = entry
            save(results, args.json)  # after every variant: an interrupted run keeps what it measured
    results["seconds"] = round(time.perf_counter() - start, 1)
    if not args.sizes_only:
        ranks = sorted(args.ranks, key=lambda r: math.inf if r == "full" else r)
        held = [r for r in ranks if all(e["lora"][str(r)]["holds"] for e in results["packs"].values())]
        results["smallest_rank_that_holds"] = held[0] if held else None
        print(markdown(results))
    save(results, args.json)


def save(results: dict, path: str) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
