"""Image metrics (PSNR, SSIM, codebook usage) and the judge that reads the attributes of shapes images.

The judge is how prompt adherence is measured on the `shapes` set: it predicts shape, colour, size,
position and background of each generated image, and the eval compares them with the prompt.
Colour, background and position come from pixel statistics (the palettes are known exactly); shape
and size from a tiny CNN trained on freshly rendered shapes and cached under cache_root()/judge/.

    judge = load_judge()                        # trains once (~10-30 s on a CPU), then loads
    judge.score(images, specs)                  # {"shape": 0.9, ..., "mean": 0.93}
"""

from __future__ import annotations

import logging
import math
import os
import random
import time
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .data import (
    BACKGROUNDS,
    COLORS,
    POSITION_XY,
    POSITIONS,
    SHAPES,
    SIZES,
    ShapeSpec,
    all_specs,
    cache_root,
    render_shape,
)

log = logging.getLogger(__name__)

ATTRIBUTES = ("shape", "color", "size", "position", "background")


def _check_pair(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    if x.shape != y.shape or x.dim() != 4:
        raise ValueError(
            f"expected two image batches (B, C, H, W) of one shape, got {tuple(x.shape)} and {tuple(y.shape)}"
        )
    return x.detach().double(), y.detach().double()


def psnr(x: Tensor, y: Tensor) -> float:
    """Mean over the batch of each image's PSNR in dB, for images in [0, 1] (inf where identical)."""
    x, y = _check_pair(x, y)
    mse = (x - y).pow(2).flatten(1).mean(1)  # (B,)
    return (10 * torch.log10(1.0 / mse)).mean().item()  # 1/0 -> inf: identical images


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> Tensor:
    g = torch.exp(-((torch.arange(size, dtype=torch.float64) - (size - 1) / 2) ** 2) / (2 * sigma**2))
    g = g / g.sum()
    return torch.outer(g, g)  # (size, size), sums to 1


def ssim(x: Tensor, y: Tensor) -> float:
    """Mean SSIM (Wang et al. 2004: 11x11 gaussian window, sigma 1.5, K1 0.01, K2 0.03, data range 1),
    computed on each channel over the valid window positions, averaged over channels and the batch."""
    x, y = _check_pair(x, y)
    size = 11
    if min(x.shape[-2:]) < size:
        raise ValueError(f"SSIM needs images of at least {size}x{size} pixels, got {tuple(x.shape[-2:])}")
    c = x.shape[1]
    w = _gaussian_window(size).to(x.device).expand(c, 1, size, size)  # one window per channel
    blur = lambda t: F.conv2d(t, w, groups=c)
    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = 0.01**2, 0.03**2
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return ssim_map.mean().item()


def codebook_stats(codes: Tensor, codebook_size: int) -> dict:
    """{"usage": distinct codes used / codebook_size, "perplexity": exp(entropy of code frequencies)}.
    Perplexity is codebook_size when every code is equally used, 1 when a single code is."""
    flat = codes.detach().flatten().long().cpu()
    if flat.numel() == 0:
        raise ValueError("codebook_stats needs at least one code")
    if flat.min() < 0 or flat.max() >= codebook_size:
        raise ValueError(f"codes span [{flat.min()}, {flat.max()}], outside a codebook of {codebook_size}")
    p = torch.bincount(flat, minlength=codebook_size).double() / flat.numel()
    entropy = -(p[p > 0] * p[p > 0].log()).sum()
    return {"usage": (p > 0).sum().item() / codebook_size, "perplexity": entropy.exp().item()}


# ---------------------------------------------------------------------------------------------------
# the shapes judge
# ---------------------------------------------------------------------------------------------------

JUDGE_VERSION = 1  # bump when the judge or the shapes renderer changes: cached weights are retrained
_TRAIN_SEED = 1234  # fresh shapes for training: not the seeds of the training set or of accuracy_on_fresh
_FRESH_SEED = 98765
_TRAIN_IMAGES = 3000
_TRAIN_STEPS = 400
_BORDER = 2  # pixels of frame that vote for the background colour
# A pixel belongs to the shape when it is farther than this from the background (RGB in [0, 1]). The
# closest shape colour to a background it can sit on is 0.45 away (purple on gray), so 0.2 keeps
# anti-aliased edges out of the colour estimate while keeping the shape's body.
_FG_THRESHOLD = 0.2
_FG_SCALE = 0.4  # the CNN sees distance / this, clipped to [0, 1]


def _palette(table: dict[str, tuple[int, int, int]]) -> tuple[list[str], Tensor]:
    return list(table), torch.tensor(list(table.values()), dtype=torch.float32) / 255  # (K, 3)


class _ShapeNet(nn.Module):
    """Foreground map (B, 1, S, S) -> logits for shape and size: three convs, ~80k parameters."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 5, stride=2, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(2),  # S/4
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),  # S/8
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveMaxPool2d(4),  # (B, 64, 4, 4) whatever the image size
        )
        self.head = nn.Sequential(
            nn.Flatten(), nn.Linear(64 * 16, 64), nn.ReLU(), nn.Linear(64, len(SHAPES) + len(SIZES))
        )

    def forward(self, fg: Tensor) -> tuple[Tensor, Tensor]:
        logits = self.head(self.features(fg))
        return logits[:, : len(SHAPES)], logits[:, len(SHAPES) :]


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
        x = images.detach().to(self.device, torch.float32).clamp(0, 1)
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"expected images (B, 3, H, W), got {tuple(images.shape)}")
        if x.shape[-2:] != (self.image_size, self.image_size):
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", antialias=True)
        return x

    def _analyse(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(background index (B,), background RGB (B, 3), distance from background (B, H, W))."""
        b = _BORDER
        border = torch.cat(
            [
                x[:, :, :b].flatten(2),
                x[:, :, -b:].flatten(2),
                x[:, :, b:-b, :b].flatten(2),
                x[:, :, b:-b, -b:].flatten(2),
            ],
            dim=2,
        ).transpose(1, 2)  # (B, P, 3) frame pixels
        nearest = torch.cdist(border, self.bg_rgb.to(x.device)[None]).argmin(-1)  # (B, P)
        votes = F.one_hot(nearest, len(self.bg_names)).sum(1)  # (B, K)
        bg = votes.argmax(1)  # (B,) majority of the frame: the shape may touch it, noise may speckle it
        mine = (nearest == bg[:, None]).unsqueeze(-1).float()  # (B, P, 1)
        bg_rgb = (border * mine).sum(1) / mine.sum(1).clamp(min=1)  # (B, 3) as drawn, not as the palette says
        dist = (x - bg_rgb[:, :, None, None]).norm(dim=1)  # (B, H, W)
        return bg, bg_rgb, dist

    @torch.no_grad()
    def predict(self, images: Tensor) -> list[dict[str, str]]:
        """One dict attribute -> value per image."""
        x = self._prepare(images)
        bg, _, dist = self._analyse(x)
        shape_logits, size_logits = self.net((dist / _FG_SCALE).clamp(0, 1).unsqueeze(1))
        fg = dist > _FG_THRESHOLD  # (B, H, W)
        h, w = dist.shape[-2:]
        ys = (torch.arange(h, device=x.device, dtype=torch.float32) + 0.5) / h
        xs = (torch.arange(w, device=x.device, dtype=torch.float32) + 0.5) / w
        out = []
        for i in range(len(x)):
            m = fg[i]
            bg_name = self.bg_names[bg[i]]
            allowed = [k for k, name in enumerate(self.color_names) if name != bg_name]
            if m.any():
                # median of the shape's pixels: robust to its anti-aliased rim and to speckle
                rgb = x[i][:, m].median(dim=1).values  # (3,)
                wy, wx = m.float().sum(1), m.float().sum(0)  # row and column masses
                centre = torch.stack([(wx * xs).sum(), (wy * ys).sum()]).cpu() / m.sum().cpu()
            else:  # nothing drawn: any answer is as wrong as another
                rgb = self.bg_rgb[bg[i]].to(x.device)
                centre = torch.tensor([0.5, 0.5])
            palette = self.color_rgb.to(x.device)[allowed]
            color = self.color_names[allowed[int((palette - rgb).norm(dim=1).argmin())]]
            position = POSITIONS[int((self.position_xy - centre).norm(dim=1).argmin())]
            out.append(
                {
                    "shape": SHAPES[int(shape_logits[i].argmax())],
                    "color": color,
                    "size": SIZES[int(size_logits[i].argmax())],
                    "position": position,
                    "background": bg_name,
                }
            )
        return out

    def score(self, images: Tensor, specs: Sequence[ShapeSpec]) -> dict[str, float]:
        """Per-attribute accuracy against the specs the images were asked for, plus their "mean"."""
        if len(images) != len(specs):
            raise ValueError(f"{len(images)} images but {len(specs)} specs")
        predictions = self.predict(images)
        scores = {
            a: sum(p[a] == getattr(s, a) for p, s in zip(predictions, specs)) / len(specs) for a in ATTRIBUTES
        }
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
    images = torch.stack(
        [
            torch.frombuffer(bytearray(render_shape(s, image_size, rng).tobytes()), dtype=torch.uint8)
            for s in specs
        ]
    )
    images = images.view(n, image_size, image_size, 3).permute(0, 3, 1, 2).float() / 255  # (n, 3, S, S)
    return specs, images


def _train_net(image_size: int, device: torch.device) -> _ShapeNet:
    """Fit the shape/size CNN on fresh shapes. Foreground maps are augmented with blur and noise, so the
    judge also reads the softer, noisier images a tokenizer decodes."""
    t0 = time.time()
    specs, images = _fresh_shapes(_TRAIN_IMAGES, image_size, _TRAIN_SEED)
    judge = ShapesJudge(_ShapeNet(), image_size, device)
    _, _, dist = judge._analyse(images.to(device))
    fg = (dist / _FG_SCALE).clamp(0, 1).unsqueeze(1)  # (N, 1, S, S)
    y_shape = torch.tensor([SHAPES.index(s.shape) for s in specs], device=device)
    y_size = torch.tensor([SIZES.index(s.size) for s in specs], device=device)
    gen = torch.Generator().manual_seed(_TRAIN_SEED)
    with torch.random.fork_rng(devices=[]):  # a seeded init that leaves the caller's RNG alone
        torch.manual_seed(_TRAIN_SEED)
        net = _ShapeNet().to(device)
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / _TRAIN_STEPS)))
    net.train()
    for _ in range(_TRAIN_STEPS):
        idx = torch.randint(len(fg), (128,), generator=gen).to(device)
        xb = fg[idx]
        blurred = torch.rand(len(idx), 1, 1, 1, generator=gen).to(device) < 0.5
        xb = torch.where(blurred, F.avg_pool2d(xb, 3, stride=1, padding=1, count_include_pad=False), xb)
        xb = (
            xb
            + 0.08
            * torch.rand(len(idx), 1, 1, 1, generator=gen).to(device)
            * torch.randn(xb.shape, generator=gen).to(device)
        ).clamp(0, 1)
        shape_logits, size_logits = net(xb)
        loss = F.cross_entropy(shape_logits, y_shape[idx]) + F.cross_entropy(size_logits, y_size[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    log.info(
        "trained the shapes judge at %d px in %.1f s (final loss %.3f)",
        image_size,
        time.time() - t0,
        loss.item(),
    )
    return net.eval()


def load_judge(image_size: int = 64, device: str | torch.device = "cpu") -> ShapesJudge:
    """The shapes judge for images of this size: trained on first use, then loaded from the cache."""
    from safetensors.torch import load_file, save_file

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
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    save_file(
        {k: v.contiguous().cpu() for k, v in net.state_dict().items()},
        str(tmp),
        metadata={"image_size": str(image_size)},
    )
    os.replace(tmp, path)
    return ShapesJudge(net, image_size, device)
