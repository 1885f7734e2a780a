"""Exporting a concept pack for tools that do not read packs: a LoRA that plain diffusers loads, or a merged pipeline.

A LoRA stores each weight delta as a low-rank product. For a Linear delta ΔW (out × in) the truncated SVD
ΔW ≈ U_r S_r V_rᵀ gives ``lora_B = U_r S_r^½`` and ``lora_A = S_r^½ V_rᵀ``, with ``lora_alpha = r`` so peft's scale
is 1; a Conv2d k×k delta is taken as (out, in·k·k): ``lora_A`` is a k×k conv to r channels, ``lora_B`` a 1×1 conv.
By Eckart–Young no rank-r factorisation is closer to ΔW. Bias deltas go in ``lora_B.bias`` (peft's ``lora_bias``),
so at full rank the LoRA reproduces the pack up to float rounding. Exporting needs torch only; loading the LoRA
with diffusers needs peft (``pip install erasure[lora]``).

Example:
    >>> from erasure.pack.export import save_lora
    >>> export = save_lora(ConceptPack.from_pretrained("toy/circle", revision="v3"), "exports/circle-lora")
    >>> pipe.load_lora_weights("exports/circle-lora")      # plain diffusers
    >>> export.lora.relative_error                          # ‖ΔW − B·A‖ / ‖ΔW‖ over every weight delta
    0.16
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import math
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal, Union

from ..errors import ExportError, InvalidArgumentError
from ..files import atomic_directory

# torch, diffusers and the pack modules are imported where they are used: `erasure export --help` reads FORMATS and
# DEFAULT_RANK from here without loading torch.

Rank = Union[int, Literal["full"]]
FORMATS = ("lora", "merged")
# Full rank is the pack to float rounding, so the pack's red-team record applies to it; rank 4 keeps the erasure
# table of every shipped toy pack but was never red-teamed (docs/export.md).
DEFAULT_RANK: Rank = "full"
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"  # the file name diffusers' load_lora_weights looks for
CARD = "README.md"
UNET_PREFIX = "unet"


@dataclasses.dataclass(frozen=True)
class LoraWeights:
    """A pack's delta as LoRA factors, exactly as ``pytorch_lora_weights.safetensors`` holds them.

    ``state_dict``: ``unet.<module>.lora_A.weight`` / ``lora_B.weight`` / ``lora_B.bias``; ``config``: the peft
    ``LoraConfig`` arguments (r, lora_alpha, rank_pattern, alpha_pattern, target_modules, lora_bias); ``ranks``: the
    rank kept per module; ``relative_error``: ‖ΔW − B·A‖_F / ‖ΔW‖_F over all weight deltas, with the factors as
    stored; ``dropped``: delta tensors the LoRA does not carry."""

    state_dict: dict[str, Any]  # name -> torch.Tensor
    config: dict[str, Any]
    ranks: dict[str, int]
    relative_error: float
    dropped: tuple[str, ...] = ()

    @property
    def num_parameters(self) -> int:
        return sum(t.numel() for t in self.state_dict.values())


@dataclasses.dataclass(frozen=True)
class Export:
    """What ``save_lora`` / ``save_merged`` wrote: the directory, its files with their sizes in bytes, for a LoRA
    the factors, and the pack and base it came from."""

    path: Path
    format: Literal["lora", "merged"]
    files: dict[str, int]
    lora: LoraWeights | None = None
    pack: str = ""
    base: str = ""
    rank: Rank | None = None
    redteam: Any = None  # the red-team record of this export (not of the pack), when it was attacked
    warnings: tuple[str, ...] = ()

    @property
    def size_bytes(self) -> int:
        return sum(self.files.values())


# What an export measures about itself before it is written: (its directory, its format) -> a red-team record.
Measure = Callable[[Path, str], Any]


def not_carried(pack) -> tuple[str, ...]:
    """What the pack's protection has that its weights, and so any export of them, do not."""
    if not pack.guide_away:
        return ()
    return (f"pack {pack.name!r} also guides every image away from {', '.join(pack.concepts)} at sampling time "
            f"(guide_away {pack.guide_away:g}); an export carries its weights only, so its protection is weaker than "
            "the pack's red-team record says (measure it: erasure export ... --attack)",)


def full_rank(shape) -> int:
    """The largest rank a delta of ``shape`` can have: min(out, in·k·k)."""
    return min(int(shape[0]), math.prod(int(d) for d in shape[1:]))


def check_rank(rank: Rank, shapes) -> Rank:
    """``rank`` if it is ``"full"`` or a positive integer no larger than the largest tensor's full rank (a smaller
    tensor keeps its own full rank), else InvalidArgumentError."""
    if rank == "full":
        return rank
    if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
        raise InvalidArgumentError(f"rank must be a positive integer or 'full', got {rank!r}")
    largest = max((full_rank(s) for s in shapes), default=0)
    if rank > largest:
        raise InvalidArgumentError(f"rank {rank} is larger than any delta tensor's rank (the largest is {largest}); "
                                   f"use rank 'full' for an exact LoRA")
    return rank


def parse_rank(text: str) -> Rank:
    """``"full"`` or a positive integer, from a command-line value."""
    if text == "full":
        return "full"
    try:
        value = int(text)
    except ValueError:
        raise InvalidArgumentError(f"--rank must be a positive integer or 'full', got {text!r}") from None
    if value <= 0:
        raise InvalidArgumentError(f"--rank must be a positive integer or 'full', got {value}")
    return value


def lora_state_dict(pack, rank: Rank = DEFAULT_RANK, biases: bool = True) -> LoraWeights:
    """The pack's delta as peft-style LoRA factors of ``rank`` per tensor (capped at each tensor's full rank).

    ``biases=False`` leaves the bias deltas out (listed in ``dropped``): such a LoRA can be fused
    (``pipe.fuse_lora()``), which peft refuses for ``lora_bias`` on layers without a bias (attention q/k/v).

    Example:
        >>> weights = lora_state_dict(pack, rank=16)
        >>> pipe.load_lora_weights(weights.state_dict)      # a dict works as well as a directory
    """
    import torch
    from tqdm.auto import tqdm

    modules: dict[str, dict[str, torch.Tensor]] = collections.defaultdict(dict)
    for name, tensor in pack.delta.items():
        module, _, kind = name.rpartition(".")
        if kind not in ("weight", "bias") or not module:
            raise ExportError(f"pack {pack.name!r}: tensor {name} is neither a weight nor a bias; a LoRA cannot "
                              f"hold it")
        modules[module][kind] = tensor
    for module, parts in modules.items():
        if "weight" not in parts:
            raise ExportError(f"pack {pack.name!r}: {module} has a bias delta but no weight delta; a LoRA cannot "
                              f"hold a bias alone")
        if parts["weight"].ndim not in (2, 4):
            raise ExportError(f"pack {pack.name!r}: {module}.weight is {parts['weight'].ndim}-D; a LoRA holds Linear "
                              f"(2-D) and Conv2d (4-D) deltas")
    rank = check_rank(rank, [p["weight"].shape for p in modules.values()])

    state: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    dropped: list[str] = []
    err2 = total2 = 0.0
    lora_bias = biases and any("bias" in parts for parts in modules.values())
    for module, parts in tqdm(sorted(modules.items()), desc="LoRA factors", unit="tensor", disable=None):
        delta = parts["weight"]
        matrix = delta.detach().to("cpu", torch.float64).reshape(delta.shape[0], -1)
        u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
        r = len(s) if rank == "full" else min(rank, len(s))
        root = s[:r].sqrt()
        up = (u[:, :r] * root).to(delta.dtype)
        down = (root[:, None] * vh[:r]).to(delta.dtype)
        err2 += float((matrix - up.double() @ down.double()).square().sum())
        total2 += float(matrix.square().sum())
        if delta.ndim == 4:  # k×k conv to r channels, then a 1×1 conv back to out
            down, up = down.reshape(r, *delta.shape[1:]), up.reshape(delta.shape[0], r, 1, 1)
        key = f"{UNET_PREFIX}.{module}"
        state[f"{key}.lora_A.weight"] = down.contiguous()
        state[f"{key}.lora_B.weight"] = up.contiguous()
        ranks[module] = r
        if "bias" in parts and not biases:
            dropped.append(f"{module}.bias")
        elif lora_bias:  # every target needs the key once lora_bias is on; diffusers leaves a missing one unloaded
            bias = parts.get("bias")
            state[f"{key}.lora_B.bias"] = (bias.detach().contiguous() if bias is not None
                                           else torch.zeros(delta.shape[0], dtype=delta.dtype))
    return LoraWeights(state, _lora_config(ranks, lora_bias), ranks,
                       math.sqrt(err2 / total2) if total2 else 0.0, tuple(dropped))


def _lora_config(ranks: dict[str, int], lora_bias: bool) -> dict[str, Any]:
    """peft LoraConfig arguments: the most common rank as ``r``, the others by module, and alpha = rank everywhere
    (scale 1). Module names are full paths, so they match exactly one module each."""
    r = collections.Counter(ranks.values()).most_common(1)[0][0]
    pattern = {m: k for m, k in ranks.items() if k != r}
    return {"r": r, "lora_alpha": r, "rank_pattern": pattern, "alpha_pattern": dict(pattern),
            "target_modules": sorted(ranks), "lora_bias": lora_bias}


def check_out(out: str | os.PathLike) -> Path:
    """``out`` as a directory an export may create: new or empty, in an existing writable directory."""
    path = Path(out).expanduser()
    if path.exists() and not path.is_dir():
        raise InvalidArgumentError(f"cannot export to {out}: it is a file; give a directory to create")
    if path.is_dir() and any(path.iterdir()):
        raise InvalidArgumentError(f"cannot export to {out}: it exists and is not empty; give a new directory")
    parent = path.absolute().parent
    if not parent.is_dir():
        raise InvalidArgumentError(f"cannot export to {out}: directory {parent} does not exist")
    try:  # access() says yes to root everywhere; creating a directory is the real test
        probe = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".probe", dir=parent))
        probe.rmdir()
    except OSError as exc:
        raise InvalidArgumentError(f"cannot export to {out}: cannot create a directory in {parent} "
                                   f"({exc.strerror})") from None
    return path


@contextlib.contextmanager
def _writing(path: Path) -> Iterator[None]:
    try:
        yield
    except OSError as exc:
        raise ExportError(f"cannot write {path}: {exc.strerror or exc}") from exc


def _files(directory: Path) -> dict[str, int]:
    return {str(p.relative_to(directory)): p.stat().st_size for p in sorted(directory.rglob("*")) if p.is_file()}


def save_lora(pack, out: str | os.PathLike, rank: Rank = DEFAULT_RANK, biases: bool = True,
              measure: Measure | None = None) -> Export:
    """Write the pack as a diffusers LoRA directory (``pytorch_lora_weights.safetensors`` with its peft config in
    the file's metadata, and a model card); nothing is left behind if it fails. ``measure``: red-team the written
    LoRA before the directory is published, its figures in the card.

    Example:
        >>> save_lora(pack, "exports/circle-lora", rank=16)
        >>> pipe.load_lora_weights("exports/circle-lora")
    """
    from diffusers.loaders import StableDiffusionLoraLoaderMixin

    from .card import render_export_card

    path = check_out(out)
    weights = lora_state_dict(pack, rank, biases=biases)
    layers = {k.removeprefix(f"{UNET_PREFIX}."): v for k, v in weights.state_dict.items()}
    with _writing(path), atomic_directory(path) as tmp:
        StableDiffusionLoraLoaderMixin.save_lora_weights(tmp, unet_lora_layers=layers, weight_name=LORA_WEIGHTS,
                                                         unet_lora_adapter_metadata=dict(weights.config))
        record = measure(tmp, "lora") if measure is not None else None
        (tmp / CARD).write_text(render_export_card(pack.manifest, "lora", rank=rank, weights=weights,
                                                   redteam=record))
        for name in (LORA_WEIGHTS, CARD):
            os.chmod(tmp / name, 0o644)
    return Export(path, "lora", _files(path), weights, pack.name, pack.manifest.base.id, rank, record,
                  not_carried(pack))


def save_merged(pack, base_pipe, out: str | os.PathLike, measure: Measure | None = None) -> Export:
    """Write ``base_pipe`` with the pack composed (θ* + Δ in float32, cast to the base's dtype) as a full diffusers
    pipeline directory that ``DiffusionPipeline.from_pretrained`` loads. The pack is verified against the base
    first (PackMismatchError for another base); nothing is left behind if it fails. ``measure``: as ``save_lora``.

    Example:
        >>> save_merged(pack, load_pipeline("toy"), "exports/toy-without-circle")
        >>> DiffusionPipeline.from_pretrained("exports/toy-without-circle")
    """
    from .card import render_export_card
    from .compose import with_packs

    path = check_out(out)
    merged = with_packs(base_pipe, [(pack, 1.0)])
    with _writing(path), atomic_directory(path) as tmp:
        merged.save_pretrained(tmp, safe_serialization=True)
        record = measure(tmp, "merged") if measure is not None else None
        (tmp / CARD).write_text(render_export_card(pack.manifest, "merged", redteam=record))
    return Export(path, "merged", _files(path), None, pack.name, pack.manifest.base.id, None, record,
                  not_carried(pack))


def export_pack(spec: str, format: str, out: str | os.PathLike, rank: Rank | str | None = None, biases: bool = True,
                base: str | None = None, revision: str | None = None,
                measure: Callable[[Any], Measure] | None = None) -> Export:
    """`erasure export` end to end: check the request, load the pack (``PACK`` as ``load_packs`` reads it) and, for a
    merged pipeline or when ``base`` is given, the base it is checked against; then write the export. Everything
    that can be refused is refused before a pack or a model is loaded. ``measure(pack)``: what red-teams the export
    (erasure/redteam/attack.py, ``export_attacker``).

    Example:
        >>> export_pack("toy/circle@v3", "lora", "exports/circle-lora", rank=4).size_bytes
        42312
    """
    from ..base.loading import load_base
    from .concept_pack import load_packs

    if format not in FORMATS:
        raise InvalidArgumentError(f"--format {format!r}: choose one of {', '.join(FORMATS)}")
    if format == "merged" and (rank is not None or not biases):
        raise InvalidArgumentError("--rank and --no-biases apply to --format lora; a merged pipeline holds the "
                                   "pack exactly")
    rank = parse_rank(rank) if isinstance(rank, str) else rank
    path = check_out(out)  # before any pack or model is loaded
    [(pack, scale)] = load_packs([spec])
    if scale != 1.0:
        raise InvalidArgumentError(f"export writes the pack at scale 1; drop ':{scale:g}' and scale the LoRA when "
                                   f"loading it (pipe.set_adapters(..., adapter_weights={scale:g}))")
    base_pipe = None
    if format == "merged" or base is not None:  # a LoRA needs no base; one given is checked
        ref = pack.manifest.base
        loaded = load_base(base or ref.id, revision=revision if base else ref.revision)
        pack.verify_against(loaded.denoiser)
        base_pipe = loaded.pipe
    measured = measure(pack) if measure is not None else None
    if format == "lora":
        return save_lora(pack, path, rank=rank or DEFAULT_RANK, biases=biases, measure=measured)
    export = save_merged(pack, base_pipe, path, measure=measured)
    return dataclasses.replace(export, base=base or export.base)
