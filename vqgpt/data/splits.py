"""The two splits every source has, and the fixed hash that holds rows out of a source without a test split.

A row goes to test by the sha1 of its key (a file name, a tar member, an image's bytes): the same rows on every
machine and in every process, whatever the order the source lists them in.
"""

from __future__ import annotations

import hashlib

SPLITS = ("train", "test")
HELD_OUT_FRACTION = 0.05  # share of files held out of a set that has no test split of its own


def _unit_hash(key: str) -> float:
    """A stable number in [0, 1) for a key (Python's hash() changes with every process)."""
    return int(hashlib.sha1(key.encode()).hexdigest()[:12], 16) / 16**12


def is_held_out_key(key: str, fraction: float = HELD_OUT_FRACTION) -> bool:
    """The fixed test split of sets without one: a file name or id goes to test by its sha1."""
    return _unit_hash(key) < fraction


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {list(SPLITS)}")
