"""The ``erasure`` command line. Heavy imports happen inside each command, so ``erasure --help`` imports no torch.

`erasure train` takes its flags from ESDConfig's fields (erasure/config.py); other packages add commands through
the ``erasure.cli`` entry-point group (registry/ adds push, pull, list and lock), so no import goes upward.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import typing
from pathlib import Path

from .errors import ErasureError, InvalidArgumentError

TOY_ASSETS = Path(__file__).parent / "toy" / "assets"

COMMANDS_GROUP = "erasure.cli"
KNOWN_ATTACKS_GROUP = "erasure.known_attacks"


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage dump: say what is wrong and how to see the usage
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def writable_file(path: str) -> Path:
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


# --- flags from a pydantic model ---------------------------------------------------------------------------------


def singular(name: str) -> str:
    return name[:-3] + "y" if name.endswith("ies") else name.removesuffix("s")


def flag_name(field: str, annotation) -> str:
    """``--lr`` for ``lr``; a list field takes one value per flag, named in the singular (``--concept``)."""
    name = singular(field) if typing.get_origin(annotation) is list else field
    return "--" + name.replace("_", "-")


def add_model_options(parser: argparse.ArgumentParser, model, defaults: dict | None = None) -> None:
    """One flag per field of the pydantic ``model``: type, choices, default and help come from the field.
    ``defaults`` overrides a field's default for this parser (pass the same mapping to ``model_from_args``)."""
    from pydantic_core import PydanticUndefined

    defaults = defaults or {}
    for name, field in model.model_fields.items():
        ann = field.annotation
        kwargs: dict = {"dest": name, "default": None}
        default = defaults.get(name, field.default if field.default is not PydanticUndefined else None)
        required = field.is_required() and name not in defaults
        shown = "" if required or default is None or default is False or default == [] \
            else f" (default {default})"
        kwargs["help"] = (field.description or "") + shown
        args = typing.get_args(ann)
        if typing.get_origin(ann) is list:
            kwargs.update(action="append", metavar=singular(name).upper())
            kwargs["required"] = required
        elif ann is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(ann) is typing.Literal:
            kwargs["choices"] = list(args)
        else:
            scalar = next((a for a in args if a is not type(None)), ann) if args else ann
            kwargs["type"] = scalar if scalar in (int, float) else str
            kwargs["metavar"] = name.upper()
        parser.add_argument(flag_name(name, ann), **kwargs)


def model_from_args(model, args, defaults: dict | None = None):
    """The pydantic ``model`` from the flags given (others keep ``defaults``, else the model's defaults); a bad
    value is one line naming the flag."""
    from pydantic import ValidationError

    values = {**(defaults or {}),
              **{name: getattr(args, name) for name in model.model_fields if getattr(args, name, None) is not None}}
    try:
        return model(**values)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = str(first["loc"][0]) if first["loc"] else ""
        where = flag_name(field, model.model_fields[field].annotation) if field in model.model_fields else ""
        msg = first["msg"].removeprefix("Value error, ")
        raise InvalidArgumentError(f"{where}: {msg}" if where else msg) from None


# --- commands ----------------------------------------------------------------------------------------------------


def _default_guidance(args) -> float:
    from .pipeline import TOY_DEFAULTS, is_toy_world

    if args.guidance is not None:
        return args.guidance
    return TOY_DEFAULTS["guidance"] if is_toy_world(args.base) else 7.5


def _dtype(args):
    import torch

    return getattr(torch, args.dtype)


def parse_pack_arg(text: str) -> tuple[str, float]:
    """``PACK`` or ``PACK:SCALE`` (PACK: a directory or NS/NAME[@REV])."""
    path, _, scale = text.rpartition(":")
    try:
        return (path, float(scale)) if path else (text, 1.0)
    except ValueError:
        return text, 1.0


def load_packs(specs: list[str]):
    """[(ConceptPack, scale)] for ``PACK[:SCALE]`` arguments: pack directories or NS/NAME[@REV] ids."""
    from .pack import ConceptPack

    out = []
    for spec, scale in map(parse_pack_arg, specs or []):
        ident, _, revision = spec.partition("@") if not Path(spec).exists() else (spec, "", "")
        out.append((ConceptPack.from_pretrained(ident, revision=revision or None), scale))
    return out


def known_attacks(namespaces: list[str]) -> dict[str, list[str]]:
    """Concept -> the black-box attacks recorded in the packs of these registry namespaces (every tag), through
    the installed registry (the ``erasure.known_attacks`` entry point)."""
    if not namespaces:
        return {}
    from importlib.metadata import entry_points

    sources = list(entry_points(group=KNOWN_ATTACKS_GROUP))
    if not sources:
        raise InvalidArgumentError("--known-from reads a registry: install the registry package (pip install erasure)")
    out: dict[str, list[str]] = {}
    for namespace in namespaces:
        for concept, prompts in sources[0].load()(namespace).items():
            out[concept] = list(dict.fromkeys(out.get(concept, []) + prompts))
    return out


def cmd_generate(args) -> None:
    if not args.prompt.strip():
        raise InvalidArgumentError("the prompt is empty; describe what to draw, e.g. 'a red circle'")
    out = writable_file(args.out)
    from .compose import with_packs
    from .pipeline import generate, load_pipeline

    guidance = _default_guidance(args)
    packs = load_packs(args.packs)  # refused before the base is loaded if a pack is bad
    pipe = with_packs(load_pipeline(args.base, args.device, _dtype(args), args.revision), packs)
    [image] = generate(pipe, [args.prompt], [args.seed], steps=args.steps, guidance=guidance,
                       negative_prompt=args.negative_prompt)
    try:
        image.save(out)
    except (OSError, ValueError) as exc:
        raise InvalidArgumentError(f"cannot write {out}: {exc}") from exc
    applied = f", packs {', '.join(args.packs)}" if args.packs else ""
    print(f"wrote {out} (seed {args.seed}, {args.steps} steps, guidance {guidance}{applied})")


def cmd_eval(args) -> None:
    json_out = writable_file(args.json) if args.json else None
    grid_out = writable_file(args.grid) if args.grid else None
    from .compose import with_packs
    from .evaluate import comparison, evaluate, image_grid, print_comparison, print_report
    from .pipeline import load_pipeline
    from .toy.oracle import Oracle

    packs = load_packs(args.packs)  # refused before any generation if a pack is bad
    pipe = load_pipeline(args.base, args.device, _dtype(args), args.revision)
    settings = dict(samples=args.samples, splits=args.splits, seed=args.seed, steps=args.steps,
                    guidance=_default_guidance(args), batch_size=args.batch_size)
    oracle = Oracle.load()
    base = evaluate(pipe, oracle, **settings)
    print_report(base)
    result = base.to_json()
    grid_images = [im for split in base.images.values() for im in split[:50]]
    if packs:
        erased = evaluate(with_packs(pipe, packs), oracle, **settings)
        concepts = [c for pack, _ in packs for c in pack.concepts]
        table = comparison(base, erased, concepts)
        print_comparison(table)
        result = {**erased.to_json(), "base": base.to_json(), "comparison": table,
                  "packs": [{"path": str(p.path), "name": p.name, "scale": s} for p, s in packs]}
        # Grid: each erased concept's prompts (of the first split asked for), base row over erased row.
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
    from .config import ESDConfig
    from .train import train_pack

    cfg = model_from_args(ESDConfig, args)
    pack = train_pack(args.base, cfg, Path(args.out), name=args.name, revision=args.revision, resume=args.resume,
                      eval_samples=args.eval_samples, device=args.device, dtype=_dtype(args))
    m = pack.manifest
    print(f"wrote pack {m.name!r} to {pack.path}: {len(m.tensors)} tensors, "
          f"{m.metrics['touched_parameters']:,} parameters, {m.metrics['train_seconds']} s of training")
    for concept, row in m.metrics.get("eval", {}).items():
        if concept in m.concepts:
            print(f"  {concept}: {row['base']:.1%} -> {row['erased']:.1%} (oracle, train templates)")


def cmd_export(args) -> None:
    from .export import FORMATS, check_out, parse_rank

    if args.format not in FORMATS:
        raise InvalidArgumentError(f"--format {args.format!r}: choose one of {', '.join(FORMATS)}")
    if args.format == "merged" and (args.rank is not None or not args.biases):
        raise InvalidArgumentError("--rank and --no-biases apply to --format lora; a merged pipeline holds the "
                                   "pack exactly")
    rank = parse_rank(args.rank) if args.rank is not None else None
    out = check_out(args.out)  # before any pack or model is loaded
    [(pack, scale)] = load_packs([args.pack])
    if scale != 1.0:
        raise InvalidArgumentError(f"export writes the pack at scale 1; drop ':{scale:g}' and scale the LoRA when "
                                   f"loading it (pipe.set_adapters(..., adapter_weights={scale:g}))")
    base = None
    if args.format == "merged" or args.base is not None:  # a LoRA needs no base; one given is checked
        from .pipeline import load_pipeline

        ref = pack.manifest.base
        base = load_pipeline(args.base or ref.id, revision=args.revision if args.base else ref.revision)
        pack.verify_against(base.unet)
    if args.format == "lora":
        from .export import DEFAULT_RANK, save_lora

        export = save_lora(pack, out, rank=rank or DEFAULT_RANK, biases=args.biases)
        lora = export.lora
        biases = ("bias deltas in lora_B.bias" if lora.config["lora_bias"]
                  else f"{len(lora.dropped)} bias deltas dropped" if lora.dropped else "no bias deltas")
        print(f"wrote LoRA of pack {pack.name!r} to {export.path}: rank {rank or DEFAULT_RANK}, {len(lora.ranks)} "
              f"modules, {export.size_bytes / 1e6:.2f} MB, relative error {lora.relative_error:.2%} ({biases})")
    else:
        from .export import save_merged

        export = save_merged(pack, base, out)
        print(f"wrote pipeline {args.base or pack.manifest.base.id} + pack {pack.name!r} to {export.path}: "
              f"{len(export.files)} files, {export.size_bytes / 1e6:.1f} MB")


def cmd_attack(args) -> None:
    json_out = writable_file(args.json) if args.json else None
    from .config import AttackConfig

    cfg = model_from_args(AttackConfig, args)
    specs = args.packs or []
    if not specs and not args.concept:
        raise InvalidArgumentError("name a pack to attack (or --concept C to attack the base itself)")
    if args.record:
        if not specs:
            raise InvalidArgumentError("--record writes into packs: name the pack directories to attack")
        if args.concept:
            raise InvalidArgumentError("--record needs every concept of the pack attacked: drop --concept")
        for spec in specs:
            path, scale = parse_pack_arg(spec)
            if not Path(path).is_dir() or scale != 1.0:
                raise InvalidArgumentError(f"--record writes a new revision into a pack directory at scale 1; "
                                           f"{spec!r} is not one (erasure pull NS/NAME --to DIR first)")
    from .judges import judge_for

    judge = judge_for(args.base)
    for c in args.concept or []:
        judge.check(c)
    packs = load_packs(specs)  # refused before the base is loaded if a pack is bad
    for pack, _ in packs:
        for c in pack.concepts:
            judge.check(c)
        missing = sorted(set(args.concept or []) - set(pack.concepts))
        if missing:
            raise InvalidArgumentError(f"--concept {', '.join(missing)}: not a concept of pack {pack.name!r} "
                                       f"(it erases {', '.join(pack.concepts)})")
    ids = [parse_pack_arg(spec)[0] for spec in specs]
    namespaces = [i.split("/")[0] for i in ids if not Path(i).exists() and i.count("/") == 1]
    cfg = cfg.model_copy(update={"known_from": list(dict.fromkeys(cfg.known_from + namespaces))})
    known = known_attacks(cfg.known_from)
    import time

    from .pack import BaseWeights
    from .pipeline import load_pipeline
    from .redteam import RedTeam, print_records

    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    for lib in (diffusers_logging, transformers_logging):  # a refusal below stays one line: no loading chatter
        lib.set_verbosity_error()
        lib.disable_progress_bar()
    pipe = load_pipeline(args.base, args.device, _dtype(args), args.revision)
    base = BaseWeights(pipe.unet)
    for pack, _ in packs:
        pack.verify_against(base)  # a pack for another base is refused before any attack
    records = {}
    if not packs:
        team = RedTeam(pipe, judge, cfg.model_copy(update={"calibrate": False}))
        t0 = time.perf_counter()
        team = team.starting_from_records(known, args.concept)
        records["(base)"] = team.record(team.attack_pipe(pipe, args.concept), time.perf_counter() - t0)
    else:
        from .compose import with_packs

        team = RedTeam(pipe, judge, cfg)
        for pack, scale in packs:
            if cfg.guide_away is not None:  # attacked (and, with --record, published) as served with it
                pack.manifest.guide_away = cfg.guide_away
            t0 = time.perf_counter()
            pack_team = team.for_pack(pack).starting_from_records(known, args.concept or pack.concepts)
            erased = with_packs(pipe, [(pack, scale)], base=base)
            results = pack_team.attack_pipe(erased, args.concept or pack.concepts)
            record = pack_team.record(results, time.perf_counter() - t0)
            record.config = record.config.model_copy(update={"guide_away": pack.guide_away})
            records[pack.name if pack.name not in records else str(pack.path)] = record
    print_records(records)
    for name, rec in records.items():
        print(f"{name}: ASR " + ", ".join(f"{f} {a:.0%} (base {rec.base_rate[f]:.0%})" for f, a in rec.asr.items())
              + f"; {rec.seconds:.0f} s")
    if json_out:
        json_out.write_text(json.dumps({n: r.model_dump(mode="json") for n, r in records.items()}, indent=2))
        print(f"wrote {json_out}")
    if args.record:
        for (pack, _), rec in zip(packs, records.values()):
            pack.manifest.redteam = rec
            pack.save_pretrained(pack.path)
            print(f"recorded the red-team figures in {pack.path} (push it to publish the new revision)")


def cmd_toy_build(args) -> None:
    import torch

    from .toy.build import BuildConfig, build

    torch.set_num_threads(args.threads or torch.get_num_threads())
    cfg = BuildConfig(seed=args.seed, without=tuple(args.without))
    if args.unet_steps:
        cfg.unet_steps = args.unet_steps
    if cfg.without:  # a reference never lands on the shipped assets by default (build refuses it there)
        out = Path(args.out or "build/toy-without-" + "-".join(cfg.without))
        work = Path(args.work) if args.work else out / "work"
    else:
        out, work = Path(args.out or TOY_ASSETS), Path(args.work or "build/toy")
    path = build(out=out, work=work, cfg=cfg)
    print(f"base pipeline written to {path}")


# --- the parser --------------------------------------------------------------------------------------------------


def add_base_options(p: argparse.ArgumentParser, sampling: bool = True) -> None:
    p.add_argument("--base", default="toy", help="'toy' (shipped default), an SD 1.x / 2.x / SDXL pipeline "
                                                 "directory, or a Hub id")
    p.add_argument("--revision", default=None, help="Hub revision of --base: branch, tag or commit (a trained "
                                                    "pack records the commit it resolved to)")
    p.add_argument("--device", default="cpu", help="torch device to run on: cpu (default), cuda, cuda:1, ...")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                   help="dtype the base is loaded in (default float32); a pack is served on a base loaded alike")
    if sampling:
        p.add_argument("--steps", type=positive_int, default=20, help="denoising steps (default 20)")
        p.add_argument("--guidance", type=float, default=None,
                       help="classifier-free guidance scale (default 3 on the toy model, 7.5 otherwise)")


def add_pack_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--packs", nargs="+", default=[], metavar="PACK[:SCALE]",
                   help="concept packs to compose onto the base: directories or NS/NAME[@REV] (scale defaults to 1)")


def build_parser() -> argparse.ArgumentParser:
    from importlib.metadata import entry_points

    from . import __version__
    from .config import AttackConfig, ESDConfig

    parser = _Parser(prog="erasure", description="Erase concepts from diffusers pipelines and ship them as packs.")
    parser.add_argument("--version", action="version", version=f"erasure {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("generate", help="generate one image")
    p.add_argument("prompt")
    p.add_argument("--out", required=True, help="output image file, e.g. out.png")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--negative-prompt", default=None)
    add_pack_options(p)
    add_base_options(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("eval", help="oracle accuracy per toy concept on generated images")
    p.add_argument("--samples", type=positive_int, default=300, help="images per template split (default 300)")
    p.add_argument("--splits", nargs="+", default=["train", "heldout"], choices=["train", "heldout"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=positive_int, default=50)
    p.add_argument("--json", help="write the figures as JSON to this file")
    p.add_argument("--grid", help="write a grid PNG of generated samples (base over erased with --packs)")
    add_pack_options(p)
    add_base_options(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("train", help="erase concepts with ESD and write a concept pack",
                       description="Every training option below is a field of ESDConfig (erasure/config.py) and is "
                                   "recorded verbatim in the pack's manifest.")
    add_model_options(p, ESDConfig)
    add_base_options(p, sampling=False)
    p.add_argument("--out", required=True, help="pack directory to write")
    p.add_argument("--name", default=None, help="pack name (default: the --out directory's name)")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    p.add_argument("--eval-samples", type=int, default=None,
                   help="images for the pack's quick oracle evaluation (toy base only; default 100, 0 to skip)")
    p.set_defaults(func=cmd_train)

    from .export import DEFAULT_RANK, FORMATS

    p = sub.add_parser("export", help="write a pack as a LoRA (diffusers/peft) or as a merged diffusers pipeline",
                       description="--format lora: pytorch_lora_weights.safetensors that plain diffusers loads with "
                                   "pipe.load_lora_weights(DIR) (peft installed); --format merged: the base pipeline "
                                   "with the pack composed, for DiffusionPipeline.from_pretrained(DIR).")
    p.add_argument("pack", help="a pack directory or NS/NAME[@REV]")
    p.add_argument("--format", default="lora", metavar="{" + ",".join(FORMATS) + "}", help="(default lora)")
    p.add_argument("--rank", default=None, metavar="R",
                   help=f"LoRA rank per module: a positive integer (a module of lower rank keeps its own) or 'full' "
                        f"(exact) (default {DEFAULT_RANK}; see docs/export.md)")
    p.add_argument("--biases", action=argparse.BooleanOptionalAction, default=True,
                   help="carry bias deltas in lora_B.bias (exact, but peft then refuses fuse_lora(); default on)")
    p.add_argument("--out", required=True, help="directory to create (new or empty)")
    p.add_argument("--base", default=None,
                   help="base pipeline: 'toy', a directory or a Hub id (default: the pack's own base; a LoRA needs "
                        "none, and one given is checked against the pack)")
    p.add_argument("--revision", default=None, help="Hub revision of --base")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("attack", help="red-team packs: try to bring their erased concepts back",
                       description="Every attack option below is a field of AttackConfig (erasure/config.py) and is "
                                   "recorded verbatim with --record. The judge is the toy oracle.")
    p.add_argument("packs", nargs="*", metavar="PACK", help="pack directories or NS/NAME[@REV]; each is attacked "
                                                            "alone on the base")
    p.add_argument("--concept", action="append", default=None,
                   help="attack only this concept (repeat); without packs: attack the base itself")
    add_model_options(p, AttackConfig)
    add_base_options(p, sampling=False)
    p.add_argument("--json", help="write the records as JSON to this file")
    p.add_argument("--record", action="store_true",
                   help="write the figures into each pack directory (manifest `redteam` + card): a new revision")
    p.set_defaults(func=cmd_attack)

    toy = sub.add_parser("toy", help="the toy world (embedded default)").add_subparsers(
        dest="toy_command", required=True, parser_class=_Parser)
    from .toy.world import ATTRIBUTES  # numpy only

    p = toy.add_parser("build", help="train the toy base model and oracle from scratch (resumable)")
    p.add_argument("--out", default=None, help=f"where the pipeline and oracle go (default {TOY_ASSETS}; with "
                   "--without: build/toy-without-CONCEPT)")
    p.add_argument("--work", default=None, help="work directory with checkpoints (default build/toy; with --without: "
                   "OUT/work)")
    p.add_argument("--without", action="append", default=[], choices=sum(ATTRIBUTES.values(), ()), metavar="CONCEPT",
                   help="the retrained reference: leave every scene showing CONCEPT out of the data (repeat) and "
                   "train only the UNet and text encoder, on the shipped oracle, VAE and tokenizer")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--unet-steps", type=positive_int, default=None, help="override the UNet's training steps")
    p.set_defaults(func=cmd_toy_build)

    for plugin in entry_points(group=COMMANDS_GROUP):  # e.g. registry: push, pull, list, lock
        plugin.load()(sub, _Parser)
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
