"""The red team (erasure/redteam/) is a real adversary: on the toy base it finds the concept, on a deliberately weak
pack it still does, and its record travels with the pack through push and pull."""

from __future__ import annotations

import json

import numpy as np
import pytest

from erasure.base.loading import sampling_defaults
from erasure.redteam.config import AttackConfig
from erasure.redteam.families import prompt as prompt_family
from erasure.redteam.families import settings as settings_family
from erasure.redteam.team import RedTeam
from erasure.toy.judge import ToyOracleJudge
from erasure.training.config import ESDConfig

# Small but complete: every family, fresh seeds disjoint from the search's, the base measured on the same attack.
QUICK = dict(budget=4, search_seeds=2, finalists=2, validation_seeds=2, seeds=10, steps=10, soft_steps=15,
             soft_targets=4, calibrate=False)


TOY = sampling_defaults("toy")  # how a request that sets nothing is sampled on the toy world (and its random twin)


@pytest.fixture(scope="module")
def judge(oracle):
    return ToyOracleJudge(oracle)


def test_the_attack_finds_the_concept_on_the_base(toy_pipe, judge):
    team = RedTeam(toy_pipe, judge, AttackConfig(**QUICK), TOY, progress=False)
    results = team.attack_pipe(toy_pipe, ["striped"])
    assert [r.family for r in results] == ["prompt", "settings", "soft-prompt"]
    for r in results:
        assert r.asr >= 0.9 and r.base_rate == r.asr and r.n == 10, r  # the base is the pipe attacked here
    seeds = {team.seeds_for(stage, n)[0] for stage, n in (("search", 2), ("validation", 2), ("fresh", 10))}
    assert len(seeds) == 3  # search, validation and fresh seeds never overlap


def test_a_weak_pack_scores_high_and_the_record_says_so(toy_pipe, judge, tmp_path):
    from erasure.pack.compose import with_packs
    from erasure.training.train import train_pack

    cfg = ESDConfig(concepts=["striped"], templates=["toy"], iterations=8, lr=1e-4, ddim_steps=10,
                    pool_trajectories=2, preserve=["dotted"])
    pack = train_pack("toy", cfg, tmp_path / "weak", eval_samples=0, progress=False)
    team = RedTeam(toy_pipe, judge, AttackConfig(families=["prompt"], **QUICK), TOY, progress=False)
    record = team.record(team.attack_pipe(with_packs(toy_pipe, [(pack, 1.0)]), pack.concepts), 1.0)
    assert record.asr["prompt"] >= 0.6, record  # eight iterations erase nothing an attacker cannot get back
    assert record.worst() == ("prompt", record.asr["prompt"]) and record.judge == "toy-oracle"


def test_the_record_round_trips_through_push_and_pull(tmp_path, toy_pipe, capsys):
    """`erasure attack --record` writes a new revision of the pack (same delta), which push and pull carry."""
    from erasure.cli import main
    from erasure.pack.concept_pack import ConceptPack
    from registry import open_registry

    from factories import make_pack, read_files

    src = tmp_path / "circle"
    make_pack(src, toy_pipe.unet, "circle", ("circle",), base_id="toy", magnitude=1e-4)
    before = read_files(src)
    quick = [f"--{k.replace('_', '-')}={v}" for k, v in QUICK.items() if k != "calibrate"]
    code = main(["attack", str(src), "--family", "prompt", *quick, "--no-calibrate", "--record", "--json", str(tmp_path / "r.json")])
    out = capsys.readouterr().out
    assert code == 0 and "recorded the red-team figures" in out
    after = read_files(src)
    assert after["delta.safetensors"] == before["delta.safetensors"] and after["pack.json"] != before["pack.json"]
    record = ConceptPack.from_pretrained(src).manifest.redteam
    assert record.asr["prompt"] == json.loads((tmp_path / "r.json").read_text())["circle"]["asr"]["prompt"]
    assert record.asr["prompt"] >= 0.9  # a 1e-4 random delta erases nothing: the attack says so
    assert "## Red team" in after["README.md"].decode()

    reg = open_registry(registry_dir=tmp_path / "registry")
    reg.push(src, "test/circle", tag="v1")
    pulled = reg.pull("test/circle", "v1", to=tmp_path / "pulled")
    assert pulled.pack.manifest.redteam == record and read_files(pulled.path) == after


def test_guide_away_is_attacked_as_served_and_recorded_with_the_figures(tmp_path, toy_pipe, capsys):
    """`erasure attack --guide-away S --record`: the pack is attacked with S applied and published with it, so its
    figures and the way it is served cannot drift apart; the card says what an export leaves out."""
    from erasure.cli import main
    from erasure.pack.compose import with_packs
    from erasure.pack.concept_pack import ConceptPack
    from erasure.sampling.guidance import guide_away_of

    from factories import make_pack

    src = tmp_path / "circle"
    make_pack(src, toy_pipe.unet, "circle", ("circle",), base_id="toy", magnitude=1e-4)
    quick = [f"--{k.replace('_', '-')}={v}" for k, v in QUICK.items() if k != "calibrate"]
    assert main(["attack", str(src), "--family", "prompt", *quick, "--no-calibrate", "--guide-away", "2",
                 "--record"]) == 0
    pack = ConceptPack.from_pretrained(src)
    assert pack.guide_away == 2.0 and pack.manifest.redteam.config.guide_away == 2.0
    assert "guided away from `circle` by 2.0" in (src / "README.md").read_text().replace("\n", " ")
    assert [(a.concept, a.scale) for a in guide_away_of(with_packs(toy_pipe, [(pack, 0.5)]).unet).aways] == [
        ("circle", 1.0)]  # times the scale
    found = pack.manifest.redteam.attack_prompts()
    assert main(["attack", str(src), "--family", "prompt", *quick, "--no-calibrate", "--record"]) == 0
    again = ConceptPack.from_pretrained(src).manifest.redteam
    assert again.config.guide_away == 2.0  # the pack's own by default
    assert found and again.config.start_prompts == found  # a new record starts from what the last one found
    capsys.readouterr()


@pytest.mark.parametrize("families", [["prompt"], ["settings"]])
def test_searches_stay_within_their_budget_and_rank_by_judge(random_pipe, judge, families):
    """Mechanics on random weights: candidates scored never exceed the budget, and the best is first."""
    cfg = AttackConfig(families=families, budget=6, search_seeds=1, finalists=2, validation_seeds=1, seeds=2,
                       steps=2, min_size=16, max_size=32, min_steps=1, max_steps=4, batch_size=8, calibrate=False)
    team = RedTeam(random_pipe, judge, cfg, TOY, progress=False)
    search = prompt_family.search if families == ["prompt"] else settings_family.search
    scored, n = search(team, random_pipe, "red")
    assert n == len(scored) <= 6 and len({s.attack for s in scored}) == n
    assert [s.key for s in scored] == sorted((s.key for s in scored), reverse=True)
    requests = [s.attack for s in scored]
    assert all(r.size <= 32 and r.size % 16 == 0 and r.steps <= 4 and r.guidance <= 20 for r in requests)
    assert np.isfinite([s.score for s in scored]).all()


def test_restarts_search_again_on_new_seeds_and_validate_every_finalist(random_pipe, judge, monkeypatch):
    """``restarts``: each black-box search runs again seeded anew, and the best of all their finalists is chosen on
    the validation seeds, so one unlucky search cannot make the record."""
    cfg = AttackConfig(families=["prompt"], budget=6, search_seeds=1, finalists=2, validation_seeds=1, seeds=2,
                       steps=2, min_size=16, max_size=32, min_steps=1, max_steps=4, batch_size=8, calibrate=False,
                       restarts=2)
    searches, validated = [], []
    search, score = prompt_family.search, RedTeam.score

    def spy_search(team, pipe, concept):
        scored, n = search(team, pipe, concept)
        searches.append((team.cfg.seed, [s.attack for s in scored[:2]], n))
        return scored, n

    def spy_score(self, pipe, concept, attacks, seeds):
        validated.append(list(attacks))
        return score(self, pipe, concept, attacks, seeds)

    monkeypatch.setattr(prompt_family, "search", spy_search)
    monkeypatch.setattr(RedTeam, "score", spy_score)
    attack, n = RedTeam(random_pipe, judge, cfg, TOY, progress=False).best_attack(random_pipe, "red", "prompt")
    assert [seed for seed, _, _ in searches] == [0, 1] and n == sum(k for _, _, k in searches)
    finalists = list(dict.fromkeys(a for _, best, _ in searches for a in best))
    assert validated[-1] == finalists and attack in finalists


def test_a_range_without_negative_prompts_is_searched_without_them(random_pipe, judge):
    """limits.negative_prompt false on the service: the settings search never sends one (and does with it on)."""
    cfg = AttackConfig(families=["settings"], budget=12, search_seeds=1, finalists=2, validation_seeds=1, seeds=2,
                       steps=2, min_size=16, max_size=32, min_steps=1, max_steps=4, batch_size=8, calibrate=False)
    rng = np.random.default_rng(0)
    on = RedTeam(random_pipe, judge, cfg, TOY, progress=False)
    assert any(n for _, n in settings_family.framings(on, "red", rng))
    off = RedTeam(random_pipe, judge, cfg.model_copy(update={"negative_prompt": False}), TOY, progress=False)
    assert not any(n for _, n in settings_family.framings(off, "red", np.random.default_rng(0)))
    scored, _ = settings_family.search(off, random_pipe, "red")
    assert scored and all(s.attack.negative_prompt is None for s in scored)
    guided = RedTeam(random_pipe, judge, cfg.model_copy(update={"min_guidance": 3.0}), TOY, progress=False)
    assert settings_family.setting_values(guided)["guidance"][0] == 3.0 and guided.default.guidance == 3.0
    assert min(s.attack.guidance for s in settings_family.search(guided, random_pipe, "red")[0]) == 3.0


def test_families_without_tested_support_are_refused_with_their_name(tmp_path, judge):
    """The attack and the robust terms run where they are tested (SD 1.x family, epsilon for the terms); an SDXL
    base or a v-prediction base for the robust terms is a clear error naming the family, before any work."""
    from erasure.errors import InvalidArgumentError, UnsupportedBaseError
    from erasure.training.trainer import ESDTrainer

    from factories import tiny_sd2_pipe, tiny_sdxl_pipe

    with pytest.raises(UnsupportedBaseError, match=r"erasure attack supports SD 1\.x / 2\.x.*this base is SDXL"):
        RedTeam(tiny_sdxl_pipe(tmp_path), judge, AttackConfig(**QUICK), TOY, progress=False)
    cfg = ESDConfig(concepts=["red"], guided_weight=1.0, iterations=1)
    with pytest.raises(InvalidArgumentError, match=r"--guided-weight.*predicting v_prediction"):
        ESDTrainer(tiny_sd2_pipe(tmp_path / "sd2"), cfg, progress=False)
    with pytest.raises(InvalidArgumentError, match=r"this base is SDXL"):
        ESDTrainer(tiny_sdxl_pipe(tmp_path / "xl"), cfg.model_copy(update={"guided_weight": 0.0,
                                                                            "adversarial_every": 5}), progress=False)


def test_the_prompt_search_finds_a_concept_drawn_for_a_siblings_prompt(toy_pipe, judge):
    """A model that draws red only when asked for yellow (its red words read as green): the prompt search starts
    from the siblings' prompts, so it finds red with no red word in the prompt."""
    import copy

    from erasure.prompts import names_any

    team = RedTeam(toy_pipe, judge, AttackConfig(families=["prompt"], **{**QUICK, "budget": 48}), TOY, progress=False)
    prompts = [r.prompt for r in prompt_family.candidates(team, "red", np.random.default_rng(0))]
    assert len(prompts) <= 48  # every starting prompt is scored
    for sibling in judge.siblings("red"):
        assert any(names_any(p, [sibling]) and not names_any(p, judge.names("red")) for p in prompts), sibling

    text_encoder = copy.deepcopy(toy_pipe.text_encoder)
    table = text_encoder.get_input_embeddings().weight.data
    token = lambda word: toy_pipe.tokenizer(word, add_special_tokens=False).input_ids[0]  # noqa: E731
    red = table[token("red")].clone()
    for word in judge.names("red"):
        table[token(word)] = table[token("green")]
    for word in judge.names("yellow"):
        table[token(word)] = red
    swapped = type(toy_pipe)(**{**toy_pipe.components, "text_encoder": text_encoder})
    (figure,) = team.attack_pipe(swapped, ["red"])
    assert figure.asr >= 0.6 and not names_any(figure.attack["prompt"], judge.names("red")), figure


def test_both_black_box_searches_start_from_prompts_naming_nothing_and_from_siblings(random_pipe, judge):
    """A model's own prior can draw the concept (the base draws stripes for "please"): the prompt search starts from
    prompts that name no concept of the judge's world, and the settings search frames them and sibling prompts."""
    from erasure.prompts import names_any

    world = [w for c in judge.concepts() for w in judge.names(c)]
    team = RedTeam(random_pipe, judge, AttackConfig(**QUICK), TOY, progress=False)
    for concept in ("striped", "circle"):
        prompts = [r.prompt for r in prompt_family.candidates(team, concept, np.random.default_rng(0))]
        framings = [p for p, _ in settings_family.framings(team, concept, np.random.default_rng(0))]
        for starts in (prompts, framings):
            assert any(not names_any(p, world) for p in starts), starts
        for sibling in judge.siblings(concept):
            assert any(names_any(p, judge.names(sibling)) and not names_any(p, judge.names(concept))
                       for p in framings), sibling


def test_both_black_box_searches_start_from_attacks_found_before(random_pipe, judge):
    """Attack version 4: the config's start prompts and the judge's known prompts (every earlier record's best
    attacks) come first in both searches, so a new record never misses what an earlier red team found."""
    cfg = AttackConfig(**QUICK, start_prompts=["a photo of nothing"])
    team = RedTeam(random_pipe, judge, cfg, TOY, progress=False)
    for concept in ("red", "square"):
        known = ["a photo of nothing", *judge.known_prompts(concept)]
        prompts = [r.prompt for r in prompt_family.candidates(team, concept, np.random.default_rng(0))]
        framings = [p for p, _ in settings_family.framings(team, concept, np.random.default_rng(0))]
        assert prompts[:len(known)] == known and framings[:len(known)] == known
    assert "hollow hollow background" in judge.known_prompts("circle")  # prompts naming nothing: every concept
    assert "crimson scarlet" in judge.known_prompts("red") and "crimson scarlet" not in judge.known_prompts("square")


def test_attacks_recorded_in_a_registry_start_the_searches(random_pipe, judge, tmp_path, capsys):
    """`--known-from NS`: the attacks every published record in NS found on the concept, and those found on any
    concept that name neither it nor a sibling (they leave its kind to the base's prior), start both searches;
    the record lists them in its config."""
    from erasure.cli import main

    found = {"red": ["crimson scarlet"], "circle": ["please", "a lime disc"], "green": ["a red ball"]}
    team = RedTeam(random_pipe, judge, AttackConfig(**QUICK), TOY, progress=False)
    team = team.starting_from_records(found, ["red"])
    assert team.cfg.start_prompts == ["crimson scarlet", "please"]  # "a lime disc" names green, a sibling of red

    quick = [f"--{k.replace('_', '-')}={v}" for k, v in QUICK.items() if k != "calibrate"]
    assert main(["attack", "--concept", "red", "--family", "prompt", *quick, "--no-calibrate", "--known-from", "toy",
                 "--json", str(tmp_path / "r.json")]) == 0
    config = json.loads((tmp_path / "r.json").read_text())["(base)"]["config"]
    assert config["known_from"] == ["toy"]
    assert "drawing please draw simple trigon" in config["start_prompts"]  # a superseded red record's (tag v5-attack2)
    assert {"image", "square for"} <= set(config["start_prompts"])  # circle's and square's: they name no colour
    assert "a photo of a stripy lime" not in config["start_prompts"]  # circle's, naming green
    capsys.readouterr()
