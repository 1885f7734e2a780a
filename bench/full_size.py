"""Full-size figures on this machine: SD 1.5 (860 M UNet) and SDXL (2.6 B) with random weights built from their
published configs (nothing is downloaded). Prints JSON; each part runs in its own process so its peak RSS is its
own. Run under the shared lock (it needs up to ~20 GiB):

    flock /work/helpers/heavy.lock python bench/full_size.py --arch sd15 [--work build/full] [--threads 2]
    flock /work/helpers/heavy.lock python bench/full_size.py --arch sdxl --dtype bfloat16

Parts (``--part``, default all):
    sizes     parameters touched, pack MB per method and delta dtype, MB per pack set: exact shapes from the UNet
              built on the meta device (seconds, no memory, no lock needed)
    build     the random-weight pipeline, saved as a diffusers directory (the load below reads it back)
    base      load time and peak RSS (`load_base`), parameters per method, base fingerprint s per method, pack MB
              per method and delta dtype (esd-x packs written; esd-u from the same size formula, checked against
              the written ones), compose s and the extra MB one pack set's UNet holds in the service
    train-*   one ESD trainer (esd-x / esd-u): set-up, one pool refresh (sampling), optimizer steps: s and peak RSS
              at ``--resolution`` (default 128 px: a 16x16 latent)

The training parts build the UNet from its config in the base's dtype directly (the load is measured by ``base``).
Peak RSS is VmHWM, reset (/proc/self/clear_refs) after the model is in memory, so a training figure is the
trainer's own peak with the model resident, not the loader's.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

GIB, MB = 2**30, 1e6

# --- published configs (diffusers config.json of each component, defaults omitted) ---------------------------------

SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                 prediction_type="epsilon", clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                 timestep_spacing="leading")
CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768)
CLIP_BIGG = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                 num_attention_heads=20, max_position_embeddings=77, hidden_act="gelu", projection_dim=1280)
VAE = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, norm_num_groups=32,
           block_out_channels=[128, 256, 512, 512], down_block_types=["DownEncoderBlock2D"] * 4,
           up_block_types=["UpDecoderBlock2D"] * 4)
ARCHS = {
    "sd15": {  # runwayml/stable-diffusion-v1-5
        "unet": dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                     block_out_channels=[320, 640, 1280, 1280], cross_attention_dim=768, attention_head_dim=8,
                     down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
                     up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3),
        "vae": dict(VAE, sample_size=512, scaling_factor=0.18215),
        "text_encoders": [CLIP_L],
    },
    "sdxl": {  # stabilityai/stable-diffusion-xl-base-1.0
        "unet": dict(sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
                     block_out_channels=[320, 640, 1280], cross_attention_dim=2048, attention_head_dim=[5, 10, 20],
                     transformer_layers_per_block=[1, 2, 10], use_linear_projection=True,
                     down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                     up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
                     addition_embed_type="text_time", addition_time_embed_dim=256,
                     projection_class_embeddings_input_dim=2816),
        "vae": dict(VAE, sample_size=1024, scaling_factor=0.13025, force_upcast=True),
        "text_encoders": [CLIP_L, CLIP_BIGG],
    },
}
METHODS = ("esd-x", "esd-x-strict", "esd-u", "esd-all")


def peak_rss_gib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024 / GIB
    return float("nan")


def reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := current RSS (Linux >= 4.0)


def tokenizer(work: Path):
    from transformers import CLIPTokenizer

    from erasure.toy.tokenizer import build_tokenizer_files

    return CLIPTokenizer.from_pretrained(str(build_tokenizer_files(work / "tokenizer")), model_max_length=77)


def unet_from_config(arch: str):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(**ARCHS[arch]["unet"])


def build_pipeline(arch: str, work: Path, dtype: torch.dtype):
    """The pipeline with random weights, each component cast to ``dtype`` as soon as it is built."""
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        EulerDiscreteScheduler,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(0)
    tok = tokenizer(work)
    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    spec = ARCHS[arch]
    encoders = [CLIPTextModel(CLIPTextConfig(**spec["text_encoders"][0], **ids)).to(dtype)]
    if arch == "sdxl":
        encoders.append(CLIPTextModelWithProjection(CLIPTextConfig(**spec["text_encoders"][1], **ids)).to(dtype))
    unet, vae = unet_from_config(arch).to(dtype), AutoencoderKL(**spec["vae"]).to(dtype)
    if arch == "sd15":
        return StableDiffusionPipeline(vae=vae, text_encoder=encoders[0], tokenizer=tok, unet=unet,
                                       scheduler=DDIMScheduler(**SCHEDULER), safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False)
    return StableDiffusionXLPipeline(vae=vae, text_encoder=encoders[0], text_encoder_2=encoders[1], tokenizer=tok,
                                     tokenizer_2=tok, unet=unet, scheduler=EulerDiscreteScheduler(**{
                                         k: v for k, v in SCHEDULER.items() if k not in ("clip_sample", "set_alpha_to_one")}))


# --- parts ---------------------------------------------------------------------------------------------------------


def part_build(args) -> dict:
    t0 = time.perf_counter()
    pipe = build_pipeline(args.arch, args.work, getattr(torch, args.dtype))
    built = time.perf_counter() - t0
    pipe.save_pretrained(args.work / args.arch)
    size = sum(f.stat().st_size for f in (args.work / args.arch).rglob("*") if f.is_file())
    return {"build_s": round(built, 1), "save_s": round(time.perf_counter() - t0 - built, 1),
            "pipeline_dir_gb": round(size / 1e9, 2),
            "parameters_m": {name: round(sum(p.numel() for p in m.parameters()) / 1e6, 1)
                             for name, m in pipe.components.items() if isinstance(m, torch.nn.Module)}}


def safetensors_bytes(shapes: dict[str, tuple], itemsize: int, dtype: str) -> int:
    """Size of the safetensors file of these tensors: 8 + the JSON header (padded to 8 bytes) + the data."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name in sorted(shapes):
        size = math.prod(shapes[name]) * itemsize
        header[name] = {"dtype": dtype, "shape": list(shapes[name]), "data_offsets": [offset, offset + size]}
        offset += size
    text = len(json.dumps(header, separators=(",", ":")))
    return 8 + text + (-text) % 8 + offset


def part_sizes(args) -> dict:
    """Parameters touched and pack / pack-set sizes per method, from the UNet built on the meta device (exact
    shapes, no memory: runs anywhere in seconds)."""
    from diffusers import UNet2DConditionModel

    from erasure.training.methods import select_parameters

    with torch.device("meta"):
        unet = UNet2DConditionModel(**ARCHS[args.arch]["unet"])
    state = dict(unet.named_parameters())
    total = sum(p.numel() for p in state.values())
    out = {"unet_parameters_m": round(total / 1e6, 1), "methods": {}}
    for method in METHODS:
        names = select_parameters(unet, method)
        numel = sum(state[n].numel() for n in names)
        shapes = {n: tuple(state[n].shape) for n in names}
        out["methods"][method] = {
            "tensors": len(names), "parameters_m": round(numel / 1e6, 1), "share_of_unet": round(numel / total, 3),
            "pack_mb": {d: round(safetensors_bytes(shapes, size, code) / MB, 1)
                        for d, size, code in (("float32", 4, "F32"), ("float16", 2, "F16"), ("bfloat16", 2, "BF16"))},
            # a pack set's UNet holds its touched tensors in the model dtype; everything else is the base's
            "pack_set_mb": {"float32_base": round(numel * 4 / MB, 1), "half_base": round(numel * 2 / MB, 1)}}
    return out


def part_base(args) -> dict:
    from erasure.base.loading import load_base
    from erasure.pack.compose import compose_denoiser
    from erasure.pack.concept_pack import BaseWeights, ConceptPack
    from erasure.pack.manifest import BaseRef
    from erasure.training.config import ESDConfig
    from erasure.training.methods import select_parameters

    dtype = getattr(torch, args.dtype)
    t0 = time.perf_counter()
    loaded = load_base(args.work / args.arch, dtype=dtype)
    out = {"load_s": round(time.perf_counter() - t0, 1), "load_peak_rss_gib": round(peak_rss_gib(), 2)}
    unet = loaded.pipe.unet
    out["unet_parameters_m"] = round(sum(p.numel() for p in unet.parameters()) / 1e6, 1)
    base = BaseWeights(unet)
    state = base.state
    out["methods"] = {}
    for method in METHODS:
        names = select_parameters(unet, method)
        numel = sum(state[n].numel() for n in names)
        t0 = time.perf_counter()
        base.fingerprint(names)
        row = {"tensors": len(names), "parameters_m": round(numel / 1e6, 1),
               "share_of_unet": round(numel / sum(p.numel() for p in unet.parameters()), 3),
               "fingerprint_s": round(time.perf_counter() - t0, 2),
               "pack_mb": {d: round(safetensors_bytes({n: tuple(state[n].shape) for n in names}, size, code) / MB, 1)
                           for d, size, code in (("float32", 4, "F32"), ("float16", 2, "F16"), ("bfloat16", 2, "BF16"))},
               # the service's pack-set UNet holds the touched tensors in the model dtype; the rest is shared
               "pack_set_mb": round(numel * unet.dtype.itemsize / MB, 1)}
        out["methods"][method] = row
    # real packs: the size formula against written files, compose time, and the service's extra memory
    g = torch.Generator().manual_seed(0)
    for method in ("esd-x", "esd-u"):
        names = select_parameters(unet, method)
        delta = {n: (torch.randn(state[n].shape, generator=g) * 1e-3).half() for n in names}
        ref = BaseRef(id=f"random/{args.arch}", fingerprint=base.fingerprint(names), family=loaded.family,
                      dtype=args.dtype)
        pack = ConceptPack.from_delta(method, ESDConfig(concepts=["x"], method=method), ref, delta, b"")
        row = out["methods"][method]
        if method == "esd-x":
            path = pack.save_pretrained(args.work / f"{args.arch}-pack-{method}")
            row["written_float16_delta_mb"] = round((path / "delta.safetensors").stat().st_size / MB, 1)
        rss = peak_rss_gib()
        t0 = time.perf_counter()
        composed = compose_denoiser(base, [(pack, 1.0)])
        row["compose_s"] = round(time.perf_counter() - t0, 2)
        shared = {p.data_ptr() for p in state.values()}
        row["pack_set_extra_mb_measured"] = round(sum(p.numel() * p.element_size() for p in composed.parameters()
                                                      if p.data_ptr() not in shared) / MB, 1)
        row["compose_peak_rss_growth_gib"] = round(peak_rss_gib() - rss, 2)
        del composed, pack, delta
    return out


def available_gib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024 / GIB
    return float("inf")


def training_estimate_gib(arch: str, method: str, dtype: torch.dtype) -> float:
    """The model in ``dtype`` + 16 bytes per trained parameter (float32 master, gradient, Adam's two moments)."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from erasure.training.methods import select_parameters

    with torch.device("meta"):
        unet = UNet2DConditionModel(**ARCHS[arch]["unet"])
        text = sum(sum(p.numel() for p in CLIPTextModel(CLIPTextConfig(**c)).parameters())
                   for c in ARCHS[arch]["text_encoders"])
    state = dict(unet.named_parameters())
    trained = sum(state[n].numel() for n in select_parameters(unet, method))
    return ((sum(p.numel() for p in state.values()) + text) * dtype.itemsize + 16 * trained) / GIB


def part_train(args, method: str) -> dict:
    from erasure.training.config import ESDConfig
    from erasure.training.trainer import ESDTrainer

    dtype = getattr(torch, args.dtype)
    estimate, available = training_estimate_gib(args.arch, method, dtype), available_gib()
    if estimate > available - 1:
        return {"method": method, "dtype": args.dtype, "not_run": f"estimated {estimate:.1f} GiB (model + 16 B per "
                f"trained parameter) > {available:.1f} GiB available", "estimate_gib": round(estimate, 1)}
    pipe = build_pipeline(args.arch, args.work, dtype)  # random weights straight in the dtype: no loader peak
    del pipe.vae  # training never decodes
    resident = peak_rss_gib()
    reset_peak()
    cfg = ESDConfig(concepts=["a dog"], method=method, iterations=args.steps + 1, resolution=args.resolution,
                    ddim_steps=args.ddim_steps, pool_trajectories=1, batch_size=1, refresh_every=1000,
                    gradient_checkpointing=not args.no_checkpointing, lr=1e-5)
    t0 = time.perf_counter()
    trainer = ESDTrainer(pipe, cfg, progress=False)
    setup = time.perf_counter() - t0
    t0 = time.perf_counter()
    trainer.step()  # the first step also samples the pool: ddim_steps guided passes at batch 2 (c0 and c)
    first = time.perf_counter() - t0
    steps = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        trainer.step()
        steps.append(time.perf_counter() - t0)
    step = sorted(steps)[len(steps) // 2]
    trained = sum(p.numel() for p in trainer.trainable.values())
    return {"method": method, "dtype": args.dtype, "resolution": args.resolution,
            "latent": args.resolution // pipe.vae_scale_factor, "gradient_checkpointing": cfg.gradient_checkpointing,
            "trained_parameters_m": round(trained / 1e6, 1), "model_resident_gib": round(resident, 2),
            "setup_s": round(setup, 1), "sampling_pass_s": round((first - step) / args.ddim_steps, 2),
            "step_s": round(step, 2), "steps_timed": len(steps),
            "reference_iteration_s_at_50_ddim_steps": round(step + 25 * (first - step) / args.ddim_steps, 1),
            "train_peak_rss_gib": round(peak_rss_gib(), 2), "estimate_gib": round(estimate, 1), "loss_finite": all(map(math.isfinite, trainer.losses))}


def run_part(args, part: str) -> dict:
    """``part`` in a child process (its own peak RSS); returns its JSON."""
    cmd = [sys.executable, __file__, "--arch", args.arch, "--dtype", args.dtype, "--work", str(args.work),
           "--threads", str(args.threads), "--resolution", str(args.resolution), "--ddim-steps", str(args.ddim_steps),
           "--steps", str(args.steps), "--part", part, "--child"] + (["--no-checkpointing"] if args.no_checkpointing
                                                                     else [])
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        return {"part": part, "error": proc.stderr.strip().splitlines()[-1:], "rc": proc.returncode,
                "wall_s": round(time.perf_counter() - t0, 1)}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", choices=sorted(ARCHS), required=True)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--work", type=Path, default=Path("build/full"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--resolution", type=int, default=128, help="training image size in pixels (default 128)")
    ap.add_argument("--ddim-steps", type=int, default=2, help="sampling steps of the one pool refresh timed")
    ap.add_argument("--steps", type=int, default=2, help="optimizer steps timed after the first")
    ap.add_argument("--no-checkpointing", action="store_true")
    ap.add_argument("--part", default="all", choices=["all", "sizes", "build", "base", "train-esd-x", "train-esd-u"])
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    if args.child:
        part = {"build": part_build, "base": part_base, "sizes": part_sizes}.get(args.part)
        result = part(args) if part else part_train(args, args.part.removeprefix("train-"))
        print(json.dumps(result))
        return
    parts = ["sizes", "build", "base", "train-esd-x", "train-esd-u"] if args.part == "all" else [args.part]
    if args.part == "all" and (args.work / args.arch / "model_index.json").exists():
        parts.remove("build")
    report = {"arch": args.arch, "dtype": args.dtype, "threads": args.threads, "cpu": platform.processor() or
              platform.machine(), "torch": torch.__version__}
    for part in parts:
        report[part] = run_part(args, part)
        print(json.dumps({part: report[part]}), file=sys.stderr, flush=True)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
