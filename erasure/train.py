"""`erasure train` end to end: load the base, run ESD (resumable), evaluate, and return the concept pack.

Example:
    >>> from erasure.config import ESDConfig
    >>> from erasure.train import train_pack
    >>> pack = train_pack("toy", ESDConfig(concepts=["circle"], iterations=200, lr=1e-4), out="packs/circle")
    >>> pack.path
    PosixPath('packs/circle')
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .config import ESDConfig
from .errors import InvalidArgumentError
from .esd import ESDTrainer
from .pack import BaseRef, ConceptPack
from .pipeline import TOY_DEFAULTS, generate, is_toy, load_pipeline, share_pipeline

CHECKPOINT = ".esd-checkpoint.pt"


def preview_prompts(concepts: list[str], toy: bool) -> list[str]:
    """Prompts of the preview grid: three that name the first concept, two controls that name none."""
    if not toy:
        c = concepts[0]
        return [c, f"a photo of {c}", f"a painting of {c}", "a photo of a dog", "a landscape painting"]
    from .toy.world import SYNONYMS, Scene, all_scenes, concept_attribute

    attr = concept_attribute(concepts[0])

    def words(s: Scene) -> str:
        return " ".join(w for w in (SYNONYMS[s.style][0], s.color, s.shape) if w)

    scenes = all_scenes()
    np.random.default_rng(0).shuffle(scenes)
    hits = [s for s in scenes if getattr(s, attr) == concepts[0]][:3]
    controls = [s for s in scenes if not set(concepts) & {s.shape, s.color, s.style}][:2]
    return [f"a {words(s)}" for s in hits + controls]


def preview_grid(base_images, erased_images, scale: int = 2):
    """Base images over erased images, small images upscaled."""
    from .evaluate import image_grid

    images = [im.resize((im.width * scale, im.height * scale), 0) if im.width < 128 else im
              for im in base_images + erased_images]
    return image_grid(images, cols=len(base_images))


def quick_eval(base_pipe, erased_pipe, samples: int) -> dict:
    """Oracle accuracy of every toy concept, base vs erased, on ``samples`` train-template images."""
    from .evaluate import evaluate
    from .toy.oracle import Oracle

    oracle = Oracle.load()
    settings = dict(samples=samples, splits=("train",), steps=TOY_DEFAULTS["steps"],
                    guidance=TOY_DEFAULTS["guidance"], progress=False)
    erased = evaluate(erased_pipe, oracle, **settings).splits["train"]
    base = evaluate(base_pipe, oracle, **settings).splits["train"]
    return {c: {"base": base.per_concept[c], "erased": erased.per_concept[c]} for c in base.per_concept}


def check_toy_concepts(cfg: ESDConfig) -> None:
    from .toy.world import concept_attribute

    for c in cfg.concepts + cfg.preserve + cfg.anchor + ([cfg.erase_from] if cfg.erase_from else []):
        try:
            concept_attribute(c)
        except ValueError as exc:
            raise InvalidArgumentError(str(exc)) from None


def train_pack(base: str, cfg: ESDConfig, out: Path, name: str | None = None, revision: str | None = None,
               resume: bool = False, eval_samples: int | None = None, progress: bool = True, device: str = "cpu",
               callback=None, metrics: dict | None = None) -> ConceptPack:
    """Train ``cfg`` on ``base`` and save the pack to ``out`` (checkpointed there, so ``resume`` continues).

    ``callback(trainer)`` runs after every optimizer step (e.g. to report progress); ``metrics`` are recorded in the
    manifest beside the training figures (e.g. ``erasure train-many``'s config hash)."""
    out = Path(out)
    checkpoint = out / CHECKPOINT
    if out.exists() and any(out.iterdir()) and not resume:
        raise InvalidArgumentError(f"{out} is not empty; choose a new --out or pass --resume")
    if resume and not checkpoint.exists():
        raise InvalidArgumentError(f"nothing to resume in {out} (no {CHECKPOINT})")
    toy = is_toy(base)
    if toy:
        check_toy_concepts(cfg)
    elif "toy" in cfg.templates:
        raise InvalidArgumentError("--template toy draws toy-world prompts; it needs the toy base (--base toy)")
    pipe = load_pipeline(base, revision=revision, device=device)
    trainer = ESDTrainer(pipe, cfg, device=device, progress=progress)
    out.mkdir(parents=True, exist_ok=True)
    if resume:
        trainer.load_checkpoint(checkpoint)
    trainer.train(checkpoint=checkpoint, callback=callback)
    trainer.unet.eval()

    dtype = getattr(torch, cfg.delta_dtype)
    delta = {k: v.to(dtype) for k, v in trainer.delta().items()}
    metrics = {
        **(metrics or {}),
        "final_loss": float(np.mean(trainer.losses[-50:])),
        "train_seconds": round(trainer.train_seconds, 1),
        "unet_sample_passes": trainer.unet_passes,
        "touched_parameters": int(sum(v.numel() for v in delta.values())),
    }
    base_pipe = share_pipeline(pipe, unet=trainer.frozen)  # the frozen copy is the base, bit for bit
    samples = (100 if toy else 0) if eval_samples is None else eval_samples
    if toy and samples:
        metrics["eval"] = quick_eval(base_pipe, pipe, samples)
        metrics["eval_settings"] = {"samples": samples, "split": "train", **TOY_DEFAULTS}

    prompts = preview_prompts(cfg.concepts, toy)
    seeds = list(range(len(prompts)))
    gen = dict(steps=TOY_DEFAULTS["steps"], guidance=TOY_DEFAULTS["guidance"]) if toy else {}
    preview = preview_grid(generate(base_pipe, prompts, seeds, **gen), generate(pipe, prompts, seeds, **gen))
    base_ref = BaseRef(id="toy" if toy else str(base), revision=revision,
                       fingerprint=trainer.base_fingerprint())
    pack = ConceptPack.from_delta(name or out.name, cfg, base_ref, delta, preview, metrics)
    pack.save_pretrained(out)
    checkpoint.unlink(missing_ok=True)
    return pack
