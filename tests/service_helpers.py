"""Packs, a registry, a lock and a service config for the service tests, built against the real toy base UNet.

The packs are not trained: their deltas are random (esd-x: attn2 tensors, ~1e-2) so images visibly differ, and
their base fingerprint is the real one, so start-up verification behaves as in production."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import torch
import yaml

from erasure.card import render_card
from erasure.pack import fingerprint, write_pack

PACKS = {"circle": ("circle",), "red": ("red",), "striped": ("striped",), "square": ("square",)}


def make_toy_pack(out: Path, unet, name: str, concepts=("x",), seed: int = 0, method: str = "esd-x",
                  magnitude: float = 1e-2, other_base: bool = False) -> Path:
    from PIL import Image

    params = dict(unet.named_parameters())
    names = [n for n in params if ("attn2" in n) == method.startswith("esd-x")]
    g = torch.Generator().manual_seed(1000 + seed)
    delta = {n: torch.randn(params[n].shape, generator=g) * magnitude for n in names}
    base_values = params
    if other_base:  # same architecture, other weights: the fingerprint cannot match
        base_values = {n: params[n].detach() + 1e-3 for n in names}
    fields = dict(name=name, concepts=list(concepts), method=method, eta=1.0, iterations=1, lr=1e-5, seed=seed,
                  sample_with="trained", guidance=3.0, ddim_steps=4, loop="pooled",
                  base=dict(id="toy" if not other_base else "other/base", revision=None,
                            fingerprint=fingerprint(base_values, names)),
                  created_at=dt.datetime(2026, 11, 28, tzinfo=dt.timezone.utc), tool_version="test")
    write_pack(Path(out), fields, delta, render_card(fields, {}), Image.new("RGB", (16, 8), (seed * 40 % 256, 80, 9)))
    return Path(out)


def make_world(root: Path, unet, packs: dict[str, tuple] = PACKS, other_base: tuple[str, ...] = ()) -> Path:
    """root/registry (local registry with test/NAME tag v1), root/packs.lock locking them all; returns the lock."""
    from registry import open_registry
    from registry.lock import LockFile

    root = Path(root)
    reg_dir = root / "registry"
    reg_dir.mkdir(parents=True, exist_ok=True)
    reg = open_registry(registry_dir=reg_dir)
    lock = LockFile(root / "packs.lock")
    for i, (name, concepts) in enumerate(packs.items()):
        pack_dir = make_toy_pack(root / "src" / name, unet, name, concepts, seed=i, other_base=name in other_base)
        reg.push(pack_dir, f"test/{name}", tag="v1")
        lock.add(name, reg.pull(f"test/{name}", "v1"), source=str(reg_dir))
    lock.save()
    return root / "packs.lock"


def write_config(path: Path, lock: Path, **options) -> Path:
    data = {"lock": str(lock), "device": "cpu", "threads": 4, "default_steps": 6, "torch_threads": 1, **options}
    Path(path).write_text(yaml.safe_dump(data))
    return Path(path)


def commit_dir(lock: Path, name: str) -> Path:
    """The registry directory holding the locked commit of ``name`` (to tamper with it)."""
    import json

    e = json.loads(Path(lock).read_text())["packs"][name]
    src = Path(e["source"])
    src = src if src.is_absolute() else Path(lock).parent / src
    return src / e["repo"] / "commits" / e["revision"]
