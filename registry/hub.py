"""The Hugging Face Hub backend, through the real ``huggingface_hub`` client.

One model repository per pack, the pack's files at the repository root exactly as in the pack directory (plus the
``.gitattributes`` the Hub creates); versions are commits (40-hex sha) and tags.

- Endpoint: ``HubRegistry(endpoint=...)`` (the CLI's ``--endpoint``) overrides ``HF_ENDPOINT``, read when the
  registry is created (huggingface_hub itself reads it once at import); the endpoint is passed explicitly to every
  call. Token: ``token=`` or, by default, huggingface_hub's own lookup (``HF_TOKEN``, then the stored login).
- Push: the pack is validated (``ConceptPack.load``) before any network call; then ``create_repo(exist_ok=True)``
  and ONE ``create_commit`` holding every pack file (README.md, the model card, included) and deleting any stray
  file, with ``parent_commit`` = the head it was computed against; an optional tag follows. The Hub applies a commit
  atomically, so a failed push leaves no half-published pack. LFS content the Hub already has is not sent again.
- Pull: the revision is resolved to a commit sha first; the commit's tree is read (sizes, LFS sha256, git blob
  ids) and refused if it is not a pack; ``snapshot_download(revision=<sha>)`` fills the HF cache; every file is
  checked against the tree and the manifest (huggingface_hub only checks sizes) before anything reaches ``to``.
  With ``HF_HUB_OFFLINE=1`` a pinned sha (or a tag/branch pulled before) is served from the cache and checked
  against the tree listing the client cached and the manifest.
- Servers other than huggingface.co cannot take Xet uploads: set ``HF_HUB_DISABLE_XET=1`` for them.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from erasure.pack import MANIFEST, PACK_FILES, ConceptPack

from ._common import (GITATTRIBUTES, SHA_RE, RemoteFile, check_listing, check_namespace, check_repo_id, check_tag,
                      finish_pull, git_blob_sha1, manifest_summary)
from .base import (AccessDeniedError, PackInfo, PackNotFoundError, PulledPack, PushError, PushResult, RegistryError,
                   RevisionNotFoundError, VerificationError)

DEFAULT_ENDPOINT = "https://huggingface.co"
TAG = "concept-erasure"  # every pack's card carries it (erasure.card); `erasure list` filters on it


def _network_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = []
    for mod, names in (("httpx2", ("ConnectError", "TimeoutException", "NetworkError")),
                       ("httpx", ("ConnectError", "TimeoutException", "NetworkError")),
                       ("requests", ("ConnectionError", "Timeout"))):
        try:
            m = __import__(mod)
        except ImportError:
            continue
        errors += [getattr(m, n) for n in names if hasattr(m, n)]
    return tuple(errors)


def _offline() -> bool:
    from huggingface_hub import constants

    fn = getattr(constants, "is_offline_mode", None)
    return bool(fn() if fn else constants.HF_HUB_OFFLINE)


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

    def _storage(self, repo: str) -> Path:
        return self._cache_root() / ("models--" + repo.replace("/", "--"))

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
        except _network_errors() as exc:
            hint = "" if pushing else "; to use the cache, set HF_HUB_OFFLINE=1 and pin a commit sha"
            raise RegistryError(f"cannot reach {self.endpoint} ({type(exc).__name__}: {exc}); check --endpoint / "
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
        """REV (branch, tag or sha) -> 40-hex commit sha. Offline: a sha as is, else the ref cached by a pull."""
        return self._resolve(repo, revision)[0]

    def _resolve(self, repo: str, revision: str) -> tuple[str, bool]:
        """(sha, whether the endpoint answered)."""
        check_repo_id(repo)
        if _offline():
            if SHA_RE.match(revision):
                return revision, False
            ref = self._storage(repo) / "refs" / revision
            if ref.is_file():
                return ref.read_text().strip(), False
            raise RevisionNotFoundError(f"HF_HUB_OFFLINE=1 and {repo}@{revision} was never pulled into "
                                        f"{self._cache_root()}; pin a commit sha (packs.lock) or pull once online")
        with self._errors(repo, revision):
            try:
                info = self.api.model_info(repo, revision=revision)
            except _network_errors():
                if SHA_RE.match(revision):
                    return revision, False  # a pinned sha: the cache may serve it (checked by pull)
                raise
        if not info.sha or not SHA_RE.match(info.sha):
            raise RegistryError(f"{self.endpoint} gave no commit sha for {repo}@{revision}")
        return info.sha, True

    def _remote_files(self, repo: str, sha: str, online: bool = True) -> dict[str, RemoteFile] | None:
        """The commit's tree: sizes, LFS sha256 and git blob ids. A commit's tree never changes, so the listing
        huggingface_hub cached when it downloaded this commit (<cache>/trees/<sha>.json) is used when present;
        otherwise it is asked for. None when neither is available (offline, never downloaded): then the manifest
        and a lock's hashes are what the files are checked against."""
        from huggingface_hub.hf_api import RepoFile

        try:
            from huggingface_hub._tree_cache import read_tree_cache
        except ImportError:  # older clients keep no tree cache
            read_tree_cache = None
        cached = read_tree_cache(str(self._storage(repo)), sha) if read_tree_cache is not None else None
        if cached is not None:
            return {path: RemoteFile(size=e.lfs_size if e.lfs_sha256 else e.size, sha256=e.lfs_sha256,
                                     git_oid=None if e.lfs_sha256 else e.blob_id) for path, e in cached.items()}
        if not online or _offline():
            return None
        with self._errors(repo, sha):
            entries = [f for f in self.api.list_repo_tree(repo, revision=sha, recursive=True)
                       if isinstance(f, RepoFile)]
        return {f.path: RemoteFile(size=f.size, sha256=f.lfs.sha256 if f.lfs else None,
                                   git_oid=None if f.lfs else f.blob_id) for f in entries}

    def pull(self, repo: str, revision: str = "main", to: Path | None = None, base_unet=None,
             expected_files: dict[str, str] | None = None) -> PulledPack:
        from huggingface_hub import snapshot_download

        sha, reachable = self._resolve(repo, revision)
        remote = self._remote_files(repo, sha, online=reachable)
        where = self.endpoint
        if remote is not None:
            check_listing(repo, sha, remote, where)
        with self._errors(repo, revision):
            snapshot = Path(snapshot_download(repo, revision=sha, allow_patterns=list(PACK_FILES),
                                              cache_dir=self.cache_dir, endpoint=self.endpoint, token=self.token))
        if remote is None:
            remote = self._remote_files(repo, sha, online=False)  # written by snapshot_download if it went online
        if revision != sha:
            self._cache_ref(repo, revision, sha)
        try:
            return finish_pull(repo, sha, snapshot, remote, where, to, base_unet, expected_files)
        except VerificationError:
            self._evict(snapshot, remote)  # a refused file must not be served from the cache next time
            raise

    def _cache_ref(self, repo: str, revision: str, sha: str) -> None:
        """Record REV -> sha in the HF cache layout (refs/<rev>) so an offline pull by tag finds it."""
        ref = self._storage(repo) / "refs" / revision
        try:
            ref.parent.mkdir(parents=True, exist_ok=True)
            if not ref.is_file() or ref.read_text() != sha:
                tmp = ref.with_name(f".{ref.name}.{os.getpid()}.tmp")
                tmp.write_text(sha)
                os.replace(tmp, ref)
        except OSError:
            pass

    def _evict(self, snapshot: Path, remote: dict[str, RemoteFile] | None) -> None:
        """Drop every cached file of the snapshot that does not match the registry's record."""
        for name in PACK_FILES:
            path = snapshot / name
            if not path.exists():
                continue
            info = (remote or {}).get(name)
            ok = info is not None and (
                (info.sha256 is not None and _sha256(path) == info.sha256)
                or (info.git_oid is not None and git_blob_sha1(path) == info.git_oid))
            if not ok:
                blob = path.resolve()
                with contextlib.suppress(OSError):
                    path.unlink()
                if blob != path and blob.parent.name == "blobs":
                    with contextlib.suppress(OSError):
                        blob.unlink()

    def push(self, pack_dir: Path, repo: str, tag: str | None = None, private: bool = False) -> PushResult:
        from huggingface_hub import CommitOperationAdd, CommitOperationDelete
        from huggingface_hub.hf_api import RepoFile

        check_repo_id(repo)
        if tag is not None:
            check_tag(tag)
        pack_dir = Path(pack_dir)
        pack = ConceptPack.load(pack_dir)  # a bad pack is refused before any network call
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
            m = pack.manifest
            message = f"erasure push {m.name}: {', '.join(m.concepts)} ({m.method}) on {m.base.id}"
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
        remote = self._remote_files(repo, sha) or {}
        for name in PACK_FILES:
            info = remote.get(name)
            if info is None:
                return False
            if info.sha256 is not None and info.sha256 != _sha256(pack_dir / name):
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

    def list(self, namespace: str) -> list[PackInfo]:
        from huggingface_hub import hf_hub_download

        check_namespace(namespace)
        api = self.api
        out = []
        with self._errors(namespace + "/*", None):
            models = list(api.list_models(author=namespace, filter=TAG))
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


def _sha256(path: Path) -> str:
    from erasure.pack import sha256_file

    return sha256_file(path)

