"""ESD trainer mechanics on the toy architecture with random weights (fast; quality is measured by eval)."""

import pytest
import torch

from erasure.prompts import without
from erasure.training.config import ESDConfig
from erasure.training.trainer import ESDTrainer

from factories import random_toy_pipe

TINY = dict(lr=1e-3, ddim_steps=4, pool_trajectories=1, batch_size=2, refresh_every=2, checkpoint_every=3)


def params(trainer):
    return {n: p.detach().clone() for n, p in trainer.trainable.items()}


@pytest.mark.parametrize("loop,sample_with,robust", [("pooled", "trained", {}), ("pooled", "frozen", {}),
                                                     ("reference", "trained", {}),
                                                     ("pooled", "trained", {"unnamed_weight": 1.0})])
def test_resume_continues_where_it_stopped(tmp_path, loop, sample_with, robust):
    cfg = ESDConfig(concepts=["circle", "red"], iterations=6, loop=loop, sample_with=sample_with, **TINY, **robust)
    straight = ESDTrainer(random_toy_pipe(tmp_path / "a"), cfg, progress=False)
    straight.train()

    ckpt = tmp_path / "ckpt.pt"
    first = ESDTrainer(random_toy_pipe(tmp_path / "b"), cfg, progress=False)
    first.train(checkpoint=ckpt, until=3)  # "interrupted" after 3 iterations (checkpoint_every=3)
    resumed = ESDTrainer(random_toy_pipe(tmp_path / "c"), cfg, progress=False)
    resumed.load_checkpoint(ckpt)
    assert resumed.iteration == 3
    resumed.train()
    assert resumed.iteration == 6
    a, b = params(straight), params(resumed)
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert straight.losses == resumed.losses


def test_a_checkpoint_resumes_with_the_same_options_only(tmp_path):
    """A checkpoint from before an option existed resumes (the option reads as its default); other options do
    not."""
    from erasure.errors import InvalidArgumentError

    cfg = ESDConfig(concepts=["circle"], iterations=6, **TINY)
    ckpt = tmp_path / "ckpt.pt"
    ESDTrainer(random_toy_pipe(tmp_path / "a"), cfg, progress=False).train(checkpoint=ckpt, until=3)
    state = torch.load(ckpt, weights_only=False)
    del state["config"]["preserve_synonyms"]  # as written before the field was added
    torch.save(state, ckpt)
    resumed = ESDTrainer(random_toy_pipe(tmp_path / "b"), cfg, progress=False)
    resumed.load_checkpoint(ckpt)
    assert resumed.iteration == 3
    other = ESDTrainer(random_toy_pipe(tmp_path / "c"), cfg.model_copy(update={"lr": 1e-2}), progress=False)
    with pytest.raises(InvalidArgumentError, match="written with other training options"):
        other.load_checkpoint(ckpt)


def test_deterministic_for_a_fixed_seed(tmp_path):
    cfg = ESDConfig(concepts=["circle"], iterations=3, **TINY)
    runs = [ESDTrainer(random_toy_pipe(tmp_path / str(i)), cfg, progress=False) for i in range(2)]
    for r in runs:
        r.train()
    assert all(torch.equal(runs[0].delta()[n], runs[1].delta()[n]) for n in runs[0].names)


def test_objective_matches_the_paper(random_pipe):
    """One reference step: the target is eps*(c0) - eta (eps*(c) - eps*(c0)) from the frozen base."""
    cfg = ESDConfig(concepts=["circle"], iterations=1, eta=2.0, loop="reference", **TINY)
    trainer = ESDTrainer(random_pipe, cfg, progress=False)
    x = torch.randn(1, 4, 16, 16)
    t = trainer.timesteps[1].reshape(1)
    c, c0 = trainer.encode(["circle"]), trainer.encode([""])
    with torch.no_grad():
        e0 = trainer.frozen(x, t, c0.encoder_hidden_states).sample
        ep = trainer.frozen(x, t, c.encoder_hidden_states).sample
    torch.testing.assert_close(trainer._targets(x, t, c, c0), e0 - 2.0 * (ep - e0), rtol=1e-4, atol=1e-5)


def test_only_selected_tensors_train_and_frozen_stays_frozen(random_pipe):
    cfg = ESDConfig(concepts=["circle"], method="esd-x-strict", iterations=2, **TINY)
    trainer = ESDTrainer(random_pipe, cfg, progress=False)
    before = {n: p.detach().clone() for n, p in random_pipe.unet.named_parameters()}
    frozen_before = {n: p.detach().clone() for n, p in trainer.frozen.named_parameters()}
    trainer.train()
    changed = {n for n, p in random_pipe.unet.named_parameters() if not torch.equal(p, before[n])}
    assert changed == set(trainer.names) and all("attn2.to_k" in n or "attn2.to_v" in n for n in changed)
    assert all(torch.equal(p, frozen_before[n]) for n, p in trainer.frozen.named_parameters())


def test_an_unsupported_layout_is_refused_naming_the_families(random_pipe):
    from erasure.errors import UnsupportedBaseError
    from erasure.training.trainer import check_supported

    random_pipe.unet.register_to_config(addition_embed_type="text_time")  # SDXL's UNet, but one text encoder
    with pytest.raises(UnsupportedBaseError, match=r"SD 1\.x / 2\.x .*SDXL \(StableDiffusionXLPipeline\)"):
        check_supported(random_pipe)


def test_templates_draw_prompts_naming_the_concept(random_pipe):
    cfg = ESDConfig(concepts=["circle", "red"], iterations=4, templates=["a photo of {}", "toy"], **TINY)
    trainer = ESDTrainer(random_pipe, cfg, progress=False)
    pairs = trainer.prompts("circle", 40)
    prompts = [c for c, _ in pairs]
    assert all("circle" in c and "circle" not in c0 and c0.split() == c.replace("circle", "").split()
               for c, c0 in pairs)  # c0: the same prompt without the concept
    assert ("a photo of circle", "a photo of") in pairs and len(set(prompts)) > 5  # both templates, toy varies
    from erasure.toy.world import HELDOUT_TEMPLATES

    heldout = [t.split("{obj}")[0].strip() for t in HELDOUT_TEMPLATES]
    assert not any(p.startswith(h) for p in prompts for h in heldout)  # held-out templates stay unseen
    trainer.train()
    # the pool holds one embedding per (x_t, t) item, drawn from the prompts above
    pool = trainer.pool["circle"]
    assert len(pool["c"]) == pool["x"].shape[0] == pool["t"].shape[0]


def test_a_template_without_a_slot_is_refused():
    with pytest.raises(ValueError, match="exactly once"):
        ESDConfig(concepts=["circle"], templates=["a photo of a circle"])


def drift(trainer, prompt: str) -> float:
    """Mean |eps_theta - eps*| for ``prompt`` on fixed noisy latents: how far training moved that prediction."""
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    t, cond = trainer.timesteps[[1, 2]], trainer.encode([prompt]).repeat(2)
    with torch.no_grad():
        moved = trainer.predict(trainer.denoiser, x, t, cond) - trainer.predict(trainer.frozen, x, t, cond)
        return moved.abs().mean().item()


def test_preserve_holds_other_concepts_to_the_base(random_pipe, tmp_path):
    cfg = dict(concepts=["circle"], iterations=20, templates=["toy"], lr=1e-3, ddim_steps=4, pool_trajectories=2,
               batch_size=2, refresh_every=5)
    plain = ESDTrainer(random_toy_pipe(tmp_path / "a"), ESDConfig(**cfg), progress=False)
    kept = ESDTrainer(random_toy_pipe(tmp_path / "b"), ESDConfig(**cfg, preserve=["square"],
                                                                      preserve_weight=50.0), progress=False)
    assert kept.preserve_prompts([("a dotted circle", "a dotted")], "circle") == ["a dotted square"]
    for trainer in (plain, kept):
        trainer.train()
    assert drift(kept, "a red square") < 0.9 * drift(plain, "a red square")  # measured 0.73-0.81 over probe seeds


def test_preserve_unconditional_holds_the_empty_prompt_to_the_base(tmp_path):
    cfg = dict(concepts=["circle"], iterations=20, templates=["toy"], lr=1e-3, ddim_steps=4, pool_trajectories=2,
               batch_size=2, refresh_every=5, preserve_weight=50.0)
    plain = ESDTrainer(random_toy_pipe(tmp_path / "a"), ESDConfig(**cfg), progress=False)
    held = ESDTrainer(random_toy_pipe(tmp_path / "b"), ESDConfig(**cfg, preserve_unconditional=True),
                      progress=False)
    for trainer in (plain, held):
        trainer.train()
    assert drift(held, "") < 0.6 * drift(plain, "")  # measured 0.40-0.43 over probe seeds


def test_preserved_prompts_get_trajectories_of_their_own(random_pipe):
    cfg = ESDConfig(concepts=["circle"], iterations=1, templates=["toy"], ddim_steps=4, pool_trajectories=2,
                    preserve=["square"])
    trainer = ESDTrainer(random_pipe, cfg, progress=False)
    trainer._refresh_pool()
    pool = trainer.pool["circle"]
    assert pool["xp"].shape == pool["x"].shape and len(pool["cp"]) == len(pool["c"])
    assert pool["cp"].encoder_hidden_states.shape == pool["c"].encoder_hidden_states.shape
    assert torch.equal(pool["t"][: 2], trainer.timesteps[[0, 0]])  # item i * n + j: step i of trajectory j
    assert not torch.equal(pool["xp"], pool["x"])


def test_frozen_sampling_caches_the_preserve_targets(random_pipe):
    cfg = ESDConfig(concepts=["circle"], iterations=1, templates=["toy"], ddim_steps=4, pool_trajectories=2,
                    preserve=["square"], sample_with="frozen")
    trainer = ESDTrainer(random_pipe, cfg, progress=False)
    trainer._refresh_pool()
    pool = trainer.pool["circle"]
    with torch.no_grad():  # the cache must be what the step would otherwise compute: eps*(x'_t, t, c_p)
        expected = trainer.frozen(pool["xp"], pool["t"], pool["cp"].encoder_hidden_states).sample
    torch.testing.assert_close(pool["keep_target"], expected, rtol=1e-4, atol=1e-5)


def test_anchor_names_another_concept_in_c0(random_pipe):
    plain = ESDTrainer(random_pipe, ESDConfig(concepts=["square"], templates=["a photo of {}"]), progress=False)
    assert plain.prompts("square", 1) == [("a photo of square", "a photo of")]
    cfg = ESDConfig(concepts=["square"], templates=["toy"], anchor=["circle", "star"])
    pairs = ESDTrainer(random_pipe, cfg, progress=False).prompts("square", 20)
    for c, c0 in pairs:
        assert "square" in c.split() and "square" not in c0.split()
        assert c0 in {c.replace("square", "circle"), c.replace("square", "star")}
    assert {w for _, c0 in pairs for w in c0.split() if w in ("circle", "star")} == {"circle", "star"}


def test_preserved_prompts_replace_every_word_naming_the_concept(random_pipe):
    # a synonym left in the preserved prompt would hold the erased concept itself to the base
    cfg = ESDConfig(concepts=["red"], templates=["toy"], synonyms=["crimson", "scarlet"], preserve=["green", "blue"])
    trainer = ESDTrainer(random_pipe, cfg, progress=False)
    pairs = trainer.prompts("red", 40)
    assert {w for c, _ in pairs for w in c.split()} >= {"red", "crimson", "scarlet"}
    for (c, _), kept in zip(pairs, trainer.preserve_prompts(pairs, "red")):
        assert not {"red", "crimson", "scarlet"} & set(kept.split())
        assert {"green", "blue"} & set(kept.split())


def test_preserved_prompts_name_preserved_concepts_by_their_synonyms_too(random_pipe):
    # the red team names a sibling by its synonyms ("a banded lemon wedge"); a pack held to the base only on
    # "yellow" drew red for them
    cfg = ESDConfig(concepts=["red"], templates=["toy"], preserve=["green", "yellow"],
                    preserve_synonyms=["yellow=lemon", "yellow=golden"], mutations=2)
    trainer = ESDTrainer(random_pipe, cfg, progress=False)
    pairs = trainer.prompts("red", 60)
    kept = {w for p in trainer.preserve_prompts(pairs, "red") for w in p.split()}
    assert {"green", "yellow", "lemon", "golden"} <= kept and "red" not in kept
    plain = ESDTrainer(random_pipe, cfg.model_copy(update={"preserve_synonyms": []}), progress=False)
    assert not {"lemon", "golden"} & {w for p in plain.preserve_prompts(plain.prompts("red", 60), "red")
                                      for w in p.split()}
    with pytest.raises(ValueError, match=r"preserve_synonyms 'blue=cobalt': give CONCEPT=WORD for a preserved "
                                         r"concept \(green, yellow\)"):
        ESDConfig(concepts=["red"], preserve=["green", "yellow"], preserve_synonyms=["blue=cobalt"])


def test_mutated_prompts_still_name_the_concept_and_c0_leaves_it_out(random_pipe):
    from erasure.prompts import names_any

    words = ["circle", "disc", "disk"]
    cfg = ESDConfig(concepts=["circle"], templates=["toy"], synonyms=words[1:], mutations=4, preserve=["square"])
    pairs = ESDTrainer(random_pipe, cfg, progress=False).prompts("circle", 60)
    from erasure.toy.world import TRAIN_TEMPLATES

    starts = {t.split("{obj}")[0].strip() for t in TRAIN_TEMPLATES}
    assert sum(not any(c.startswith(s) for s in starts if s) for c, _ in pairs) > 5  # off the training grammar
    for c, c0 in pairs:
        assert names_any(c, words) and not names_any(c0, words)
        assert c0.split() == [w for w in c.split() if w not in words]
    again = ESDTrainer(random_pipe, cfg, progress=False).prompts("circle", 60)
    assert again == pairs  # seeded
    anchored = cfg.model_copy(update={"anchor": ["star"], "preserve": []})
    for c, c0 in ESDTrainer(random_pipe, anchored, progress=False).prompts("circle", 20):
        assert c0.split() == ["star" if w in words else w for w in c.split()]


def test_an_erased_concept_cannot_be_its_own_anchor_or_preserved():
    with pytest.raises(ValueError, match="anchor names an erased concept"):
        ESDConfig(concepts=["square"], anchor=["circle", "square"])
    with pytest.raises(ValueError, match="preserve names an erased concept"):
        ESDConfig(concepts=["square"], preserve=["square"])


def test_the_unnamed_term_erases_the_concept_from_prompts_that_do_not_name_it(random_pipe):
    """A base's prior can draw the concept for "please": the term trains prompts leaving the concept out and word
    lists naming nothing towards eps*(u) - eta (eps*(u+) - eps*(u)), u+ naming the concept; off by default."""
    from erasure.prompts import names_any
    from erasure.training.robust import UNNAMED_WORDS

    cfg = ESDConfig(concepts=["circle"], templates=["toy"], synonyms=["disc"], unnamed_weight=2.0, eta=1.5, **TINY)
    trainer = ESDTrainer(random_pipe, cfg, progress=False)
    assert "unnamed" not in ESDTrainer(random_pipe, cfg.model_copy(update={"unnamed_weight": 0.0}),
                                       progress=False).robust
    term, words = trainer.robust["unnamed"], ["circle", "disc"]
    prompts = [c for c, _ in trainer.prompts("circle", 40)]
    left_out = {without(c, words) for c in prompts}
    pairs = term.prompts("circle", prompts)
    assert all(not names_any(u, words) and names_any(named, words) for u, named in pairs)
    assert 5 < sum(u in left_out for u, _ in pairs) < 35  # half the training prompts without the concept
    assert all(1 <= len(u.split()) <= UNNAMED_WORDS for u, _ in pairs if u not in left_out)  # half naming nothing

    term.refresh("circle")  # trajectories sampled under the prompts u themselves
    pool = term.pool["circle"]
    assert len(pool["t"]) == cfg.pool_trajectories * cfg.ddim_steps
    trainer.iteration = 1  # not a refresh step
    state = trainer.rng.bit_generator.state
    idx = torch.from_numpy(trainer.rng.integers(len(pool["t"]), size=cfg.batch_size))
    trainer.rng.bit_generator.state = state
    loss = term.loss("circle")
    x, t, u = pool["x"][idx], pool["t"][idx], pool["u"][idx]
    with torch.no_grad():
        e_u = trainer.frozen(x, t, u.encoder_hidden_states).sample
        e_named = trainer.frozen(x, t, pool["named"][idx].encoder_hidden_states).sample
        pred = trainer.denoiser(x, t, u.encoder_hidden_states).sample
    expected = 2.0 * ((pred - (e_u - 1.5 * (e_named - e_u))) ** 2).mean()
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-4, atol=1e-7)
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in trainer.trainable.values())
