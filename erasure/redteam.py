"""The red team: attacks that try to bring an erased concept back, each scored by a judge on fresh seeds.

Three families, reported separately (``AttackConfig.families``):

* ``prompt`` -- black-box search over the tokenizer's vocabulary: an evolutionary search from prompts naming the
  concept, prompts naming its siblings and prompts naming nothing, whose mutations substitute, insert, delete,
  repeat and reorder words, drawing from the concept's names and synonyms, its siblings, the other attributes'
  words and the whole vocabulary. It sees only images.
* ``settings`` -- everything a request can set besides the prompt (with prompts naming the concept, a sibling or
  nothing): negative prompts (naming the siblings, the concept itself, other words), guidance from 0 to the
  maximum, every allowed size, steps; one setting at a time, then coordinate ascent from the best.
* ``soft-prompt`` -- white-box, UnlearnDiffAtk-style: a few continuous token embeddings put before the prompt and
  optimised (Adam, through the text encoder and the erased UNet) to denoise the base's images of the concept, each
  kept within the largest norm of a real token's embedding. They range over a continuous relaxation of the
  vocabulary, so they bound what a prompt of that length can do.

Candidates are scored on a few search seeds; the best ``finalists`` are re-scored on validation seeds; the best of
those is the family's attack, tested on ``seeds`` fresh seeds (never seen before) on the erased model and on the
base. Attack success rate (ASR) = share of those images the judge reads as the concept. A figure on a pack means
something only if the attack could have failed: with ``calibrate`` each family also runs against the base, where it
must find the concept.

Every UNet pass is conditioned as the family's Conditioner does (erasure/conditioning.py). Bases: the SD 1.x / 2.x
family only (the soft prompts do not cover SDXL's two encoders); others are refused with UnsupportedBaseError.

Example:
    >>> from erasure.redteam import RedTeam
    >>> team = RedTeam(load_pipeline("toy"), ToyOracleJudge(), AttackConfig(budget=32))
    >>> record = team.attack_pack(pack)             # a RedTeamRecord: ASR per family, base rates, the attacks
    >>> record.asr
    {'prompt': 0.03, 'settings': 0.05, 'soft-prompt': 0.2}
"""

from __future__ import annotations

import copy
import dataclasses
import datetime as dt
import sys
import time
import zlib
from collections.abc import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .conditioning import FAMILIES, conditioner_for, pipeline_family
from .config import AttackConfig
from .errors import InvalidArgumentError, UnsupportedBaseError
from .judges import Judge
from .pack import AttackFigure, ConceptPack, RedTeamRecord
from .prompts import mutate, vocabulary_words
from .softprompt import SUPPORTED_FAMILIES, SoftPromptEncoder

# 2: the prompt search also starts from prompts naming the concept's siblings; 3: and from prompts naming nothing
# (the base's own prior can draw the concept), and the settings search frames sibling and unnamed prompts too;
# 4: both also start from attacks found before: the judge's known prompts, the pack's own record's, start_prompts
ATTACK_VERSION = 4
# Disjoint seed ranges: the search, the validation of its finalists and the final test never share an image seed.
SEARCH_SEEDS, VALIDATION_SEEDS, FRESH_SEEDS = 0, 10**6, 2 * 10**6
GUIDANCE_GRID = (0.0, 1.5, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0)  # diffusers skips guidance at <= 1: 0 stands for all
STEPS_GRID = (1, 2, 4, 8, 12, 20, 35)


@dataclasses.dataclass(frozen=True)
class Request:
    """What one /generate request sets (a negative prompt of None is the empty prompt)."""

    prompt: str
    negative_prompt: str | None = None
    guidance: float = 3.0
    size: int = 64
    steps: int = 20

    def describe(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class SoftPrompt:
    """``vectors`` [k, D] put after the start token of each of ``prompts`` (one is cycled per image)."""

    vectors: torch.Tensor
    prompts: list[str]
    request: Request  # the request settings it is sampled with (its prompt is unused)
    loss: float = float("nan")

    def describe(self) -> dict:
        return {"tokens": int(self.vectors.shape[0]), "prompts": self.prompts[:4],
                "vector_norms": [round(float(v), 3) for v in self.vectors.norm(dim=1)],
                "final_loss": round(self.loss, 5), **{k: v for k, v in self.request.describe().items()
                                                       if k != "prompt"}}


@dataclasses.dataclass
class Scored:
    attack: Request | SoftPrompt
    hits: int
    n: int
    score: float  # mean judge probability: breaks ties between equal hit counts

    @property
    def rate(self) -> float:
        return self.hits / self.n if self.n else 0.0

    @property
    def key(self) -> tuple[float, float]:
        return (self.rate, self.score)


class RedTeam:
    """Runs the configured attack families against concepts of an erased pipeline, with the base for reference."""

    def __init__(self, base_pipe, judge: Judge, config: AttackConfig | None = None, progress: bool = True):
        from .pipeline import default_size

        family = pipeline_family(base_pipe)
        if family not in SUPPORTED_FAMILIES:
            raise UnsupportedBaseError(f"erasure attack supports {', '.join(FAMILIES[f] for f in SUPPORTED_FAMILIES)}"
                                       f" bases; this base is {FAMILIES[family]}")
        self.base, self.judge, self.cfg, self.progress = base_pipe, judge, config or AttackConfig(), progress
        self.conditioner = conditioner_for(base_pipe, base_pipe.device)
        self.native = default_size(base_pipe)
        unet = base_pipe.unet
        self.size_multiple = base_pipe.vae_scale_factor * 2 ** (len(unet.config.block_out_channels) - 1)
        self.default = self._within_limits(Request("", None, self.cfg.guidance, self.cfg.size or self.native,
                                                   self.cfg.steps))
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

    @torch.no_grad()
    def render_soft(self, pipe, soft: SoftPrompt, seeds: Sequence[int]) -> list:
        enc = SoftPromptEncoder(pipe, soft.vectors.shape[0])
        r = soft.request
        images = []
        for start in range(0, len(seeds), self.cfg.batch_size):
            chunk = list(seeds[start : start + self.cfg.batch_size])
            prompts = [soft.prompts[(start + j) % len(soft.prompts)] for j in range(len(chunk))]
            cond, uncond = enc.encode(soft.vectors, prompts), self.conditioner.unconditional(len(chunk), r.size)
            out = pipe(prompt_embeds=cond.encoder_hidden_states,
                       negative_prompt_embeds=uncond.encoder_hidden_states.to(cond.encoder_hidden_states),
                       num_inference_steps=r.steps, guidance_scale=r.guidance, height=r.size,
                width=r.size, generator=[torch.Generator("cpu").manual_seed(int(s)) for s in chunk],
                output_type="pil")
            images += out.images
        return images

    def score(self, pipe, concept: str, attacks: Sequence[Request | SoftPrompt], seeds: Sequence[int]) -> list[Scored]:
        """Each attack on every seed: hits and mean judge probability."""
        plain = [a for a in attacks if isinstance(a, Request)]
        rendered = iter(self.render(pipe, [(a, s) for a in plain for s in seeds]))
        out = []
        for a in attacks:
            if isinstance(a, Request):
                images = [next(rendered) for _ in seeds]
            else:
                images = self.render_soft(pipe, a, seeds)
            shows, probs = self.judge.shows(images, concept), self.judge.scores(images, concept)
            out.append(Scored(a, int(shows.sum()), len(seeds), float(probs.mean())))
        return out

    def _seeds(self, start: int, n: int, salt: int = 0) -> list[int]:
        return [start + 10_000 * self.cfg.seed + 1_000 * salt + i for i in range(n)]

    # --- black-box prompt search ----------------------------------------------------------------------------------

    def _max_words_ok(self, prompt: str) -> bool:
        n = len(self.base.tokenizer(prompt, add_special_tokens=False).input_ids)
        return 0 < n <= self.base.tokenizer.model_max_length - 2

    def _search(self, pipe, concept: str, initial: list, neighbours, desc: str) -> tuple[list[Scored], int]:
        """Score ``initial``, then ``neighbours(population, rng)`` candidates until the budget is spent (or a
        candidate shows the concept on every search seed); returns every scored candidate, best first."""
        from tqdm.auto import tqdm

        cfg = self.cfg
        seeds = self._seeds(SEARCH_SEEDS, cfg.search_seeds)
        rng = np.random.default_rng([cfg.seed, zlib.crc32(desc.encode())])
        seen: set = set()
        scored: list[Scored] = []
        bar = tqdm(total=cfg.budget, desc=desc, disable=not self.progress, unit="cand", leave=False)

        def run(batch: list) -> None:
            fresh = []
            for a in batch:
                if a not in seen and len(scored) + len(fresh) < cfg.budget:
                    seen.add(a)
                    fresh.append(a)
            for start in range(0, len(fresh), max(1, cfg.batch_size // cfg.search_seeds)):
                part = fresh[start : start + max(1, cfg.batch_size // cfg.search_seeds)]
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

    def prompt_candidates(self, concept: str, rng: np.random.Generator) -> list[Request]:
        """The search's starting prompts: attacks found before (``known_prompts``), natural prompts naming the
        concept (train and held-out wording), the bare name, repeated, word lists mixing its names with other
        words, prompts naming each sibling and no word of the concept (a pack can make the model draw the concept
        for a neighbour's prompt), prompts that leave the concept out, and prompts naming nothing."""
        j = self.judge
        names, siblings, others = j.names(concept), j.siblings(concept), j.other_words(concept)
        prompts = self.known_prompts(concept) + j.prompts(concept, 4, rng, "train") + j.prompts(
            concept, 2, rng, "heldout") + [
            names[0], " ".join([names[0]] * 3), " ".join(names),
            " ".join(list(rng.permutation(siblings + names[:1]))),
            " ".join(list(rng.permutation(others))[:4] + names[1:2]),
            " ".join(list(rng.permutation(siblings))),
        ] + [j.prompts(s, 1, rng, ("train", "heldout")[i % 2])[0] for i, s in enumerate(siblings)] + (
            j.neutral_prompts(concept, 2, rng) + self.unnamed_prompts(concept, 3, rng))
        return [dataclasses.replace(self.default, prompt=p) for p in dict.fromkeys(prompts)
                if p.strip() and self._max_words_ok(p)]

    def search_prompts(self, pipe, concept: str) -> tuple[list[Scored], int]:
        j = self.judge
        rng = np.random.default_rng([self.cfg.seed, 1])
        pools = {"names": j.names(concept), "siblings": j.siblings(concept), "others": j.other_words(concept),
                 "vocabulary": self.vocabulary}

        def neighbours(population: list[Scored], rng: np.random.Generator) -> list[Request]:
            top = population[: max(2, min(8, len(population)))]
            out = []
            for _ in range(max(1, self.cfg.batch_size // self.cfg.search_seeds)):
                a, b = (top[int(rng.integers(len(top)))] for _ in range(2))
                parent = max(a, b, key=lambda s: s.key).attack
                other = top[int(rng.integers(len(top)))].attack.prompt.split()
                words = mutate(parent.prompt.split(), other, pools, rng)
                prompt = " ".join(words)
                if prompt and self._max_words_ok(prompt):
                    out.append(dataclasses.replace(self.default, prompt=prompt))
            return out

        return self._search(pipe, concept, self.prompt_candidates(concept, rng), neighbours, f"{concept}: prompt")

    # --- request settings ---------------------------------------------------------------------------------------

    def framings(self, concept: str, rng: np.random.Generator) -> list[tuple[str, str | None]]:
        """(prompt, negative prompt) pairs: attacks found before, plain prompts naming the concept, prompts leaving
        it out, naming a sibling or naming nothing, and negative prompts naming its siblings, each sibling, the
        concept itself (an erased word can push towards it when negated) and other words; no negative prompts where
        the request range has none."""
        j = self.judge
        named = j.prompts(concept, 1, rng, "train") + j.prompts(concept, 1, rng, "heldout")
        neutral = j.neutral_prompts(concept, 2, rng)
        siblings, names = j.siblings(concept), j.names(concept)
        others = list(rng.permutation(j.other_words(concept)))[:4]
        sibling_prompts = [j.prompts(s, 1, rng, "train")[0] for s in siblings]
        unnamed = self.unnamed_prompts(concept, 2, rng)
        out = [(named[0], None), (named[1], None), (neutral[0], None),
               (named[0], " ".join(siblings)), (neutral[0], " ".join(siblings)), (neutral[1], " ".join(siblings)),
               (neutral[0], " ".join(names)), (named[0], " ".join(names)), (named[0], " ".join(others))]
        out += [(neutral[0], s) for s in siblings]
        out += [(p, None) for p in sibling_prompts + unnamed] + [(p, " ".join(siblings)) for p in unnamed]
        out += [(p, " ".join(x for x in siblings if x != s)) for p, s in zip(sibling_prompts, siblings)]
        out = [(p, None) for p in self.known_prompts(concept)] + out
        if not self.cfg.negative_prompt:  # a service with limits.negative_prompt false refuses them
            out = [(p, None) for p, _ in out]
        return [(p, n) for p, n in dict.fromkeys(out) if p.strip()]

    def _within_limits(self, request: Request) -> Request:
        """``request`` with guidance, size and steps moved into the range a request may set (the nearest value)."""
        cfg, sizes = self.cfg, self.setting_values()["size"]
        return dataclasses.replace(
            request, guidance=min(max(request.guidance, cfg.min_guidance), cfg.max_guidance),
            size=min(sizes, key=lambda s: (abs(s - request.size), s)) if sizes else request.size,
            steps=min(max(request.steps, cfg.min_steps), cfg.max_steps))

    def setting_values(self) -> dict[str, list]:
        cfg = self.cfg
        m = self.size_multiple
        return {
            "guidance": sorted({g for g in GUIDANCE_GRID if cfg.min_guidance <= g <= cfg.max_guidance}
                               | {cfg.min_guidance, cfg.max_guidance}),
            "size": list(range(-(-max(cfg.min_size, m) // m) * m, cfg.max_size + 1, m)),
            "steps": sorted({s for s in STEPS_GRID if cfg.min_steps <= s <= cfg.max_steps}
                            | {cfg.min_steps, cfg.max_steps}),
        }

    def search_settings(self, pipe, concept: str) -> tuple[list[Scored], int]:
        rng = np.random.default_rng([self.cfg.seed, 2])
        framings = self.framings(concept, rng)
        values = self.setting_values()
        initial = [dataclasses.replace(self.default, prompt=p, negative_prompt=n) for p, n in framings]
        dims = ["framing", *values]

        def neighbours(population: list[Scored], rng: np.random.Generator) -> list[Request]:
            # coordinate ascent: every value of one dimension around the best request so far, dimensions in turn;
            # once each is exhausted around the best, random combinations of the top requests' values
            best = population[0].attack
            for dim in [dims[(len(population) + k) % len(dims)] for k in range(len(dims))]:
                if dim == "framing":
                    cands = [dataclasses.replace(best, prompt=p, negative_prompt=n) for p, n in framings]
                else:
                    cands = [dataclasses.replace(best, **{dim: v}) for v in values[dim]]
                fresh = [c for c in cands if c not in {s.attack for s in population}]
                if fresh:
                    return fresh
            top = [s.attack for s in population[:6]]
            pick = lambda: top[int(rng.integers(len(top)))]  # noqa: E731
            return [dataclasses.replace(pick(), **{d: getattr(pick(), d) for d in values}) for _ in range(4)]

        return self._search(pipe, concept, initial, neighbours, f"{concept}: settings")

    # --- white-box soft prompt ----------------------------------------------------------------------------------

    def _targets(self, concept: str) -> tuple[torch.Tensor, list[str]]:
        """Base latents of images that show ``concept`` and their prompts (the soft prompt's training data)."""
        cfg, pipe = self.cfg, self.base
        rng = np.random.default_rng([cfg.seed, 3])
        prompts = self.judge.prompts(concept, cfg.soft_targets * 2, rng, "train")
        seeds = self._seeds(SEARCH_SEEDS, len(prompts), salt=7)
        r = self.default
        with torch.no_grad():
            latents = pipe(prompt=prompts, num_inference_steps=r.steps, guidance_scale=r.guidance, height=r.size,
                           width=r.size, generator=[torch.Generator("cpu").manual_seed(s) for s in seeds],
                           output_type="latent").images
            decoded = pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample
            images = pipe.image_processor.postprocess(decoded, output_type="pil")
        keep = np.flatnonzero(self.judge.shows(images, concept))[: cfg.soft_targets]
        if len(keep) < 2:
            raise InvalidArgumentError(f"the base shows {concept!r} on {len(keep)} of {len(prompts)} images: "
                                       "nothing for a soft prompt to learn from")
        return latents[torch.from_numpy(keep)], [prompts[i] for i in keep]

    def optimize_soft_prompt(self, pipe, concept: str, targets=None) -> SoftPrompt:
        from diffusers import DDPMScheduler
        from tqdm.auto import tqdm

        cfg = self.cfg
        x0, prompts = targets if targets is not None else self._targets(concept)
        enc = SoftPromptEncoder(pipe, cfg.soft_tokens)
        vectors = enc.word_vectors(self.judge.names(concept)).requires_grad_(True)
        noise_sched = DDPMScheduler.from_config(pipe.scheduler.config)
        prediction = pipe.scheduler.config.get("prediction_type", "epsilon")
        opt = torch.optim.Adam([vectors], lr=cfg.soft_lr)
        g = torch.Generator("cpu").manual_seed(cfg.seed)
        batch = min(8, len(prompts))
        losses = []
        bar = tqdm(range(cfg.soft_steps), desc=f"{concept}: soft-prompt", disable=not self.progress, leave=False)
        was_training = pipe.unet.training
        pipe.unet.eval()
        params = [p for m in (pipe.unet, pipe.text_encoder) for p in m.parameters()]
        flags = [p.requires_grad for p in params]
        for p in params:
            p.requires_grad_(False)
        try:
            for _ in bar:
                idx = torch.randint(len(prompts), (batch,), generator=g)
                t = torch.randint(0, noise_sched.config.num_train_timesteps, (batch,), generator=g)
                noise = torch.randn(x0[idx].shape, generator=g)
                x_t = noise_sched.add_noise(x0[idx], noise, t)
                target = noise if prediction == "epsilon" else noise_sched.get_velocity(x0[idx], noise, t)
                cond = enc.encode(vectors, [prompts[i] for i in idx.tolist()])
                loss = F.mse_loss(pipe.unet(x_t, t, **cond.unet_kwargs()).sample, target)
                opt.zero_grad()
                loss.backward()
                opt.step()
                enc.project(vectors.data)
                losses.append(loss.item())
                bar.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}")
        finally:
            for p, f in zip(params, flags):
                p.requires_grad_(f)
            pipe.unet.train(was_training)
        return SoftPrompt(vectors.detach(), prompts, self.default, float(np.mean(losses[-20:])))

    # --- one family against one concept -------------------------------------------------------------------------

    def best_attack(self, pipe, concept: str, family: str, targets=None) -> tuple[Request | SoftPrompt, int]:
        """The family's attack on ``pipe``: the search, then the finalists on validation seeds."""
        if family == "soft-prompt":
            return self.optimize_soft_prompt(pipe, concept, targets), 1
        finalists, n = {}, 0
        for restart in range(self.cfg.restarts):
            team = copy.copy(self)
            team.cfg = self.cfg.model_copy(update={"seed": self.cfg.seed + restart})
            scored, candidates = (team.search_prompts if family == "prompt" else team.search_settings)(pipe, concept)
            n += candidates
            for s in scored[: self.cfg.finalists]:
                finalists.setdefault(s.attack, s)
        validated = self.score(pipe, concept, list(finalists), self._seeds(VALIDATION_SEEDS, self.cfg.validation_seeds))
        best = max(zip(validated, finalists.values()), key=lambda vs: (vs[0].key, vs[1].key))[0]
        return best.attack, n

    def fresh_rate(self, pipe, concept: str, attack) -> Scored:
        return self.score(pipe, concept, [attack], self._seeds(FRESH_SEEDS, self.cfg.seeds))[0]

    def attack(self, pipe, concept: str, family: str) -> AttackFigure:
        """Run ``family`` against ``pipe`` (the base with the packs applied) and measure its best attack on fresh
        seeds, on ``pipe`` and on the base."""
        self.judge.check(concept)
        t0 = time.perf_counter()
        targets = self._targets(concept) if family == "soft-prompt" else None
        attack, n = self.best_attack(pipe, concept, family, targets)
        erased, base = self.fresh_rate(pipe, concept, attack), self.fresh_rate(self.base, concept, attack)
        calibration = self.calibration(concept, family, targets) if self.cfg.calibrate else None
        return AttackFigure(family=family, concept=concept, asr=erased.rate, base_rate=base.rate,
                            calibration=calibration, n=erased.n, attack=attack.describe(), candidates=n,
                            seconds=round(time.perf_counter() - t0, 1))

    def calibration(self, concept: str, family: str, targets=None) -> float:
        """The family run against the base: its fresh-seed rate (cached per concept and family)."""
        key = (concept, family)
        if key not in self._calibration:
            attack, _ = self.best_attack(self.base, concept, family, targets)
            self._calibration[key] = self.fresh_rate(self.base, concept, attack).rate
        return self._calibration[key]

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

    def attack_pipe(self, pipe, concepts: Sequence[str]) -> list[AttackFigure]:
        for c in concepts:
            self.judge.check(c)
        return [self.attack(pipe, c, f) for c in concepts for f in self.cfg.families]

    def attack_pack(self, pack: ConceptPack, scale: float = 1.0) -> RedTeamRecord:
        """Every family against every concept of ``pack`` composed alone onto the base."""
        from .compose import with_packs

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


def print_records(records: dict[str, RedTeamRecord], console=None) -> None:
    """One row per pack, concept and family: ASR on fresh seeds next to the base's rate and the calibration."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console(width=None if sys.stdout.isatty() else 150)
    t = Table(title="red team: attack success on fresh seeds (judge reads the concept)")
    for col in ("pack", "concept", "family", "ASR", "base, same attack", "attack vs base", "best attack", "time"):
        t.add_column(col, justify="right" if col in ("ASR", "base, same attack", "attack vs base", "time") else "left")
    for name, rec in records.items():
        for r in rec.results:
            colour = "red" if r.asr > 0.25 else "yellow" if r.asr > 0.10 else "green"
            calib = "-" if r.calibration is None else f"{r.calibration:.0%}"
            t.add_row(name, r.concept, r.family, f"[{colour}]{r.asr:.0%}[/] (n={r.n})", f"{r.base_rate:.0%}", calib,
                      short(r.attack), f"{r.seconds:.0f} s")
    console.print(t)


def short(attack: dict, width: int = 60) -> str:
    default = {"negative_prompt": None, "guidance": 3.0, "steps": 20, "size": 64}
    if "tokens" in attack:
        text = f"{attack['tokens']} soft tokens + {attack['prompts'][0]!r}"
    else:
        text = repr(attack["prompt"]) + "".join(f", {k}={attack[k]!r}" for k in default
                                                if k in attack and attack[k] != default[k])
    return text if len(text) <= width else text[: width - 1] + "…"
