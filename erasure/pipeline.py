"""Loading a base pipeline and generating images with it.

``base`` is ``"toy"`` (the shipped default), a local diffusers pipeline directory, or a Hub repository id of an
SD 1.x / 2.x or SDXL pipeline (see erasure.conditioning for the families).

Example:
    >>> from erasure.pipeline import load_pipeline, generate
    >>> pipe = load_pipeline("toy")
    >>> [image] = generate(pipe, ["a red star"], seeds=[0])
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import torch

from .errors import BaseNotFoundError, InvalidArgumentError

TOY_BASE = Path(__file__).parent / "toy" / "assets" / "base"
TOY_DEFAULTS = {"steps": 20, "guidance": 3.0, "size": 64}


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
    return is_toy(base) or (Path(resolve_base(base)) / "build_info.json").is_file()


@dataclasses.dataclass
class LoadedBase:
    """A loaded base pipeline and what a pack records about it (``BaseRef``): the id as given, the commit a Hub
    revision resolved to, the family (a key of ``erasure.conditioning.FAMILIES``) and the dtype it was loaded in."""

    pipe: Any
    id: str
    revision: str | None
    family: str
    dtype: str

    def base_ref(self, fingerprint: str):
        from .pack import BaseRef

        return BaseRef(id=self.id, revision=self.revision, fingerprint=fingerprint, family=self.family,
                       dtype=self.dtype)


def load_base(base: str | os.PathLike | None = "toy", device: str = "cpu", dtype: torch.dtype = torch.float32,
              revision: str | None = None) -> LoadedBase:
    """Load an SD-family pipeline (SD 1.x / 2.x or SDXL) from ``base``: 'toy', a diffusers pipeline directory, or a
    Hub id at ``revision`` (resolved to its commit sha, from the cache when offline). Other pipelines (e.g. a
    transformer-based one) are refused with UnsupportedBaseError naming the supported families.

    Example:
        >>> loaded = load_base("stabilityai/stable-diffusion-xl-base-1.0", revision="main", dtype=torch.bfloat16)
        >>> loaded.family, len(loaded.revision)      # the commit "main" resolved to
        ('sdxl', 40)
    """
    from diffusers import DiffusionPipeline

    from .conditioning import pipeline_family

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
    family = pipeline_family(pipe)
    pipe.set_progress_bar_config(disable=True)
    base_id = "toy" if is_toy(base) else str(base)
    return LoadedBase(pipe.to(device), base_id, None if base_id == "toy" else commit, family,
                      str(dtype).removeprefix("torch."))


def _check_components(index: dict) -> None:
    """Refuse a pipeline without a UNet from its model_index.json, before any weight is loaded."""
    from .conditioning import FAMILIES
    from .errors import UnsupportedBaseError

    if "unet" not in index:
        parts = sorted(k for k, v in index.items() if not k.startswith("_") and isinstance(v, (list, tuple)))
        raise UnsupportedBaseError(
            f"{index.get('_class_name', 'this pipeline')} has no UNet (components: {', '.join(parts)}): not a "
            f"Stable Diffusion pipeline; supported: {', '.join(FAMILIES.values())}")


def load_pipeline(base: str | os.PathLike | None = "toy", device: str = "cpu", dtype: torch.dtype = torch.float32,
                  revision: str | None = None):
    """The pipeline of ``load_base(...)``."""
    return load_base(base, device, dtype, revision).pipe


def share_pipeline(pipe, **components):
    """A new pipeline object of ``pipe``'s class sharing its components, with ``components`` swapped in.

    Diffusers pipelines and schedulers keep per-call state (timesteps, step index, guidance scale), so concurrent
    callers each take their own object; building one moves no weights. A pack-set UNet brings its guidance away
    from its concepts (erasure/guidance.py)."""
    import inspect

    from .guidance import install_guide_away

    parts = {**pipe.components, **components}
    for name in inspect.signature(type(pipe).__init__).parameters:
        # settings as loaded (requires_safety_checker, SDXL's force_zeros_for_empty_prompt), not the defaults
        if name not in parts and name != "self" and name in pipe.config:
            parts[name] = pipe.config[name]
    new = type(pipe)(**parts)
    new.set_progress_bar_config(disable=True)
    install_guide_away(new)  # a pack-set UNet's guidance away from its concepts, whichever pipeline object samples
    return new


def default_size(pipe) -> int:
    """The pipeline's native image size in pixels (SD 1.5: 512, SD 2.1: 768, SDXL: 1024)."""
    return pipe.unet.config.sample_size * pipe.vae_scale_factor


@torch.no_grad()
def generate(pipe, prompts: list[str], seeds: list[int], steps: int = 20, guidance: float = 3.0,
             negative_prompt: str | None = None, size: int | None = None):
    """Generate one image per prompt; image i depends only on (prompts[i], seeds[i]) and the settings."""
    if len(prompts) != len(seeds):
        raise InvalidArgumentError("prompts and seeds must have the same length")
    if any(not p.strip() for p in prompts):
        raise InvalidArgumentError("the prompt is empty; describe what to draw, e.g. 'a red circle'")
    if steps <= 0:
        raise InvalidArgumentError(f"steps must be a positive integer, got {steps}")
    size = size or default_size(pipe)
    generators = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
    out = pipe(
        prompt=list(prompts),
        negative_prompt=[negative_prompt] * len(prompts) if negative_prompt else None,
        num_inference_steps=steps,
        guidance_scale=guidance,
        height=size,
        width=size,
        generator=generators,
        output_type="pil",
    )
    return out.images
