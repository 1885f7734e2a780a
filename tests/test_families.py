"""SD 2.x (v-prediction) and SDXL on architecture-true tiny pipelines: conditioning as the pipeline computes it,
the ESD objective in eps-space, the method filters on SDXL's UNet, family checks, half-precision training."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from erasure.base.conditioning import Conditioning
from erasure.base.families import conditioner_for, family_of
from erasure.errors import PackMismatchError, UnsupportedBaseError
from erasure.training.config import ESDConfig
from erasure.training.methods import select_parameters
from erasure.training.trainer import ESDTrainer

from factories import make_pack, tiny_dit_pipe, tiny_sd2_pipe, tiny_sdxl_pipe

TINY = dict(lr=1e-3, ddim_steps=4, pool_trajectories=1, batch_size=2, refresh_every=2)


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    return tiny_sdxl_pipe(tmp_path_factory.mktemp("sdxl"))


@pytest.fixture(scope="module")
def sd2(tmp_path_factory):
    return tiny_sd2_pipe(tmp_path_factory.mktemp("sd2"))


def unet_inputs(pipe, **call):
    """The keyword arguments the pipeline's own __call__ passes to its UNet on the first denoising step."""
    seen = []
    handle = pipe.unet.register_forward_pre_hook(lambda m, args, kwargs: seen.append((args, kwargs)),
                                                 with_kwargs=True)
    try:
        pipe(num_inference_steps=1, output_type="latent", **call)
    finally:
        handle.remove()
    return seen[0][1]


def test_sdxl_conditioning_is_what_the_pipeline_feeds_its_unet(sdxl):
    cond = conditioner_for(sdxl)
    assert cond.family == family_of(sdxl).name == "sdxl"
    prompts = ["a red circle", "a striped blue star"]
    kwargs = unet_inputs(sdxl, prompt=prompts, guidance_scale=3.0, height=64, width=48)
    mine = Conditioning.cat([cond.unconditional(2, size=(64, 48)), cond.encode(prompts, size=(64, 48))])
    torch.testing.assert_close(mine.encoder_hidden_states, kwargs["encoder_hidden_states"])
    for key in ("text_embeds", "time_ids"):
        torch.testing.assert_close(mine.added_cond_kwargs[key], kwargs["added_cond_kwargs"][key])
    # force_zeros_for_empty_prompt: the unconditional branch is zeros, not encode("")
    u = cond.unconditional(1)
    assert not u.encoder_hidden_states.any() and not u.added_cond_kwargs["text_embeds"].any()
    # the pieces, against the pipeline's own helpers
    emb, _, pooled, _ = sdxl.encode_prompt(prompts, device="cpu", do_classifier_free_guidance=False)
    c = cond.encode(prompts)
    assert emb.shape[-1] == 16 + 24  # both encoders' penultimate hidden states, concatenated
    torch.testing.assert_close(c.encoder_hidden_states, emb)
    torch.testing.assert_close(c.added_cond_kwargs["text_embeds"], pooled)
    ids = sdxl._get_add_time_ids((64, 64), (0, 0), (64, 64), dtype=torch.float32,
                                 text_encoder_projection_dim=sdxl.text_encoder_2.config.projection_dim)
    torch.testing.assert_close(c.added_cond_kwargs["time_ids"], ids.repeat(2, 1))  # default: the native size


def test_sdxl_without_force_zeros_guides_with_the_empty_prompt(tmp_path):
    from erasure.sampling.generate import share_pipeline

    pipe = tiny_sdxl_pipe(tmp_path)
    pipe.register_to_config(force_zeros_for_empty_prompt=False)
    pipe = share_pipeline(pipe)  # the setting survives a shared copy (the service builds one per request)
    assert pipe.config.force_zeros_for_empty_prompt is False
    kwargs = unet_inputs(pipe, prompt=["a red circle"], guidance_scale=3.0)
    u = conditioner_for(pipe).unconditional(1)
    assert u.encoder_hidden_states.abs().sum() > 0
    torch.testing.assert_close(u.encoder_hidden_states, kwargs["encoder_hidden_states"][:1])
    torch.testing.assert_close(u.added_cond_kwargs["text_embeds"], kwargs["added_cond_kwargs"]["text_embeds"][:1])


def test_sd2_conditioning_is_what_the_pipeline_feeds_its_unet(sd2):
    cond = conditioner_for(sd2)
    assert cond.family == "sd" and cond.prediction_type == "v_prediction"
    kwargs = unet_inputs(sd2, prompt=["a red circle"], guidance_scale=3.0)
    mine = Conditioning.cat([cond.unconditional(1), cond.encode(["a red circle"])])
    torch.testing.assert_close(mine.encoder_hidden_states, kwargs["encoder_hidden_states"])
    assert "added_cond_kwargs" not in mine.denoiser_kwargs()


def test_v_prediction_esd_target_and_loss_are_the_eps_space_ones(sd2):
    """v = eps / a - (s / a) x_t is affine in eps at a fixed x_t: the target written on v-predictions is the v of
    the eps-space target, and the trainer's loss on v equals the eps-space loss (weight a^2 = alphas_cumprod)."""
    trainer = ESDTrainer(sd2, ESDConfig(concepts=["circle"], iterations=1, eta=1.5, **TINY), progress=False)
    sched, t = trainer.scheduler, trainer.timesteps[[0, 2]]
    a = sched.alphas_cumprod[t].sqrt().view(-1, 1, 1, 1)
    s = (1 - sched.alphas_cumprod[t]).sqrt().view(-1, 1, 1, 1)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    x = sched.add_noise(x0, noise, t)
    torch.testing.assert_close(a * sched.get_velocity(x0, noise, t) + s * x, noise)  # eps = a v + s x_t

    def eps(v):
        return a * v + s * x

    c, c0 = trainer.encode(["circle"] * 2), trainer.encode([""] * 2)
    v_c, v_0 = trainer.predict(trainer.frozen, x, t, c), trainer.predict(trainer.frozen, x, t, c0)
    target = trainer._targets(x, t, c, c0)
    torch.testing.assert_close(eps(target), eps(v_0) - 1.5 * (eps(v_c) - eps(v_0)), rtol=1e-4, atol=1e-5)
    pred = trainer.predict(trainer.denoiser, x, t, c) + 0.1 * torch.randn(2, 4, 8, 8, generator=g)
    torch.testing.assert_close(trainer.mse(pred, target, t), F.mse_loss(eps(pred), eps(target)))
    assert not torch.allclose(trainer.mse(pred, target, t), F.mse_loss(pred, target))  # not the raw v loss


def test_method_filters_on_sdxls_unet(sdxl):
    from diffusers.models.attention import BasicTransformerBlock

    unet = sdxl.unet
    blocks = [n for n, m in unet.named_modules() if isinstance(m, BasicTransformerBlock)]
    assert len(blocks) == 2 * 2 + 2 * 3 + 3 + 3 * 3 + 3 * 2  # several transformer layers per block, as SDXL
    assert any(b.endswith(".transformer_blocks.2") for b in blocks)
    esd_x = select_parameters(unet, "esd-x")
    expected = [f"{b}.attn2.{p}" for b in blocks
                for p in ("to_q.weight", "to_k.weight", "to_v.weight", "to_out.0.weight", "to_out.0.bias")]
    assert sorted(esd_x) == sorted(expected)
    strict = select_parameters(unet, "esd-x-strict")
    assert sorted(strict) == sorted(f"{b}.attn2.{p}.weight" for b in blocks for p in ("to_k", "to_v"))
    esd_u, esd_all = set(select_parameters(unet, "esd-u")), set(select_parameters(unet, "esd-all"))
    assert esd_u.isdisjoint(esd_x) and esd_u | set(esd_x) == esd_all
    assert "add_embedding.linear_1.weight" in esd_u  # the text_time embedding is a Linear outside attn2


def test_sdxl_trains_with_pooled_embeddings_and_time_ids(sdxl):
    cfg = ESDConfig(concepts=["circle"], iterations=2, preserve=["square"], preserve_unconditional=True, **TINY)
    trainer = ESDTrainer(sdxl, cfg, progress=False)
    trainer.train()
    pool = trainer.pool["circle"]
    assert set(pool["c"].added_cond_kwargs) == {"text_embeds", "time_ids"}
    assert torch.equal(pool["c"].added_cond_kwargs["time_ids"][0], torch.tensor([64.0, 64, 0, 0, 64, 64]))
    assert not pool["c0"].encoder_hidden_states.any()  # c0 = "" is SDXL's zero unconditional branch
    delta = trainer.delta()
    assert set(delta) == set(select_parameters(sdxl.unet, "esd-x")) and any(d.abs().sum() > 0 for d in delta.values())


@pytest.mark.parametrize("family", ["sdxl", "sd2"])
def test_uce_reads_the_hidden_states_the_unet_sees_and_edits_keys_and_values(family, tmp_path):
    """The closed-form edit encodes prompts as one uncached batch: the same rows as the trainer's conditioning (SDXL's
    empty prompt as zeros); it changes exactly the to_k / to_v weights."""
    from erasure.training.methods.uce import edit_in_closed_form

    pipe = (tiny_sdxl_pipe if family == "sdxl" else tiny_sd2_pipe)(tmp_path)  # its own: the edit writes the weights
    cond = conditioner_for(pipe)
    prompts = ["a red circle", "", "a striped blue star"]
    torch.testing.assert_close(cond.hidden_states(prompts), cond.encode(prompts).encoder_hidden_states)
    cfg = ESDConfig(concepts=["red"], method="uce", templates=["a photo of a {} circle"], anchor=["green"],
                    preserve=["blue"], edit_prompts=8)
    trainer = ESDTrainer(pipe, cfg, progress=False)
    assert 0 < edit_in_closed_form(trainer) < 1
    delta = trainer.delta()
    assert sorted(delta) == sorted(select_parameters(pipe.unet, "esd-x-strict"))
    assert all(d.abs().max() > 0 for d in delta.values())


def test_a_pack_is_refused_on_the_other_family(sdxl, sd2, tmp_path):
    from erasure.pack.concept_pack import BaseWeights, ConceptPack

    for trained_on, served_on, words in ((sd2, sdxl, "trained on an SD 1.x / 2.x"), (sdxl, sd2, "trained on an SDXL")):
        pack = make_pack(tmp_path / words, trained_on.unet, method="esd-x")
        pack.manifest.base.family = family_of(trained_on).name
        pack.save_pretrained(tmp_path / words)
        pack = ConceptPack.from_pretrained(tmp_path / words)
        with pytest.raises(PackMismatchError, match=words) as err:
            pack.verify_against(BaseWeights(served_on.unet))
        assert "this base is" in str(err.value) and "\n" not in str(err.value)
        pack.verify_against(BaseWeights(trained_on.unet))


def test_a_transformer_pipeline_is_refused_naming_the_families(tmp_path):
    from erasure.base.loading import load_pipeline

    dit = tiny_dit_pipe()
    dit.save_pretrained(tmp_path / "dit")
    with pytest.raises(UnsupportedBaseError) as err:
        load_pipeline(tmp_path / "dit")
    assert str(err.value) == ("DiTPipeline has no UNet (components: scheduler, transformer, vae): not a Stable "
                              "Diffusion pipeline; supported: SD 1.x / 2.x (StableDiffusionPipeline), "
                              "SDXL (StableDiffusionXLPipeline)")
    with pytest.raises(UnsupportedBaseError, match="has a transformer, not a Stable Diffusion UNet; supported"):
        family_of(dit)


def test_bfloat16_base_trains_float32_masters_against_exact_base_values(tmp_path):
    from erasure.pack.concept_pack import fingerprint

    rounded = tiny_sdxl_pipe(tmp_path).unet  # the same weights, rounded to bfloat16, computed in float32
    for p in rounded.parameters():
        p.data = p.data.bfloat16().float()
    pipe = tiny_sdxl_pipe(tmp_path).to(torch.bfloat16)
    base = {n: p.detach().clone() for n, p in pipe.unet.named_parameters()}
    cfg = ESDConfig(concepts=["circle"], iterations=2, gradient_checkpointing=True, **TINY)
    trainer = ESDTrainer(pipe, cfg, progress=False)
    assert all(p.dtype == torch.float32 for p in trainer.trainable.values())
    assert all(p.dtype == torch.bfloat16 for n, p in trainer.frozen.named_parameters())
    # on a CPU the half-precision weights stay in memory and each layer computes in float32
    x, t, c = torch.randn(2, 4, 8, 8), trainer.timesteps[[0, 1]], trainer.encode(["a red circle"] * 2)
    with torch.no_grad():
        expected = rounded(x, t, **c.denoiser_kwargs()).sample
    torch.testing.assert_close(trainer.predict(trainer.frozen, x, t, c), expected, rtol=1e-4, atol=1e-5)
    assert all(p.dtype == torch.bfloat16 for n, p in trainer.frozen.named_parameters())
    untouched = [n for n in base if n not in trainer.trainable]
    params = dict(trainer.denoiser.named_parameters())
    assert all(params[n] is dict(trainer.frozen.named_parameters())[n] for n in untouched)  # one copy
    trainer.train()
    assert all(torch.isfinite(torch.tensor(loss)) for loss in trainer.losses)
    delta = trainer.delta()
    for n, d in delta.items():  # theta - theta*, theta* being the bfloat16 values as loaded
        torch.testing.assert_close(base[n].float() + d, trainer.trainable[n].detach(), rtol=0, atol=1e-6)
    assert trainer.base_fingerprint() == fingerprint(base, trainer.names)


def test_resolution_must_fit_the_unet(sdxl):
    from erasure.errors import InvalidArgumentError

    with pytest.raises(InvalidArgumentError, match="--resolution 40 must be a multiple of 32"):
        ESDTrainer(sdxl, ESDConfig(concepts=["circle"], resolution=40, **TINY), progress=False)
    trainer = ESDTrainer(sdxl, ESDConfig(concepts=["circle"], resolution=96, **TINY), progress=False)
    assert trainer._latent_shape(1) == (1, 4, 12, 12)
    assert trainer.encode(["circle"]).added_cond_kwargs["time_ids"].tolist() == [[96, 96, 0, 0, 96, 96]]
