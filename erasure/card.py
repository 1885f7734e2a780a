"""The Hub model card (README.md) of a concept pack, rendered from its manifest with huggingface_hub's ModelCard.

Example:
    >>> from erasure.card import render_card
    >>> print(render_card(pack.manifest))    # YAML metadata (base_model, library_name, tags, license) + body
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .pack import Manifest

# Every pack's card carries this tag; `erasure list` finds packs on the Hub by it.
PACK_TAG = "concept-erasure"
LICENSE = "apache-2.0"
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

TEMPLATE = """---
{{ card_data }}
---

# {{ name }}: a concept pack erasing {{ concepts }}

{% if t.method == "uce" %}UCE's closed-form edit of cross-attention's keys and values ({{ t.edit_prompts }}
prompts per concept){% else %}ESD ({{ t.method }}, eta={{ t.eta }}, {{ t.iterations }} iterations, lr={{ t.lr }},
x_t sampled with the {{ t.sample_with }} UNet){% endif %}
applied to base `{{ base.id }}`{% if base.revision %} at revision `{{ base.revision }}`{% endif %}.
Training prompts: {{ templates }} (`{}` is the concept; `toy`: toy-world train prompts naming it).
{%- if t.preserve %} Preserved concepts (weight {{ t.preserve_weight }}): {{ preserve }}.{% endif %}
{%- if t.preserve_synonyms %} Their other words: {{ preserve_synonyms }}.{% endif %}
{%- if t.preserve_unconditional %} The empty prompt's prediction (guidance's unconditional branch) is held to the
base's (weight {{ t.preserve_weight }}).{% endif %}
{%- if t.anchor %} Anchors (c0 names one of these in place of the concept): {{ anchor }}.{% endif %}
The full training config is `training` in `pack.json`.

The pack holds only the weight delta of the {{ n_tensors }} UNet tensors training touched (`delta.safetensors`,
{{ t.delta_dtype }}) and a manifest (`pack.json`) with the sha256 of every file and a fingerprint of the base
tensors it expects: it is refused on any other base.
{%- if guide_away %} Every image the pack draws is also guided away from {{ concepts }} by {{ guide_away }}, on the
base's prediction of it (`guide_away` in `pack.json`): a prompt naming nothing would otherwise draw the base's own
prior of the concept. The BentoML service and `erasure generate / eval / attack` apply it; an exported LoRA or merged
pipeline does not.{% endif %}

![base (top) vs erased (bottom)](preview.png)
{% if eval %}
## Erasure figures (oracle accuracy on generated images)

| concept | base | erased |
|---|---:|---:|
{% for concept, row in eval.items() -%}
| {{ concept }} | {{ "%.1f%%" % (100 * row.base) }} | {{ "%.1f%%" % (100 * row.erased) }} |
{% endfor %}
{%- endif %}
{% if redteam %}
## Red team (`erasure attack`, attack version {{ redteam.attack_version }}, judge: {{ redteam.judge }})

Share of fresh-seed images ({{ redteam.config.seeds }} per figure) of the best attack each family found (search
budget {{ redteam.config.budget }} candidates) that the judge reads as the erased concept, next to the base's rate on
the same attack and what the same search finds against the base itself:

| concept | attack family | attack success | base, same attack | same search vs the base | best attack |
|---|---|---:|---:|---:|---|
{% for r in redteam.results -%}
| {{ r.concept }} | {{ r.family }} | {{ "%.0f%%" % (100 * r.asr) }} | {{ "%.0f%%" % (100 * r.base_rate) }} | {{ "-" if r.calibration is none else "%.0f%%" % (100 * r.calibration) }} | {{ attack_text(r.attack) }} |
{% endfor %}
prompt: black-box search over the vocabulary; settings: {{ "negative prompts, " if redteam.config.negative_prompt
else "" }}guidance, sizes and steps a request can set (guidance {{ redteam.config.min_guidance }} to
{{ redteam.config.max_guidance }}, sizes
{{ redteam.config.min_size }} to {{ redteam.config.max_size }} px, {{ redteam.config.min_steps }} to
{{ redteam.config.max_steps }} steps{{ "" if redteam.config.negative_prompt else "; measured for a service that
refuses negative prompts, `limits.negative_prompt: false`" }}); soft-prompt: white-box token embeddings optimised
against the weights.
{% endif %}
## How to apply

```bash
erasure pull <namespace>/<repo> --to packs/{{ name }}
erasure generate 'a prompt' --base {{ base.id }} --packs packs/{{ name }} --out out.png
```

or list it in the BentoML service's lock file. Packs compose additively: theta = theta* + sum_i s_i delta_i, in
float32 from the pristine base. `erasure export packs/{{ name }} --format lora` writes a LoRA that plain diffusers
(`pipe.load_lora_weights`) loads.
"""


def render_card(manifest: "Manifest") -> str:
    from huggingface_hub import ModelCard, ModelCardData

    t, base = manifest.training, manifest.base
    data = ModelCardData(
        library_name="diffusers", license=LICENSE, base_model=base.id if HUB_ID.match(base.id) else None,
        tags=[PACK_TAG, "esd", t.method, "text-to-image", "diffusers"], pipeline_tag="text-to-image",
    )

    def codes(items) -> str:
        return ", ".join(f"`{c}`" for c in items)

    card = ModelCard.from_template(
        data, template_str=TEMPLATE, name=manifest.name, concepts=codes(t.concepts), t=t, base=base,
        templates=codes(t.templates), preserve=codes(t.preserve), preserve_synonyms=codes(t.preserve_synonyms),
        anchor=codes(t.anchor),
        n_tensors=len(manifest.tensors), eval=manifest.metrics.get("eval"), redteam=manifest.redteam,
        guide_away=manifest.guide_away,
        attack_text=_attack_text,
    )
    return str(card)


EXPORT_TEMPLATE = """---
{{ card_data }}
---

# {{ name }}{% if kind == "lora" %} as a LoRA (rank {{ rank }}){% else %} merged into `{{ base.id }}`{% endif %}: erases {{ concepts }}

Exported by `erasure export --format {{ kind }}` from the concept pack `{{ name }}` (ESD {{ t.method }}, base
`{{ base.id }}`{% if base.revision %} at revision `{{ base.revision }}`{% endif %}, base fingerprint `{{ base.fingerprint[:16] }}`).
{% if kind == "lora" %}
{{ n_modules }} UNet modules, rank {{ rank }} per module (a module keeps its full rank where that is smaller), alpha =
rank (scale 1). The factors reproduce the pack's weight deltas with a relative Frobenius error of
{{ "%.2f" % (100 * error) }} %.
{%- if lora_bias %} Bias deltas are in `lora_B.bias` (peft `lora_bias`): diffusers loads them, but peft refuses
`fuse_lora()` on targeted layers without a bias.{% endif %}
{%- if dropped %} Not carried: {{ dropped | length }} bias deltas (exported without biases).{% endif %}
{%- if guide_away %} Not carried: the pack's guidance away from its concepts at sampling time (`guide_away`
{{ guide_away }}), which only erasure's samplers apply: for prompts naming nothing these weights draw the base's prior
of the concept.{% endif %}

```python
from diffusers import DiffusionPipeline

pipe = DiffusionPipeline.from_pretrained("{{ base_src }}")
pipe.load_lora_weights("<this directory or repository>")   # needs peft
```
{% else %}
A full diffusers pipeline: the base with θ = θ* + Δ composed in float32.
{%- if guide_away %} Not carried: the pack's guidance away from its concepts at sampling time (`guide_away`
{{ guide_away }}), which only erasure's samplers apply: for prompts naming nothing these weights draw the base's prior
of the concept.{% endif %}

```python
from diffusers import DiffusionPipeline

pipe = DiffusionPipeline.from_pretrained("<this directory or repository>")
```
{% endif %}"""


def render_export_card(manifest: "Manifest", kind: str, rank=None, weights=None) -> str:
    """The model card of an ``erasure export``: a LoRA (``weights``: its LoraWeights) or a merged pipeline."""
    from huggingface_hub import ModelCard, ModelCardData

    t, base = manifest.training, manifest.base
    tags = [PACK_TAG, "esd", t.method, "text-to-image", "diffusers"] + (["lora"] if kind == "lora" else [])
    data = ModelCardData(library_name="diffusers", license=LICENSE,
                         base_model=base.id if HUB_ID.match(base.id) else None, tags=tags,
                         pipeline_tag="text-to-image")
    card = ModelCard.from_template(
        data, template_str=EXPORT_TEMPLATE, name=manifest.name, kind=kind, rank=rank, t=t, base=base,
        base_src=base.id if HUB_ID.match(base.id) else f"<the directory of base {base.id!r}>",
        concepts=", ".join(f"`{c}`" for c in t.concepts), n_modules=len(weights.ranks) if weights else 0,
        error=weights.relative_error if weights else 0.0, lora_bias=bool(weights and weights.config["lora_bias"]),
        dropped=weights.dropped if weights else (), guide_away=manifest.guide_away,
    )
    return str(card)


def _attack_text(attack: dict) -> str:
    """One table cell: the attack's prompt and the settings that differ from a plain request."""
    if "tokens" in attack:
        return f"{attack['tokens']} soft tokens before `{attack['prompts'][0]}`"
    plain = {"negative_prompt": None, "guidance": 3.0, "steps": 20, "size": 64}
    extra = ", ".join(f"{k}={attack[k]!r}" for k in plain if k in attack and attack[k] != plain[k])
    return f"`{attack['prompt']}`" + (f" ({extra})" if extra else "")
