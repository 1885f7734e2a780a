"""Catalogues (registry/catalogue.py): per-entry validation, the config hash, the quick check, and what a rerun skips,
on the local registry and on the Hub (tests/hubserver.py through the real huggingface_hub client). No Ray here:
tests/test_train_many.py trains through Ray."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from erasure.cli import main
from erasure.training.config import ESDConfig
from registry import open_registry
from registry.catalogue import (
    TOY_CATALOGUE,
    Catalogue,
    QuickCheck,
    config_hash,
    manifest_config_hash,
    published_with_same_config,
)
from registry.errors import PushError, VerificationError

from factories import make_pack, tiny_unet

REPO = Path(__file__).resolve().parents[1]


def catalogue(packs, **header) -> Catalogue:
    return Catalogue.from_dict({"namespace": "test", "tag": "v1", **header, "packs": packs})


def test_the_toy_catalogue_is_the_shipped_recipe():
    """The shipped catalogue reproduces the configs the shipped packs were trained with, bit for bit (so `make
    packs` on a fresh checkout trains nothing), and the shipped packs pass its quick check."""
    cat = Catalogue.load(TOY_CATALOGUE)
    assert cat.errors == [] and [j.name for j in cat.jobs] == ["circle", "red", "striped", "square"]
    reg = open_registry()
    for job in cat.jobs:
        assert job.repo == f"toy/{job.name}" and job.base == "toy"
        published = published_with_same_config(job, reg)
        assert published is not None, job.name
        assert published.commit_sha == reg.resolve(job.repo, job.tag)
        metrics = reg.read_manifest(job.repo, job.tag).manifest.metrics
        assert job.check.problems(job.config.concepts, metrics) == [], job.name
    square = cat.jobs[3].config
    assert square.method == "esd-u" and square.anchor == ["circle", "triangle", "star", "cross"]
    assert square.delta_dtype == "float16" and square.templates == ["toy"]


def test_a_bad_entry_fails_alone_naming_the_entry_and_the_field():
    cat = catalogue([
        {"name": "good", "concepts": ["circle"], "method": "esd-x", "options": {"lr": 1e-4}},
        {"name": "negative", "concepts": ["red"], "options": {"lr": -1}},
        {"name": "typo", "concepts": ["red"], "options": {"learnig_rate": 0.1, "iteration": 5}},
        {"name": "method", "concepts": ["red"], "method": "esd-z"},
        {"name": "preserved", "concepts": ["red"], "options": {"preserve": ["red"]}},
        {"name": "inside", "concepts": ["red"], "options": {"method": "esd-u"}},
        {"name": "stray", "concepts": ["red"], "tags": "v2"},
        {"name": "good", "concepts": ["square"]},
        {"concepts": ["red"]},
        "not a mapping",
    ], options={"templates": ["toy"]})
    assert [j.name for j in cat.jobs] == ["good"]
    assert cat.jobs[0].config.templates == ["toy"] and cat.jobs[0].config.lr == 1e-4
    errors = {e.name: e.message for e in cat.errors}
    assert errors["negative"] == "pack 'negative': options.lr: Input should be greater than 0"
    assert errors["typo"].startswith("pack 'typo': options.learnig_rate: unknown option, not an ESDConfig field")
    assert errors["method"].startswith("pack 'method': method: unknown method 'esd-z'; choose one of esd-x")
    assert errors["preserved"] == ("pack 'preserved': options: preserve names an erased concept (red); list other "
                                   "concepts")
    assert errors["inside"] == "pack 'inside': options.method: give method beside options, not inside"
    assert errors["stray"] == "pack 'stray': tags: unknown option, not a catalogue field"
    assert "already taken" in errors["good"]
    assert errors["#9"] == "pack '#9': name: Field required"
    assert errors["#10"].startswith("pack '#10': an entry is a mapping")


def test_an_unknown_option_gets_a_close_match():
    [err] = catalogue([{"name": "a", "concepts": ["red"], "options": {"preserve_wieght": 2}}]).errors
    assert err.message == ("pack 'a': options.preserve_wieght: unknown option, not an ESDConfig field (`erasure train "
                           "--help` lists them); did you mean 'preserve_weight'?")


def test_a_file_that_is_not_a_catalogue_is_one_error(tmp_path):
    from erasure.errors import InvalidArgumentError

    bad = tmp_path / "c.yaml"
    for text, msg in (("packs: [", "is not valid YAML"), ("- a\n- b\n", "must be a mapping"),
                      ("packs: []\n", "packs: List should have at least 1 item"),
                      ("packs: [{name: a, concepts: [b]}]\nbase_rev: x\n", "base_rev: unknown option")):
        bad.write_text(text)
        with pytest.raises(InvalidArgumentError, match=msg.replace("[", r"\[")):
            Catalogue.load(bad)
    with pytest.raises(InvalidArgumentError, match="cannot read catalogue"):
        Catalogue.load(tmp_path / "missing.yaml")


def test_config_hash_covers_the_training_config_and_the_base_only():
    a = ESDConfig(concepts=["circle"], lr=1e-4, preserve=["square"])
    same = ESDConfig.model_validate(yaml.safe_load("{preserve: [square], lr: 0.0001, concepts: [circle]}"))
    h = config_hash("toy", None, a)
    assert len(h) == 64 and config_hash("toy", None, same) == h
    assert config_hash("toy", None, a.model_copy(update={"iterations": 999})) != h
    assert config_hash("toy", "abc", a) != h and config_hash("other/base", None, a) != h
    # entries differing only in name, tag, check or eval size train the same weights: same hash
    cat = catalogue([{"name": "x", "concepts": ["circle"], "options": {"lr": 1e-4, "preserve": ["square"]}},
                     {"name": "y", "concepts": ["circle"], "options": {"lr": 1e-4, "preserve": ["square"]},
                      "tag": "v9", "eval_samples": 3, "check": None}], base="toy")
    assert [j.config_hash for j in cat.jobs] == [h, h]
    assert cat.jobs[1].check is None and cat.jobs[0].check == QuickCheck()


def test_quick_check():
    table = {"circle": {"base": 0.95, "erased": 0.05}, "square": {"base": 1.0, "erased": 0.9},
             "red": {"base": 0.8, "erased": 0.4}}
    check = QuickCheck(max_erased=0.1, min_kept=0.8)
    assert check.problems(["circle"], {"eval": table}) == ["red kept only 50% of its base accuracy (80% -> 40%; "
                                                           "the bar is 80%)"]
    assert QuickCheck(max_erased=0.01).problems(["circle"], {"eval": table}) == [
        "circle still drawn on 5% of its images (base 95%, the bar is 1%)"]
    assert QuickCheck(max_erased=0.1).problems(["circle"], {"eval": table}) == []
    assert "set `check: null`" in QuickCheck().problems(["circle"], {})[0]


@pytest.fixture(scope="module")
def unet():
    return tiny_unet(0)


def publish(reg, tmp_path: Path, unet, repo: str, config: ESDConfig, tag: str | None, seed: int = 0) -> str:
    """Push a pack trained (as its manifest says) with ``config`` on base 'toy'; returns the commit sha."""
    pack = make_pack(None, unet, repo.split("/")[1], config.concepts, seed=seed, base_id="toy")
    pack.manifest = pack.manifest.model_copy(update={"training": config})
    out = tmp_path / f"src-{seed}"
    pack.save_pretrained(out)
    return reg.push(out, repo, tag=tag).commit_sha


def check_reruns(reg, tmp_path, unet):
    cat = catalogue([{"name": "circle", "concepts": ["circle"], "options": {"iterations": 7}},
                     {"name": "red", "concepts": ["red"], "tag": None}], base="toy")
    circle, red = cat.jobs
    assert published_with_same_config(circle, reg) is None  # nothing there yet
    sha = publish(reg, tmp_path, unet, "test/circle", circle.config, "v1")
    found = published_with_same_config(circle, reg)
    assert found is not None and found.commit_sha == sha
    assert manifest_config_hash(reg.read_manifest("test/circle", "v1").manifest) == circle.config_hash
    # the tag names another config: immutable, so this entry fails
    other = catalogue([{"name": "circle", "concepts": ["circle"], "options": {"iterations": 8}}], base="toy").jobs[0]
    with pytest.raises(PushError, match="tag v1 of test/circle already names a pack trained with another config"):
        published_with_same_config(other, reg)
    # without a tag: main's head with another config means "train and commit on top"
    publish(reg, tmp_path, unet, "test/red", red.config.model_copy(update={"lr": 1.0}), None, seed=1)
    assert published_with_same_config(red, reg) is None
    sha = publish(reg, tmp_path, unet, "test/red", red.config, None, seed=2)
    assert published_with_same_config(red, reg).commit_sha == sha


def test_reruns_on_the_local_registry(tmp_path, unet):
    reg = open_registry(registry_dir=tmp_path / "reg")
    check_reruns(reg, tmp_path, unet)
    # read_manifest checks the file against the commit record
    sha = reg.resolve("test/circle", "v1")
    path = tmp_path / "reg" / "test" / "circle" / "commits" / sha / "pack.json"
    path.write_text(path.read_text().replace('"iterations": 7', '"iterations": 6'))
    with pytest.raises(VerificationError, match="sha256 of pack.json does not match"):
        reg.read_manifest("test/circle", "v1")


def test_reruns_on_the_hub(tmp_path, unet, monkeypatch):
    from huggingface_hub import constants

    from registry.hub import HubRegistry

    from hubserver import FakeHub

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-such-token"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_ENDPOINT"):
        monkeypatch.delenv(var, raising=False)
    server = FakeHub(token="hf_test_token").start()
    try:
        check_reruns(HubRegistry(endpoint=server.url, token="hf_test_token", cache_dir=tmp_path / "hf"), tmp_path,
                     unet)
    finally:
        server.stop()


def test_train_many_without_ray_says_what_to_install(tmp_path):
    code = ("import sys; sys.modules['ray'] = None\n"
            "from erasure.cli import main\n"
            f"sys.exit(main(['train-many', {str(TOY_CATALOGUE)!r}]))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert r.returncode == 1
    assert r.stderr == "erasure: error: train-many runs its packs on Ray, which is not installed: pip install " \
                       "'erasure[ray]'\n"


def test_train_many_cli_refuses_a_broken_catalogue(tmp_path, capsys):
    bad = tmp_path / "c.yaml"
    bad.write_text(json.dumps({"packs": [{"name": "a", "concepts": ["red"]}], "bse": "toy"}))
    assert main(["train-many", str(bad)]) == 1
    assert capsys.readouterr().err == f"erasure: error: catalogue {bad}: bse: unknown option, not a catalogue " \
                                      "field\n"


def test_task_resources_follow_the_cluster():
    from registry.train_many import TaskResources

    cpu = TaskResources.for_cluster({"CPU": 2.0})
    assert (cpu.num_cpus, cpu.num_gpus, cpu.device, cpu.threads) == (1, 0, "cpu", 1)
    gpu = TaskResources.for_cluster({"CPU": 64.0, "GPU": 8.0}, cpus_per_pack=4)
    assert (gpu.num_cpus, gpu.num_gpus, gpu.device, gpu.threads) == (4, 1, "cuda", None)
    assert TaskResources.for_cluster({"CPU": 64.0, "GPU": 8.0}, gpus_per_pack=0).device == "cpu"
    assert TaskResources.for_cluster({"CPU": 64.0, "GPU": 8.0}, gpus_per_pack=0.5).num_gpus == 0.5
