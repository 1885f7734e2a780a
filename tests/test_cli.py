"""The erasure CLI: bad input gives one line on stderr and a non-zero exit, never a traceback."""

import json
import subprocess
import sys

import pytest


def run(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "erasure.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


def one_line_error(proc, *needles):
    assert proc.returncode != 0
    err = proc.stderr.strip()
    assert "Traceback" not in proc.stderr and len(err.splitlines()) == 1, proc.stderr
    for needle in needles:
        assert needle in err, err
    return err


@pytest.mark.parametrize("args,needles", [
    (["generate", "", "--out", "x.png"], ["prompt is empty"]),
    (["generate", "   ", "--out", "x.png"], ["prompt is empty"]),
    (["generate", "a red circle", "--steps", "0", "--out", "x.png"], ["--steps", "positive integer"]),
    (["generate", "a red circle", "--steps", "-3", "--out", "x.png"], ["positive integer"]),
    (["generate", "a red circle", "--steps", "many", "--out", "x.png"], ["positive integer"]),
    (["generate", "a red circle", "--base", "/no/such/dir", "--out", "x.png"], ["--base", "no such directory"]),
    (["generate", "a red circle", "--out", "/no/such/dir/x.png"], ["does not exist"]),
    (["generate", "a red circle", "--out", "/etc/hostname/x.png"], ["does not exist"]),
    (["generate", "a red circle", "--out", "/tmp"], ["is a directory"]),
    (["generate", "a red circle"], ["--out"]),
    (["train", "--concept", "circle", "--method", "esd-q", "--out", "p"], ["unknown method 'esd-q'"]),
    (["eval", "--samples", "0"], ["positive integer"]),
])
def test_bad_input_is_one_line_and_non_zero(args, needles, tmp_path):
    one_line_error(run(*args), *needles)


def test_base_directory_that_is_not_a_pipeline(tmp_path):
    one_line_error(run("generate", "a red circle", "--base", str(tmp_path), "--out", str(tmp_path / "x.png")),
                   "not a diffusers pipeline")


def test_help_is_fast_and_lists_commands():
    proc = run("--help", timeout=60)
    assert proc.returncode == 0
    for cmd in ("generate", "eval", "train", "toy"):
        assert cmd in proc.stdout


def test_train_writes_a_pack_that_records_how_it_was_trained(tmp_path):
    from erasure.methods import select_parameters
    from erasure.pack import ConceptPack
    from erasure.pipeline import load_pipeline

    out = tmp_path / "circle"
    proc = run("train", "--concept", "circle", "--method", "esd-x", "--template", "toy", "--iterations", "3",
               "--lr", "1e-3", "--ddim-steps", "4", "--batch-size", "2", "--refresh-every", "2",
               "--pool-trajectories", "1", "--preserve", "square", "--anchor", "star", "--eval-samples", "0",
               "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    pack = ConceptPack.load(out)
    m = pack.manifest
    assert (m.concepts, m.method, m.iterations, m.ddim_steps) == (["circle"], "esd-x", 3, 4)
    assert (m.batch_size, m.refresh_every, m.pool_trajectories) == (2, 2, 1)
    assert (m.templates, m.preserve, m.anchor) == (["toy"], ["square"], ["star"])
    assert sorted(m.tensors) == sorted(select_parameters(load_pipeline("toy").unet, "esd-x"))
    card = (out / "README.md").read_text()
    assert card.startswith("---\n") and "concept-erasure" in card and "esd" in card
    assert (out / "preview.png").stat().st_size > 0
    assert not (out / ".esd-checkpoint.pt").exists() and "wrote pack 'circle'" in proc.stdout

    # the pack evaluates on the held-out templates alone (the grid used to assume a train split)
    table, grid = tmp_path / "eval.json", tmp_path / "eval.png"
    proc = run("eval", "--packs", str(out), "--samples", "10", "--steps", "2", "--splits", "heldout",
               "--json", str(table), "--grid", str(grid))
    assert proc.returncode == 0, proc.stderr
    result = json.loads(table.read_text())
    assert list(result["comparison"]["splits"]) == ["heldout"] and grid.stat().st_size > 0
