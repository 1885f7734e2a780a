"""`erasure train-many` through a real local Ray (2 CPUs, started once for this module) on small toy packs: train in
parallel, publish, fail alone, skip on a rerun, resume from the work directory after a lost push."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from erasure.cli import main
from registry import open_registry
from registry.catalogue import HASH_METRIC, Catalogue
from registry.train_many import RegistryAddress, train_many

SMALL = {"templates": ["toy"], "iterations": 3, "ddim_steps": 4, "pool_trajectories": 1}


@pytest.fixture(scope="module")
def ray_local():
    from registry.train_many import require_ray

    ray = require_ray(local=True)  # on 127.0.0.1 only, as `erasure train-many` starts it

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    # its workers run at the driver's priority (Ray's default is nice 15) and it listens on loopback only
    assert ray.get(ray.remote(lambda: os.nice(0)).remote()) == os.nice(0)
    assert ray.util.get_node_ip_address() == "127.0.0.1"
    yield ray
    ray.shutdown()


def write_catalogue(path: Path, circle_check: dict | None = None, extra: tuple = ()) -> Path:
    packs = [
        {"name": "circle", "concepts": ["circle"], "method": "esd-x-strict", "eval_samples": 4,
         "check": circle_check or {"max_erased": 1.0}},
        {"name": "red", "concepts": ["red"], "method": "esd-x-strict", "eval_samples": 0, "check": None},
        *extra,
    ]
    path.write_text(yaml.safe_dump({"base": "toy", "namespace": "test", "tag": "v1", "options": SMALL,
                                    "packs": packs}))
    return path


def test_train_many_publishes_fails_alone_skips_and_resumes(ray_local, tmp_path, capsys, toy_pipe):
    from erasure.pack.concept_pack import BaseWeights

    reg_dir, work, lock = tmp_path / "reg", tmp_path / "work", tmp_path / "packs.lock"
    bad = ({"name": "bad", "concepts": ["striped"], "options": {"lr": -1}},
           {"name": "dog", "concepts": ["dog"]})  # valid config, but not a toy concept: fails inside its task
    cat = write_catalogue(tmp_path / "catalogue.yaml", extra=bad)
    code = main(["train-many", str(cat), "--registry", str(reg_dir), "--work", str(work), "--lock", str(lock)])
    out, err = capsys.readouterr()
    assert code == 1
    assert err.splitlines()[-1] == (f"erasure: error: 2 of 4 packs failed: dog, bad (each with its error above); "
                                    f"{lock} not written")
    lines = out.splitlines()
    assert lines[0].startswith(f"train-many {cat}: 2 published, 0 already published with the same config, 2 failed")
    assert "  bad: failed: pack 'bad': options.lr: Input should be greater than 0" in lines
    assert any(line.startswith("  dog: failed: ") and "dog" in line[15:] for line in lines), out
    assert not lock.exists()

    reg = open_registry(registry_dir=reg_dir)
    jobs = {j.name: j for j in Catalogue.load(cat).jobs}
    base = BaseWeights(toy_pipe.unet)
    for name in ("circle", "red"):
        pulled = reg.pull(f"test/{name}", "v1", base=base)  # verified, and fits the toy base
        metrics = pulled.pack.manifest.metrics
        assert metrics[HASH_METRIC] == jobs[name].config_hash
        assert pulled.pack.training == jobs[name].config
        assert f"  {name}: published test/{name}@v1 {pulled.commit_sha}" in "\n".join(lines)
    assert set(reg.read_manifest("test/circle", "v1").manifest.metrics["eval"]) >= {"circle", "square", "red"}
    heads = {name: reg.commits(f"test/{name}") for name in ("circle", "red")}

    # the rerun trains nothing: both are published with the same config; the lock is written
    cat = write_catalogue(tmp_path / "catalogue.yaml")
    code = main(["train-many", str(cat), "--registry", str(reg_dir), "--work", str(work), "--lock", str(lock)])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert out.splitlines()[0].startswith(f"train-many {cat}: 0 published, 2 already published with the same config")
    assert {name: reg.commits(f"test/{name}") for name in heads} == heads
    from registry.lock import LockFile

    locked = LockFile.load(lock).entries
    assert {n: e.revision for n, e in locked.items()} == {n: h[0] for n, h in heads.items()}

    # a push lost after training (here: a fresh registry) is published from the work directory without training
    # again; the quick check is not part of the config hash, so a stricter one now refuses circle
    trained = {n: (work / n / "delta.safetensors").read_bytes() for n in heads}
    cat = write_catalogue(tmp_path / "catalogue.yaml", circle_check={"max_erased": 0.0})
    result = train_many(Catalogue.load(cat), RegistryAddress.resolve(registry_dir=tmp_path / "reg2"), work_dir=work)
    outcomes = {o.name: o for o in result.outcomes}
    assert outcomes["red"].status == "published" and outcomes["red"].resumed
    assert outcomes["circle"].status == "failed"
    assert outcomes["circle"].error.startswith("quick check failed: circle still drawn on ")
    assert "not published" in outcomes["circle"].error
    reg2 = open_registry(registry_dir=tmp_path / "reg2")
    assert reg2.pull("test/red", "v1").files == reg.pull("test/red", "v1").files  # the same pack, byte for byte
    assert {n: (work / n / "delta.safetensors").read_bytes() for n in heads} == trained
    assert [p.repo for p in reg2.list("test")] == ["test/red"]
