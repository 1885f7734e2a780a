"""Sampling with a diffusers pipeline: a pipeline object per caller, and images from prompts and seeds.

Example:
    >>> from erasure.base.loading import load_pipeline
    >>> from erasure.sampling.generate import generate
    >>> pipe = load_pipeline("toy")
    >>> [image] = generate(pipe, ["a red star"], seeds=[0], steps=20, guidance=3.0)
"""

from __future__ import annotations

import inspect

import torch

from ..base.families import family_of
from ..errors import InvalidArgumentError
from .guidance import install_guide_away


def share_pipeline(pipe, denoiser: torch.nn.Module | None = None, **components):
    """A new pipeline object of ``pipe``'s class sharing its components, with ``denoiser`` (the family's denoising
    network, e.g. a pack set's UNet) and ``components`` swapped in.

    Diffusers pipelines and schedulers keep per-call state (timesteps, step index, guidance scale), so concurrent
    callers each take their own object; building one moves no weights. A pack-set denoiser brings its guidance away
    from its concepts (erasure/sampling/guidance.py)."""
    if denoiser is not None:
        components[family_of(pipe).denoiser_attribute] = denoiser
    parts = {**pipe.components, **components}
    for name in inspect.signature(type(pipe).__init__).parameters:
        # settings as loaded (requires_safety_checker, SDXL's force_zeros_for_empty_prompt), not the defaults
        if name not in parts and name != "self" and name in pipe.config:
            parts[name] = pipe.config[name]
    new = type(pipe)(**parts)
    new.set_progress_bar_config(disable=True)
    install_guide_away(new)  # a pack set's guidance away from its concepts, whichever pipeline object samples
    return new


@torch.no_grad()
def generate(pipe, prompts: list[str], seeds: list[int], *, steps: int, guidance: float,
             negative_prompt: str | None = None, size: int | None = None):
    """Generate one image per prompt at ``size`` pixels (default: the base's native size); image i depends only on
    (prompts[i], seeds[i]) and the settings."""
    if len(prompts) != len(seeds):
        raise InvalidArgumentError("prompts and seeds must have the same length")
    if any(not p.strip() for p in prompts):
        raise InvalidArgumentError("the prompt is empty; describe what to draw, e.g. 'a red circle'")
    if steps <= 0:
        raise InvalidArgumentError(f"steps must be a positive integer, got {steps}")
    size = size or family_of(pipe).native_size(pipe)
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


def image_grid(images, cols: int, pad: int = 2, background=(255, 255, 255)):
    """Paste PIL images (all the same size) into a grid."""
    from PIL import Image

    w, h = images[0].size
    rows = (len(images) + cols - 1) // cols
    grid = Image.new("RGB", (cols * (w + pad) + pad, rows * (h + pad) + pad), background)
    for i, im in enumerate(images):
        grid.paste(im.convert("RGB"), (pad + (i % cols) * (w + pad), pad + (i // cols) * (h + pad)))
    return grid
