"""``packs.lock``: which exact pack versions a deployment uses, so it is reproducible and can run offline.

Format (JSON, written atomically, keys sorted)::

    {
      "version": 1,
      "packs": {
        "circle": {
          "repo": "toy/circle",
          "revision": "<40-hex commit sha>",
          "source": "https://huggingface.co" | "builtin:toy-registry" | "<local registry path>",
          "files": {"README.md": "<sha256>", "delta.safetensors": "<sha256>", "pack.json": "<sha256>",
                    "preview.png": "<sha256>"}
        }
      }
    }

Keys are pack names (the manifest's ``name`` unless another is given). A local ``source`` path is stored relative
to the lock file's directory when it lies under it. ``erasure lock`` / ``erasure pull --lock`` write entries;
``LockFile.fetch`` pulls every entry pinned to its sha and checks every file against the lock (on top of the
manifest and registry checks), which with ``HF_HUB_OFFLINE=1`` is served from the HF cache.

    >>> from registry.lock import LockFile
    >>> pulled = LockFile.load("packs.lock").fetch()    # {name: PulledPack}, verified
    >>> pulled["circle"].pack                           # the ConceptPack
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path

from erasure.errors import InvalidArgumentError
from erasure.files import atomic_write_text

from .errors import RegistryError
from .refs import SHA_RE, check_repo_id
from .types import PulledPack

LOCK_NAME = "packs.lock"
LOCK_VERSION = 1
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


@dataclasses.dataclass(frozen=True)
class LockEntry:
    repo: str
    revision: str  # 40-hex commit sha
    files: dict[str, str]  # file name -> sha256
    source: str

    def to_json(self) -> dict:
        return {"repo": self.repo, "revision": self.revision, "source": self.source,
                "files": dict(sorted(self.files.items()))}


class LockFile:
    def __init__(self, path: str | os.PathLike = LOCK_NAME, entries: dict[str, LockEntry] | None = None):
        self.path = Path(path)
        self.entries: dict[str, LockEntry] = dict(entries or {})

    def __repr__(self) -> str:
        return f"LockFile({str(self.path)!r}, {sorted(self.entries)})"

    @classmethod
    def load(cls, path: str | os.PathLike = LOCK_NAME, missing_ok: bool = False) -> "LockFile":
        path = Path(path)
        if not path.is_file():
            if missing_ok:
                return cls(path)
            raise InvalidArgumentError(f"no lock file {path}; write one with "
                                       f"`erasure lock NS/NAME[@REV] --lock {path}`")
        try:
            data = json.loads(path.read_text())
            if data.get("version") != LOCK_VERSION:
                raise ValueError(f"version {data.get('version')!r}, this tool reads {LOCK_VERSION}")
            entries = {}
            for name, e in data["packs"].items():
                entry = LockEntry(repo=check_repo_id(e["repo"]), revision=e["revision"], files=dict(e["files"]),
                                  source=str(e["source"]))
                if not SHA_RE.match(entry.revision):
                    raise ValueError(f"{name}: revision {entry.revision!r} is not a 40-hex commit sha")
                bad = [f for f, h in entry.files.items() if not _SHA256.match(str(h))]
                if bad or not entry.files:
                    raise ValueError(f"{name}: files must map names to sha256 hex digests")
                entries[str(name)] = entry
        except (ValueError, KeyError, TypeError, AttributeError, InvalidArgumentError) as exc:
            raise InvalidArgumentError(f"lock file {path} is malformed: {exc}; "
                                       "re-create it with `erasure lock`") from None
        return cls(path, entries)

    def add(self, name: str, pulled: PulledPack, source: str) -> LockEntry:
        entry = LockEntry(repo=pulled.repo, revision=pulled.commit_sha, files=dict(pulled.files),
                          source=self._portable(source))
        self.entries[name] = entry
        return entry

    def _portable(self, source: str) -> str:
        """A local registry path under the lock's directory is stored relative to it (they travel together)."""
        if source.startswith(("http://", "https://", "builtin:")):
            return source
        path, home = Path(source).absolute(), self.path.absolute().parent
        return os.path.relpath(path, home) if path.is_relative_to(home) else str(path)

    def save(self) -> Path:
        data = {"version": LOCK_VERSION, "packs": {n: e.to_json() for n, e in sorted(self.entries.items())}}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        return atomic_write_text(self.path, json.dumps(data, indent=2) + "\n")

    def registry(self, name: str, **kwargs):
        from . import registry_for_source

        return registry_for_source(self.entries[name].source, relative_to=self.path.absolute().parent, **kwargs)

    def fetch(self, names: list[str] | None = None, to_dir: str | os.PathLike | None = None, base=None,
              **registry_kwargs) -> dict[str, PulledPack]:
        """Pull the locked packs (all, or ``names``) pinned to their commit, checking every file against the lock
        and, given a ``base`` (UNet or BaseWeights), the base fingerprint. ``to_dir``: copy each pack to
        ``to_dir/<name>``; otherwise the paths point into the cache / registry."""
        unknown = sorted(set(names or []) - set(self.entries))
        if unknown:
            raise RegistryError(f"{self.path} has no pack(s) {unknown} (it locks {sorted(self.entries) or 'nothing'})")
        out = {}
        for name in names or sorted(self.entries):
            e = self.entries[name]
            reg = self.registry(name, **registry_kwargs)
            out[name] = reg.pull(e.repo, e.revision, to=Path(to_dir) / name if to_dir is not None else None,
                                 base=base, expected_files=e.files)
        return out
