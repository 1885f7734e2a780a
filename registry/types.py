"""What registries return, and the interface both backends (local.py, hub.py) implement."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from erasure.pack.concept_pack import BaseWeights, ConceptPack
    from erasure.pack.manifest import Manifest


@dataclasses.dataclass(frozen=True)
class PushResult:
    repo: str
    commit_sha: str  # 40 hex
    url: str
    tag: str | None = None


@dataclasses.dataclass(frozen=True)
class PulledPack:
    """A pack pulled pinned to a commit and verified: use ``pack`` as is, it is not re-read or re-checked."""

    repo: str
    commit_sha: str  # 40 hex: what REV resolved to
    path: Path  # the verified files (a copy in ``to``, else the cache / registry directory: read only)
    files: dict[str, str]  # file name -> sha256
    pack: "ConceptPack"


@dataclasses.dataclass(frozen=True)
class PublishedManifest:
    """A published pack's manifest, read without its weights and checked against the registry's record of the
    file (e.g. to see which config trained what a tag names)."""

    repo: str
    commit_sha: str  # 40 hex: what REV resolved to
    manifest: "Manifest"


@dataclasses.dataclass(frozen=True)
class PackInfo:
    repo: str
    name: str
    concepts: list[str]
    method: str
    base: str
    latest_sha: str
    latest_tag: str | None = None  # a tag pointing at latest_sha, if any


class Registry(Protocol):
    """``source`` names the registry in a lock file: an endpoint URL, a local registry path, or
    ``builtin:toy-registry`` (see registry.lock). ``expected_files`` (from a lock) must match every pulled file;
    ``base`` (a UNet or ``BaseWeights``): the pack must fit it (names, shapes, fingerprint)."""

    source: str

    def push(self, pack_dir: Path, repo: str, tag: str | None = None, private: bool = False) -> PushResult: ...

    def resolve(self, repo: str, revision: str = "main") -> str: ...

    def pull(self, repo: str, revision: str = "main", to: Path | None = None, base: "BaseWeights | None" = None,
             expected_files: dict[str, str] | None = None) -> PulledPack: ...

    def read_manifest(self, repo: str, revision: str = "main") -> PublishedManifest: ...

    def list(self, namespace: str) -> list[PackInfo]: ...

    def tags(self, repo: str) -> dict[str, str]: ...
