"""Typed request and response bodies of the HTTP API (pydantic; unknown fields are a 400)."""

from __future__ import annotations

import re

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# Fields a client might send hoping to switch a pack off. There is no such switch: they get a 400 that says why.
REMOVAL_FIELDS = ("exclude", "exclude_packs", "disable", "disable_packs", "remove", "remove_packs", "without",
                  "skip_packs", "no_packs")
# Filled in by the service at start-up, only to word the error above.
POLICY: dict[str, tuple[str, ...]] = {"mandatory": ()}
MAX_SEED = 2**53  # JSON-safe integer
NON_BLANK = re.compile(r"\S")


class GenerateRequest(BaseModel):
    """A text-to-image request. Omitted settings take the service defaults (see GET /packs `defaults`)."""

    model_config = ConfigDict(extra="forbid", strict=True)
    prompt: str = Field(description="what to draw", examples=["a red circle"])
    negative_prompt: str | None = Field(None, description="what to steer away from")
    packs: list[str] = Field(default_factory=list, description="optional packs to apply on top of the mandatory ones")
    steps: int | None = Field(None, ge=1, description="denoising steps")
    guidance_scale: float | None = Field(None, ge=0, description="classifier-free guidance scale")
    width: int | None = Field(None, ge=1, description="image width in pixels")
    height: int | None = Field(None, ge=1, description="image height in pixels")
    seed: int = Field(0, ge=0, le=MAX_SEED, description="image i uses seed + i")
    num_images: int = Field(1, ge=1, description="images to generate; /generate returns them as one row (a grid)")

    @model_validator(mode="before")
    @classmethod
    def _no_pack_removal(cls, data):
        if isinstance(data, dict):
            for key in REMOVAL_FIELDS:
                if key in data:
                    mandatory = list(POLICY["mandatory"])
                    raise ValueError(
                        f"'{key}' is not accepted: a request cannot remove packs. "
                        + (f"The mandatory pack(s) {mandatory} always apply; " if mandatory else "")
                        + "optional packs apply only when named in 'packs', so drop the field.")
        return data

    @field_validator("prompt")
    @classmethod
    def _prompt_not_blank(cls, v: str) -> str:
        if not NON_BLANK.search(v):  # the published schema says the same: pattern \S
            raise ValueError("prompt is empty; describe what to draw, e.g. 'a red circle'")
        return v

    @field_validator("packs")
    @classmethod
    def _no_duplicates(cls, v: list[str]) -> list[str]:
        dup = sorted({p for p in v if v.count(p) > 1})
        if dup:
            raise ValueError(f"packs names {dup} more than once; list each pack once")
        return v


class GenerateResponse(BaseModel):
    """/generate_json: base64 PNGs and how they were made."""

    images: list[str] = Field(description="base64-encoded PNGs, image i made with seeds[i]")
    seeds: list[int]
    packs: list[str] = Field(description="the packs applied (mandatory + requested, sorted)")
    pack_shas: dict[str, str] = Field(description="pack -> pinned 40-hex commit sha")
    mandatory: list[str]
    prompt: str
    negative_prompt: str | None
    steps: int
    guidance_scale: float
    width: int
    height: int
    pack_set_built: bool = Field(description="true when this request had to compose its pack set (uncached)")
    seconds: float = Field(description="time spent generating, pack-set build included")


class RedTeamInfo(BaseModel):
    """A pack's red-team record in brief (`erasure attack --record`; the full record is in its pack.json): the
    most successful attack family first, as the operator page shows it, then every family's figure."""

    attack_success_rate: float = Field(description="the highest attack success over the recorded families: share "
                                                   "of fresh-seed images of that family's best attack showing "
                                                   "the concept")
    attack: str = Field(description="the family behind attack_success_rate (prompt, settings, soft-prompt)")
    base_rate: float = Field(description="the base's rate on that same attack (no pack)")
    asr: dict[str, float] = Field(description="attack family -> attack success rate")
    judge: str = Field(description="what read the images, e.g. toy-oracle")
    seeds: int = Field(description="fresh seeds behind each figure")


class PackInfo(BaseModel):
    name: str
    concepts: list[str]
    method: str
    mandatory: bool
    scale: float
    sha: str = Field(description="pinned 40-hex commit sha")
    repo: str
    source: str = Field(description="registry the pack came from")
    base: str = Field(description="base id the pack was trained on")
    tensors: int = Field(description="UNet tensors the pack changes")
    guide_away: float = Field(0.0, description="how far every image is also guided away from the pack's concepts "
                              "at sampling time, on the base's prediction of them (0: not)")
    redteam: RedTeamInfo | None = Field(None, description="the pack's red-team figures; null: never red-teamed")


class PackSetInfo(BaseModel):
    packs: list[str]
    build_seconds: float
    extra_bytes: int = Field(description="memory of this pack set's own tensors (the rest is shared with the base)")
    pinned: bool = Field(description="precomposed at start-up, never evicted")


class PacksResponse(BaseModel):
    base: str
    device: str
    dtype: str
    worker: int | None = Field(None, description="the BentoML worker process that answered (1..workers; null when "
                               "not served by `bentoml serve`): with workers > 1, each loads its own copy of the packs")
    packs: list[PackInfo]
    mandatory: list[str]
    defaults: dict[str, float | int]
    limits: dict[str, bool | int | float]
    pack_sets: list[PackSetInfo]
