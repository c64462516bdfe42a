"""Rows of user data made uniform and checked: columns `image` and `text`, one warning for the unusable ones.

Folders, tar shards, parquet files and hub sets all end here: their own columns are mapped to an undecoded
image and a caption (`_pair_getter`, `_standardise`), split by the held-out hash when the source has no test
split of its own, and every image is decoded once and checked (`_drop_unusable`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections import defaultdict
from typing import TYPE_CHECKING

from .images import _decode_checked, _image_value, _png, _Unusable
from .sources import _first_names
from .splits import HELD_OUT_FRACTION, is_held_out_key

if TYPE_CHECKING:
    import datasets

log = logging.getLogger("vqgpt.data")  # one logger for the whole package

_SPLIT_DIR_NAMES = {"train", "test", "validation", "valid", "val", "dev", "eval"}
_FORMAT_HELP = (
    'image files with a metadata.jsonl of {"file_name": ..., "text": ...} lines, or image files in one '
    "subfolder per class (the class name is the caption)"
)
_WDS_IMAGE_FIELDS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")  # preferred in this order
_WDS_TEXT_FIELDS = ("txt", "text")
_JSON_CAPTION_KEYS = ("caption", "text")  # where img2dataset (and most captioners) put the caption


def _pick_split(names: list[str], split: str) -> tuple[str, bool]:
    """(split to read, whether to hash-split it): a set with its own test split keeps it."""
    test_name = next((n for n in ("test", "validation", "valid") if n in names), None)
    base = "train" if "train" in names else names[0]
    if test_name is None or test_name == base:
        return base, True
    return (base if split == "train" else test_name), False


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


def _holds_images(feature) -> bool:
    """An Image feature, or raw bytes (binary, or a {"bytes", "path"} struct) that can be read as one."""
    import datasets

    if isinstance(feature, datasets.Image):
        return True
    if isinstance(feature, datasets.Value):
        return feature.dtype in ("binary", "large_binary")
    return isinstance(feature, dict) and "bytes" in feature


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
    summary = _skipped_summary(skipped)
    if n_bad == len(ds):
        raise ValueError(f"no usable images in {where}: all {n_bad} files skipped: {summary}")
    if n_bad:
        log.warning("skipped %d of %d files in %s: %s", n_bad, len(ds), where, summary)
        ds = ds.select([i for i, why in enumerate(ds["_bad"]) if not why])
    return ds.remove_columns(["_bad", "_name"]).cast_column("image", datasets.Image())


def _skipped_summary(skipped: dict[str, list[str]]) -> str:
    """'unreadable (a.png, b.png); no caption (c.png)': each reason for skipping, with the first few names."""
    return "; ".join(f"{why} ({_first_names(names)})" for why, names in skipped.items())


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


def _load_rows(ds, split: str, image_column: str, caption_column: str, limit: int | None, where: str, hashed=True):
    """One pass maps the rows' own columns to image/text (see _pair_getter), then the split (when `hashed`:
    the set has no test split of its own) and the checks."""
    ds = _undecoded(ds)
    pair = _pair_getter(ds.features, image_column, caption_column, where)
    ds = ds.map(pair, remove_columns=ds.column_names, features=_pairs_features(), desc="reading rows")
    if hashed:
        ds = ds.select([i for i, k in enumerate(ds["_key"]) if is_held_out_key(k) == (split == "test")])
    return _drop_unusable(ds.remove_columns("_key"), where=where, split=split, limit=limit)


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
