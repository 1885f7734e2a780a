"""One UNet forward over a batch whose rows use different pack sets.

Each pack set is a UNet from ``compose_denoiser``: it shares every tensor no pack touches with the base, so it costs the
touched tensors only. ``MixedDenoiser`` runs a batch made of consecutive *segments* of rows, each segment with its own
pack-set UNet: every layer that no pack set of the batch changes runs once over the whole batch; a layer that some
set changes runs once per run of adjacent segments holding the same weights, on those rows only (grouped
linear/conv), and the outputs are concatenated. Every row therefore sees exactly its own set's weights (θ* + Σ s·Δ,
as composed), and a batch whose rows all use one set runs that set's UNet unchanged.

Example:
    >>> mixed = MixedDenoiser(pipe.unet)
    >>> circle = compose_denoiser(pipe.unet, [(ConceptPack.from_pretrained("packs/circle"), 1.0)])
    >>> eps = mixed(x, t, [(2, pipe.unet), (4, circle)], encoder_hidden_states=h)   # rows 0-1 base, 2-5 circle
"""

from __future__ import annotations

import contextvars
import copy
import dataclasses
import weakref
from collections.abc import Sequence

import torch
from torch import nn

Segment = tuple[int, nn.Module]  # (number of consecutive rows, the pack-set UNet those rows use)


@dataclasses.dataclass(frozen=True)
class _Route:
    rows: int
    parts: dict[str, list[tuple[int, int, nn.Module]]]  # layer name -> [(start, end, layer)], adjacent runs merged


_ROUTE: contextvars.ContextVar[_Route | None] = contextvars.ContextVar("erasure_mixed_route", default=None)


class RoutedLayer(nn.Module):
    """Stands in for one layer of the mixed UNet: each run of rows goes through that run's pack-set version of the
    layer. Outside a mixed forward it is the base layer. Layers must be batch-first (Linear, Conv2d, norms)."""

    def __init__(self, name: str, base_layer: nn.Module):
        super().__init__()
        self.name = name
        self.base_layer = base_layer

    @property
    def weight(self):
        return self.base_layer.weight

    @property
    def bias(self):
        return self.base_layer.bias

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        route = _ROUTE.get()
        if route is None:
            return self.base_layer(x, *args, **kwargs)
        parts = route.parts[self.name]
        if len(parts) == 1:
            return parts[0][2](x, *args, **kwargs)
        if x.shape[0] != route.rows:
            raise RuntimeError(f"layer {self.name}: input has {x.shape[0]} rows, the batch {route.rows}; mixed pack "
                               "sets need layers whose first dimension is the batch")
        return torch.cat([layer(x[start:end], *args, **kwargs) for start, end, layer in parts])


class MixedDenoiser:
    """The base UNet's structure with every pack-touched layer routed per row (see the module docstring).

    Built once per base; it shares every tensor with the base and never changes it. The layers to route are found
    from the pack-set UNets themselves (those holding a parameter the base does not), so any set composed on this
    base can join a batch. Not thread-safe: one thread runs it (the service's batcher)."""

    def __init__(self, base_denoiser: nn.Module):
        self.base = base_denoiser
        memo = {id(t): t for t in list(base_denoiser.parameters()) + list(base_denoiser.buffers())}
        self.unet = copy.deepcopy(base_denoiser, memo)  # same tensors, own module objects (layers get swapped here)
        self._base_ptrs = {p.data_ptr() for p in base_denoiser.parameters()}
        self._routed: dict[str, nn.Module] = {}  # layer name -> the base layer it stands in for
        self._last: tuple[tuple[Segment, ...], _Route] | None = None
        # pack-set UNet -> {layer name: (layer, identity of its weights)} for the layers it changes
        self._changed: weakref.WeakKeyDictionary[nn.Module, dict[str, tuple[nn.Module, tuple]]] = \
            weakref.WeakKeyDictionary()
        self._keys: weakref.WeakKeyDictionary[nn.Module, tuple] = weakref.WeakKeyDictionary()

    @property
    def config(self):
        return self.base.config

    def changed_layers(self, unet: nn.Module) -> dict[str, tuple[nn.Module, tuple]]:
        """The layers of a pack-set UNet whose parameters are not the base's (its touched layers)."""
        if unet is self.base:
            return {}
        found = self._changed.get(unet)
        if found is None:
            found = {}
            for name, module in unet.named_modules():
                own = list(module.parameters(recurse=False))
                if own and any(p.data_ptr() not in self._base_ptrs for p in own):
                    found[name] = (module, tuple(p.data_ptr() for p in own))
            self._changed[unet] = found
        return found

    def order_key(self, unet: nn.Module) -> tuple:
        """Sorting a batch's pack sets by this puts sets that change the same layers next to each other, so a
        layer runs once over all the rows that share its weights (e.g. the base and esd-x sets, for every layer
        outside cross-attention)."""
        key = self._keys.get(unet)
        if key is None:
            names = tuple(sorted(self.changed_layers(unet)))
            key = self._keys[unet] = (len(names), names)
        return key

    def _route_layer(self, name: str) -> None:
        if name in self._routed:
            return
        parent_name, _, child = name.rpartition(".")
        parent = self.unet.get_submodule(parent_name) if parent_name else self.unet
        base_layer = getattr(parent, child) if not child.isdigit() else parent[int(child)]
        routed = RoutedLayer(name, base_layer)
        if child.isdigit():
            parent[int(child)] = routed
        else:
            setattr(parent, child, routed)
        self._routed[name] = base_layer

    def route(self, segments: Sequence[Segment]) -> _Route:
        """Which layer each row goes through, for a batch of consecutive ``(rows, pack-set UNet)`` segments."""
        # the cache holds the UNets themselves, so an id cannot be reused by another set while it is cached
        key = tuple((rows, unet) for rows, unet in segments)
        if self._last is not None and len(self._last[0]) == len(key) and all(
                r == r2 and u is u2 for (r, u), (r2, u2) in zip(key, self._last[0])):
            return self._last[1]
        changed = [self.changed_layers(unet) for _, unet in segments]
        for name in {n for c in changed for n in c}:
            self._route_layer(name)
        starts, total = [], 0
        for rows, _ in segments:
            starts.append(total)
            total += rows
        parts: dict[str, list[tuple[int, int, nn.Module]]] = {}
        for name, base_layer in self._routed.items():
            runs: list[list] = []  # [start, end, layer, identity]
            for (rows, _), start, c in zip(segments, starts, changed):
                layer, ident = c.get(name, (None, None))
                if layer is None:
                    layer, ident = base_layer, ("base",)
                if runs and runs[-1][3] == ident and runs[-1][1] == start:
                    runs[-1][1] = start + rows
                else:
                    runs.append([start, start + rows, layer, ident])
            parts[name] = [(s, e, layer) for s, e, layer, _ in runs]
        route = _Route(total, parts)
        self._last = (key, route)  # a running batch keeps its composition for many steps
        return route

    def __call__(self, sample: torch.Tensor, timestep, segments: Sequence[Segment], **denoiser_kwargs) -> torch.Tensor:
        """The UNet's prediction for ``sample`` [B, ...], rows split into ``segments`` (their rows sum to B)."""
        if len({id(u) for _, u in segments}) == 1:  # one pack set: its own UNet, exactly as when served alone
            # forward(), not the module call: a pack set's guide-away hook (erasure/guidance.py) is the caller's
            return segments[0][1].forward(sample, timestep, return_dict=False, **denoiser_kwargs)[0]
        route = self.route(segments)
        if route.rows != sample.shape[0]:
            raise ValueError(f"segments cover {route.rows} rows, the sample has {sample.shape[0]}")
        token = _ROUTE.set(route)
        try:
            return self.unet(sample, timestep, return_dict=False, **denoiser_kwargs)[0]
        finally:
            _ROUTE.reset(token)
