"""A registry, a lock and a service config for the service tests, with packs built against the real toy base UNet
(random esd-x deltas of ~1e-2, so images visibly differ; real fingerprints, so start-up verification is real)."""

from __future__ import annotations

from pathlib import Path

import yaml

from factories import make_pack

PACKS = {"circle": ("circle",), "red": ("red",), "striped": ("striped",), "square": ("square",)}


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
        pack_dir = root / "src" / name
        make_pack(pack_dir, unet, name, concepts, seed=i, base_id="toy", other_base=name in other_base)
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
