"""The method registry: every way of erasing erasure knows, one ``Method`` object each.

A method carries everything that differs between methods: which parameters of the denoiser it changes (by module
name; only ``nn.Linear`` and ``nn.Conv2d`` modules are candidates, as in the official ESD code), its own options (a
pydantic model: ``ESDConfig.method_options`` holds them, embedded verbatim in every pack it trains), what it cannot
train (``check``), how it changes the weights (ESD's gradient steps, or a closed-form ``edit``), and the sentence
the model card says about it. Adding a method is one file that calls ``register_method``.

Example:
    >>> from pydantic import BaseModel
    >>> class Options(BaseModel):
    ...     scale: float = 1.0
    >>> register_method(Method("esd-q", "ESD on the cross-attention queries", selects=lambda n: "attn2.to_q" in n,
    ...                        card="ESD on the queries ({{ options.scale }})", options=Options))
    >>> select_parameters(pipe.unet, "esd-q")[0]
    'down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_q.weight'

The registry imports neither torch nor diffusers, so ``erasure train --help`` lists every method's options at once.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, ConfigDict

from ...errors import InvalidArgumentError


class NoOptions(BaseModel):
    """A method without options of its own."""

    model_config = ConfigDict(extra="forbid")


@dataclasses.dataclass(frozen=True)
class Method:
    """One erasure method (see the module docstring).

    ``card`` is a Jinja snippet rendered into the pack's model card with ``t`` (the ESDConfig) and ``options`` (the
    method's options). ``check(config)`` raises ValueError for a config the method cannot train (pydantic shows it
    as a config error). ``edit(trainer)`` changes ``trainer.trainable`` in place instead of ESD's training loop and
    returns its residual (the pack's ``final_loss``); None trains with ESD's objective."""

    name: str
    summary: str
    selects: Callable[[str], bool]
    card: str
    options: type[BaseModel] = NoOptions
    check: Callable[[Any], None] | None = None
    edit: Callable[[Any], float] | None = None


METHODS: dict[str, Method] = {}


def register_method(method: Method) -> Method:
    """Add ``method`` to the registry (a name registered twice is an error) and return it."""
    if method.name in METHODS:
        raise ValueError(f"method {method.name!r} is already registered")
    if not issubclass(method.options, BaseModel):
        raise TypeError(f"method {method.name!r}: options must be a pydantic model")
    METHODS[method.name] = method
    return method


def unregister_method(name: str) -> None:
    METHODS.pop(name, None)


def get_method(name: str) -> Method:
    """The registered method ``name``, or InvalidArgumentError naming the known ones."""
    if name not in METHODS:
        # The official script silently trains nothing for a misspelt method; here it is an error.
        raise InvalidArgumentError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}")
    return METHODS[name]


def select_parameters(denoiser, method: str) -> list[str]:
    """Names (as in ``denoiser.state_dict()``) of the parameters ``method`` changes, in module order."""
    from torch import nn

    keep = get_method(method).selects
    names = []
    for module_name, module in denoiser.named_modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)) and keep(module_name):
            names += [f"{module_name}.{p}" for p, _ in module.named_parameters(recurse=False)]
    return names
