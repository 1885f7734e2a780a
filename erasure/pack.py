"""The concept pack: the contract between training, the registry and serving.

A pack is a directory (or a Hub repository root) holding exactly::

    delta.safetensors   theta - theta* for the UNet tensors training touched, keyed by diffusers parameter names
    pack.json           the Manifest below (pydantic), with the sha256 of every other file
    README.md           a Hub model card
    preview.png         base vs erased images

A pack is verified before it touches a model: file set and sha256, safetensors only (never pickle), tensor names,
shapes and dtypes as declared, finite values, and a base *fingerprint*: the sha256 of the base's values of
exactly the touched tensors, so a pack is refused on any base whose touched tensors differ.

Example:
    >>> from erasure.pack import ConceptPack
    >>> pack = ConceptPack.load("packs/circle")        # checks files and hashes
    >>> pack.verify_against(pipe.unet)                  # checks names, shapes and the base fingerprint
    >>> pack.manifest.concepts
    ['circle']
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .errors import PackIntegrityError, PackMismatchError

FORMAT_VERSION = 1
MANIFEST = "pack.json"
DELTA = "delta.safetensors"
CARD = "README.md"
PREVIEW = "preview.png"
PACK_FILES = (DELTA, MANIFEST, CARD, PREVIEW)
# Never loaded, whatever the manifest says: these formats can run code when unpickled.
UNSAFE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle", ".joblib", ".npy", ".npz")

Method = Literal["esd-x", "esd-x-strict", "esd-u", "esd-all"]


class TensorInfo(BaseModel):
    model_config = ConfigDict(extra="forbid")
    shape: list[int]
    dtype: str


class BaseRef(BaseModel):
    """The base pipeline a pack was trained on."""

    model_config = ConfigDict(extra="forbid")
    id: str = Field(description="'toy', a Hub repository id, or a local path")
    revision: str | None = None
    fingerprint: str = Field(description="sha256 of the base values of the touched tensors (see fingerprint())")


class Manifest(BaseModel):
    """``pack.json``. ``files`` maps every other file of the pack to its sha256."""

    model_config = ConfigDict(extra="forbid")
    format_version: int = FORMAT_VERSION
    name: str
    concepts: list[str]
    method: Method
    eta: float
    iterations: int
    lr: float
    seed: int
    sample_with: Literal["trained", "frozen"]
    erase_from: str | None = None
    guidance: float
    ddim_steps: int
    loop: str
    templates: list[str] = ["{}"]
    preserve: list[str] = []
    preserve_weight: float = 1.0
    preserve_unconditional: bool = False
    anchor: list[str] = []
    # pooled loop; packs written before these fields existed used batch 4, refresh 20, 4 trajectories
    batch_size: int = 4
    refresh_every: int = 20
    pool_trajectories: int = 4
    base: BaseRef
    tensors: dict[str, TensorInfo]
    files: dict[str, str]
    metrics: dict[str, Any] = Field(default_factory=dict)
    created_at: dt.datetime
    tool_version: str


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def fingerprint(state: dict[str, torch.Tensor], names) -> str:
    """sha256 over (name, shape, float32 bytes) of ``names`` in sorted order; independent of the storage dtype."""
    h = hashlib.sha256()
    for name in sorted(names):
        t = state[name].detach().to("cpu", torch.float32).contiguous()
        h.update(f"{name}:{tuple(t.shape)};".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


class ConceptPack:
    """A verified concept pack: its manifest and its delta tensors (float32 on CPU)."""

    def __init__(self, path: Path, manifest: Manifest, delta: dict[str, torch.Tensor]):
        self.path, self.manifest, self.delta = path, manifest, delta

    @property
    def name(self) -> str:
        return self.manifest.name

    def __repr__(self) -> str:
        m = self.manifest
        return f"ConceptPack(name={m.name!r}, concepts={m.concepts}, method={m.method!r}, tensors={len(m.tensors)})"

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ConceptPack":
        """Read and check a pack directory: file set, sha256 of every file, tensors as declared and finite."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        path = Path(path)
        label = str(path)
        if not path.is_dir():
            raise PackIntegrityError(label, "no such pack directory")
        present = {p.name for p in path.iterdir() if not p.name.startswith(".")}
        unsafe = sorted(n for n in present if n.lower().endswith(UNSAFE_SUFFIXES))
        if unsafe:
            raise PackIntegrityError(label, f"refusing pickle-capable file(s) {unsafe}; packs hold safetensors only")
        unexpected = sorted(present - set(PACK_FILES))
        if unexpected:
            raise PackIntegrityError(label, f"unexpected file(s) {unexpected}; a pack holds exactly {list(PACK_FILES)}")
        if MANIFEST not in present:
            raise PackIntegrityError(label, f"{MANIFEST} is missing")
        try:
            manifest = Manifest.model_validate_json((path / MANIFEST).read_text())
        except (ValidationError, ValueError) as exc:
            raise PackIntegrityError(label, f"{MANIFEST} is not a valid manifest: {exc}") from None
        label = f"{manifest.name!r} ({path})"
        if manifest.format_version != FORMAT_VERSION:
            raise PackIntegrityError(label, f"format version {manifest.format_version}, this tool reads {FORMAT_VERSION}")
        expected = set(PACK_FILES) - {MANIFEST}
        if set(manifest.files) != expected:
            raise PackIntegrityError(label, f"manifest lists files {sorted(manifest.files)}, expected {sorted(expected)}")
        for name, digest in manifest.files.items():
            if name not in present:
                raise PackIntegrityError(label, f"{name} is missing")
            actual = sha256_file(path / name)
            if actual != digest:
                raise PackIntegrityError(label, f"sha256 of {name} is {actual[:12]}..., manifest says {digest[:12]}...")
        try:
            delta = load_file(str(path / DELTA))
        except (SafetensorError, OSError, ValueError) as exc:
            raise PackIntegrityError(label, f"{DELTA} is not a readable safetensors file: {exc}") from None
        if set(delta) != set(manifest.tensors):
            extra, missing = sorted(set(delta) - set(manifest.tensors)), sorted(set(manifest.tensors) - set(delta))
            raise PackIntegrityError(label, f"delta tensors differ from the manifest (extra {extra}, missing {missing})")
        for name, t in delta.items():
            info = manifest.tensors[name]
            if list(t.shape) != info.shape or str(t.dtype).removeprefix("torch.") != info.dtype:
                raise PackIntegrityError(label, f"tensor {name} is {list(t.shape)} {t.dtype}, manifest says {info}")
            if not torch.isfinite(t).all():
                raise PackIntegrityError(label, f"tensor {name} holds NaN or Inf values")
        return cls(path, manifest, {k: v.float() for k, v in delta.items()})

    def verify_against(self, unet_or_state, base_state: dict[str, torch.Tensor] | None = None) -> None:
        """Refuse (PackMismatchError) unless every touched tensor exists in the base with the same shape and the
        base fingerprint matches. ``base_state`` overrides where the base values are read (pristine copies)."""
        state = base_state if base_state is not None else _state_of(unet_or_state)
        label = f"{self.name!r} ({self.path})"
        names = set(self.delta)
        unknown = sorted(n for n in names if n not in state)
        if unknown:
            raise PackMismatchError(label, f"base has no tensor(s) {unknown[:3]}{'...' if len(unknown) > 3 else ''}")
        for n in sorted(names):
            if tuple(state[n].shape) != tuple(self.delta[n].shape):
                raise PackMismatchError(label, f"tensor {n} is {list(state[n].shape)} in the base, "
                                               f"{list(self.delta[n].shape)} in the pack")
        if fingerprint(state, names) != self.manifest.base.fingerprint:
            raise PackMismatchError(label, f"built for another base ({self.manifest.base.id}): the base values of its "
                                           f"{len(names)} touched tensors differ")


def _state_of(unet_or_state) -> dict[str, torch.Tensor]:
    if isinstance(unet_or_state, dict):
        return unet_or_state
    return dict(unet_or_state.named_parameters())


def write_pack(out: Path, manifest_fields: dict, delta: dict[str, torch.Tensor], card: str, preview) -> Manifest:
    """Write a pack directory atomically enough for a CLI: files first, the manifest (with their hashes) last."""
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    delta = {k: v.detach().to("cpu").contiguous() for k, v in delta.items()}
    # One metadata key: safetensors writes its metadata map in hash order, so two keys make the bytes (and the
    # sha256) of identical packs differ from run to run. The format version lives in the manifest.
    save_file(delta, str(out / DELTA), metadata={"format": "pt"})
    (out / CARD).write_text(card)
    preview.save(out / PREVIEW)
    manifest = Manifest(
        **manifest_fields,
        tensors={k: TensorInfo(shape=list(v.shape), dtype=str(v.dtype).removeprefix("torch.")) for k, v in delta.items()},
        files={name: sha256_file(out / name) for name in (DELTA, CARD, PREVIEW)},
    )
    tmp = out / (MANIFEST + ".tmp")
    tmp.write_text(manifest.model_dump_json(indent=2))
    tmp.replace(out / MANIFEST)
    for name in PACK_FILES:  # save_file creates 0600 files; packs are published and served, make them readable
        os.chmod(out / name, 0o644)
    return manifest


def read_manifest(path: Path) -> dict:
    return json.loads((Path(path) / MANIFEST).read_text())
