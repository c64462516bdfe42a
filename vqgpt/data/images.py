"""One image at a time: stored bytes or a file decoded in full, checked, and turned into RGB pixels, so that a
truncated, huge or absurdly shaped file is skipped when a set is read, not met in the middle of training."""

from __future__ import annotations

import io
import os

import numpy as np
import torch
from PIL import Image, ImageOps

from ..io import is_regular_file

_EXIF_ORIENTATION = 0x0112
MAX_ASPECT = 16  # longest side over shortest: a 1,000,000 x 1 strip would be upscaled to gigabytes to fill a square
MAX_PIXELS = 2**26  # 8192 x 8192: a larger image takes gigabytes to decode (PIL's own bomb limit is ~89 M)


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode to RGB: transparency onto white, 16/32-bit grey scaled (not clipped) to 8 bits.
    Returns `img` itself when it is already plain RGB."""
    if img.getexif().get(_EXIF_ORIENTATION, 1) != 1:  # phone photos: pixels stored sideways
        img = ImageOps.exif_transpose(img)
    if img.mode == "RGB":
        return img
    if img.mode.startswith("I") or img.mode == "F":
        a = np.asarray(img, dtype=np.float64)
        if img.mode.startswith("I;16") or a.max() > 255:
            a = a / 257.0  # 16-bit range to 8-bit
        elif img.mode == "F" and a.max() <= 1.0:
            a = a * 255.0
        img = Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8))
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (img.mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", img.size, (255, 255, 255, 255)), img).convert("RGB")
    return img.convert("RGB")


def square_tensor(img: Image.Image, image_size: int) -> torch.Tensor:
    """PIL image -> uint8 (3, S, S): shorter side resized to S (LANCZOS when shrinking), centre crop."""
    img = img if img.mode == "RGB" else to_rgb(img)
    w, h = img.size
    if (w, h) != (image_size, image_size):
        scale = image_size / min(w, h)
        nw, nh = max(image_size, round(w * scale)), max(image_size, round(h * scale))
        img = img.resize((nw, nh), Image.Resampling.LANCZOS if scale < 1 else Image.Resampling.BICUBIC)
        left, top = (nw - image_size) // 2, (nh - image_size) // 2
        img = img.crop((left, top, left + image_size, top + image_size))
    return torch.from_numpy(np.array(img)).permute(2, 0, 1)  # (H, W, 3) -> (3, H, W)


def _open_image(value: dict) -> Image.Image:
    if value.get("bytes"):
        img = Image.open(io.BytesIO(value["bytes"]))
        img.load()  # decodes every byte: a truncated file fails here, not in the middle of training
        return img
    with open(value["path"], "rb") as f:
        img = Image.open(f)
        img.load()
    return img


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=1)  # small images: speed over a few bytes
    return buf.getvalue()


class _Unusable(Exception):
    """An image to skip; the message is the reason counted in the warning."""


def _decode_checked(value: dict) -> tuple[Image.Image, Image.Image]:
    """(image, RGB) of an undecoded `datasets` image, decoded in full (a truncated file fails here, not in the
    middle of training); raises _Unusable for an unreadable, missing, absurdly shaped or huge image."""
    data, path = value.get("bytes"), value.get("path")
    if data is None:
        if not path:
            raise _Unusable("no image")
        if not is_regular_file(path):  # a FIFO would block the reader forever; a dangling link cannot be read
            if not os.path.lexists(path):
                raise _Unusable("unreadable")
            raise _Unusable("dangling link" if os.path.islink(path) else "not a regular file")
    try:
        if data is None:
            with open(path, "rb") as f:
                data = f.read()
        img = Image.open(io.BytesIO(data))  # reads the header only: the size is known before any decoding
    except Exception:  # PIL's decoders raise many kinds of errors on corrupt input; each means: skip it
        raise _Unusable("unreadable") from None
    w, h = img.size
    if min(w, h) < 1 or max(w, h) > MAX_ASPECT * min(w, h):
        raise _Unusable(f"aspect ratio over {MAX_ASPECT}:1")
    if w * h > MAX_PIXELS:
        raise _Unusable(f"too large (over {MAX_PIXELS} pixels)")
    try:
        img.load()
        return img, to_rgb(img)
    except Exception:
        raise _Unusable("unreadable") from None


def _image_value(value, name: str | None = None) -> dict:
    """Any stored image (a {"bytes", "path"} dict, raw bytes, a PIL image, None) as an undecoded dict."""
    if isinstance(value, dict):
        return {"bytes": value.get("bytes"), "path": value.get("path") or name}
    if isinstance(value, (bytes, bytearray)):
        return {"bytes": bytes(value), "path": name}
    if isinstance(value, Image.Image):
        return {"bytes": _png(value), "path": name}
    return {"bytes": None, "path": None}
