"""`erasure train` end to end: load the base, run the method (ESD's training loop, resumable, or a closed-form edit),
evaluate, and return the concept pack.

Example:
    >>> from erasure.training.config import ESDConfig
    >>> from erasure.training.train import train_pack
    >>> pack = train_pack("toy", ESDConfig(concepts=["circle"], iterations=200, lr=1e-4), out="packs/circle")
    >>> pack.path
    PosixPath('packs/circle')
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..base.loading import is_toy, load_base
from ..errors import InvalidArgumentError
from ..pack.compose import with_packs
from ..pack.concept_pack import BaseWeights, ConceptPack
from ..pack.manifest import BaseRef
from ..sampling.generate import generate, image_grid, share_pipeline
from ..toy.evaluate import quick_table
from ..toy.world import concept_attribute, preview_prompts
from .config import ESDConfig
from .methods import get_method
from .trainer import ESDTrainer

CHECKPOINT = ".esd-checkpoint.pt"


def default_preview_prompts(concepts: list[str]) -> list[str]:
    """Prompts of the preview grid on a real base: three that name the first concept, two controls that name none."""
    c = concepts[0]
    return [c, f"a photo of {c}", f"a painting of {c}", "a photo of a dog", "a landscape painting"]


def preview_grid(base_images, erased_images, scale: int = 2):
    """Base images over erased images, small images upscaled."""
    images = [im.resize((im.width * scale, im.height * scale), 0) if im.width < 128 else im
              for im in base_images + erased_images]
    return image_grid(images, cols=len(base_images))


def check_toy_concepts(cfg: ESDConfig) -> None:
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

    # 1. The base and the trainer (the method's parameters, float32 masters, the frozen copy).
    loaded = load_base(base, device=device, dtype=dtype, revision=revision)
    pipe, defaults = loaded.pipe, loaded.defaults
    trainer = ESDTrainer(pipe, cfg, device=device, progress=progress)
    out.mkdir(parents=True, exist_ok=True)
    if resume:
        trainer.load_checkpoint(checkpoint)

    # 2. The method: a closed-form edit, or ESD's training loop (checkpointed).
    edit = get_method(cfg.method).edit
    if edit is not None:
        final_loss = float(edit(trainer))  # the edit's residual
    else:
        trainer.train(checkpoint=checkpoint, callback=callback)
        final_loss = float(np.mean(trainer.losses[-50:]))
    trainer.denoiser.eval()

    # 3. The pack: the delta in the stored dtype, the base it was trained on, the training figures.
    delta_dtype = getattr(torch, cfg.delta_dtype)
    delta = {k: v.to(delta_dtype) for k, v in trainer.delta().items()}
    trainer.optimizer.state.clear()  # Adam's moments are the largest thing left; the preview needs the memory
    metrics = {
        **(metrics or {}),
        "final_loss": final_loss,
        "train_seconds": round(trainer.train_seconds, 1),
        "unet_sample_passes": trainer.denoiser_passes,
        "touched_parameters": int(sum(v.numel() for v in delta.values())),
    }
    base_weights = BaseWeights(trainer.frozen)  # the frozen copy is the base, bit for bit
    ref = BaseRef(id=loaded.id, revision=loaded.revision, fingerprint=base_weights.fingerprint(delta),
                  family=loaded.family, dtype=loaded.dtype)
    pack = ConceptPack.from_delta(name or out.name, cfg, ref, delta, b"", metrics)

    # 4. What the pack does, measured on what serving computes: the stored delta composed onto the base.
    base_pipe = share_pipeline(pipe, denoiser=trainer.frozen)
    erased_pipe = with_packs(base_pipe, [(pack, 1.0)], base=base_weights)
    samples = (100 if toy else 0) if eval_samples is None else eval_samples
    if toy and samples:
        metrics["eval"] = quick_table(base_pipe, erased_pipe, samples, steps=defaults.steps,
                                      guidance=defaults.guidance)
        metrics["eval_settings"] = {"samples": samples, "split": "train", "steps": defaults.steps,
                                    "guidance": defaults.guidance, "size": defaults.size}

    # 5. The preview grid (base over erased), then the pack's files.
    prompts = preview_prompts(cfg.concepts) if toy else default_preview_prompts(cfg.concepts)
    seeds = list(range(len(prompts)))
    gen = dict(steps=defaults.steps, guidance=defaults.guidance, size=trainer.size)
    grid = preview_grid(generate(base_pipe, prompts, seeds, **gen), generate(erased_pipe, prompts, seeds, **gen))
    pack = ConceptPack.from_delta(pack.name, cfg, pack.manifest.base, delta, grid, metrics)
    pack.save_pretrained(out)
    checkpoint.unlink(missing_ok=True)
    return pack
