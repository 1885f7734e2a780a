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
    [image] = generate(pipe, [args.prompt], [args.seed], steps=args.steps, guidance=guidance,
                       negative_prompt=args.negative_prompt)
    try:
        image.save(out)
    except (OSError, ValueError) as exc:
        raise InvalidArgumentError(f"cannot write {out}: {exc}") from exc
    print(f"wrote {out} (seed {args.seed}, {args.steps} steps, guidance {guidance})")


def cmd_eval(args) -> None:
    json_out = _writable_file(args.json) if args.json else None
    grid_out = _writable_file(args.grid) if args.grid else None
    from .evaluate import evaluate, image_grid, print_report
    from .pipeline import load_pipeline
    from .toy.oracle import Oracle

    pipe = load_pipeline(args.base)
    report = evaluate(pipe, Oracle.load(), samples=args.samples, splits=args.splits, seed=args.seed,
                      steps=args.steps, guidance=_default_guidance(args), batch_size=args.batch_size)
    print_report(report)
    if json_out:
        json_out.write_text(json.dumps(report.to_json(), indent=2))
        print(f"wrote {json_out}")
    if grid_out:
        images = [im for split in report.images.values() for im in split[:50]]
        image_grid(images, cols=10).save(grid_out)
        print(f"wrote {grid_out} (first 50 images of each split, train first)")


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
    add_base(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("eval", help="oracle accuracy per toy concept on generated images")
    p.add_argument("--samples", type=_positive_int, default=300, help="images per template split (default 300)")
    p.add_argument("--splits", nargs="+", default=["train", "heldout"], choices=["train", "heldout"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=_positive_int, default=50)
    p.add_argument("--json", help="write the figures as JSON to this file")
    p.add_argument("--grid", help="write a grid PNG of generated samples to this file")
    add_base(p)
    p.set_defaults(func=cmd_eval)

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
