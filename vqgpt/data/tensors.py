"""A split as uint8 image tensors, then as image-tokenizer codes, each computed once and cached on disk.

The cache key of codes is the tokenizer's fingerprint plus the identity of the data (vqgpt.data.sources), so new
weights or new files re-encode; a corrupt cache file is ignored with a warning and rebuilt.
"""

from __future__ import annotations

import json
import logging
import pickle
import re
from pathlib import Path

import torch

from ..io import atomic_torch_save, cache_key
from .captioned import load_captioned
from .images import _open_image, square_tensor, to_rgb
from .sources import EMBEDDED, _embedded_version, _resolve, cache_root, source_identity
from .splits import _check_split

log = logging.getLogger("vqgpt.data")  # one logger for the whole package


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
        atomic_torch_save({"images": images, "captions": captions}, cache)
    return images, captions


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
    key = cache_key({"tokenizer": tokenizer.fingerprint(), "data": identity})
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
    atomic_torch_save(blob, path)
    return codes, captions


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
