"""Guiding away from a pack's concepts at sampling time, on the base's prediction of them.

A pack's weights erase what prompts *naming* its concept draw. A prompt naming nothing ("one", "please") draws the
base's prior, which can be the concept (the toy base draws red for "one" on a third of its images), and no delta
trained on the concept's prompts reaches it. A pack with ``guide_away`` s > 0 therefore also moves every prediction
of its pack set by

    - s (eps*(x, concept) - eps(x, ""))          (eps*: the base, whatever packs are applied)

Both branches of classifier-free guidance move alike, so the guided prediction moves by the same amount at any
guidance scale: what a negative prompt naming the concept does at guidance s + 1, kept whatever the request sends.
The base's prediction of the concept is used because a pack's own is already erased (guiding away from it would guide
*towards* the concept). Two settings of the pack say how much it costs:

* ``until`` (``guide_away_until``, 1 by default): the share of the noise schedule, from pure noise, during which the
  shift applies (at timestep t >= (1 - until) T): what an image shows is decided in its first, noisiest steps.
* ``reference`` (``guide_away_reference``): ``"base"`` takes eps(x, "") from the base (one more base row per image and
  step); ``"pack"`` reuses the pack set's own unconditional prediction, which classifier-free guidance computes
  anyway, whenever the request has no negative prompt (the base's otherwise).

Cost per image and step of a guided request (two rows without a pack): one base row per concept guided away from,
plus one with the base reference, on the steps within ``until``.

Where it is applied: every pipeline object on a pack-set UNet (``with_packs``, ``share_pipeline``: ``erasure
generate``, ``eval``, ``attack``, training previews, the service with batching off) through a forward hook on the
UNet; the service's batched loop (``erasure.sampling.denoise``) adds the rows to its UNet calls.
Both read what ``compose_denoiser`` leaves on a pack-set UNet (``guide_away_of``).

Example:
    >>> pipe = with_packs(base_pipe, [(ConceptPack.from_pretrained("packs/circle"), 1.0)])
    >>> guide_away_of(pipe.unet).aways              # the pack's manifest says guide_away 1.0
    (Away(concept='circle', scale=1.0, until=1.0),)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Literal

import torch
from torch import nn

from ..base.conditioning import Conditioning
from ..base.families import conditioner_for, family_of

_ATTRIBUTE = "erasure_guide_away"
_HOOKED = "erasure_guide_away_hooked"
Reference = Literal["base", "pack"]


@dataclasses.dataclass(frozen=True)
class Away:
    """One concept guided away from: by ``scale``, during the first ``until`` of the noise schedule."""

    concept: str
    scale: float
    until: float = 1.0


@dataclasses.dataclass(frozen=True)
class PackSetGuidance:
    """What ``compose_denoiser`` leaves on a pack-set UNet: the concepts guided away from, the base UNet whose
    prediction of them is used (kept out of the module tree: not a submodule of the pack set), and where eps(x, "")
    comes from (see the module docstring)."""

    aways: tuple[Away, ...]
    base_denoiser: nn.Module
    reference: Reference = "base"


def set_guide_away(unet: nn.Module, aways: Sequence[Away], base_denoiser: nn.Module,
                   reference: Reference = "base") -> None:
    """Record on a pack-set UNet which concepts it guides away from (those with scale 0 are dropped)."""
    aways = tuple(a for a in aways if a.scale)
    if aways:
        object.__setattr__(unet, _ATTRIBUTE, PackSetGuidance(aways, base_denoiser, reference))


def guide_away_of(unet: nn.Module) -> PackSetGuidance | None:
    """The guidance a pack-set UNet applies; None for the base and packs without ``guide_away``."""
    return getattr(unet, _ATTRIBUTE, None)


class GuideAway:
    """The shift ``sum_k s_k (eps*(x, c_k) - eps(x, ""))`` for rows of latents at one timestep (see the module
    docstring), from the base UNet and the pipeline's own text conditioning."""

    def __init__(self, pipe, guidance: PackSetGuidance):
        self.aways, self.base_denoiser = guidance.aways, guidance.base_denoiser
        self.reference = guidance.reference
        self.train_steps = pipe.scheduler.config.get("num_train_timesteps", 1000)
        self.conditioner = conditioner_for(pipe, self.base_denoiser.device, self.base_denoiser.dtype)

    def active(self, timestep) -> tuple[Away, ...]:
        """The concepts guided away from at ``timestep`` (a number, or a tensor whose first value is taken)."""
        t = float(torch.as_tensor(timestep).reshape(-1)[0])
        return tuple(a for a in self.aways if t >= (1.0 - a.until) * self.train_steps)

    def is_empty(self, uncond: Conditioning, size) -> bool:
        """Whether ``uncond`` (a request's unconditional rows) is the pipeline's unconditional branch, which the
        ``pack`` reference reuses (a negative prompt is not)."""
        empty = self.conditioner.unconditional(1, size).encoder_hidden_states.to(uncond.encoder_hidden_states)
        return torch.equal(uncond.encoder_hidden_states, empty.expand_as(uncond.encoder_hidden_states))

    def rows(self, n: int, size, active: Sequence[Away], with_empty: bool = True) -> Conditioning:
        """The base rows for ``n`` latents: each active concept, then (``with_empty``) the unconditional branch,
        ``n`` rows each."""
        parts = [self.conditioner.encode([a.concept for a in active], size)] if active else []
        if with_empty:
            parts.append(self.conditioner.unconditional(1, size))
        per_image = Conditioning.cat(parts)
        return Conditioning.cat([per_image[i:i + 1].repeat(n) for i in range(len(per_image))])

    def combine(self, predictions: torch.Tensor, n: int, active: Sequence[Away],
                reference: torch.Tensor | None = None) -> torch.Tensor:
        """The shift, from the base's predictions on ``rows(n, size, active, reference is None)`` (in that order) and
        eps(x, "") as ``reference`` (else the last ``n`` of them)."""
        parts = predictions.split(n)
        empty = parts[len(active)] if reference is None else reference
        return sum(a.scale * (part - empty) for a, part in zip(active, parts))

    @torch.no_grad()
    def shift(self, sample: torch.Tensor, timestep, size, reference: torch.Tensor | None = None) -> torch.Tensor | None:
        """The shift for ``sample`` at ``timestep`` (None when no concept is guided away from then)."""
        active = self.active(timestep)
        if not active:
            return None
        n = sample.shape[0]
        k = len(active) + (reference is None)
        t = torch.as_tensor(timestep, device=sample.device).reshape(-1)[:1].expand(n)
        out = self.base_denoiser(sample.repeat(k, 1, 1, 1), t.repeat(k), return_dict=False,
                                 **self.rows(n, size, active, reference is None).to(sample.device).denoiser_kwargs())[0]
        return self.combine(out, n, active, reference)


def install_guide_away(pipe) -> None:
    """Make ``pipe`` guide away from its packs' concepts on every UNet call when ``pipe.unet`` is a pack-set UNet
    from ``compose_denoiser`` that asks for it: a forward hook on the UNet, registered once and shared by every
    pipeline object using it. ``share_pipeline`` calls it, so every pipeline of a pack set applies it however it was
    made."""
    denoiser = family_of(pipe).denoiser(pipe)
    guidance = guide_away_of(denoiser)
    if guidance is None or getattr(denoiser, _HOOKED, False):
        return
    object.__setattr__(denoiser, _HOOKED, True)
    away, scale = GuideAway(pipe, guidance), pipe.vae_scale_factor
    away.rows(1, None, away.aways)  # encode once, now: pipelines sampling in several threads then only read the cache

    def hook(module, args, kwargs, output):
        sample = args[0] if args else kwargs["sample"]
        timestep = torch.as_tensor(args[1] if len(args) > 1 else kwargs["timestep"]).reshape(-1)
        if not away.active(timestep):
            return output
        size = (sample.shape[-2] * scale, sample.shape[-1] * scale)
        predicted = output[0] if isinstance(output, tuple) else output.sample
        n, half = sample.shape[0], sample.shape[0] // 2
        twice = n % 2 == 0 and n > 0 and torch.equal(sample[:half], sample[half:]) and (
            timestep.numel() == 1 or torch.equal(timestep[:half], timestep[half:]))
        if twice:  # classifier-free guidance: the same latents twice, one shift for both
            hidden = args[2] if len(args) > 2 else kwargs["encoder_hidden_states"]
            uncond = Conditioning(hidden[:half])
            reuse = away.reference == "pack" and away.is_empty(uncond, size)
            shift = away.shift(sample[:half], timestep, size, predicted[:half] if reuse else None).repeat(2, 1, 1, 1)
        else:
            shift = away.shift(sample, timestep, size)
        if isinstance(output, tuple):
            return (output[0] - shift.to(output[0].dtype), *output[1:])
        output.sample = output.sample - shift.to(output.sample.dtype)
        return output

    denoiser.register_forward_hook(hook, with_kwargs=True)
