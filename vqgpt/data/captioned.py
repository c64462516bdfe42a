"""load_captioned: any spec as a map-style `datasets.Dataset` with columns `image` (PIL RGB) and `text`.

One loader per kind of source: the embedded sets are rendered once per size and saved with `datasets`; local
folders are listed by hand when they have one of the two documented layouts; tar shards and parquet files are
read by the `datasets` builders of those names (tar shards scanned first, so that a broken shard is skipped
with a warning); hub sets by `datasets.load_dataset`. caption_filter selects rows by their captions.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tarfile
from pathlib import Path
from typing import TYPE_CHECKING

from ..io import atomic_write_bytes
from .openmoji import _openmoji_rows
from .rows import (
    _FORMAT_HELP,
    _SPLIT_DIR_NAMES,
    _WDS_IMAGE_FIELDS,
    _WDS_TEXT_FIELDS,
    _drop_unusable,
    _load_rows,
    _pick_split,
    _standardise,
)
from .shapes import _shapes_rows
from .sources import (
    EMBEDDED,
    _check_revision,
    _embedded_version,
    _first_names,
    _folder_signature,
    _resolve,
    _source_files,
    cache_root,
)
from .splits import _check_split, is_held_out_key

if TYPE_CHECKING:
    import datasets

log = logging.getLogger("vqgpt.data")  # one logger for the whole package

DEFAULT_RENDER_SIZE = 64  # embedded sets are rendered at this size unless a size is asked for


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
        e.name.startswith("metadata.") and e.name != "metadata.jsonl" for e in entries
    ):
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
                yield {
                    "image": {"path": str(root / name), "bytes": None},
                    "text": text if isinstance(text, str) else None,
                }
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
        kwargs = {
            "folder": folder,
            "split": split,
            "layout": layout,
            "caption_column": caption_column,
            "signature": _folder_signature(folder),
        }
        ds = datasets.Dataset.from_generator(
            _folder_rows, features=features, gen_kwargs=kwargs, cache_dir=str(cache_root() / "datasets")
        )
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
    atomic_write_bytes(entry, json.dumps(sorted(fields)).encode())
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
        listed = _first_names(bad)
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


def _load_files(kind: str, value: str, split: str, image_column: str, caption_column: str, limit: int | None):
    """Tar shards or parquet files as a map-style set, split by the hash of each row's key (tar: `shard.tar/KEY`;
    parquet: the image bytes) and checked like a folder."""
    ds = _open_files(kind, value, value, streaming=False)
    return _load_rows(ds, split, image_column, caption_column, limit, where=value)


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
            raise ValueError(
                f"the regular expression {pattern.pattern!r} took over {REGEX_SECONDS:g} s on the "
                f"caption {caption[:60]!r} (catastrophic backtracking?); simplify it"
            ) from None

    return [i for i, c in enumerate(captions) if (inc is None or match(inc, c)) and not (exc and match(exc, c))]


REGEX_SECONDS = 1.0  # the longest one --include/--exclude match may take on one caption
