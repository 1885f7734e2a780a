"""The Hugging Face Hub backend, through the real ``huggingface_hub`` client.

One model repository per pack, the pack's files at the repository root exactly as in the pack directory (plus the
``.gitattributes`` the Hub creates); versions are commits (40-hex sha) and tags.

- Endpoint: ``HubRegistry(endpoint=...)`` (the CLI's ``--endpoint``) overrides ``HF_ENDPOINT``, read when the
  registry is created (huggingface_hub itself reads it once at import); the endpoint is passed explicitly to every
  call. Token: ``token=`` or, by default, huggingface_hub's own lookup (``HF_TOKEN``, then the stored login).
- Push: the pack is validated (``ConceptPack.from_pretrained``) before any network call; then ``create_repo(exist_ok=True)``
  and ONE ``create_commit`` holding every pack file (README.md, the model card, included) and deleting any stray
  file, with ``parent_commit`` = the head it was computed against; an optional tag follows. The Hub applies a commit
  atomically, so a failed push leaves no half-published pack. LFS content the Hub already has is not sent again.
- Pull: the revision is resolved to a commit sha first; the commit's tree is read (sizes, LFS sha256, git blob
  ids) and refused if it is not a pack; ``snapshot_download`` fills the HF cache and must land on that sha (a
  revision that moved meanwhile is refused); every file is checked against the tree and the manifest
  (huggingface_hub only checks sizes) before anything reaches ``to``. A refused revision is deleted from the cache
  (``scan_cache_dir().delete_revisions``). With ``HF_HUB_OFFLINE=1`` (or an unreachable endpoint and a pinned sha)
  the cache serves the revision, checked against the manifest and the lock's hashes.
- Only huggingface_hub's public API is used (HfApi, snapshot_download, hf_hub_download, scan_cache_dir,
  huggingface_hub.errors); the tested major version is pinned in pyproject.toml.
- Servers other than huggingface.co cannot take Xet uploads: set ``HF_HUB_DISABLE_XET=1`` for them.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from erasure.files import sha256_file
from erasure.pack.card import PACK_TAG
from erasure.pack.concept_pack import ConceptPack
from erasure.pack.manifest import MANIFEST, PACK_FILES

from .errors import (
    AccessDeniedError,
    PackNotFoundError,
    PushError,
    RegistryError,
    RevisionNotFoundError,
    VerificationError,
)
from .refs import SHA_RE, check_namespace, check_repo_id, check_tag
from .types import PackInfo, PublishedManifest, PulledPack, PushResult
from .verify import (
    GITATTRIBUTES,
    RemoteFile,
    check_listing,
    finish_pull,
    git_blob_sha1,
    manifest_summary,
    push_message,
    read_published_manifest,
)

DEFAULT_ENDPOINT = "https://huggingface.co"


class _Unreachable(RegistryError):
    """The endpoint could not be reached (no HTTP answer at all)."""


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.is_offline_mode())


def _server_message(exc) -> str:
    resp = getattr(exc, "response", None)
    msg = getattr(exc, "server_message", None) or ""
    if not msg and resp is not None:
        msg = resp.headers.get("X-Error-Message", "")
    return msg.strip().splitlines()[0] if msg.strip() else ""


def _status(exc) -> int | None:
    resp = getattr(exc, "response", None)
    return getattr(resp, "status_code", None)


class HubRegistry:
    def __init__(self, endpoint: str | None = None, token: str | bool | None = None,
                 cache_dir: str | os.PathLike | None = None):
        self.endpoint = (endpoint or os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")
        self.token = token
        self.cache_dir = str(cache_dir) if cache_dir is not None else None
        self.source = self.endpoint

    def __repr__(self) -> str:
        return f"HubRegistry({self.endpoint!r})"

    @property
    def api(self):
        from huggingface_hub import HfApi

        from erasure import __version__

        return HfApi(endpoint=self.endpoint, token=self.token, library_name="erasure", library_version=__version__)

    def url(self, repo: str, sha: str) -> str:
        return f"{self.endpoint}/{repo}/tree/{sha}"

    def _cache_root(self) -> Path:
        from huggingface_hub import constants

        return Path(self.cache_dir or constants.HF_HUB_CACHE).expanduser()

    # --- errors -------------------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _errors(self, repo: str, revision: str | None = None, pushing: bool = False):
        """Map huggingface_hub's exceptions to registry errors that say what to fix."""
        from huggingface_hub import errors as hf

        ns = repo.split("/")[0]
        try:
            yield
        except hf.RevisionNotFoundError:
            raise RevisionNotFoundError(f"{repo} has no branch, tag or commit {revision!r} at {self.endpoint}"
                                        f"{self._known_refs(repo)}") from None
        except hf.RepositoryNotFoundError:
            raise PackNotFoundError(f"no pack repository {repo} at {self.endpoint}; check the name or run "
                                    f"`erasure list {ns} --endpoint {self.endpoint}`"
                                    + ("" if self.token or os.environ.get("HF_TOKEN") else
                                       " (a private repository needs HF_TOKEN)")) from None
        except hf.OfflineModeIsEnabled:
            raise RegistryError(f"HF_HUB_OFFLINE=1 and {repo}@{revision} is not in the cache "
                                f"{self._cache_root()}; pull it once online, or pin a cached commit sha") from None
        except hf.LocalEntryNotFoundError as exc:
            raise RegistryError(f"{repo}@{revision} is neither reachable at {self.endpoint} nor in the cache "
                                f"{self._cache_root()}: {str(exc).splitlines()[0]}") from None
        except getattr(hf, "RemoteEntryNotFoundError", hf.EntryNotFoundError) as exc:
            raise RegistryError(f"{repo}@{revision} at {self.endpoint} lacks a file ({_server_message(exc) or exc}); "
                                "it is not a concept pack") from None
        except hf.HfHubHTTPError as exc:
            status, msg = _status(exc), _server_message(exc)
            detail = f" ({msg})" if msg else ""
            if status in (401, 403):
                who = "with the given token" if (self.token or os.environ.get("HF_TOKEN")) else "without a token"
                text = (f"{self.endpoint} refused {'the push to' if pushing else 'access to'} {repo} {who} "
                        f"(HTTP {status}{detail}); set HF_TOKEN to a token with "
                        f"{'write' if pushing else 'read'} access to {ns}")
                raise (AccessDeniedError if pushing else RegistryError)(text) from None
            if pushing:
                raise PushError(f"push to {repo} at {self.endpoint} failed: HTTP {status}{detail}") from None
            raise RegistryError(f"{self.endpoint} answered HTTP {status} for {repo}{detail}") from None
        except hf.HTTPError as exc:  # no HTTP answer: refused connection, timeout, DNS (HfHubHTTPError is above)
            hint = "" if pushing else "; to use the cache, set HF_HUB_OFFLINE=1 and pin a commit sha"
            raise _Unreachable(f"cannot reach {self.endpoint} ({type(exc).__name__}: {exc}); check --endpoint / "
                               f"HF_ENDPOINT{hint}") from None

    def _known_refs(self, repo: str) -> str:
        try:
            refs = self.api.list_repo_refs(repo)
        except Exception:  # only decorates an error message
            return ""
        names = [b.name for b in refs.branches] + [t.name for t in refs.tags]
        return f" (branches and tags: {', '.join(names)})" if names else ""

    # --- the Registry interface ---------------------------------------------------------------------------------

    def resolve(self, repo: str, revision: str = "main") -> str:
        """REV (branch, tag or sha) -> 40-hex commit sha. Offline: what the HF cache holds for REV."""
        check_repo_id(repo)
        if _offline():
            return self._cached_snapshot(repo, revision).name
        with self._errors(repo, revision):
            info = self.api.model_info(repo, revision=revision)
        if not info.sha or not SHA_RE.match(info.sha):
            raise RegistryError(f"{self.endpoint} gave no commit sha for {repo}@{revision}")
        return info.sha

    def _snapshot(self, repo: str, revision: str, cached_only: bool = False) -> Path:
        from huggingface_hub import snapshot_download

        with self._errors(repo, revision):
            return Path(snapshot_download(repo, revision=revision, allow_patterns=list(PACK_FILES),
                                          cache_dir=self.cache_dir, endpoint=self.endpoint, token=self.token,
                                          local_files_only=cached_only))

    def _cached_snapshot(self, repo: str, revision: str, unreachable: bool = False) -> Path:
        try:
            return self._snapshot(repo, revision, cached_only=True)
        except RegistryError:
            why = "cannot be reached" if unreachable else "is not used (offline)"
            raise RevisionNotFoundError(f"{repo}@{revision} is not in the cache {self._cache_root()} and "
                                        f"{self.endpoint} {why}; pull it once online, or pin the commit sha of a "
                                        "cached pull (packs.lock)") from None

    def _remote_files(self, repo: str, sha: str) -> dict[str, RemoteFile]:
        """The commit's tree: sizes, LFS sha256 and git blob ids."""
        from huggingface_hub.hf_api import RepoFile

        with self._errors(repo, sha):
            entries = [f for f in self.api.list_repo_tree(repo, revision=sha, recursive=True)
                       if isinstance(f, RepoFile)]
        return {f.path: RemoteFile(size=f.size, sha256=f.lfs.sha256 if f.lfs else None,
                                   git_oid=None if f.lfs else f.blob_id) for f in entries}

    def pull(self, repo: str, revision: str = "main", to: Path | None = None, base=None,
             expected_files: dict[str, str] | None = None) -> PulledPack:
        check_repo_id(repo)
        where, remote, unreachable = self.endpoint, None, False
        try:
            sha = None if _offline() else self.resolve(repo, revision)
        except _Unreachable:
            if not SHA_RE.match(revision):
                raise
            sha, unreachable = None, True  # a pinned commit: the cache may serve it, checked as any pull
        if sha is not None:
            remote = self._remote_files(repo, sha)
            check_listing(repo, sha, remote, where)
            snapshot = self._snapshot(repo, revision)
            if snapshot.name != sha:
                raise VerificationError(f"{repo}@{revision} moved from {sha[:12]} to {snapshot.name[:12]} while "
                                        "being pulled; refused, pull again")
        else:
            snapshot = self._cached_snapshot(repo, revision, unreachable)
            where = f"the HF cache {self._cache_root()}"
        try:
            return finish_pull(repo, snapshot.name, snapshot, remote, where, to, base, expected_files)
        except VerificationError:
            self._evict(snapshot.name)  # a refused file must not be served from the cache next time
            raise

    def read_manifest(self, repo: str, revision: str = "main") -> PublishedManifest:
        """The manifest of ``repo`` at ``revision`` (one small download, checked against the commit's tree; no
        weights). Offline: from the HF cache."""
        from huggingface_hub import hf_hub_download
        from huggingface_hub.hf_api import RepoFile

        check_repo_id(repo)
        if _offline():
            snapshot = self._cached_snapshot(repo, revision)
            return read_published_manifest(repo, snapshot.name, snapshot / MANIFEST, None,
                                           f"the HF cache {self._cache_root()}")
        sha = self.resolve(repo, revision)
        with self._errors(repo, sha):
            infos = [f for f in self.api.get_paths_info(repo, [MANIFEST], revision=sha) if isinstance(f, RepoFile)]
            if not infos:
                raise VerificationError(f"{repo}@{sha[:12]} at {self.endpoint} has no {MANIFEST}; it is not a "
                                        "concept pack")
            path = Path(hf_hub_download(repo, MANIFEST, revision=sha, endpoint=self.endpoint,
                                        cache_dir=self.cache_dir, token=self.token))
        info = infos[0]
        remote = RemoteFile(size=info.size, sha256=info.lfs.sha256 if info.lfs else None,
                            git_oid=None if info.lfs else info.blob_id)
        return read_published_manifest(repo, sha, path, remote, self.endpoint)

    def _evict(self, sha: str) -> None:
        from huggingface_hub import scan_cache_dir

        with contextlib.suppress(Exception):  # eviction is best effort; the refusal itself is what matters
            scan_cache_dir(self._cache_root()).delete_revisions(sha).execute()

    def push(self, pack_dir: Path, repo: str, tag: str | None = None, private: bool = False) -> PushResult:
        from huggingface_hub import CommitOperationAdd, CommitOperationDelete
        from huggingface_hub.hf_api import RepoFile

        check_repo_id(repo)
        if tag is not None:
            check_tag(tag)
        pack_dir = Path(pack_dir)
        pack = ConceptPack.from_pretrained(pack_dir)  # a bad pack is refused before any network call
        api = self.api
        with self._errors(repo, "main", pushing=True):
            api.create_repo(repo, private=private, exist_ok=True)
            refs = api.list_repo_refs(repo)
            head = next((b.target_commit for b in refs.branches if b.name == "main"), None)
            tagged = next((t.target_commit for t in refs.tags if t.name == tag), None) if tag else None
            if tagged is not None and not self._same_content(repo, tagged, pack_dir):
                raise PushError(f"tag {tag} of {repo} already names commit {tagged[:12]} with other content; tags "
                                "are immutable, choose a new tag")
            stray = []
            if head is not None:
                stray = [f.path for f in api.list_repo_tree(repo, revision=head, recursive=True)
                         if isinstance(f, RepoFile) and f.path not in PACK_FILES and f.path != GITATTRIBUTES]
            ops = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(pack_dir / name)) for name in PACK_FILES]
            ops += [CommitOperationDelete(path_in_repo=p) for p in stray]
            message = push_message(pack)
        try:
            with self._errors(repo, "main", pushing=True):
                info = api.create_commit(repo, ops, commit_message=message, parent_commit=head)
        except PushError as exc:
            raise type(exc)(f"{exc}; {self._after_failed_commit(repo, head)}") from None
        except Exception as exc:  # e.g. an LFS upload that failed mid-way
            hint = ""
            if self.endpoint != DEFAULT_ENDPOINT and "xet" in f"{exc!r}{exc.__cause__!r}".lower():
                hint = "; this endpoint is not huggingface.co: set HF_HUB_DISABLE_XET=1"
            raise PushError(f"push to {repo} at {self.endpoint} failed: {type(exc).__name__}: "
                            f"{str(exc).splitlines()[0] if str(exc) else ''}{hint}; "
                            f"{self._after_failed_commit(repo, head)}") from None
        sha = info.oid
        if tag is not None and tagged is None:
            with self._errors(repo, sha, pushing=True):
                api.create_tag(repo, tag=tag, revision=sha)
        return PushResult(repo=repo, commit_sha=sha, url=self.url(repo, sha), tag=tag)

    def _same_content(self, repo: str, sha: str, pack_dir: Path) -> bool:
        remote = self._remote_files(repo, sha)
        for name in PACK_FILES:
            info = remote.get(name)
            if info is None:
                return False
            if info.sha256 is not None and info.sha256 != sha256_file(pack_dir / name):
                return False
            if info.git_oid is not None and info.git_oid != git_blob_sha1(pack_dir / name):
                return False
        return True

    def _after_failed_commit(self, repo: str, head: str | None) -> str:
        try:
            now = next((b.target_commit for b in self.api.list_repo_refs(repo).branches if b.name == "main"), None)
        except Exception:
            return "the repository state is unknown (unreachable); check it before retrying"
        if now == head:
            return "the repository shows no new commit; retry the push"
        return f"main moved to {now[:12] if now else None} meanwhile; check it before retrying"

    def tags(self, repo: str) -> dict[str, str]:
        """Tag -> commit sha of every tag of ``repo``."""
        check_repo_id(repo)
        with self._errors(repo, None):
            return {t.name: t.target_commit for t in self.api.list_repo_refs(repo).tags}

    def list(self, namespace: str) -> list[PackInfo]:
        from huggingface_hub import hf_hub_download

        check_namespace(namespace)
        api = self.api
        out = []
        with self._errors(namespace + "/*", None):
            models = list(api.list_models(author=namespace, filter=PACK_TAG))
        for model in sorted(models, key=lambda m: m.id):
            with self._errors(model.id, "main"):
                sha = api.model_info(model.id).sha
                tags = sorted(t.name for t in api.list_repo_refs(model.id).tags if t.target_commit == sha)
            try:
                with self._errors(model.id, sha):
                    path = Path(hf_hub_download(model.id, MANIFEST, revision=sha, endpoint=self.endpoint,
                                                cache_dir=self.cache_dir, token=self.token))
            except RegistryError:  # tagged as a pack but without a manifest: listed with '?'
                path = Path(os.devnull)
            s = manifest_summary(path)
            out.append(PackInfo(repo=model.id, name=s["name"], concepts=s["concepts"], method=s["method"],
                                base=s["base"], latest_sha=sha, latest_tag=tags[-1] if tags else None))
        return out
