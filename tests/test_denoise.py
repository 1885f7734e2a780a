"""The batched denoising loop (erasure/denoise.py) and mixed pack-set batches (erasure/mixed.py) on the real toy
base, checked against the diffusers pipeline. Packs: random deltas with real fingerprints (esd-x and esd-u)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from factories import make_pack

STEPS = 4
BOUND = 2  # max abs pixel difference alone vs in a mixed batch (service/README.md, "Batching": measured 1)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Small tensors: one thread is as fast as two here, and far faster when the other core is busy."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def world(toy_pipe):
    from erasure.base.families import conditioner_for
    from erasure.pack.compose import compose_denoiser

    x = make_pack(None, toy_pipe.unet, "circle", method="esd-x", seed=1)
    u = make_pack(None, toy_pipe.unet, "square", method="esd-u", seed=2, magnitude=3e-3)
    away = make_pack(None, toy_pipe.unet, "red", concepts=("red",), method="esd-x", seed=3)
    away.manifest.guide_away = 1.5
    plain = make_pack(None, toy_pipe.unet, "red", concepts=("red",), method="esd-x", seed=3)
    unets = {"base": toy_pipe.unet, "x": compose_denoiser(toy_pipe.unet, [(x, 1.0)]),
             "u": compose_denoiser(toy_pipe.unet, [(u, 1.0)]),
             "xu": compose_denoiser(toy_pipe.unet, [(x, 1.0), (u, 1.0)]),
             "away": compose_denoiser(toy_pipe.unet, [(away, 1.0)]),
             "plain red": compose_denoiser(toy_pipe.unet, [(plain, 1.0)])}  # the same delta, no guide_away
    return {"unets": unets, "cond": conditioner_for(toy_pipe), "away": away}


def request(world, prompt, seeds, unet="base", negative=None, guidance=3.0, steps=STEPS, size=64):
    from erasure.sampling.denoise import DenoiseRequest

    c = world["cond"]
    return DenoiseRequest(c.encode([prompt]), c.encode([negative]) if negative else c.unconditional(1), seeds=seeds,
                          steps=steps, guidance=guidance, height=size, width=size, denoiser=world["unets"][unet])


def pixels(images):
    return [np.asarray(im.convert("RGB")).astype(np.int16) for im in images]


def pipeline_image(pipe, unet, prompt, seed, negative=None, guidance=3.0):
    from erasure.sampling.generate import share_pipeline

    p = share_pipeline(pipe, denoiser=unet, scheduler=type(pipe.scheduler).from_config(pipe.scheduler.config))
    with torch.no_grad():
        return p(prompt=[prompt], negative_prompt=[negative] if negative else None, num_inference_steps=STEPS,
                 guidance_scale=guidance, height=64, width=64, generator=torch.Generator("cpu").manual_seed(seed),
                 output_type="pil").images[0]


@pytest.mark.parametrize("unet,negative,guidance", [("base", None, 3.0), ("u", "red", 5.0), ("x", None, 1.0)])
def test_a_request_alone_is_the_pipeline_byte_for_byte(toy_pipe, world, unet, negative, guidance):
    from erasure.sampling.denoise import denoise

    [[image]] = denoise(toy_pipe, [request(world, "a red circle", [3], unet, negative, guidance)])
    expected = pipeline_image(toy_pipe, world["unets"][unet], "a red circle", 3, negative, guidance)
    assert np.array_equal(np.asarray(image), np.asarray(expected))


def test_guide_away_moves_every_prediction_along_the_bases_concept_direction(toy_pipe, world):
    """A pack with guide_away s: its pipeline's UNet predicts eps(x, p) - s (eps*(x, concept) - eps*(x, "")) for
    any prompt, with the base's eps*, in a guided call (the same latents twice) and a plain one alike."""
    from erasure.pack.compose import with_packs

    pipe, cond = with_packs(toy_pipe, [(world["away"], 1.0)]), world["cond"]
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    h, t = cond.encode(["a red square", "one"]).encoder_hidden_states, torch.tensor(500)
    with torch.no_grad():
        e_red = toy_pipe.unet(x, t, encoder_hidden_states=cond.encode(["red", "red"]).encoder_hidden_states).sample
        e_empty = toy_pipe.unet(x, t, encoder_hidden_states=cond.unconditional(2).encoder_hidden_states).sample
        for sample, hidden in ((torch.cat([x, x]), torch.cat([h, h])), (x, h)):
            plain = pipe.unet.forward(sample, t, encoder_hidden_states=hidden).sample  # forward(): no hook
            shifted = pipe.unet(sample, t, encoder_hidden_states=hidden).sample
            expected = plain - 1.5 * (e_red - e_empty).repeat(len(sample) // 2, 1, 1, 1)
            torch.testing.assert_close(shifted, expected, rtol=1e-4, atol=1e-5)
    assert (e_red - e_empty).abs().mean() > 0.01  # the shift is not nothing


def test_a_guided_away_request_alone_is_the_pipeline(toy_pipe, world):
    """The batched loop applies a pack set's guide_away as any pipeline object on its UNet does (after guidance
    rather than per branch: within a pixel)."""
    from erasure.pack.compose import with_packs
    from erasure.sampling.denoise import denoise

    [[image]] = denoise(toy_pipe, [request(world, "one", [3], "away")])
    pipe = with_packs(toy_pipe, [(world["away"], 1.0)])
    # the pack set's UNet on a pipeline object of the base (the service's path with batching off) applies it too
    expected = pipeline_image(toy_pipe, world["unets"]["away"], "one", 3)
    assert np.array_equal(pixels([expected])[0], pixels([pipeline_image(pipe, pipe.unet, "one", 3)])[0])
    plain = pipeline_image(toy_pipe, world["unets"]["plain red"], "one", 3)  # the same delta, no guide_away
    assert np.abs(pixels([image])[0] - pixels([expected])[0]).max() <= 1
    assert np.abs(pixels([image])[0] - pixels([plain])[0]).max() > 20


@pytest.mark.parametrize("until,reference", [(0.4, "base"), (1.0, "pack"), (0.4, "pack")])
def test_guide_away_until_and_its_reference_are_the_same_in_both_paths(toy_pipe, world, until, reference):
    """``guide_away_until`` (the shift on the noisiest steps only) and the ``pack`` reference (the pack set's own
    unconditional prediction for eps(x, "")): the batched loop and the pipeline hook agree within a pixel, a negative
    prompt falls back to the base's eps(x, ""), and the image differs from the full guidance."""
    from erasure.pack.compose import compose_denoiser
    from erasure.sampling.denoise import denoise

    pack = make_pack(None, toy_pipe.unet, "red", concepts=("red",), method="esd-x", seed=3)
    pack.manifest.guide_away, pack.manifest.guide_away_until, pack.manifest.guide_away_reference = 1.5, until, reference
    unet = compose_denoiser(toy_pipe.unet, [(pack, 1.0)])
    world = {**world, "unets": {**world["unets"], "variant": unet}}
    for negative in (None, "a blue square"):
        [[image]] = denoise(toy_pipe, [request(world, "one", [3], "variant", negative)])
        expected = pipeline_image(toy_pipe, unet, "one", 3, negative)
        assert np.abs(pixels([image])[0] - pixels([expected])[0]).max() <= 1, negative
    variant, full = (pipeline_image(toy_pipe, u, "one", 3) for u in (unet, world["unets"]["away"]))
    assert np.abs(pixels([variant])[0] - pixels([full])[0]).max() > 0  # not the full guidance from the base


def test_a_pack_sets_guidance_is_encoded_once_per_denoiser(toy_pipe, world):
    from erasure.sampling.denoise import BatchDenoiser

    denoiser = BatchDenoiser(toy_pipe)
    first, second = (denoiser.start(request(world, p, [1], "away")) for p in ("one", "a red circle"))
    assert first.away is not None and first.away is second.away
    assert denoiser.start(request(world, "one", [1], "x")).away is None


def test_initial_noise_is_the_pipelines_per_seed(toy_pipe, world):
    from erasure.sampling.denoise import BatchDenoiser

    track = BatchDenoiser(toy_pipe).start(request(world, "a red circle", [5, 9]))
    gens = [torch.Generator("cpu").manual_seed(s) for s in (5, 9)]
    expected = toy_pipe.prepare_latents(2, 4, 64, 64, torch.float32, "cpu", gens)
    assert torch.equal(track.latents, expected)


def test_mixed_batch_rows_match_each_request_alone(toy_pipe, world):
    """esd-x and esd-u pack sets, negative prompts, per-request guidance (1.0 = unguided), steps and sizes in one
    batch: each image within BOUND of the request alone, and a repeated batch gives the same bytes."""
    from erasure.sampling.denoise import BatchDenoiser, denoise

    reqs = [request(world, "a red circle", [1]), request(world, "a blue square", [2, 3], "u", "red", 7.5),
            request(world, "a striped star", [4], "x", steps=STEPS - 1), request(world, "a green cross", [5], "xu"),
            request(world, "a dotted triangle", [6], "x", guidance=1.0),
            request(world, "one", [8, 9], "away"), request(world, "a yellow circle", [7], "u", size=32)]
    alone = [pixels(denoise(toy_pipe, [r])[0]) for r in reqs]
    denoiser = BatchDenoiser(toy_pipe)
    batched = [pixels(images) for images in denoise(toy_pipe, reqs, denoiser)]
    again = [pixels(images) for images in denoise(toy_pipe, reqs, denoiser)]
    assert [len(b) for b in batched] == [1, 2, 1, 1, 1, 2, 1] and batched[-1][0].shape == (32, 32, 3)
    for a, b, c in zip(alone, batched, again):
        for x, y, z in zip(a, b, c):
            assert np.abs(x - y).max() <= BOUND
            assert np.array_equal(y, z)
    assert not np.array_equal(alone[0][0], alone[3][0])  # the packs change images: the comparison could fail


def test_mixed_unet_rows_see_their_own_sets_weights(toy_pipe, world):
    """Each run of rows through MixedDenoiser gives what its pack set's own UNet gives; untouched layers are shared."""
    from erasure.sampling.mixed import MixedDenoiser, RoutedLayer

    unets = world["unets"]
    mixed = MixedDenoiser(toy_pipe.unet)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(7, 4, 16, 16, generator=g)
    h = torch.randn(7, 20, 64, generator=g)
    t = torch.tensor([900, 900, 500, 500, 500, 100, 1])
    segments = [(2, unets["base"]), (3, unets["u"]), (1, unets["x"]), (1, unets["xu"])]
    with torch.no_grad():
        out = mixed(x, t, segments, encoder_hidden_states=h)
        start = 0
        for rows, unet in segments:
            alone = unet(x[start:start + rows], t[start:start + rows], encoder_hidden_states=h[start:start + rows])
            torch.testing.assert_close(out[start:start + rows], alone.sample, rtol=1e-4, atol=1e-5)
            start += rows
        single = mixed(x[:3], t[:3], [(3, unets["x"])], encoder_hidden_states=h[:3])
        assert torch.equal(single, unets["x"](x[:3], t[:3], encoder_hidden_states=h[:3]).sample)
    base_params = {p.data_ptr() for p in toy_pipe.unet.parameters()}
    assert all(p.data_ptr() in base_params for p in mixed.unet.parameters())  # no tensor of its own
    routed = [m for m in mixed.unet.modules() if isinstance(m, RoutedLayer)]
    assert len(routed) == len(mixed.changed_layers(unets["xu"])) > 0


def test_added_conditioning_is_carried_per_row(tmp_path):
    """SDXL's added conditioning (``added_cond_kwargs``: text_embeds and size-dependent time_ids per row): requests
    with different added conditioning and pack sets get in one batch what each gets alone, and the added
    conditioning reaches the UNet (other time_ids, other latents)."""
    from erasure.base.conditioning import Conditioning
    from erasure.base.families import conditioner_for, family_of
    from erasure.pack.compose import compose_denoiser
    from erasure.sampling.denoise import BatchDenoiser, DenoiseRequest
    from factories import tiny_sdxl_pipe

    pipe = tiny_sdxl_pipe(tmp_path)
    unet = pipe.unet
    erased = compose_denoiser(unet, [(make_pack(None, unet, "circle", method="esd-x", seed=3, magnitude=0.1), 1.0)])
    conditioner, m = conditioner_for(pipe), family_of(pipe).size_multiple(pipe)

    def req(c, u, seed, unet_, size):
        return DenoiseRequest(c, u, [seed], steps=3, guidance=4.0, height=size, width=size, denoiser=unet_)

    (ca, ua), (cb, ub) = ((conditioner.encode([prompt], size), conditioner.unconditional(1, size))
                          for prompt, size in (("a red circle", 2 * m), ("a blue square", m)))
    reqs = [req(ca, ua, 1, unet, 2 * m), req(cb, ub, 2, erased, m)]
    denoiser = BatchDenoiser(pipe)

    def run(requests):
        tracks = [denoiser.start(r) for r in requests]
        with torch.no_grad():
            while not all(t.done for t in tracks):
                denoiser.step(tracks)
        return [t.latents for t in tracks]

    together = run(reqs)
    for r, latents in zip(reqs, together):
        [alone] = run([r])
        torch.testing.assert_close(latents, alone, rtol=1e-4, atol=1e-5)
    other = Conditioning(cb.encoder_hidden_states,
                         {**cb.added_cond_kwargs, "time_ids": ca.added_cond_kwargs["time_ids"]})
    [changed] = run([req(other, ub, 2, erased, m)])
    assert (changed - together[1]).abs().max() > 1e-3
