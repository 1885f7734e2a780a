"""Where concept packs live: a local directory registry (the embedded default) and the Hugging Face Hub.

Both backends share one interface (``Registry``) and one layout: one repository per pack, the pack's files at the
repository root, versions as commits (40-hex sha) and tags. Every pull is pinned to a commit sha and verified
(sha256 of every file against the manifest, and against the Hub tree's LFS oid) before it is handed over.

    >>> from registry import open_registry
    >>> reg = open_registry()                       # the shipped local registry (no network)
    >>> pulled = reg.pull("toy/circle", "v3", to="packs/circle")
    >>> pulled.commit_sha                           # 40 hex, what "v3" resolved to
    >>> pulled.pack                                 # the verified ConceptPack
    ConceptPack(name='circle', concepts=['circle'], method='esd-x', tensors=20)

``ConceptPack.from_pretrained("toy/circle", revision="v3")`` comes here too, through the
``erasure.pack_sources`` entry point (``load_pack`` below).

This module imports nothing heavy: the backends (and huggingface_hub) load when a registry is opened.
"""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_REGISTRY = Path(__file__).parent / "toy-registry"
BUILTIN_SOURCE = "builtin:toy-registry"


def open_registry(endpoint: str | None = None, registry_dir: str | os.PathLike | None = None, *,
                  token: str | bool | None = None, cache_dir: str | os.PathLike | None = None):
    """The registry to use: the Hub at ``endpoint``; else the local registry ``registry_dir``; else the Hub at
    ``HF_ENDPOINT`` if that is set; else the shipped local registry (``registry/toy-registry``)."""
    from erasure.errors import InvalidArgumentError

    if endpoint and registry_dir:
        raise InvalidArgumentError("give either --endpoint (a Hub) or --registry (a local directory), not both")
    if endpoint:
        if not endpoint.startswith(("http://", "https://")):
            raise InvalidArgumentError(f"--endpoint {endpoint!r} is not an http(s) URL, e.g. https://huggingface.co")
        from .hub import HubRegistry

        return HubRegistry(endpoint=endpoint, token=token, cache_dir=cache_dir)
    if registry_dir:
        from .local import LocalRegistry

        root = Path(registry_dir).expanduser()
        return LocalRegistry(root, source=BUILTIN_SOURCE if _same(root, DEFAULT_REGISTRY) else None)
    if os.environ.get("HF_ENDPOINT"):
        from .hub import HubRegistry

        return HubRegistry(endpoint=os.environ["HF_ENDPOINT"], token=token, cache_dir=cache_dir)
    from .local import LocalRegistry

    return LocalRegistry(DEFAULT_REGISTRY, source=BUILTIN_SOURCE)


def registry_for_source(source: str, relative_to: str | os.PathLike | None = None, *,
                        token: str | bool | None = None, cache_dir: str | os.PathLike | None = None):
    """The registry a lock entry's ``source`` names: an http(s) endpoint, ``builtin:toy-registry``, or a local
    registry path (relative paths are taken from ``relative_to``, the lock file's directory)."""
    if source == BUILTIN_SOURCE:
        return open_registry(registry_dir=DEFAULT_REGISTRY)
    if source.startswith(("http://", "https://")):
        return open_registry(endpoint=source, token=token, cache_dir=cache_dir)
    path = Path(source).expanduser()
    if not path.is_absolute() and relative_to is not None:
        path = Path(relative_to) / path
    return open_registry(registry_dir=path)


def _same(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve()
    except OSError:
        return False


def load_pack(repo: str, revision: str = "main", *, endpoint: str | None = None,
              registry_dir: str | os.PathLike | None = None, base=None, **kwargs):
    """The verified ConceptPack ``repo`` at ``revision`` from ``open_registry(endpoint, registry_dir)``; what
    ``ConceptPack.from_pretrained("NS/NAME", revision=...)`` calls."""
    return open_registry(endpoint=endpoint, registry_dir=registry_dir, **kwargs).pull(repo, revision, base=base).pack


__all__ = ["DEFAULT_REGISTRY", "BUILTIN_SOURCE", "open_registry", "registry_for_source", "load_pack"]
