"""Robust erasure: terms ESDTrainer adds so an erasure holds off its training prompts (all off by default).

ESD trains one prediction, eps(x_t, c) for prompts c naming the concept. A sampler combines two: classifier-free
guidance draws with ``eps(x, n) + g (eps(x, p) - eps(x, n))``, where n is the request's negative prompt. An attacker
controls p, n and g, and a white-box attacker the text embeddings themselves. Two terms cover that:

* ``GuidedTerm`` (``guided_weight``): on states x_t sampled under requests an attacker might send (p the training
  prompt with or without the concept; n empty, the concept prompt, the preserved concepts, or a sibling prompt;
  g drawn from ``guided_scales``), the guided prediction of the UNet being trained is held to the base's guided
  prediction of the same request with the concept's words left out of p and n (p-, n-: ESD's c0 rule, anchors
  included) and the concept guided away:

      target = eps*(x, n-) + g (eps*(x, p-) - eps*(x, n-)) - g eta (eps*(x, c) - eps*(x, c0))

  (g <= 1 is the conditional prediction alone, as diffusers samples it). With p = c and n = "" this is ESD's
  objective seen through the guidance; the other requests are where a pack trained on eps(x, c) alone gives way
  (negating the erased prompt, or the siblings, steers back to the concept).
* ``AdversarialSoftPrompt`` (``adversarial_every``; AdvUnlearn-style): every N iterations a few continuous token
  embeddings put before the training prompt take Adam steps (warm-started) so that the UNet being trained denoises
  the base's images of the concept (UnlearnDiffAtk's objective); each iteration then trains the prediction under
  those embeddings towards the same ESD target as the plain prompt.
* ``UnnamedTerm`` (``unnamed_weight``): ESD trains prompts that name the concept, but a base also draws it for
  prompts that do not (its prior: "please" draws stripes). A prompt u that leaves the concept out (the training
  prompt without its words) or names nothing (up to 8 vocabulary words), on states sampled under u (the images the
  prior draws for it), is trained towards the base's prediction with the concept guided away:

      target = eps*(x, u) - eta (eps*(x, u+) - eps*(x, u))        (u+: u naming the concept)

Example:
    >>> cfg = ESDConfig(concepts=["red"], preserve=["green", "blue"], guided_weight=1.0, unnamed_weight=1.0)
    >>> ESDTrainer(pipe, cfg).train()        # the terms are added to the ESD loss
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..base.conditioning import Conditioning
from ..base.families import FAMILIES
from ..base.softprompt import SoftPromptEncoder
from ..errors import InvalidArgumentError
from ..prompts import replace_words, vocabulary_words, without

SUPPORTED = ("sd", "epsilon")  # the family and prediction type the terms are tested on (the toy base)
UNNAMED_WORDS = 8  # the longest word list naming nothing the unnamed term trains (attackers send longer lists)


class PooledTerm:
    """A term trained on trajectories of its own, resampled (``refresh``) every ``refresh_every`` iterations."""

    def __init__(self, trainer):
        self.trainer = trainer
        self.pool: dict[str, dict] = {}

    def refresh(self, concept: str) -> None:
        raise NotImplementedError

    def draw(self, concept: str) -> dict:
        """``batch_size`` random items of the concept's pool, refreshed first when due."""
        tr, cfg = self.trainer, self.trainer.cfg
        if concept not in self.pool or tr.iteration % cfg.refresh_every == 0:
            self.refresh(concept)
        pool = self.pool[concept]
        idx = torch.from_numpy(tr.rng.integers(len(pool["t"]), size=cfg.batch_size))
        return {key: value[idx] for key, value in pool.items()}

    def state(self) -> dict:
        return {"pool": self.pool}

    def load(self, state: dict) -> None:
        self.pool = state["pool"]


class GuidedTerm(PooledTerm):
    """The guided prediction under attacker-like requests, held to the base's with the concept guided away."""

    def framings(self, concept: str, pairs: list[tuple[str, str]]) -> list[tuple[str, str, float]]:
        """(p, n, g) per training pair: the request the trajectory is sampled under and trained on."""
        tr, cfg = self.trainer, self.trainer.cfg
        rng, words = tr.rng, tr.concept_words(concept)
        out = []
        for c, _ in pairs:
            free = without(c, words)
            p = c if rng.random() < 0.5 else free
            choices = ["", c, " ".join(words)]
            if cfg.preserve:
                keep = list(rng.permutation(cfg.preserve))[: int(rng.integers(1, len(cfg.preserve) + 1))]
                sibling = cfg.preserve[int(rng.integers(len(cfg.preserve)))]
                choices += [" ".join(keep), " ".join(replace_words(c, words, sibling).split())]
            n = choices[int(rng.integers(len(choices)))]
            out.append((p, n, float(cfg.guided_scales[int(rng.integers(len(cfg.guided_scales)))])))
        return out

    def refresh(self, concept: str) -> None:
        tr, cfg = self.trainer, self.trainer.cfg
        k, steps = cfg.pool_trajectories, cfg.ddim_steps
        pairs = tr.prompts(concept, k)
        framings = self.framings(concept, pairs)
        p, n = tr.encode([f[0] for f in framings]), tr.encode([f[1] for f in framings])
        g = torch.tensor([max(1.0, f[2]) for f in framings])
        states, _, _ = tr.sample(p, steps, uncond=n, guidance=g)
        c, c0 = tr._embed_pairs(pairs)
        # the target guides with the concept left out of both prompts (or anchored): negating the concept must not
        # steer towards it; the concept prompt's own erasure is the -g eta (eps*(c) - eps*(c0)) part
        p_free = tr.encode([tr.neutral(f[0], concept) for f in framings])
        n_free = tr.encode([tr.neutral(f[1], concept) for f in framings])
        self.pool[concept] = {"x": torch.cat(states[:steps]), "t": tr.timesteps[:steps].repeat_interleave(k),
                              "p": p.repeat(steps), "n": n.repeat(steps), "g": g.repeat(steps),
                              "p_free": p_free.repeat(steps), "n_free": n_free.repeat(steps),
                              "c": c.repeat(steps), "c0": c0.repeat(steps)}

    def loss(self, concept: str) -> torch.Tensor:
        tr, cfg = self.trainer, self.trainer.cfg
        batch = self.draw(concept)
        x, t, p, n, g = (batch[key] for key in ("x", "t", "p", "n", "g"))
        b, gv = x.shape[0], g.view(-1, 1, 1, 1)
        with torch.no_grad():
            e_n, e_p, e_c, e_c0 = tr.predict(tr.frozen, x.repeat(4, 1, 1, 1), t.repeat(4), Conditioning.cat(
                [batch["n_free"], batch["p_free"], batch["c"], batch["c0"]])).chunk(4)
            target = e_n + gv * (e_p - e_n) - gv * cfg.eta * (e_c - e_c0)
        pred_n, pred_p = tr.predict(tr.denoiser, x.repeat(2, 1, 1, 1), t.repeat(2), Conditioning.cat([n, p])).chunk(2)
        tr.denoiser_passes += 6 * b
        guided = pred_n + gv * (pred_p - pred_n)
        return cfg.guided_weight * (((guided - target) / gv) ** 2).mean()


class AdversarialSoftPrompt:
    """A soft prompt kept adversarial against the UNet being trained, and the ESD target trained under it."""

    def __init__(self, trainer):
        self.trainer = trainer
        cfg = trainer.cfg
        self.encoder = SoftPromptEncoder(trainer.pipe, cfg.adversarial_tokens)
        self.vectors: dict[str, torch.Tensor] = {}
        self.moments: dict[str, dict] = {}
        self.targets: dict[str, tuple[torch.Tensor, list[str]]] = {}
        self.generator = torch.Generator("cpu").manual_seed(cfg.seed + 1)

    def _targets(self, concept: str) -> tuple[torch.Tensor, list[str]]:
        """Final states x_0 of the frozen base sampling training prompts of the concept (its images, as latents)."""
        if concept not in self.targets:
            tr = self.trainer
            prompts = [c for c, _ in tr.prompts(concept, 2 * tr.cfg.pool_trajectories)]
            states, _, _ = tr.sample(tr.encode(prompts), tr.cfg.ddim_steps, model=tr.frozen)
            self.targets[concept] = (states[-1], prompts)
        return self.targets[concept]

    def refresh(self, concept: str) -> None:
        """``adversarial_steps`` Adam steps on the soft prompt against the current UNet (warm-started)."""
        from diffusers import DDPMScheduler

        tr, cfg = self.trainer, self.trainer.cfg
        x0, prompts = self._targets(concept)
        if concept not in self.vectors:
            self.vectors[concept] = self.encoder.word_vectors(tr.concept_words(concept)).float()
            self.moments[concept] = {"m": torch.zeros_like(self.vectors[concept]),
                                     "v": torch.zeros_like(self.vectors[concept]), "step": 0}
        noise_sched = DDPMScheduler.from_config(tr.pipe.scheduler.config)
        v, mom = self.vectors[concept].clone().requires_grad_(True), self.moments[concept]
        b1, b2 = 0.9, 0.999
        for _ in range(cfg.adversarial_steps):
            idx = torch.randint(len(prompts), (min(8, len(prompts)),), generator=self.generator)
            t = torch.randint(0, noise_sched.config.num_train_timesteps, (len(idx),), generator=self.generator)
            noise = torch.randn(x0[idx].shape, generator=self.generator)
            x_t = noise_sched.add_noise(x0[idx], noise, t)
            cond = self.encoder.encode(v, [prompts[i] for i in idx.tolist()])
            loss = F.mse_loss(tr.predict(tr.denoiser, x_t, t, cond), noise)
            tr.denoiser_passes += 2 * len(idx)
            (grad,) = torch.autograd.grad(loss, [v])  # the soft prompt only: the UNet's gradients stay untouched
            with torch.no_grad():  # Adam, by hand so its state checkpoints with the trainer
                mom["step"] += 1
                mom["m"].mul_(b1).add_(grad, alpha=1 - b1)
                mom["v"].mul_(b2).addcmul_(grad, grad, value=1 - b2)
                m_hat, v_hat = mom["m"] / (1 - b1 ** mom["step"]), mom["v"] / (1 - b2 ** mom["step"])
                v -= cfg.adversarial_lr * m_hat / (v_hat.sqrt() + 1e-8)
                self.encoder.project(v)
        self.vectors[concept] = v.detach()

    def loss(self, concept: str, x: torch.Tensor, t: torch.Tensor, prompts: list[str],
             target: torch.Tensor) -> torch.Tensor:
        tr, cfg = self.trainer, self.trainer.cfg
        if concept not in self.vectors or tr.iteration % cfg.adversarial_every == 0:
            self.refresh(concept)
        with torch.no_grad():
            cond = self.encoder.encode(self.vectors[concept], prompts)
        tr.denoiser_passes += x.shape[0]
        return cfg.adversarial_weight * F.mse_loss(tr.predict(tr.denoiser, x, t, cond), target)

    def state(self) -> dict:
        return {"vectors": self.vectors, "moments": self.moments, "targets": self.targets,
                "generator": self.generator.get_state()}

    def load(self, state: dict) -> None:
        self.vectors, self.moments, self.targets = state["vectors"], state["moments"], state["targets"]
        self.generator.set_state(state["generator"])


class UnnamedTerm(PooledTerm):
    """The erasure on prompts that leave the concept out or name nothing, where the base's prior can draw it."""

    def __init__(self, trainer):
        super().__init__(trainer)
        self.vocabulary: list[str] | None = None

    def prompts(self, concept: str, prompts: list[str]) -> list[tuple[str, str]]:
        """(u, u+) per training prompt: the prompt without the concept's words, or (half the time, and when nothing
        is left) 1 to UNNAMED_WORDS vocabulary words; u+ is u naming the concept."""
        tr = self.trainer
        rng, words = tr.rng, tr.concept_words(concept)
        if self.vocabulary is None:
            self.vocabulary = [w for w in vocabulary_words(tr.pipe.tokenizer) if w not in words]
        out = []
        for c in prompts:
            u = without(c, words)
            if u and rng.random() < 0.5:
                out.append((u, c))
                continue
            size = int(rng.integers(1, UNNAMED_WORDS + 1))
            u = [self.vocabulary[int(i)] for i in rng.integers(len(self.vocabulary), size=size)]
            named = list(u)
            named.insert(int(rng.integers(len(u) + 1)), words[int(rng.integers(len(words)))])
            out.append((" ".join(u), " ".join(named)))
        return out

    def refresh(self, concept: str) -> None:
        """Trajectories sampled under the prompts u themselves: the images the prior draws for them."""
        tr, cfg = self.trainer, self.trainer.cfg
        k, steps = cfg.pool_trajectories, cfg.ddim_steps
        pairs = self.prompts(concept, [c for c, _ in tr.prompts(concept, k)])
        u, named = tr.encode([p for p, _ in pairs]), tr.encode([q for _, q in pairs])
        states, _, _ = tr.sample(u, steps)
        self.pool[concept] = {"x": torch.cat(states[:steps]), "t": tr.timesteps[:steps].repeat_interleave(k),
                              "u": u.repeat(steps), "named": named.repeat(steps)}

    def loss(self, concept: str) -> torch.Tensor:
        tr, cfg = self.trainer, self.trainer.cfg
        batch = self.draw(concept)
        x, t, u = batch["x"], batch["t"], batch["u"]
        with torch.no_grad():
            e_u, e_named = tr.predict(tr.frozen, x.repeat(2, 1, 1, 1), t.repeat(2),
                                      Conditioning.cat([u, batch["named"]])).chunk(2)
            target = e_u - cfg.eta * (e_named - e_u)
        tr.denoiser_passes += 3 * x.shape[0]
        return cfg.unnamed_weight * tr.mse(tr.predict(tr.denoiser, x, t, u), target, t)


def robust_terms(trainer) -> dict:
    """The robust terms ``trainer.cfg`` switches on, by name; InvalidArgumentError on a base they are not tested on
    (SD 1.x-family epsilon-prediction bases only: the adversarial term's target is the noise, and neither term
    conditions SDXL's added embeddings)."""
    terms = {}
    cfg = trainer.cfg
    on = cfg.guided_weight > 0 or cfg.adversarial_every > 0 or cfg.unnamed_weight > 0
    if on and (trainer.family, trainer.prediction_type) != SUPPORTED:
        raise InvalidArgumentError(
            f"--guided-weight / --adversarial-every / --unnamed-weight support {FAMILIES['sd'].label} bases that "
            f"predict epsilon; this base is {FAMILIES[trainer.family].label} predicting {trainer.prediction_type}: "
            "train it without them")
    if trainer.cfg.guided_weight > 0:
        terms["guided"] = GuidedTerm(trainer)
    if trainer.cfg.adversarial_every > 0:
        terms["adversarial"] = AdversarialSoftPrompt(trainer)
    if trainer.cfg.unnamed_weight > 0:
        terms["unnamed"] = UnnamedTerm(trainer)
    return terms

