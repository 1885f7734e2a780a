"""Composing concept packs onto a base: theta = theta* + sum_i s_i * Delta_i, without touching the base.

``compose_denoiser`` returns a copy of the base UNet that *shares* every tensor no pack touches (memory grows by the
touched tensors only) and holds theta* + sum s_i Delta_i, computed in float32 from the pristine base values and cast
to the model's dtype (never accumulated in place: diffusers#5604). Packs touching the same tensor compose additively.
Each pack is checked against the base first (names, shapes, fingerprint); nothing is built if one is refused.
A pack with ``guide_away`` also guides every image away from its concepts at sampling time
(erasure/sampling/guidance.py):
the pack-set UNet carries that, and every pipeline object made on it (``with_packs``, ``share_pipeline``) applies it.

Example:
    >>> from erasure.pack.compose import with_packs
    >>> erased = with_packs(pipe, [(ConceptPack.from_pretrained("packs/circle"), 1.0)])
    >>> erased.unet is not pipe.unet and erased.vae is pipe.vae
    True
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import nn

from ..base.families import family_of
from ..sampling.generate import share_pipeline
from ..sampling.guidance import Away, set_guide_away
from .concept_pack import BaseWeights, ConceptPack

PackSpec = tuple[ConceptPack, float]


def composed_value(base: dict[str, torch.Tensor], packs: Sequence[PackSpec], name: str) -> torch.Tensor:
    """float32 theta* + sum s_i Delta_i of one tensor."""
    out = base[name].detach().to(torch.float32, copy=True)
    for pack, scale in packs:
        if name in pack.delta:
            out.add_(pack.delta[name].to(out.device, torch.float32), alpha=float(scale))
    return out


def composed_values(base: dict[str, torch.Tensor], packs: Sequence[PackSpec]) -> dict[str, torch.Tensor]:
    """float32 theta* + sum s_i Delta_i for every tensor any pack touches."""
    names = dict.fromkeys(name for pack, _ in packs for name in pack.delta)
    return {name: composed_value(base, packs, name) for name in names}


def compose_denoiser(base, packs: Sequence[PackSpec]) -> nn.Module:
    """A copy of the base UNet (an ``nn.Module`` or a ``BaseWeights`` made from one) with the packs applied.

    The copy's touched parameters are new tensors; every other parameter and buffer is the very same object as the
    base's, so the base must never be mutated while copies are in use. No packs: the base module itself."""
    base = BaseWeights.of(base)
    if base.module is None:
        raise TypeError("compose_denoiser needs the base UNet module (BaseWeights made from a module)")
    for pack, _ in packs:
        pack.verify_against(base)
    if not packs:
        return base.module
    touched = {name for pack, _ in packs for name in pack.delta}
    memo = {id(p): p for name, p in base.state.items() if name not in touched}
    memo.update({id(b): b for _, b in base.module.named_buffers()})
    clone = copy.deepcopy(base.module, memo)
    params = dict(clone.named_parameters())
    with torch.no_grad():  # one tensor at a time: a float32 copy of every touched tensor at once is GBs at SDXL size
        for name in dict.fromkeys(name for pack, _ in packs for name in pack.delta):
            params[name].copy_(composed_value(base.state, packs, name).to(params[name].dtype))
    guided = [pack for pack, _ in packs if pack.guide_away]
    reference = "pack" if guided and all(p.manifest.guide_away_reference == "pack" for p in guided) else "base"
    set_guide_away(clone, [Away(c, pack.guide_away * scale, pack.manifest.guide_away_until)
                           for pack, scale in packs for c in pack.concepts], base.module, reference)
    return clone


def with_packs(pipe, packs: Sequence[PackSpec], base: BaseWeights | None = None):
    """A new pipeline object sharing every component of ``pipe`` except its denoiser, which has the packs applied.
    ``base``: the BaseWeights of ``pipe``'s denoiser, to reuse its cached fingerprints."""
    return share_pipeline(pipe, denoiser=compose_denoiser(base if base is not None else family_of(pipe).denoiser(pipe),
                                                      packs))
