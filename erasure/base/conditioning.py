"""What a UNet is conditioned on, per pipeline family: prompts in, UNet keyword arguments out.

Training (x_t sampling and the three ESD predictions), attacks, evaluation and serving all condition the UNet
through a ``Conditioner``, so what is trained, attacked and served is the same computation. A ``Conditioning`` holds
the UNet keyword arguments for a batch of prompts with the batch as first dimension of every tensor, so rows of
different requests concatenate into one UNet call.

Families (erasure/base/families.py):

* ``sd``: SD 1.x / 2.x (``StableDiffusionPipeline``): one CLIP text encoder's last hidden states; the
  unconditional branch is the empty prompt's embedding. SD 2.x v-prediction conditions the same way.
* ``sdxl``: SDXL (``StableDiffusionXLPipeline``): the penultimate hidden states of both text encoders,
  concatenated; ``added_cond_kwargs`` = {``text_embeds``: the second encoder's pooled projection, ``time_ids``:
  (original h, w, crop top, left, target h, w)}, which depend on the image size. With
  ``force_zeros_for_empty_prompt`` (SDXL's default) the unconditional branch is **zeros**, not encode("").

The empty prompt always means "no prompt": ``encode([""])`` is the family's unconditional branch, exactly what
the pipeline's classifier-free guidance uses when no negative prompt is given.

Example:
    >>> cond = conditioner_for(pipe)
    >>> c = cond.encode(["a red circle", "a blue star"], size=1024)
    >>> u = cond.unconditional(2, size=1024)
    >>> eps = pipe.unet(x, t, **Conditioning.cat([u, c]).denoiser_kwargs()).sample
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

    def denoiser_kwargs(self) -> dict:
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


def _size(size: int | tuple[int, int] | None, default: int) -> tuple[int, int]:
    if size is None:
        return default, default
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


class Conditioner:
    """SD 1.x / 2.x: one CLIP text encoder; the unconditional branch is the empty prompt's embedding."""

    family = "sd"

    def __init__(self, pipe, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, *,
                 default_size: int):
        self.pipe, self.device, self.dtype = pipe, torch.device(device), dtype
        self.prediction_type = pipe.scheduler.config.get("prediction_type", "epsilon")
        self.default_size = default_size
        self._cache: dict[str, Conditioning] = {}

    @torch.no_grad()
    def _encode_one(self, prompt: str) -> Conditioning:
        emb, _ = self.pipe.encode_prompt(prompt, self.device, 1, do_classifier_free_guidance=False)
        return Conditioning(emb.to(self.dtype))

    def _rows(self, prompts: Sequence[str]) -> list[Conditioning]:
        for p in prompts:
            if p not in self._cache:
                self._cache[p] = self._encode_one(p)
        return [self._cache[p] for p in prompts]

    def encode(self, prompts: Sequence[str], size: int | tuple[int, int] | None = None) -> Conditioning:
        """One row per prompt for images of ``size`` pixels (int or (height, width); default: the pipeline's);
        each distinct prompt is encoded once and cached. The empty prompt is the unconditional branch."""
        return Conditioning.cat(self._rows(prompts))

    def unconditional(self, n: int, size: int | tuple[int, int] | None = None) -> Conditioning:
        """What the pipeline's classifier-free guidance uses when no negative prompt is given, ``n`` rows."""
        return self.encode([""], size).repeat(n)

    @torch.no_grad()
    def hidden_states(self, prompts: Sequence[str]) -> torch.Tensor:
        """The UNet's ``encoder_hidden_states`` for ``prompts``, as one batch and not cached (the ``uce`` edit reads
        thousands of prompts once)."""
        emb, _ = self.pipe.encode_prompt(list(prompts), self.device, 1, do_classifier_free_guidance=False)
        return emb.to(self.dtype)


class SDXLConditioner(Conditioner):
    """SDXL: two text encoders (penultimate hidden states concatenated), the second encoder's pooled projection
    and the size-dependent time ids as ``added_cond_kwargs``; zeros as the unconditional branch when the pipeline
    has ``force_zeros_for_empty_prompt``."""

    family = "sdxl"

    @torch.no_grad()
    def _encode_one(self, prompt: str) -> Conditioning:
        if prompt == "" and self.pipe.config.get("force_zeros_for_empty_prompt", True):
            text = self._encode_one("a")  # any prompt: only its shapes are used
            return Conditioning(torch.zeros_like(text.encoder_hidden_states),
                                {"text_embeds": torch.zeros_like(text.added_cond_kwargs["text_embeds"])})
        emb, _, pooled, _ = self.pipe.encode_prompt(prompt, device=self.device, num_images_per_prompt=1,
                                                    do_classifier_free_guidance=False)
        return Conditioning(emb.to(self.dtype), {"text_embeds": pooled.to(self.dtype)})

    def time_ids(self, n: int, size: int | tuple[int, int] | None = None) -> torch.Tensor:
        """(original h, w, crop top, left, target h, w) as the pipeline sets them by default, ``n`` rows."""
        h, w = _size(size, self.default_size)
        return torch.tensor([[h, w, 0, 0, h, w]], dtype=self.dtype, device=self.device).repeat(n, 1)

    def hidden_states(self, prompts: Sequence[str]) -> torch.Tensor:
        return torch.cat([self._encode_one(p).encoder_hidden_states for p in prompts])  # "" as zeros, as sampled

    def encode(self, prompts: Sequence[str], size: int | tuple[int, int] | None = None) -> Conditioning:
        rows = Conditioning.cat(self._rows(prompts))
        added = {**rows.added_cond_kwargs, "time_ids": self.time_ids(len(rows), size)}
        return Conditioning(rows.encoder_hidden_states, added)
