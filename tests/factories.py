"""Models and packs for tests, in one place. Nothing here is trained: pack deltas are random, but their base
fingerprint is the real one, so verification behaves exactly as in use."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from erasure.config import ESDConfig
from erasure.pack import MANIFEST, PACK_FILES, BaseRef, ConceptPack, fingerprint


def tiny_unet(seed: int = 0):
    """A UNet2DConditionModel of SD's layout (cross-attention in down, mid and up blocks) at a few kB."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=8, attention_head_dim=2, norm_num_groups=4,
    )


def random_toy_pipe(tmp_dir: Path, seed: int = 0):
    """The toy architecture with random weights: instant, for tests of mechanics (not of image quality)."""
    from diffusers import StableDiffusionPipeline

    from erasure.toy import models
    from erasure.toy.tokenizer import build_tokenizer_files, load_tokenizer

    torch.manual_seed(seed)
    tokenizer = load_tokenizer(build_tokenizer_files(Path(tmp_dir) / "tokenizer"))
    pipe = StableDiffusionPipeline(
        vae=models.make_vae(), text_encoder=models.make_text_encoder(tokenizer), tokenizer=tokenizer,
        unet=models.make_unet(), scheduler=models.make_scheduler(), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def touched_names(unet, method: str) -> list[str]:
    params = dict(unet.named_parameters())
    return [n for n in params if method == "esd-all" or ("attn2" in n) == method.startswith("esd-x")]


def make_pack(out: Path | None, unet, name: str = "circle", concepts=("circle",), method: str = "esd-x",
              seed: int = 0, magnitude: float = 1e-2, delta: dict[str, torch.Tensor] | None = None,
              base_id: str = "test/base", other_base: bool = False) -> ConceptPack:
    """A pack for ``unet``: random deltas on the tensors ``method`` touches (or ``delta`` as given), saved to
    ``out`` when given. ``other_base``: fingerprinted against other weights of the same architecture."""
    from PIL import Image

    params = dict(unet.named_parameters())
    if delta is None:
        g = torch.Generator().manual_seed(1000 + seed)
        delta = {n: torch.randn(params[n].shape, generator=g) * magnitude for n in touched_names(unet, method)}
    base_values = {n: params[n].detach() + 1e-3 for n in delta} if other_base else params
    names = [n for n in delta if n in base_values]
    training = ESDConfig(concepts=list(concepts), method=method, iterations=1, seed=seed, ddim_steps=4)
    base = BaseRef(id="other/base" if other_base else base_id, fingerprint=fingerprint(base_values, names))
    pack = ConceptPack.from_delta(name, training, base, delta, Image.new("RGB", (16, 8), (seed * 40 % 256, 80, 9)))
    if out is not None:
        pack.save_pretrained(out)
    return pack


def rewrite_manifest(pack_dir: Path, **changes) -> None:
    """Edit pack.json in place (e.g. a wrong sha256), bypassing save_pretrained's hashing."""
    m = json.loads((pack_dir / MANIFEST).read_text())
    m.update(changes)
    (pack_dir / MANIFEST).write_text(json.dumps(m, indent=2))


def read_files(d: Path) -> dict[str, bytes]:
    return {name: (Path(d) / name).read_bytes() for name in PACK_FILES}


def leftovers(parent: Path, name: str) -> list[str]:
    """Temporary siblings a pull into parent/name may have left behind."""
    return sorted(p.name for p in Path(parent).iterdir() if p.name.startswith(f".{name}."))


def recard(pack_dir: Path, out: Path, note: str = "\nRevised card.\n") -> Path:
    """A copy of the pack with only its card (README.md, and so pack.json) changed: same delta and preview bytes."""
    import shutil

    from erasure.files import sha256_file

    shutil.copytree(pack_dir, out)
    with open(out / "README.md", "a") as f:
        f.write(note)
    files = json.loads((pack_dir / MANIFEST).read_text())["files"]
    rewrite_manifest(out, files={**files, "README.md": sha256_file(out / "README.md")})
    return out


def pack_dir(out: Path, unet, method: str = "esd-all", magnitude: float = 1e-3, **kwargs) -> Path:
    """``make_pack`` saved to ``out`` (every tensor touched by default, ~200 kB); returns the directory."""
    make_pack(out, unet, method=method, magnitude=magnitude, **kwargs)
    return Path(out)
