"""Loading a base pipeline and generating images with it.

``base`` is ``"toy"`` (the shipped default), a local diffusers pipeline directory, or a Hub repository id of any
Stable Diffusion-family pipeline whose UNet is a UNet2DConditionModel.

Example:
    >>> from erasure.pipeline import load_pipeline, generate
    >>> pipe = load_pipeline("toy")
    >>> [image] = generate(pipe, ["a red star"], seeds=[0])
"""

from __future__ import annotations

import os
from pathlib import Path

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


def load_pipeline(base: str | os.PathLike | None = "toy", device: str = "cpu", dtype: torch.dtype = torch.float32,
                  revision: str | None = None):
    """Load a StableDiffusionPipeline (any SD-family pipeline with a UNet2DConditionModel) from ``base``."""
    from diffusers import DiffusionPipeline, UNet2DConditionModel

    source = resolve_base(base)
    try:
        pipe = DiffusionPipeline.from_pretrained(source, dtype=dtype, revision=revision)
    except (OSError, ValueError) as exc:  # offline Hub, unknown repo, broken directory
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BaseNotFoundError(f"cannot load base pipeline {source!r}: {first}") from exc
    unet = getattr(pipe, "unet", None)
    if not isinstance(unet, UNet2DConditionModel):
        raise BaseNotFoundError(f"{source!r} has no UNet2DConditionModel; only SD-family pipelines are supported")
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def share_pipeline(pipe, **components):
    """A new pipeline object of ``pipe``'s class sharing its components, with ``components`` swapped in.

    Diffusers pipelines and schedulers keep per-call state (timesteps, step index, guidance scale), so concurrent
    callers each take their own object; building one moves no weights."""
    import inspect

    parts = {**pipe.components, **components}
    if "requires_safety_checker" in inspect.signature(type(pipe).__init__).parameters:
        # as loaded; the default (True) would log a warning on every call when there is no safety checker
        parts["requires_safety_checker"] = bool(pipe.config.get("requires_safety_checker", False))
    new = type(pipe)(**parts)
    new.set_progress_bar_config(disable=True)
    return new


def default_size(pipe) -> int:
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
