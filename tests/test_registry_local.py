"""The local directory registry (the embedded default): same interface and checks as the Hub backend, versions kept,
atomic pushes, lock files that travel with a deployment, and the CLI with --registry."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

import registry
from erasure.cli import main
from erasure.errors import InvalidArgumentError, PackIntegrityError, PackMismatchError
from erasure.pack.manifest import PACK_FILES
from registry import DEFAULT_REGISTRY, open_registry
from registry.errors import PackNotFoundError, PushError, RegistryError, RevisionNotFoundError, VerificationError
from registry.local import LocalRegistry
from registry.lock import LockFile

from factories import leftovers, pack_dir, read_files, recard, tiny_unet


@pytest.fixture(scope="module")
def unet():
    return tiny_unet(0)


@pytest.fixture()
def pack(tmp_path, unet):
    return pack_dir(tmp_path / "packs" / "circle", unet)


@pytest.fixture()
def reg(tmp_path):
    return LocalRegistry(tmp_path / "registry")


def cli(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def test_push_pull_round_trip_keeps_versions_and_tags(reg, pack, tmp_path, unet):
    v1 = reg.push(pack, "toy/circle", tag="v1")
    assert len(v1.commit_sha) == 40 and v1.url.startswith("file://")
    v2_pack = pack_dir(tmp_path / "v2" / "circle", unet, seed=1)
    v2 = reg.push(v2_pack, "toy/circle", tag="v2")
    assert reg.commits("toy/circle") == [v2.commit_sha, v1.commit_sha]
    assert reg.resolve("toy/circle") == v2.commit_sha
    assert reg.resolve("toy/circle", "v1") == v1.commit_sha == reg.resolve("toy/circle", v1.commit_sha)

    old = reg.pull("toy/circle", "v1", to=tmp_path / "out" / "circle")
    assert old.commit_sha == v1.commit_sha and read_files(old.path) == read_files(pack)
    new = reg.pull("toy/circle", "main", to=tmp_path / "out" / "circle")  # replaces a previous pull in place
    assert read_files(new.path) == read_files(v2_pack)
    assert leftovers(tmp_path / "out", "circle") == []
    # Layout: one folder per repository, one per commit holding the pack files exactly.
    root = reg.root / "toy" / "circle"
    assert json.loads((root / "refs.json").read_text()) == {
        "branches": {"main": v2.commit_sha}, "tags": {"v1": v1.commit_sha, "v2": v2.commit_sha}}
    assert sorted(p.name for p in (root / "commits" / v1.commit_sha).iterdir()) == sorted(PACK_FILES)
    # A new version that changes only the card: the unchanged files are hard-linked from the parent commit.
    v3 = reg.push(recard(v2_pack, tmp_path / "v3" / "circle"), "toy/circle").commit_sha
    for name in ("delta.safetensors", "preview.png"):
        assert os.path.samefile(root / "commits" / v2.commit_sha / name, root / "commits" / v3 / name)
    assert not os.path.samefile(root / "commits" / v2.commit_sha / "README.md", root / "commits" / v3 / "README.md")


def test_identical_push_makes_no_commit_and_tags_are_immutable(reg, pack, tmp_path, unet):
    first = reg.push(pack, "toy/circle", tag="v1")
    again = reg.push(pack, "toy/circle", tag="v1")
    assert again.commit_sha == first.commit_sha and reg.commits("toy/circle") == [first.commit_sha]
    with pytest.raises(PushError, match="tag v1 .* immutable"):
        reg.push(pack_dir(tmp_path / "other", unet, seed=5), "toy/circle", tag="v1")
    assert reg.commits("toy/circle") == [first.commit_sha]


def test_refusals_write_nothing(reg, pack, tmp_path, unet):
    sha = reg.push(pack, "toy/circle").commit_sha
    commit_dir = reg.root / "toy" / "circle" / "commits" / sha
    to = tmp_path / "out" / "circle"

    with pytest.raises(PackMismatchError, match="built for another base"):  # another base
        reg.pull("toy/circle", to=to, base=tiny_unet(1))
    assert not to.exists()

    delta = commit_dir / "delta.safetensors"  # same-size tampering inside the registry
    original = delta.read_bytes()
    tampered = bytearray(original)
    tampered[len(tampered) // 2] ^= 0xFF
    delta.write_bytes(bytes(tampered))
    with pytest.raises(VerificationError, match="sha256 of delta.safetensors .* altered"):
        reg.pull("toy/circle", to=to)
    assert not to.exists() and not to.parent.exists()
    delta.write_bytes(original)

    (commit_dir / "extra.pkl").write_bytes(b"\x80\x04K\x01.")  # a pickle slipped into the registry
    with pytest.raises(VerificationError, match="pickle-capable"):
        reg.pull("toy/circle", to=to)
    assert not to.exists()
    (commit_dir / "extra.pkl").unlink()

    with pytest.raises(PackNotFoundError, match="no pack repository toy/nope .*erasure list toy"):
        reg.pull("toy/nope", to=to)
    with pytest.raises(RevisionNotFoundError, match="'v7' .*main"):
        reg.pull("toy/circle", "v7", to=to)
    assert not to.exists()
    assert reg.pull("toy/circle", to=to).path == to  # all repaired: accepted


def test_bad_packs_are_refused_before_the_registry_is_touched(reg, pack, tmp_path):
    (pack / "weights.bin").write_bytes(b"\x80\x04K\x01.")
    with pytest.raises(PackIntegrityError, match="pickle"):
        reg.push(pack, "toy/circle")
    (pack / "weights.bin").unlink()
    (pack / "README.md").write_text("changed after the manifest was written\n")
    with pytest.raises(PackIntegrityError, match="sha256 of README.md"):
        reg.push(pack, "toy/circle")
    assert not reg.root.exists()
    with pytest.raises(InvalidArgumentError, match="NAMESPACE/NAME"):
        reg.push(pack, "../escape")


def test_a_push_interrupted_before_the_refs_move_publishes_nothing(reg, pack, tmp_path, unet, monkeypatch):
    first = reg.push(pack, "toy/circle").commit_sha
    refs = reg.root / "toy" / "circle" / "refs.json"
    real_replace = os.replace

    def crash(src, dst):
        if str(dst) == str(refs):
            raise OSError("disk full")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        reg.push(pack_dir(tmp_path / "v2", unet, seed=2), "toy/circle", tag="v2")
    monkeypatch.setattr(os, "replace", real_replace)
    assert reg.commits("toy/circle") == [first] and reg.tags("toy/circle") == {}
    assert reg.pull("toy/circle").commit_sha == first
    second = reg.push(pack_dir(tmp_path / "v2b", unet, seed=2), "toy/circle", tag="v2")  # the retry succeeds
    assert reg.commits("toy/circle") == [second.commit_sha, first]


def test_list_and_cli(tmp_path, pack, unet, capsys):
    root = tmp_path / "reg"
    code, out, err = cli(capsys, "push", pack, "--repo", "toy/circle", "--tag", "v1", "--registry", root)
    assert code == 0, err
    sha = LocalRegistry(root).resolve("toy/circle", "v1")
    assert f"commit {sha}" in out and (root / "toy" / "circle" / "commits" / sha).as_uri() in out
    star = pack_dir(tmp_path / "star", unet, name="star", concepts=["star"], method="esd-x")
    assert cli(capsys, "push", star, "--repo", "toy/star", "--registry", root)[0] == 0

    code, out, err = cli(capsys, "list", "toy", "--registry", root)
    assert code == 0, err
    lines = out.splitlines()
    assert lines[1].split() == ["toy/circle", "circle", "esd-all", "test/base", sha[:12], "(v1)"]
    assert lines[2].split()[:4] == ["toy/star", "star", "esd-x", "test/base"]

    to = tmp_path / "pulled"
    code, out, err = cli(capsys, "pull", "toy/circle@v1", "--to", to, "--registry", root,
                         "--lock", tmp_path / "packs.lock")
    assert code == 0, err
    assert out.splitlines()[0] == f"toy/circle@{sha}" and read_files(to) == read_files(pack)
    lock = json.loads((tmp_path / "packs.lock").read_text())
    assert lock["packs"]["circle"]["source"] == "reg"  # relative to the lock file: the pair can be moved together

    code, out, err = cli(capsys, "pull", "toy/nope", "--registry", root)
    assert code == 1 and err.strip() == (f"erasure: error: no pack repository toy/nope in the local registry {root}; "
                                         f"check the name or run `erasure list toy --registry {root}`")
    code, out, err = cli(capsys, "list", "toy", "--registry", tmp_path / "packs")  # not a registry
    assert code == 1 and "is not a local pack registry" in err
    code, out, err = cli(capsys, "pull", "toy/circle@", "--registry", root)
    assert code == 1 and "nothing after '@'" in err


def test_lock_file_round_trip_and_refusal(tmp_path, pack):
    deploy = tmp_path / "deploy"
    reg = LocalRegistry(deploy / "registry")
    sha = reg.push(pack, "toy/circle", tag="v1").commit_sha
    lock = LockFile(deploy / "packs.lock")
    lock.add("circle", reg.pull("toy/circle", "v1"), reg.source)
    lock.save()
    moved = tmp_path / "moved"
    (deploy).rename(moved)  # the lock and its registry travel together
    fetched = LockFile.load(moved / "packs.lock").fetch(to_dir=tmp_path / "served")
    assert fetched["circle"].commit_sha == sha and read_files(fetched["circle"].path) == read_files(pack)

    data = json.loads((moved / "packs.lock").read_text())
    data["packs"]["circle"]["files"]["delta.safetensors"] = "f" * 64
    (moved / "packs.lock").write_text(json.dumps(data))
    with pytest.raises(VerificationError, match="delta.safetensors .* the lock says"):
        LockFile.load(moved / "packs.lock").fetch(to_dir=tmp_path / "refused")
    assert not (tmp_path / "refused").exists()
    with pytest.raises(RegistryError, match=r"has no pack\(s\) \['star'\]"):
        LockFile.load(moved / "packs.lock").fetch(["star"])
    (moved / "packs.lock").write_text('{"version": 1, "packs": {"circle": {"repo": "toy/circle"}}}')
    with pytest.raises(InvalidArgumentError, match="malformed"):
        LockFile.load(moved / "packs.lock")


def test_open_registry_defaults_to_the_shipped_local_registry(monkeypatch, tmp_path):
    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    default = open_registry()
    assert isinstance(default, LocalRegistry) and default.root == DEFAULT_REGISTRY.absolute()
    assert DEFAULT_REGISTRY == Path(registry.__file__).parent / "toy-registry"
    assert default.source == "builtin:toy-registry"
    assert isinstance(default.list("toy"), list)  # the shipped registry is readable offline
    assert isinstance(open_registry(registry_dir=tmp_path), LocalRegistry)
    hub = open_registry(endpoint="http://127.0.0.1:9")
    assert type(hub).__name__ == "HubRegistry" and hub.source == "http://127.0.0.1:9"
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:8")
    assert open_registry().source == "http://127.0.0.1:8"
    assert open_registry(endpoint="http://127.0.0.1:9").source == "http://127.0.0.1:9"  # --endpoint wins
    with pytest.raises(InvalidArgumentError):
        open_registry(endpoint="ftp://x")
