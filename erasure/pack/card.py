"""The Hub model cards of a concept pack and of its exports, rendered from the manifest with huggingface_hub's
ModelCard. The templates are files beside this module (templates/pack_card.md, templates/export_card.md); what a card
says about how the pack was made is the method's own sentence (``Method.card``, erasure/training/methods/).

Example:
    >>> from erasure.pack.card import render_card
    >>> print(render_card(pack.manifest))    # YAML metadata (base_model, library_name, tags, license) + body
"""

from __future__ import annotations

import re
from pathlib import Path

import jinja2
from huggingface_hub import ModelCard, ModelCardData

from ..training.methods import get_method
from .manifest import Manifest

# Every pack's card carries this tag; `erasure list` finds packs on the Hub by it.
PACK_TAG = "concept-erasure"
LICENSE = "apache-2.0"
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
TEMPLATES = Path(__file__).parent / "templates"


def _template(name: str) -> str:
    return (TEMPLATES / name).read_text()


def _codes(items) -> str:
    return ", ".join(f"`{c}`" for c in items)


def method_text(manifest: Manifest) -> str:
    """What the card says about how the pack was made: the method's own sentence, with its config and options."""
    t = manifest.training
    return jinja2.Template(get_method(t.method).card).render(t=t, options=t.method_options)


def render_card(manifest: Manifest) -> str:
    t, base = manifest.training, manifest.base
    data = ModelCardData(
        library_name="diffusers", license=LICENSE, base_model=base.id if HUB_ID.match(base.id) else None,
        tags=[PACK_TAG, "esd", t.method, "text-to-image", "diffusers"], pipeline_tag="text-to-image",
    )
    card = ModelCard.from_template(
        data, template_str=_template("pack_card.md"), name=manifest.name, concepts=_codes(t.concepts), t=t,
        base=base, method_text=method_text(manifest), templates=_codes(t.templates), preserve=_codes(t.preserve),
        preserve_synonyms=_codes(t.preserve_synonyms), anchor=_codes(t.anchor), n_tensors=len(manifest.tensors),
        eval=manifest.metrics.get("eval"), redteam=manifest.redteam, guide_away=manifest.guide_away,
        guide_away_until=manifest.guide_away_until, guide_away_reference=manifest.guide_away_reference,
    )
    return str(card)


def render_export_card(manifest: Manifest, kind: str, rank=None, weights=None, redteam=None) -> str:
    """The model card of an ``erasure export``: a LoRA (``weights``: its LoraWeights) or a merged pipeline, with the
    red-team figures of the export itself when it was attacked (``redteam``), and in its metadata whether it carries
    the pack's whole protection (``erasure.sampling_guidance_carried``: false for a pack with ``guide_away``)."""
    t, base = manifest.training, manifest.base
    tags = [PACK_TAG, "esd", t.method, "text-to-image", "diffusers"] + (["lora"] if kind == "lora" else [])
    data = ModelCardData(library_name="diffusers", license=LICENSE,
                         base_model=base.id if HUB_ID.match(base.id) else None, tags=tags,
                         pipeline_tag="text-to-image",
                         erasure={"pack": manifest.name, "sampling_guidance_carried": not manifest.guide_away,
                                  "guide_away_not_carried": manifest.guide_away,
                                  "attacked": redteam is not None})
    card = ModelCard.from_template(
        data, template_str=_template("export_card.md"), name=manifest.name, kind=kind, rank=rank, t=t, base=base,
        base_src=base.id if HUB_ID.match(base.id) else f"<the directory of base {base.id!r}>",
        concepts=_codes(t.concepts), n_modules=len(weights.ranks) if weights else 0,
        error=weights.relative_error if weights else 0.0, lora_bias=bool(weights and weights.config["lora_bias"]),
        dropped=weights.dropped if weights else (), guide_away=manifest.guide_away, redteam=redteam,
        pack_redteam=manifest.redteam,
    )
    return str(card)
