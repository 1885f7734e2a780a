"""The ``erasure`` command line: it parses, checks what can be checked before any work, and dispatches to the flow of
each stage (``training/train.py``, ``redteam/attack.py``, ``pack/export.py``, ``toy/evaluate.py``, ``toy/build.py``).

Heavy imports happen inside each command, so ``erasure --help`` imports no torch. `erasure train` and `erasure attack`
take their flags from ESDConfig and AttackConfig and from every registered method's and attack family's own options;
other packages add commands through the ``erasure.cli`` entry-point group (registry/ adds push, pull, list and lock),
so no import goes upward.
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
GAIN_FLAG = 0.10  # `erasure attack` flags a pack drawing its concept this much more often than the base


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


# --- flags from pydantic models ----------------------------------------------------------------------------------


def singular(name: str) -> str:
    return name[:-3] + "y" if name.endswith("ies") else name.removesuffix("s")


def flag_name(field: str, annotation) -> str:
    """``--lr`` for ``lr``; a list field takes one value per flag, named in the singular (``--concept``)."""
    name = singular(field) if typing.get_origin(annotation) is list else field
    return "--" + name.replace("_", "-")


def _own_options(model) -> bool:
    """A field holding the options of a registered extension (``method_options``, ``family_options``): its keys
    come as flags of their own."""
    return model in (typing.Any, dict) or typing.get_origin(model) is dict


def add_model_options(parser, model, defaults: dict | None = None, choices: dict | None = None,
                      owner: str | None = None) -> None:
    """One flag per field of the pydantic ``model``: type, choices, default and help come from the field.
    ``defaults`` overrides a field's default for this parser (pass the same mapping to ``model_from_args``);
    ``choices`` gives the choices of fields validated against a registry; ``owner`` prefixes the help (the method or
    family the options belong to)."""
    from pydantic_core import PydanticUndefined

    defaults, choices = defaults or {}, choices or {}
    for name, field in model.model_fields.items():
        ann = field.annotation
        if _own_options(ann):
            continue
        kwargs: dict = {"dest": name, "default": None}
        default = defaults.get(name, field.default if field.default is not PydanticUndefined else None)
        if field.default_factory is not None and name not in defaults:
            default = field.default_factory()
        required = field.is_required() and name not in defaults
        shown = "" if required or default is None or default is False or default == [] \
            else f" (default {default})"
        kwargs["help"] = (f"{owner}: " if owner else "") + (field.description or "") + shown
        args = typing.get_args(ann)
        if typing.get_origin(ann) is list:
            kwargs.update(action="append", metavar=singular(name).upper())
            kwargs["required"] = required
            if name in choices:
                kwargs.update(choices=choices[name], metavar=None)
        elif ann is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(ann) is typing.Literal or name in choices:
            kwargs["choices"] = list(choices.get(name, args))
        else:
            scalar = next((a for a in args if a is not type(None)), ann) if args else ann
            kwargs["type"] = scalar if scalar in (int, float) else str
            kwargs["metavar"] = name.upper()
        parser.add_argument(flag_name(name, ann), **kwargs)


def add_extension_options(parser, registry: dict, kind: str) -> None:
    """The flags of every registered method's (or attack family's) own options, in a group each."""
    for name, extension in registry.items():
        if extension.options.model_fields:
            group = parser.add_argument_group(f"{kind} {name}")
            add_model_options(group, extension.options, owner=f"{kind} {name}")


def model_from_args(model, args, defaults: dict | None = None, extensions: dict | None = None,
                    chosen: typing.Iterable[str] = ()):
    """The pydantic ``model`` from the flags given (others keep ``defaults``, else the model's defaults); a bad
    value is one line naming the flag. ``extensions``: a registry whose options come as flags too; a flag of an
    extension that is not ``chosen`` is refused, naming the one it belongs to."""
    from pydantic import ValidationError

    values = {**(defaults or {}),
              **{name: getattr(args, name) for name in model.model_fields if getattr(args, name, None) is not None}}
    for name, extension in (extensions or {}).items():
        for option, field in extension.options.model_fields.items():
            if getattr(args, option, None) is None or option in model.model_fields:
                continue
            if name not in chosen and not any(option in (extensions[c].options.model_fields)
                                              for c in chosen if c in extensions):
                raise InvalidArgumentError(f"{flag_name(option, field.annotation)} is an option of {name}, which "
                                           f"is not used here ({', '.join(chosen)})")
            values[option] = getattr(args, option)
    try:
        return model(**values)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = str(first["loc"][0]) if first["loc"] else ""
        where = flag_name(field, model.model_fields[field].annotation) if field in model.model_fields else ""
        msg = first["msg"].removeprefix("Value error, ")
        raise InvalidArgumentError(f"{where}: {msg}" if where else msg) from None


# --- commands ----------------------------------------------------------------------------------------------------


def _dtype(args):
    import torch

    return getattr(torch, args.dtype)


def _sampling(args) -> tuple[int, float]:
    """``--steps`` and ``--guidance``, or the base's defaults (erasure/base/loading.py)."""
    from .base.loading import sampling_defaults

    defaults = sampling_defaults(args.base)
    return (args.steps or defaults.steps, defaults.guidance if args.guidance is None else args.guidance)


def cmd_generate(args) -> None:
    if not args.prompt.strip():
        raise InvalidArgumentError("the prompt is empty; describe what to draw, e.g. 'a red circle'")
    out = writable_file(args.out)
    from .base.loading import load_pipeline
    from .pack.compose import with_packs
    from .pack.concept_pack import load_packs
    from .sampling.generate import generate

    steps, guidance = _sampling(args)
    packs = load_packs(args.packs)  # refused before the base is loaded if a pack is bad
    pipe = with_packs(load_pipeline(args.base, args.device, _dtype(args), args.revision), packs)
    [image] = generate(pipe, [args.prompt], [args.seed], steps=steps, guidance=guidance,
                       negative_prompt=args.negative_prompt)
    try:
        image.save(out)
    except (OSError, ValueError) as exc:
        raise InvalidArgumentError(f"cannot write {out}: {exc}") from exc
    applied = f", packs {', '.join(args.packs)}" if args.packs else ""
    print(f"wrote {out} (seed {args.seed}, {steps} steps, guidance {guidance}{applied})")


def cmd_eval(args) -> None:
    json_out = writable_file(args.json) if args.json else None
    grid_out = writable_file(args.grid) if args.grid else None
    from .toy.evaluate import run

    steps, guidance = _sampling(args)
    run(args.base, args.packs, samples=args.samples, splits=args.splits, seed=args.seed, steps=steps,
        guidance=guidance, batch_size=args.batch_size, device=args.device, dtype=_dtype(args),
        revision=args.revision, json_out=json_out, grid_out=grid_out)


def cmd_train(args) -> None:
    from .training.config import ESDConfig
    from .training.methods import METHODS
    from .training.train import train_pack

    cfg = model_from_args(ESDConfig, args, extensions=METHODS, chosen=[args.method or "esd-x"])
    pack = train_pack(args.base, cfg, Path(args.out), name=args.name, revision=args.revision, resume=args.resume,
                      eval_samples=args.eval_samples, device=args.device, dtype=_dtype(args))
    m = pack.manifest
    print(f"wrote pack {m.name!r} to {pack.path}: {len(m.tensors)} tensors, "
          f"{m.metrics['touched_parameters']:,} parameters, {m.metrics['train_seconds']} s of training")
    for concept, row in m.metrics.get("eval", {}).items():
        if concept in m.concepts:
            print(f"  {concept}: {row['base']:.1%} -> {row['erased']:.1%} (oracle, train templates)")


def cmd_export(args) -> None:
    from .pack.export import export_pack

    measure = None
    if args.attack:
        from .redteam.attack import export_attacker

        measure = export_attacker()
    export = export_pack(args.pack, args.format, args.out, rank=args.rank, biases=args.biases, base=args.base,
                         revision=args.revision, measure=measure)
    for warning in export.warnings:
        print(f"erasure: warning: {warning}", file=sys.stderr)
    if export.lora is not None:
        lora = export.lora
        biases = ("bias deltas in lora_B.bias" if lora.config["lora_bias"]
                  else f"{len(lora.dropped)} bias deltas dropped" if lora.dropped else "no bias deltas")
        print(f"wrote LoRA of pack {export.pack!r} to {export.path}: rank {export.rank}, {len(lora.ranks)} "
              f"modules, {export.size_bytes / 1e6:.2f} MB, relative error {lora.relative_error:.2%} ({biases})")
    else:
        print(f"wrote pipeline {export.base} + pack {export.pack!r} to {export.path}: "
              f"{len(export.files)} files, {export.size_bytes / 1e6:.1f} MB")
    if export.redteam is not None:
        print("the export attacked as exported (in its card): " + ", ".join(
            f"{f} {a:.0%} (base {export.redteam.base_rate[f]:.0%})" for f, a in export.redteam.asr.items()))


def cmd_attack(args) -> None:
    json_out = writable_file(args.json) if args.json else None
    from .redteam.config import AttackConfig
    from .redteam.families import FAMILIES

    # a family's options are recorded whether or not it runs (a shared set of flags for several attacks)
    cfg = model_from_args(AttackConfig, args, extensions=FAMILIES, chosen=list(FAMILIES))
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    from .redteam.attack import attack
    from .redteam.families import reachable_families
    from .redteam.report import print_records

    for lib in (diffusers_logging, transformers_logging):  # a refusal below stays one line: no loading chatter
        lib.set_verbosity_error()
        lib.disable_progress_bar()
    records = attack(args.packs or [], cfg, base=args.base, concepts=args.concept, revision=args.revision,
                     device=args.device, dtype=_dtype(args), record=args.record)
    print_records(records)
    for name, rec in records.items():
        print(f"{name}: ASR " + ", ".join(f"{f} {a:.0%} (base {rec.base_rate[f]:.0%})" for f, a in rec.asr.items())
              + f"; {rec.seconds:.0f} s")
        for r in rec.amplified(GAIN_FLAG, reachable_families()) if name != "(base)" else []:
            print(f"{name}: MAKES {r.concept.upper()} MORE LIKELY: {r.asr:.0%} vs the base's {r.base_rate:.0%} on "
                  f"its {r.family} attack {rec.attack_text(r, markdown=False)}; a service refuses it "
                  "(max_attack_gain)", file=sys.stderr)
    if json_out:
        json_out.write_text(json.dumps({n: r.model_dump(mode="json") for n, r in records.items()}, indent=2))
        print(f"wrote {json_out}")
    if args.record:
        for spec in args.packs:
            print(f"recorded the red-team figures in {spec} (push it to publish the new revision)")


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
        p.add_argument("--steps", type=positive_int, default=None,
                       help="denoising steps (default: the base's, 20)")
        p.add_argument("--guidance", type=float, default=None,
                       help="classifier-free guidance scale (default: the base's: 3 on the toy model, 7.5 otherwise)")


def add_pack_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--packs", nargs="+", default=[], metavar="PACK[:SCALE]",
                   help="concept packs to compose onto the base: directories or NS/NAME[@REV] (scale defaults to 1)")


def build_parser() -> argparse.ArgumentParser:
    from importlib.metadata import entry_points

    from . import __version__
    from .pack.export import DEFAULT_RANK, FORMATS
    from .redteam.config import AttackConfig
    from .redteam.families import FAMILIES
    from .toy.world import ATTRIBUTES  # numpy only
    from .training.config import ESDConfig
    from .training.methods import METHODS

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

    p = sub.add_parser("train", help="erase concepts and write a concept pack",
                       description="Every training option below is a field of ESDConfig (erasure/training/config.py) "
                                   "or of its method's options (erasure/training/methods/) and is recorded verbatim "
                                   "in the pack's manifest.")
    add_model_options(p, ESDConfig, choices={"method": list(METHODS)})
    add_extension_options(p, METHODS, "method")
    add_base_options(p, sampling=False)
    p.add_argument("--out", required=True, help="pack directory to write")
    p.add_argument("--name", default=None, help="pack name (default: the --out directory's name)")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    p.add_argument("--eval-samples", type=int, default=None,
                   help="images for the pack's quick oracle evaluation (toy base only; default 100, 0 to skip)")
    p.set_defaults(func=cmd_train)

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
    p.add_argument("--attack", action="store_true",
                   help="red-team the export as plain diffusers runs it (the attack of the pack's own record) and put "
                        "its figures in the export's card; a pack's sampling-time guidance is not in an export")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("attack", help="red-team packs: try to bring their erased concepts back",
                       description="Every attack option below is a field of AttackConfig (erasure/redteam/config.py) "
                                   "or of an attack family's options (erasure/redteam/families/) and is recorded "
                                   "verbatim with --record. The judge is the toy oracle.")
    p.add_argument("packs", nargs="*", metavar="PACK", help="pack directories or NS/NAME[@REV]; each is attacked "
                                                            "alone on the base")
    p.add_argument("--concept", action="append", default=None,
                   help="attack only this concept (repeat); without packs: attack the base itself")
    add_model_options(p, AttackConfig, choices={"families": list(FAMILIES)})
    add_extension_options(p, FAMILIES, "family")
    add_base_options(p, sampling=False)
    p.add_argument("--json", help="write the records as JSON to this file")
    p.add_argument("--record", action="store_true",
                   help="write the figures into each pack directory (manifest `redteam` + card): a new revision")
    p.set_defaults(func=cmd_attack)

    toy = sub.add_parser("toy", help="the toy world (embedded default)").add_subparsers(
        dest="toy_command", required=True, parser_class=_Parser)
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
