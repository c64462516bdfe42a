"""Sources read as a stream, nothing copied to the cache: `iter_captioned` (a rank's share, row by row) and
`stream_shards` (the source's own files as shards, for vqgpt.encode and vqgpt.loader's `--streaming`)."""

from __future__ import annotations

import logging
import os
from collections import defaultdict
from collections.abc import Iterator

from .captioned import _open_files, _open_hub, load_captioned
from .images import _decode_checked, _Unusable
from .rows import _pair_getter, _skipped_summary, _undecoded
from .sources import EMBEDDED, _check_revision, _resolve
from .splits import _check_split, is_held_out_key

log = logging.getLogger("vqgpt.data")  # one logger for the whole package


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
            log.warning(
                "skipped %d of %d rows of %s (%s split, rank %d of %d): %s",
                n_bad,
                seen,
                where,
                split,
                rank,
                world,
                _skipped_summary(skipped),
            )
    if seen and n_bad == seen:
        raise ValueError(f"no usable images in {where} (rank {rank} of {world}): all {seen} rows skipped")


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
