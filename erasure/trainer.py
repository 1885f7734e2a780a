"""ESD (Erased Stable Diffusion, Gandikota et al., ICCV 2023) on a diffusers SD-family pipeline.

The objective, exactly as in the paper (c0 is the empty prompt):

    target = eps*(x_t, t, c0) - eta * (eps*(x_t, t, c) - eps*(x_t, t, c0))
    loss   = || eps_theta(x_t, t, c_from) - target ||^2          (c_from = c unless --erase-from)

eps* is the frozen base, eps_theta the UNet being trained (only the tensors the method selects). x_t comes from
DDIM sampling conditioned on c with guidance, stopped at a uniformly drawn step, using the trained UNet (paper) or
the frozen one (official script). Two loops produce x_t:

* ``reference``: the official per-iteration algorithm: a fresh x_t every iteration (up to ``ddim_steps`` guided
  UNet passes), then 3 UNet passes and 1 backward. Sampling dominates the cost.
* ``pooled`` (default): every ``refresh_every`` iterations it samples ``pool_trajectories`` whole trajectories per
  concept in one batch and keeps every intermediate x_t; each iteration then draws ``batch_size`` (x_t, t) pairs
  from the pool, which is the same uniform-step distribution. With frozen sampling the guided passes already
  computed eps*(x_t, c) and eps*(x_t, c0), so the targets are cached for free. bench/esd_loops.py measures both.

Example:
    >>> from erasure.trainer import ESDTrainer
    >>> trainer = ESDTrainer(pipe, ESDConfig(concepts=["circle"], iterations=200, lr=1e-4))
    >>> trainer.train()
    >>> delta = trainer.delta()   # {diffusers name: theta - theta*}
"""

from __future__ import annotations

import copy
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .config import ESDConfig
from .errors import InvalidArgumentError
from .methods import select_parameters


def check_supported(pipe) -> None:
    from diffusers import UNet2DConditionModel

    if not isinstance(getattr(pipe, "unet", None), UNet2DConditionModel):
        raise InvalidArgumentError("ESD needs a pipeline with a UNet2DConditionModel (SD 1.x / 2.x family)")
    if getattr(pipe, "text_encoder_2", None) is not None or pipe.unet.config.addition_embed_type is not None:
        raise InvalidArgumentError(
            "SDXL-style pipelines (second text encoder, added time/text conditioning) are not supported yet")


class ESDTrainer:
    def __init__(self, pipe, config: ESDConfig, device: str = "cpu", progress: bool = True):
        from diffusers import DDIMScheduler

        check_supported(pipe)
        self.pipe, self.cfg, self.device, self.progress = pipe, config, device, progress
        self.unet = pipe.unet.to(device, torch.float32)
        self.names = select_parameters(self.unet, config.method)
        if not self.names:
            raise InvalidArgumentError(f"method {config.method} selects no parameter of this UNet")
        self.unet.requires_grad_(False)
        params = dict(self.unet.named_parameters())
        self.trainable = {n: params[n] for n in self.names}
        # The frozen base shares every untouched tensor with the trained UNet: memory grows by the touched ones.
        memo = {id(p): p for n, p in params.items() if n not in self.trainable}
        self.frozen = copy.deepcopy(self.unet, memo).eval()
        self.base_values = {n: p.detach().clone() for n, p in self.trainable.items()}
        for p in self.trainable.values():
            p.requires_grad_(True)
        self.unet.train()

        self.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
        self.scheduler.set_timesteps(config.ddim_steps)
        self.timesteps = self.scheduler.timesteps.to(device)
        self.emb = {text: self._encode(text) for text in {"", *config.concepts, config.erase_from or ""}}
        self.optimizer = torch.optim.Adam(list(self.trainable.values()), lr=config.lr)
        self.generator = torch.Generator("cpu").manual_seed(config.seed)
        self.rng = np.random.default_rng(config.seed)
        self.iteration = 0
        self.pool: dict[str, dict[str, torch.Tensor]] = {}
        self.losses: list[float] = []
        self.train_seconds = 0.0
        self.unet_passes = 0  # sample-forward passes (batch items), for the benchmark

    @torch.no_grad()
    def _encode(self, text: str) -> torch.Tensor:
        emb, _ = self.pipe.encode_prompt(text, self.device, 1, do_classifier_free_guidance=False)
        return emb.to(torch.float32)

    def _latent_shape(self, n: int) -> tuple[int, ...]:
        c, s = self.unet.config.in_channels, self.unet.config.sample_size
        return (n, c, s, s)

    # --- x_t sampling ---------------------------------------------------------------------------------------

    @torch.no_grad()
    def sample(self, concept: str, n: int, stop: int):
        """DDIM from noise for ``stop`` steps, guided towards ``concept``. Returns the states x_0..x_stop and, per
        step, the sampler's unconditional and conditional predictions."""
        model = self.frozen if self.cfg.sample_with == "frozen" else self.unet
        x = torch.randn(self._latent_shape(n), generator=self.generator).to(self.device)
        x = x * self.scheduler.init_noise_sigma
        emb = torch.cat([self.emb[""].expand(n, -1, -1), self.emb[concept].expand(n, -1, -1)])
        states, eps_u, eps_c = [x], [], []
        for t in self.timesteps[:stop]:
            e = model(torch.cat([x, x]), t, emb).sample
            self.unet_passes += 2 * n
            eu, ec = e.chunk(2)
            eps_u.append(eu)
            eps_c.append(ec)
            x = self.scheduler.step(eu + self.cfg.guidance * (ec - eu), t, x).prev_sample
            states.append(x)
        return states, eps_u, eps_c

    @torch.no_grad()
    def _targets(self, x: torch.Tensor, t: torch.Tensor, concept: str) -> torch.Tensor:
        n = x.shape[0]
        emb = torch.cat([self.emb[""].expand(n, -1, -1), self.emb[concept].expand(n, -1, -1)])
        e0, ep = self.frozen(torch.cat([x, x]), torch.cat([t, t]), emb).sample.chunk(2)
        self.unet_passes += 2 * n
        return e0 - self.cfg.eta * (ep - e0)

    def _refresh_pool(self) -> None:
        n, steps = self.cfg.pool_trajectories, self.cfg.ddim_steps
        for concept in self.cfg.concepts:
            states, eps_u, eps_c = self.sample(concept, n, steps)
            entry = {
                "x": torch.cat(states[:steps]),  # x_i for i < steps, the state *before* denoising step i
                "t": self.timesteps[:steps].repeat_interleave(n),
            }
            if self.cfg.sample_with == "frozen":  # the sampler was the frozen base: its predictions are the targets
                e0, ep = torch.cat(eps_u), torch.cat(eps_c)
                entry["target"] = e0 - self.cfg.eta * (ep - e0)
            self.pool[concept] = entry

    # --- one optimizer step ------------------------------------------------------------------------------------

    def _batch(self, concept: str):
        if self.cfg.loop == "reference":
            stop = int(self.rng.integers(self.cfg.ddim_steps))  # uniform over the DDIM steps, as in the paper
            states, _, _ = self.sample(concept, 1, stop)
            x, t = states[stop], self.timesteps[stop].reshape(1)
            return x, t, self._targets(x, t, concept)
        if self.iteration % self.cfg.refresh_every == 0 or concept not in self.pool:
            self._refresh_pool()
        pool = self.pool[concept]
        idx = torch.from_numpy(self.rng.integers(len(pool["t"]), size=self.cfg.batch_size))
        x, t = pool["x"][idx], pool["t"][idx]
        target = pool["target"][idx] if "target" in pool else self._targets(x, t, concept)
        return x, t, target

    def step(self) -> float:
        concepts = self.cfg.concepts
        concept = concepts[self.iteration % len(concepts)]  # one concept per iteration, in turn
        x, t, target = self._batch(concept)
        source = self.cfg.erase_from or concept
        pred = self.unet(x, t, self.emb[source].expand(x.shape[0], -1, -1)).sample
        self.unet_passes += x.shape[0]
        loss = F.mse_loss(pred, target)
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
        return {n: (p.detach() - self.base_values[n]).float().cpu() for n, p in self.trainable.items()}

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
        }

    def save_checkpoint(self, path: Path) -> None:
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        torch.save(self.state(), tmp)
        tmp.replace(path)

    def load_checkpoint(self, path: Path) -> None:
        state = torch.load(path, weights_only=False)
        if state["config"] != self.cfg.model_dump():
            raise InvalidArgumentError(f"{path} was written with other training options; resume with the same ones")
        with torch.no_grad():
            for n, p in self.trainable.items():
                p.copy_(state["trainable"][n])
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"])
        self.rng.bit_generator.state = state["rng"]
        self.iteration, self.pool = state["iteration"], state["pool"]
        self.losses, self.train_seconds = state["losses"], state["train_seconds"]
