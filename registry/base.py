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


class AccessDeniedError(PushError):
    """The registry refused the credentials (HTTP 401/403): no token, a wrong token, or no write access."""


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
    latest_tag: str | None = None  # a tag pointing at latest_sha, if any


class Registry(Protocol):
    """``source`` names the registry in a lock file: an endpoint URL, a local registry path, or
    ``builtin:toy-registry`` (see registry.lock). ``expected_files`` (from a lock) must match every pulled file."""

    source: str

    def push(self, pack_dir: Path, repo: str, tag: str | None = None, private: bool = False) -> PushResult: ...

    def resolve(self, repo: str, revision: str = "main") -> str: ...

    def pull(self, repo: str, revision: str = "main", to: Path | None = None,
             base_unet=None, expected_files: dict[str, str] | None = None) -> PulledPack: ...

    def list(self, namespace: str) -> list[PackInfo]: ...
