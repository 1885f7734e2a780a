"""Loading a base pipeline, and what erasure records and assumes about it.

``base`` is ``"toy"`` (the shipped default), a local diffusers pipeline directory, or a Hub repository id of a
pipeline of a supported family (erasure/base/families.py).

A base also says how it is sampled when a request sets nothing (``SamplingDefaults``): a pipeline built by
`erasure toy build` records its own in ``build_info.json`` (the toy world: 20 steps, guidance 3, 64 px); any other
base takes 20 steps, guidance 7.5 and its native size.

Example:
    >>> from erasure.base.loading import load_base
    >>> loaded = load_base("toy")
    >>> loaded.family, loaded.defaults
    ('sd', SamplingDefaults(steps=20, guidance=3.0, size=64))
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import torch

from ..errors import BaseNotFoundError, UnsupportedBaseError
from .families import family_of, supported

TOY_BASE = Path(__file__).parents[1] / "toy" / "assets" / "base"
BUILD_INFO = "build_info.json"  # written by `erasure toy build` beside model_index.json


@dataclasses.dataclass(frozen=True)
class SamplingDefaults:
    """How a base is sampled when nothing says otherwise (size None: the base's native size)."""

    steps: int = 20
    guidance: float = 7.5
    size: int | None = None


def resolve_base(base: str | os.PathLike | None) -> str:
    """Turn ``--base`` into something ``from_pretrained`` accepts, or raise BaseNotFoundError."""
    if base is None or str(base) == "toy":
        if not (TOY_BASE / "model_index.json").exists():
            raise BaseNotFoundError(f"the shipped toy model is missing at {TOY_BASE}; run `erasure toy build`")
        return str(TOY_BASE)
    path = Path(base).expanduser()
    if path.is_dir():
        if not (path / "model_index.json").exists():
            raise BaseNotFoundError(f"{path} is a directory but not a diffusers pipeline (no model_index.json)")
        return str(path)
    text = str(base)
    looks_like_repo = text.count("/") == 1 and not text.startswith((".", "/", "~")) and not path.suffix
    if not looks_like_repo:
        raise BaseNotFoundError(f"--base {text!r}: no such directory, and not a Hub repository id (namespace/name)")
    return text


def is_toy(base: str | os.PathLike | None) -> bool:
    return base is None or str(base) == "toy" or Path(resolve_base(base)) == TOY_BASE


def is_toy_world(base: str | os.PathLike | None) -> bool:
    """The shipped toy base, or another base `erasure toy build` wrote (a retrained reference): same world, same
    oracle, same defaults."""
    return is_toy(base) or (Path(resolve_base(base)) / BUILD_INFO).is_file()


def sampling_defaults(base: str | os.PathLike | None) -> SamplingDefaults:
    """The base's own defaults (``build_info.json`` → ``sampling``), else 20 steps, guidance 7.5, native size."""
    source = Path(resolve_base(base))
    info = source / BUILD_INFO
    if source.is_dir() and info.is_file():
        recorded = json.loads(info.read_text()).get("sampling")
        if isinstance(recorded, dict):
            return SamplingDefaults(**recorded)
    return SamplingDefaults()


@dataclasses.dataclass
class LoadedBase:
    """A loaded base pipeline and what a pack records about it (``BaseRef``): the id as given, the commit a Hub
    revision resolved to, the family (a key of ``erasure.base.families.FAMILIES``), the dtype it was loaded in, and
    how it is sampled by default."""

    pipe: Any
    id: str
    revision: str | None
    family: str
    dtype: str
    defaults: SamplingDefaults = dataclasses.field(default_factory=SamplingDefaults)

    @property
    def denoiser(self) -> torch.nn.Module:
        return family_of(self.pipe).denoiser(self.pipe)


def load_base(base: str | os.PathLike | None = "toy", device: str = "cpu", dtype: torch.dtype = torch.float32,
              revision: str | None = None) -> LoadedBase:
    """Load a pipeline of a supported family from ``base``: 'toy', a diffusers pipeline directory, or a Hub id at
    ``revision`` (resolved to its commit sha, from the cache when offline). Other pipelines (e.g. a
    transformer-based one) are refused with UnsupportedBaseError naming the supported families.

    Example:
        >>> loaded = load_base("stabilityai/stable-diffusion-xl-base-1.0", revision="main", dtype=torch.bfloat16)
        >>> loaded.family, len(loaded.revision)      # the commit "main" resolved to
        ('sdxl', 40)
    """
    from diffusers import DiffusionPipeline

    source = resolve_base(base)
    hub = not Path(source).is_dir()
    commit = revision
    try:
        _check_components(DiffusionPipeline.load_config(source, revision=revision if hub else None))
        if hub:  # the snapshot folder is named by the commit the revision resolved to
            source = DiffusionPipeline.download(source, revision=revision)
            commit = Path(source).name if Path(source).parent.name == "snapshots" else revision
        pipe = DiffusionPipeline.from_pretrained(source, dtype=dtype)
    except (OSError, ValueError) as exc:  # offline Hub, unknown repo, broken directory
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BaseNotFoundError(f"cannot load base pipeline {str(base)!r}: {first}") from exc
    family = family_of(pipe).name
    pipe.set_progress_bar_config(disable=True)
    base_id = "toy" if is_toy(base) else str(base)
    return LoadedBase(pipe.to(device), base_id, None if base_id == "toy" else commit, family,
                      str(dtype).removeprefix("torch."), sampling_defaults(source))


def _check_components(index: dict) -> None:
    """Refuse a pipeline without a UNet from its model_index.json, before any weight is loaded."""
    if "unet" not in index:
        parts = sorted(k for k, v in index.items() if not k.startswith("_") and isinstance(v, (list, tuple)))
        raise UnsupportedBaseError(
            f"{index.get('_class_name', 'this pipeline')} has no UNet (components: {', '.join(parts)}): not a "
            f"Stable Diffusion pipeline; supported: {supported()}")


def load_pipeline(base: str | os.PathLike | None = "toy", device: str = "cpu", dtype: torch.dtype = torch.float32,
                  revision: str | None = None):
    """The pipeline of ``load_base(...)``."""
    return load_base(base, device, dtype, revision).pipe
