"""The toy world: procedural 64x64 images of one object (shape x colour x style) and their prompts.

It stands in for the real world in every default of the project: the base model is trained on it, the oracle
labels it, and concept packs erase its concepts. Rendering is numpy only and fully determined by a seed.

Example:
    >>> import numpy as np
    >>> from erasure.toy.world import Scene, render
    >>> img = render(Scene("star", "red", "striped"), np.random.default_rng(0))
    >>> img.shape, img.dtype
    ((64, 64, 3), dtype('uint8'))
"""

from __future__ import annotations

import dataclasses
import math
import re

import numpy as np

SIZE = 64
SHAPES = ("circle", "square", "triangle", "star", "cross")
COLORS = ("red", "green", "blue", "yellow", "purple")
STYLES = ("solid", "striped", "dotted", "outlined")
ATTRIBUTES = {"shape": SHAPES, "color": COLORS, "style": STYLES}

RGB = {
    "red": (220, 35, 35),
    "green": (35, 165, 55),
    "blue": (35, 70, 220),
    "yellow": (235, 205, 25),
    "purple": (140, 45, 175),
}

# Words a prompt may use for each concept. The first is the concept's name.
SYNONYMS = {
    "circle": ("circle", "disc", "disk"),
    "square": ("square", "box", "block"),
    "triangle": ("triangle", "wedge", "trigon"),
    "star": ("star", "five pointed star", "starlet"),
    "cross": ("cross", "plus sign", "plus"),
    "red": ("red", "crimson", "scarlet"),
    "green": ("green", "emerald", "lime"),
    "blue": ("blue", "azure", "cobalt"),
    "yellow": ("yellow", "golden", "lemon"),
    "purple": ("purple", "violet", "lilac"),
    # Style words are adjectives placed before the colour; solid objects carry no style word.
    "solid": ("",),
    "striped": ("striped", "stripy", "banded"),
    "dotted": ("dotted", "polka dot", "spotted"),
    "outlined": ("outlined", "hollow", "line drawn"),
}

# {obj} is "<style> <colour> <shape>" with synonyms drawn per prompt. Held-out templates are used by evaluation
# only: neither the base model's training nor any tuning sees them, so they measure paraphrase robustness.
TRAIN_TEMPLATES = (
    "a {obj}",
    "{obj}",
    "a picture of a {obj}",
    "an image of a {obj}",
    "a drawing of a {obj}",
    "a photo of a {obj}",
    "one {obj} on a plain background",
    "a simple {obj}",
)
HELDOUT_TEMPLATES = (
    "please draw a {obj} for me",
    "a small sketch showing a {obj}",
    "there is a {obj} in this picture",
)
TEMPLATE_SPLITS = {"train": TRAIN_TEMPLATES, "heldout": HELDOUT_TEMPLATES}


@dataclasses.dataclass(frozen=True)
class Scene:
    shape: str
    color: str
    style: str = "solid"

    def __post_init__(self):
        for attr, values in ATTRIBUTES.items():
            if getattr(self, attr) not in values:
                raise ValueError(f"unknown {attr} {getattr(self, attr)!r}; expected one of {values}")

    def label(self) -> tuple[int, int, int]:
        return SHAPES.index(self.shape), COLORS.index(self.color), STYLES.index(self.style)


def all_scenes() -> list[Scene]:
    return [Scene(s, c, st) for s in SHAPES for c in COLORS for st in STYLES]


def random_scene(rng: np.random.Generator) -> Scene:
    return Scene(SHAPES[rng.integers(5)], COLORS[rng.integers(5)], STYLES[rng.integers(4)])


def concept_attribute(concept: str) -> str:
    """Which attribute ("shape", "color" or "style") a concept name belongs to."""
    for attr, values in ATTRIBUTES.items():
        if concept in values:
            return attr
    raise ValueError(f"{concept!r} is not a toy concept; known: {sum(ATTRIBUTES.values(), ())}")


def prompt_for(scene: Scene, rng: np.random.Generator, split: str = "train", synonyms: bool = True) -> str:
    """A prompt describing ``scene`` from a template of ``split`` ("train" or "heldout")."""
    templates = TEMPLATE_SPLITS[split]
    pick = (lambda words: words[rng.integers(len(words))]) if synonyms else (lambda words: words[0])
    words = [pick(SYNONYMS[scene.style]), pick(SYNONYMS[scene.color]), pick(SYNONYMS[scene.shape])]
    return _fill(templates[rng.integers(len(templates))], words)


def _fill(template: str, words) -> str:
    prompt = template.format(obj=" ".join(w for w in words if w))
    return re.sub(r"\ba (?=[aeiou])", "an ", " ".join(prompt.split()))


def concept_prompt(concept: str, rng: np.random.Generator) -> tuple[str, str]:
    """A train-template prompt naming ``concept`` (by its name, never a synonym) in a random scene, and the same
    prompt with the concept left out: ("a dotted yellow circle", "a dotted yellow").

    These are the training prompts of ``erasure train --template toy``. Held-out templates and the concept's
    synonyms stay unseen, so the evaluation's held-out column still measures generalisation."""
    attr = concept_attribute(concept)
    scene = dataclasses.replace(random_scene(rng), **{attr: concept})
    words = {a: SYNONYMS[getattr(scene, a)][0] if a == attr else SYNONYMS[getattr(scene, a)][
        rng.integers(len(SYNONYMS[getattr(scene, a)]))] for a in ("style", "color", "shape")}
    template = TRAIN_TEMPLATES[rng.integers(len(TRAIN_TEMPLATES))]
    return _fill(template, words.values()), _fill(template, [w for a, w in words.items() if a != attr])


def vocabulary() -> list[str]:
    """Every word the toy prompts can contain (the tokenizer's whole-word vocabulary)."""
    words = set()
    for text in list(TRAIN_TEMPLATES) + list(HELDOUT_TEMPLATES) + [w for ws in SYNONYMS.values() for w in ws]:
        words.update(text.replace("{obj}", " ").split())
    words.update({"a", "an"})
    return sorted(words)


# ---------------------------------------------------------------------------------------------------------------
# Rendering. Shapes are rasterised at 2x and box-filtered down, so edges are anti-aliased.

_SS = 2
_GRID = (np.mgrid[0 : SIZE * _SS, 0 : SIZE * _SS][::-1].astype(np.float32) + 0.5) / _SS  # x, y in pixels


def _polygon_mask(x, y, verts):
    """Even-odd rule point-in-polygon for arrays of points."""
    inside = np.zeros(x.shape, dtype=bool)
    n = len(verts)
    for i in range(n):
        x1, y1 = verts[i]
        x2, y2 = verts[(i + 1) % n]
        crosses = (y1 > y) != (y2 > y)
        with np.errstate(divide="ignore", invalid="ignore"):
            xint = x1 + (y - y1) * (x2 - x1) / (y2 - y1)
        inside ^= crosses & (x < xint)
    return inside


def _shape_mask(shape: str, cx: float, cy: float, r: float, angle: float, shrink: float = 0.0):
    """Boolean mask (supersampled) of ``shape`` with circumradius ``r``; ``shrink`` insets it by that many pixels."""
    x, y = _GRID
    if shape == "circle":
        return (x - cx) ** 2 + (y - cy) ** 2 <= (r - shrink) ** 2

    def rot(points):
        c, s = math.cos(angle), math.sin(angle)
        return [(cx + px * c - py * s, cy + px * s + py * c) for px, py in points]

    if shape == "square":
        h = r / math.sqrt(2) - shrink
        verts = [(-h, -h), (h, -h), (h, h), (-h, h)]
    elif shape == "triangle":
        rr = r - 2 * shrink  # the inradius is r/2, so insetting by d shrinks the circumradius by 2d
        verts = [(rr * math.cos(a), rr * math.sin(a)) for a in (-math.pi / 2 + k * 2 * math.pi / 3 for k in range(3))]
    elif shape == "star":
        outer, inner = r - 2.2 * shrink, 0.45 * r - 1.2 * shrink
        verts = []
        for k in range(10):
            a = -math.pi / 2 + k * math.pi / 5
            rad = outer if k % 2 == 0 else inner
            verts.append((rad * math.cos(a), rad * math.sin(a)))
    elif shape == "cross":
        a, b = r * 0.92 - shrink, r * 0.32 - shrink
        verts = [(-b, -a), (b, -a), (b, -b), (a, -b), (a, b), (b, b), (b, a), (-b, a), (-b, b), (-a, b), (-a, -b), (-b, -b)]
    else:  # pragma: no cover - Scene validates
        raise ValueError(shape)
    return _polygon_mask(x, y, rot(verts))


def _downsample(mask: np.ndarray) -> np.ndarray:
    m = mask.astype(np.float32)
    return m.reshape(SIZE, _SS, SIZE, _SS).mean(axis=(1, 3))


def render(scene: Scene, rng: np.random.Generator) -> np.ndarray:
    """Render ``scene`` at a random position, size and rotation; returns a uint8 HxWx3 array."""
    r = rng.uniform(15.0, 24.0)
    cx, cy = rng.uniform(r + 2, SIZE - r - 2, size=2)
    angle = rng.uniform(-0.35, 0.35)  # small tilts keep every shape recognisable (a 45-degree square is a diamond)
    background = np.full(3, rng.uniform(225, 250), dtype=np.float32) + rng.uniform(-6, 6, size=3)
    colour = np.clip(np.array(RGB[scene.color], np.float32) + rng.uniform(-18, 18, size=3), 0, 255)

    outer = _shape_mask(scene.shape, cx, cy, r, angle)
    if scene.style == "solid":
        ink = outer
    else:
        border = 3.0 if scene.style == "outlined" else 2.0
        ring = outer & ~_shape_mask(scene.shape, cx, cy, r, angle, shrink=border)
        if scene.style == "outlined":
            ink = ring
        elif scene.style == "striped":
            x, y = _GRID
            theta = angle + math.pi / 4 + rng.uniform(-0.3, 0.3)
            u = (x - cx) * math.cos(theta) + (y - cy) * math.sin(theta)
            ink = ring | (outer & (np.mod(u, 7.0) < 3.5))
        else:  # dotted
            x, y = _GRID
            ox, oy = rng.uniform(0, 7, size=2)
            dx, dy = np.mod(x - ox, 7.0) - 3.5, np.mod(y - oy, 7.0) - 3.5
            ink = ring | (outer & (dx * dx + dy * dy <= 2.0**2))
    alpha = _downsample(ink)[..., None]
    img = background * (1 - alpha) + colour * alpha
    return np.clip(img + rng.normal(0, 1.5, size=img.shape), 0, 255).round().astype(np.uint8)


def render_batch(scenes: list[Scene], rng: np.random.Generator) -> np.ndarray:
    return np.stack([render(s, rng) for s in scenes])


def preview_prompts(concepts: list[str]) -> list[str]:
    """A pack's preview prompts on the toy world: three scenes showing the first concept, two showing none."""
    attr = concept_attribute(concepts[0])

    def words(s: Scene) -> str:
        return " ".join(w for w in (SYNONYMS[s.style][0], s.color, s.shape) if w)

    scenes = all_scenes()
    np.random.default_rng(0).shuffle(scenes)
    hits = [s for s in scenes if getattr(s, attr) == concepts[0]][:3]
    controls = [s for s in scenes if not set(concepts) & {s.shape, s.color, s.style}][:2]
    return [f"a {words(s)}" for s in hits + controls]
