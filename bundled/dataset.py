"""A procedural, seeded dataset of small captioned RGB images: coloured shapes on plain or textured backgrounds.

Everything is pure torch and deterministic given a seed: ``sample_scenes``
draws scene descriptions, ``render`` turns them into images (anti-aliased
signed-distance shapes) and ``caption`` into text from a fixed vocabulary.
``make_batch`` does all three and also returns the ground truth the adherence
scorer is checked against.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import Tensor

__all__ = ["SHAPES", "COLOURS", "SIZES", "POSITIONS", "BACKGROUNDS", "BG_TONES", "VOCABULARY", "ShapeSpec",
           "Scene", "sample_scenes", "render", "caption", "make_batch", "parse_prompt", "scene_from_prompt"]

SHAPES = ("circle", "square", "triangle", "cross")
COLOURS = {
    "red": (0.90, 0.12, 0.10),
    "green": (0.15, 0.72, 0.20),
    "blue": (0.15, 0.30, 0.95),
    "yellow": (0.95, 0.88, 0.12),
    "purple": (0.58, 0.20, 0.80),
    "orange": (1.00, 0.55, 0.05),
    "cyan": (0.10, 0.85, 0.88),
    "white": (0.96, 0.96, 0.96),
}
# half-extent of a shape, as a fraction of the image side
SIZES = {"small": 0.15, "medium": 0.23, "large": 0.32}
# target centre (x, y) as a fraction of the image side; clipped so that the shape stays inside
POSITIONS = {"left": (0.25, 0.5), "right": (0.75, 0.5), "top": (0.5, 0.25), "bottom": (0.5, 0.75),
             "center": (0.5, 0.5)}
BACKGROUNDS = ("plain", "textured")
# muted, dark background tones, so that every shape colour stands out
BG_TONES = ((0.10, 0.10, 0.12), (0.22, 0.26, 0.32), (0.28, 0.22, 0.17), (0.36, 0.36, 0.36))

_FUNCTION_WORDS = ("a", "an", "the", "on", "at", "in", "and", "of", "with", "background", "shape", "image",
                   "picture", "photo")
VOCABULARY = tuple(dict.fromkeys(_FUNCTION_WORDS + SHAPES + tuple(COLOURS) + tuple(SIZES) + tuple(POSITIONS)
                                 + BACKGROUNDS))
SYNONYMS = {"centre": "center", "middle": "center", "big": "large", "tiny": "small", "grey": "white",
            "violet": "purple", "rectangle": "square", "textures": "textured", "texture": "textured"}


@dataclass(frozen=True)
class ShapeSpec:
    """One object of a scene: its shape, colour, size and position names and its exact geometry."""

    shape: str
    colour: str
    size: str
    position: str
    cx: float   # centre, fraction of the width
    cy: float   # centre, fraction of the height
    radius: float   # half-extent, fraction of the side


@dataclass(frozen=True)
class Scene:
    """A scene: one or two objects on a background (plain or textured, one of ``BG_TONES``)."""

    objects: tuple
    background: str
    tone: int
    pattern: int = 0        # texture kind: 0 stripes, 1 checks, 2 noise
    texture_seed: int = 0


def _place(rng: random.Random, size: str, position: str) -> tuple:
    # small jitter only: a caption then pins the image down closely, so that the shape word has a strong effect
    radius = SIZES[size] * rng.uniform(0.95, 1.05)
    tx, ty = POSITIONS[position]
    margin = radius + 0.04
    cx = min(max(tx + rng.uniform(-0.025, 0.025), margin), 1 - margin)
    cy = min(max(ty + rng.uniform(-0.025, 0.025), margin), 1 - margin)
    return cx, cy, radius


def _random_object(rng: random.Random, shape=None, colour=None, size=None, position=None) -> ShapeSpec:
    shape = shape or rng.choice(SHAPES)
    colour = colour or rng.choice(tuple(COLOURS))
    size = size or rng.choice(tuple(SIZES))
    position = position or rng.choice(tuple(POSITIONS))
    cx, cy, radius = _place(rng, size, position)
    return ShapeSpec(shape, colour, size, position, cx, cy, radius)


_OPPOSITE = {"left": "right", "right": "left", "top": "bottom", "bottom": "top"}


def _random_scene(rng: random.Random, two_shape_prob: float) -> Scene:
    first = _random_object(rng)
    objects = (first,)
    if rng.random() < two_shape_prob:
        # two objects: small or medium, on opposite sides so that they do not overlap
        side = rng.choice(("left", "top"))
        a = _random_object(rng, size=rng.choice(("small", "medium")), position=side)
        b = _random_object(rng, size=rng.choice(("small", "medium")), position=_OPPOSITE[side])
        objects = (a, b)
    background = "textured" if rng.random() < 0.4 else "plain"
    return Scene(objects, background, rng.randrange(len(BG_TONES)), rng.randrange(3), rng.randrange(1 << 30))


def sample_scenes(n: int, seed: int = 0, two_shape_prob: float = 0.0) -> list:
    """``n`` random scenes, deterministic given ``seed``."""
    rng = random.Random(seed)
    return [_random_scene(rng, two_shape_prob) for _ in range(n)]


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _where(position: str) -> str:
    preposition = "in the" if position == "center" else ("at the" if position in ("top", "bottom") else "on the")
    return f"{preposition} {position}"


def caption(scene: Scene, rng: Optional[random.Random] = None, full: bool = False) -> str:
    """A caption for a scene; with ``rng`` some attributes are left out (the model learns to fill them in).

    ``full`` (or no ``rng``) names every attribute: "a large red circle on the left on a plain background".
    """
    if rng is None:
        rng, full = random.Random(0), True
    parts = []
    for obj in scene.objects:
        if full:
            parts.append(f"{_article(obj.size)} {obj.size} {obj.colour} {obj.shape} {_where(obj.position)}")
            continue
        words = []
        if rng.random() < 0.8:
            words.append(obj.size)
        r = rng.random()
        if r < 0.05:        # shape only: "a large circle"
            words.append(obj.shape)
        elif r < 0.10:      # colour only: "a red shape"
            words += [obj.colour, "shape"]
        else:
            words += [obj.colour, obj.shape]
        phrase = _article(words[0]) + " " + " ".join(words)
        if rng.random() < 0.8:
            phrase += " " + _where(obj.position)
        parts.append(phrase)
    text = " and ".join(parts)
    if full or rng.random() < 0.4:
        text += f" on a {scene.background} background"
    return text


def _grid(size: int, device=None) -> tuple:
    coords = (torch.arange(size, dtype=torch.float32, device=device) + 0.5) / size
    return coords.view(1, 1, size), coords.view(1, size, 1)   # x varies along width, y along height


def _sdf(shape_ids: Tensor, cx: Tensor, cy: Tensor, radius: Tensor, size: int) -> Tensor:
    """Signed distance (in pixels, negative inside) of each item's shape, [B, H, W]."""
    gx, gy = _grid(size, cx.device)
    dx = (gx - cx.view(-1, 1, 1)) * size
    dy = (gy - cy.view(-1, 1, 1)) * size
    r = radius.view(-1, 1, 1) * size
    adx, ady = dx.abs(), dy.abs()
    circle = (dx * dx + dy * dy).sqrt() - r
    square = torch.maximum(adx, ady) - r
    # upward triangle with apex (0, -r) and base y = 0.8 r between x = +-r: the max of three half-plane distances
    base = dy - 0.8 * r
    # slanted edges through the apex with |dy/dx| = 1.8: distance along their unit normal (1.8, -1) / |(1.8, -1)|
    slanted = (1.8 * adx - (dy + r)) / (1.0 + 1.8 ** 2) ** 0.5
    triangle = torch.maximum(base, slanted)
    arm = 0.33 * r
    cross = torch.minimum(torch.maximum(adx - r, ady - arm), torch.maximum(adx - arm, ady - r))
    out = torch.stack([circle, square, triangle, cross], dim=1)   # [B, 4, H, W]
    return out.gather(1, shape_ids.view(-1, 1, 1, 1).expand(-1, 1, size, size)).squeeze(1)


def _texture(scenes: Sequence[Scene], size: int) -> Tensor:
    """Low-amplitude background texture per scene (zero for plain backgrounds), [B, 1, H, W]."""
    out = torch.zeros(len(scenes), 1, size, size)
    gx, gy = _grid(size)
    for i, sc in enumerate(scenes):
        if sc.background != "textured":
            continue
        gen = torch.Generator().manual_seed(sc.texture_seed)
        if sc.pattern == 0:
            period = 4 + int(torch.randint(0, 4, (1,), generator=gen))
            angle = float(torch.rand(1, generator=gen)) * 3.1416
            u = (gx * torch.tensor(angle).cos() + gy * torch.tensor(angle).sin()) * size
            out[i, 0] = 0.09 * torch.sign(torch.sin(u * 6.2832 / period))
        elif sc.pattern == 1:
            cell = 3 + int(torch.randint(0, 3, (1,), generator=gen))
            ix = (gx * size / cell).floor()
            iy = (gy * size / cell).floor()
            out[i, 0] = 0.08 * (((ix + iy) % 2) * 2 - 1)
        else:
            coarse = torch.randn(1, 1, size // 4, size // 4, generator=gen)
            out[i, 0] = 0.07 * torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear",
                                                               align_corners=False)[0, 0]
    return out


def render(scenes: Sequence[Scene], size: int = 32, with_mask: bool = False):
    """Render scenes to images [B, 3, H, W] in 0..1 (deterministic: the scenes carry all randomness).

    with_mask: also return the objects' coverage [B, 1, H, W] in 0..1.
    """
    if size < 8:
        raise ValueError(f"size: must be at least 8 pixels, got {size}")
    bg = torch.tensor([BG_TONES[s.tone] for s in scenes], dtype=torch.float32).view(-1, 3, 1, 1)
    img = bg.expand(-1, 3, size, size) + _texture(scenes, size)
    depth = max(len(s.objects) for s in scenes)
    mask = torch.zeros(len(scenes), 1, size, size)
    for k in range(depth):
        present = torch.tensor([len(s.objects) > k for s in scenes])
        objs = [s.objects[min(k, len(s.objects) - 1)] for s in scenes]
        ids = torch.tensor([SHAPES.index(o.shape) for o in objs])
        cx = torch.tensor([o.cx for o in objs])
        cy = torch.tensor([o.cy for o in objs])
        radius = torch.tensor([o.radius for o in objs])
        alpha = (0.5 - _sdf(ids, cx, cy, radius, size)).clamp(0, 1).unsqueeze(1)   # one-pixel anti-aliased edge
        alpha = alpha * present.view(-1, 1, 1, 1).float()
        colour = torch.tensor([COLOURS[o.colour] for o in objs], dtype=torch.float32).view(-1, 3, 1, 1)
        img = img * (1 - alpha) + colour * alpha
        mask = torch.maximum(mask, alpha)
    return (img.clamp(0, 1), mask) if with_mask else img.clamp(0, 1)


def make_batch(n: int, seed: int = 0, size: int = 32, two_shape_prob: float = 0.0, full_captions: bool = False,
               with_mask: bool = False):
    """(images [n, 3, size, size] in 0..1, captions, scenes[, masks]): a deterministic batch for training or scoring."""
    scenes = sample_scenes(n, seed, two_shape_prob)
    rng = random.Random(seed ^ 0x5EED)
    captions = [caption(s, None if full_captions else rng) for s in scenes]
    if with_mask:
        images, masks = render(scenes, size, with_mask=True)
        return images, captions, scenes, masks
    return render(scenes, size), captions, scenes


def parse_prompt(prompt: str) -> dict:
    """The attributes a prompt names for its first object: {"shape", "colour", "size", "position"} (None if absent)."""
    words = [SYNONYMS.get(w, w) for w in "".join(c if c.isalpha() else " " for c in prompt.lower()).split()]
    found = {"shape": None, "colour": None, "size": None, "position": None}
    for w in words:
        for key, table in (("shape", SHAPES), ("colour", COLOURS), ("size", SIZES), ("position", POSITIONS)):
            if w in table and found[key] is None:
                found[key] = w
    return found


def scene_from_prompt(prompt: str, seed: int = 0) -> Scene:
    """A scene matching the attributes a prompt names (random where it names none): a reference rendering."""
    rng = random.Random(seed)
    attrs = parse_prompt(prompt)
    obj = _random_object(rng, **attrs)
    background = "textured" if "textured" in prompt.lower() else "plain"
    return Scene((obj,), background, rng.randrange(len(BG_TONES)), rng.randrange(3), rng.randrange(1 << 30))
