"""Which UNet parameters each ESD method trains, by diffusers module name.

Only ``nn.Linear`` and ``nn.Conv2d`` modules are candidates (as in the official ESD code); normalisation layers and
embeddings are never touched.

=============== ==========================================================================
method          parameters of Linear/Conv2d modules whose name ...
=============== ==========================================================================
esd-x           contains ``attn2`` (cross-attention: to_q, to_k, to_v, to_out.0)
esd-x-strict    contains ``attn2.to_k`` or ``attn2.to_v`` (depend on the text embedding only)
esd-u           does not contain ``attn2`` (everything but cross-attention)
esd-all         anything
uce             as esd-x-strict, edited in closed form, not trained (erasure/closed_form.py)
=============== ==========================================================================

Example:
    >>> from erasure.methods import select_parameters
    >>> names = select_parameters(pipe.unet, "esd-x")
    >>> names[0]
    'down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_q.weight'
"""

from __future__ import annotations

from .config import METHODS
from .errors import InvalidArgumentError


def _keys_and_values(name: str) -> bool:
    return "attn2.to_k" in name or "attn2.to_v" in name


FILTERS = {
    "esd-x": lambda name: "attn2" in name,
    "esd-x-strict": _keys_and_values,
    "esd-u": lambda name: "attn2" not in name,
    "esd-all": lambda name: True,
    "uce": _keys_and_values,
}


def check_method(method: str) -> str:
    if method not in FILTERS:
        # The official script silently trains nothing for a misspelt method; here it is an error.
        raise InvalidArgumentError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    return method


def select_parameters(unet, method: str) -> list[str]:
    """Names (as in ``unet.state_dict()``) of the parameters ``method`` trains, in module order."""
    from torch import nn

    keep = FILTERS[check_method(method)]
    names = []
    for module_name, module in unet.named_modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)) and keep(module_name):
            names += [f"{module_name}.{p}" for p, _ in module.named_parameters(recurse=False)]
    return names
