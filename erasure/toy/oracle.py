"""The oracle: a small CNN that labels a 64x64 toy image with its shape, colour and style.

It is the project's stand-in for the ESD paper's ResNet-50 on Imagenette. It is trained on rendered images only
(never on a model's outputs), with blur / noise / colour-jitter / texture augmentation so that it also reads the
slightly soft, blotchy images a small diffusion model generates.

Example:
    >>> from erasure.toy.oracle import Oracle
    >>> oracle = Oracle.load()            # the shipped one
    >>> labels = oracle.classify(images)  # uint8 (N, 64, 64, 3) -> {"shape": [...], "color": [...], "style": [...]}
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .world import ATTRIBUTES, SIZE

ASSETS = Path(__file__).parent / "assets"


class OracleNet(nn.Module):
    def __init__(self, width: int = 16):
        super().__init__()

        def block(cin, cout):
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                nn.Conv2d(cout, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                nn.MaxPool2d(2),
            )

        w = width
        self.features = nn.Sequential(
            nn.Conv2d(3, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(inplace=True), nn.MaxPool2d(2),  # 32x32
            block(w, 2 * w),  # 16x16
            block(2 * w, 4 * w),  # 8x8
            block(4 * w, 8 * w),  # 4x4
        )
        self.heads = nn.ModuleDict(
            {attr: nn.Sequential(nn.Linear(16 * w, 64), nn.ReLU(inplace=True), nn.Linear(64, len(values)))
             for attr, values in ATTRIBUTES.items()}
        )

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        f = self.features(x)
        f = torch.cat([f.mean(dim=(2, 3)), f.amax(dim=(2, 3))], dim=1)
        return {attr: head(f) for attr, head in self.heads.items()}


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float (N, 3, H, W) in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255.0


class Oracle:
    def __init__(self, net: OracleNet, metrics: dict | None = None):
        self.net = net.eval()
        self.metrics = metrics or {}

    @classmethod
    def load(cls, directory: Path | str | None = None) -> "Oracle":
        from safetensors.torch import load_file

        directory = Path(directory) if directory else ASSETS / "oracle"
        config = json.loads((directory / "config.json").read_text())
        net = OracleNet(width=config["width"])
        net.load_state_dict(load_file(str(directory / "model.safetensors")))
        return cls(net, config.get("metrics"))

    def save(self, directory: Path, metrics: dict) -> None:
        from safetensors.torch import save_file

        directory.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.net.state_dict().items()}, str(directory / "model.safetensors"))
        config = {"width": self.net.heads["shape"][0].in_features // 16, "labels": ATTRIBUTES, "metrics": metrics}
        (directory / "config.json").write_text(json.dumps(config, indent=2))

    @torch.no_grad()
    def probabilities(self, images: np.ndarray, batch_size: int = 256) -> dict[str, np.ndarray]:
        """Per attribute, the (N, len(values)) softmax over its values (ATTRIBUTES order) for uint8 images
        (N, H, W, 3); images of another size are resized to 64x64 first."""
        out: dict[str, list[np.ndarray]] = {attr: [] for attr in ATTRIBUTES}
        for i in range(0, len(images), batch_size):
            x = to_tensor(images[i : i + batch_size])
            if x.shape[-1] != SIZE or x.shape[-2] != SIZE:
                x = F.interpolate(x, size=(SIZE, SIZE), mode="bilinear", antialias=True, align_corners=False)
            logits = self.net(x)
            for attr in ATTRIBUTES:
                out[attr].append(logits[attr].softmax(dim=1).numpy())
        return {attr: np.concatenate(parts) if parts else np.zeros((0, len(ATTRIBUTES[attr])), np.float32)
                for attr, parts in out.items()}

    def classify(self, images: np.ndarray, batch_size: int = 256) -> dict[str, list[str]]:
        """Label uint8 images (N, H, W, 3) with the most probable value of each attribute."""
        probs = self.probabilities(images, batch_size)
        return {attr: [ATTRIBUTES[attr][j] for j in p.argmax(axis=1).tolist()] for attr, p in probs.items()}


# ---------------------------------------------------------------------------------------------------------------
# Augmentation: what separates a clean render from a generated image.


def _gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    radius = max(1, int(round(2.5 * sigma)))
    k = torch.exp(-0.5 * (torch.arange(-radius, radius + 1, dtype=x.dtype) / sigma) ** 2)
    k = (k / k.sum()).to(x)
    c = x.shape[1]
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="replicate"), k.view(1, 1, 1, -1).repeat(c, 1, 1, 1), groups=c)
    return F.conv2d(F.pad(x, (0, 0, radius, radius), mode="replicate"), k.view(1, 1, -1, 1).repeat(c, 1, 1, 1), groups=c)


def augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    n = x.shape[0]

    def u(lo, hi, *shape):
        return lo + (hi - lo) * torch.rand(*shape, generator=g)

    # Blur a random subset with one of a few strengths.
    which = torch.randint(0, 4, (n,), generator=g)
    for level, sigma in ((1, 0.6), (2, 1.0), (3, 1.5)):
        idx = (which == level).nonzero().flatten()
        if len(idx):
            x[idx] = _gaussian_blur(x[idx], sigma)
    # Down-up resampling: the soft, slightly aliased look of a VAE decoder.
    idx = (torch.rand(n, generator=g) < 0.3).nonzero().flatten()
    if len(idx):
        small = F.interpolate(x[idx], size=(int(u(20, 40, 1)), ) * 2, mode="bilinear", antialias=True)
        x[idx] = F.interpolate(small, size=(SIZE, SIZE), mode="bilinear")
    # Colour jitter: brightness, contrast and a mild per-channel gain (not enough to change a colour's name).
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = (x - mean) * u(0.75, 1.25, n, 1, 1, 1) + mean * u(0.85, 1.15, n, 1, 1, 1)
    x = x * u(0.92, 1.08, n, 3, 1, 1)
    # Low-frequency blotches and pixel noise.
    blotch = F.interpolate(torch.randn(n, 3, 8, 8, generator=g), size=(SIZE, SIZE), mode="bicubic")
    x = x + blotch * u(0.0, 0.06, n, 1, 1, 1) + torch.randn(x.shape, generator=g) * u(0.0, 0.06, n, 1, 1, 1)
    return x.clamp(0, 1)


def train_oracle(steps: int = 1500, batch_size: int = 64, seed: int = 0, lr: float = 2e-3, progress=True):
    """Train a fresh oracle on renders; returns (Oracle, metrics on fresh clean renders)."""
    from tqdm.auto import tqdm

    from .world import random_scene, render

    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    net = OracleNet()
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    bar = tqdm(range(steps), desc="oracle", disable=not progress)
    for _ in bar:
        scenes = [random_scene(rng) for _ in range(batch_size)]
        x = to_tensor(np.stack([render(s, rng) for s in scenes]))
        keep_clean = torch.rand(batch_size, generator=g) < 0.2
        x = torch.where(keep_clean[:, None, None, None], x, augment(x.clone(), g))
        labels = torch.tensor([s.label() for s in scenes])
        logits = net(x)
        loss = sum(F.cross_entropy(logits[a], labels[:, i]) for i, a in enumerate(ATTRIBUTES))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    oracle = Oracle(net)
    return oracle, evaluate_oracle(oracle, seed=seed + 1000)


def evaluate_oracle(oracle: Oracle, n: int = 2000, seed: int = 1, augmented: bool = False) -> dict[str, float]:
    """Accuracy of each head on ``n`` fresh renders (optionally augmented)."""
    from .world import random_scene, render

    rng = np.random.default_rng(seed)
    scenes = [random_scene(rng) for _ in range(n)]
    images = np.stack([render(s, rng) for s in scenes])
    if augmented:
        x = augment(to_tensor(images), torch.Generator().manual_seed(seed))
        images = (x.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    pred = oracle.classify(images)
    return {
        attr: float(np.mean([p == getattr(s, attr) for p, s in zip(pred[attr], scenes)])) for attr in ATTRIBUTES
    }
