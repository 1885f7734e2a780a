"""`erasure train` end to end: load the base, run ESD (resumable), evaluate, write the concept pack."""

from __future__ import annotations

import datetime as dt
import shutil
from pathlib import Path

import numpy as np
import torch

from . import __version__
from .card import render_card
from .config import ESDConfig
from .errors import InvalidArgumentError
from .pack import ConceptPack, fingerprint, write_pack
from .pipeline import TOY_DEFAULTS, generate, is_toy, load_pipeline
from .trainer import ESDTrainer

CHECKPOINT = ".esd-checkpoint.pt"


def preview_prompts(concepts: list[str], toy: bool) -> list[str]:
    """Prompts of the preview grid: three that name the first concept, two controls that name none."""
    if not toy:
        c = concepts[0]
        return [c, f"a photo of {c}", f"a painting of {c}", "a photo of a dog", "a landscape painting"]
    from .toy.world import SYNONYMS, Scene, all_scenes, concept_attribute

    attr = concept_attribute(concepts[0])
    others = [c for c in concepts if c]

    def words(s: Scene) -> str:
        return " ".join(w for w in (SYNONYMS[s.style][0], s.color, s.shape) if w)

    scenes = all_scenes()
    rng = np.random.default_rng(0)
    rng.shuffle(scenes)
    hits = [s for s in scenes if getattr(s, attr) == concepts[0]][:3]
    controls = [s for s in scenes if not any(c in (s.shape, s.color, s.style) for c in others)][:2]
    return [f"a {words(s)}" for s in hits + controls]


def preview_grid(base_images, erased_images, scale: int = 2):
    from .evaluate import image_grid

    images = [im.resize((im.width * scale, im.height * scale), 0) if im.width < 128 else im
              for im in base_images + erased_images]
    return image_grid(images, cols=len(base_images))


def quick_eval(pipe, trainer_unet_state, cfg: ESDConfig, samples: int) -> dict:
    """Oracle accuracy of each erased concept, and of the other toy concepts, base vs erased (train templates)."""
    from .evaluate import evaluate
    from .toy.oracle import Oracle

    oracle = Oracle.load()
    settings = dict(samples=samples, splits=("train",), steps=TOY_DEFAULTS["steps"],
                    guidance=TOY_DEFAULTS["guidance"], progress=False)
    erased = evaluate(pipe, oracle, **settings).splits["train"]
    with swap_state(pipe.unet, trainer_unet_state):
        base = evaluate(pipe, oracle, **settings).splits["train"]
    return {c: {"base": base.per_concept[c], "erased": erased.per_concept[c]} for c in base.per_concept}


class swap_state:
    """Temporarily load ``values`` into ``module``'s parameters of the same names."""

    def __init__(self, module, values: dict[str, torch.Tensor]):
        self.params = dict(module.named_parameters())
        self.values = values

    def __enter__(self):
        self.saved = {n: self.params[n].detach().clone() for n in self.values}
        with torch.no_grad():
            for n, v in self.values.items():
                self.params[n].copy_(v)

    def __exit__(self, *exc):
        with torch.no_grad():
            for n, v in self.saved.items():
                self.params[n].copy_(v)


def train_pack(base: str, cfg: ESDConfig, out: Path, name: str | None = None, resume: bool = False,
               eval_samples: int | None = None, delta_dtype: torch.dtype = torch.float32,
               progress: bool = True) -> ConceptPack:
    out = Path(out)
    checkpoint = out / CHECKPOINT
    if out.exists() and any(out.iterdir()) and not resume:
        raise InvalidArgumentError(f"{out} is not empty; choose a new --out or pass --resume")
    if resume and not checkpoint.exists() and not (out / "pack.json").exists():
        raise InvalidArgumentError(f"nothing to resume in {out} (no {CHECKPOINT})")
    toy = is_toy(base)
    if toy:
        from .toy.world import concept_attribute

        for c in cfg.concepts + ([cfg.erase_from] if cfg.erase_from else []):
            try:
                concept_attribute(c)
            except ValueError as exc:
                raise InvalidArgumentError(f"--concept: {exc}") from None
    elif "toy" in cfg.templates:
        raise InvalidArgumentError("--template toy draws toy-world prompts; it needs the toy base (--base toy)")
    pipe = load_pipeline(base)
    trainer = ESDTrainer(pipe, cfg, progress=progress)
    out.mkdir(parents=True, exist_ok=True)
    if resume and checkpoint.exists():
        trainer.load_checkpoint(checkpoint)
    trainer.train(checkpoint=checkpoint)
    trainer.unet.eval()

    delta = {k: v.to(delta_dtype) for k, v in trainer.delta().items()}
    metrics = {
        "final_loss": float(np.mean(trainer.losses[-50:])),
        "train_seconds": round(trainer.train_seconds, 1),
        "unet_sample_passes": trainer.unet_passes,
        "touched_parameters": int(sum(v.numel() for v in delta.values())),
    }
    samples = (100 if toy else 0) if eval_samples is None else eval_samples
    if toy and samples:
        metrics["eval"] = quick_eval(pipe, trainer.base_values, cfg, samples)
        metrics["eval_settings"] = {"samples": samples, "split": "train", **TOY_DEFAULTS}

    prompts = preview_prompts(cfg.concepts, toy)
    seeds = list(range(len(prompts)))
    gen = dict(steps=TOY_DEFAULTS["steps"], guidance=TOY_DEFAULTS["guidance"]) if toy else {}
    erased_images = generate(pipe, prompts, seeds, **gen)
    with swap_state(pipe.unet, trainer.base_values):
        base_images = generate(pipe, prompts, seeds, **gen)

    fields = dict(
        name=name or out.name,
        concepts=cfg.concepts,
        method=cfg.method,
        eta=cfg.eta,
        iterations=cfg.iterations,
        lr=cfg.lr,
        seed=cfg.seed,
        sample_with=cfg.sample_with,
        erase_from=cfg.erase_from,
        guidance=cfg.guidance,
        ddim_steps=cfg.ddim_steps,
        loop=cfg.loop,
        templates=cfg.templates,
        preserve=cfg.preserve,
        preserve_weight=cfg.preserve_weight,
        preserve_unconditional=cfg.preserve_unconditional,
        anchor=cfg.anchor,
        batch_size=cfg.batch_size,
        refresh_every=cfg.refresh_every,
        pool_trajectories=cfg.pool_trajectories,
        base=dict(id="toy" if toy else str(base), revision=None,
                  fingerprint=fingerprint(trainer.base_values, trainer.names)),
        metrics=metrics,
        created_at=dt.datetime.now(dt.timezone.utc),
        tool_version=__version__,
    )
    write_pack(out, fields, delta, render_card(fields, metrics), preview_grid(base_images, erased_images))
    checkpoint.unlink(missing_ok=True)
    shutil.rmtree(out / ".tmp", ignore_errors=True)
    return ConceptPack.load(out)
