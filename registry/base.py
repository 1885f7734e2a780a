"""The registry interface and its typed results. (Contract; backends in local.py and hub.py.)"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Protocol

from erasure.errors import ErasureError


class RegistryError(ErasureError):
    """Base class of registry errors (printed as one line by the CLI)."""


class PackNotFoundError(RegistryError):
    """No such repository in the registry."""


class RevisionNotFoundError(RegistryError):
    """The repository exists but has no such branch, tag or commit."""


class VerificationError(RegistryError):
    """A pulled file does not match the manifest / the registry's hash; nothing was written to the target."""


class PushError(RegistryError):
    """A push failed; the repository shows no new commit."""


@dataclasses.dataclass(frozen=True)
class PushResult:
    repo: str
    commit_sha: str  # 40 hex
    url: str
    tag: str | None = None


@dataclasses.dataclass(frozen=True)
class PulledPack:
    repo: str
    commit_sha: str  # 40 hex: what REV resolved to
    path: Path  # a verified pack directory (load with erasure.pack.ConceptPack.load)
    files: dict[str, str]  # file name -> sha256


@dataclasses.dataclass(frozen=True)
class PackInfo:
    repo: str
    name: str
    concepts: list[str]
    method: str
    base: str
    latest_sha: str


class Registry(Protocol):
    def push(self, pack_dir: Path, repo: str, tag: str | None = None, private: bool = False) -> PushResult: ...

    def resolve(self, repo: str, revision: str = "main") -> str: ...

    def pull(self, repo: str, revision: str = "main", to: Path | None = None,
             base_unet=None) -> PulledPack: ...

    def list(self, namespace: str) -> list[PackInfo]: ...
