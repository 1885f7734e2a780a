"""The ESD methods (Gandikota et al., ICCV 2023): which parameters of the denoiser ESD trains, by module name.

=============== ==========================================================================
method          parameters of Linear/Conv2d modules whose name ...
=============== ==========================================================================
esd-x           contains ``attn2`` (cross-attention: to_q, to_k, to_v, to_out.0)
esd-x-strict    contains ``attn2.to_k`` or ``attn2.to_v`` (depend on the text embedding only)
esd-u           does not contain ``attn2`` (everything but cross-attention)
esd-all         anything
=============== ==========================================================================

All four train with ESD's objective (erasure/training/trainer.py); normalisation layers and embeddings are never
touched.

Example:
    >>> from erasure.training.methods import select_parameters
    >>> select_parameters(pipe.unet, "esd-x")[0]
    'down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_q.weight'
"""

from __future__ import annotations

from .registry import Method, register_method

CARD = """ESD ({{ t.method }}, eta={{ t.eta }}, {{ t.iterations }} iterations, lr={{ t.lr }},
x_t sampled with the {{ t.sample_with }} UNet)"""


def keys_and_values(name: str) -> bool:
    """Cross-attention's key and value projections: the only weights that see the text alone."""
    return "attn2.to_k" in name or "attn2.to_v" in name


ESD_X = register_method(Method("esd-x", "cross-attention (attn2: to_q, to_k, to_v, to_out)",
                               lambda name: "attn2" in name, CARD))
ESD_X_STRICT = register_method(Method("esd-x-strict", "cross-attention's keys and values (attn2.to_k, to_v)",
                                      keys_and_values, CARD))
ESD_U = register_method(Method("esd-u", "everything but cross-attention", lambda name: "attn2" not in name, CARD))
ESD_ALL = register_method(Method("esd-all", "every Linear and Conv2d layer", lambda name: True, CARD))
