"""Images -> a sharded, memory-mapped store of image-tokenizer codes with their captions.

    python -m vqgpt.encode --data DATA --tokenizer runs/tok --out codes/            # one process
    torchrun --nproc_per_node 8 -m vqgpt.encode --data DATA --tokenizer runs/tok --out codes/   # 8 ranks

The GPT stage reads codes from here and never holds a dataset in memory (`train.py gpt` builds the store of
its data and tokenizer under the cache when there is none). A store is a directory:

    shard-00000.codes.npy     (n, h, w) int16 (int32 for codebooks over 32,767): np.load(mmap_mode="r")
    shard-00000.text.bin      the n captions, UTF-8, back to back
    shard-00000.offsets.npy   (n + 1,) int64 byte offsets of the captions in text.bin
    shard-00000.json          {"count", "rows", "skipped", "sha256"}: written last, marks the shard finished
    manifest.json             written last of all: counts, codes_sha256, tokenizer fingerprint, data identity

Shard k holds source rows [k * shard_size, (k + 1) * shard_size), whatever the number of ranks, and rank r
encodes the shards k with k % world == r. So 1 and 8 ranks write the same files, and a killed run, started
again, encodes only the shards that have no .json yet. Every file goes through a temporary name and a rename.
With --streaming (tar shards, parquet files, hub sets too large to download) nothing is copied to the cache:
shard k holds the split's rows of the source's k-th file, read as a stream, and the rest is the same.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import re
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from . import data as vdata
from .io import atomic_write, atomic_write_bytes, atomic_write_json, cache_key
from .training import barrier, rank_zero_first

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
VERSION = 1
SHARD_SIZE = 8192  # images per shard: 1 MB of int16 codes at a 8x8 grid, 8 MB at 16x16


def data_identity(spec: str, split: str, image_size: int, **spec_kwargs) -> dict:
    """What the codes depend on besides the tokenizer: the source (`vqgpt.data.source_identity`: an embedded
    set's version, local files' names, sizes and mtimes, a hub revision), the split, size and loader options."""
    options = {"image_column": "image", "caption_column": "text", **spec_kwargs}  # defaults spelled out: one key
    source = vdata.source_identity(spec, revision=options.get("revision"))
    return {**source, "split": split, "size": image_size, **{k: v for k, v in sorted(options.items()) if v is not None}}


def store_dir(spec: str, split: str, tokenizer, image_size: int | None = None, **spec_kwargs) -> Path:
    """The default home of a store: under the cache, keyed by the tokenizer fingerprint and the data."""
    size = image_size or tokenizer.image_size
    identity = data_identity(spec, split, size, **spec_kwargs)
    key = cache_key({"tokenizer": tokenizer.fingerprint(), "data": identity})
    kind, value = vdata._resolve(spec)
    slug = re.sub(r"[^\w.-]+", "_", Path(value).name if kind == "folder" else value)[-40:]
    return vdata.cache_root() / "stores" / f"{slug}-{split}-{size}px-{key[:20]}"


def split_dir(root: str | os.PathLike, split: str) -> Path:
    """Where `python -m vqgpt.encode --out ROOT` (all splits) and `train.py gpt --codes ROOT` keep a split."""
    return Path(root) / split


MAX_OPEN_SHARDS = 128  # memory maps kept open per kind (each holds a file descriptor; the limit is often 1024)


def _evict(maps: dict) -> None:
    """Drop the oldest-opened maps once MAX_OPEN_SHARDS are open (dicts keep insertion order)."""
    while len(maps) >= MAX_OPEN_SHARDS:
        maps.pop(next(iter(maps)))


# --- reading ----------------------------------------------------------------------------------------------
class CodeStore:
    """A finished store, memory-mapped: random access to any row's codes and caption in O(1)."""

    def __init__(self, path: Path, manifest: dict):
        self.path, self.manifest = path, manifest
        self.grid = tuple(manifest["grid"])
        self.codebook_size = manifest["codebook_size"]
        counts = np.array([s["count"] for s in manifest["shards"]], dtype=np.int64)
        self._starts = np.concatenate([[0], np.cumsum(counts)])  # global row where each shard starts
        self._codes: dict[int, np.ndarray] = {}
        self._text: dict[int, tuple[np.memmap, np.ndarray]] = {}

    @classmethod
    def open(cls, path: str | os.PathLike) -> CodeStore:
        path = Path(path)
        try:
            manifest = json.loads((path / MANIFEST).read_text())
        except FileNotFoundError:
            raise ValueError(
                f"{path} is not a finished codes store: no {MANIFEST} (run `python -m vqgpt.encode` "
                f"again with the same --out to finish it)"
            ) from None
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{path / MANIFEST} is unreadable ({e}); delete {path} and encode again") from e
        if not isinstance(manifest, dict) or manifest.get("version") != VERSION or "shards" not in manifest:
            raise ValueError(f"{path / MANIFEST} is not a vqgpt codes store manifest (version {VERSION})")
        for shard in manifest["shards"]:
            if not (path / f"{shard['file']}.codes.npy").is_file():
                raise ValueError(f"{path} lacks {shard['file']}.codes.npy that its manifest lists")
        return cls(path, manifest)

    def __len__(self) -> int:
        return int(self._starts[-1])

    def _locate(self, idx) -> tuple[np.ndarray, np.ndarray]:
        idx = np.asarray(idx, dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(
                f"row {int(idx.max() if idx.max() >= len(self) else idx.min())} is outside the store's {len(self)} rows"
            )
        shard = np.searchsorted(self._starts, idx, side="right") - 1
        return shard, idx - self._starts[shard]

    def _shard_codes(self, k: int) -> np.ndarray:
        if k not in self._codes:
            _evict(self._codes)
            self._codes[k] = np.load(self.path / f"{self.manifest['shards'][k]['file']}.codes.npy", mmap_mode="r")
        return self._codes[k]

    def _shard_text(self, k: int) -> tuple[np.memmap, np.ndarray]:
        if k not in self._text:
            _evict(self._text)
            name = self.manifest["shards"][k]["file"]
            offsets = np.load(self.path / f"{name}.offsets.npy", mmap_mode="r")
            text = (
                np.memmap(self.path / f"{name}.text.bin", dtype=np.uint8, mode="r")
                if offsets[-1]
                else np.zeros(0, np.uint8)
            )
            self._text[k] = (text, offsets)
        return self._text[k]

    def codes(self, idx) -> torch.Tensor:
        """LongTensor (len(idx), h*w): the codes of rows `idx`, raster order."""
        shard, row = self._locate(idx)
        h, w = self.grid
        out = np.empty((len(shard), h * w), dtype=np.int64)
        for i, (k, r) in enumerate(zip(shard.tolist(), row.tolist())):
            out[i] = self._shard_codes(k)[r].reshape(-1)
        return torch.from_numpy(out)

    def captions(self, idx) -> list[str]:
        shard, row = self._locate(idx)
        out = []
        for k, r in zip(shard.tolist(), row.tolist()):
            text, offsets = self._shard_text(k)
            out.append(bytes(text[offsets[r] : offsets[r + 1]]).decode("utf-8"))
        return out

    def caption(self, i: int) -> str:
        return self.captions([i])[0]

    def iter_captions(self):
        """Every caption in store order, one shard in memory at a time."""
        for k, shard in enumerate(self.manifest["shards"]):
            text, offsets = self._shard_text(k)
            blob = bytes(text)
            for r in range(shard["count"]):
                yield blob[offsets[r] : offsets[r + 1]].decode("utf-8")


# --- writing ----------------------------------------------------------------------------------------------
def _codes_sha256(codes: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(codes, dtype="<i4").tobytes()).hexdigest()


def _atomic_npy(path: Path, array: np.ndarray) -> None:
    atomic_write(path, lambda f: np.save(f, array))


def _shard_done(out: Path, name: str, key: str, rows: list) -> dict | None:
    """The shard's record if it is finished, intact, and holds `rows` of this data and tokenizer (`key`), else
    None: encode it again. (A killed run resumed with other weights or another --shard-size leaves shards
    that are whole but wrong.) rows: [start, stop) of the source's rows, or ["stream", k]: its k-th file."""
    try:
        record = json.loads((out / f"{name}.json").read_text())
        codes = np.load(out / f"{name}.codes.npy", mmap_mode="r")
    except (OSError, ValueError):
        return None
    if record.get("key") != key or record.get("rows") != rows:
        return None
    if len(codes) != record.get("count") or _codes_sha256(codes) != record.get("sha256"):
        return None
    return record


def _batched(rows, batch_size: int):
    batch = []
    for row in rows:
        batch.append(row)
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


def _table_rows(ds, rows: range, batch_size: int):
    """Rows [start, stop) of a map-style set as {"image": undecoded, "text"} dicts, read a batch at a time."""
    import datasets

    raw = ds.cast_column("image", datasets.Image(decode=False))
    for start in range(rows.start, rows.stop, batch_size):
        batch = raw[start : min(start + batch_size, rows.stop)]
        yield from ({"image": v, "text": t} for v, t in zip(batch["image"], batch["text"]))


@torch.no_grad()
def _encode_rows(
    rows, tokenizer, size: int, batch_size: int, dtype, crops: int = 1, seed: int = 0
) -> tuple[np.ndarray, list, Counter]:
    """Codes and captions of undecoded {"image", "text"} rows; rows that fail to decode are skipped and counted.
    crops > 1: each image is stored as that many rows, its views (`vqgpt.loader.decode_views`), the i-th row's
    drawn from seed + i."""
    from .loader import decode_one, decode_views

    device = next(tokenizer.parameters()).device
    codes, captions, skipped = [], [], Counter()
    for b, batch in enumerate(_batched(rows, batch_size)):
        images, texts = [], []
        for i, row in enumerate(batch):
            if crops > 1:
                views = decode_views(row["image"], size, crops, seed + b * batch_size + i)
            else:
                views = None if (image := decode_one(row["image"], size)) is None else [image]
            if views is None:
                skipped["unreadable"] += 1
                continue
            images += views
            texts += [row["text"]] * len(views)
        if not images:
            continue
        x = torch.stack(images).to(device).float().div_(255)
        codes.append(tokenizer.encode(x).cpu().numpy().astype(dtype))
        captions += texts
    h = w = tokenizer.grid_size
    return (np.concatenate(codes) if codes else np.zeros((0, h, w), dtype)), captions, skipped


def _write_shard(out: Path, name: str, key: str, rows: list, codes: np.ndarray, captions: list[str], skipped: Counter):
    blobs = [c.encode("utf-8") for c in captions]
    offsets = np.concatenate([[0], np.cumsum([len(b) for b in blobs], dtype=np.int64)]).astype(np.int64)
    _atomic_npy(out / f"{name}.codes.npy", codes)
    atomic_write_bytes(out / f"{name}.text.bin", b"".join(blobs))
    _atomic_npy(out / f"{name}.offsets.npy", offsets)
    record = {"count": len(codes), "rows": rows, "key": key, "skipped": dict(skipped), "sha256": _codes_sha256(codes)}
    atomic_write_bytes(out / f"{name}.json", json.dumps(record).encode())  # last: the shard is finished
    return record


def _source(spec: str, split: str, size: int, shard_size: int, batch_size: int, streaming: bool, spec_kwargs: dict):
    """(the row ids of each shard, a function k -> shard k's undecoded rows) of the split. Map-style: shard k
    holds rows [k * shard_size, (k + 1) * shard_size). Streaming: shard k is the source's k-th file."""
    if streaming:
        if spec_kwargs.get("limit") is not None:
            raise ValueError("--limit does not apply to a stream, which is read file by file: pass fewer files")
        stream = vdata.stream_shards(
            spec,
            split,
            image_column=spec_kwargs.get("image_column", "image"),
            caption_column=spec_kwargs.get("caption_column", "text"),
            revision=spec_kwargs.get("revision"),
        )
        return [["stream", k] for k in range(stream.n)], stream.rows, stream
    with rank_zero_first():  # one rank renders / converts the data into the shared cache, then the others read it
        ds = vdata.load_captioned(spec, split, image_size=size, **spec_kwargs)
    n = len(ds)
    spans = [range(k * shard_size, min((k + 1) * shard_size, n)) for k in range(max(1, -(-n // shard_size)))]
    return [[r.start, r.stop] for r in spans], lambda k: _table_rows(ds, spans[k], batch_size), None


def encode(
    spec: str,
    split: str,
    tokenizer,
    out: str | os.PathLike | None = None,
    *,
    image_size: int | None = None,
    batch_size: int = 256,
    shard_size: int = SHARD_SIZE,
    rank: int = 0,
    world: int = 1,
    progress: bool = True,
    streaming: bool = False,
    crops: int = 1,
    **spec_kwargs,
) -> CodeStore:
    """Encode split `split` of `spec` into the store at `out` (default: `store_dir`) and open it.

    A finished store of the same tokenizer and data is opened at once; one of another is an error. Every rank
    calls this with its own `rank`; rank 0 writes the manifest once all shards exist. streaming: read tar
    shards, parquet files or a hub set file by file (`vqgpt.data.stream_shards`), one store shard per file.
    crops: store each image as this many rows, its centre crop and crops-1 random crops (half of them flipped).
    spec_kwargs: image_column, caption_column, limit, revision (as `vqgpt.data.load_captioned` takes them).
    """
    size = image_size or tokenizer.image_size
    if crops < 1:
        raise ValueError(f"--crops must be >= 1, got {crops}")
    # None: not part of the key (stores made before these options keep theirs)
    spec_kwargs = {**spec_kwargs, "streaming": streaming or None, "crops": crops if crops > 1 else None}
    out = Path(out) if out is not None else store_dir(spec, split, tokenizer, size, **spec_kwargs)
    identity = data_identity(spec, split, size, **spec_kwargs)
    spec_kwargs.pop("streaming"), spec_kwargs.pop("crops")
    fingerprint = tokenizer.fingerprint()
    if (out / MANIFEST).is_file():
        store = CodeStore.open(out)
        if store.manifest.get("tokenizer") == fingerprint and store.manifest.get("data") == identity:
            return store
        theirs = store.manifest.get("data") or {}
        raise ValueError(
            f"{out} holds the codes of another tokenizer or data ({theirs.get('spec')} "
            f"{theirs.get('split')}, tokenizer {str(store.manifest.get('tokenizer'))[:12]}); "
            f"use another --out"
        )
    t0 = time.time()
    row_ids, shard_rows, stream = _source(spec, split, size, shard_size, batch_size, streaming, spec_kwargs)
    dtype = np.int16 if tokenizer.codebook_size <= np.iinfo(np.int16).max else np.int32
    names = [f"shard-{k:05d}" for k in range(len(row_ids))]
    key = cache_key({"tokenizer": fingerprint, "data": identity})

    out.mkdir(parents=True, exist_ok=True)
    was_training = tokenizer.training
    tokenizer.eval()
    encoded = 0
    try:
        for k in range(rank, len(names), world):
            if _shard_done(out, names[k], key, row_ids[k]) is not None:
                continue
            dropped = stream.no_caption if stream else 0
            codes, captions, skipped = _encode_rows(
                shard_rows(k), tokenizer, size, batch_size, dtype, crops, seed=k << 32
            )
            if stream and stream.no_caption > dropped:
                skipped["no caption"] += stream.no_caption - dropped
            _write_shard(out, names[k], key, row_ids[k], codes, captions, skipped)
            encoded += len(codes)
            if progress:
                rate = encoded / max(time.time() - t0, 1e-9)
                print(f"encode: {names[k]} ({len(codes)} images) on rank {rank}, {rate:.0f} images/s", flush=True)
    finally:
        tokenizer.train(was_training)
    barrier()
    if rank == 0:
        _write_manifest(out, names, row_ids, key, identity, fingerprint, tokenizer, dtype)
    barrier()
    return CodeStore.open(out)


def _write_manifest(
    out: Path, names: list[str], rows: list[list], key: str, identity: dict, fingerprint: str, tokenizer, dtype
) -> None:
    for stale in out.glob("shard-*"):  # shards of an earlier layout (another --shard-size) beyond this one's
        if stale.name.split(".")[0] not in names:
            stale.unlink()
    total, shards, skipped, digest = 0, [], Counter(), hashlib.sha256()
    for name, shard_rows in zip(names, rows):
        record = _shard_done(out, name, key, shard_rows)
        if record is None:
            raise RuntimeError(
                f"{out / name} is missing or corrupt after encoding (another process writing "
                f"into {out}?); run the same command again"
            )
        codes = np.load(out / f"{name}.codes.npy", mmap_mode="r")
        digest.update(np.ascontiguousarray(codes, dtype="<i4").tobytes())
        shards.append({"file": name, "count": record["count"], "sha256": record["sha256"]})
        skipped.update(record["skipped"])
        total += record["count"]
    if total == 0:
        raise ValueError(
            f"no image of {identity['spec']} ({identity['split']}) could be encoded: skipped {dict(skipped)}"
        )
    manifest = {
        "version": VERSION,
        "count": total,
        "codes_sha256": digest.hexdigest(),
        "tokenizer": fingerprint,
        "data": identity,
        "grid": [tokenizer.grid_size, tokenizer.grid_size],
        "codebook_size": tokenizer.codebook_size,
        "dtype": np.dtype(dtype).name,
        "skipped": dict(skipped),
        "shards": shards,
    }
    if skipped:
        log.warning("encode: skipped %d images of %s: %s", sum(skipped.values()), identity["spec"], dict(skipped))
    atomic_write_json(out / MANIFEST, manifest, indent=1)


# --- command line -------------------------------------------------------------------------------------------
def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="openmoji | shapes | a folder | tar shards | parquet | a hub name")
    p.add_argument("--tokenizer", required=True, help="an ImageTokenizer directory (train.py tokenizer --out)")
    p.add_argument("--out", required=True, help="the store's directory")
    p.add_argument(
        "--split",
        default="all",
        choices=[*vdata.SPLITS, "all"],
        help="all (default): the train and test splits, into OUT/train and OUT/test",
    )
    p.add_argument("--revision", default=None, help="a hub dataset's branch, tag or commit")
    p.add_argument(
        "--streaming",
        action="store_true",
        help="read tar shards, parquet files or a hub set file by file, copying nothing to the cache",
    )
    p.add_argument(
        "--crops",
        type=int,
        default=1,
        metavar="N",
        help="store each training image as N rows: its centre crop and N-1 random crops, half flipped",
    )
    p.add_argument("--image-column", default="image")
    p.add_argument("--caption-column", default="text")
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--shard-size", type=int, default=SHARD_SIZE)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    args = p.parse_args(argv)
    for name in ("batch_size", "shard_size", "limit", "crops"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    from .tokenizer import ImageTokenizer
    from .training import cleanup_distributed, setup_distributed

    try:
        d = setup_distributed(args.device)
        tok = ImageTokenizer.from_pretrained(args.tokenizer, device=d.device)
        summary = {}
        for split in vdata.SPLITS if args.split == "all" else [args.split]:
            t0 = time.time()
            store = encode(
                args.data,
                split,
                tok,
                split_dir(args.out, split) if args.split == "all" else args.out,
                batch_size=args.batch_size,
                shard_size=args.shard_size,
                rank=d.rank,
                world=d.world,
                progress=d.main,
                image_column=args.image_column,
                caption_column=args.caption_column,
                revision=args.revision,
                streaming=args.streaming,
                crops=args.crops if split == "train" else 1,
                limit=args.limit if split == "train" else None,
            )
            seconds, m = time.time() - t0, store.manifest
            summary[split] = {
                "store": str(store.path),
                "count": m["count"],
                "codes_sha256": m["codes_sha256"],
                "skipped": m["skipped"],
                "shards": len(m["shards"]),
                "seconds": round(seconds, 2),
                "images_per_s": round(m["count"] / max(seconds, 1e-9), 1),
            }
        cleanup_distributed()
    except (ValueError, FileNotFoundError, RuntimeError, OSError) as e:
        if os.environ.get("VQGPT_DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    if d.main:  # one JSON object, the last line: per split, or the split's own fields for one split
        print(json.dumps({"world": d.world, **(summary if args.split == "all" else summary[args.split])}))


if __name__ == "__main__":
    main()
