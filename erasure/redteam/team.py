"""The red team: attack families that try to bring an erased concept back, each scored by a judge on fresh seeds.

The families are registered in erasure/redteam/families/ (``prompt``, ``settings``, ``soft-prompt``) and reported
separately (``AttackConfig.families``). Candidates are scored on a few search seeds; the best ``finalists`` are
re-scored on validation seeds; the best of those is the family's attack, tested on ``seeds`` fresh seeds (never seen
before) on the erased model and on the base. Attack success rate (ASR) = share of those images the judge reads as the
concept. A figure on a pack means something only if the attack could have failed: with ``calibrate`` each family also
runs against the base, where it must find the concept.

Every denoiser pass is conditioned as the family's Conditioner does (erasure/base/conditioning.py). Bases: the SD 1.x
/ 2.x family only (the soft prompts do not cover SDXL's two encoders); others are refused with UnsupportedBaseError.

Example:
    >>> from erasure.redteam.team import RedTeam
    >>> team = RedTeam(load_pipeline("toy"), ToyOracleJudge(), AttackConfig(budget=32), sampling_defaults("toy"))
    >>> record = team.attack_pack(pack)             # a RedTeamRecord: ASR per family, base rates, the attacks
    >>> record.asr
    {'prompt': 0.03, 'settings': 0.05, 'soft-prompt': 0.2}
"""

from __future__ import annotations

import copy
import datetime as dt
import time
import zlib
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch

from ..base.families import FAMILIES as BASE_FAMILIES
from ..base.families import family_of
from ..base.loading import SamplingDefaults
from ..base.softprompt import SUPPORTED_FAMILIES
from ..errors import UnsupportedBaseError
from ..pack.compose import with_packs
from ..pack.concept_pack import ConceptPack
from ..prompts import vocabulary_words
from .attacks import Request, Scored
from .config import AttackConfig
from .families import get_family
from .judges import Judge
from .record import AttackFigure, RedTeamRecord

# 2: the prompt search also starts from prompts naming the concept's siblings; 3: and from prompts naming nothing
# (the base's own prior can draw the concept), and the settings search frames sibling and unnamed prompts too;
# 4: both also start from attacks found before: the judge's known prompts, the pack's own record's, start_prompts
ATTACK_VERSION = 4
# Disjoint seed ranges: the search, the validation of its finalists and the final test never share an image seed.
SEED_RANGES = {"search": 0, "validation": 10**6, "fresh": 2 * 10**6}


class RedTeam:
    """Runs the configured attack families against concepts of an erased pipeline, with the base for reference.

    ``defaults``: how the base samples a request that sets nothing (``LoadedBase.defaults``); the config's
    ``steps`` / ``guidance`` / ``size`` override them, and the record states what was used."""

    def __init__(self, base_pipe, judge: Judge, config: AttackConfig | None = None,
                 defaults: SamplingDefaults | None = None, progress: bool = True):
        family = family_of(base_pipe)
        if family.name not in SUPPORTED_FAMILIES:
            raise UnsupportedBaseError(f"erasure attack supports "
                                       f"{', '.join(BASE_FAMILIES[f].label for f in SUPPORTED_FAMILIES)} bases; "
                                       f"this base is {family.label}")
        cfg, defaults = config or AttackConfig(), defaults or SamplingDefaults()
        self.base, self.judge, self.progress = base_pipe, judge, progress
        self.conditioner = family.conditioner_for(base_pipe, base_pipe.device)
        self.size_multiple = family.size_multiple(base_pipe)
        steps, guidance, size = cfg.range().clamp(
            cfg.steps or defaults.steps, defaults.guidance if cfg.guidance is None else cfg.guidance,
            cfg.size or defaults.size or family.native_size(base_pipe), self.size_multiple)
        self.cfg = cfg.model_copy(update={"steps": cfg.steps or defaults.steps,
                                          "guidance": defaults.guidance if cfg.guidance is None else cfg.guidance,
                                          "size": cfg.size or defaults.size})
        self.default = Request("", None, guidance, size, steps)  # a request that sets nothing, within the range
        self.vocabulary = vocabulary_words(base_pipe.tokenizer)
        self._calibration: dict[tuple[str, str], float] = {}

    # --- images -------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def render(self, pipe, rows: Sequence[tuple[Request, int]]) -> list:
        """One image per (request, seed); rows sharing guidance, size and steps go through one batched call."""
        images: list = [None] * len(rows)
        groups: dict[tuple, list[int]] = {}
        for i, (r, _) in enumerate(rows):
            groups.setdefault((r.guidance, r.size, r.steps), []).append(i)
        for (guidance, size, steps), idx in groups.items():
            for start in range(0, len(idx), self.cfg.batch_size):
                chunk = idx[start : start + self.cfg.batch_size]
                out = pipe(prompt=[rows[i][0].prompt for i in chunk],
                           negative_prompt=[rows[i][0].negative_prompt or "" for i in chunk],
                           num_inference_steps=steps, guidance_scale=guidance, height=size, width=size,
                           generator=[torch.Generator("cpu").manual_seed(int(rows[i][1])) for i in chunk],
                           output_type="pil")
                for i, im in zip(chunk, out.images):
                    images[i] = im
        return images

    def score(self, pipe, concept: str, attacks: Sequence, seeds: Sequence[int]) -> list[Scored]:
        """Each attack on every seed: hits and mean judge probability. Requests render in batches; other attacks
        render themselves (``attack.render(team, pipe, seeds)``)."""
        plain = [a for a in attacks if isinstance(a, Request)]
        rendered = iter(self.render(pipe, [(a, s) for a in plain for s in seeds]))
        out = []
        for a in attacks:
            images = [next(rendered) for _ in seeds] if isinstance(a, Request) else a.render(self, pipe, seeds)
            shows, probs = self.judge.shows(images, concept), self.judge.scores(images, concept)
            out.append(Scored(a, int(shows.sum()), len(seeds), float(probs.mean())))
        return out

    def seeds_for(self, stage: str, n: int, salt: int = 0) -> list[int]:
        """``n`` image seeds of ``stage`` ("search", "validation", "fresh"): the ranges never overlap."""
        return [SEED_RANGES[stage] + 10_000 * self.cfg.seed + 1_000 * salt + i for i in range(n)]

    # --- what the black-box families share ----------------------------------------------------------------------

    def fits_tokenizer(self, prompt: str) -> bool:
        n = len(self.base.tokenizer(prompt, add_special_tokens=False).input_ids)
        return 0 < n <= self.base.tokenizer.model_max_length - 2

    def search(self, pipe, concept: str, initial: list, neighbours, desc: str) -> tuple[list[Scored], int]:
        """Score ``initial``, then ``neighbours(population, rng)`` candidates until the budget is spent (or a
        candidate shows the concept on every search seed); returns every scored candidate, best first."""
        from tqdm.auto import tqdm

        cfg = self.cfg
        seeds = self.seeds_for("search", cfg.search_seeds)
        rng = np.random.default_rng([cfg.seed, zlib.crc32(desc.encode())])
        seen: set = set()
        scored: list[Scored] = []
        bar = tqdm(total=cfg.budget, desc=desc, disable=not self.progress, unit="cand", leave=False)
        per_call = max(1, cfg.batch_size // cfg.search_seeds)

        def run(batch: list) -> None:
            fresh = []
            for a in batch:
                if a not in seen and len(scored) + len(fresh) < cfg.budget:
                    seen.add(a)
                    fresh.append(a)
            for start in range(0, len(fresh), per_call):
                part = fresh[start : start + per_call]
                scored.extend(self.score(pipe, concept, part, seeds))
                bar.update(len(part))
                best = max(scored, key=lambda s: s.key)
                bar.set_postfix(best=f"{best.rate:.0%}")

        def done() -> bool:
            best = max(scored, key=lambda s: s.key) if scored else None
            return len(scored) >= cfg.budget or (best is not None and best.rate == 1.0 and best.score > 0.9)

        run(initial)
        stale = 0
        while not done() and stale < 50:
            before = len(scored)
            run(neighbours(sorted(scored, key=lambda s: s.key, reverse=True), rng))
            stale = stale + 1 if len(scored) == before else 0
        bar.close()
        return sorted(scored, key=lambda s: s.key, reverse=True), len(scored)

    def validated(self, search: Callable, pipe, concept: str) -> tuple[Request, int]:
        """A black-box family's attack: ``search(team, pipe, concept)`` from ``restarts`` seeds, then the
        finalists of every search on validation seeds; the best of them, and the candidates scored."""
        finalists, n = {}, 0
        for restart in range(self.cfg.restarts):
            team = copy.copy(self)
            team.cfg = self.cfg.model_copy(update={"seed": self.cfg.seed + restart})
            scored, candidates = search(team, pipe, concept)
            n += candidates
            for s in scored[: self.cfg.finalists]:
                finalists.setdefault(s.attack, s)
        checked = self.score(pipe, concept, list(finalists), self.seeds_for("validation", self.cfg.validation_seeds))
        best = max(zip(checked, finalists.values()), key=lambda vs: (vs[0].key, vs[1].key))[0]
        return best.attack, n

    def unnamed_prompts(self, concept: str, n: int, rng: np.random.Generator) -> list[str]:
        """``n`` prompts of one to three vocabulary words that name no concept of the judge's world ("please",
        "image for"): what the model draws then is its own prior, which may be the concept."""
        j = self.judge
        named = set(j.names(concept)) | set(j.other_words(concept)) | {
            w for s in j.siblings(concept) for w in j.names(s)}
        words = [w for w in self.vocabulary if w not in named]
        return [" ".join(rng.choice(words, size=1 + i % 3)) for i in range(n)] if words else []

    def known_prompts(self, concept: str) -> list[str]:
        """Attacks found before: the config's ``start_prompts``, then the judge's known prompts."""
        return list(dict.fromkeys(self.cfg.start_prompts + self.judge.known_prompts(concept)))

    # --- one family against one concept -------------------------------------------------------------------------

    def best_attack(self, pipe, concept: str, family: str, prepared=None) -> tuple:
        """The family's best attack on ``pipe`` and the candidates it scored."""
        return get_family(family).best_attack(self, pipe, concept, prepared)

    def fresh_rate(self, pipe, concept: str, attack) -> Scored:
        return self.score(pipe, concept, [attack], self.seeds_for("fresh", self.cfg.seeds))[0]

    def attack(self, pipe, concept: str, family: str) -> AttackFigure:
        """Run ``family`` against ``pipe`` (the base with the packs applied) and measure its best attack on fresh
        seeds, on ``pipe`` and on the base."""
        self.judge.check(concept)
        t0 = time.perf_counter()
        prepare = get_family(family).prepare
        prepared = prepare(self, concept) if prepare is not None else None
        attack, n = self.best_attack(pipe, concept, family, prepared)
        erased, base = self.fresh_rate(pipe, concept, attack), self.fresh_rate(self.base, concept, attack)
        calibration = self.calibration(concept, family, prepared) if self.cfg.calibrate else None
        return AttackFigure(family=family, concept=concept, asr=erased.rate, base_rate=base.rate,
                            calibration=calibration, n=erased.n, attack=attack.describe(), candidates=n,
                            seconds=round(time.perf_counter() - t0, 1))

    def calibration(self, concept: str, family: str, prepared=None) -> float:
        """The family run against the base: its fresh-seed rate (cached per concept and family)."""
        key = (concept, family)
        if key not in self._calibration:
            attack, _ = self.best_attack(self.base, concept, family, prepared)
            self._calibration[key] = self.fresh_rate(self.base, concept, attack).rate
        return self._calibration[key]

    # --- where the searches start -------------------------------------------------------------------------------

    def starting_from(self, prompts: Sequence[str]) -> "RedTeam":
        """This red team with ``prompts`` added to its ``start_prompts`` (sharing its calibration on the base)."""
        team = copy.copy(self)
        team.cfg = self.cfg.model_copy(update={"start_prompts": list(dict.fromkeys([*self.cfg.start_prompts,
                                                                                     *prompts]))})
        return team

    def starting_from_records(self, attacks: Mapping[str, Sequence[str]], concepts: Sequence[str]) -> "RedTeam":
        """This red team also starting from ``attacks`` (concept -> prompts, e.g. a registry's records) found on
        ``concepts``, and from those found on any concept that name neither the concept nor a sibling: they leave
        its kind (a colour, a shape) to the base's prior, which can draw the concept."""
        prompts = []
        for c in concepts:
            kind = {c, *self.judge.siblings(c)}
            prompts += list(attacks.get(c, []))
            prompts += [p for found in attacks.values() for p in found if not kind & set(self.judge.named_concepts(p))]
        return self.starting_from(prompts)

    def for_pack(self, pack: ConceptPack) -> "RedTeam":
        """The red team for ``pack``: it also starts from every black-box attack of the pack's own record, so a
        new record never forgets what the last one found."""
        return self.starting_from(pack.manifest.redteam.attack_prompts() if pack.manifest.redteam else [])

    # --- records ------------------------------------------------------------------------------------------------

    def attack_pipe(self, pipe, concepts: Sequence[str]) -> list[AttackFigure]:
        for c in concepts:
            self.judge.check(c)
        return [self.attack(pipe, c, f) for c in concepts for f in self.cfg.families]

    def attack_pack(self, pack: ConceptPack, scale: float = 1.0) -> RedTeamRecord:
        """Every family against every concept of ``pack`` composed alone onto the base."""
        for c in pack.concepts:
            self.judge.check(c)
        t0 = time.perf_counter()
        pipe, team = with_packs(self.base, [(pack, scale)]), self.for_pack(pack)
        return team.record(team.attack_pipe(pipe, pack.concepts), time.perf_counter() - t0)

    def record(self, results: list[AttackFigure], seconds: float) -> RedTeamRecord:
        asr: dict[str, float] = {}
        base_rate: dict[str, float] = {}
        for r in results:  # the worst concept per family, and the base's rate on that same attack
            if r.asr >= asr.get(r.family, -1.0):
                asr[r.family], base_rate[r.family] = r.asr, r.base_rate
        return RedTeamRecord(attack_version=ATTACK_VERSION, judge=self.judge.name, config=self.cfg, asr=asr,
                             base_rate=base_rate, results=results, seconds=round(seconds, 1),
                             created_at=dt.datetime.now(dt.timezone.utc))

