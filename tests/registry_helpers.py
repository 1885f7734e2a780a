"""Packs for the registry tests: a tiny random diffusers UNet2DConditionModel and erasure.pack.write_pack.

Nothing is trained: the delta is random, the base fingerprint is real, so ``verify_against`` behaves as in use."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import torch

from erasure.card import render_card
from erasure.pack import MANIFEST, PACK_FILES, fingerprint, write_pack

torch.set_num_threads(1)


def tiny_unet(seed: int = 0):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=8, attention_head_dim=2, norm_num_groups=4,
    )


def make_pack(out: Path, unet, name: str = "circle", concepts=("circle",), method: str = "esd-all",
              seed: int = 0, card_note: str = "") -> Path:
    """A valid pack for ``unet``: esd-all touches every tensor (~200 kB delta), esd-x only attn2."""
    from PIL import Image

    params = dict(unet.named_parameters())
    names = [n for n in params if method == "esd-all" or ("attn2" in n) == (method.startswith("esd-x"))]
    g = torch.Generator().manual_seed(seed)
    delta = {n: torch.randn(params[n].shape, generator=g) * 1e-3 for n in names}
    fields = dict(name=name, concepts=list(concepts), method=method, eta=1.0, iterations=1, lr=1e-5, seed=seed,
                  sample_with="trained", guidance=3.0, ddim_steps=4, loop="pooled",
                  base=dict(id="test/tiny-unet", revision=None, fingerprint=fingerprint(params, names)),
                  created_at=dt.datetime(2026, 11, 28, tzinfo=dt.timezone.utc), tool_version="test")
    card = render_card(fields, {}) + card_note
    preview = Image.new("RGB", (16, 8), (seed * 40 % 256, 80, 160))
    write_pack(Path(out), fields, delta, card, preview)
    return Path(out)


def rewrite_manifest(pack: Path, **changes) -> None:
    """Edit pack.json in place (e.g. a wrong sha256), bypassing write_pack's hashing."""
    m = json.loads((pack / MANIFEST).read_text())
    for key, value in changes.items():
        m[key] = value
    (pack / MANIFEST).write_text(json.dumps(m, indent=2))


def read_files(d: Path) -> dict[str, bytes]:
    return {name: (Path(d) / name).read_bytes() for name in PACK_FILES}


def leftovers(parent: Path, name: str) -> list[str]:
    """Temporary siblings a pull into parent/name may have left behind."""
    return sorted(p.name for p in Path(parent).iterdir() if p.name.startswith(f".{name}."))


def recard(pack: Path, out: Path, note: str = "\nRevised card.\n") -> Path:
    """A copy of ``pack`` with only its card (README.md, and so pack.json) changed: same delta and preview bytes."""
    import shutil

    shutil.copytree(pack, out)
    with open(out / "README.md", "a") as f:
        f.write(note)
    from erasure.pack import sha256_file

    files = json.loads((pack / MANIFEST).read_text())["files"]
    rewrite_manifest(out, files={**files, "README.md": sha256_file(out / "README.md")})
    return out
