"""The ``uce`` method (erasure/closed_form.py): a closed-form edit of cross-attention's keys and values."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from erasure.errors import InvalidArgumentError
from erasure.redteam.config import AttackConfig
from erasure.toy.judge import ToyOracleJudge
from erasure.training.config import ESDConfig
from erasure.training.methods.uce import edit_in_closed_form
from erasure.training.trainer import ESDTrainer

RED = dict(concepts=["red"], method="uce", templates=["toy"], anchor=["green", "blue", "yellow", "purple"],
           preserve=["green", "blue", "yellow", "purple"], synonyms=["crimson", "scarlet"], mutations=6)


def test_the_edit_is_the_least_squares_solution_over_its_prompts(tmp_path):
    """W' minimises the erase + keep objective the module states (below the base's W, and every random step away
    from it costs more) and changes only to_k / to_v."""
    from erasure.training.methods.uce import RIDGE, draw_edit_prompts

    from factories import random_toy_pipe

    cfg = ESDConfig(**RED, edit_prompts=60)
    drawn = ESDTrainer(random_toy_pipe(tmp_path / "a"), cfg, progress=False)
    erased, anchored, kept = draw_edit_prompts(drawn)  # what the edit below draws: same seed, same draws
    trainer = ESDTrainer(random_toy_pipe(tmp_path / "b"), cfg, progress=False)
    assert trainer.names and all(".attn2.to_k." in n or ".attn2.to_v." in n for n in trainer.names)
    before = {n: p.detach().double().clone() for n, p in trainer.trainable.items()}

    def tokens(prompts):
        return trainer.encode(prompts).denoiser_kwargs()["encoder_hidden_states"].flatten(0, 1).double()

    e_c, e_c0, e_p = tokens(erased), tokens(anchored), tokens(kept)

    def objective(w, w0):
        return (((e_c @ w.T - e_c0 @ w0.T) ** 2).sum() / len(e_c) + cfg.preserve_weight * ((e_p @ (w - w0).T) ** 2)
                .sum() / len(e_p) + RIDGE * ((w - w0) ** 2).sum())

    residual = edit_in_closed_form(trainer)
    assert 0 < residual < 1 and trainer.losses == [residual]
    torch.manual_seed(0)
    for n, p in trainer.trainable.items():
        w, w0 = p.detach().double(), before[n]
        best = objective(w, w0)
        assert best < objective(w0, w0), n
        for _ in range(3):
            assert best <= objective(w + 1e-3 * torch.randn_like(w), w0), n
    delta = trainer.delta()
    assert set(delta) == set(trainer.names) and all(d.abs().max() > 0 for d in delta.values())


def test_the_edit_needs_an_anchor_of_the_same_token_count_and_trains_no_robust_term(random_pipe):
    with pytest.raises(ValueError, match="give --anchor"):
        ESDConfig(**{**RED, "anchor": []})
    three_tokens = ESDConfig(concepts=["red"], method="uce", templates=["a photo of {}"], anchor=["five pointed star"],
                             edit_prompts=20)
    with pytest.raises(InvalidArgumentError, match="keep their token count"):
        edit_in_closed_form(ESDTrainer(random_pipe, three_tokens, progress=False))
    with pytest.raises(ValueError, match="closed-form edit"):
        ESDConfig(**RED, unnamed_weight=1.0)


def test_uce_erases_red_on_the_toy_base_and_keeps_the_other_colours(tmp_path, toy_pipe, oracle):
    """`erasure train --method uce` on the toy base: a pack whose prompts naming red draw another colour, while
    prompts naming the siblings still draw them (oracle, fresh seeds), with a card that says how it was made."""
    from erasure.base.loading import sampling_defaults
    from erasure.pack.compose import with_packs
    from erasure.redteam.attacks import Request
    from erasure.redteam.team import RedTeam
    from erasure.training.train import train_pack

    pack = train_pack("toy", ESDConfig(**RED, edit_prompts=200), tmp_path / "red", eval_samples=0, progress=False)
    assert pack.training.method == "uce" and "UCE's closed-form edit" in (tmp_path / "red" / "README.md").read_text()
    judge = ToyOracleJudge(oracle)
    team = RedTeam(toy_pipe, judge, AttackConfig(), sampling_defaults("toy"), progress=False)
    erased = with_packs(toy_pipe, [(pack, 1.0)])
    seeds = list(range(7_000_000, 7_000_012))
    red = [Request(p, None, 3.0, 64, 10) for p in ("a red circle", "please draw a scarlet square")]
    base_red = np.mean([s.rate for s in team.score(toy_pipe, "red", red, seeds)])
    pack_red = np.mean([s.rate for s in team.score(erased, "red", red, seeds)])
    assert base_red >= 0.9 and pack_red <= 0.2, (base_red, pack_red)
    for colour in ("green", "blue"):
        kept = team.score(erased, colour, [Request(f"a {colour} star", None, 3.0, 64, 10)], seeds)[0].rate
        assert kept >= 0.8, (colour, kept)
