"""The erasure CLI: bad input gives one line on stderr and a non-zero exit, never a traceback."""

import json
import subprocess
import sys

import pytest

from erasure.cli import TOY_ASSETS


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
    (["train", "--concept", "circle", "--method", "esd-q", "--out", "p"], ["--method", "'esd-q'", "esd-x-strict"]),
    (["train", "--concept", "circle", "--iterations", "0", "--out", "p"], ["--iterations", "greater than 0"]),
    (["train", "--concept", "circle", "--preserve", "circle", "--out", "p"], ["preserve names an erased concept"]),
    (["train", "--concept", "circle", "--lr", "fast", "--out", "p"], ["--lr", "invalid float"]),
    (["train", "--concept", "red", "--method", "uce", "--out", "p"], ["method uce", "give --anchor"]),
    (["train", "--concept", "red", "--method", "uce", "--anchor", "green", "--unnamed-weight", "1", "--out", "p"],
     ["closed-form edit", "unnamed_weight"]),
    (["eval", "--samples", "0"], ["positive integer"]),
    (["toy", "build", "--without", "magenta"], ["--without", "invalid choice: 'magenta'", "'red'"]),
    (["toy", "build", "--without", "red", "--out", str(TOY_ASSETS)], ["--without", "not the shipped base"]),
    (["attack"], ["name a pack to attack"]),
    (["attack", "--concept", "nudity"], ["judge cannot read concept 'nudity'"]),
    (["attack", "--concept", "red", "--budget", "0"], ["--budget", "greater than 0"]),
    (["attack", "--concept", "red", "--family", "jailbreak"], ["--family", "'prompt', 'settings', 'soft-prompt'"]),
    (["attack", "--concept", "red", "--known-from", "no such"], ["namespace 'no such' is not a valid name"]),
    (["attack", "no/such/pack/dir", "--record"], ["--record", "not one"]),
])
def test_bad_input_is_one_line_and_non_zero(args, needles, tmp_path):
    one_line_error(run(*args), *needles)


def test_base_directory_that_is_not_a_pipeline(tmp_path):
    one_line_error(run("generate", "a red circle", "--base", str(tmp_path), "--out", str(tmp_path / "x.png")),
                   "not a diffusers pipeline")


def test_help_lists_every_command_without_importing_torch():
    proc = run("--help", timeout=60)
    assert proc.returncode == 0
    for cmd in ("generate", "eval", "train", "toy", "push", "pull", "list", "lock"):  # registry's come by entry point
        assert cmd in proc.stdout
    probe = ("import sys; from erasure.cli import build_parser; build_parser().parse_args(['train', '--help'])")
    check = subprocess.run([sys.executable, "-c", probe + "\n"], capture_output=True, text=True, timeout=60)
    assert check.returncode == 0 and "--preserve-unconditional" in check.stdout
    for command in ("train", "export", "attack"):  # the commands whose flags come from torch-free modules
        heavy = ("import sys, contextlib, io\nfrom erasure.cli import build_parser\n"
                 "with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
                 f"    build_parser().parse_args([{command!r}, '--help'])\n"
                 "print(sorted(m for m in ('torch', 'diffusers', 'transformers', 'huggingface_hub', 'peft') "
                 "if m in sys.modules))")
        loaded = subprocess.run([sys.executable, "-c", heavy], capture_output=True, text=True, timeout=60)
        assert loaded.stdout.strip() == "[]", (command, loaded.stdout + loaded.stderr)


def test_train_flags_are_generated_from_the_config():
    from erasure.cli import build_parser, model_from_args
    from erasure.training.config import ESDConfig

    args = build_parser().parse_args(["train", "--concept", "circle", "--concept", "red", "--lr", "3e-4",
                                      "--preserve-unconditional", "--template", "a photo of {}", "--out", "x"])
    cfg = model_from_args(ESDConfig, args)
    assert cfg == ESDConfig(concepts=["circle", "red"], lr=3e-4, preserve_unconditional=True,
                            templates=["a photo of {}"])
    assert model_from_args(ESDConfig, build_parser().parse_args(["train", "--concept", "c", "--out", "x"])) == \
        ESDConfig(concepts=["c"])  # flags not given keep the config's defaults


def test_train_writes_a_pack_that_records_how_it_was_trained(tmp_path):
    from erasure.base.loading import load_pipeline
    from erasure.pack.concept_pack import ConceptPack
    from erasure.training.methods import select_parameters

    out = tmp_path / "circle"
    proc = run("train", "--concept", "circle", "--method", "esd-x", "--template", "toy", "--iterations", "3",
               "--lr", "1e-3", "--ddim-steps", "4", "--batch-size", "2", "--refresh-every", "2",
               "--pool-trajectories", "1", "--preserve", "square", "--anchor", "star", "--eval-samples", "0",
               "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    pack = ConceptPack.from_pretrained(out)
    t = pack.training
    assert (t.concepts, t.method, t.iterations, t.ddim_steps) == (["circle"], "esd-x", 3, 4)
    assert (t.batch_size, t.refresh_every, t.pool_trajectories) == (2, 2, 1)
    assert (t.templates, t.preserve, t.anchor) == (["toy"], ["square"], ["star"])
    assert sorted(pack.manifest.tensors) == sorted(select_parameters(load_pipeline("toy").unet, "esd-x"))
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


def test_attack_refuses_a_pack_it_cannot_judge_or_built_for_another_base(tmp_path, toy_pipe):
    from factories import make_pack

    make_pack(tmp_path / "alien", toy_pipe.unet, "alien", ("nudity",), base_id="toy")
    one_line_error(run("attack", str(tmp_path / "alien")), "judge cannot read concept 'nudity'")
    make_pack(tmp_path / "other", toy_pipe.unet, "other", ("circle",), other_base=True)
    one_line_error(run("attack", str(tmp_path / "other"), "--budget", "1"), "pack 'other'", "another base")
