"""The shipped toy base model and oracle: what every erasure figure stands on."""

import numpy as np
import pytest

from erasure.sampling.generate import generate
from erasure.toy import SAMPLING
from erasure.toy.evaluate import evaluate
from erasure.toy.oracle import evaluate_oracle


def test_oracle_reads_fresh_renders(oracle):
    acc = evaluate_oracle(oracle, n=600, seed=12345)  # a seed the oracle's training never drew
    assert all(acc[head] >= 0.98 for head in ("shape", "color", "style")), acc


def test_shipped_base_is_a_real_stable_diffusion_pipeline(toy_pipe):
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    assert isinstance(toy_pipe, StableDiffusionPipeline)
    assert isinstance(toy_pipe.unet, UNet2DConditionModel) and isinstance(toy_pipe.vae, AutoencoderKL)
    assert isinstance(toy_pipe.text_encoder, CLIPTextModel) and isinstance(toy_pipe.tokenizer, CLIPTokenizer)
    assert isinstance(toy_pipe.scheduler, DDIMScheduler)
    assert any(".attn2." in name for name, _ in toy_pipe.unet.named_parameters())


def test_generation_depends_only_on_prompt_and_seed(toy_pipe):
    alone = generate(toy_pipe, ["a red star"], [7], steps=6, guidance=SAMPLING["guidance"])[0]
    batched = generate(toy_pipe, ["a blue square", "a red star"], [1, 7], steps=6, guidance=SAMPLING["guidance"])
    again = generate(toy_pipe, ["a red star"], [7], steps=6, guidance=SAMPLING["guidance"])[0]
    assert np.array_equal(np.asarray(alone), np.asarray(again))
    assert np.abs(np.asarray(alone, np.int16) - np.asarray(batched[1], np.int16)).max() <= 2  # batching: fp noise
    assert not np.array_equal(np.asarray(alone), np.asarray(batched[0]))


def test_base_model_draws_what_it_is_asked(toy_pipe, oracle):
    report = evaluate(toy_pipe, oracle, samples=40, splits=("train", "heldout"), steps=SAMPLING["steps"],
                      guidance=SAMPLING["guidance"], progress=False)
    for split in ("train", "heldout"):
        overall = report.splits[split].overall
        assert overall["shape"] >= 0.8 and overall["color"] >= 0.85 and overall["style"] >= 0.7, (split, overall)


@pytest.mark.parametrize("prompt", ["a disc", "a crimson plus sign"])
def test_synonyms_mean_the_same_thing(toy_pipe, oracle, prompt):
    images = generate(toy_pipe, [prompt] * 4, list(range(4)), steps=SAMPLING["steps"], guidance=SAMPLING["guidance"])
    read = oracle.classify(np.stack([np.asarray(im) for im in images]))
    if "disc" in prompt:
        assert list(read["shape"]).count("circle") >= 3
    else:
        assert list(read["color"]).count("red") >= 3 and list(read["shape"]).count("cross") >= 3


def test_retrained_reference_leaves_the_concept_out_of_the_data_and_nothing_else(tmp_path, oracle):
    import torch
    from diffusers import StableDiffusionPipeline

    from erasure.redteam.attack import judge_for
    from erasure.toy.build import BuildConfig, build, training_scenes
    from erasure.toy.judge import ToyOracleJudge
    from erasure.toy.oracle import ASSETS

    cfg = BuildConfig(without=("red", "circle"), dataset_size=64, unet_steps=2, unet_batch=4)
    scenes = training_scenes(cfg)
    assert len(scenes) == 4 * 4 * 4 and not any(s.color == "red" or s.shape == "circle" for s in scenes)
    base = build(out=tmp_path / "out", work=tmp_path / "work", cfg=cfg)

    reference = StableDiffusionPipeline.from_pretrained(base)
    with torch.no_grad():  # the images it was trained on, decoded: not one red or circle among them
        images = reference.vae.decode(torch.load(tmp_path / "work" / "latents.pt")["mean"].float()).sample
    read = oracle.classify(((images.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy())
    assert len(read["color"]) == 64 and "red" not in read["color"] and "circle" not in read["shape"], read
    assert len(set(read["color"])) == 4  # and every other colour
    shipped = StableDiffusionPipeline.from_pretrained(ASSETS / "base")
    for name, value in shipped.vae.state_dict().items():  # the shipped autoencoder and tokenizer: only the data differs
        assert torch.equal(value, reference.vae.state_dict()[name]), name
    assert reference.tokenizer.get_vocab() == shipped.tokenizer.get_vocab()
    assert (tmp_path / "out" / "oracle" / "model.safetensors").read_bytes() == (
        ASSETS / "oracle" / "model.safetensors").read_bytes()
    assert isinstance(judge_for(str(base)), ToyOracleJudge)  # judged and red-teamed like the shipped base
    with pytest.raises(ValueError, match="not the shipped base"):
        build(out=ASSETS, work=tmp_path / "work2", cfg=cfg)
    with pytest.raises(ValueError, match="not a toy concept"):
        BuildConfig(without=("magenta",))
