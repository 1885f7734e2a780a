"""Soft prompts: continuous token embeddings fed through a pipeline's own text encoder in place of words.

The white-box attack of the red team (erasure/redteam/families/soft_prompt.py) optimises them so an erased UNet regains
its concept, and adversarial training (erasure/training/robust.py) erases the concept from what they find. They
condition the UNet as the family's Conditioner does (erasure/base/conditioning.py); only the SD 1.x / 2.x family is
supported (SDXL conditions on two encoders and a pooled projection, which soft prompts do not cover yet).

Example:
    >>> enc = SoftPromptEncoder(pipe, k=4)
    >>> vectors = enc.word_vectors(["red"]).requires_grad_(True)   # [4, D], initialised from a word
    >>> cond = enc.encode(vectors, ["a red circle"])                 # Conditioning: <start> v1..v4 a red circle <end>
    >>> enc.project(vectors)                        # after each optimiser step: within real tokens' norms
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..errors import UnsupportedBaseError
from .conditioning import Conditioning
from .families import FAMILIES, family_of

SUPPORTED_FAMILIES = ("sd",)


class SoftPromptEncoder:
    """Prompt embeddings through the pipeline's own text encoder, with ``k`` learnable input vectors replacing the
    token embeddings right after the start token (a forward hook on the token embedding)."""

    def __init__(self, pipe, k: int):
        family = family_of(pipe)
        if family.name not in SUPPORTED_FAMILIES:
            raise UnsupportedBaseError(f"soft prompts (the white-box attack, adversarial training) support "
                                       f"{', '.join(FAMILIES[f].label for f in SUPPORTED_FAMILIES)}; this base is "
                                       f"{family.label}")
        self.pipe, self.k = pipe, k
        self.tok, self.enc = pipe.tokenizer, pipe.text_encoder
        self.length = self.tok.model_max_length
        self.embedding = self.enc.get_input_embeddings()
        # the largest norm of a real token's embedding: soft tokens stay in that ball, a continuous relaxation of
        # the vocabulary rather than vectors no prompt can come near
        self.max_norm = float(self.embedding.weight.detach().norm(dim=1).max())

    @torch.no_grad()
    def project(self, vectors: torch.Tensor) -> torch.Tensor:
        """``vectors`` with each row's norm clipped to ``max_norm`` (in place)."""
        norms = vectors.norm(dim=1, keepdim=True).clamp_min(1e-12)
        return vectors.mul_((self.max_norm / norms).clamp(max=1.0))

    def ids(self, prompt: str, filler: int) -> list[int]:
        body = self.tok(prompt, add_special_tokens=False).input_ids[: self.length - 2 - self.k]
        ids = [self.tok.bos_token_id] + [filler] * self.k + body + [self.tok.eos_token_id]
        pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else self.tok.eos_token_id
        return ids + [pad] * (self.length - len(ids))

    def word_vectors(self, words: Sequence[str]) -> torch.Tensor:
        """[k, D] initial vectors: the embeddings of ``words`` (first token of each), cycled."""
        rows = []
        for i in range(self.k):
            token = self.tok(words[i % len(words)], add_special_tokens=False).input_ids[0]
            rows.append(self.embedding.weight[token].detach().clone())
        return torch.stack(rows)

    def encode(self, vectors: torch.Tensor, prompts: Sequence[str]) -> Conditioning:
        """The UNet conditioning of ``prompts`` with the soft tokens in front (gradients flow to ``vectors``)."""
        filler = self.tok.bos_token_id
        ids = torch.tensor([self.ids(p, filler) for p in prompts], device=self.enc.device)
        k = self.k

        def put(_module, _inputs, out):
            out = out.clone()
            out[:, 1 : 1 + k] = vectors.to(out.dtype).unsqueeze(0).expand(out.shape[0], -1, -1)
            return out

        handle = self.embedding.register_forward_hook(put)
        try:
            return Conditioning(self.enc(ids)[0])
        finally:
            handle.remove()
