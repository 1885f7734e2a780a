"""A pack on the three axes at once: attack success, what the other concepts keep, and the cost per image. Prints
JSON (and a summary table on stderr).

    python bench/safety.py toy/circle@v5-away-attack4 [--guide-away S] [--samples 200] [--budget 64] \\
        [--family prompt --family settings --family soft-prompt] [--negative-prompt] [--known-from toy]

1. Attack success per family (`erasure attack`, fresh seeds) over the service's request range (the flags; negative
   prompts only with ``--negative-prompt``), each with the base's rate on the same attack.
2. The erasure table (`erasure eval`): the erased concept, and every other concept as % of the base on train and
   held-out templates (``--samples`` images per split; "apart": images whose prompt names no erased concept).
3. Cost: denoiser rows per image and step with the pack, relative to the base, for a guided request without and with
   a negative prompt (counted on the denoisers' forward calls; the batched service runs the same rows).

``--guide-away S``, ``--guide-away-until U`` and ``--guide-away-reference base|pack`` override the pack's own (what the
service would serve with them) for all three: the pack is measured as a copy with those settings.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def rows_per_step(pipe, steps: int, negative_prompt: str | None) -> float:
    """Denoiser rows per image and step of one 64 px image (every denoiser module of the pipeline counted)."""
    import torch

    from erasure.sampling.generate import generate

    seen: dict[int, torch.nn.Module] = {}
    for module in (pipe.unet, getattr(pipe.unet, "erasure_guide_away", None)):
        base = getattr(module, "base_denoiser", module)
        if isinstance(base, torch.nn.Module):
            seen[id(base)] = base
    seen[id(pipe.unet)] = pipe.unet
    counted = [0]
    handles = [m.register_forward_pre_hook(lambda _m, args, kwargs: counted.__setitem__(0, counted[0] + (
        args[0] if args else kwargs["sample"]).shape[0]), with_kwargs=True) for m in seen.values()]
    try:
        generate(pipe, ["a red circle"], [0], steps=steps, guidance=3.0, negative_prompt=negative_prompt, size=64)
    finally:
        for h in handles:
            h.remove()
    return counted[0] / steps


def erasure_table(pipe, erased_pipe, concepts: list[str], samples: int) -> dict:
    from erasure.toy.evaluate import comparison, evaluate
    from erasure.toy.oracle import Oracle

    oracle = Oracle.load()
    settings = dict(samples=samples, splits=("train", "heldout"), progress=False)
    table = comparison(evaluate(pipe, oracle, **settings), evaluate(erased_pipe, oracle, **settings), concepts)
    out = {}
    for split, data in table["splits"].items():
        rows = data["concepts"]
        others = {c: r for c, r in rows.items() if not r["erased_concept"]}
        weakest = sorted(others.items(), key=lambda cr: cr[1]["ratio"] if cr[1]["ratio"] is not None else 1)[:3]
        apart = {c: r["apart"]["erased"] / r["apart"]["base"] for c, r in others.items()
                 if r.get("apart") and r["apart"]["base"]}
        out[split] = {
            "erased": {c: {"base": rows[c]["base"], "erased": rows[c]["erased"]} for c in concepts},
            "others_min_ratio": min(r["ratio"] for r in others.values() if r["ratio"] is not None),
            "weakest": {c: round(r["ratio"], 3) for c, r in weakest},
            "apart_min_ratio": round(min(apart.values()), 3) if apart else None,
            "ratios": {c: round(r["ratio"], 3) for c, r in others.items() if r["ratio"] is not None},
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("pack", help="a pack directory or NS/NAME[@REV]")
    ap.add_argument("--guide-away", type=float, default=None, help="serve the pack with this guide_away instead")
    ap.add_argument("--guide-away-until", type=float, default=None, help="... and this guide_away_until")
    ap.add_argument("--guide-away-reference", choices=["base", "pack"], default=None,
                    help="... and this guide_away_reference")
    ap.add_argument("--samples", type=int, default=200, help="images per template split of the erasure table")
    ap.add_argument("--family", action="append", default=None, help="attack family (repeat; default all)")
    ap.add_argument("--budget", type=int, default=64)
    ap.add_argument("--seeds", type=int, default=64, help="fresh seeds of each attack's figure")
    ap.add_argument("--known-from", action="append", default=["toy"])
    ap.add_argument("--min-steps", type=int, default=8)
    ap.add_argument("--max-steps", type=int, default=50)
    ap.add_argument("--min-size", type=int, default=64)
    ap.add_argument("--max-size", type=int, default=64)
    ap.add_argument("--min-guidance", type=float, default=3.0)
    ap.add_argument("--max-guidance", type=float, default=7.5)
    ap.add_argument("--negative-prompt", action=argparse.BooleanOptionalAction, default=False)
    ap.add_argument("--calibrate", action=argparse.BooleanOptionalAction, default=False,
                    help="also run each family against the base (doubles the time)")
    ap.add_argument("--skip-attack", action="store_true")
    ap.add_argument("--skip-table", action="store_true")
    args = ap.parse_args()

    from erasure.base.loading import load_pipeline
    from erasure.pack.compose import with_packs
    from erasure.pack.concept_pack import load_packs
    from erasure.redteam.attack import attack
    from erasure.redteam.config import AttackConfig

    import tempfile

    [(pack, _)] = load_packs([args.pack])
    for field in ("guide_away", "guide_away_until", "guide_away_reference"):
        if getattr(args, field) is not None:
            setattr(pack.manifest, field, getattr(args, field))
    spec = str(pack.save_pretrained(Path(tempfile.mkdtemp(prefix="safety-bench-")) / pack.name))
    pipe = load_pipeline("toy")
    erased = with_packs(pipe, [(pack, 1.0)])
    out: dict = {"pack": args.pack, "concepts": pack.concepts,
                 "guidance": {f: getattr(pack.manifest, f) for f in ("guide_away", "guide_away_until",
                                                                      "guide_away_reference")}}

    # 3. cost first (seconds): rows per image and step, with and without a negative prompt
    cost = {}
    for label, negative in (("guided", None), ("guided_negative_prompt", "a blue square")):
        base, packed = rows_per_step(pipe, 20, negative), rows_per_step(erased, 20, negative)
        cost[label] = {"base_rows": base, "pack_rows": packed, "relative": round(packed / base, 3)}
    out["cost"] = cost

    if not args.skip_table:
        t0 = time.perf_counter()
        out["erasure_table"] = erasure_table(pipe, erased, pack.concepts, args.samples)
        out["erasure_table"]["seconds"] = round(time.perf_counter() - t0)

    if not args.skip_attack:
        cfg = AttackConfig(families=args.family or ["prompt", "settings", "soft-prompt"], budget=args.budget,
                           seeds=args.seeds, known_from=args.known_from, min_steps=args.min_steps,
                           max_steps=args.max_steps, min_size=args.min_size, max_size=args.max_size,
                           min_guidance=args.min_guidance, max_guidance=args.max_guidance,
                           negative_prompt=args.negative_prompt, guide_away=pack.guide_away,
                           calibrate=args.calibrate)
        t0 = time.perf_counter()
        [record] = attack([spec], cfg, base="toy", progress=False).values()
        out["attack"] = {r.family: {"asr": r.asr, "base_rate": r.base_rate, "attack": record.attack_text(r, False)}
                         for r in record.results}
        out["attack_seconds"] = round(time.perf_counter() - t0)

    print(json.dumps(out, indent=2))
    summary = [f"{args.pack} ({out['guidance']})"]
    for family, r in out.get("attack", {}).items():
        summary.append(f"  {family}: {r['asr']:.0%} (base {r['base_rate']:.0%})  {r['attack']}")
    for split, t in out.get("erasure_table", {}).items():
        if isinstance(t, dict):
            summary.append(f"  others {split}: min {t['others_min_ratio']:.0%} of base (apart {t['apart_min_ratio']}),"
                           f" weakest {t['weakest']}")
    summary.append(f"  cost: {cost['guided']['relative']}x rows per image-step "
                   f"({cost['guided_negative_prompt']['relative']}x with a negative prompt)")
    print("\n".join(summary), file=sys.stderr)


if __name__ == "__main__":
    main()
