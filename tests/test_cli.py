"""The erasure CLI: bad input gives one line on stderr and a non-zero exit, never a traceback."""

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
