"""The ``erasure`` command line. Heavy imports happen inside each command, so ``erasure --help`` is instant."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .errors import ErasureError, InvalidArgumentError


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage dump: say what is wrong and how to see the usage
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _writable_file(path: str) -> Path:
    """Fail before any work if the output cannot be written."""
    p = Path(path).expanduser()
    if p.is_dir():
        raise InvalidArgumentError(f"--out {path} is a directory; give a file name such as out.png")
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir():
        raise InvalidArgumentError(f"--out {path}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK) or (p.exists() and not os.access(p, os.W_OK)):
        raise InvalidArgumentError(f"--out {path}: not writable")
    return p


def _default_guidance(args) -> float:
    from .pipeline import TOY_DEFAULTS, is_toy

    if args.guidance is not None:
        return args.guidance
    return TOY_DEFAULTS["guidance"] if is_toy(args.base) else 7.5


def cmd_generate(args) -> None:
    if not args.prompt.strip():
        raise InvalidArgumentError("the prompt is empty; describe what to draw, e.g. 'a red circle'")
    out = _writable_file(args.out)
    from .pipeline import generate, load_pipeline

    guidance = _default_guidance(args)
    pipe = load_pipeline(args.base)
    _apply_packs(pipe, args.packs)
    [image] = generate(pipe, [args.prompt], [args.seed], steps=args.steps, guidance=guidance,
                       negative_prompt=args.negative_prompt)
    try:
        image.save(out)
    except (OSError, ValueError) as exc:
        raise InvalidArgumentError(f"cannot write {out}: {exc}") from exc
    applied = f", packs {', '.join(args.packs)}" if args.packs else ""
    print(f"wrote {out} (seed {args.seed}, {args.steps} steps, guidance {guidance}{applied})")


def _parse_pack_arg(text: str) -> tuple[str, float]:
    """``DIR`` or ``DIR:SCALE``."""
    path, _, scale = text.rpartition(":") if ":" in text else (text, "", "")
    if not scale:
        return text, 1.0
    try:
        return path, float(scale)
    except ValueError:
        return text, 1.0


def _load_packs(specs: list[str]):
    from .pack import ConceptPack

    return [(ConceptPack.load(path), scale) for path, scale in map(_parse_pack_arg, specs or [])]


def _apply_packs(pipe, specs: list[str]):
    """Load, verify and compose packs onto the pipeline's UNet; returns the Composer (or None)."""
    if not specs:
        return None
    from .compose import Composer

    composer = Composer(pipe.unet)
    composer.apply(_load_packs(specs))
    return composer


def cmd_eval(args) -> None:
    json_out = _writable_file(args.json) if args.json else None
    grid_out = _writable_file(args.grid) if args.grid else None
    from .evaluate import comparison, evaluate, image_grid, print_comparison, print_report
    from .pipeline import load_pipeline
    from .toy.oracle import Oracle

    pipe = load_pipeline(args.base)
    packs = _load_packs(args.packs)  # refused before any generation if a pack is bad
    settings = dict(samples=args.samples, splits=args.splits, seed=args.seed, steps=args.steps,
                    guidance=_default_guidance(args), batch_size=args.batch_size)
    oracle = Oracle.load()
    base = evaluate(pipe, oracle, **settings)
    print_report(base)
    result = base.to_json()
    grid_images = [im for split in base.images.values() for im in split[:50]]
    if packs:
        from .compose import Composer

        Composer(pipe.unet).apply(packs)
        erased = evaluate(pipe, oracle, **settings)
        concepts = [c for pack, _ in packs for c in pack.manifest.concepts]
        table = comparison(base, erased, concepts)
        print_comparison(table)
        result = {**erased.to_json(), "base": base.to_json(), "comparison": table,
                  "packs": [{"path": str(p.path), "name": p.name, "scale": s} for p, s in packs]}
        # Grid: each erased concept's prompts (train templates unless only held-out ones were asked for),
        # base row over erased row.
        split = args.splits[0]
        grid_images = []
        for concept in concepts:
            picks = [i for i, smp in enumerate(base.samples[split])
                     if concept in (smp.scene.shape, smp.scene.color, smp.scene.style)][:10]
            grid_images += [base.images[split][i] for i in picks] + [erased.images[split][i] for i in picks]
    if json_out:
        json_out.write_text(json.dumps(result, indent=2))
        print(f"wrote {json_out}")
    if grid_out:
        image_grid(grid_images, cols=10).save(grid_out)
        print(f"wrote {grid_out}")


def cmd_train(args) -> None:
    from pydantic import ValidationError

    from .config import ESDConfig
    from .methods import check_method

    check_method(args.method)
    fields = {k: v for k, v in dict(
        concepts=args.concept, method=args.method, eta=args.eta, iterations=args.iterations, lr=args.lr,
        sample_with=args.sample_with, erase_from=args.erase_from, guidance=args.guidance, seed=args.seed,
        ddim_steps=args.ddim_steps, loop=args.loop, batch_size=args.batch_size,
        refresh_every=args.refresh_every, pool_trajectories=args.pool_trajectories,
        templates=args.template, preserve=args.preserve, preserve_weight=args.preserve_weight,
        preserve_unconditional=args.preserve_unconditional, anchor=args.anchor,
    ).items() if v is not None}
    try:
        cfg = ESDConfig(**fields)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(map(str, first["loc"]))
        msg = first["msg"].removeprefix("Value error, ")
        raise InvalidArgumentError(f"{where}: {msg}" if where else msg) from None
    import torch

    from .packing import train_pack

    dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[args.delta_dtype]
    pack = train_pack(args.base, cfg, Path(args.out), name=args.name, resume=args.resume,
                      eval_samples=args.eval_samples, delta_dtype=dtype)
    m = pack.manifest
    print(f"wrote pack {m.name!r} to {pack.path}: {len(m.tensors)} tensors, "
          f"{m.metrics['touched_parameters']:,} parameters, {m.metrics['train_seconds']} s of training")
    for concept, row in m.metrics.get("eval", {}).items():
        if concept in m.concepts:
            print(f"  {concept}: {row['base']:.1%} -> {row['erased']:.1%} (oracle, train templates)")


def cmd_toy_build(args) -> None:
    import torch

    from .toy.build import BuildConfig, build

    torch.set_num_threads(args.threads or torch.get_num_threads())
    cfg = BuildConfig(seed=args.seed)
    if args.unet_steps:
        cfg.unet_steps = args.unet_steps
    path = build(out=Path(args.out), work=Path(args.work), cfg=cfg)
    print(f"base pipeline written to {path}")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = _Parser(prog="erasure", description="Erase concepts from diffusers pipelines and ship them as packs.")
    parser.add_argument("--version", action="version", version=f"erasure {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def add_packs(p):
        p.add_argument("--packs", nargs="+", default=[], metavar="DIR[:SCALE]",
                       help="concept packs to compose onto the base (scale defaults to 1)")

    def add_base(p):
        p.add_argument("--base", default="toy", help="'toy' (shipped default), a pipeline directory, or a Hub id")
        p.add_argument("--steps", type=_positive_int, default=20, help="denoising steps (default 20)")
        p.add_argument("--guidance", type=float, default=None,
                       help="classifier-free guidance scale (default 3 on the toy model, 7.5 otherwise)")

    p = sub.add_parser("generate", help="generate one image")
    p.add_argument("prompt")
    p.add_argument("--out", required=True, help="output image file, e.g. out.png")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--negative-prompt", default=None)
    add_packs(p)
    add_base(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("eval", help="oracle accuracy per toy concept on generated images")
    p.add_argument("--samples", type=_positive_int, default=300, help="images per template split (default 300)")
    p.add_argument("--splits", nargs="+", default=["train", "heldout"], choices=["train", "heldout"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=_positive_int, default=50)
    p.add_argument("--json", help="write the figures as JSON to this file")
    p.add_argument("--grid", help="write a grid PNG of generated samples (base over erased with --packs)")
    add_packs(p)
    add_base(p)
    p.set_defaults(func=cmd_eval)

    from .methods import METHODS

    p = sub.add_parser("train", help="erase concepts with ESD and write a concept pack")
    p.add_argument("--concept", action="append", required=True, help="concept to erase (repeat for several)")
    p.add_argument("--method", default="esd-x", help=f"parameter set: {', '.join(METHODS)} (default esd-x)")
    p.add_argument("--eta", type=float, default=None, help="negative guidance eta of the paper (default 1.0)")
    p.add_argument("--iterations", type=_positive_int, default=None, help="optimizer steps (default 1000)")
    p.add_argument("--lr", type=float, default=None, help="Adam learning rate (default 1e-5, the paper's)")
    p.add_argument("--template", action="append", default=None, metavar="TEMPLATE",
                   help="training prompt with {} for the concept, e.g. 'a photo of {}' (repeat for several; default "
                        "'{}', the bare name); 'toy': toy-world train prompts naming the concept")
    p.add_argument("--preserve", action="append", default=None, metavar="CONCEPT",
                   help="keep this concept's predictions at the base's (repeat; not in the paper, default none)")
    p.add_argument("--preserve-weight", type=float, default=None, help="weight of the preservation terms (1.0)")
    p.add_argument("--preserve-unconditional", action="store_true", default=None,
                   help="also keep the empty prompt's predictions (the unconditional branch of guidance) at the base's")
    p.add_argument("--anchor", action="append", default=None, metavar="CONCEPT",
                   help="c0 names this concept instead of leaving the erased one out (repeat: one drawn per "
                        "trajectory; not in the paper). For a base that draws the concept when it is not named")
    p.add_argument("--sample-with", choices=["trained", "frozen"], default=None,
                   help="UNet that samples x_t: trained (paper, default) or frozen (official script)")
    p.add_argument("--erase-from", default=None, help="push eps(x_t, ERASE_FROM) to the concept's target")
    p.add_argument("--guidance", type=float, default=None, help="guidance while sampling x_t (default 3)")
    p.add_argument("--ddim-steps", type=_positive_int, default=None, help="DDIM steps of the x_t sampler (50)")
    p.add_argument("--loop", choices=["pooled", "reference"], default=None,
                   help="pooled (fast, default) or reference (the official per-iteration loop)")
    p.add_argument("--batch-size", type=_positive_int, default=None, help="x_t per step, pooled loop (1)")
    p.add_argument("--refresh-every", type=_positive_int, default=None,
                   help="pooled loop: resample the trajectories every N iterations (50)")
    p.add_argument("--pool-trajectories", type=_positive_int, default=None,
                   help="pooled loop: trajectories sampled per concept per refresh (4)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--base", default="toy", help="'toy' (shipped default), a pipeline directory, or a Hub id")
    p.add_argument("--out", required=True, help="pack directory to write")
    p.add_argument("--name", default=None, help="pack name (default: the --out directory's name)")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    p.add_argument("--eval-samples", type=int, default=None,
                   help="images for the pack's quick oracle evaluation (toy base only; default 100, 0 to skip)")
    p.add_argument("--delta-dtype", choices=["float32", "float16", "bfloat16"], default="float32")
    p.set_defaults(func=cmd_train)

    try:  # push / pull / list / lock live with the registry (imports flow service -> registry -> erasure)
        from registry.cli import add_commands
    except ImportError:
        pass
    else:
        add_commands(sub, _Parser)

    toy = sub.add_parser("toy", help="the toy world (embedded default)").add_subparsers(
        dest="toy_command", required=True, parser_class=_Parser)
    p = toy.add_parser("build", help="train the toy base model and oracle from scratch (resumable)")
    from .toy.oracle import ASSETS

    p.add_argument("--out", default=str(ASSETS), help=f"where the pipeline and oracle go (default {ASSETS})")
    p.add_argument("--work", default="build/toy", help="work directory with checkpoints (default build/toy)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--unet-steps", type=_positive_int, default=None, help="override the UNet's training steps")
    p.set_defaults(func=cmd_toy_build)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except ErasureError as exc:
        print(f"erasure: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("erasure: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
