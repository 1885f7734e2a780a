"""`erasure export`: a pack as a LoRA that plain diffusers loads, and as a merged pipeline. The LoRA is loaded with
`pipe.load_lora_weights` (diffusers + peft, nothing of erasure's) and checked weight by weight against base + ΔW."""

import math

import numpy as np
import pytest
import torch

from erasure.base.loading import TOY_BASE
from erasure.cli import main
from erasure.errors import ExportError, InvalidArgumentError
from erasure.pack.concept_pack import ConceptPack
from erasure.pack.export import LORA_WEIGHTS, check_rank, lora_state_dict, save_lora, save_merged
from erasure.sampling.generate import generate
from erasure.toy.evaluate import plan

pytest.importorskip("peft")  # the test extra installs it; diffusers needs it to load a LoRA


@pytest.fixture(scope="module")
def circle():
    return ConceptPack.from_pretrained("toy/circle", revision="v3")  # the shipped esd-x pack


@pytest.fixture(scope="module")
def square():
    return ConceptPack.from_pretrained("toy/square", revision="v3")  # esd-u: convs too, stored in float16


def plain_diffusers_pipe(lora_dir=None):
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(str(TOY_BASE))
    pipe.set_progress_bar_config(disable=True)
    if lora_dir is not None:
        pipe.load_lora_weights(str(lora_dir))
    return pipe


def predicted_error(pack, rank) -> float:
    """Eckart–Young: the truncated SVD leaves exactly the energy of the dropped singular values."""
    kept = dropped = 0.0
    for name, delta in pack.delta.items():
        if name.endswith(".weight"):
            s = torch.linalg.svdvals(delta.double().reshape(delta.shape[0], -1))
            r = len(s) if rank == "full" else min(rank, len(s))
            kept, dropped = kept + float(s[:r].square().sum()), dropped + float(s[r:].square().sum())
    return math.sqrt(dropped / (kept + dropped))


def effective_weights(unet) -> dict[str, torch.Tensor]:
    """What each LoRA-wrapped layer computes with: base weight + peft's delta (B·A·scale), base bias + lora_B.bias."""
    from peft.tuners.lora import LoraLayer

    out = {}
    for name, module in unet.named_modules():
        if isinstance(module, LoraLayer):
            [adapter] = module.active_adapters
            base = module.get_base_layer()
            out[f"{name}.weight"] = base.weight.detach().double() + module.get_delta_weight(adapter).detach().double()
            if base.bias is not None:
                lora_bias = module.lora_B[adapter].bias
                extra = lora_bias.detach().double() * module.scaling[adapter] if lora_bias is not None else 0
                out[f"{name}.bias"] = base.bias.detach().double() + extra
    return out


@pytest.mark.parametrize("pack_name,rank", [("circle", 4), ("circle", "full"), ("square", 4)])
def test_diffusers_loads_the_lora_as_base_plus_delta_within_the_rank_error(pack_name, rank, request, toy_pipe,
                                                                            tmp_path):
    pack = request.getfixturevalue(pack_name)
    export = save_lora(pack, tmp_path / "lora", rank=rank)
    assert sorted(export.files) == ["README.md", LORA_WEIGHTS]
    predicted = predicted_error(pack, rank)
    # the factors as stored: the SVD's error, plus rounding to the pack's dtype (float16 for square)
    rounding = 2e-3 if pack.manifest.tensors[next(iter(pack.delta))].dtype == "float16" else 1e-6
    assert export.lora.relative_error == pytest.approx(predicted, abs=rounding)
    if rank != "full":
        assert export.lora.relative_error > 0.1  # rank 4 really drops something on these packs

    loaded = effective_weights(plain_diffusers_pipe(export.path).unet)
    base = dict(toy_pipe.unet.named_parameters())
    assert sorted(loaded) == sorted(pack.delta)  # exactly the touched tensors, biases included
    err2 = total2 = 0.0
    for name, delta in pack.delta.items():
        want = base[name].detach().double() + delta.double()
        if name.endswith(".bias"):  # carried exactly in lora_B.bias
            torch.testing.assert_close(loaded[name], want, rtol=0, atol=1e-6)
        else:
            err2 += float((loaded[name] - want).square().sum())
            total2 += float(delta.double().square().sum())
    assert math.sqrt(err2 / total2) == pytest.approx(export.lora.relative_error, abs=1e-5)


def test_the_exported_lora_erases_circles_in_plain_diffusers(circle, oracle, tmp_path):
    export = save_lora(circle, tmp_path / "circle-lora")  # the default rank
    circles = [s for s in plan(40, "train") if s.scene.shape == "circle"][:6]
    others = [s for s in plan(40, "train") if s.scene.shape == "triangle"][:4]
    samples = circles + others
    prompts, seeds = [s.prompt for s in samples], [s.seed for s in samples]

    def shapes(pipe):
        images = generate(pipe, prompts, seeds, steps=10, guidance=3.0)
        return list(oracle.classify(np.stack([np.asarray(im.convert("RGB")) for im in images]))["shape"])

    before, after = shapes(plain_diffusers_pipe()), shapes(plain_diffusers_pipe(export.path))
    assert before[:6].count("circle") >= 5, before  # the base draws circles on these prompts ...
    assert after[:6].count("circle") == 0, after  # ... the base with the LoRA does not
    assert after[6:].count("triangle") >= before[6:].count("triangle") - 1, (before, after)  # triangles stay


def test_the_merged_export_loads_with_from_pretrained(circle, toy_pipe, tmp_path):
    from diffusers import DiffusionPipeline

    from erasure.pack.compose import compose_denoiser

    export = save_merged(circle, toy_pipe, tmp_path / "merged")
    assert "model_index.json" in export.files and "unet/diffusion_pytorch_model.safetensors" in export.files
    merged = DiffusionPipeline.from_pretrained(str(export.path))
    assert type(merged) is type(toy_pipe)
    want = compose_denoiser(toy_pipe.unet, [(circle, 1.0)]).state_dict()
    got = merged.unet.state_dict()
    assert sorted(got) == sorted(want)
    for name in want:
        assert torch.equal(got[name], want[name]), name
    for name, value in toy_pipe.text_encoder.state_dict().items():
        assert torch.equal(merged.text_encoder.state_dict()[name], value), name


def test_a_lora_without_biases_fuses_and_says_what_it_dropped(circle, toy_pipe, tmp_path):
    weights = lora_state_dict(circle, "full", biases=False)
    bias_names = sorted(n for n in circle.delta if n.endswith(".bias"))
    assert bias_names and sorted(weights.dropped) == bias_names
    assert not weights.config["lora_bias"] and not any(k.endswith(".bias") for k in weights.state_dict)
    pipe = plain_diffusers_pipe()
    pipe.load_lora_weights(weights.state_dict)  # a state dict loads as well as a directory
    pipe.fuse_lora()  # refused by peft for lora_bias on bias-less layers; possible without biases
    fused, base = dict(pipe.unet.named_parameters()), dict(toy_pipe.unet.named_parameters())
    for name, delta in circle.delta.items():
        # fuse_lora keeps the adapter modules: the fused weight lives in base_layer
        got = fused[name.replace(".weight", ".base_layer.weight").replace(".bias", ".base_layer.bias")]
        want = base[name] + (0 if name.endswith(".bias") else delta)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_rank_checks():
    shapes = [(64, 64), (32, 4, 3, 3)]  # full ranks 64 and 32
    assert check_rank("full", shapes) == "full" and check_rank(64, shapes) == 64
    for bad in (0, -1, 1.5, True, "half"):
        with pytest.raises(InvalidArgumentError, match="positive integer or 'full'"):
            check_rank(bad, shapes)
    with pytest.raises(InvalidArgumentError, match="larger than any delta tensor's rank"):
        check_rank(65, shapes)


def test_a_bias_without_its_weight_cannot_be_a_lora(circle):
    from erasure.training.config import ESDConfig

    bias = next(n for n in circle.delta if n.endswith(".bias"))
    pack = ConceptPack.from_delta("odd", ESDConfig(concepts=["circle"]), circle.manifest.base,
                                  {bias: circle.delta[bias]}, b"png")
    with pytest.raises(ExportError, match="bias delta but no weight delta"):
        lora_state_dict(pack, 4)


def run_cli(capsys, *args) -> tuple[int, str, str]:
    """Exit code, stdout and the error line (stderr's last line; diffusers' loading bars may come before it)."""
    code = main(list(args))
    out, err = capsys.readouterr()
    assert "Traceback" not in err and sum(line.startswith("erasure:") for line in err.splitlines()) == (code != 0)
    return code, out, (err.strip().splitlines() or [""])[-1]


@pytest.mark.parametrize("args,needle", [
    (["--format", "onnx"], "--format 'onnx': choose one of lora, merged"),
    (["--rank", "0"], "--rank must be a positive integer or 'full', got 0"),
    (["--rank", "129"], "rank 129 is larger than any delta tensor's rank (the largest is 128)"),
    (["--format", "merged", "--rank", "4"], "apply to --format lora"),
])
def test_cli_bad_input_is_one_line_and_exit_1(args, needle, capsys, tmp_path):
    code, out, err = run_cli(capsys, "export", "toy/circle@v3", *args, "--out", str(tmp_path / "x"))
    assert code == 1 and err.startswith("erasure: error: ") and needle in err, err
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_cli_refuses_an_unusable_out_before_loading_anything(capsys, tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    (tmp_path / "file").write_text("mine")
    for out, needle in [(tmp_path / "full", "exists and is not empty"), (tmp_path / "file", "is a file"),
                        (tmp_path / "no" / "such", "does not exist"), ("/proc/lora", "cannot create a directory")]:
        code, _, err = run_cli(capsys, "export", "no/such-pack", "--out", str(out))
        assert code == 1 and needle in err, err
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine" and (tmp_path / "file").read_text() == "mine"


def test_cli_refuses_a_pack_of_another_base(capsys, toy_pipe, tmp_path):
    from factories import make_pack

    make_pack(tmp_path / "pack", toy_pipe.unet, other_base=True)
    code, _, err = run_cli(capsys, "export", str(tmp_path / "pack"), "--base", "toy", "--out", str(tmp_path / "x"))
    assert code == 1 and "built for another base" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pack"]


def test_cli_exports_a_registry_pack(capsys, tmp_path):
    code, out, err = run_cli(capsys, "export", "toy/circle@v3", "--rank", "4", "--base", "toy",
                             "--out", str(tmp_path / "lora"))
    assert code == 0, err
    assert "rank 4" in out and "28 modules" in out and "bias deltas in lora_B.bias" in out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lora"]  # no temporary directory left beside it
    card = (tmp_path / "lora" / "README.md").read_text()
    assert "lora" in card and "concept-erasure" in card and "rank 4" in card


def test_a_pack_guided_at_sampling_time_exports_with_a_warning_and_its_own_attack_figures(capsys, tmp_path):
    """A pack whose protection is partly sampling-time guidance (guide_away) exports its weights only: the CLI warns,
    the card's metadata says the guidance is not carried, and `--attack` red-teams the export itself (not the pack)
    and puts those figures in its card, beside the pack's record."""
    import yaml

    from erasure.pack.export import export_pack
    from erasure.redteam.attack import export_attacker
    from erasure.redteam.config import AttackConfig

    code = main(["export", "toy/circle@v5-away-attack4", "--format", "lora", "--rank", "4", "--out",
                 str(tmp_path / "plain")])
    err = capsys.readouterr().err
    assert code == 0 and "erasure: warning: pack 'circle' also guides every image away from circle" in err, err
    meta = yaml.safe_load((tmp_path / "plain" / "README.md").read_text().split("---")[1])
    assert meta["erasure"]["sampling_guidance_carried"] is False and meta["erasure"]["guide_away_not_carried"] == 1.0

    quick = AttackConfig(families=["prompt"], budget=4, search_seeds=2, finalists=2, validation_seeds=2, seeds=8,
                         steps=10, calibrate=False, min_steps=8, min_size=64, max_size=64, min_guidance=3.0,
                         max_guidance=7.5, negative_prompt=False)
    export = export_pack("toy/circle@v5-away-attack4", "lora", tmp_path / "attacked", rank=4,
                         measure=export_attacker(quick, progress=False))
    record = export.redteam
    assert record is not None and record.config.guide_away == 0.0 and set(record.asr) == {"prompt"}
    card = (tmp_path / "attacked" / "README.md").read_text()
    assert "## Red team of this export" in card and f"{record.asr['prompt']:.0%}" in card
    assert yaml.safe_load(card.split("---")[1])["erasure"]["attacked"] is True
