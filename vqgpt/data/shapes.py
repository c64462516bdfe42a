"""shapes: procedural images whose every attribute survives an 8x8 code grid at 64 px.

Each image is one shape (circle, square, triangle, cross, star) of one colour and size at one of five positions
on one background, captioned exactly ("a small red triangle at the top left on a blue background"). About 10%
of the attribute combinations never appear in training (held_out_specs): the test split is made of them, to
measure whether a model composes attributes it saw only apart. The judge that reads the attributes back off an
image is beside this module, in shapes_judge.py.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from itertools import combinations, product

import numpy as np
from PIL import Image, ImageDraw

from .images import _png
from .splits import _check_split, _unit_hash

SHAPES = ("circle", "square", "triangle", "cross", "star")
# Far apart in RGB (>= ~120 between any two, >= ~110 from any background they can sit on), so that a
# colour is still readable after tokenization; the judge uses the same table.
COLORS = {
    "red": (220, 40, 40),
    "yellow": (240, 210, 40),
    "green": (40, 170, 60),
    "cyan": (60, 200, 220),
    "blue": (40, 70, 220),
    "purple": (170, 60, 210),
    "white": (245, 245, 245),
}
SIZES = ("small", "large")
POSITIONS = ("top left", "top right", "bottom left", "bottom right", "center")
BACKGROUNDS = {
    "white": (245, 245, 245),
    "black": (20, 20, 20),
    "gray": (128, 128, 128),
    "blue": (40, 70, 220),
}
# Circumradius as a fraction of the image side: 12 and 17 px at 64 px, so a small shape still covers
# ~3x3 patches of 8 px and its silhouette survives tokenization.
SIZE_RADIUS = {"small": 12 / 64, "large": 17 / 64}
# Centres as fractions of the side: at 64 px the corners sit 11.5 px (in x and y) from the centre, far
# beyond the 2 px jitter, and a large shape stays clear of the frame the judge reads the background from.
POSITION_XY = {
    "top left": (0.32, 0.32),
    "top right": (0.68, 0.32),
    "bottom left": (0.32, 0.68),
    "bottom right": (0.68, 0.68),
    "center": (0.5, 0.5),
}
JITTER = 2 / 64  # largest random shift of a shape's centre, as a fraction of the side
SUPERSAMPLE = 4  # draw at 4x and box-filter down: exact area anti-aliasing, no ringing
SHAPES_TRAIN_SIZE = 20_000
SHAPES_TEST_PER_COMBO = 4
SHAPES_SEED = 0
HELD_OUT_COMBO_FRACTION = 0.10
_ATTRS = ("shape", "color", "size", "position", "background")
# A share of training captions leaves some attributes unsaid ("a red circle", "a large star at the top left"),
# so that a prompt has several right answers and diversity can be measured; test captions say everything.
UNSAID_PROB = 0.25  # chance that a training caption is partial
UNSAID_ATTRS = ("color", "size", "position", "background")  # the shape is always said


@dataclass(frozen=True)
class ShapeSpec:
    shape: str  # one of SHAPES
    color: str  # a key of COLORS
    size: str  # one of SIZES
    position: str  # one of POSITIONS
    background: str  # a key of BACKGROUNDS, never equal to color

    def __post_init__(self):
        for attr, allowed in zip(_ATTRS, (SHAPES, COLORS, SIZES, POSITIONS, BACKGROUNDS)):
            if getattr(self, attr) not in allowed:
                raise ValueError(f"unknown {attr} {getattr(self, attr)!r}; choose one of {list(allowed)}")
        if self.color == self.background:
            raise ValueError(f"a {self.color} shape on a {self.background} background would be invisible")


def shape_caption(spec: ShapeSpec, unsaid: tuple[str, ...] = ()) -> str:
    """'a small red triangle at the top left on a blue background'; unsaid attributes are left out
    ('a red triangle' leaves size, position and background unsaid)."""
    where = "in the center" if spec.position == "center" else f"at the {spec.position}"
    words = ["a"] + [getattr(spec, a) for a in ("size", "color") if a not in unsaid] + [spec.shape]
    words += [] if "position" in unsaid else [where]
    words += [] if "background" in unsaid else [f"on a {spec.background} background"]
    return " ".join(words)


def draw_unsaid(rng: random.Random, prob: float = UNSAID_PROB) -> tuple[str, ...]:
    """With probability prob, a non-empty random subset of UNSAID_ATTRS (each left out with chance 1/2)."""
    if rng.random() >= prob:
        return ()
    while True:
        unsaid = tuple(a for a in UNSAID_ATTRS if rng.random() < 0.5)
        if unsaid:
            return unsaid


_PARTIAL_RE = re.compile(
    rf"a (?:(?P<size>{'|'.join(SIZES)}) )?(?:(?P<color>{'|'.join(COLORS)}) )?(?P<shape>{'|'.join(SHAPES)})"
    rf"(?: (?:in the|at the) (?P<position>{'|'.join(POSITIONS)}))?(?: on a (?P<background>\w+) background)?"
)


def parse_partial_caption(text: str) -> dict[str, str]:
    """The attributes a shapes caption says, full or partial: {'shape': 'circle', 'color': 'red'}."""
    m = _PARTIAL_RE.fullmatch(text.strip())
    if m is None:
        raise ValueError(f"not a shapes caption: {text!r}")
    return {k: v for k, v in m.groupdict().items() if v is not None}


_CAPTION_RE = re.compile(
    r"a (?P<size>\w+) (?P<color>\w+) (?P<shape>\w+) (?:in the|at the) (?P<position>[\w ]+?) "
    r"on a (?P<background>\w+) background"
)


def parse_shape_caption(text: str) -> ShapeSpec:
    """The inverse of shape_caption (eval scripts get specs back from captions)."""
    m = _CAPTION_RE.fullmatch(text.strip())
    if m is None:
        raise ValueError(f"not a shapes caption: {text!r}")
    return ShapeSpec(**m.groupdict())


def all_specs() -> list[ShapeSpec]:
    """Every valid combination, in a fixed order (5 x 7 x 2 x 5 x 4 minus same colour/background)."""
    return [
        ShapeSpec(*combo) for combo in product(SHAPES, COLORS, SIZES, POSITIONS, BACKGROUNDS) if combo[1] != combo[4]
    ]


def _pairs(spec: ShapeSpec) -> list[tuple]:
    return list(combinations(((a, getattr(spec, a)) for a in _ATTRS), 2))


@lru_cache(maxsize=1)
def held_out_specs() -> tuple[ShapeSpec, ...]:
    """Full attribute combinations kept out of training, to measure compositional generalisation.

    Combinations are visited in the order of the sha1 of their caption (stable across processes and
    machines) and held out while fewer than 10% are, skipping any whose removal would leave one of its
    10 attribute-value pairs (shape+colour, colour+background, ...) with no training combination:
    every pair in a held-out combination is seen in training, only the combination itself is new.
    """
    specs = all_specs()
    target = round(HELD_OUT_COMBO_FRACTION * len(specs))
    train_support = Counter(p for s in specs for p in _pairs(s))
    held = set()
    for spec in sorted(specs, key=lambda s: _unit_hash(shape_caption(s))):
        if len(held) == target:
            break
        if all(train_support[p] > 1 for p in _pairs(spec)):
            train_support.subtract(_pairs(spec))
            held.add(spec)
    return tuple(s for s in specs if s in held)


def is_held_out(spec: ShapeSpec) -> bool:
    return spec in _held_out_set()


@lru_cache(maxsize=1)
def _held_out_set() -> frozenset[ShapeSpec]:
    return frozenset(held_out_specs())


def render_shape(spec: ShapeSpec, image_size: int = 64, rng: random.Random | None = None) -> Image.Image:
    """Draw one anti-aliased shape; with rng, its centre moves by up to JITTER (against memorisation)."""
    side = SUPERSAMPLE * image_size
    img = Image.new("RGB", (side, side), BACKGROUNDS[spec.background])
    cx, cy = (c * side for c in POSITION_XY[spec.position])
    if rng is not None:
        cx += rng.uniform(-JITTER, JITTER) * side
        cy += rng.uniform(-JITTER, JITTER) * side
    r = SIZE_RADIUS[spec.size] * side
    fill = COLORS[spec.color]
    draw = ImageDraw.Draw(img)
    # Every shape is centred on (cx, cy) with about the same extent, so only the silhouette differs.
    if spec.shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif spec.shape == "square":
        a = 0.92 * r
        draw.rectangle((cx - a, cy - a, cx + a, cy + a), fill=fill)
    elif spec.shape == "triangle":  # equilateral, apex up; centroid at (cx, cy)
        draw.polygon(_star_points(cx, cy, [1.15 * r], 3), fill=fill)
    elif spec.shape == "cross":  # a plus sign
        w = 0.36 * r
        draw.rectangle((cx - r, cy - w, cx + r, cy + w), fill=fill)
        draw.rectangle((cx - w, cy - r, cx + w, cy + r), fill=fill)
    else:  # five-pointed star
        draw.polygon(_star_points(cx, cy, [1.12 * r, 0.5 * r], 5), fill=fill)
    return img.reduce(SUPERSAMPLE)  # box filter: each pixel is the mean of its 4x4 block


def _star_points(cx: float, cy: float, radii: list[float], points: int) -> list[tuple[float, float]]:
    """Vertices around (cx, cy), the first pointing up, cycling through radii (one radius: a polygon)."""
    n = points * len(radii)
    angles = np.pi * (-0.5 + 2 * np.arange(n) / n)
    rs = np.array(radii * points)
    return [(cx + r * np.cos(a), cy + r * np.sin(a)) for r, a in zip(rs, angles)]


def shapes_split_specs(split: str, limit: int | None = None, seed: int = SHAPES_SEED) -> list[ShapeSpec]:
    """The spec of every image of a shapes split, in order: train cycles through shuffled training
    combinations (balanced) up to SHAPES_TRAIN_SIZE; test is each held-out combination a few times."""
    _check_split(split)
    if split == "test":
        specs = [s for s in held_out_specs() for _ in range(SHAPES_TEST_PER_COMBO)]
        return specs[:limit] if limit is not None else specs
    rng = random.Random(seed)
    train = [s for s in all_specs() if not is_held_out(s)]
    n = SHAPES_TRAIN_SIZE if limit is None else limit
    order: list[ShapeSpec] = []
    while len(order) < n:
        block = train[:]
        rng.shuffle(block)
        order += block
    return order[:n]


def _shapes_rows(split: str, image_size: int, limit: int | None) -> tuple[list[bytes], list[str], list[str]]:
    specs = shapes_split_specs(split, limit)
    rng = random.Random(f"shapes-{split}-{SHAPES_SEED}")  # jitter stream, separate from the spec order
    images = [_png(render_shape(s, image_size, rng)) for s in specs]
    if split == "train":  # its own stream: images and spec order do not depend on UNSAID_PROB
        said = random.Random(f"shapes-unsaid-{SHAPES_SEED}")
        captions = [shape_caption(s, draw_unsaid(said)) for s in specs]
    else:
        captions = [shape_caption(s) for s in specs]
    return images, captions, [f"{i}" for i in range(len(specs))]
