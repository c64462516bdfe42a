"""Training batches read from disk, never a dataset held in memory.

Both stages index their data with `epoch_batch(n, step, global_batch, seed)`: the batch of a step is a pure
function of (seed, step), and a rank takes its slice of it. So a resumed run reads exactly the batches it
would have read, on any number of ranks, and loader workers need no state of their own.

- Images (the tokenizer stage): `image_batches` wraps a map-style `datasets.Dataset` (memory-mapped Arrow,
  images still encoded) in a DataLoader whose item is one step's batch: the workers read the rows, decode,
  resize and centre-crop them, and flip half of them with a generator seeded by the step.
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

    def __init__(self, ds, image_size: int, *, global_batch: int, per_rank: int, rank: int, seed: int,
                 flip: bool = True, rows: np.ndarray | None = None):
        import datasets

        self.ds = ds.cast_column("image", datasets.Image(decode=False)).select_columns(["image"])
        self.rows = np.arange(len(ds), dtype=np.int64) if rows is None else np.asarray(rows, dtype=np.int64)
        self.image_size, self.flip = image_size, flip
        self.global_batch, self.per_rank, self.rank, self.seed = global_batch, per_rank, rank, seed
        # Sets whose decoded pixels fit in DECODED_CACHE_BYTES keep them (decoding is then paid once per image,
        # not once per epoch); larger ones are decoded batch by batch. Memory is bounded either way.
        n, pixels = len(ds), 3 * image_size * image_size
        self._decoded = torch.empty((n, 3, image_size, image_size), dtype=torch.uint8) \
            if n * pixels <= DECODED_CACHE_BYTES else None
        self._have = np.zeros(n, dtype=bool)

    def __len__(self) -> int:  # any step may be asked for; the sampler says which
        return 2**62

    def indices(self, step: int) -> np.ndarray:
        pos = epoch_batch(len(self.rows), step, self.global_batch, self.seed)
        return self.rows[pos[self.rank * self.per_rank:(self.rank + 1) * self.per_rank].numpy()]

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
    from .data import _open_image, square_tensor, to_rgb

    try:
        return square_tensor(to_rgb(_open_image(value)), image_size)
    except Exception:  # PIL raises many kinds of errors on a corrupt file: each means skip it
        return None


def decode_rows(ds, rows, image_size: int) -> torch.Tensor:
    """uint8 (len(rows), 3, S, S) of some rows, in order (a held-out set for evaluation: keep it small)."""
    import datasets

    raw = ds.cast_column("image", datasets.Image(decode=False))
    return decode(raw[list(map(int, rows))]["image"], image_size, where="held-out images")


def _worker_init(_):
    torch.set_num_threads(1)  # decoding is per image; threads would only fight the training process


def image_batches(dataset: StepImages, start: int, steps: int, *, workers: int, pin_memory: bool = False):
    """The batches of steps [start, steps), in order, prefetched by `workers` processes (0: in this one)."""
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
