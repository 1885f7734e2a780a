"""ESDConfig: every option of `erasure train`, declared once.

The CLI flags of `erasure train` are generated from these fields (name, type, default, description) and from each
method's own options (``method_options``: a pydantic model per method, erasure/training/methods/), and a pack's
manifest embeds the config verbatim (``pack.json`` → ``training``), so what trained a pack travels with it.

Example:
    >>> from erasure.training.config import ESDConfig
    >>> cfg = ESDConfig(concepts=["circle"], method="esd-x", iterations=200, lr=1e-4)
    >>> ESDConfig(concepts=["red"], method="uce", anchor=["green"], edit_prompts=200).method_options.edit_prompts
    200
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .methods import METHODS, get_method

DeltaDtype = Literal["float32", "float16", "bfloat16"]


class ESDConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    concepts: list[str] = Field(min_length=1, description="concept to erase (repeat for several; one is drawn per "
                                "iteration)")
    method: str = Field("esd-x", description="how the concept is erased: which denoiser parameters change and how "
                        "(erasure/training/methods/)")
    method_options: Any = Field(None, description="the method's own options, as its options model declares them "
                                "(flat keys naming them are moved here)")
    eta: float = Field(1.0, description="negative guidance of the paper (the official script's value is eta + 1)")
    iterations: int = Field(1000, gt=0, description="optimizer steps")
    lr: float = Field(1e-5, gt=0, description="Adam learning rate (paper: 1e-5)")
    templates: list[str] = Field(
        ["{}"], min_length=1, description="training prompt with {} for the concept, e.g. 'a photo of {}' (repeat; "
        "one is drawn per trajectory); 'toy': toy-world train prompts naming the concept")
    preserve: list[str] = Field(
        [], description="concept to keep: each training prompt with it in place of the erased concept is held to "
        "the base's prediction (repeat)")
    preserve_synonyms: list[str] = Field(
        [], description="another word for a preserved concept, as CONCEPT=WORD (repeat; e.g. yellow=lemon): preserved "
        "prompts name the preserved concepts by any of their words, drawn per prompt, and mutations draw them too")
    preserve_unconditional: bool = Field(
        False, description="also hold the empty prompt's prediction (guidance's unconditional branch) to the base's "
        "on every x_t of the step")
    preserve_weight: float = Field(1.0, ge=0, description="weight of the preservation terms")
    anchor: list[str] = Field(
        [], description="concept standing in for the erased one in c0, one drawn per trajectory (repeat), for a "
        "base that draws the concept when it is not named; default: c0 leaves the concept out")
    sample_with: Literal["trained", "frozen"] = Field(
        "trained", description="which UNet samples x_t: the one being trained (paper) or the frozen base (official)")
    erase_from: str | None = Field(None, description="train eps(x_t, ERASE_FROM) towards the concept's target")
    guidance: float = Field(3.0, description="classifier-free guidance while sampling x_t (paper: 3)")
    ddim_steps: int = Field(50, gt=1, description="DDIM steps of the x_t sampler; x_t stops at a uniform step")
    resolution: int | None = Field(
        None, gt=0, description="image size in pixels x_t is sampled at; SDXL's time ids say the same size "
        "(default: the base's native size: 512 for SD 1.5, 768 for SD 2.1-v, 1024 for SDXL)")
    gradient_checkpointing: bool = Field(
        False, description="recompute the trained UNet's activations in the backward pass: less memory, more time")
    seed: int = Field(0, description="seeds the sampler noise, prompts and pool draws")
    loop: Literal["pooled", "reference"] = Field(
        "pooled", description="pooled: reuse sampled trajectories; reference: the official per-iteration loop")
    batch_size: int = Field(1, gt=0, description="x_t per optimizer step (pooled loop; the reference loop uses 1)")
    refresh_every: int = Field(50, gt=0, description="pooled loop: resample trajectories every N iterations")
    pool_trajectories: int = Field(4, gt=0, description="pooled loop: trajectories sampled per concept per refresh")
    synonyms: list[str] = Field(
        [], description="another word for the concept (repeat; one concept only): each training prompt names it by "
        "its name or one of these, drawn per trajectory")
    mutations: int = Field(
        0, ge=0, description="robust: up to N attacker-style word edits per training prompt (insert, substitute, "
        "delete, repeat, swap, shuffle; words from the concept's names, the preserved and anchor concepts and the "
        "tokenizer's vocabulary), drawn per trajectory; c0 leaves the concept's words out; 0: off")
    guided_weight: float = Field(
        0.0, ge=0, description="robust: weight of a term holding the guided prediction under attacker-like requests "
        "(prompt with or without the concept; negative prompt empty, the concept, preserved concepts; a drawn "
        "guidance scale) to the base's with the concept guided away (erasure/robust.py); 0: off")
    unnamed_weight: float = Field(
        0.0, ge=0, description="robust: weight of a term erasing the concept from prompts that leave it out or name "
        "nothing (word lists from the vocabulary), which the base's own prior can draw it for (erasure/robust.py); "
        "0: off")
    guided_scales: list[float] = Field(
        [1.0, 1.5, 3.0, 5.0, 7.5, 12.0], min_length=1, description="robust: guidance scales the guided term draws "
        "from (<= 1: the conditional prediction alone, as diffusers samples it)")
    adversarial_every: int = Field(
        0, ge=0, description="robust: every N iterations a soft prompt is optimised against the UNet being trained to "
        "bring the concept back, and the erasure is trained under it (AdvUnlearn-style); 0: off")
    adversarial_tokens: int = Field(4, gt=0, description="robust: token embeddings of the adversarial soft prompt")
    adversarial_steps: int = Field(10, gt=0, description="robust: Adam steps on the soft prompt per refresh")
    adversarial_lr: float = Field(1e-2, gt=0, description="robust: the soft prompt's Adam learning rate")
    adversarial_weight: float = Field(1.0, ge=0, description="robust: weight of the erasure under the soft prompt")
    checkpoint_every: int = Field(100, gt=0, description="iterations between resumable checkpoints")
    delta_dtype: DeltaDtype = Field("float32", description="dtype of the stored delta (composition is float32)")

    @model_validator(mode="before")
    @classmethod
    def _method_and_its_options(cls, data: Any) -> Any:
        """The method's options as its own model; keys of that model given flat (a CLI flag, a catalogue entry)
        move into ``method_options``."""
        if not isinstance(data, dict) or data.get("method", "esd-x") not in METHODS:
            return data  # an unknown method is the `method` field's error
        method = get_method(data.get("method", "esd-x"))
        data = dict(data)
        given = data.get("method_options")
        own = dict(given.model_dump() if isinstance(given, BaseModel) else given or {})
        for key in list(data):
            if key in method.options.model_fields and key not in cls.model_fields:
                own[key] = data.pop(key)
        data["method_options"] = method.options.model_validate(own)
        return data

    @field_validator("method")
    @classmethod
    def _known_method(cls, method: str) -> str:
        get_method(method)
        return method

    @model_validator(mode="after")
    def _method_accepts_config(self) -> "ESDConfig":
        check = get_method(self.method).check
        if check is not None:
            check(self)
        return self

    @field_validator("concepts")
    @classmethod
    def _non_empty(cls, concepts: list[str]) -> list[str]:
        cleaned = [c.strip() for c in concepts]
        if any(not c for c in cleaned):
            raise ValueError("a concept is empty")
        if len(set(cleaned)) != len(cleaned):
            raise ValueError("a concept is listed twice")
        return cleaned

    @field_validator("templates")
    @classmethod
    def _templates(cls, templates: list[str]) -> list[str]:
        for t in templates:
            if t != "toy" and t.count("{}") != 1:
                raise ValueError(f"template {t!r} must contain '{{}}' exactly once (where the concept goes), or be 'toy'")
        return templates

    @model_validator(mode="after")
    def _synonyms_of_one_concept(self) -> "ESDConfig":
        if self.synonyms and len(self.concepts) > 1:
            raise ValueError("synonyms name one concept: train one concept per pack to give synonyms")
        return self

    @model_validator(mode="after")
    def _synonyms_of_preserved_concepts(self) -> "ESDConfig":
        for pair in self.preserve_synonyms:
            concept, _, word = (part.strip() for part in pair.partition("="))
            if not word or concept not in self.preserve:
                raise ValueError(f"preserve_synonyms {pair!r}: give CONCEPT=WORD for a preserved concept "
                                 f"({', '.join(self.preserve) or 'none preserved'})")
        return self

    def preserved_words(self) -> list[str]:
        """Every word naming a preserved concept: the concepts, then their synonyms."""
        return [*self.preserve, *(pair.partition("=")[2].strip() for pair in self.preserve_synonyms)]

    @model_validator(mode="after")
    def _others_are_others(self) -> "ESDConfig":
        for option in ("preserve", "anchor"):
            same = sorted(set(getattr(self, option)) & set(self.concepts))
            if same:
                raise ValueError(f"{option} names an erased concept ({', '.join(same)}); list other concepts")
        return self
