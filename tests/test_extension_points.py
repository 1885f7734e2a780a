"""Adding a method or an attack family is one new file: everything below registers its own in this file only, and
the config, the CLI, training, the manifest, the card, the red team and the service's bar pick them up."""

from __future__ import annotations

import dataclasses
import json

import pytest
from pydantic import BaseModel, ConfigDict, Field

from erasure.base.loading import sampling_defaults
from erasure.cli import build_parser, main, model_from_args
from erasure.errors import InvalidArgumentError
from erasure.pack.concept_pack import ConceptPack
from erasure.redteam.config import AttackConfig
from erasure.redteam.families import (
    FAMILIES, AttackFamily, reachable_families, register_family, unregister_family,
)
from erasure.redteam.team import RedTeam
from erasure.toy.judge import ToyOracleJudge
from erasure.training.config import ESDConfig
from erasure.training.methods import METHODS, Method, register_method, select_parameters, unregister_method
from erasure.training.train import train_pack


class QueryOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    query_scale: float = Field(1.0, gt=0, description="how much the queries are scaled")


def scale_queries(trainer) -> float:
    """A closed-form 'erasure': every selected weight times query_scale (its delta is (scale - 1) W)."""
    for param in trainer.trainable.values():
        param.data.mul_(trainer.cfg.method_options.query_scale)
    return 0.0


class FixedOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    fixed_prompts: list[str] = Field(["a red circle"], description="the prompts tried, in order")


def fixed_search(team, pipe, concept: str):
    initial = [dataclasses.replace(team.default, prompt=p) for p in team.cfg.options("fixed").fixed_prompts]
    return team.search(pipe, concept, initial, lambda population, rng: [], f"{concept}: fixed")


@pytest.fixture()
def query_method():
    method = register_method(Method("scale-q", "cross-attention queries, scaled", lambda n: "attn2.to_q" in n,
                                    card="Queries scaled by {{ options.query_scale }} ({{ t.method }})",
                                    options=QueryOptions, edit=scale_queries))
    yield method
    unregister_method(method.name)


@pytest.fixture()
def fixed_family():
    family = register_family(AttackFamily(
        "fixed", "a fixed list of prompts", reachable=True, options=FixedOptions,
        best_attack=lambda team, pipe, concept, prepared: team.validated(fixed_search, pipe, concept)))
    yield family
    unregister_family(family.name)


def test_a_new_method_trains_and_travels_in_its_pack(query_method, toy_pipe, tmp_path):
    args = build_parser().parse_args(["train", "--concept", "circle", "--method", "scale-q", "--query-scale", "2",
                                      "--template", "toy", "--out", "x"])
    cfg = model_from_args(ESDConfig, args, extensions=METHODS, chosen=["scale-q"])
    assert cfg.method_options.query_scale == 2.0 and "scale-q" in build_parser().format_help() + str(METHODS)
    with pytest.raises(InvalidArgumentError, match="--query-scale is an option of scale-q"):
        model_from_args(ESDConfig, build_parser().parse_args(["train", "--concept", "circle", "--query-scale", "2",
                                                              "--out", "x"]), extensions=METHODS, chosen=["esd-x"])

    pack = train_pack("toy", cfg, tmp_path / "p", eval_samples=0, progress=False)
    assert sorted(pack.delta) == sorted(select_parameters(toy_pipe.unet, "scale-q"))
    base = dict(toy_pipe.unet.named_parameters())
    name = next(iter(pack.delta))
    assert (pack.delta[name] - base[name].detach()).abs().max() < 1e-6  # (2 - 1) W
    manifest = json.loads((tmp_path / "p" / "pack.json").read_text())
    assert manifest["training"]["method"] == "scale-q" and manifest["training"]["method_options"] == {
        "query_scale": 2.0}
    assert "Queries scaled by 2.0 (scale-q)" in (tmp_path / "p" / "README.md").read_text()
    assert ConceptPack.from_pretrained(tmp_path / "p").training == cfg


def test_a_new_attack_family_runs_is_recorded_and_counts_for_the_service(fixed_family, toy_pipe, oracle, tmp_path,
                                                                           capsys):
    assert "fixed" in FAMILIES and "fixed" in reachable_families()  # the service's bar applies to it
    cfg = AttackConfig(families=["fixed"], fixed_prompts=["a red circle", "a blue star"], budget=4, search_seeds=2,
                       finalists=2, validation_seeds=2, seeds=4, steps=8, calibrate=False)
    assert cfg.options("fixed").fixed_prompts == ["a red circle", "a blue star"]
    team = RedTeam(toy_pipe, ToyOracleJudge(oracle), cfg, sampling_defaults("toy"), progress=False)
    record = team.record(team.attack_pipe(toy_pipe, ["red"]), 1.0)
    assert list(record.asr) == ["fixed"] and record.results[0].attack["prompt"] == "a red circle"
    assert record.asr["fixed"] >= 0.75  # the base draws red when asked

    out = tmp_path / "r.json"
    assert main(["attack", "--concept", "red", "--family", "fixed", "--fixed-prompt", "a red star", "--budget", "2",
                 "--search-seeds", "1", "--finalists", "1", "--validation-seeds", "1", "--seeds", "2", "--steps", "4",
                 "--no-calibrate", "--json", str(out)]) == 0
    config = json.loads(out.read_text())["(base)"]["config"]
    assert config["families"] == ["fixed"] and config["family_options"]["fixed"] == {"fixed_prompts": ["a red star"]}
    capsys.readouterr()
