"""Pipeline families and the denoiser interface: what erasure needs to know about a base, in one place.

A *family* is a layout of text-to-image pipeline erasure trains, attacks and serves. Each is one ``Family`` object in
``FAMILIES``: how to recognise it, which pipeline attribute holds its denoising network (the *denoiser*: a UNet for
the SD families), how its prompts condition that network (a ``Conditioner``, erasure/base/conditioning.py), and its
image geometry (native size, the size multiple every request must keep). Code past this module asks the family —
``family_of(pipe).denoiser(pipe)`` — instead of reaching for ``pipe.unet``, so a new family (a transformer base) is
an addition here, not a hunt through the code.

=========  ===========================================  ==========  =========================================
family     pipeline                                     denoiser    conditioning
=========  ===========================================  ==========  =========================================
``sd``     SD 1.x / 2.x (StableDiffusionPipeline)       ``unet``    one CLIP encoder's last hidden states
``sdxl``   SDXL (StableDiffusionXLPipeline)             ``unet``    two encoders, pooled text embeds, time ids
=========  ===========================================  ==========  =========================================

Example:
    >>> family = family_of(pipe)
    >>> family.name, type(family.denoiser(pipe)).__name__
    ('sd', 'UNet2DConditionModel')
    >>> family.native_size(pipe), family.size_multiple(pipe)
    (64, 16)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from torch import nn

from ..errors import UnsupportedBaseError
from .conditioning import Conditioner, SDXLConditioner


@dataclasses.dataclass(frozen=True)
class Family:
    """One pipeline family (see the module docstring)."""

    name: str
    label: str
    conditioner: type[Conditioner]
    recognise: Callable[[object], str | None]  # pipe -> None if it is of this family, else why not
    owns: Callable[[nn.Module], bool]  # whether a bare denoiser module is of this family
    denoiser_attribute: str = "unet"

    def denoiser(self, pipe) -> nn.Module:
        """The pipeline's denoising network (the module packs change)."""
        return getattr(pipe, self.denoiser_attribute)

    def native_size(self, pipe) -> int:
        """The image size in pixels the base was trained at (SD 1.5: 512, SD 2.1: 768, SDXL: 1024)."""
        return self.denoiser(pipe).config.sample_size * pipe.vae_scale_factor

    def size_multiple(self, pipe) -> int:
        """Every width / height must be a multiple of this: the VAE and every down-sampling of the denoiser."""
        return pipe.vae_scale_factor * 2 ** (len(self.denoiser(pipe).config.block_out_channels) - 1)

    def latent_shape(self, pipe, n: int, height: int, width: int) -> tuple[int, ...]:
        """Shape of ``n`` initial latents for images of ``height`` x ``width`` pixels."""
        f = pipe.vae_scale_factor
        return (n, self.denoiser(pipe).config.in_channels, height // f, width // f)

    def conditioner_for(self, pipe, device: str | torch.device = "cpu",
                        dtype: torch.dtype = torch.float32) -> Conditioner:
        return self.conditioner(pipe, device, dtype, default_size=self.native_size(pipe))


def _unet(pipe):
    from diffusers import UNet2DConditionModel

    unet = getattr(pipe, "unet", None)
    return unet if isinstance(unet, UNet2DConditionModel) else None


def _encoders(pipe) -> list[bool]:
    return [getattr(pipe, n, None) is not None for n in ("text_encoder", "text_encoder_2")]


def _is_sdxl_unet(module: nn.Module) -> bool:
    return getattr(module, "config", {}).get("addition_embed_type") == "text_time"


def _recognise_sd(pipe) -> str | None:
    unet = _unet(pipe)
    if unet is None or _is_sdxl_unet(unet):
        return "not an SD 1.x / 2.x UNet"
    if unet.config.get("addition_embed_type") is not None or _encoders(pipe) != [True, False]:
        return "not one text encoder"
    return None


def _recognise_sdxl(pipe) -> str | None:
    unet = _unet(pipe)
    if unet is None or not _is_sdxl_unet(unet):
        return "not an SDXL UNet"
    if _encoders(pipe) != [True, True] or not hasattr(pipe, "_get_add_time_ids") \
            or pipe.config.get("requires_aesthetics_score", False):
        return "not SDXL's text-to-image layout"
    return None


FAMILIES: dict[str, Family] = {
    "sd": Family("sd", "SD 1.x / 2.x (StableDiffusionPipeline)", Conditioner, _recognise_sd,
                 lambda m: not _is_sdxl_unet(m)),
    "sdxl": Family("sdxl", "SDXL (StableDiffusionXLPipeline)", SDXLConditioner, _recognise_sdxl, _is_sdxl_unet),
}


def supported() -> str:
    """The supported families, for error messages."""
    return ", ".join(f.label for f in FAMILIES.values())


def family_of(pipe) -> Family:
    """The family of ``pipe``, or UnsupportedBaseError naming the supported ones."""
    for family in FAMILIES.values():
        if family.recognise(pipe) is None:
            return family
    name = type(pipe).__name__
    unet = _unet(pipe)
    if unet is None:
        what = "a transformer" if getattr(pipe, "transformer", None) is not None else "no UNet2DConditionModel"
        raise UnsupportedBaseError(f"{name} has {what}, not a Stable Diffusion UNet; supported: {supported()}")
    raise UnsupportedBaseError(f"{name} (UNet added conditioning {unet.config.get('addition_embed_type')!r}, "
                               f"text encoders {sum(_encoders(pipe))}) is not a supported text-to-image layout; "
                               f"supported: {supported()}")


def denoiser_family(module: nn.Module) -> str:
    """The family a bare denoiser module belongs to (a pack's delta is checked against one without its pipeline)."""
    return next(f.name for f in FAMILIES.values() if f.owns(module))


def denoiser_of(pipe) -> nn.Module:
    """``family_of(pipe).denoiser(pipe)``."""
    return family_of(pipe).denoiser(pipe)


def conditioner_for(pipe, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> Conditioner:
    """The conditioner of ``pipe``'s family (UnsupportedBaseError for other pipelines)."""
    return family_of(pipe).conditioner_for(pipe, device, dtype)
