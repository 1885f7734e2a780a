"""A small, protocol-faithful Hugging Face Hub for tests: starlette + uvicorn in a thread on 127.0.0.1.

It implements what huggingface_hub (2.x, with HF_HUB_DISABLE_XET=1) calls for create_repo, create_commit /
upload_folder, create_tag, model_info / repo_info, list_repo_refs, list_repo_tree, get_paths_info,
list_repo_commits, list_models, hf_hub_download and snapshot_download:

    POST /api/repos/create                                 (409 if it exists; an initial .gitattributes commit)
    POST /api/validate-yaml
    GET  /api/models?author=&filter=&search=               (tags derived from the README.md front matter)
    GET  /api/models/{ns}/{name}[/revision/{rev}]          (sha, siblings, tags, cardData)
    GET  /api/models/{ns}/{name}/refs
    GET  /api/models/{ns}/{name}/tree/{rev}[/{path}]       (oid = git blob sha1, lfs {oid, size, pointerSize})
    POST /api/models/{ns}/{name}/paths-info/{rev}
    GET  /api/models/{ns}/{name}/commits/{rev}
    POST /api/models/{ns}/{name}/preupload/{rev}           (uploadMode lfs|regular, remote oid for dedup)
    POST /{ns}/{name}.git/info/lfs/objects/batch           (no actions for objects already stored)
    PUT  /lfs-upload/{oid}                                 (the "presigned" upload: sha256 checked, bytes counted)
    POST /{ns}/{name}.git/info/lfs/objects/verify
    POST /api/models/{ns}/{name}/commit/{rev}              (NDJSON header/file/lfsFile/deletedFile/deletedFolder;
                                                            atomic; 412 if parentCommit is not the head)
    POST /api/models/{ns}/{name}/tag/{rev}, DELETE /api/models/{ns}/{name}/tag/{tag}
    HEAD/GET /{ns}/{name}/resolve/{rev}/{path}             (X-Repo-Commit, ETag; LFS: 302 to a "CDN" origin with
                                                            X-Linked-Etag / X-Linked-Size; Range)

Errors carry the headers the client maps to its exception classes: 404 + X-Error-Code RepoNotFound /
RevisionNotFound / EntryNotFound, X-Error-Message, JSON {"error": ...}. Writes need ``Authorization: Bearer
<token>`` when the server has a token (401 without one, 401 "Invalid credentials in Authorization header" for an
unknown one, 403 for a read-only token); private repositories are invisible (404 RepoNotFound) without a token.

Test hooks: ``fail_next_commit(status)``, ``before_next_commit(fn)`` / ``commit_directly`` (a concurrent writer),
``tamper(repo, path)`` (same size, in place), ``lfs_bytes_received``, ``lfs_puts``,
``requests`` (method, path) log, ``stop()`` / ``start()`` (same port).
"""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import fnmatch
import hashlib
import json
import re
import socket
import threading
import time
from urllib.parse import unquote

import yaml

LFS_PATTERNS = ("*.7z", "*.arrow", "*.bin", "*.bz2", "*.ckpt", "*.ftz", "*.gz", "*.h5", "*.joblib", "*.lfs.*",
                "*.mlmodel", "*.model", "*.msgpack", "*.npy", "*.npz", "*.onnx", "*.ot", "*.parquet", "*.pb",
                "*.pickle", "*.pkl", "*.pt", "*.pth", "*.rar", "*.safetensors", "*.tar.*", "*.tar", "*.tflite",
                "*.tgz", "*.wasm", "*.xz", "*.zip", "*.zst", "*tfevents*")
GITATTRIBUTES = "".join(f"{p} filter=lfs diff=lfs merge=lfs -text\n" for p in LFS_PATTERNS)
LFS_THRESHOLD = 10 * 1024 * 1024


def git_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(oid: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{oid}\nsize {size}\n".encode()


def now_iso() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


@dataclasses.dataclass
class Entry:
    size: int
    oid: str  # git blob sha1 (of the content, or of the LFS pointer)
    lfs: str | None = None  # sha256 of the content for LFS files
    content: bytes | None = None  # regular files only


@dataclasses.dataclass
class Commit:
    sha: str
    parent: str | None
    title: str
    message: str
    date: str
    files: dict[str, Entry]


@dataclasses.dataclass
class Repo:
    id: str
    private: bool
    created: str
    branches: dict[str, str] = dataclasses.field(default_factory=dict)
    tags: dict[str, str] = dataclasses.field(default_factory=dict)
    commits: dict[str, Commit] = dataclasses.field(default_factory=dict)


class HubError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, headers: dict | None = None,
                 body: dict | None = None):
        self.status, self.message, self.code, self.headers = status, message, code, headers or {}
        self.body = body or {}


class FakeHub:
    def __init__(self, token: str | None = None, read_only_tokens: tuple[str, ...] = (), cdn_host: str = "localhost"):
        self.token = token
        self.read_only_tokens = set(read_only_tokens)
        self.cdn_host = cdn_host
        self.repos: dict[str, Repo] = {}
        self.lfs: dict[str, bytearray] = {}  # sha256 -> content
        self.lfs_bytes_received = 0
        self.lfs_puts = 0
        self.requests: list[tuple[str, str]] = []
        self._fail_commits: list[int] = []
        self._before_commit: list = []
        self._lock = threading.RLock()
        self._counter = 0
        self._server = None
        self._thread = None
        self.port: int | None = None

    # --- lifecycle ------------------------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "FakeHub":
        import uvicorn
        from starlette.applications import Starlette
        from starlette.routing import Route

        methods = ["GET", "HEAD", "POST", "PUT", "DELETE"]
        app = Starlette(routes=[Route("/{rest:path}", self._asgi_endpoint, methods=methods)])
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", self.port or 0))
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(app, log_level="error", lifespan="off", access_log=False)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [sock]}, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("fake Hub did not start")
            time.sleep(0.01)
        self._sock = sock
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
            self._thread.join(timeout=10)
            self._sock.close()
            self._server = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    # --- test hooks -----------------------------------------------------------------------------------------------

    def fail_next_commit(self, status: int = 500, times: int = 1) -> None:
        self._fail_commits += [status] * times

    def before_next_commit(self, fn) -> None:
        """Run ``fn(hub, repo_id)`` when the next commit request arrives, before it is applied (a concurrent push)."""
        self._before_commit.append(fn)

    def commit_directly(self, repo: str, path: str, data: bytes, branch: str = "main") -> str:
        """Another client's commit, applied server-side: adds one regular file."""
        with self._lock:
            r = self.repos[repo]
            head = r.branches[branch]
            files = {**r.commits[head].files, path: Entry(size=len(data), oid=git_oid(data), content=data)}
            return self._add_commit(r, branch, head, f"Upload {path}", "", files).sha

    def tamper(self, repo: str, path: str, revision: str = "main") -> None:
        """Flip bytes of a stored file in place, keeping its size (and the oids the tree reports)."""
        with self._lock:
            r = self.repos[repo]
            entry = r.commits[self._resolve(r, revision)].files[path]
            if entry.lfs is not None:
                blob = self.lfs[entry.lfs]
                mid = len(blob) // 2
                blob[mid:mid + 4] = bytes(b ^ 0xFF for b in blob[mid:mid + 4])
            else:
                content = bytearray(entry.content)
                content[-2] = ord("X") if content[-2] != ord("X") else ord("Y")
                entry.content = bytes(content)

    def head(self, repo: str, branch: str = "main") -> str:
        return self.repos[repo].branches[branch]

    def history(self, repo: str, branch: str = "main") -> list[str]:
        r, sha, out = self.repos[repo], self.repos[repo].branches[branch], []
        while sha:
            out.append(sha)
            sha = r.commits[sha].parent
        return out

    # --- plumbing -------------------------------------------------------------------------------------------------

    async def _asgi_endpoint(self, request):
        from starlette.responses import JSONResponse, Response

        raw = request.scope.get("raw_path") or request.url.path.encode()
        path = raw.decode("latin-1").split("?", 1)[0]
        segments = [unquote(s) for s in path.strip("/").split("/")] if path.strip("/") else []
        body = await request.body() if request.method in ("POST", "PUT") else b""
        with self._lock:
            self.requests.append((request.method, unquote(path)))
            try:
                result = self._dispatch(request, segments, body)
            except HubError as e:
                headers = {"X-Error-Message": e.message, **e.headers}
                if e.code:
                    headers["X-Error-Code"] = e.code
                if request.method == "HEAD":
                    return Response(status_code=e.status, headers=headers)
                return JSONResponse({"error": e.message, **e.body}, status_code=e.status, headers=headers)
        if isinstance(result, Response):
            return result
        return JSONResponse(result)

    def _auth(self, request) -> str | None:
        value = request.headers.get("authorization", "")
        return value[7:].strip() if value.lower().startswith("bearer ") else None

    def _check_write(self, request) -> None:
        if self.token is None:
            return
        token = self._auth(request)
        if token is None:
            raise HubError(401, "You must be authenticated to write to this repository")
        if token in self.read_only_tokens:
            raise HubError(403, "You don't have the rights to write to this repository (read-only token)")
        if token != self.token:
            raise HubError(401, "Invalid credentials in Authorization header")

    def _can_read(self, request, repo: Repo) -> bool:
        if not repo.private or self.token is None:
            return True
        token = self._auth(request)
        return token == self.token or token in self.read_only_tokens

    def _repo(self, request, repo_id: str) -> Repo:
        repo = self.repos.get(repo_id)
        if repo is None or not self._can_read(request, repo):
            raise HubError(404, "Repository not found", "RepoNotFound")
        return repo

    def _resolve(self, repo: Repo, rev: str) -> str:
        if rev in repo.branches:
            return repo.branches[rev]
        if rev in repo.tags:
            return repo.tags[rev]
        if re.fullmatch(r"[0-9a-f]{40}", rev) and rev in repo.commits:
            return rev
        raise HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")

    def _new_sha(self, *parts: str) -> str:
        self._counter += 1
        return hashlib.sha1("\0".join([*parts, str(self._counter), str(time.time_ns())]).encode()).hexdigest()

    def _add_commit(self, repo: Repo, branch: str, parent: str | None, title: str, message: str,
                    files: dict[str, Entry]) -> Commit:
        sha = self._new_sha(repo.id, parent or "", title, *sorted(f"{p}:{e.oid}" for p, e in files.items()))
        commit = Commit(sha=sha, parent=parent, title=title, message=message, date=now_iso(), files=files)
        repo.commits[sha] = commit
        repo.branches[branch] = sha
        return commit

    def _card(self, repo: Repo, sha: str) -> dict:
        entry = repo.commits[sha].files.get("README.md")
        if entry is None or entry.content is None:
            return {}
        text = entry.content.decode("utf-8", "replace")
        m = re.match(r"^---\s*\n(.*?)\n---\s*\n", text, re.S)
        try:
            data = yaml.safe_load(m.group(1)) if m else {}
        except yaml.YAMLError:
            return {}
        return data if isinstance(data, dict) else {}

    def _model_tags(self, repo: Repo, sha: str) -> list[str]:
        card = self._card(repo, sha)
        tags = [str(t) for t in card.get("tags") or []]
        if card.get("library_name"):
            tags.append(str(card["library_name"]))
        bases = card.get("base_model") or []
        for b in [bases] if isinstance(bases, str) else bases:
            tags.append(f"base_model:{b}")
        if card.get("license"):
            tags.append(f"license:{card['license']}")
        return list(dict.fromkeys(tags + ["region:us"]))

    def _model_json(self, repo: Repo, sha: str) -> dict:
        commit = repo.commits[sha]
        return {
            "_id": hashlib.md5(repo.id.encode()).hexdigest()[:24], "id": repo.id, "modelId": repo.id,
            "author": repo.id.split("/")[0], "sha": sha, "private": repo.private, "disabled": False, "gated": False,
            "downloads": 0, "likes": 0, "tags": self._model_tags(repo, sha),
            "library_name": self._card(repo, sha).get("library_name"),
            "createdAt": repo.created, "lastModified": commit.date, "cardData": self._card(repo, sha) or None,
            "siblings": [{"rfilename": p} for p in sorted(commit.files)],
        }

    def _tree_item(self, path: str, e: Entry) -> dict:
        item = {"type": "file", "oid": e.oid, "size": e.size, "path": path}
        if e.lfs is not None:
            item["lfs"] = {"oid": e.lfs, "size": e.size, "pointerSize": len(lfs_pointer(e.lfs, e.size))}
        return item

    # --- routing --------------------------------------------------------------------------------------------------

    def _dispatch(self, request, s: list[str], body: bytes):
        m = request.method
        if s[:1] == ["api"]:
            if s == ["api", "repos", "create"] and m == "POST":
                return self._create_repo(request, json.loads(body or b"{}"))
            if s == ["api", "validate-yaml"] and m == "POST":
                return self._validate_yaml(json.loads(body or b"{}"))
            if s == ["api", "models"] and m == "GET":
                return self._list_models(request)
            if len(s) >= 4 and s[1] == "models":
                repo_id, rest = f"{s[2]}/{s[3]}", s[4:]
                if not rest and m == "GET":
                    repo = self._repo(request, repo_id)
                    return self._model_json(repo, self._resolve(repo, "main"))
                if rest[:1] == ["revision"] and len(rest) == 2 and m == "GET":
                    repo = self._repo(request, repo_id)
                    return self._model_json(repo, self._resolve(repo, rest[1]))
                if rest == ["refs"] and m == "GET":
                    return self._refs(self._repo(request, repo_id))
                if rest[:1] == ["tree"] and len(rest) >= 2 and m == "GET":
                    return self._tree(request, self._repo(request, repo_id), rest[1], "/".join(rest[2:]))
                if rest[:1] == ["paths-info"] and len(rest) == 2 and m == "POST":
                    return self._paths_info(request, self._repo(request, repo_id), rest[1], body)
                if rest[:1] == ["commits"] and len(rest) == 2 and m == "GET":
                    return self._commits(self._repo(request, repo_id), rest[1])
                if rest[:1] == ["preupload"] and len(rest) == 2 and m == "POST":
                    self._check_write(request)
                    return self._preupload(self._repo(request, repo_id), rest[1], json.loads(body))
                if rest[:1] == ["commit"] and len(rest) == 2 and m == "POST":
                    self._check_write(request)
                    return self._commit(request, self._repo(request, repo_id), rest[1], body)
                if rest[:1] == ["tag"] and len(rest) == 2 and m == "POST":
                    self._check_write(request)
                    return self._create_tag(self._repo(request, repo_id), rest[1], json.loads(body))
                if rest[:1] == ["tag"] and len(rest) == 2 and m == "DELETE":
                    self._check_write(request)
                    repo = self._repo(request, repo_id)
                    if repo.tags.pop(rest[1], None) is None:
                        raise HubError(404, f"Invalid rev id: {rest[1]}", "RevisionNotFound")
                    return {}
            raise HubError(404, f"Not found: {'/'.join(s)}")
        if s[:1] == ["lfs-upload"] and len(s) == 2 and m == "PUT":
            return self._lfs_put(s[1], body)
        if s[:1] == ["lfs-files"] and len(s) == 2 and m in ("GET", "HEAD"):
            return self._lfs_get(request, s[1])
        if len(s) >= 5 and s[1].endswith(".git") and s[2:5] == ["info", "lfs", "objects"]:
            repo_id = f"{s[0]}/{s[1][:-4]}"
            if s[5:] == ["batch"] and m == "POST":
                self._check_write(request)
                return self._lfs_batch(request, self._repo(request, repo_id), json.loads(body))
            if s[5:] == ["verify"] and m == "POST":
                self._check_write(request)
                return self._lfs_verify(json.loads(body))
        if len(s) >= 5 and s[2] == "resolve" and m in ("GET", "HEAD"):
            return self._resolve_file(request, self._repo(request, f"{s[0]}/{s[1]}"), s[3], "/".join(s[4:]))
        raise HubError(404, f"Not found: {'/'.join(s)}")

    # --- repos and metadata ---------------------------------------------------------------------------------------

    def _create_repo(self, request, payload: dict):
        self._check_write(request)
        if payload.get("type", "model") != "model":
            raise HubError(400, "only model repositories in this test server")
        name, org = payload.get("name"), payload.get("organization")
        if not name or not org:
            raise HubError(400, "name and organization are required")
        repo_id = f"{org}/{name}"
        url = f"{self.url}/{repo_id}"
        if repo_id in self.repos:
            raise HubError(409, "You already created this model repo", body={"url": url})
        private = payload.get("visibility") == "private" or bool(payload.get("private"))
        repo = Repo(id=repo_id, private=private, created=now_iso())
        data = GITATTRIBUTES.encode()
        self._add_commit(repo, "main", None, "initial commit", "",
                         {".gitattributes": Entry(size=len(data), oid=git_oid(data), content=data)})
        self.repos[repo_id] = repo
        return {"url": url, "name": repo_id, "id": hashlib.md5(repo_id.encode()).hexdigest()[:24]}

    def _validate_yaml(self, payload: dict):
        text = payload.get("content", "")
        m = re.match(r"^---\s*\n(.*?)\n---\s*\n", text, re.S)
        if m:
            try:
                data = yaml.safe_load(m.group(1))
            except yaml.YAMLError as e:
                from starlette.responses import JSONResponse

                return JSONResponse({"errors": [{"message": f"Invalid YAML: {e}"}], "warnings": []}, status_code=400)
            if data is not None and not isinstance(data, dict):
                from starlette.responses import JSONResponse

                return JSONResponse({"errors": [{"message": "metadata must be a mapping"}], "warnings": []},
                                    status_code=400)
        return {"errors": [], "warnings": []}

    def _list_models(self, request):
        q = request.query_params
        author, search, filters = q.get("author"), q.get("search"), q.getlist("filter")
        out = []
        for repo in sorted(self.repos.values(), key=lambda r: r.id):
            if not self._can_read(request, repo):
                continue
            if author and repo.id.split("/")[0] != author:
                continue
            if search and search.lower() not in repo.id.lower():
                continue
            info = self._model_json(repo, repo.branches["main"])
            if any(f not in info["tags"] for f in filters):
                continue
            info.pop("siblings")
            out.append(info)
        return out

    def _refs(self, repo: Repo):
        def ref(kind, name, sha):
            return {"name": name, "ref": f"refs/{kind}/{name}", "targetCommit": sha}

        return {"branches": [ref("heads", n, s) for n, s in sorted(repo.branches.items())],
                "tags": [ref("tags", n, s) for n, s in sorted(repo.tags.items())],
                "converts": [], "pullRequests": []}

    def _tree(self, request, repo: Repo, rev: str, prefix: str):
        commit = repo.commits[self._resolve(repo, rev)]
        recursive = request.query_params.get("recursive", "false").lower() in ("1", "true")
        prefix = prefix.strip("/")
        if prefix and not any(p.startswith(prefix + "/") for p in commit.files):
            raise HubError(404, f"Entry not found: {prefix}", "EntryNotFound",
                           headers={"X-Repo-Commit": commit.sha})
        out, folders = [], set()
        for path in sorted(commit.files):
            if prefix and not path.startswith(prefix + "/"):
                continue
            rel = path[len(prefix) + 1:] if prefix else path
            if "/" in rel and not recursive:
                folder = (prefix + "/" if prefix else "") + rel.split("/")[0]
                if folder not in folders:
                    folders.add(folder)
                    out.append({"type": "directory", "oid": hashlib.sha1(folder.encode()).hexdigest(), "size": 0,
                                "path": folder})
                continue
            out.append(self._tree_item(path, commit.files[path]))
        return out

    def _paths_info(self, request, repo: Repo, rev: str, body: bytes):
        commit = repo.commits[self._resolve(repo, rev)]
        ctype = request.headers.get("content-type", "")
        if "json" in ctype:
            paths = json.loads(body).get("paths", [])
        else:
            from urllib.parse import parse_qs

            paths = parse_qs(body.decode()).get("paths", [])
        return [self._tree_item(p, commit.files[p]) for p in paths if p in commit.files]

    def _commits(self, repo: Repo, rev: str):
        sha, out = self._resolve(repo, rev), []
        while sha:
            c = repo.commits[sha]
            out.append({"id": c.sha, "title": c.title, "message": c.message, "date": c.date,
                        "authors": [{"user": "tester"}]})
            sha = c.parent
        return out

    def _create_tag(self, repo: Repo, rev: str, payload: dict):
        sha = self._resolve(repo, rev)
        tag = payload.get("tag")
        if not tag:
            raise HubError(400, "tag is required")
        if tag in repo.tags or tag in repo.branches:
            raise HubError(409, f"Tag {tag} already exists")
        repo.tags[tag] = sha
        return {}

    # --- uploads --------------------------------------------------------------------------------------------------

    def _is_lfs(self, path: str, size: int, sample: bytes) -> bool:
        name = path.rsplit("/", 1)[-1]
        if any(fnmatch.fnmatch(name, p) for p in LFS_PATTERNS) or size >= LFS_THRESHOLD:
            return True
        if b"\0" in sample:  # binary files go to LFS, as on the Hub
            return True
        try:
            sample.decode("utf-8")
        except UnicodeDecodeError as e:
            return e.start < len(sample) - 4  # a multi-byte char cut at the sample's end is still text
        return False

    def _preupload(self, repo: Repo, rev: str, payload: dict):
        commit = repo.commits[self._resolve(repo, rev)]
        files = []
        for f in payload.get("files", []):
            sample = base64.b64decode(f.get("sample", ""))
            lfs = self._is_lfs(f["path"], int(f["size"]), sample)
            existing = commit.files.get(f["path"])
            oid = None
            if existing is not None:
                oid = existing.lfs if existing.lfs is not None else existing.oid
            files.append({"path": f["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False,
                          "oid": oid})
        return {"files": files, "commitOid": commit.sha}

    def _lfs_batch(self, request, repo: Repo, payload: dict):
        from starlette.responses import JSONResponse

        if payload.get("operation") != "upload":
            raise HubError(400, "only uploads in this test server")
        objects = []
        for obj in payload.get("objects", []):
            oid, size = obj["oid"], int(obj["size"])
            item = {"oid": oid, "size": size}
            if not re.fullmatch(r"[0-9a-f]{64}", oid):
                item["error"] = {"code": 422, "message": "oid must be a sha256"}
            elif oid not in self.lfs:
                item["authenticated"] = True
                item["actions"] = {
                    "upload": {"href": f"{self.url}/lfs-upload/{oid}"},
                    "verify": {"href": f"{self.url}/{repo.id}.git/info/lfs/objects/verify"},
                }
            objects.append(item)
        return JSONResponse({"transfer": "basic", "objects": objects, "hash_algo": "sha256"},
                            media_type="application/vnd.git-lfs+json")

    def _lfs_put(self, oid: str, body: bytes):
        from starlette.responses import Response

        self.lfs_bytes_received += len(body)
        self.lfs_puts += 1
        if hashlib.sha256(body).hexdigest() != oid:
            raise HubError(400, "uploaded content does not match its sha256 oid")
        self.lfs[oid] = bytearray(body)
        return Response(status_code=200, headers={"ETag": f'"{hashlib.md5(body).hexdigest()}"'})

    def _lfs_verify(self, payload: dict):
        oid, size = payload.get("oid"), payload.get("size")
        blob = self.lfs.get(oid)
        if blob is None or len(blob) != size:
            raise HubError(404, f"LFS object {oid} not found or wrong size")
        return {}

    def _commit(self, request, repo: Repo, rev: str, body: bytes):
        if self._before_commit:
            self._before_commit.pop(0)(self, repo.id)
        if self._fail_commits:
            status = self._fail_commits.pop(0)
            raise HubError(status, "Internal Error - We're working hard to fix this as soon as possible!")
        if rev not in repo.branches:
            if rev in repo.tags or rev in repo.commits:
                raise HubError(400, f"Cannot commit to {rev}: not a branch")
            raise HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise HubError(400, "the first line must be the commit header")
        header = lines[0]["value"]
        head = repo.branches[rev]
        if header.get("parentCommit") and header["parentCommit"] != head:
            raise HubError(412, "A commit has happened since. Please refresh and try again.")
        files = dict(repo.commits[head].files)  # applied to a copy: all or nothing
        for line in lines[1:]:
            key, v = line["key"], line["value"]
            if key == "file":
                data = base64.b64decode(v["content"]) if v.get("encoding") == "base64" else v["content"].encode()
                files[v["path"]] = Entry(size=len(data), oid=git_oid(data), content=data)
            elif key == "lfsFile":
                oid = v["oid"]
                blob = self.lfs.get(oid)
                if blob is None:
                    raise HubError(422, f"LFS object {oid} of {v['path']} was never uploaded")
                size = len(blob)
                files[v["path"]] = Entry(size=size, oid=git_oid(lfs_pointer(oid, size)), lfs=oid)
            elif key == "deletedFile":
                if v["path"] not in files:
                    raise HubError(404, f"A file with this name doesn't exist: {v['path']}", "EntryNotFound")
                del files[v["path"]]
            elif key == "deletedFolder":
                prefix = v["path"].rstrip("/") + "/"
                for p in [p for p in files if p.startswith(prefix)]:
                    del files[p]
            else:
                raise HubError(400, f"unknown commit operation {key!r}")
        commit = self._add_commit(repo, rev, head, header.get("summary") or "update",
                                  header.get("description") or "", files)
        return {"commitUrl": f"{self.url}/{repo.id}/commit/{commit.sha}", "commitOid": commit.sha,
                "pullRequestUrl": None, "success": True}

    # --- downloads ------------------------------------------------------------------------------------------------

    def _resolve_file(self, request, repo: Repo, rev: str, path: str):
        from starlette.responses import RedirectResponse

        sha = self._resolve(repo, rev)
        entry = repo.commits[sha].files.get(path)
        if entry is None:
            raise HubError(404, f"Entry not found: {path}", "EntryNotFound", headers={"X-Repo-Commit": sha})
        headers = {"X-Repo-Commit": sha, "Accept-Ranges": "bytes"}
        if entry.lfs is not None:
            headers.update({"X-Linked-Etag": f'"{entry.lfs}"', "X-Linked-Size": str(entry.size),
                            "ETag": f'"{entry.oid}"'})
            location = f"http://{self.cdn_host}:{self.port}/lfs-files/{entry.lfs}"
            return RedirectResponse(location, status_code=302, headers=headers)
        headers["ETag"] = f'"{entry.oid}"'
        return self._content(request, entry.content, headers)

    def _lfs_get(self, request, oid: str):
        blob = self.lfs.get(oid)
        if blob is None:
            raise HubError(404, "Not found")
        return self._content(request, bytes(blob), {"ETag": f'"{oid}"', "Accept-Ranges": "bytes"})

    def _content(self, request, data: bytes, headers: dict):
        from starlette.responses import Response

        status, rng = 200, request.headers.get("range")
        if rng:
            m = re.fullmatch(r"bytes=(\d+)-(\d*)", rng.strip())
            if not m or int(m.group(1)) >= max(len(data), 1):
                raise HubError(416, "Requested range not satisfiable",
                               headers={"Content-Range": f"bytes */{len(data)}"})
            start = int(m.group(1))
            end = int(m.group(2)) if m.group(2) else len(data) - 1
            headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
            data, status = data[start:end + 1], 206
        headers["Content-Length"] = str(len(data))
        if request.method == "HEAD":
            return Response(status_code=status, headers=headers)
        return Response(content=data, status_code=status, headers=headers, media_type="application/octet-stream")
