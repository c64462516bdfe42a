"""Files that are whole or absent, weights loaded strictly, the fingerprints records are keyed by, image grids.

Every module that writes a file writes it here: to a temporary name beside the target, flushed and fsynced, then
renamed over it (and the directory fsynced), so a reader, or a run killed half-way, never sees half a file.

    atomic_write_bytes(path, data); atomic_write_json(path, config); atomic_torch_save(obj, path)
    save_weights(path, state); load_state_strict(model, path)      # safetensors; a misfit names every tensor
    weights_fingerprint(gpt); model_fingerprint(config, state)     # short hashes that records on disk keep
    image_grid(rows, labels).save("grid.png")

Only the standard library and torch are imported here; safetensors and PIL where they are used.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import BinaryIO

import torch

# ----------------------------------------------------------------------------------------------------
# Atomic writes


def fsync_dir(path: str | os.PathLike) -> None:
    """Flush a directory's entries (a rename into it) to disk; a no-op where directories cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], object]) -> None:
    """Call `write(file)` on a temporary file beside `path`, flush it to disk, then rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` atomically (see atomic_write)."""
    atomic_write(path, lambda f: f.write(data))


def atomic_write_json(path: str | os.PathLike, value, indent: int | None = 2, default: Callable = list) -> None:
    """Write `value` as JSON and a final newline, atomically; `default` converts what JSON cannot hold
    (a set, say: a list)."""
    atomic_write_bytes(path, (json.dumps(value, indent=indent, default=default) + "\n").encode())


def atomic_torch_save(obj, path: str | os.PathLike) -> None:
    """torch.save, atomically: a cache file is whole or absent (read back with weights_only=True)."""
    atomic_write(path, lambda f: torch.save(obj, f))


def is_regular_file(path: str | os.PathLike) -> bool:
    """A regular file (after symlinks): not a FIFO, socket or device (opening one can block), not a dangling link."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return False


MAX_JSON_BYTES = 16 << 20  # a config or manifest is a few KB; anything near this size is not one


def read_json_file(path: str | os.PathLike, what: str = "config") -> dict:
    """A JSON object from a regular file, or a ValueError naming the file: a FIFO or a device (which would
    block or never end), a huge file, invalid JSON, or JSON that is not an object are all refused."""
    path = Path(path)
    try:
        st = os.stat(path)
    except OSError as e:
        raise FileNotFoundError(f"cannot read {what} {path}: {e.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise ValueError(f"{what} {path} is not a regular file")
    if st.st_size > MAX_JSON_BYTES:
        raise ValueError(f"{what} {path} is {st.st_size} bytes: too large to be a {what}")
    try:
        value = json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read {what} {path}: {e}") from e
    if not isinstance(value, dict):
        raise ValueError(f"{what} {path} holds a JSON {type(value).__name__}, not an object")
    return value


# ----------------------------------------------------------------------------------------------------
# Weights: safetensors, loaded strictly


def save_weights(path: str | os.PathLike, state: Mapping[str, torch.Tensor], metadata: dict | None = None) -> None:
    """A state dict as a safetensors file (contiguous CPU copies), atomically."""
    from safetensors.torch import save

    state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    atomic_write_bytes(path, save(state, metadata={"format": "pt", **(metadata or {})}))


def load_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A safetensors file's tensors, or a ValueError that names the file (truncated, or not safetensors)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"cannot read weights {path}: {e} (truncated or not a safetensors file?)") from e


def _listed(kind: str, names: list[str], most: int = 5, sep: str = ", ") -> str:
    """'missing 7 (a, b, c, d, e, ...)': a count and the first few names."""
    return f"{kind} {len(names)} ({sep.join(names[:most])}{', ...' if len(names) > most else ''})"


def state_problems(expected: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor]) -> list[str]:
    """What keeps `state` from loading into a model whose state dict is `expected`: missing, unexpected or
    misshapen tensors; then, when names and shapes fit, integer tensors of another dtype and NaN or inf
    values (weights that would load and then draw garbage). Empty when it fits."""
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    misshapen = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    problems = []
    if missing:
        problems.append(_listed("missing", missing))
    if unexpected:
        problems.append(_listed("unexpected", unexpected))
    if misshapen:
        problems.append(_listed("misshapen", misshapen, 3, "; "))
    if problems:
        return problems
    wrong = [
        f"{k}: {state[k].dtype} vs {v.dtype}"
        for k, v in expected.items()
        if state[k].dtype != v.dtype and not (state[k].is_floating_point() and v.is_floating_point())
    ]
    if wrong:
        problems.append(_listed("wrong dtype", wrong, 3, "; "))
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        problems.append(_listed("non-finite values (NaN or inf) in", bad))
    return problems


def load_state_strict(model: torch.nn.Module, weights_file: str | os.PathLike) -> None:
    """Load safetensors weights, failing with the names of missing, unexpected or misshapen tensors."""
    state = load_weights(weights_file)
    problems = state_problems(model.state_dict(), state)
    if problems:
        raise ValueError(
            f"weights in {weights_file} do not match the {type(model).__name__} described by its "
            f"config: " + "; ".join(problems)
        )
    model.load_state_dict(state, strict=True)


# ----------------------------------------------------------------------------------------------------
# Fingerprints: records on disk are keyed by these (tests/test_io.py pins each scheme)

FINGERPRINT_HEX = 16  # hex digits kept of a sha256: 64 bits, no collision among one user's models


def model_fingerprint(config: dict, state: Mapping[str, torch.Tensor]) -> str:
    """The image tokenizer's: its config as sorted JSON, then each tensor's name and float32 values. Blind to
    dtype (a half-precision copy keys the same caches); code caches, stores and pipelines' config.json keep it."""
    h = hashlib.sha256(json.dumps(config, sort_keys=True, default=list).encode())
    for name, t in sorted(state.items()):
        h.update(name.encode())
        h.update(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()[:FINGERPRINT_HEX]


def weights_fingerprint(module: torch.nn.Module) -> str:
    """A module's weights exactly: names, shapes, dtypes and bytes. A LoRA adapter keeps its base GPT's."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:FINGERPRINT_HEX]


def json_fingerprint(value) -> str:
    """Compact ASCII JSON of `value`, in its own key order (the text tokenizer's vocabulary and merges)."""
    blob = json.dumps(value, ensure_ascii=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:FINGERPRINT_HEX]


def cache_key(value) -> str:
    """sha1 of `value` as sorted JSON: the name of a cache entry for what it depends on (a tokenizer's
    fingerprint and the identity of the data, for codes)."""
    return hashlib.sha1(json.dumps(value, sort_keys=True).encode()).hexdigest()


# ----------------------------------------------------------------------------------------------------
# Image grids

MAX_LABEL = 60  # characters of a grid row's label


def to_pil_list(images) -> list:
    """Float (n, 3, H, W) in [0, 1] -> n PIL images (rounded to uint8); a list of PIL images stays as it is."""
    from PIL import Image

    if torch.is_tensor(images):
        arr = (images.detach().float().clamp(0, 1).permute(0, 2, 3, 1) * 255).round().to(torch.uint8)  # (n, H, W, 3)
        return [Image.fromarray(a) for a in arr.cpu().numpy()]
    return list(images)


def image_grid(rows: list, labels: list[str] | None = None, pad: int = 2):
    """Tile rows of images (lists of PIL images, or float tensors (n, 3, H, W) in [0, 1]) into one PIL
    image, one row per entry, with an optional text label at the left of each row."""
    from PIL import Image, ImageDraw

    rows = [to_pil_list(r) for r in rows]
    W, H = rows[0][0].size
    n = max(len(r) for r in rows)
    if labels:  # a label is one line of the default font, 6 px a character: long prompts are cut short
        labels = [s if len(s) <= MAX_LABEL else s[: MAX_LABEL - 3] + "..." for s in labels]
    label_w = 0 if not labels else 8 + 6 * max(len(s) for s in labels)
    grid = Image.new("RGB", (label_w + n * (W + pad) + pad, len(rows) * (H + pad) + pad), "white")
    draw = ImageDraw.Draw(grid)
    for r, images in enumerate(rows):
        for c, im in enumerate(images):
            grid.paste(im, (label_w + pad + c * (W + pad), pad + r * (H + pad)))
        if labels:
            draw.text((4, pad + r * (H + pad) + H // 2 - 5), labels[r], fill="black")
    return grid
