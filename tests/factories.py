"""Models and packs for tests, in one place. Nothing here is trained: pack deltas are random, but their base
fingerprint is the real one, so verification behaves exactly as in use."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from erasure.pack.concept_pack import ConceptPack, fingerprint
from erasure.pack.manifest import MANIFEST, PACK_FILES, BaseRef
from erasure.training.config import ESDConfig


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
              base_id: str = "test/base", other_base: bool = False, redteam=None) -> ConceptPack:
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
    pack.manifest.redteam = redteam
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


# --- architecture-true tiny pipelines: SD 1.x / 2.x / XL block layouts at a few hundred kB ------------------------
#
# Each keeps its family's structure (block types and order, transformer layers per block, linear projections,
# text encoders, added conditioning, prediction type) at a width that runs a denoising step in milliseconds.
# The tokenizer is the toy one (built offline); prompts outside its vocabulary still tokenize, letter by letter.

def _tiny_tokenizer(tmp_dir: Path):
    from erasure.toy.tokenizer import build_tokenizer_files, load_tokenizer

    return load_tokenizer(build_tokenizer_files(Path(tmp_dir) / "tokenizer"))


def _tiny_clip(tokenizer, width: int, projection_dim: int | None = None):
    """A 2-layer CLIP text encoder; with ``projection_dim``, the projected variant SDXL's second encoder is."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=tokenizer.model_max_length,
        projection_dim=projection_dim or width, hidden_act="gelu", bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return CLIPTextModelWithProjection(config) if projection_dim else CLIPTextModel(config)


def _tiny_vae(sample_size: int = 64, scaling_factor: float = 0.18215):
    """SD's VAE layout (4 levels: 8x down-sampling) at width 8."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
        latent_channels=4, norm_num_groups=4, sample_size=sample_size, scaling_factor=scaling_factor)


def tiny_sd_pipe(tmp_dir: Path, version: int = 2, seed: int = 0):
    """SD 1.x (``version=1``) or 2.x: SD's 4-level UNet (3 cross-attention down blocks, 2 layers per block) and one
    CLIP text encoder. SD 2.x: linear projections in the transformers, per-level head counts, a wider text
    encoder and a v-prediction scheduler; SD 1.x: conv projections, one head count, epsilon-prediction."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    torch.manual_seed(seed)
    tokenizer = _tiny_tokenizer(tmp_dir)
    text_width = 16 if version == 2 else 12
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(8, 16, 32, 32),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        attention_head_dim=(2, 4, 8, 8) if version == 2 else 2, use_linear_projection=version == 2,
        cross_attention_dim=text_width, norm_num_groups=4)
    scheduler = DDIMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        prediction_type="v_prediction" if version == 2 else "epsilon", clip_sample=False, set_alpha_to_one=False,
        steps_offset=1, timestep_spacing="leading")
    pipe = StableDiffusionPipeline(
        vae=_tiny_vae(), text_encoder=_tiny_clip(tokenizer, text_width), tokenizer=tokenizer, unet=unet,
        scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_sd1_pipe(tmp_dir: Path, seed: int = 0):
    return tiny_sd_pipe(tmp_dir, version=1, seed=seed)


def tiny_sd2_pipe(tmp_dir: Path, seed: int = 0):
    return tiny_sd_pipe(tmp_dir, version=2, seed=seed)


def tiny_sdxl_pipe(tmp_dir: Path, seed: int = 0):
    """SDXL: the 3-level UNet (no attention at the top level, 1 / 2 / 3 transformer layers per block where SDXL
    has 1 / 2 / 10), ``text_time`` added conditioning, two CLIP text encoders (the second with a projection, whose
    pooled output is ``text_embeds``), cross-attention over both encoders' hidden states concatenated, an Euler
    scheduler, ``force_zeros_for_empty_prompt`` as SDXL ships."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    torch.manual_seed(seed)
    tokenizer = _tiny_tokenizer(tmp_dir)
    text_encoder, text_encoder_2 = _tiny_clip(tokenizer, 16), _tiny_clip(tokenizer, 24, projection_dim=12)
    time_dim = 8
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(8, 16, 32),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 3), attention_head_dim=(2, 4, 8), use_linear_projection=True,
        cross_attention_dim=16 + 24, addition_embed_type="text_time", addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=12 + 6 * time_dim, norm_num_groups=4)
    scheduler = EulerDiscreteScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        prediction_type="epsilon", steps_offset=1, timestep_spacing="leading")
    pipe = StableDiffusionXLPipeline(
        vae=_tiny_vae(scaling_factor=0.13025), text_encoder=text_encoder, text_encoder_2=text_encoder_2,
        tokenizer=tokenizer, tokenizer_2=_tiny_tokenizer(Path(tmp_dir) / "2"), unet=unet, scheduler=scheduler,
        force_zeros_for_empty_prompt=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_dit_pipe():
    """A transformer-based pipeline (DiT): not SD-family, for the refusals."""
    from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline, DiTTransformer2DModel

    transformer = DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=4, in_channels=4, out_channels=8, num_layers=1, sample_size=8,
        patch_size=2, num_embeds_ada_norm=10, norm_num_groups=4)
    vae = AutoencoderKL(block_out_channels=(8,), norm_num_groups=4, latent_channels=4)
    return DiTPipeline(transformer=transformer, vae=vae, scheduler=DDIMScheduler())


def redteam_record(asr: dict[str, float], concept: str = "circle", prompt: str | None = None,
                   base_rate: dict[str, float] | None = None, **config):
    """A red-team record with these attack success rates (what `erasure attack --record` writes), for tests of
    what reads it; figures are given, not measured. Every family's attack is ``prompt`` (default "a CONCEPT"); the
    base's rate on it is ``base_rate[family]`` (default 1.0)."""
    base_rate = {f: (base_rate or {}).get(f, 1.0) for f in asr}
    import datetime as dt

    from erasure.redteam.config import AttackConfig
    from erasure.redteam.record import AttackFigure, RedTeamRecord

    results = [AttackFigure(family=f, concept=concept, asr=a, base_rate=base_rate[f], calibration=1.0, n=64,
                            attack={"prompt": prompt or f"a {concept}"}, candidates=64, seconds=1.0)
               for f, a in asr.items()]
    return RedTeamRecord(attack_version=1, judge="toy-oracle", config=AttackConfig(**config), asr=dict(asr),
                         base_rate=base_rate, results=results, seconds=1.0,
                         created_at=dt.datetime(2026, 12, 1, tzinfo=dt.timezone.utc))
