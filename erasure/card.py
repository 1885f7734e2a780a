"""The Hub model card (README.md) of a concept pack: YAML metadata, the preview, the figures, how to apply it."""

from __future__ import annotations

import re

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def render_card(fields: dict, metrics: dict) -> str:
    base = fields["base"]["id"]
    tags = ["concept-erasure", "esd", fields["method"], "text-to-image", "diffusers"]
    meta = ["---", "library_name: diffusers", "license: apache-2.0"]
    if HUB_ID.match(base):
        meta.append(f"base_model: {base}")
    meta += ["tags:"] + [f"- {t}" for t in tags] + ["---", ""]
    concepts = ", ".join(f"`{c}`" for c in fields["concepts"])
    lines = [
        f"# {fields['name']}: a concept pack erasing {concepts}",
        "",
        f"ESD ({fields['method']}, eta={fields['eta']}, {fields['iterations']} iterations, lr={fields['lr']}, "
        f"x_t sampled with the {fields['sample_with']} UNet) applied to base `{base}`"
        + (f" at revision `{fields['base']['revision']}`" if fields["base"].get("revision") else "") + ". "
        + "Training prompts: " + ", ".join(f"`{t}`" for t in fields.get("templates", ["{}"]))
        + " (`{}` is the concept; `toy`: toy-world train prompts naming it)."
        + (f" Preserved concepts (weight {fields.get('preserve_weight', 1.0)}): "
           + ", ".join(f"`{c}`" for c in fields["preserve"]) + "." if fields.get("preserve") else "")
        + (f" The empty prompt's prediction (guidance's unconditional branch) is held to the base's (weight "
           f"{fields.get('preserve_weight', 1.0)})." if fields.get("preserve_unconditional") else "")
        + (" Anchors (c0 names one of these in place of the concept): "
           + ", ".join(f"`{c}`" for c in fields["anchor"]) + "." if fields.get("anchor") else ""),
        "The pack holds only the weight delta of the UNet tensors training touched (`delta.safetensors`) and a "
        "manifest (`pack.json`) with the sha256 of every file and a fingerprint of the base tensors it expects.",
        "",
        "![base (top) vs erased (bottom)](preview.png)",
        "",
    ]
    table = metrics.get("eval")
    if table:
        lines += ["## Erasure figures (oracle accuracy on generated images)", "",
                  "| concept | base | erased |", "|---|---:|---:|"]
        for concept, row in table.items():
            lines.append(f"| {concept} | {row['base']:.1%} | {row['erased']:.1%} |")
        lines.append("")
    lines += [
        "## How to apply",
        "",
        "```bash",
        f"erasure pull <namespace>/<repo> --to packs/{fields['name']}",
        f"erasure generate 'a prompt' --base {base} --packs packs/{fields['name']} --out out.png",
        "```",
        "",
        "or list it under `packs:` in the BentoML service configuration. Packs compose additively: "
        "theta = theta* + sum_i s_i * delta_i, in float32 from the pristine base.",
        "",
    ]
    return "\n".join(meta + lines)
