"""The shapes judge: reads shape, colour, size, position and background off `shapes` images.

It is how prompt adherence is measured on the shapes set (`python -m vqgpt.eval adherence`): it predicts the five
attributes of each generated image, and the eval compares them with the prompt. Colour, background and position
come from pixel statistics (the palettes are known exactly); shape and size from a tiny CNN trained on freshly
rendered shapes and cached under cache_root()/judge/. zero_shot_attributes is the LiT scorer's reading of the
same attributes (vqgpt/lit.py).

    judge = load_judge()                        # trains once (~10-30 s on a CPU), then loads
    judge.score(images, specs)                  # {"shape": 0.9, ..., "mean": 0.93}
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Sequence
from dataclasses import replace

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..io import save_weights
from .shapes import (
    _ATTRS,
    BACKGROUNDS,
    COLORS,
    POSITION_XY,
    POSITIONS,
    SHAPES,
    SIZES,
    ShapeSpec,
    all_specs,
    render_shape,
    shape_caption,
)
from .sources import cache_root

log = logging.getLogger("vqgpt.data")

ATTRIBUTES = _ATTRS  # what the judge reads: every attribute of a ShapeSpec, in its order


JUDGE_VERSION = 1  # bump when the judge or the shapes renderer changes: cached weights are retrained
_TRAIN_SEED = 1234  # fresh shapes for training: not the seeds of the training set or of accuracy_on_fresh
_FRESH_SEED = 98765
_TRAIN_IMAGES = 4000
_TRAIN_STEPS = 100
_BATCH = 256
_BORDER = 2  # pixels of frame that vote for the background colour
# A pixel belongs to the shape when it is farther than this from the background (RGB in [0, 1]). The
# closest shape colour to a background it can sit on is 0.45 away (purple on gray), so 0.2 keeps most
# of an anti-aliased rim out while keeping the whole body.
_FG_THRESHOLD = 0.2
_FG_FLOOR, _FG_SCALE = 0.1, 0.3  # the CNN sees (distance - floor) / scale in [0, 1]: the floor drops noise
_CROP = 0.75  # the CNN sees a window of 3/4 of the side centred on the shape: position is factored out
_CROP_PIXELS = 24  # ... resampled to 24x24 (a large shape, ~36 px across at 64 px, spans 18 of them)


def _palette(table: dict[str, tuple[int, int, int]]) -> tuple[list[str], Tensor]:
    return list(table), torch.tensor(list(table.values()), dtype=torch.float32) / 255  # (K, 3)


class _ShapeNet(nn.Module):
    """Foreground crop around the shape (B, 1, 24, 24) -> shape and size logits; ~25k parameters."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),  # (B, 8, 12, 12)
            nn.Conv2d(8, 16, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),  # (B, 16, 6, 6)
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),  # (B, 32, 3, 3)
        )
        self.head = nn.Sequential(
            nn.Flatten(), nn.Linear(32 * 9, 64), nn.ReLU(), nn.Linear(64, len(SHAPES) + len(SIZES))
        )

    def forward(self, crop: Tensor) -> tuple[Tensor, Tensor]:
        logits = self.head(self.features(crop))
        return logits[:, : len(SHAPES)], logits[:, len(SHAPES) :]


def _background(x: Tensor, palette: Tensor) -> tuple[Tensor, Tensor]:
    """(palette index (B,), distance of every pixel from the background as drawn (B, H, W))."""
    b = _BORDER
    frame = [x[:, :, :b], x[:, :, -b:], x[:, :, b:-b, :b], x[:, :, b:-b, -b:]]
    border = torch.cat([f.flatten(2) for f in frame], dim=2).transpose(1, 2)  # (B, P, 3)
    nearest = torch.cdist(border, palette[None].expand(len(x), -1, -1)).argmin(-1)  # (B, P)
    bg = F.one_hot(nearest, len(palette)).sum(1).argmax(1)  # (B,) majority: the shape may touch the frame
    mine = (nearest == bg[:, None]).unsqueeze(-1).float()  # (B, P, 1)
    bg_rgb = (border * mine).sum(1) / mine.sum(1).clamp(min=1)  # (B, 3): as drawn, not as the palette says
    return bg, (x - bg_rgb[:, :, None, None]).norm(dim=1)


def _centroids(fg: Tensor) -> Tensor:
    """Centre of mass of each mask (B, H, W) as (x, y) fractions of the side (B, 2); 0.5 when empty."""
    h, w = fg.shape[-2:]
    m = fg.float()
    ys = (torch.arange(h, device=fg.device) + 0.5) / h
    xs = (torch.arange(w, device=fg.device) + 0.5) / w
    mass = m.sum((1, 2))
    centre = torch.stack([(m.sum(1) * xs).sum(1), (m.sum(2) * ys).sum(1)], dim=1) / mass.clamp(min=1)[:, None]
    return torch.where(mass[:, None] > 0, centre, torch.full_like(centre, 0.5))


def _crops(dist: Tensor, centre: Tensor) -> Tensor:
    """Soft foreground (B, H, W) -> the window around each shape the CNN reads (B, 1, 24, 24)."""
    soft = ((dist - _FG_FLOOR) / _FG_SCALE).clamp(0, 1).unsqueeze(1)  # (B, 1, H, W)
    factor = max(1, round(_CROP * dist.shape[-1] / _CROP_PIXELS))
    if factor > 1:  # area-average first: bilinear sampling alone would alias
        soft = F.avg_pool2d(soft, factor)
    theta = torch.zeros(len(dist), 2, 3, device=dist.device)
    theta[:, 0, 0] = theta[:, 1, 1] = _CROP
    theta[:, :, 2] = 2 * centre - 1  # window centre in grid_sample's [-1, 1] coordinates
    grid = F.affine_grid(theta, [len(dist), 1, _CROP_PIXELS, _CROP_PIXELS], align_corners=False)
    return F.grid_sample(soft, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


class ShapesJudge:
    """Reads shape, colour, size, position and background off `shapes` images (B, 3, H, W) in [0, 1]."""

    def __init__(self, net: _ShapeNet, image_size: int = 64, device: str | torch.device = "cpu"):
        self.device = torch.device(device)
        self.net = net.to(self.device).eval()
        self.image_size = image_size
        self.bg_names, self.bg_rgb = _palette(BACKGROUNDS)
        self.color_names, self.color_rgb = _palette(COLORS)
        self.position_xy = torch.tensor([POSITION_XY[p] for p in POSITIONS])  # (P, 2) as (x, y) fractions

    def _prepare(self, images: Tensor) -> Tensor:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images (B, 3, H, W) in [0, 1], got {tuple(images.shape)}")
        x = images.detach().to(self.device, torch.float32).clamp(0, 1)
        if x.shape[-2:] != (self.image_size, self.image_size):
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", antialias=True)
        return x

    @torch.no_grad()
    def predict(self, images: Tensor) -> list[dict[str, str]]:
        """One dict attribute -> value per image."""
        x = self._prepare(images)
        bg, dist = _background(x, self.bg_rgb.to(x.device))
        fg = dist > _FG_THRESHOLD  # (B, H, W)
        centre = _centroids(fg)
        shape_logits, size_logits = self.net(_crops(dist, centre))
        positions = torch.cdist(centre.cpu(), self.position_xy).argmin(1)  # (B,)
        out = []
        for i in range(len(x)):
            bg_name = self.bg_names[bg[i]]
            allowed = [k for k, name in enumerate(self.color_names) if name != bg_name]
            d = dist[i][fg[i]]
            if len(d):
                # the median of the shape's most saturated pixels: robust to its soft rim and to speckle
                core = fg[i] & (dist[i] >= 0.7 * torch.quantile(d, 0.9))
                rgb = x[i][:, core].median(dim=1).values.cpu()  # (3,)
            else:  # nothing drawn: any answer is as wrong as another
                rgb = self.bg_rgb[bg[i]]
            color = allowed[int((self.color_rgb[allowed] - rgb).norm(dim=1).argmin())]
            out.append(
                {
                    "shape": SHAPES[int(shape_logits[i].argmax())],
                    "color": self.color_names[color],
                    "size": SIZES[int(size_logits[i].argmax())],
                    "position": POSITIONS[int(positions[i])],
                    "background": bg_name,
                }
            )
        return out

    def score(self, images: Tensor, specs: Sequence[ShapeSpec]) -> dict[str, float]:
        """Per-attribute accuracy against the specs the images were asked for, plus their "mean"."""
        if len(images) != len(specs):
            raise ValueError(f"{len(images)} images but {len(specs)} specs")
        predictions = self.predict(images)
        scores = {a: sum(p[a] == getattr(s, a) for p, s in zip(predictions, specs)) / len(specs) for a in ATTRIBUTES}
        scores["mean"] = sum(scores.values()) / len(ATTRIBUTES)
        return scores

    def accuracy_on_fresh(self, n: int = 500, seed: int = _FRESH_SEED) -> dict[str, float]:
        """The judge's own accuracy on n freshly rendered (jittered) true shapes: its ceiling."""
        specs, images = _fresh_shapes(n, self.image_size, seed)
        return self.score(images, specs)


def _fresh_shapes(n: int, image_size: int, seed: int) -> tuple[list[ShapeSpec], Tensor]:
    """n random valid specs (held-out combinations included) and their renders, float (n, 3, S, S)."""
    rng = random.Random(seed)
    pool = all_specs()
    specs = [rng.choice(pool) for _ in range(n)]
    pixels = np.stack([np.asarray(render_shape(s, image_size, rng)) for s in specs])  # (n, S, S, 3)
    return specs, torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255  # (n, 3, S, S)


def _degrade(x: Tensor, gen: torch.Generator) -> Tensor:
    """Training augmentation: per image none / 3x3 blur / 2x or 4x down-up sampling, then gaussian noise,
    so the judge also reads the softer, noisier images a tokenizer decodes."""
    size = x.shape[-2:]
    blurs = [
        lambda t: F.avg_pool2d(t, 3, stride=1, padding=1, count_include_pad=False),
        lambda t: F.interpolate(F.avg_pool2d(t, 2), size=size, mode="bilinear", align_corners=False),
        lambda t: F.interpolate(F.avg_pool2d(t, 4), size=size, mode="bilinear", align_corners=False),
    ]
    kind = torch.randint(len(blurs) + 1, (len(x),), generator=gen).to(x.device)  # 0: left sharp
    out = x.clone()
    for k, blur in enumerate(blurs, start=1):
        sel = (kind == k).nonzero().squeeze(1)
        if len(sel):
            out[sel] = blur(x[sel])
    sigma = 0.05 * torch.rand(len(x), 1, 1, 1, generator=gen).to(x.device)
    return (out + sigma * torch.randn(x.shape, generator=gen).to(x.device)).clamp_(0, 1)


def _train_net(image_size: int, device: torch.device) -> _ShapeNet:
    """Fit the shape/size CNN on fresh jittered shapes, each degraded once and read through the same
    pipeline as predict; the crops are tiny, so the training steps are cheap."""
    t0 = time.time()
    specs, images = _fresh_shapes(_TRAIN_IMAGES, image_size, _TRAIN_SEED)
    bg_palette = _palette(BACKGROUNDS)[1].to(device)
    gen = torch.Generator().manual_seed(_TRAIN_SEED)
    crops = []
    for chunk in images.split(500):
        _, dist = _background(_degrade(chunk.to(device), gen), bg_palette)
        crops.append(_crops(dist, _centroids(dist > _FG_THRESHOLD)))
    crops = torch.cat(crops)  # (N, 1, 24, 24)
    y_shape = torch.tensor([SHAPES.index(s.shape) for s in specs], device=device)
    y_size = torch.tensor([SIZES.index(s.size) for s in specs], device=device)
    with torch.random.fork_rng(devices=[]):  # a seeded init that leaves the caller's RNG alone
        torch.manual_seed(_TRAIN_SEED)
        net = _ShapeNet().to(device)
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3, weight_decay=1e-4, foreach=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / _TRAIN_STEPS)))
    for _ in range(_TRAIN_STEPS):
        idx = torch.randint(len(crops), (_BATCH,), generator=gen).to(device)
        shape_logits, size_logits = net(crops[idx])
        loss = F.cross_entropy(shape_logits, y_shape[idx]) + F.cross_entropy(size_logits, y_size[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    log.info("trained the shapes judge at %d px in %.1f s (last loss %.4f)", image_size, time.time() - t0, loss.item())
    return net.eval()


def load_judge(image_size: int = 64, device: str | torch.device = "cpu") -> ShapesJudge:
    """The shapes judge for images of this size: trained on first use (seconds), then loaded from cache."""
    from safetensors.torch import load_file

    device = torch.device(device)
    path = cache_root() / "judge" / f"shapes-judge-v{JUDGE_VERSION}-{image_size}px.safetensors"
    net = _ShapeNet()
    if path.is_file():
        try:
            net.load_state_dict(load_file(str(path)))
            return ShapesJudge(net, image_size, device)
        except (OSError, RuntimeError, ValueError) as e:  # corrupt or from another version: retrain
            log.warning("ignoring unreadable judge weights %s (%s)", path, e)
    net = _train_net(image_size, device)
    save_weights(path, net.state_dict(), metadata={"image_size": str(image_size), "version": str(JUDGE_VERSION)})
    return ShapesJudge(net, image_size, device)


# --- the LiT scorer's reading of the same attributes (vqgpt/lit.py, `python -m vqgpt.eval alignment`) ------
_VALUES = {
    "shape": SHAPES,
    "color": tuple(COLORS),
    "size": SIZES,
    "position": POSITIONS,
    "background": tuple(BACKGROUNDS),
}


def zero_shot_attributes(scorer, codes: Tensor, specs: Sequence[ShapeSpec]) -> dict[str, float]:
    """The scorer's zero-shot reading of each attribute: for each image and attribute, rank the captions that
    differ from the true one in that attribute only (the valid ones) and count the image right when its own
    caption scores highest. Returns per-attribute accuracy and their "mean"."""
    hits = {a: 0 for a in ATTRIBUTES}
    for attr in ATTRIBUTES:
        candidates, owners, truth = [], [], []
        for spec in specs:
            valid = [v for v in _VALUES[attr] if _valid_change(spec, attr, v)]
            truth.append(len(candidates) + valid.index(getattr(spec, attr)))
            candidates += [shape_caption(replace(spec, **{attr: v})) for v in valid]
            owners.append(len(valid))
        scores = scorer.score_codes(codes.repeat_interleave(torch.tensor(owners), 0), candidates)
        start = 0
        for n, t in zip(owners, truth):
            hits[attr] += int(start + int(scores[start : start + n].argmax()) == t)
            start += n
    out = {a: hits[a] / max(len(specs), 1) for a in ATTRIBUTES}
    out["mean"] = sum(out.values()) / len(ATTRIBUTES)
    return out


def _valid_change(spec: ShapeSpec, attr: str, value: str) -> bool:
    """Would spec with attr set to value be a valid combination (the shape's colour is not the background)?"""
    color = value if attr == "color" else spec.color
    return color != (value if attr == "background" else spec.background)
