"""The Hub backend against a protocol-faithful Hub on 127.0.0.1 (tests/hubserver.py), driven only through the real
huggingface_hub client: push / tag / pull, verification refusals, failed commits, listing, LFS dedup, lock files."""

from __future__ import annotations

import hashlib
import json

import pytest

from erasure.cli import main
from erasure.errors import PackIntegrityError, PackMismatchError
from erasure.files import sha256_file
from erasure.pack.manifest import PACK_FILES
from registry.errors import AccessDeniedError, PackNotFoundError, PushError, RevisionNotFoundError, VerificationError
from registry.hub import HubRegistry
from registry.lock import LockFile

from factories import leftovers, pack_dir, read_files, recard, redteam_record, rewrite_manifest, tiny_unet
from hubserver import FakeHub

TOKEN = "hf_test_write_token"


@pytest.fixture(scope="module")
def unet():
    return tiny_unet(0)


@pytest.fixture()
def hf(tmp_path, monkeypatch):
    """Isolate huggingface_hub: no Xet, online (conftest sets HF_HUB_OFFLINE=1), no stored token, a tmp cache."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-such-token"))
    cache = tmp_path / "hf-cache"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_ENDPOINT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    from huggingface_hub.utils import disable_progress_bars, enable_progress_bars

    disable_progress_bars()
    yield cache
    enable_progress_bars()


@pytest.fixture()
def hub(hf):
    server = FakeHub(token=TOKEN, read_only_tokens=("hf_read_only",)).start()
    yield server
    server.stop()


@pytest.fixture()
def reg(hub, hf):
    return HubRegistry(endpoint=hub.url, token=TOKEN, cache_dir=hf)


@pytest.fixture()
def pack(tmp_path, unet):
    return pack_dir(tmp_path / "packs" / "circle", unet)


def cli(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def test_push_tag_pull_round_trip_then_offline_from_cache(hub, hf, pack, tmp_path, capsys, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setenv("HF_TOKEN", TOKEN)  # the CLI takes the token from the environment
    code, out, err = cli(capsys, "push", pack, "--repo", "ns/circle", "--tag", "v1", "--endpoint", hub.url)
    assert code == 0, err
    sha = hub.head("ns/circle")
    assert f"commit {sha}" in out and f"{hub.url}/ns/circle/tree/{sha}" in out
    assert hub.repos["ns/circle"].tags == {"v1": sha}
    assert len(hub.history("ns/circle")) == 2  # the Hub's initial .gitattributes commit + ONE pack commit
    files = hub.repos["ns/circle"].commits[sha].files
    assert set(files) == set(PACK_FILES) | {".gitattributes"}
    assert files["delta.safetensors"].lfs == sha256_file(pack / "delta.safetensors")  # stored via LFS

    to = tmp_path / "pulled" / "circle"
    code, out, err = cli(capsys, "pull", "ns/circle@v1", "--to", to, "--endpoint", hub.url)
    assert code == 0, err
    assert out.splitlines()[0] == f"ns/circle@{sha}"  # the pinned sha
    assert read_files(to) == read_files(pack)  # byte-identical
    assert sorted(p.name for p in to.iterdir()) == sorted(PACK_FILES)

    # Second pull: server gone, HF_HUB_OFFLINE=1: served from the cache, still verified.
    hub.stop()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    again = tmp_path / "offline" / "circle"
    code, out, err = cli(capsys, "pull", "ns/circle@v1", "--to", again, "--endpoint", hub.url)
    assert code == 0, err
    assert out.splitlines()[0] == f"ns/circle@{sha}"
    assert read_files(again) == read_files(pack)
    # Server gone, online mode, pinned sha: the cache path serves it too.
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    reg = HubRegistry(endpoint=hub.url, token=TOKEN, cache_dir=hf)
    pulled = reg.pull("ns/circle", sha, to=tmp_path / "pinned")
    assert pulled.commit_sha == sha and read_files(pulled.path) == read_files(pack)
    # ... but a moving name cannot be resolved without the server.
    code, out, err = cli(capsys, "pull", "ns/circle@main", "--endpoint", hub.url)
    assert code == 1 and "cannot reach" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("victim", ["delta.safetensors", "preview.png", "pack.json", "README.md"])
def test_same_size_tampered_blob_is_refused_and_nothing_written(reg, hub, hf, pack, tmp_path, victim):
    from huggingface_hub import hf_hub_download

    sha = reg.push(pack, "ns/circle").commit_sha
    hub.tamper("ns/circle", victim)
    # The client itself accepts it (it checks sizes only): that is why the registry verifies hashes.
    raw = hf_hub_download("ns/circle", victim, revision=sha, endpoint=hub.url, cache_dir=tmp_path / "raw-cache")
    assert sha256_file(raw) != sha256_file(pack / victim)
    assert len(open(raw, "rb").read()) == (pack / victim).stat().st_size

    to = tmp_path / "out" / "circle"
    with pytest.raises(VerificationError, match=f"{victim}.*(altered|corrupted)"):
        reg.pull("ns/circle", "main", to=to)
    assert not to.exists()
    assert not to.parent.exists() or leftovers(to.parent, "circle") == []
    # The refused file was evicted from the cache: once the server is repaired, a pull succeeds.
    entry = hub.repos["ns/circle"].commits[sha].files[victim]
    if entry.lfs is not None:
        hub.lfs[entry.lfs][:] = (pack / victim).read_bytes()
    else:
        entry.content = (pack / victim).read_bytes()
    pulled = reg.pull("ns/circle", "main", to=to)
    assert read_files(pulled.path) == read_files(pack)


def test_manifest_with_wrong_hashes_is_refused_on_push_and_on_pull(reg, hub, pack, tmp_path):
    from huggingface_hub import HfApi

    bad = json.loads((pack / "pack.json").read_text())["files"]
    bad["delta.safetensors"] = hashlib.sha256(b"something else").hexdigest()
    rewrite_manifest(pack, files=bad)
    with pytest.raises(PackIntegrityError, match="sha256 of delta.safetensors"):
        reg.push(pack, "ns/broken")
    assert hub.requests == []  # refused before any network call

    # Published by some other tool: the pull refuses it.
    api = HfApi(endpoint=hub.url, token=TOKEN)
    api.create_repo("ns/broken")
    api.upload_folder(repo_id="ns/broken", folder_path=pack, commit_message="bypass the checks")
    to = tmp_path / "out" / "broken"
    with pytest.raises(VerificationError, match="sha256 of delta.safetensors .* manifest says"):
        reg.pull("ns/broken", to=to)
    assert not to.exists() and not to.parent.exists()


def test_pickle_file_is_refused_on_push_and_before_download_on_pull(reg, hub, pack, tmp_path):
    from huggingface_hub import HfApi

    reg.push(pack, "ns/circle")
    evil = tmp_path / "evil"
    evil.mkdir()
    for name in PACK_FILES:
        (evil / name).write_bytes((pack / name).read_bytes())
    (evil / "extra.pt").write_bytes(b"\x80\x04K\x01.")  # a pickle
    before = list(hub.requests)
    with pytest.raises(PackIntegrityError, match="pickle"):
        reg.push(evil, "ns/circle")
    assert hub.requests == before

    HfApi(endpoint=hub.url, token=TOKEN).upload_file(path_or_fileobj=evil / "extra.pt", path_in_repo="extra.pt",
                                                      repo_id="ns/circle")
    hub.requests.clear()
    to = tmp_path / "out" / "circle"
    with pytest.raises(VerificationError, match=r"pickle-capable file\(s\) \['extra.pt'\]"):
        reg.pull("ns/circle", to=to)
    assert not any("/resolve/" in path or "/lfs-files/" in path for _, path in hub.requests)  # nothing downloaded
    assert not to.exists()


def test_pack_for_another_base_is_refused_before_writing(reg, pack, tmp_path, unet):
    reg.push(pack, "ns/circle", tag="v1")
    to = tmp_path / "out" / "circle"
    with pytest.raises(PackMismatchError, match="built for another base"):
        reg.pull("ns/circle", "v1", to=to, base=tiny_unet(1))
    assert not to.exists() and not to.parent.exists()
    assert reg.pull("ns/circle", "v1", to=to, base=unet).path == to  # the right base is accepted


def test_unknown_repo_and_revision_are_clear_errors(reg, hub, pack, capsys):
    with pytest.raises(PackNotFoundError, match=r"no pack repository ns/nope at .*erasure list ns"):
        reg.pull("ns/nope")
    reg.push(pack, "ns/circle", tag="v1")
    with pytest.raises(RevisionNotFoundError, match=r"no branch, tag or commit 'v9'.*main, v1"):
        reg.pull("ns/circle", "v9")
    with pytest.raises(RevisionNotFoundError):
        reg.pull("ns/circle", "0" * 40)
    code, out, err = cli(capsys, "pull", "ns/circle@v9", "--endpoint", hub.url)
    assert code == 1 and err.startswith("erasure: error: ") and len(err.strip().splitlines()) == 1
    code, out, err = cli(capsys, "pull", "not-a-repo", "--endpoint", hub.url)
    assert code == 1 and "NAMESPACE/NAME" in err


def test_push_without_token_or_with_read_only_token_is_refused(hub, hf, pack):
    for token, status in ((False, "401"), ("hf_read_only", "403"), ("hf_wrong", "401")):
        reg = HubRegistry(endpoint=hub.url, token=token, cache_dir=hf)
        with pytest.raises(AccessDeniedError, match=f"refused the push to ns/circle .*HTTP {status}.*HF_TOKEN"):
            reg.push(pack, "ns/circle")
    assert "ns/circle" not in hub.repos and hub.lfs == {}
    assert issubclass(AccessDeniedError, PushError)


def test_push_failing_at_commit_leaves_no_commit_and_a_retry_succeeds(reg, hub, pack, tmp_path, unet):
    first = reg.push(pack, "ns/circle", tag="v1").commit_sha
    v2 = pack_dir(tmp_path / "v2" / "circle", unet, seed=1)
    hub.fail_next_commit(500)
    with pytest.raises(PushError, match="HTTP 500.*shows no new commit; retry"):
        reg.push(v2, "ns/circle", tag="v2")
    assert hub.head("ns/circle") == first and len(hub.history("ns/circle")) == 2
    from huggingface_hub import HfApi  # the client's own view agrees

    assert [c.commit_id for c in HfApi(endpoint=hub.url).list_repo_commits("ns/circle")] == hub.history("ns/circle")
    assert "v2" not in hub.repos["ns/circle"].tags
    assert reg.pull("ns/circle", "main").files == {n: sha256_file(pack / n) for n in PACK_FILES}

    sent = hub.lfs_bytes_received
    second = reg.push(v2, "ns/circle", tag="v2").commit_sha
    assert second != first and hub.history("ns/circle")[:2] == [second, first]
    assert hub.repos["ns/circle"].tags == {"v1": first, "v2": second}
    assert hub.lfs_bytes_received == sent  # the LFS blobs uploaded before the failed commit were reused


def test_list_shows_packs_with_concept_method_and_base(reg, hub, tmp_path, unet, capsys):
    from huggingface_hub import HfApi

    reg.push(pack_dir(tmp_path / "a", unet, name="circle", concepts=["circle"], method="esd-x"), "ns/circle",
             tag="v1")
    reg.push(pack_dir(tmp_path / "b", unet, name="star", concepts=["star", "striped"], method="esd-u"), "ns/star")
    reg.push(pack_dir(tmp_path / "c", unet, name="other"), "elsewhere/other")
    api = HfApi(endpoint=hub.url, token=TOKEN)  # a model repo that is not a pack: not listed
    api.create_repo("ns/plain-model")
    api.upload_file(path_or_fileobj=b"---\nlibrary_name: diffusers\n---\n# a model\n", path_in_repo="README.md",
                    repo_id="ns/plain-model")

    api.create_repo("ns/tagged-only")  # tagged as a pack, but no manifest: listed with '?' so it can be fixed
    api.upload_file(path_or_fileobj=b"---\ntags:\n- concept-erasure\n---\n", path_in_repo="README.md",
                    repo_id="ns/tagged-only")

    packs = {p.repo: p for p in reg.list("ns")}
    assert sorted(packs) == ["ns/circle", "ns/star", "ns/tagged-only"]
    assert packs["ns/tagged-only"].method == "?" and packs["ns/tagged-only"].concepts == []
    assert packs["ns/circle"].concepts == ["circle"] and packs["ns/circle"].method == "esd-x"
    assert packs["ns/circle"].base == "test/base" and packs["ns/circle"].latest_tag == "v1"
    assert packs["ns/star"].concepts == ["star", "striped"] and packs["ns/star"].method == "esd-u"
    assert packs["ns/star"].latest_sha == hub.head("ns/star")

    code, out, err = cli(capsys, "list", "ns", "--endpoint", hub.url)
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].split() == ["REPO", "CONCEPTS", "METHOD", "BASE", "LATEST"]
    assert lines[1].split() == ["ns/circle", "circle", "esd-x", "test/base", hub.head("ns/circle")[:12], "(v1)"]
    assert lines[2].split() == ["ns/star", "star,striped", "esd-u", "test/base", hub.head("ns/star")[:12]]
    code, out, err = cli(capsys, "list", "nobody", "--endpoint", hub.url)
    assert code == 0 and "no packs in nobody" in out


def test_recorded_attacks_cover_main_and_every_tag_of_every_pack(reg, tmp_path, unet):
    """What `erasure attack --known-from NS` starts from: the black-box attacks of every published red-team record
    (superseded tags too), per concept; soft prompts and revisions without a record add nothing."""
    from registry.attacks import recorded_attacks

    def red(i, prompt):
        record = redteam_record({"prompt": 0.5, "soft-prompt": 0.9}, "red", prompt=prompt)
        return pack_dir(tmp_path / f"red{i}", unet, name="red", concepts=["red"], seed=i, redteam=record)

    reg.push(red(1, "hollow hollow background"), "ns/red", tag="v1")
    reg.push(red(2, "crimson scarlet"), "ns/red", tag="v2")
    reg.push(pack_dir(tmp_path / "plain", unet, name="red", concepts=["red"], seed=3), "ns/red")  # main: no record
    circle = redteam_record({"settings": 0.2}, "circle", prompt="please")
    reg.push(pack_dir(tmp_path / "circle", unet, name="circle", redteam=circle), "ns/circle")  # main only
    assert reg.tags("ns/red") == {t: reg.resolve("ns/red", t) for t in ("v1", "v2")}
    assert recorded_attacks(reg, "ns") == {"circle": ["please"], "red": ["crimson scarlet", "hollow hollow background"]}
    assert recorded_attacks(reg, "nobody") == {}


def test_pushing_the_same_pack_twice_sends_no_lfs_bytes(reg, hub, pack, tmp_path, unet):
    reg.push(pack, "ns/circle", tag="v1")
    first = hub.lfs_bytes_received
    lfs_size = sum((pack / n).stat().st_size for n in ("delta.safetensors", "preview.png"))
    assert first == lfs_size and hub.lfs_puts == 2

    again = reg.push(pack, "ns/circle", tag="v1")
    assert hub.lfs_bytes_received == first and hub.lfs_puts == 2  # nothing re-sent
    assert again.commit_sha == hub.head("ns/circle") and len(hub.history("ns/circle")) == 2  # no empty commit

    # A new version with the same delta and preview but a new card: a commit, and still no LFS bytes.
    new_card = recard(pack, tmp_path / "v2" / "circle")
    v2 = reg.push(new_card, "ns/circle", tag="v2")
    assert v2.commit_sha != again.commit_sha and hub.lfs_bytes_received == first
    print(f"\nLFS bytes sent: first push {first}, identical re-push 0, card-only update 0 "
          f"(pack {sum((pack / n).stat().st_size for n in PACK_FILES)} bytes)")


def test_tag_is_immutable(reg, pack, tmp_path, unet):
    reg.push(pack, "ns/circle", tag="v1")
    other = pack_dir(tmp_path / "other" / "circle", unet, seed=3)
    with pytest.raises(PushError, match="tag v1 .* immutable"):
        reg.push(other, "ns/circle", tag="v1")


def test_lock_file_pins_and_serves_offline(hub, hf, reg, pack, tmp_path, capsys, monkeypatch):
    from huggingface_hub import constants

    sha = reg.push(pack, "ns/circle", tag="v1").commit_sha
    lock_path = tmp_path / "deploy" / "packs.lock"
    code, out, err = cli(capsys, "lock", "ns/circle@v1", "--lock", lock_path, "--endpoint", hub.url)
    assert code == 0, err
    data = json.loads(lock_path.read_text())
    assert data["packs"]["circle"] == {"repo": "ns/circle", "revision": sha, "source": hub.url,
                                       "files": {n: sha256_file(pack / n) for n in sorted(PACK_FILES)}}
    hub.stop()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    fetched = LockFile.load(lock_path).fetch(to_dir=tmp_path / "served")
    assert fetched["circle"].commit_sha == sha and read_files(fetched["circle"].path) == read_files(pack)

    data["packs"]["circle"]["files"]["pack.json"] = "0" * 64  # a lock that disagrees with the pack
    lock_path.write_text(json.dumps(data))
    with pytest.raises(VerificationError, match="pack.json .* the lock says"):
        LockFile.load(lock_path).fetch(to_dir=tmp_path / "refused")
    assert not (tmp_path / "refused").exists()


def test_private_repo_needs_the_token_to_pull(hub, hf, reg, pack):
    sha = reg.push(pack, "ns/secret", private=True).commit_sha
    assert hub.repos["ns/secret"].private
    anonymous = HubRegistry(endpoint=hub.url, token=False, cache_dir=hf)
    with pytest.raises(PackNotFoundError, match="no pack repository ns/secret .*private repository needs HF_TOKEN"):
        anonymous.pull("ns/secret")
    assert anonymous.list("ns") == [] and [p.repo for p in reg.list("ns")] == ["ns/secret"]
    assert reg.pull("ns/secret").commit_sha == sha


def test_xet_upload_to_a_non_hub_endpoint_says_how_to_fix_it(hub, reg, pack, monkeypatch):
    from huggingface_hub import constants

    pytest.importorskip("hf_xet")
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", False)
    with pytest.raises(PushError, match="set HF_HUB_DISABLE_XET=1.*shows no new commit"):
        reg.push(pack, "ns/circle")
    assert len(hub.history("ns/circle")) == 1  # only the Hub's initial commit


def test_stray_files_make_a_repo_unpullable_until_a_push_removes_them(reg, hub, pack, tmp_path):
    from huggingface_hub import HfApi

    first = reg.push(pack, "ns/circle").commit_sha
    HfApi(endpoint=hub.url, token=TOKEN).upload_file(path_or_fileobj=b"notes\n", path_in_repo="notes.txt",
                                                      repo_id="ns/circle")
    with pytest.raises(VerificationError, match=r"not a concept pack.*unexpected \['notes.txt'\]"):
        reg.pull("ns/circle", to=tmp_path / "out")
    fixed = reg.push(pack, "ns/circle").commit_sha  # one commit: the pack files (unchanged) + deleting notes.txt
    assert set(hub.repos["ns/circle"].commits[fixed].files) == set(PACK_FILES) | {".gitattributes"}
    assert reg.pull("ns/circle", to=tmp_path / "out").commit_sha == fixed != first


def test_the_test_hub_makes_the_client_raise_its_own_exceptions(hub, hf, reg, pack):
    """hubserver.py's error responses carry what huggingface_hub maps to its exception classes."""
    from huggingface_hub import HfApi, hf_hub_download
    from huggingface_hub import errors as hf_errors

    api = HfApi(endpoint=hub.url, token=TOKEN)
    with pytest.raises(hf_errors.RepositoryNotFoundError):
        api.model_info("ns/nope")
    reg.push(pack, "ns/circle")
    with pytest.raises(hf_errors.RevisionNotFoundError):
        api.model_info("ns/circle", revision="v404")
    with pytest.raises(hf_errors.EntryNotFoundError):
        hf_hub_download("ns/circle", "missing.txt", endpoint=hub.url, cache_dir=hf)
    with pytest.raises(hf_errors.HfHubHTTPError) as info:
        HfApi(endpoint=hub.url, token=False).create_repo("ns/other")
    assert info.value.response.status_code == 401
    hub.fail_next_commit(503)
    with pytest.raises(hf_errors.HfHubHTTPError) as info:
        api.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id="ns/circle")
    assert info.value.response.status_code == 503
    assert api.model_info("ns/circle").sha == hub.head("ns/circle")
    assert {s.rfilename for s in api.model_info("ns/circle").siblings} == set(PACK_FILES) | {".gitattributes"}


def test_a_concurrent_commit_is_never_overwritten(reg, hub, pack, tmp_path, unet):
    """The push commits with parent_commit = the head it checked: a commit that lands in between wins (HTTP 412)."""
    reg.push(pack, "ns/circle", tag="v1")
    other = {}
    hub.before_next_commit(lambda h, repo: other.setdefault("sha", h.commit_directly(repo, "notes.txt", b"hi\n")))
    with pytest.raises(PushError, match=r"HTTP 412.*main moved to .* meanwhile"):
        reg.push(pack_dir(tmp_path / "v2", unet, seed=2), "ns/circle", tag="v2")
    assert hub.head("ns/circle") == other["sha"] and "v2" not in hub.repos["ns/circle"].tags
    v2 = reg.push(pack_dir(tmp_path / "v2b", unet, seed=2), "ns/circle", tag="v2")  # a retry sees the new head
    assert hub.history("ns/circle")[:2] == [v2.commit_sha, other["sha"]]
    assert "notes.txt" not in hub.repos["ns/circle"].commits[v2.commit_sha].files


def test_a_service_starts_from_its_verified_cache_when_the_hub_is_down(hub, hf, reg, tmp_path, toy_pipe,
                                                                       monkeypatch):
    """Registry outage: packs pulled once start the service from the HF cache when the Hub cannot be reached (not
    offline mode: the Hub is simply down), every file checked against the lock again; a cached file that changed is
    refused; with no cache the refusal is one line naming the registry and the pack."""
    from huggingface_hub import constants

    from factories import make_pack
    from service.config import ServiceConfig
    from service.runtime import Runtime, StartupError
    from service_helpers import write_config

    src = tmp_path / "src" / "circle"
    make_pack(src, toy_pipe.unet, "circle", base_id="toy")
    reg.push(src, "ns/circle", tag="v1")
    lock = LockFile(tmp_path / "packs.lock")
    lock.add("circle", reg.pull("ns/circle", "v1"), hub.url)  # the pull fills the cache
    lock.save()
    config = ServiceConfig.load(write_config(tmp_path / "c.yaml", lock.path, batching=False, precompose=False))

    hub.stop()
    assert not constants.HF_HUB_OFFLINE
    rt = Runtime(config)
    assert rt.packs["circle"].sha == lock.entries["circle"].revision

    [cached] = (hf / "models--ns--circle" / "snapshots").iterdir()
    delta = (cached / "delta.safetensors").resolve()
    data = bytearray(delta.read_bytes())
    data[200] ^= 1
    delta.write_bytes(bytes(data))
    with pytest.raises(StartupError, match=r"pack 'circle': .*delta\.safetensors"):
        Runtime(config)

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(StartupError) as err:
        Runtime(config)
    message = str(err.value)
    assert len(message.splitlines()) == 1 and "pack 'circle'" in message and hub.url in message
    assert "cannot be reached" in message
