"""ESD (Erased Stable Diffusion, Gandikota et al., ICCV 2023) on a diffusers SD-family pipeline.

The objective, exactly as in the paper (c0 is the empty prompt):

    target = eps*(x_t, t, c0) - eta * (eps*(x_t, t, c) - eps*(x_t, t, c0))
    loss   = || eps_theta(x_t, t, c_from) - target ||^2          (c_from = c unless --erase-from)

eps* is the frozen base, eps_theta the UNet being trained (only the tensors the method selects). c is the concept's
name (the paper), or a prompt drawn per trajectory from ``templates`` ("a photo of {}", or "toy": toy-world prompts
naming the concept), since a small text encoder may not carry an erasure learnt on the bare name into longer
prompts. c0 is then the same prompt without the concept ("a photo of"), so the negative guidance removes the
concept and nothing else the prompt says; with the default template "{}" c0 is "", the paper's objective.

``preserve`` (not in the paper; off by default) adds a term keeping the UNet's prediction for the same prompt with
another concept in its place equal to the base's: ``|| eps_theta(x'_t, t, c_p) - eps*(x'_t, t, c_p) ||^2`` with
weight ``preserve_weight``, since erasing "circle" can drag its neighbours ("square") along. x'_t is sampled like
x_t but conditioned on c_p, at the same step.

``preserve_unconditional`` (not in the paper; off by default) holds the empty prompt's prediction to the base's on
every x_t of the step, with the same weight. Classifier-free guidance reads eps(x, c) - eps(x, ""): ESD moves
eps(x, "") too, which cancels part of the erasure and shifts every other prompt.

``anchor`` (not in the paper; off by default) puts another concept in c0 instead of leaving the erased one out
("a dotted red circle" for "a dotted red square"). A base that draws the concept when nothing is named gives
eps*(x_t, c0) ~ eps*(x_t, c), and the negative guidance has nothing to push against.

x_t comes from DDIM sampling conditioned on c with guidance, stopped at a uniformly drawn step, using the trained
UNet (paper) or the frozen one (official script), at ``resolution`` pixels (default: the base's native size).

Every UNet pass is conditioned through the pipeline family's ``Conditioner`` (erasure/conditioning.py), so SD 1.x,
SD 2.x and SDXL share this trainer: for SDXL the prompts carry pooled text embeddings and time ids, and c0 = "" is
SDXL's unconditional branch (zeros with ``force_zeros_for_empty_prompt``), the one its sampler guides with.

v-prediction (SD 2.x): with x_t = a x0 + s eps (a^2 + s^2 = 1) the UNet predicts v = a eps - s x0 = eps / a - (s/a)
x_t, which for a fixed (x_t, t) is affine in eps with the same offset for every prompt. The target's weights
(1 + eta and -eta) sum to 1, so the target written on v-predictions is exactly the v of the eps-space target; the
loss on v is the eps-space loss times 1/a^2. Each term is weighted by a^2 (alphas_cumprod[t]) so the objective
is the paper's, in eps-space, whatever the base predicts; the sampler uses the raw predictions as its scheduler
expects.

Memory: the frozen base shares every untouched tensor with the trained UNet (one UNet copy; memory grows by the
touched tensors), Adam holds state for the trained tensors only, ``gradient_checkpointing`` recomputes activations
in the backward pass, and a base loaded in half precision (bfloat16) keeps its untouched tensors there while the
trained ones train as float32 masters: under autocast on a GPU, with float32 compute per layer on a CPU.

Two loops produce x_t:

* ``reference``: the official per-iteration algorithm: a fresh x_t every iteration (up to ``ddim_steps`` guided
  UNet passes), then 3 UNet passes and 1 backward. Sampling dominates the cost.
* ``pooled`` (default): every ``refresh_every`` iterations it samples ``pool_trajectories`` whole trajectories per
  concept in one batch and keeps every intermediate x_t; each iteration then draws ``batch_size`` (x_t, t) pairs
  from the pool, which is the same uniform-step distribution. With frozen sampling the guided passes already
  computed eps*(x_t, c) and eps*(x_t, c0), so the targets are cached for free. bench/esd_loops.py measures both.

Example:
    >>> from erasure.training.trainer import ESDTrainer
    >>> trainer = ESDTrainer(pipe, ESDConfig(concepts=["circle"], iterations=200, lr=1e-4))
    >>> trainer.train()
    >>> delta = trainer.delta()   # {diffusers name: theta - theta*}
"""

from __future__ import annotations

import copy
import re
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..base.conditioning import Conditioning
from ..base.families import family_of
from ..errors import InvalidArgumentError
from ..files import atomic_path
from ..pack.concept_pack import fingerprint
from ..prompts import mutate, names_any, replace_words, vocabulary_words, without
from ..toy.world import concept_prompt
from .config import ESDConfig
from .methods import select_parameters
from .robust import robust_terms

PREDICTION_TYPES = ("epsilon", "v_prediction")


def check_supported(pipe) -> str:
    """The pipeline's family; UnsupportedBaseError or InvalidArgumentError for what ESD cannot train."""
    family = family_of(pipe).name
    prediction = pipe.scheduler.config.get("prediction_type", "epsilon")
    if prediction not in PREDICTION_TYPES:
        raise InvalidArgumentError(f"the base's scheduler predicts {prediction!r}; ESD trains bases that predict "
                                   f"{' or '.join(PREDICTION_TYPES)}")
    return family


def _set_parameter(module: torch.nn.Module, name: str, value: torch.nn.Parameter) -> None:
    owner, _, leaf = name.rpartition(".")
    setattr(module.get_submodule(owner) if owner else module, leaf, value)


def compute_in_float32(model: torch.nn.Module) -> None:
    """Keep ``model``'s half-precision parameters as they are in memory but compute in float32: each module's own
    parameters are cast for its call only. For CPUs without bfloat16 units (AVX2), where bfloat16 matmuls run
    ~50x slower than float32 ones; with gradient checkpointing no float32 copy outlives its block's backward.

    Example:
        >>> compute_in_float32(unet.to(torch.bfloat16))
        >>> unet(x.float(), t, encoder_hidden_states=c.float()).sample.dtype
        torch.float32
    """
    def cast(module, args):
        stash = {n: p for n, p in module._parameters.items() if p is not None and p.dtype != torch.float32}
        module._float32_stash = stash
        for n, p in stash.items():
            module._parameters[n] = p.detach().float()

    def restore(module, args, output):
        module._parameters.update(module.__dict__.pop("_float32_stash", {}))

    for module in model.modules():
        if any(p.dtype != torch.float32 for p in module.parameters(recurse=False)):
            module.register_forward_pre_hook(cast)
            module.register_forward_hook(restore, always_call=True)


class ESDTrainer:
    def __init__(self, pipe, config: ESDConfig, device: str = "cpu", progress: bool = True):
        from diffusers import DDIMScheduler

        self.family = check_supported(pipe)
        self.pipe, self.cfg, self.device, self.progress = pipe, config, torch.device(device), progress
        self.denoiser = family_of(pipe).denoiser(pipe).to(device)
        self.dtype = self.denoiser.dtype  # the base as loaded; the trained tensors are float32 whatever it is
        self.names = select_parameters(self.denoiser, config.method)
        if not self.names:
            raise InvalidArgumentError(f"method {config.method} selects no parameter of this denoiser")
        self.denoiser.requires_grad_(False)
        params = dict(self.denoiser.named_parameters())
        # The frozen base shares every untouched tensor with the trained UNet: memory grows by the touched ones.
        memo = {id(p): p for n, p in params.items() if n not in self.names}
        self.frozen = copy.deepcopy(self.denoiser, memo).eval()
        if self.dtype != torch.float32:  # float32 masters: Adam's small steps are lost in bfloat16 rounding
            for n in self.names:
                _set_parameter(self.denoiser, n, torch.nn.Parameter(params[n].detach().float()))
            params = dict(self.denoiser.named_parameters())
        self.trainable = {n: params[n] for n in self.names}
        for p in self.trainable.values():
            p.requires_grad_(True)
        # A half-precision base trains under autocast on GPUs; CPUs compute each layer in float32 from its
        # half-precision weights (their bfloat16 matmuls are slow), which keeps the memory saving.
        self.autocast = self.dtype != torch.float32 and self.device.type != "cpu"
        if self.dtype != torch.float32 and self.device.type == "cpu":
            for model in (self.denoiser, self.frozen):
                compute_in_float32(model)
        if config.gradient_checkpointing:
            self.denoiser.enable_gradient_checkpointing()
        self.denoiser.train()

        self.size = self._check_resolution(config.resolution)
        self.conditioner = family_of(pipe).conditioner_for(pipe, device)
        self.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
        self.scheduler.set_timesteps(config.ddim_steps)
        self.timesteps = self.scheduler.timesteps.to(device)
        self.prediction_type = self.scheduler.config.prediction_type
        self.optimizer = torch.optim.Adam(list(self.trainable.values()), lr=config.lr)
        self.generator = torch.Generator("cpu").manual_seed(config.seed)
        self.rng = np.random.default_rng(config.seed)
        self.iteration = 0
        self.pool: dict[str, dict] = {}
        self.losses: list[float] = []
        self.train_seconds = 0.0
        self.denoiser_passes = 0  # sample-forward passes (batch items), for the benchmark
        self._vocabulary: list[str] | None = None  # the tokenizer's whole words, for ``mutations``
        self.robust = robust_terms(self)  # erasure/robust.py: off unless the config asks

    def _check_resolution(self, resolution: int | None) -> int:
        family = family_of(self.pipe)
        size = resolution or family.native_size(self.pipe)
        multiple = family.size_multiple(self.pipe)
        if size % multiple:
            raise InvalidArgumentError(f"--resolution {size} must be a multiple of {multiple} for this base "
                                       "(the VAE and every UNet down-sampling)")
        return size

    # --- conditioning ---------------------------------------------------------------------------------------

    def encode(self, prompts: list[str]) -> Conditioning:
        """UNet conditioning of ``prompts`` at the training resolution; "" is the unconditional branch."""
        return self.conditioner.encode(prompts, self.size)

    def unconditional(self, n: int) -> Conditioning:
        return self.conditioner.unconditional(n, self.size)

    def predict(self, model, x: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """The UNet's raw prediction (float32); under autocast to the base's dtype for a half-precision base on a
        GPU."""
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.autocast):
            out = model(x, t, **cond.denoiser_kwargs()).sample
        return out.float()

    def loss_weights(self, t: torch.Tensor) -> torch.Tensor | None:
        """Per-sample weights making the loss on the raw predictions the eps-space loss: None for epsilon, the
        signal variance alphas_cumprod[t] for v-prediction (see the module docstring)."""
        if self.prediction_type == "epsilon":
            return None
        return self.scheduler.alphas_cumprod.to(self.device)[t.long()].float()

    def mse(self, pred: torch.Tensor, target: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        w = self.loss_weights(t)
        if w is None:
            return F.mse_loss(pred, target)
        return ((pred - target) ** 2 * w.view(-1, *[1] * (pred.dim() - 1))).mean()

    def concept_words(self, concept: str) -> list[str]:
        """The words naming ``concept``: its name, then its synonyms."""
        return [concept, *self.cfg.synonyms]

    def prompts(self, concept: str, n: int) -> list[tuple[str, str]]:
        """``n`` (c, c0) training prompt pairs for ``concept``: a drawn template with and without the concept."""
        out = []
        for _ in range(n):
            template = self.cfg.templates[int(self.rng.integers(len(self.cfg.templates)))]
            if template == "toy":
                out.append(concept_prompt(concept, self.rng))
            else:
                out.append((template.format(concept), " ".join(template.format("").split())))
        if self.cfg.anchor:
            out = [(c, c0) for (c, _), c0 in zip(out, self._swap(out, concept, self.cfg.anchor))]
        if self.cfg.synonyms:  # the concept named by a drawn word (c0 does not name it)
            words = self.concept_words(concept)
            out = [(re.sub(rf"\b{re.escape(concept)}\b", words[int(self.rng.integers(len(words)))], c), c0)
                   for c, c0 in out]
        if self.cfg.mutations:
            mutated = [self._mutated(c, concept, [other for other, _ in out]) for c, _ in out]
            out = [(c, self.neutral(c, concept)) for c in mutated]
        return out

    def neutral(self, prompt: str, concept: str) -> str:
        """``prompt`` with the concept's words left out, or replaced by a drawn anchor when the config has them."""
        words = self.concept_words(concept)
        if self.cfg.anchor:
            return " ".join(replace_words(prompt, words, self.cfg.anchor[int(self.rng.integers(
                len(self.cfg.anchor)))]).split())
        return without(prompt, words)

    def _mutated(self, prompt: str, concept: str, others: list[str]) -> str:
        """Up to ``mutations`` attacker-style word edits of ``prompt`` (erasure/prompts.py), still naming the
        concept."""
        words = self.concept_words(concept)
        if self._vocabulary is None:
            self._vocabulary = vocabulary_words(self.pipe.tokenizer)
        pools = {"names": words, "siblings": [*self.cfg.preserved_words(), *self.cfg.anchor],
                 "vocabulary": self._vocabulary}
        tokens = prompt.split()
        for _ in range(int(self.rng.integers(self.cfg.mutations + 1))):
            tokens = mutate(tokens, others[int(self.rng.integers(len(others)))].split(), pools, self.rng) or tokens
        out = " ".join(tokens)
        if not names_any(out, words):
            tokens.insert(int(self.rng.integers(len(tokens) + 1)), words[int(self.rng.integers(len(words)))])
            out = " ".join(tokens)
        return out

    def _swap(self, pairs: list[tuple[str, str]], concept: str, choices: list[str]) -> list[str]:
        """Each prompt c with the concept's words (name and synonyms) replaced by one of ``choices`` drawn at
        random."""
        words = self.concept_words(concept)
        return [" ".join(replace_words(c, words, choices[int(self.rng.integers(len(choices)))]).split())
                for c, _ in pairs]

    def preserve_prompts(self, pairs: list[tuple[str, str]], concept: str) -> list[str]:
        """Each prompt with ``concept`` replaced by a word naming a preserved concept (its name or one of its
        ``preserve_synonyms``), drawn at random."""
        return self._swap(pairs, concept, self.cfg.preserved_words())

    def _embed_pairs(self, pairs: list[tuple[str, str]]) -> tuple[Conditioning, Conditioning]:
        return self.encode([c for c, _ in pairs]), self.encode([c0 for _, c0 in pairs])

    def _latent_shape(self, n: int) -> tuple[int, ...]:
        return family_of(self.pipe).latent_shape(self.pipe, n, self.size, self.size)

    # --- x_t sampling ---------------------------------------------------------------------------------------

    @torch.no_grad()
    def sample(self, cond: Conditioning, stop: int, uncond: Conditioning | None = None,
               guidance: torch.Tensor | None = None, model=None):
        """DDIM from noise for ``stop`` steps, guided towards the prompts of ``cond`` (one row per trajectory) and
        away from ``uncond`` (default: the unconditional branch) with per-trajectory ``guidance`` (default: the
        config's). Returns the states x_0..x_stop and, per step, the sampler's unconditional and conditional
        predictions."""
        model = model or (self.frozen if self.cfg.sample_with == "frozen" else self.denoiser)
        n = len(cond)
        x = torch.randn(self._latent_shape(n), generator=self.generator).to(self.device)
        x = x * self.scheduler.init_noise_sigma
        both = Conditioning.cat([self.unconditional(n) if uncond is None else uncond, cond])
        g = self.cfg.guidance if guidance is None else guidance.view(-1, 1, 1, 1).to(x)
        states, eps_u, eps_c = [x], [], []
        for t in self.timesteps[:stop]:
            e = self.predict(model, torch.cat([x, x]), t, both)
            self.denoiser_passes += 2 * n
            eu, ec = e.chunk(2)
            eps_u.append(eu)
            eps_c.append(ec)
            x = self.scheduler.step(eu + g * (ec - eu), t, x).prev_sample
            states.append(x)
        return states, eps_u, eps_c

    @torch.no_grad()
    def _targets(self, x: torch.Tensor, t: torch.Tensor, cond: Conditioning, neutral: Conditioning) -> torch.Tensor:
        e0, ep = self.predict(self.frozen, torch.cat([x, x]), torch.cat([t, t]),
                              Conditioning.cat([neutral, cond])).chunk(2)
        self.denoiser_passes += 2 * x.shape[0]
        return e0 - self.cfg.eta * (ep - e0)

    def _refresh_pool(self) -> None:
        n, steps = self.cfg.pool_trajectories, self.cfg.ddim_steps
        for concept in self.cfg.concepts:
            pairs = self.prompts(concept, n)
            cond, neutral = self._embed_pairs(pairs)
            keep = self.encode(self.preserve_prompts(pairs, concept)) if self.cfg.preserve else cond[:0]
            # the preserved prompts get trajectories of their own (held on the concept's x_t only, the base
            # behaviour does not carry over to images of the preserved concept); one batch samples both
            states, eps_u, eps_c = self.sample(Conditioning.cat([cond, keep]), steps)
            kept_states, kept_eps = [s[n:] for s in states], [e[n:] for e in eps_c]
            states, eps_u, eps_c = [s[:n] for s in states], [e[:n] for e in eps_u], [e[:n] for e in eps_c]
            entry = {
                "x": torch.cat(states[:steps]),  # x_i for i < steps, the state *before* denoising step i
                "t": self.timesteps[:steps].repeat_interleave(n),
                "c": cond.repeat(steps),  # item i * n + j was sampled with prompt j
                "c0": neutral.repeat(steps),
                "prompts": [c for c, _ in pairs],  # item i * n + j: prompts[j]
            }
            if self.cfg.preserve:
                entry["cp"] = keep.repeat(steps)
                entry["xp"] = torch.cat(kept_states[:steps])
                if self.cfg.sample_with == "frozen":  # the frozen sampler's predictions are the preserve targets
                    entry["keep_target"] = torch.cat(kept_eps)
            if self.cfg.sample_with == "frozen" and all(c0 == "" for _, c0 in pairs):
                # the sampler was the frozen base and its unconditional branch is c0: its predictions are the targets
                e0, ep = torch.cat(eps_u), torch.cat(eps_c)
                entry["target"] = e0 - self.cfg.eta * (ep - e0)
            self.pool[concept] = entry

    # --- one optimizer step ------------------------------------------------------------------------------------

    def _batch(self, concept: str):
        if self.cfg.loop == "reference":
            stop = int(self.rng.integers(self.cfg.ddim_steps))  # uniform over the DDIM steps, as in the paper
            pairs = self.prompts(concept, 1)
            cond, neutral = self._embed_pairs(pairs)
            cp = self.encode(self.preserve_prompts(pairs, concept)) if self.cfg.preserve else None
            states, _, _ = self.sample(cond if cp is None else Conditioning.cat([cond, cp]), stop)
            x, t = states[stop][:1], self.timesteps[stop].reshape(1)
            keep = None if cp is None else (states[stop][1:], cp, None)
            return x, t, cond, self._targets(x, t, cond, neutral), keep, [pairs[0][0]]
        if self.iteration % self.cfg.refresh_every == 0 or concept not in self.pool:
            self._refresh_pool()
        pool = self.pool[concept]
        idx = torch.from_numpy(self.rng.integers(len(pool["t"]), size=self.cfg.batch_size))
        x, t, cond = pool["x"][idx], pool["t"][idx], pool["c"][idx]
        target = pool["target"][idx] if "target" in pool else self._targets(x, t, cond, pool["c0"][idx])
        keep = None
        if "cp" in pool:
            keep = (pool["xp"][idx], pool["cp"][idx], pool["keep_target"][idx] if "keep_target" in pool else None)
        prompts = [pool["prompts"][i % len(pool["prompts"])] for i in idx.tolist()]
        return x, t, cond, target, keep, prompts

    def step(self) -> float:
        concepts = self.cfg.concepts
        concept = concepts[self.iteration % len(concepts)]  # one concept per iteration, in turn
        x, t, cond, target, keep, prompts = self._batch(concept)
        n = x.shape[0]
        if self.cfg.erase_from:
            cond = self.encode([self.cfg.erase_from]).repeat(n)
        inputs, conds, kept = [x], [cond], []  # one batched pass of the trained UNet over every term
        if keep is not None:
            x_keep, c_keep, keep_target = keep
            if keep_target is None:
                with torch.no_grad():
                    keep_target = self.predict(self.frozen, x_keep, t, c_keep)
                self.denoiser_passes += n
            inputs.append(x_keep)
            conds.append(c_keep)
            kept.append(keep_target)
        if self.cfg.preserve_unconditional:
            # the unconditional prediction steers every image through classifier-free guidance: left free, it
            # drifts with the erasure, which both weakens the erasure and moves other concepts
            states = torch.cat(inputs)
            empty = self.unconditional(states.shape[0])
            with torch.no_grad():
                kept.append(self.predict(self.frozen, states, t.repeat(len(inputs)), empty))
            self.denoiser_passes += states.shape[0]
            inputs.append(states)
            conds.append(empty)
        batch = torch.cat(inputs)
        times = t.repeat(batch.shape[0] // n)
        pred = self.predict(self.denoiser, batch, times, Conditioning.cat(conds))
        self.denoiser_passes += batch.shape[0]
        loss = self.mse(pred[:n], target, t)
        if kept:
            loss = loss + self.cfg.preserve_weight * self.mse(pred[n:], torch.cat(kept), times[n:])
        if "guided" in self.robust:
            loss = loss + self.robust["guided"].loss(concept)
        if "adversarial" in self.robust:
            loss = loss + self.robust["adversarial"].loss(concept, x, t, prompts, target)
        if "unnamed" in self.robust:
            loss = loss + self.robust["unnamed"].loss(concept)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.iteration += 1
        return loss.item()

    def train(self, checkpoint: Path | None = None, until: int | None = None, callback=None) -> None:
        from tqdm.auto import tqdm

        until = until or self.cfg.iterations
        bar = tqdm(total=until, initial=self.iteration, desc=f"ESD {self.cfg.method}", disable=not self.progress)
        while self.iteration < until:
            start = time.perf_counter()
            self.losses.append(self.step())
            self.train_seconds += time.perf_counter() - start
            bar.update(1)
            bar.set_postfix(loss=f"{np.mean(self.losses[-20:]):.5f}")
            if checkpoint and (self.iteration % self.cfg.checkpoint_every == 0 or self.iteration == until):
                self.save_checkpoint(checkpoint)
            if callback:
                callback(self)
        bar.close()

    # --- results and checkpoints -----------------------------------------------------------------------------

    @torch.no_grad()
    def delta(self) -> dict[str, torch.Tensor]:
        """theta - theta* of every trained tensor, float32 on the CPU."""
        base = dict(self.frozen.named_parameters())
        return {n: (p.detach().float() - base[n].float()).cpu() for n, p in self.trainable.items()}

    def base_fingerprint(self) -> str:
        """The pack's base fingerprint: the frozen copy holds the base values of exactly the trained tensors."""
        return fingerprint(dict(self.frozen.named_parameters()), self.names)

    def state(self) -> dict:
        return {
            "config": self.cfg.model_dump(),
            "iteration": self.iteration,
            "trainable": {n: p.detach().cpu().clone() for n, p in self.trainable.items()},
            "optimizer": self.optimizer.state_dict(),
            "generator": self.generator.get_state(),
            "rng": self.rng.bit_generator.state,
            "pool": self.pool,
            "losses": self.losses,
            "train_seconds": self.train_seconds,
            "robust": {name: term.state() for name, term in self.robust.items()},
        }

    def save_checkpoint(self, path: Path) -> None:
        with atomic_path(path) as tmp:
            torch.save(self.state(), tmp)

    def load_checkpoint(self, path: Path) -> None:
        state = torch.load(path, weights_only=False)
        if ESDConfig.model_validate(state["config"]) != self.cfg:  # a field added since reads as its default
            raise InvalidArgumentError(f"{path} was written with other training options; resume with the same ones")
        with torch.no_grad():
            for n, p in self.trainable.items():
                p.copy_(state["trainable"][n])
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"])
        self.rng.bit_generator.state = state["rng"]
        self.iteration, self.pool = state["iteration"], state["pool"]
        self.losses, self.train_seconds = state["losses"], state["train_seconds"]
        for name, term in self.robust.items():
            term.load(state["robust"][name])
