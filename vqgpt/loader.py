"""Training batches read from disk, never a dataset held in memory.

Both stages index their data with `epoch_batch(n, step, global_batch, seed)`: the batch of a step is a pure
function of (seed, step), and a rank takes its slice of it. So a resumed run reads exactly the batches it
would have read, on any number of ranks, and loader workers need no state of their own.

- Images (the tokenizer stage): `image_batches` wraps a map-style `datasets.Dataset` (memory-mapped Arrow,
  images still encoded) in a DataLoader whose item is one step's batch: the workers read the rows, decode,
  resize and centre-crop them, and flip half of them with a generator seeded by the step.
- Streams (`--streaming`): `StreamImages` reads each rank's own source files through a seeded shuffle buffer;
  a resumed run replays the rows before its step without decoding them.
- Codes (the GPT stage): `vqgpt.encode.CodeStore` is memory-mapped; the stage reads a step's rows from it.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from .training import epoch_batch, step_seed

log = logging.getLogger(__name__)


DECODED_CACHE_BYTES = 256 << 20  # decoded images a loader keeps, at most (the demo's 3,852 at 64 px: 47 MB)


class StepImages(torch.utils.data.Dataset):
    """Item `step`: this rank's uint8 images (B, 3, S, S) of that training step, decoded in the worker.

    rows: the training rows of the dataset (indices into `ds`), as an int64 array; `epoch_batch` permutes
    positions in it.
    """

    def __init__(
        self,
        ds,
        image_size: int,
        *,
        global_batch: int,
        per_rank: int,
        rank: int,
        seed: int,
        flip: bool = True,
        rows: np.ndarray | None = None,
    ):
        import datasets

        self.ds = ds.cast_column("image", datasets.Image(decode=False)).select_columns(["image"])
        self.rows = np.arange(len(ds), dtype=np.int64) if rows is None else np.asarray(rows, dtype=np.int64)
        self.image_size, self.flip = image_size, flip
        self.global_batch, self.per_rank, self.rank, self.seed = global_batch, per_rank, rank, seed
        # Sets whose decoded pixels fit in DECODED_CACHE_BYTES keep them (decoding is then paid once per image,
        # not once per epoch); larger ones are decoded batch by batch. Memory is bounded either way.
        n, pixels = len(ds), 3 * image_size * image_size
        self._decoded = (
            torch.empty((n, 3, image_size, image_size), dtype=torch.uint8)
            if n * pixels <= DECODED_CACHE_BYTES
            else None
        )
        self._have = np.zeros(n, dtype=bool)

    def __len__(self) -> int:  # any step may be asked for; the sampler says which
        return 2**62

    def indices(self, step: int) -> np.ndarray:
        pos = epoch_batch(len(self.rows), step, self.global_batch, self.seed)
        return self.rows[pos[self.rank * self.per_rank : (self.rank + 1) * self.per_rank].numpy()]

    def __getitem__(self, step: int) -> torch.Tensor:
        rows = self.indices(step)
        if self._decoded is None:
            out = decode(self.ds[rows.tolist()]["image"], self.image_size, where=f"step {step}")
        else:  # a small set: each image is decoded once, the first time a batch holds it
            new = np.unique(rows[~self._have[rows]])
            if len(new):
                self._decoded[new] = decode(self.ds[new.tolist()]["image"], self.image_size, where=f"step {step}")
                self._have[new] = True
            out = self._decoded[torch.from_numpy(rows)]
        if self.flip:  # horizontal flips: free extra data, drawn from the step's own seed
            gen = torch.Generator().manual_seed(step_seed(self.seed, step, self.rank) + 1)
            flip = torch.rand(len(out), generator=gen) < 0.5
            out[flip] = out[flip].flip(-1)
        return out


class StreamImages(torch.utils.data.IterableDataset):
    """This rank's uint8 images (per_rank, 3, S, S) of steps [start, steps), read from a stream (--streaming).

    A stream has no random access, so its order is a pure function of (seed, rank) in another way: rank r reads
    the source files k with k % world == r (`vqgpt.data.StreamShards`), each epoch in an order drawn from
    (seed, epoch, rank), through a shuffle buffer of `buffer` undecoded rows drawn from the same generator.
    A resumed run replays the rows before `start` without decoding them, so it continues exactly where it
    stopped; the ranks read disjoint files, so 2 ranks do not see the batches of 1 (the map-style path does).
    """

    def __init__(
        self,
        stream,
        image_size: int,
        *,
        per_rank: int,
        rank: int,
        world: int,
        seed: int,
        start: int,
        steps: int,
        buffer: int = 1024,
        flip: bool = True,
    ):
        self.stream, self.image_size, self.flip = stream, image_size, flip
        self.per_rank, self.rank, self.world, self.seed = per_rank, rank, world, seed
        self.start, self.steps, self.buffer = start, steps, buffer
        self.files = list(range(rank, stream.n, world))
        if not self.files:
            raise ValueError(
                f"{stream.where} has {stream.n} files, fewer than the {world} ranks: each rank streams "
                "whole files (split the data into more files, or use fewer ranks)"
            )

    def rows(self):
        """This rank's undecoded rows, epoch after epoch, in their fixed order."""
        import random

        epoch = 0
        while True:
            gen = random.Random(step_seed(self.seed, epoch, self.rank))
            order, buffer, seen = gen.sample(self.files, len(self.files)), [], 0
            for k in order:
                for row in self.stream.rows(k):
                    seen += 1
                    if len(buffer) < self.buffer:
                        buffer.append(row)
                        continue
                    i = gen.randrange(len(buffer))
                    yield buffer[i]
                    buffer[i] = row
            if not seen:
                raise ValueError(f"rank {self.rank}'s files of {self.stream.where} hold no captioned row")
            gen.shuffle(buffer)
            yield from buffer
            epoch += 1

    def __iter__(self):
        rows = self.rows()
        for _ in range(self.start * self.per_rank):  # replay up to the resumed step: read, not decoded
            next(rows)
        for step in range(self.start, self.steps):
            values = [next(rows)["image"] for _ in range(self.per_rank)]
            out = decode(values, self.image_size, where=f"step {step}")
            if self.flip:
                gen = torch.Generator().manual_seed(step_seed(self.seed, step, self.rank) + 1)
                flip = torch.rand(len(out), generator=gen) < 0.5
                out[flip] = out[flip].flip(-1)
            yield out


def stream_rows(stream, image_size: int, n: int) -> torch.Tensor:
    """uint8 (<= n, 3, S, S): the first n decodable images of a stream, file by file (held-out images)."""
    out = []
    for k in range(stream.n):
        for row in stream.rows(k):
            image = decode_one(row["image"], image_size)
            if image is not None:
                out.append(image)
            if len(out) == n:
                return torch.stack(out)
    return torch.stack(out) if out else torch.empty((0, 3, image_size, image_size), dtype=torch.uint8)


def decode(values: list[dict], image_size: int, where: str = "") -> torch.Tensor:
    """Undecoded `datasets` images ({"bytes", "path"}) -> uint8 (B, 3, S, S): shorter side to S, centre crop.

    An image that fails to decode here passed the check when its set was loaded, so this is a disk fault: it
    is replaced by another image of the batch and counted in the log, not a crash hours into a run."""
    out = torch.empty((len(values), 3, image_size, image_size), dtype=torch.uint8)
    bad = []
    for i, value in enumerate(values):
        image = decode_one(value, image_size)
        if image is None:
            bad.append(i)
        else:
            out[i] = image
    if bad:
        good = [i for i in range(len(values)) if i not in bad]
        if not good:
            raise ValueError(f"{where}: no image of the batch could be decoded")
        log.warning("%s: %d images unreadable, replaced by others of the batch", where, len(bad))
        for j, i in enumerate(bad):
            out[i] = out[good[j % len(good)]]
    return out


def decode_one(value: dict, image_size: int) -> torch.Tensor | None:
    """One undecoded `datasets` image -> uint8 (3, S, S), or None when it cannot be decoded."""
    from .data.images import _open_image, square_tensor, to_rgb

    try:
        return square_tensor(to_rgb(_open_image(value)), image_size)
    except Exception:  # PIL raises many kinds of errors on a corrupt file: each means skip it
        return None


def decode_views(value: dict, image_size: int, views: int, seed: int) -> list[torch.Tensor] | None:
    """`views` uint8 (3, S, S) views of one undecoded image, or None when it cannot be decoded: the centre crop,
    then random crops of 80-100% of the shorter side at random places, every other one flipped, drawn from
    `seed` (extraction-time augmentation for photos, as LlamaGen's ten-crop codes)."""
    import random

    from .data.images import _open_image, square_tensor, to_rgb

    try:
        image = to_rgb(_open_image(value))
    except Exception:  # as in decode_one: a corrupt file of any kind is skipped
        return None
    out, (w, h), gen = [square_tensor(image, image_size)], image.size, random.Random(seed)
    for v in range(1, views):
        side = round(min(w, h) * gen.uniform(0.8, 1.0))
        left, top = gen.randint(0, w - side), gen.randint(0, h - side)
        view = square_tensor(image.crop((left, top, left + side, top + side)), image_size)
        out.append(view.flip(-1) if v % 2 else view)
    return out


def decode_rows(ds, rows, image_size: int) -> torch.Tensor:
    """uint8 (len(rows), 3, S, S) of some rows, in order (a held-out set for evaluation: keep it small)."""
    import datasets

    raw = ds.cast_column("image", datasets.Image(decode=False))
    return decode(raw[list(map(int, rows))]["image"], image_size, where="held-out images")


def _worker_init(_):
    torch.set_num_threads(1)  # decoding is per image; threads would only fight the training process


def image_batches(
    dataset: StepImages | StreamImages, start: int, steps: int, *, workers: int, pin_memory: bool = False
):
    """The batches of steps [start, steps), in order, prefetched by `workers` processes (0: in this one). A
    stream is read in order by one worker at most (several would each read all of it)."""
    if isinstance(dataset, StreamImages):
        return torch.utils.data.DataLoader(
            dataset,
            batch_size=None,
            num_workers=min(workers, 1),
            pin_memory=pin_memory,
            worker_init_fn=_worker_init if workers else None,
            prefetch_factor=4 if workers else None,
        )
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=None,  # an item is already a batch
        sampler=range(start, steps),
        num_workers=workers,
        pin_memory=pin_memory,
        worker_init_fn=_worker_init if workers else None,
        prefetch_factor=4 if workers else None,
        persistent_workers=False,
    )


def default_workers(device: torch.device) -> int:
    """Loader processes. On a GPU: one fewer than the cores this process may use, at most 8. On a CPU the
    training step already keeps every core busy, and a worker would take cores from it: none up to 4 cores
    (the demo's steps on 2 cores were 10% slower with one), then one per 4 cores, at most 4."""
    import os

    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    if device.type == "cuda":
        return max(0, min(8, cores - 1))
    return 0 if cores <= 4 else min(4, cores // 4)
