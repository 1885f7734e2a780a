"""Guiding away from a pack's concepts at sampling time, on the base's prediction of them.

A pack's weights erase what prompts *naming* its concept draw. A prompt naming nothing ("one", "please") draws the
base's prior, which can be the concept (the toy base draws red for "one" on a third of its images), and no delta
trained on the concept's prompts reaches it. A pack with ``guide_away`` s > 0 therefore also moves every prediction
of its pack set by

    - s (eps*(x, concept) - eps*(x, ""))          (eps*: the base, whatever packs are applied)

Both branches of classifier-free guidance move alike, so the guided prediction moves by the same amount at any
guidance scale: what a negative prompt naming the concept does at guidance s + 1, kept whatever the request sends.
The base's prediction is used because a pack's own prediction for its concept is already erased (guiding away
from it would guide *towards* the concept). Cost: two base UNet rows per image and step, per pack set with one.

Where it is applied: every pipeline object on a pack-set UNet (``with_packs``, ``share_pipeline``: ``erasure
generate``, ``eval``, ``attack``, training previews, the service with batching off) through a forward hook on the
UNet; the service's batched loop (``erasure.sampling.denoise``) adds the rows to its UNet calls.
Both read the list ``compose_denoiser`` leaves on a pack-set UNet (``guide_away_of``).

Example:
    >>> pipe = with_packs(base_pipe, [(ConceptPack.from_pretrained("packs/red"), 1.0)])
    >>> guide_away_of(pipe.unet).pairs             # the pack's manifest says guide_away 1.0
    (('red', 1.0),)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
from torch import nn

from ..base.conditioning import Conditioning
from ..base.families import conditioner_for, family_of

_ATTRIBUTE = "erasure_guide_away"
_HOOKED = "erasure_guide_away_hooked"


@dataclasses.dataclass(frozen=True)
class PackSetGuidance:
    """What ``compose_denoiser`` leaves on a pack-set UNet: the (concept, scale) pairs and the base UNet whose
    prediction of them is guided away from (kept out of the module tree: not a submodule of the pack set)."""

    pairs: tuple[tuple[str, float], ...]
    base_denoiser: nn.Module


def set_guide_away(unet: nn.Module, pairs: Sequence[tuple[str, float]], base_denoiser: nn.Module) -> None:
    """Record on a pack-set UNet which concepts it guides away from (pairs with scale 0 are dropped)."""
    pairs = tuple((c, float(s)) for c, s in pairs if s)
    if pairs:
        object.__setattr__(unet, _ATTRIBUTE, PackSetGuidance(pairs, base_denoiser))


def guide_away_of(unet: nn.Module) -> PackSetGuidance | None:
    """The guidance a pack-set UNet applies; None for the base and packs without ``guide_away``."""
    return getattr(unet, _ATTRIBUTE, None)


class GuideAway:
    """The shift ``sum_k s_k (eps*(x, c_k) - eps*(x, ""))`` for rows of latents (see the module docstring), from
    the base UNet and the pipeline's own text conditioning."""

    def __init__(self, pipe, guidance: PackSetGuidance):
        self.pairs, self.base_denoiser = guidance.pairs, guidance.base_denoiser
        self.conditioner = conditioner_for(pipe, self.base_denoiser.device, self.base_denoiser.dtype)

    def rows(self, n: int, size: tuple[int, int]) -> Conditioning:
        """The base rows for ``n`` latents: each concept, then the unconditional branch, ``n`` rows each."""
        per_image = Conditioning.cat([self.conditioner.encode([c for c, _ in self.pairs], size),
                                      self.conditioner.unconditional(1, size)])
        return Conditioning.cat([per_image[i:i + 1].repeat(n) for i in range(len(per_image))])

    def combine(self, predictions: torch.Tensor, n: int) -> torch.Tensor:
        """The shift, from the base's predictions on ``rows(n, size)`` (in that order)."""
        parts = predictions.split(n)
        return sum(s * (part - parts[-1]) for (_, s), part in zip(self.pairs, parts[:-1]))

    @torch.no_grad()
    def shift(self, sample: torch.Tensor, timestep, size: tuple[int, int]) -> torch.Tensor:
        n, k = sample.shape[0], len(self.pairs) + 1
        t = torch.as_tensor(timestep, device=sample.device).reshape(-1).expand(n)
        out = self.base_denoiser(sample.repeat(k, 1, 1, 1), t.repeat(k), return_dict=False,
                             **self.rows(n, size).to(sample.device).denoiser_kwargs())[0]
        return self.combine(out, n)


def install_guide_away(pipe) -> None:
    """Make ``pipe`` guide away from its packs' concepts on every UNet call when ``pipe.unet`` is a pack-set UNet
    from ``compose_denoiser`` that asks for it: a forward hook on the UNet, registered once and shared by every pipeline
    object using it. ``share_pipeline`` calls it, so every pipeline of a pack set applies it however it was made."""
    denoiser = family_of(pipe).denoiser(pipe)
    guidance = guide_away_of(denoiser)
    if guidance is None or getattr(denoiser, _HOOKED, False):
        return
    object.__setattr__(denoiser, _HOOKED, True)
    away, scale = GuideAway(pipe, guidance), pipe.vae_scale_factor
    away.rows(1, None)  # encode the concepts once, now: pipelines sampling in several threads then only read the cache

    def hook(module, args, kwargs, output):
        sample = args[0] if args else kwargs["sample"]
        timestep = torch.as_tensor(args[1] if len(args) > 1 else kwargs["timestep"]).reshape(-1)
        size = (sample.shape[-2] * scale, sample.shape[-1] * scale)
        n, half = sample.shape[0], sample.shape[0] // 2
        twice = n % 2 == 0 and n > 0 and torch.equal(sample[:half], sample[half:]) and (
            timestep.numel() == 1 or torch.equal(timestep[:half], timestep[half:]))
        if twice:  # classifier-free guidance: the same latents twice, one shift for both
            shift = away.shift(sample[:half], timestep[:half] if timestep.numel() > 1 else timestep, size)
            shift = shift.repeat(2, 1, 1, 1)
        else:
            shift = away.shift(sample, timestep, size)
        if isinstance(output, tuple):
            return (output[0] - shift.to(output[0].dtype), *output[1:])
        output.sample = output.sample - shift.to(output.sample.dtype)
        return output

    denoiser.register_forward_hook(hook, with_kwargs=True)
