"""`erasure toy build`: train the embedded default from nothing but the toy world, on a CPU.

Stages run in order and each leaves its result in the work directory, so an interrupted build resumes where it
stopped (long stages also checkpoint every few hundred steps):

1. oracle   - the CNN that labels toy images (shipped beside the base model)
2. vae      - an AutoencoderKL, 64x64 RGB <-> 16x16x4 latents
3. latents  - a fixed set of rendered images, encoded once (the UNet never runs the encoder)
4. unet     - UNet2DConditionModel + CLIPTextModel trained jointly, condition dropout for classifier-free guidance
5. assemble - a StableDiffusionPipeline directory (EMA weights) written to ``out``

Everything is seeded; on the same machine and thread count the result is reproducible.

``BuildConfig.without`` builds the **retrained reference** instead: the UNet and text encoder trained on every scene
but those showing the given concepts, on the shipped oracle, VAE and tokenizer, so it differs from the shipped base by
its data only. It is what exact unlearning would give, the yardstick for a pack erasing the same concepts.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..errors import InvalidArgumentError
from ..files import atomic_path
from . import SAMPLING, models
from .oracle import ASSETS, Oracle, train_oracle
from .tokenizer import build_tokenizer_files, load_tokenizer
from .world import Scene, all_scenes, concept_attribute, prompt_for, render

BUILD_DIR = Path("build/toy")


@dataclasses.dataclass
class BuildConfig:
    seed: int = 0
    oracle_steps: int = 1200
    vae_steps: int = 900
    vae_batch: int = 16
    vae_lr: float = 1e-3
    dataset_size: int = 32_000
    unet_steps: int = 5500
    unet_batch: int = 64
    unet_lr: float = 4e-4
    cond_dropout: float = 0.1
    ema_decay: float = 0.999
    checkpoint_every: int = 250
    without: tuple[str, ...] = ()   # concepts left out of the data (the retrained reference); see the module doc

    def __post_init__(self):
        self.without = tuple(self.without)
        for concept in self.without:
            concept_attribute(concept)  # a ValueError naming the toy concepts if it is not one


def training_scenes(cfg: BuildConfig) -> list[Scene]:
    """Every toy scene the build trains on: all of them but those showing a concept of ``cfg.without``."""
    return [s for s in all_scenes() if not any(getattr(s, concept_attribute(c)) == c for c in cfg.without)]


def _save_ckpt(path: Path, state: dict) -> None:
    with atomic_path(path) as tmp:  # an interrupt never leaves a half-written checkpoint
        torch.save(state, tmp)


def _to_model_range(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def _cosine_lr(step: int, total: int, warmup: int = 200, floor: float = 0.1) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def stage_oracle(cfg: BuildConfig, work: Path) -> None:
    out = work / "oracle"
    if (out / "config.json").exists():
        return
    oracle, metrics = train_oracle(steps=cfg.oracle_steps, seed=cfg.seed)
    oracle.save(out, metrics)
    print(f"oracle accuracy on fresh renders: {metrics}")


def stage_vae(cfg: BuildConfig, work: Path) -> None:
    out = work / "vae"
    if (out / "config.json").exists():
        return
    ckpt = work / "vae.ckpt"
    torch.manual_seed(cfg.seed)
    vae = models.make_vae()
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    rng, g, start = np.random.default_rng(cfg.seed + 1), torch.Generator().manual_seed(cfg.seed + 1), 0
    if ckpt.exists():
        state = torch.load(ckpt, weights_only=False)
        vae.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        rng.bit_generator.state, start = state["rng"], state["step"]
        g.set_state(state["g"])
    scenes = all_scenes()
    bar = tqdm(range(start, cfg.vae_steps), desc="vae", initial=start, total=cfg.vae_steps)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = cfg.vae_lr * _cosine_lr(step, cfg.vae_steps, warmup=50)
        batch = [scenes[i] for i in rng.integers(len(scenes), size=cfg.vae_batch)]
        x = _to_model_range(np.stack([render(s, rng) for s in batch]))
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample(generator=g)).sample
        loss = F.mse_loss(recon, x) + 0.5 * F.l1_loss(recon, x) + 1e-6 * posterior.kl().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if (step + 1) % cfg.checkpoint_every == 0:
            _save_ckpt(ckpt, {"model": vae.state_dict(), "opt": opt.state_dict(), "rng": rng.bit_generator.state,
                              "g": g.get_state(), "step": step + 1})
    vae.save_pretrained(out)


@torch.no_grad()
def stage_latents(cfg: BuildConfig, work: Path) -> None:
    path = work / "latents.pt"
    if path.exists():
        return
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(work / "vae").eval()
    rng = np.random.default_rng(cfg.seed + 2)
    scenes = training_scenes(cfg)
    labels = rng.integers(len(scenes), size=cfg.dataset_size)
    means, stds = [], []
    for i in tqdm(range(0, cfg.dataset_size, 256), desc="encode"):
        x = _to_model_range(np.stack([render(scenes[j], rng) for j in labels[i : i + 256]]))
        dist = vae.encode(x).latent_dist
        means.append(dist.mean.half())
        stds.append(dist.std.half())
    mean, std = torch.cat(means), torch.cat(stds)
    scaling = float(1.0 / mean.float().std())
    torch.save({"mean": mean, "std": std, "labels": torch.from_numpy(labels), "scaling_factor": scaling}, path)
    print(f"encoded {len(mean)} images; latent scaling_factor {scaling:.4f}")


def _ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    with torch.no_grad():
        for e, p in zip(ema.parameters(), model.parameters()):
            e.lerp_(p, 1 - decay)


def stage_unet(cfg: BuildConfig, work: Path) -> None:
    out = work / "unet_final.pt"
    if out.exists():
        return
    import copy

    tokenizer = load_tokenizer(work / "tokenizer")
    data = torch.load(work / "latents.pt")
    scaling = data["scaling_factor"]
    scenes = training_scenes(cfg)
    torch.manual_seed(cfg.seed + 3)
    unet, text = models.make_unet(), models.make_text_encoder(tokenizer)
    ema_unet, ema_text = copy.deepcopy(unet).requires_grad_(False), copy.deepcopy(text).requires_grad_(False)
    params = list(unet.parameters()) + list(text.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.unet_lr, weight_decay=0.01)
    noise_sched = models.make_scheduler("ddpm")
    rng, g, start = np.random.default_rng(cfg.seed + 3), torch.Generator().manual_seed(cfg.seed + 3), 0
    ckpt = work / "unet.ckpt"
    if ckpt.exists():
        state = torch.load(ckpt, weights_only=False)
        for module, key in ((unet, "unet"), (text, "text"), (ema_unet, "ema_unet"), (ema_text, "ema_text")):
            module.load_state_dict(state[key])
        opt.load_state_dict(state["opt"])
        rng.bit_generator.state, start = state["rng"], state["step"]
        g.set_state(state["g"])
    losses: list[float] = []
    bar = tqdm(range(start, cfg.unet_steps), desc="unet+text", initial=start, total=cfg.unet_steps)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = cfg.unet_lr * _cosine_lr(step, cfg.unet_steps, warmup=300)
        idx = torch.from_numpy(rng.integers(len(data["labels"]), size=cfg.unet_batch))
        mean, std = data["mean"][idx].float(), data["std"][idx].float()
        latents = (mean + std * torch.randn(mean.shape, generator=g)) * scaling
        prompts = [
            "" if rng.random() < cfg.cond_dropout else prompt_for(scenes[int(j)], rng, "train")
            for j in data["labels"][idx]
        ]
        ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids
        noise = torch.randn(latents.shape, generator=g)
        t = torch.randint(0, noise_sched.config.num_train_timesteps, (cfg.unet_batch,), generator=g)
        pred = unet(noise_sched.add_noise(latents, noise, t), t, text(ids)[0]).sample
        loss = F.mse_loss(pred, noise)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(cfg.ema_decay, (1 + step) / (10 + step))
        _ema_update(ema_unet, unet, decay)
        _ema_update(ema_text, text, decay)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{np.mean(losses[-100:]):.4f}")
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.unet_steps:
            _save_ckpt(ckpt, {"unet": unet.state_dict(), "text": text.state_dict(), "ema_unet": ema_unet.state_dict(),
                              "ema_text": ema_text.state_dict(), "opt": opt.state_dict(),
                              "rng": rng.bit_generator.state, "g": g.get_state(), "step": step + 1})
    _save_ckpt(out, {"unet": ema_unet.state_dict(), "text": ema_text.state_dict()})


def stage_assemble(cfg: BuildConfig, work: Path, out: Path, started: float) -> None:
    from diffusers import AutoencoderKL, StableDiffusionPipeline

    tokenizer = load_tokenizer(work / "tokenizer")
    final = torch.load(work / "unet_final.pt")
    unet, text = models.make_unet(), models.make_text_encoder(tokenizer)
    unet.load_state_dict(final["unet"])
    text.load_state_dict(final["text"])
    vae = AutoencoderKL.from_pretrained(work / "vae")
    vae.register_to_config(scaling_factor=torch.load(work / "latents.pt")["scaling_factor"])
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet, scheduler=models.make_scheduler(),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    base = out / "base"
    if base.exists():
        shutil.rmtree(base)
    pipe.save_pretrained(base, safe_serialization=True)
    oracle_out = out / "oracle"
    if oracle_out.exists():
        shutil.rmtree(oracle_out)
    shutil.copytree(work / "oracle", oracle_out)
    info = {"config": dataclasses.asdict(cfg), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "sampling": SAMPLING}
    if started:
        info["build_seconds_this_run"] = round(time.time() - started)
    (base / "build_info.json").write_text(json.dumps(info, indent=2))
    print(f"wrote {base} and {oracle_out}")


def build(out: Path = ASSETS, work: Path = BUILD_DIR, cfg: BuildConfig | None = None) -> Path:
    cfg = cfg or BuildConfig()
    if cfg.without and Path(out).resolve() == ASSETS.resolve():
        raise InvalidArgumentError("--without builds a reference, not the shipped base: give another --out")
    work.mkdir(parents=True, exist_ok=True)
    saved, config = work / "build_config.json", json.dumps(dataclasses.asdict(cfg), indent=2)
    if saved.exists() and json.loads(saved.read_text()) != json.loads(config):
        raise SystemExit(f"{work} holds a build with another configuration; remove it or pass another --work")
    saved.write_text(config)
    started = time.time()
    torch.manual_seed(cfg.seed)
    if cfg.without:  # the retrained reference: the shipped oracle, VAE and tokenizer, so only the data differs
        for part in ("oracle", "base/vae", "base/tokenizer"):
            if not (work / Path(part).name).exists():
                shutil.copytree(ASSETS / part, work / Path(part).name)
    else:
        build_tokenizer_files(work / "tokenizer")
        stage_oracle(cfg, work)
        stage_vae(cfg, work)
    stage_latents(cfg, work)
    stage_unet(cfg, work)
    stage_assemble(cfg, work, Path(out), started)
    return Path(out) / "base"


__all__ = ["BuildConfig", "build", "training_scenes", "Oracle"]
