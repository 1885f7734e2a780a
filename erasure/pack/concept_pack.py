"""The concept pack: the contract between training, the registry and serving.

A pack is a directory (or a Hub repository root) holding exactly::

    delta.safetensors   theta - theta* for the denoiser tensors training touched, keyed by diffusers parameter names
    pack.json           the Manifest (erasure/pack/manifest.py): the training config verbatim, the base, the
                        tensors, the sha256 of every file
    README.md           the Hub model card, rendered from the manifest (erasure/pack/card.py)
    preview.png         base vs erased images

A pack is verified before it touches a model: file set and sha256, safetensors only (never pickle), tensor names,
shapes and dtypes as declared, finite values, and a base *fingerprint*: the sha256 of the base's values of
exactly the touched tensors, so a pack is refused on any base whose touched tensors differ.

Example:
    >>> from erasure.pack.concept_pack import ConceptPack
    >>> pack = ConceptPack.from_pretrained("packs/circle")    # checks files, hashes and tensors
    >>> pack.verify_against(pipe.unet)                         # checks names, shapes and the base fingerprint
    >>> pack.concepts, pack.training.method
    (['circle'], 'esd-x')
    >>> pack.save_pretrained("copy/circle")
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import os
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .. import __version__
from ..base.families import FAMILIES, denoiser_family
from ..errors import PackIntegrityError, PackMismatchError
from ..files import atomic_write_text, sha256_file
from ..training.config import ESDConfig
from .card import render_card
from .manifest import CARD, DELTA, MANIFEST, PACK_FILES, PREVIEW, UNSAFE_SUFFIXES, BaseRef, Manifest, TensorInfo

# Entry-point group through which a registry resolves Hub ids for ConceptPack.from_pretrained (registry/ adds one).
PACK_SOURCES_GROUP = "erasure.pack_sources"


def fingerprint(state: dict[str, torch.Tensor], names) -> str:
    """sha256 over (name, shape, float32 bytes) of ``names`` in sorted order; independent of the storage dtype."""
    h = hashlib.sha256()
    for name in sorted(names):
        t = state[name].detach().to("cpu", torch.float32).contiguous()
        h.update(f"{name}:{tuple(t.shape)};".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


class BaseWeights:
    """A base UNet's parameters as packs are checked against them, with fingerprints cached per tensor set: each
    is computed once per base however many packs (of the same method) are verified or composed on it.

    Example:
        >>> base = BaseWeights(pipe.unet)
        >>> for pack in packs:
        ...     pack.verify_against(base)     # the esd-x fingerprint is hashed once
    """

    def __init__(self, unet_or_state):
        self.module = None if isinstance(unet_or_state, dict) else unet_or_state
        self.state: dict[str, torch.Tensor] = (dict(unet_or_state) if self.module is None
                                               else dict(unet_or_state.named_parameters()))
        # a bare state dict says nothing about its family: only the tensor checks apply to it
        self.family: str | None = None if self.module is None else denoiser_family(self.module)
        self._fingerprints: dict[frozenset[str], str] = {}

    @classmethod
    def of(cls, base) -> "BaseWeights":
        return base if isinstance(base, BaseWeights) else cls(base)

    def fingerprint(self, names) -> str:
        key = frozenset(names)
        if key not in self._fingerprints:
            self._fingerprints[key] = fingerprint(self.state, key)
        return self._fingerprints[key]


class ConceptPack:
    """A concept pack in memory: its manifest, its delta tensors (as stored) and its preview (PNG bytes)."""

    def __init__(self, manifest: Manifest, delta: dict[str, torch.Tensor], preview: bytes,
                 path: Path | None = None):
        self.manifest, self.delta, self.preview, self.path = manifest, delta, preview, path

    @classmethod
    def from_delta(cls, name: str, training: ESDConfig, base: BaseRef, delta: dict[str, torch.Tensor], preview,
                   metrics: dict[str, Any] | None = None) -> "ConceptPack":
        """A new pack (not yet saved) from a training result; ``preview`` is a PIL image or PNG bytes."""
        if not isinstance(preview, bytes):
            buf = io.BytesIO()
            preview.save(buf, format="PNG")
            preview = buf.getvalue()
        delta = {k: v.detach().to("cpu").contiguous() for k, v in delta.items()}
        manifest = Manifest(name=name, training=training, base=base, tensors=_tensor_infos(delta),
                            metrics=metrics or {}, created_at=dt.datetime.now(dt.timezone.utc),
                            tool_version=__version__)
        return cls(manifest, delta, preview)

    # --- what it is ---------------------------------------------------------------------------------------------

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def concepts(self) -> list[str]:
        return self.manifest.concepts

    @property
    def training(self) -> ESDConfig:
        return self.manifest.training

    @property
    def guide_away(self) -> float:
        return self.manifest.guide_away

    def __repr__(self) -> str:
        m = self.manifest
        return f"ConceptPack(name={m.name!r}, concepts={m.concepts}, method={m.method!r}, tensors={len(m.tensors)})"

    @property
    def _label(self) -> str:
        return f"{self.name!r}" + (f" ({self.path})" if self.path else "")

    # --- loading and saving -------------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, pretrained: str | os.PathLike, revision: str | None = None,
                        **registry_kwargs) -> "ConceptPack":
        """Load and check a pack directory, or pull ``NAMESPACE/NAME`` at ``revision`` through the installed
        registry (the Hub at ``HF_ENDPOINT``, else the shipped local registry; ``registry_kwargs`` go to it).

        Checks: the file set, the sha256 of every file, safetensors only, tensors as declared and finite."""
        path = Path(pretrained).expanduser()
        if path.is_dir():
            if revision is not None:
                raise PackIntegrityError(str(path), f"revision={revision!r} applies to a Hub id, not a directory")
            return cls._load_directory(path)
        text = str(pretrained)
        if text.count("/") == 1 and not text.startswith((".", "/", "~")):
            sources = list(entry_points(group=PACK_SOURCES_GROUP))
            if sources:
                return sources[0].load()(text, revision=revision or "main", **registry_kwargs)
            raise PackIntegrityError(text, "no such pack directory; resolving a Hub id needs the registry package "
                                           "installed (pip install erasure)")
        raise PackIntegrityError(text, "no such pack directory")

    @classmethod
    def _load_directory(cls, path: Path) -> "ConceptPack":
        label = str(path)
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
            manifest = Manifest.from_json((path / MANIFEST).read_text())
        except (ValidationError, ValueError) as exc:
            raise PackIntegrityError(label, f"{MANIFEST} is not a valid manifest: {_first_line(exc)}") from None
        label = f"{manifest.name!r} ({path})"
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
            if list(t.shape) != info.shape or _dtype_name(t) != info.dtype:
                raise PackIntegrityError(label, f"tensor {name} is {list(t.shape)} {t.dtype}, manifest says {info}")
            if not torch.isfinite(t).all():
                raise PackIntegrityError(label, f"tensor {name} holds NaN or Inf values")
        return cls(manifest, delta, (path / PREVIEW).read_bytes(), path=path)

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write the pack's four files; the manifest, holding the others' sha256, is written last (atomically)."""
        card = render_card(self.manifest)  # before any file is written: a card that fails to render changes nothing
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        # One metadata key: safetensors writes its metadata map in hash order, so two keys make the bytes (and the
        # sha256) of identical packs differ from run to run. The format version lives in the manifest.
        save_file(self.delta, str(out / DELTA), metadata={"format": "pt"})
        (out / CARD).write_text(card)
        (out / PREVIEW).write_bytes(self.preview)
        self.manifest.files = {name: sha256_file(out / name) for name in (DELTA, CARD, PREVIEW)}
        atomic_write_text(out / MANIFEST, self.manifest.model_dump_json(indent=2))
        for name in PACK_FILES:  # save_file creates 0600 files; packs are published and served, make them readable
            os.chmod(out / name, 0o644)
        self.path = out
        return out

    # --- checking against a base ----------------------------------------------------------------------------------

    def verify_against(self, base) -> None:
        """Refuse (PackMismatchError) unless every touched tensor exists in ``base`` (a UNet, a state dict or a
        BaseWeights) with the same shape and the base fingerprint matches."""
        base = BaseWeights.of(base)
        trained_on = self.manifest.base
        if trained_on.family and base.family and trained_on.family != base.family:
            raise PackMismatchError(self._label, f"trained on an {FAMILIES[trained_on.family].label} base "
                                                 f"({trained_on}); this base is {FAMILIES[base.family].label}: use a "
                                                 "pack trained on "
                                                 "this base")
        names = set(self.delta)
        unknown = sorted(n for n in names if n not in base.state)
        if unknown:
            raise PackMismatchError(self._label, f"base has no tensor(s) {unknown[:3]}"
                                                 f"{'...' if len(unknown) > 3 else ''}")
        for n in sorted(names):
            if tuple(base.state[n].shape) != tuple(self.delta[n].shape):
                raise PackMismatchError(self._label, f"tensor {n} is {list(base.state[n].shape)} in the base, "
                                                     f"{list(self.delta[n].shape)} in the pack")
        if base.fingerprint(names) != trained_on.fingerprint:
            hint = ""
            dtype = _dtype_name(next(iter(base.state[n] for n in names))) if names else None
            if trained_on.dtype and dtype and trained_on.dtype != dtype:
                hint = f" (it was trained on the base loaded in {trained_on.dtype}, this one is {dtype})"
            raise PackMismatchError(self._label, f"built for another base ({trained_on}): the base values of its "
                                                 f"{len(names)} touched tensors differ{hint}")


def _dtype_name(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


def _tensor_infos(delta: dict[str, torch.Tensor]) -> dict[str, TensorInfo]:
    return {k: TensorInfo(shape=list(v.shape), dtype=_dtype_name(v)) for k, v in delta.items()}


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    if isinstance(exc, ValidationError):
        e = exc.errors()[0]
        return f"{'.'.join(map(str, e['loc'])) or 'manifest'}: {e['msg']}"
    return text.splitlines()[0] if text else type(exc).__name__


def parse_pack_spec(text: str) -> tuple[str, float]:
    """``PACK`` or ``PACK:SCALE`` (PACK: a directory or NS/NAME[@REV]) -> (PACK, scale; default 1)."""
    path, _, scale = text.rpartition(":")
    try:
        return (path, float(scale)) if path else (text, 1.0)
    except ValueError:
        return text, 1.0


def load_packs(specs) -> list[tuple[ConceptPack, float]]:
    """[(ConceptPack, scale)] for ``PACK[:SCALE]`` specs: pack directories or NS/NAME[@REV] ids, each verified."""
    out = []
    for spec, scale in map(parse_pack_spec, specs or []):
        ident, _, revision = spec.partition("@") if not Path(spec).exists() else (spec, "", "")
        out.append((ConceptPack.from_pretrained(ident, revision=revision or None), scale))
    return out
