"""What a UNet is conditioned on, per pipeline family: prompts in, UNet keyword arguments out.

Training (x_t sampling and the three ESD predictions), attacks, evaluation and serving all condition the UNet
through a ``Conditioner``, so what is trained, attacked and served is the same computation. A ``Conditioning`` holds
the UNet keyword arguments for a batch of prompts with the batch as first dimension of every tensor, so rows of
different requests concatenate into one UNet call.

Example:
    >>> cond = conditioner_for(pipe)
    >>> c = cond.encode(["a red circle", "a blue star"])
    >>> u = cond.unconditional(2)                  # exactly what the pipeline's guidance uses for no prompt
    >>> eps = pipe.unet(x, t, **Conditioning.cat([u, c]).unet_kwargs()).sample
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch


@dataclasses.dataclass
class Conditioning:
    """UNet keyword arguments for a batch of prompts: ``encoder_hidden_states`` [B, L, D] and, for families with
    added conditioning (SDXL), ``added_cond_kwargs`` of [B, ...] tensors."""

    encoder_hidden_states: torch.Tensor
    added_cond_kwargs: dict[str, torch.Tensor] | None = None

    def __len__(self) -> int:
        return self.encoder_hidden_states.shape[0]

    def __getitem__(self, rows) -> "Conditioning":
        added = None if self.added_cond_kwargs is None else {k: v[rows] for k, v in self.added_cond_kwargs.items()}
        return Conditioning(self.encoder_hidden_states[rows], added)

    def repeat(self, n: int) -> "Conditioning":
        """The batch repeated ``n`` times (rows 0..B-1, then 0..B-1 again, ...)."""
        return Conditioning.cat([self] * n)

    def to(self, *args, **kwargs) -> "Conditioning":
        added = None if self.added_cond_kwargs is None else {
            k: v.to(*args, **kwargs) for k, v in self.added_cond_kwargs.items()}
        return Conditioning(self.encoder_hidden_states.to(*args, **kwargs), added)

    def unet_kwargs(self) -> dict:
        kwargs = {"encoder_hidden_states": self.encoder_hidden_states}
        if self.added_cond_kwargs is not None:
            kwargs["added_cond_kwargs"] = self.added_cond_kwargs
        return kwargs

    @staticmethod
    def cat(parts: Sequence["Conditioning"]) -> "Conditioning":
        added = None
        if parts[0].added_cond_kwargs is not None:
            added = {k: torch.cat([p.added_cond_kwargs[k] for p in parts]) for k in parts[0].added_cond_kwargs}
        return Conditioning(torch.cat([p.encoder_hidden_states for p in parts]), added)


class Conditioner:
    """SD 1.x / 2.x: one CLIP text encoder; the unconditional branch is the empty prompt's embedding."""

    family = "sd"

    def __init__(self, pipe, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
        self.pipe, self.device, self.dtype = pipe, torch.device(device), dtype
        self.prediction_type = pipe.scheduler.config.get("prediction_type", "epsilon")
        self._cache: dict[str, Conditioning] = {}

    @torch.no_grad()
    def _encode_one(self, prompt: str) -> Conditioning:
        emb, _ = self.pipe.encode_prompt(prompt, self.device, 1, do_classifier_free_guidance=False)
        return Conditioning(emb.to(self.dtype))

    def encode(self, prompts: Sequence[str]) -> Conditioning:
        """One row per prompt; each distinct prompt is encoded once and cached."""
        for p in prompts:
            if p not in self._cache:
                self._cache[p] = self._encode_one(p)
        return Conditioning.cat([self._cache[p] for p in prompts])

    def unconditional(self, n: int) -> Conditioning:
        """What the pipeline's classifier-free guidance uses when no negative prompt is given, ``n`` rows."""
        return self.encode([""]).repeat(n)


def conditioner_for(pipe, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> Conditioner:
    """The conditioner of ``pipe``'s family."""
    return Conditioner(pipe, device, dtype)
