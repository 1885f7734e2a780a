"""``pack.json``: the manifest of a concept pack, and the names of the files a pack holds.

The manifest embeds the training config verbatim (``training``: ESDConfig, with the method's own options), the base
the pack was trained on (``BaseRef``, with the fingerprint of the base values of exactly the touched tensors), the
shape and dtype of every delta tensor, the sha256 of every other file, metrics and the red-team record. Older formats
are migrated in memory (``Manifest.from_json``); the files stay as they are.

Example:
    >>> manifest = Manifest.from_json(Path("packs/circle/pack.json").read_text())
    >>> manifest.concepts, manifest.method, manifest.base.family
    (['circle'], 'esd-x', 'sd')
"""

from __future__ import annotations

import datetime as dt
import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..base.families import FAMILIES
from ..redteam.record import RedTeamRecord
from ..training.config import ESDConfig
from ..training.methods import get_method

FORMAT_VERSION = 4  # 4: a method's own options in training.method_options; 3: guide_away
MANIFEST = "pack.json"
DELTA = "delta.safetensors"
CARD = "README.md"
PREVIEW = "preview.png"
PACK_FILES = (DELTA, MANIFEST, CARD, PREVIEW)
# Never loaded, whatever the manifest says: these formats can run code when unpickled.
UNSAFE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle", ".joblib", ".npy", ".npz")


class TensorInfo(BaseModel):
    model_config = ConfigDict(extra="forbid")
    shape: list[int]
    dtype: str


class BaseRef(BaseModel):
    """The base pipeline a pack was trained on."""

    model_config = ConfigDict(extra="forbid")
    id: str = Field(description="'toy', a Hub repository id, or a local path")
    revision: str | None = Field(None, description="the Hub revision the base was loaded at")
    fingerprint: str = Field(description="sha256 of the base values of the touched tensors (see fingerprint())")
    family: str | None = Field(
        None, description="pipeline family (erasure/base/families.py); a pack is refused on another family")
    dtype: str | None = Field(None, description="the dtype the base was loaded in for training")

    @field_validator("family")
    @classmethod
    def _known_family(cls, family: str | None) -> str | None:
        if family is not None and family not in FAMILIES:
            raise ValueError(f"family {family!r} is not one this erasure knows ({', '.join(FAMILIES)}): upgrade "
                             "erasure to read it")
        return family

    def __str__(self) -> str:
        return self.id + (f"@{self.revision[:12]}" if self.revision else "")


class Manifest(BaseModel):
    """``pack.json``. ``files`` maps every other file of the pack to its sha256."""

    model_config = ConfigDict(extra="forbid")
    format_version: Literal[4] = FORMAT_VERSION
    name: str
    training: ESDConfig = Field(description="the config that trained the pack, verbatim")
    base: BaseRef
    tensors: dict[str, TensorInfo]
    files: dict[str, str] = Field(default_factory=dict, description="file name -> sha256, filled when saved")
    metrics: dict[str, Any] = Field(default_factory=dict)
    redteam: RedTeamRecord | None = Field(None, description="red-team figures (`erasure attack --record`)")
    guide_away: float = Field(0.0, ge=0, description="every image of the pack is also guided away from its "
                              "concepts by this much, on the base's prediction of them (erasure/sampling/guidance.py): "
                              "reaches prompts naming nothing; set with the red-team record that measured it")
    guide_away_until: float = Field(1.0, gt=0, le=1, description="the share of the noise schedule, from pure noise, "
                                    "during which guide_away applies")
    guide_away_reference: Literal["base", "pack"] = Field(
        "base", description="where guide_away's eps(x, '') comes from: the base (one more base row per image and "
        "step) or the pack set's own unconditional prediction when the request has no negative prompt")
    created_at: dt.datetime
    tool_version: str

    @property
    def concepts(self) -> list[str]:
        return self.training.concepts

    @property
    def method(self) -> str:
        return self.training.method

    @classmethod
    def from_json(cls, text: str) -> "Manifest":
        """Parse ``pack.json`` of this format, or of formats 1 to 3 (migrated in memory; the files stay as they
        are). An older erasure refuses format 4 in one line rather than misread a method's own options."""
        data = json.loads(text)
        version = data.get("format_version") if isinstance(data, dict) else None
        if version == 1:
            data = _migrate_format_1(data)
        if version in (1, 2, 3):
            data = _migrate_format_3(data)
        elif isinstance(data, dict) and version != FORMAT_VERSION:
            raise ValueError(f"format version {version!r}; this erasure reads formats 1 to {FORMAT_VERSION}: upgrade "
                             f"erasure to read it")
        return cls.model_validate(data)


# Fields of format 3's ESDConfig that are a method's own options since format 4.
_FORMAT_3_METHOD_OPTIONS = ("edit_prompts",)
# Format 1 stored the training options flat beside the pack's own fields; packs written before the pooled-loop
# fields existed trained with batch 4, refresh 20, 4 trajectories.
_FORMAT_1_LOOP_DEFAULTS = {"batch_size": 4, "refresh_every": 20, "pool_trajectories": 4}


def _migrate_format_1(data: dict) -> dict:
    own = {"format_version", "name", "base", "tensors", "files", "metrics", "created_at", "tool_version"}
    training = {**_FORMAT_1_LOOP_DEFAULTS, **{k: v for k, v in data.items() if k not in own}}
    dtypes = {info.get("dtype") for info in data.get("tensors", {}).values()}
    if len(dtypes) == 1:
        training["delta_dtype"] = dtypes.pop()
    return {**{k: v for k, v in data.items() if k in own}, "training": training}


def _migrate_format_3(data: dict) -> dict:
    """Formats 2 and 3 (2: without ``guide_away``, which defaults to 0) held every method's options flat in
    ``training``: the ones of the pack's own method move into ``method_options`` when ESDConfig validates it, the
    others (``edit_prompts`` of an esd pack) are dropped."""
    training = dict(data.get("training") or {})
    try:
        own = get_method(training.get("method", "esd-x")).options.model_fields
    except ValueError:
        own = {}
    for key in _FORMAT_3_METHOD_OPTIONS:
        if key not in own:
            training.pop(key, None)
    return {**data, "format_version": FORMAT_VERSION, "training": training}
