"""ESDConfig: every option of `erasure train`, declared once.

The CLI flags of `erasure train` are generated from these fields (name, type, default, description), and a pack's
manifest embeds the config verbatim (``pack.json`` → ``training``), so what trained a pack travels with it.

Example:
    >>> from erasure.config import ESDConfig
    >>> cfg = ESDConfig(concepts=["circle"], method="esd-x", iterations=200, lr=1e-4)
"""

from __future__ import annotations

from typing import Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

Method = Literal["esd-x", "esd-x-strict", "esd-u", "esd-all", "uce"]
METHODS: tuple[str, ...] = get_args(Method)
DeltaDtype = Literal["float32", "float16", "bfloat16"]


class ESDConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    concepts: list[str] = Field(min_length=1, description="concept to erase (repeat for several; one is drawn per "
                                "iteration)")
    method: Method = Field("esd-x", description="which UNet parameters train (see erasure/methods.py)")
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
    edit_prompts: int = Field(
        1000, gt=0, description="method uce: erase prompts drawn per concept, and as many vocabulary word lists kept "
        "(erasure/closed_form.py)")
    checkpoint_every: int = Field(100, gt=0, description="iterations between resumable checkpoints")
    delta_dtype: DeltaDtype = Field("float32", description="dtype of the stored delta (composition is float32)")

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
    def _uce_is_an_edit_onto_an_anchor(self) -> "ESDConfig":
        if self.method != "uce":
            return self
        if not self.anchor:
            raise ValueError("method uce maps the concept onto an anchor in the same token position: give --anchor "
                             "CONCEPT (e.g. a sibling)")
        robust = [f for f in ("guided_weight", "unnamed_weight", "adversarial_every") if getattr(self, f)]
        if robust:
            raise ValueError(f"method uce is a closed-form edit, not trained: it adds no robust term "
                             f"({', '.join(robust)}); drop them or choose an esd method")
        return self

    @model_validator(mode="after")
    def _others_are_others(self) -> "ESDConfig":
        for option in ("preserve", "anchor"):
            same = sorted(set(getattr(self, option)) & set(self.concepts))
            if same:
                raise ValueError(f"{option} names an erased concept ({', '.join(same)}); list other concepts")
        return self


Family = Literal["prompt", "settings", "soft-prompt"]
FAMILIES: tuple[str, ...] = get_args(Family)


class RequestRange(BaseModel):
    """What a /generate request may set: the service's ``limits`` and the range `erasure attack` searches, declared
    once so a pack's red-team record and a service's limits compare field by field (a service refuses a pack
    red-teamed within a narrower range than it serves).

    Example:
        >>> RequestRange(min_steps=4, min_size=48, max_size=64, negative_prompt=False).max_guidance
        20.0
    """

    model_config = ConfigDict(extra="forbid")

    min_steps: int = Field(1, ge=1, description="smallest `steps` a request may set")
    max_steps: int = Field(50, ge=1, description="largest `steps` a request may set")
    min_size: int = Field(1, ge=1, description="smallest width / height in pixels a request may set")
    max_size: int = Field(128, ge=8, description="largest width / height in pixels a request may set")
    min_guidance: float = Field(0.0, ge=0, description="smallest `guidance_scale` a request may set")
    max_guidance: float = Field(20.0, ge=0, description="largest `guidance_scale` a request may set")
    negative_prompt: bool = Field(True, description="whether a request may set a `negative_prompt`")

    @model_validator(mode="after")
    def _ranges(self) -> "RequestRange":
        for low, high in (("min_steps", "max_steps"), ("min_size", "max_size"), ("min_guidance", "max_guidance")):
            if getattr(self, low) > getattr(self, high):
                raise ValueError(f"{low} {getattr(self, low)} is above {high} {getattr(self, high)}")
        return self

    def uncovered(self, served: "RequestRange") -> list[str]:
        """Where ``served`` lets a request go beyond this range, e.g. ``["max_size 64 < 128"]``; empty: this range
        covers every request ``served`` allows."""
        out = []
        for name in RequestRange.model_fields:
            mine, theirs = getattr(self, name), getattr(served, name)
            if name.startswith("max_") and mine < theirs:
                out.append(f"{name} {mine} < {theirs}")
            elif name.startswith("min_") and mine > theirs:
                out.append(f"{name} {mine} > {theirs}")
            elif name == "negative_prompt" and theirs and not mine:
                out.append("negative prompts off < on")
        return out


class AttackConfig(RequestRange):
    """Every option of `erasure attack` (the red team, erasure/redteam.py); a pack's red-team record embeds it
    verbatim, so the figures travel with how they were measured. The request range (RequestRange) is what the
    settings family searches and what a service compares with its ``limits``.

    Example:
        >>> AttackConfig(budget=32, seeds=48).families
        ['prompt', 'settings', 'soft-prompt']
    """

    families: list[Family] = Field(
        list(FAMILIES), min_length=1, description="attack families to run (repeat): prompt (black-box search over "
        "the vocabulary), settings (everything a request sets), soft-prompt (white-box token embeddings)")
    budget: int = Field(64, gt=0, description="candidates each search family scores (prompts; request settings)")
    search_seeds: int = Field(4, gt=0, description="images per candidate during a search")
    finalists: int = Field(4, gt=0, description="best candidates re-scored on validation seeds; the best of them "
                           "is the family's attack")
    validation_seeds: int = Field(12, gt=0, description="images per finalist on seeds the search never saw")
    seeds: int = Field(64, gt=0, description="fresh seeds of the final test (the ASR), never seen by the search")
    seed: int = Field(0, ge=0, description="seeds the search (mutations, prompts, seed ranges)")
    restarts: int = Field(1, gt=0, description="independent black-box searches per family (seeded seed, seed + 1, "
                          "...), each within the budget; their finalists are validated together, so one unlucky "
                          "search cannot make the record")
    start_prompts: list[str] = Field(
        [], description="prompt both black-box searches also start from (repeat): attacks found before, on other "
        "packs or in a benchmark; the judge's known prompts and the pack's own record's attacks are always added")
    known_from: list[str] = Field(
        [], description="registry namespaces (repeat): every black-box attack recorded under any tag of any pack "
        "there, on the attacked concept or on any concept if it names neither that one nor a sibling, also starts "
        "both searches (packs given as NS/NAME add their namespace; what it added is recorded in start_prompts)")
    calibrate: bool = Field(True, description="also run each family against the base: it must find the concept "
                            "there for its figure on the pack to mean anything")
    steps: int = Field(20, gt=0, description="denoising steps of a request that sets none")
    guidance: float = Field(3.0, ge=0, description="guidance of a request that sets none")
    size: int | None = Field(None, gt=0, description="image size of a request that sets none (None: the base's)")
    soft_tokens: int = Field(4, gt=0, description="soft-prompt: learnable token embeddings put before the prompt")
    soft_steps: int = Field(300, gt=0, description="soft-prompt: Adam steps")
    soft_lr: float = Field(1e-2, gt=0, description="soft-prompt: Adam learning rate")
    soft_targets: int = Field(16, gt=1, description="soft-prompt: base images of the concept it learns to denoise")
    batch_size: int = Field(32, gt=0, description="images per pipeline call")
    guide_away: float | None = Field(
        None, ge=0, description="attack each pack as served with this guidance away from its concepts "
        "(erasure/guidance.py; None: the pack's own); with --record it is written into the pack with the figures")

