"""The ``soft-prompt`` family: white-box, UnlearnDiffAtk-style.

A few continuous token embeddings put before the prompt are optimised (Adam, through the text encoder and the erased
denoiser) to denoise the base's images of the concept, each kept within the largest norm of a real token's embedding
(erasure/base/softprompt.py). They range over a continuous relaxation of the vocabulary, so they bound what a prompt
of that length can do. It needs the weights: a /generate request cannot mount it.

torch and the base's modules are imported where they are used: the family registry stays torch-free, so
``erasure attack --help`` lists every family's options at once.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from ...errors import InvalidArgumentError
from .registry import AttackFamily, register_family


class SoftPromptOptions(BaseModel):
    """Options of the soft-prompt family (``AttackConfig.family_options["soft-prompt"]``)."""

    model_config = ConfigDict(extra="forbid")
    soft_tokens: int = Field(4, gt=0, description="learnable token embeddings put before the prompt")
    soft_steps: int = Field(300, gt=0, description="Adam steps")
    soft_lr: float = Field(1e-2, gt=0, description="Adam learning rate")
    soft_targets: int = Field(16, gt=1, description="base images of the concept it learns to denoise")


@dataclasses.dataclass
class SoftPrompt:
    """``vectors`` [k, D] put after the start token of each of ``prompts`` (one is cycled per image)."""

    vectors: Any  # torch.Tensor [k, D]
    prompts: list[str]
    request: object  # the Request it is sampled with (its prompt is unused)
    loss: float = float("nan")

    def describe(self) -> dict:
        return {"tokens": int(self.vectors.shape[0]), "prompts": self.prompts[:4],
                "vector_norms": [round(float(v), 3) for v in self.vectors.norm(dim=1)],
                "final_loss": round(self.loss, 5), **{k: v for k, v in self.request.describe().items()
                                                       if k != "prompt"}}

    def render(self, team, pipe, seeds: Sequence[int]) -> list:
        """One image per seed on ``pipe``, ``team.cfg.batch_size`` per pipeline call."""
        import torch

        from ...base.softprompt import SoftPromptEncoder

        enc = SoftPromptEncoder(pipe, self.vectors.shape[0])
        r = self.request
        images = []
        with torch.no_grad():
            for start in range(0, len(seeds), team.cfg.batch_size):
                chunk = list(seeds[start : start + team.cfg.batch_size])
                prompts = [self.prompts[(start + j) % len(self.prompts)] for j in range(len(chunk))]
                cond, uncond = enc.encode(self.vectors, prompts), team.conditioner.unconditional(len(chunk), r.size)
                out = pipe(prompt_embeds=cond.encoder_hidden_states,
                           negative_prompt_embeds=uncond.encoder_hidden_states.to(cond.encoder_hidden_states),
                           num_inference_steps=r.steps, guidance_scale=r.guidance, height=r.size, width=r.size,
                           generator=[torch.Generator("cpu").manual_seed(int(s)) for s in chunk], output_type="pil")
                images += out.images
        return images


def targets(team, concept: str) -> tuple:
    """Base latents of images that show ``concept`` and their prompts (the soft prompt's training data)."""
    import torch

    cfg, opts, pipe = team.cfg, team.cfg.options("soft-prompt"), team.base
    rng = np.random.default_rng([cfg.seed, 3])
    prompts = team.judge.prompts(concept, opts.soft_targets * 2, rng, "train")
    seeds = team.seeds_for("search", len(prompts), salt=7)
    r = team.default
    with torch.no_grad():
        latents = pipe(prompt=prompts, num_inference_steps=r.steps, guidance_scale=r.guidance, height=r.size,
                       width=r.size, generator=[torch.Generator("cpu").manual_seed(s) for s in seeds],
                       output_type="latent").images
        decoded = pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample
        images = pipe.image_processor.postprocess(decoded, output_type="pil")
    keep = np.flatnonzero(team.judge.shows(images, concept))[: opts.soft_targets]
    if len(keep) < 2:
        raise InvalidArgumentError(f"the base shows {concept!r} on {len(keep)} of {len(prompts)} images: "
                                   "nothing for a soft prompt to learn from")
    return latents[torch.from_numpy(keep)], [prompts[i] for i in keep]


def optimize(team, pipe, concept: str, prepared=None) -> SoftPrompt:
    """The soft prompt that best denoises the base's images of ``concept`` through ``pipe``'s denoiser."""
    import torch
    import torch.nn.functional as F
    from diffusers import DDPMScheduler
    from tqdm.auto import tqdm

    from ...base.families import family_of
    from ...base.softprompt import SoftPromptEncoder

    cfg, opts = team.cfg, team.cfg.options("soft-prompt")
    x0, prompts = prepared if prepared is not None else targets(team, concept)
    denoiser = family_of(pipe).denoiser(pipe)
    enc = SoftPromptEncoder(pipe, opts.soft_tokens)
    vectors = enc.word_vectors(team.judge.names(concept)).requires_grad_(True)
    noise_sched = DDPMScheduler.from_config(pipe.scheduler.config)
    prediction = pipe.scheduler.config.get("prediction_type", "epsilon")
    opt = torch.optim.Adam([vectors], lr=opts.soft_lr)
    g = torch.Generator("cpu").manual_seed(cfg.seed)
    batch = min(8, len(prompts))
    losses = []
    bar = tqdm(range(opts.soft_steps), desc=f"{concept}: soft-prompt", disable=not team.progress, leave=False)
    was_training = denoiser.training
    denoiser.eval()
    params = [p for m in (denoiser, pipe.text_encoder) for p in m.parameters()]
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
            loss = F.mse_loss(denoiser(x_t, t, **cond.denoiser_kwargs()).sample, target)
            opt.zero_grad()
            loss.backward()
            opt.step()
            enc.project(vectors.data)
            losses.append(loss.item())
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}")
    finally:
        for p, f in zip(params, flags):
            p.requires_grad_(f)
        denoiser.train(was_training)
    return SoftPrompt(vectors.detach(), prompts, team.default, float(np.mean(losses[-20:])))


SOFT_PROMPT = register_family(AttackFamily(
    "soft-prompt", "white-box token embeddings", reachable=False,
    best_attack=lambda team, pipe, concept, prepared: (optimize(team, pipe, concept, prepared), 1),
    prepare=targets, options=SoftPromptOptions))
