"""The local directory registry: the embedded default, laid out like the Hub (one repository per pack, versions kept).

Layout::

    <root>/registry.json                      {"format": "erasure-registry", "version": 1}
    <root>/<ns>/<name>/refs.json              {"branches": {"main": <sha>}, "tags": {"v1": <sha>, ...}}
    <root>/<ns>/<name>/commits/<sha>/         the pack's files, exactly as in the pack directory
    <root>/<ns>/<name>/commits/<sha>.json     {"sha", "parent", "message", "created_at", "files": {name: sha256}}
    <root>/<ns>/<name>/.lock                  held (flock) while a push updates the repository

A commit sha is 40 hex: the sha1 of the canonical JSON of (parent sha, {file: sha256}, message), so it names the
content and its history like a git commit. Commits are never modified or removed: every version stays pullable by
sha, tag or branch. A push is atomic: the files go to ``commits/.tmp-*``, are renamed to ``commits/<sha>``, the
commit record is written (temp file + ``os.replace``), and only then ``refs.json`` moves (temp file +
``os.replace``) — a reader sees the old head or the new one, never a half-written pack. A file identical to the
parent commit's is hard-linked, not copied. Pushing a pack identical to the head makes no new commit (like the Hub).

The shipped default is ``registry/toy-registry`` (see ``registry.DEFAULT_REGISTRY``); ``erasure push PACK --repo
toy/NAME --registry registry/toy-registry`` adds a pack to it.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from erasure.files import atomic_write_text, sha256_file
from erasure.pack.concept_pack import ConceptPack
from erasure.pack.manifest import MANIFEST, PACK_FILES

from .errors import PackNotFoundError, PushError, RegistryError, RevisionNotFoundError
from .refs import SHA_RE, check_namespace, check_repo_id, check_tag
from .types import PackInfo, PublishedManifest, PulledPack, PushResult
from .verify import RemoteFile, check_listing, finish_pull, manifest_summary, push_message, read_published_manifest

MARKER = "registry.json"
FORMAT = {"format": "erasure-registry", "version": 1}


def _write_json(path: Path, data) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def commit_sha(parent: str | None, files: dict[str, str], message: str) -> str:
    canonical = json.dumps({"parent": parent, "files": dict(sorted(files.items())), "message": message},
                           sort_keys=True, separators=(",", ":"))
    return hashlib.sha1(canonical.encode()).hexdigest()


class LocalRegistry:
    """A registry in a directory (see the module docstring for the layout)."""

    def __init__(self, root: str | os.PathLike, source: str | None = None):
        self.root = Path(root).expanduser().absolute()
        self.source = source or str(self.root)

    def __repr__(self) -> str:
        return f"LocalRegistry({str(self.root)!r})"

    # --- layout -------------------------------------------------------------------------------------------------

    def _check_root(self) -> None:
        if not (self.root / MARKER).is_file():
            if not self.root.exists() or (self.root.is_dir() and not any(self.root.iterdir())):
                return  # a missing or empty directory is an empty registry (a push creates it)
            raise RegistryError(f"{self.root} is not a local pack registry (no {MARKER}); give --registry a registry "
                                "directory, or a new one to create it with `erasure push`")

    def _repo_dir(self, repo: str) -> Path:
        check_repo_id(repo)
        return self.root / repo

    def _existing_repo(self, repo: str) -> Path:
        self._check_root()
        d = self._repo_dir(repo)
        if not (d / "refs.json").is_file():
            raise PackNotFoundError(f"no pack repository {repo} in the local registry {self.root}; check the name "
                                    f"or run `erasure list {repo.split('/')[0]} --registry {self.root}`")
        return d

    def _refs(self, repo_dir: Path) -> dict:
        refs = json.loads((repo_dir / "refs.json").read_text())
        refs.setdefault("branches", {})
        refs.setdefault("tags", {})
        return refs

    def _commit(self, repo_dir: Path, sha: str) -> dict:
        return json.loads((repo_dir / "commits" / f"{sha}.json").read_text())

    @contextlib.contextmanager
    def _locked(self, repo_dir: Path):
        import fcntl

        repo_dir.mkdir(parents=True, exist_ok=True)
        with open(repo_dir / ".lock", "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    # --- the Registry interface ---------------------------------------------------------------------------------

    def url(self, repo: str, sha: str) -> str:
        return (self.root / repo / "commits" / sha).as_uri()

    def resolve(self, repo: str, revision: str = "main") -> str:
        repo_dir = self._existing_repo(repo)
        refs = self._refs(repo_dir)
        if revision in refs["branches"]:
            return refs["branches"][revision]
        if revision in refs["tags"]:
            return refs["tags"][revision]
        if SHA_RE.match(revision) and (repo_dir / "commits" / f"{revision}.json").is_file():
            return revision
        known = sorted(refs["branches"]) + sorted(refs["tags"])
        raise RevisionNotFoundError(f"{repo} has no branch, tag or commit {revision!r} in {self.root} "
                                    f"(branches and tags: {', '.join(known) or 'none'})")

    def push(self, pack_dir: Path, repo: str, tag: str | None = None, private: bool = False) -> PushResult:
        """Validate, then commit the pack atomically; ``private`` has no meaning locally and is ignored."""
        check_repo_id(repo)
        if tag is not None:
            check_tag(tag)
        pack = ConceptPack.from_pretrained(pack_dir)  # refuse a bad pack before touching the registry
        pack_dir = Path(pack_dir)
        files = {name: sha256_file(pack_dir / name) for name in PACK_FILES}
        if self.root.exists() and not (self.root / MARKER).is_file() and any(self.root.iterdir()):
            self._check_root()
        self.root.mkdir(parents=True, exist_ok=True)
        if not (self.root / MARKER).is_file():
            _write_json(self.root / MARKER, FORMAT)
        repo_dir = self._repo_dir(repo)
        with self._locked(repo_dir):
            refs = self._refs(repo_dir) if (repo_dir / "refs.json").is_file() else {"branches": {}, "tags": {}}
            parent = refs["branches"].get("main")
            if tag is not None and tag in refs["tags"]:
                tagged = self._commit(repo_dir, refs["tags"][tag])["files"]
                if tagged != files:
                    raise PushError(f"tag {tag} of {repo} already names commit {refs['tags'][tag][:12]} with other "
                                    "content; tags are immutable, choose a new tag")
            if parent is not None and self._commit(repo_dir, parent)["files"] == files:
                sha = parent  # identical to the head: no new commit, like the Hub
            else:
                message = push_message(pack)
                sha = commit_sha(parent, files, message)
                self._write_commit(repo_dir, sha, parent, message, pack_dir, files)
                refs["branches"]["main"] = sha
            if tag is not None:
                refs["tags"].setdefault(tag, sha)
            _write_json(repo_dir / "refs.json", refs)  # the commit point
        return PushResult(repo=repo, commit_sha=sha, url=self.url(repo, sha), tag=tag)

    def _write_commit(self, repo_dir: Path, sha: str, parent: str | None, message: str, pack_dir: Path,
                      files: dict[str, str]) -> None:
        commits = repo_dir / "commits"
        commits.mkdir(parents=True, exist_ok=True)
        final = commits / sha
        if not final.is_dir():
            parent_files = self._commit(repo_dir, parent)["files"] if parent else {}
            tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=commits))
            try:
                for name in PACK_FILES:
                    if parent_files.get(name) == files[name]:
                        try:
                            os.link(commits / parent / name, tmp / name)
                            continue
                        except OSError:
                            pass
                    shutil.copyfile(pack_dir / name, tmp / name)
                    if sha256_file(tmp / name) != files[name]:
                        raise PushError(f"{pack_dir / name} changed while being pushed; push again")
                tmp.rename(final)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
        record = {"sha": sha, "parent": parent, "message": message, "files": files,
                  "created_at": dt.datetime.now(dt.timezone.utc).isoformat()}
        _write_json(commits / f"{sha}.json", record)

    def pull(self, repo: str, revision: str = "main", to: Path | None = None, base=None,
             expected_files: dict[str, str] | None = None) -> PulledPack:
        """Resolve, verify (see registry/verify.py) and copy to ``to``; without ``to`` the returned path is the
        commit directory inside the registry (read it, never write to it)."""
        sha = self.resolve(repo, revision)
        repo_dir = self._repo_dir(repo)
        snapshot = repo_dir / "commits" / sha
        record = self._commit(repo_dir, sha)
        where = f"the local registry {self.root}"
        present = [p.name for p in snapshot.iterdir()] if snapshot.is_dir() else []
        check_listing(repo, sha, set(present) | set(record["files"]), where)
        remote = {name: RemoteFile(size=None, sha256=digest) for name, digest in record["files"].items()}
        return finish_pull(repo, sha, snapshot, remote, where, to, base, expected_files)

    def read_manifest(self, repo: str, revision: str = "main") -> PublishedManifest:
        """The manifest of ``repo`` at ``revision``, checked against the commit record (no weights are read)."""
        sha = self.resolve(repo, revision)
        repo_dir = self._repo_dir(repo)
        digest = self._commit(repo_dir, sha)["files"].get(MANIFEST)
        return read_published_manifest(repo, sha, repo_dir / "commits" / sha / MANIFEST,
                                       RemoteFile(size=None, sha256=digest), f"the local registry {self.root}")

    def list(self, namespace: str) -> list[PackInfo]:
        check_namespace(namespace)
        self._check_root()
        ns_dir = self.root / namespace
        out = []
        for repo_dir in sorted(ns_dir.iterdir()) if ns_dir.is_dir() else []:
            if not (repo_dir / "refs.json").is_file():
                continue
            refs = self._refs(repo_dir)
            sha = refs["branches"].get("main")
            if sha is None:
                continue
            summary = manifest_summary(repo_dir / "commits" / sha / MANIFEST)
            tags = sorted(t for t, s in refs["tags"].items() if s == sha)
            out.append(PackInfo(repo=f"{namespace}/{repo_dir.name}", name=summary["name"],
                                concepts=summary["concepts"], method=summary["method"], base=summary["base"],
                                latest_sha=sha, latest_tag=tags[-1] if tags else None))
        return out

    def tags(self, repo: str) -> dict[str, str]:
        return dict(self._refs(self._existing_repo(repo))["tags"])

    def commits(self, repo: str) -> list[str]:
        """Commit shas of ``main``, newest first."""
        repo_dir = self._existing_repo(repo)
        sha, out = self._refs(repo_dir)["branches"].get("main"), []
        while sha:
            out.append(sha)
            sha = self._commit(repo_dir, sha)["parent"]
        return out
