"""`erasure train` end to end: load the base, run ESD (resumable) or the ``uce`` edit, evaluate, and return the concept
pack.

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

from .closed_form import edit_in_closed_form
from .compose import with_packs
from .config import ESDConfig
from .errors import InvalidArgumentError
from .esd import ESDTrainer
from .pack import BaseWeights, ConceptPack
from .pipeline import TOY_DEFAULTS, generate, is_toy, load_base, share_pipeline

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
               dtype: torch.dtype = torch.float32, callback=None, metrics: dict | None = None) -> ConceptPack:
    """Train ``cfg`` on ``base`` (loaded at ``revision`` on ``device`` in ``dtype``) and save the pack to ``out``
    (checkpointed there, so ``resume`` continues). The manifest records the base's id, resolved revision,
    family, dtype and fingerprint.

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
    loaded = load_base(base, device=device, dtype=dtype, revision=revision)
    pipe = loaded.pipe
    trainer = ESDTrainer(pipe, cfg, device=device, progress=progress)
    out.mkdir(parents=True, exist_ok=True)
    if resume:
        trainer.load_checkpoint(checkpoint)
    if cfg.method == "uce":
        edit_in_closed_form(trainer)
    else:
        trainer.train(checkpoint=checkpoint, callback=callback)
    trainer.unet.eval()

    delta_dtype = getattr(torch, cfg.delta_dtype)
    delta = {k: v.to(delta_dtype) for k, v in trainer.delta().items()}
    trainer.optimizer.state.clear()  # Adam's moments are the largest thing left; the preview needs the memory
    metrics = {
        **(metrics or {}),
        "final_loss": float(np.mean(trainer.losses[-50:])),
        "train_seconds": round(trainer.train_seconds, 1),
        "unet_sample_passes": trainer.unet_passes,
        "touched_parameters": int(sum(v.numel() for v in delta.values())),
    }
    base_unet = BaseWeights(trainer.frozen)  # the frozen copy is the base, bit for bit
    pack = ConceptPack.from_delta(name or out.name, cfg, loaded.base_ref(base_unet.fingerprint(delta)), delta,
                                  b"", metrics)
    # the preview and the evaluation show what serving computes: the stored delta composed onto the base
    base_pipe = share_pipeline(pipe, unet=trainer.frozen)
    erased_pipe = with_packs(base_pipe, [(pack, 1.0)], base=base_unet)
    samples = (100 if toy else 0) if eval_samples is None else eval_samples
    if toy and samples:
        metrics["eval"] = quick_eval(base_pipe, erased_pipe, samples)
        metrics["eval_settings"] = {"samples": samples, "split": "train", **TOY_DEFAULTS}

    prompts = preview_prompts(cfg.concepts, toy)
    seeds = list(range(len(prompts)))
    gen = dict(steps=TOY_DEFAULTS["steps"], guidance=TOY_DEFAULTS["guidance"]) if toy else {}
    gen["size"] = trainer.size
    grid = preview_grid(generate(base_pipe, prompts, seeds, **gen), generate(erased_pipe, prompts, seeds, **gen))
    pack = ConceptPack.from_delta(pack.name, cfg, pack.manifest.base, delta, grid, metrics)
    pack.save_pretrained(out)
    checkpoint.unlink(missing_ok=True)
    return pack
