"""Composing concept packs onto a base UNet: theta = theta* + sum_i s_i * Delta_i.

The sum is computed in float32 from a pristine copy of the base values, then cast to the model's dtype; it is
never accumulated in place, because repeated add/subtract drifts (diffusers#5604). Packs that touch the same
tensor compose additively: two esd-x packs both shift the same cross-attention weights, and their deltas add.

Example:
    >>> from erasure.compose import Composer
    >>> composer = Composer(pipe.unet)
    >>> composer.apply([(ConceptPack.load("packs/circle"), 1.0), (ConceptPack.load("packs/red"), 1.0)])
    >>> composer.restore()   # back to the base, bit for bit
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import nn

from .pack import ConceptPack

PackSpec = tuple[ConceptPack, float]


def composed_values(pristine: dict[str, torch.Tensor], packs: Sequence[PackSpec]) -> dict[str, torch.Tensor]:
    """float32 theta* + sum s_i Delta_i for every tensor any pack touches."""
    out: dict[str, torch.Tensor] = {}
    for pack, scale in packs:
        for name, delta in pack.delta.items():
            if name not in out:
                out[name] = pristine[name].to(torch.float32).clone()
            out[name].add_(delta.to(out[name].device), alpha=float(scale))
    return out


class Composer:
    """Applies packs to one UNet in place, keeping float32 pristine copies of the tensors packs touch."""

    def __init__(self, unet: nn.Module):
        self.unet = unet
        self.params = dict(unet.named_parameters())
        self.pristine: dict[str, torch.Tensor] = {}
        self.applied: list[PackSpec] = []

    def _remember(self, packs: Sequence[PackSpec]) -> None:
        for pack, _ in packs:
            for name in pack.delta:
                if name not in self.pristine:
                    self.pristine[name] = self.params[name].detach().to("cpu", torch.float32).clone()

    def verify(self, packs: Sequence[PackSpec]) -> None:
        """Check every pack against the pristine base before anything is written (all or nothing)."""
        for pack, _ in packs:
            pack.verify_against(self.unet, base_state={**self.params, **self.pristine})

    @torch.no_grad()
    def apply(self, packs: Sequence[PackSpec]) -> None:
        """Make the UNet equal to base + the given packs (replacing whatever was applied before)."""
        self.verify(packs)
        self._remember(packs)
        wanted = composed_values(self.pristine, packs)
        for name, base in self.pristine.items():
            value = wanted.get(name, base)
            param = self.params[name]
            param.copy_(value.to(param.device, param.dtype))
        self.applied = list(packs)

    def restore(self) -> None:
        self.apply([])


def shared_copy(unet: nn.Module, packs: Sequence[PackSpec]) -> nn.Module:
    """A copy of ``unet`` with the packs applied that *shares* every untouched parameter with the original.

    Memory grows by the touched tensors only. The copy's touched parameters are new tensors; the rest are the
    very same ``nn.Parameter`` objects, so the base must never be mutated while copies are in use.
    """
    for pack, _ in packs:
        pack.verify_against(unet)
    touched = {name for pack, _ in packs for name in pack.delta}
    memo = {id(p): p for name, p in unet.named_parameters() if name not in touched}
    memo.update({id(b): b for _, b in unet.named_buffers()})
    clone = copy.deepcopy(unet, memo)
    params = dict(clone.named_parameters())
    base = dict(unet.named_parameters())
    with torch.no_grad():
        for name, value in composed_values(base, packs).items():
            params[name].copy_(value.to(params[name].dtype))
    return clone
