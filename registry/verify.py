"""How both backends check a pulled snapshot and hand the verified pack over atomically.

A pull is refused (and nothing is written to ``to``) unless, in this order:
1. the registry's listing of the commit holds exactly the pack files (``.gitattributes`` aside) and no
   pickle-capable file (``check_listing``, before anything is downloaded);
2. every downloaded file has the size and hash the registry records for it (the LFS sha256 / git blob sha1 of the
   Hub tree, the sha256 of the local registry's commit record);
3. ``ConceptPack.from_pretrained`` accepts the snapshot: the manifest's sha256 of every file, safetensors only,
   tensors as declared and finite;
4. every file matches ``expected_files`` (a lock file's hashes), when given;
5. ``ConceptPack.verify_against(base)`` passes, when a base is given.
Only then are the files copied to a temporary directory beside ``to`` and renamed into place; the pack object that
was verified is what the caller gets (``PulledPack.pack``), so nothing reads or checks the files again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import shutil
import tempfile
import uuid
from pathlib import Path

from erasure.errors import InvalidArgumentError, PackIntegrityError
from erasure.files import sha256_file
from erasure.pack.concept_pack import ConceptPack
from erasure.pack.manifest import MANIFEST, PACK_FILES, UNSAFE_SUFFIXES, Manifest

from .errors import VerificationError
from .types import PublishedManifest, PulledPack

GITATTRIBUTES = ".gitattributes"


def git_blob_sha1(path: Path) -> str:
    """The git object id of a file's content (what the Hub tree reports as ``oid`` for a non-LFS file)."""
    h = hashlib.sha1()
    h.update(f"blob {path.stat().st_size}\0".encode())
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


@dataclasses.dataclass(frozen=True)
class RemoteFile:
    """What the registry records for one file of a commit. Either hash may be unknown (None)."""

    size: int | None
    sha256: str | None = None  # Hub: the LFS oid; local registry: the commit record
    git_oid: str | None = None  # Hub: the git blob sha1 of a non-LFS file


def check_listing(repo: str, sha: str, names, where: str) -> None:
    """Refuse a commit whose file list is not a pack, before downloading anything."""
    names = set(names) - {GITATTRIBUTES}
    label = f"{repo}@{sha[:12]} at {where}"
    unsafe = sorted(n for n in names if n.lower().endswith(UNSAFE_SUFFIXES))
    if unsafe:
        raise VerificationError(f"{label} holds pickle-capable file(s) {unsafe}; packs hold safetensors only, "
                                "refusing to download it")
    extra = sorted(names - set(PACK_FILES))
    missing = sorted(set(PACK_FILES) - names)
    if extra or missing:
        raise VerificationError(f"{label} is not a concept pack: it should hold exactly {list(PACK_FILES)}"
                                + (f"; missing {missing}" if missing else "")
                                + (f"; unexpected {extra}" if extra else ""))


def verify_snapshot(repo: str, sha: str, snapshot: Path, remote: dict[str, RemoteFile] | None, where: str,
                    expected_files: dict[str, str] | None = None) -> tuple[ConceptPack, dict[str, str]]:
    """Checks 2-4 of the module docstring on a downloaded snapshot; returns the loaded pack and {file: sha256}."""
    label = f"{repo}@{sha[:12]}"
    files: dict[str, str] = {}
    for name in PACK_FILES:
        path = snapshot / name
        if not path.is_file():
            raise VerificationError(f"{label}: {name} was not downloaded from {where}")
        digest = sha256_file(path)
        files[name] = digest
        info = (remote or {}).get(name)
        if info is None:
            continue
        size = path.stat().st_size
        if info.size is not None and size != info.size:
            raise VerificationError(f"{label}: {name} is {size} bytes, {where} records {info.size}; refused")
        if info.sha256 is not None and digest != info.sha256:
            raise VerificationError(f"{label}: sha256 of {name} is {digest[:12]}..., {where} records "
                                    f"{info.sha256[:12]}...: the stored file was altered or corrupted; refused")
        if info.git_oid is not None and git_blob_sha1(path) != info.git_oid:
            raise VerificationError(f"{label}: {name} does not match its git blob id {info.git_oid[:12]}... at "
                                    f"{where}: the stored file was altered or corrupted; refused")
    try:
        pack = ConceptPack.from_pretrained(snapshot)
    except PackIntegrityError as exc:
        raise VerificationError(f"{label} from {where}: {exc.reason}; refused") from None
    if expected_files is not None:
        if set(expected_files) != set(files):
            raise VerificationError(f"{label}: the lock lists files {sorted(expected_files)}, the pack holds "
                                    f"{sorted(files)}; refused")
        for name, digest in sorted(files.items()):
            if expected_files[name] != digest:
                raise VerificationError(f"{label}: sha256 of {name} is {digest[:12]}..., the lock says "
                                        f"{expected_files[name][:12]}...; refused (re-lock if the change is intended)")
    return pack, files


def place(snapshot: Path, to: Path, files: dict[str, str]) -> Path:
    """Copy the verified files to a temporary directory beside ``to``, check them again, and rename it into place.

    An existing ``to`` is replaced only if it holds nothing but pack files (a previous pull)."""
    to = Path(to).expanduser()
    if to.exists():
        if not to.is_dir():
            raise InvalidArgumentError(f"--to {to} is a file; give a directory to write the pack into")
        foreign = sorted(p.name for p in to.iterdir() if p.name not in PACK_FILES)
        if foreign:
            raise InvalidArgumentError(f"--to {to} holds other files ({', '.join(foreign[:3])}); give a new or "
                                       "empty directory, or a previous pull of a pack")
    to.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{to.name}.pull-", dir=to.parent))
    old = None
    try:
        for name in PACK_FILES:
            shutil.copyfile(snapshot / name, tmp / name)  # follows the HF cache's symlinks
            if sha256_file(tmp / name) != files[name]:
                raise VerificationError(f"{name} changed while being copied to {to}; refused")
        if to.exists():
            old = to.parent / f".{to.name}.old-{uuid.uuid4().hex[:8]}"
            to.rename(old)
        tmp.rename(to)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not to.exists():
            old.rename(to)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return to


def finish_pull(repo: str, sha: str, snapshot: Path, remote: dict[str, RemoteFile] | None, where: str,
                to: Path | None, base, expected_files: dict[str, str] | None) -> PulledPack:
    pack, files = verify_snapshot(repo, sha, snapshot, remote, where, expected_files)
    if base is not None:
        pack.verify_against(base)  # PackMismatchError: built for another base; nothing written yet
    path = place(snapshot, to, files) if to is not None else snapshot
    pack.path = path
    return PulledPack(repo=repo, commit_sha=sha, path=path, files=files, pack=pack)


def read_published_manifest(repo: str, sha: str, path: Path, remote: RemoteFile | None,
                            where: str) -> PublishedManifest:
    """The manifest file of commit ``sha``, checked against what the registry records for it (``remote``)."""
    label = f"{repo}@{sha[:12]} at {where}"
    if not path.is_file():
        raise VerificationError(f"{label} has no {MANIFEST}; it is not a concept pack")
    if remote is not None:
        if remote.sha256 is not None and sha256_file(path) != remote.sha256:
            raise VerificationError(f"{label}: sha256 of {MANIFEST} does not match the registry's record; refused")
        if remote.git_oid is not None and git_blob_sha1(path) != remote.git_oid:
            raise VerificationError(f"{label}: {MANIFEST} does not match its git blob id; refused")
    try:
        manifest = Manifest.from_json(path.read_text())
    except ValueError as exc:
        raise VerificationError(f"{label}: {MANIFEST} is not a valid manifest: {str(exc).splitlines()[0]}") from None
    return PublishedManifest(repo=repo, commit_sha=sha, manifest=manifest)


def manifest_summary(path: Path) -> dict:
    """name, concepts, method, base of a pack.json (best effort: a broken manifest reads as '?')."""
    try:
        m = Manifest.from_json(Path(path).read_text())
    except (OSError, ValueError):
        return {"name": "?", "concepts": [], "method": "?", "base": "?"}
    return {"name": m.name, "concepts": list(m.concepts), "method": m.method,
            "base": m.base.id + (f"@{m.base.revision}" if m.base.revision else "")}


def push_message(pack: ConceptPack) -> str:
    """The commit message of a push: what the pack erases and from which base."""
    return f"erasure push {pack.name}: {', '.join(pack.concepts)} ({pack.manifest.method}) on {pack.manifest.base.id}"
