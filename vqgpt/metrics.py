"""What vqgpt measures: image fidelity (PSNR, SSIM), codebook use, the diversity of samples (entropy), and what
a training run costs (trainable parameters, peak memory).

The shapes judge, which reads the attributes of shapes images for the adherence evaluation, is the shapes set's
own code: vqgpt/data/shapes_judge.py (its names stay importable from here).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

# The shapes judge moved beside the shapes set; vqgpt.eval and tests import these from here.
from .data.shapes_judge import ATTRIBUTES, load_judge, zero_shot_attributes  # noqa: F401

if TYPE_CHECKING:
    from .data.shapes import ShapeSpec


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


def trainable_summary(module: torch.nn.Module) -> dict:
    """How much of a model trains: all of it in a full run, the adapters (and new token rows) under LoRA."""
    total = sum(p.numel() for p in module.parameters())
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    return {"trainable_params": trainable, "total_params": total, "trainable_fraction": trainable / max(total, 1)}


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this process so far: CUDA allocations on a GPU, resident set size on a CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def entropy(values: Sequence, miller_madow: bool = False) -> float:
    """Entropy in nats of the empirical distribution of `values`; with miller_madow, plus (K - 1) / 2n for the
    K values seen (Miller 1955): the plug-in estimate from n samples is biased low by about that much."""
    if not values:
        return 0.0
    counts = np.unique(np.asarray(values, dtype=object).astype(str), return_counts=True)[1]
    p = counts / counts.sum()
    h = float(-(p * np.log(p)).sum())
    return h + (len(counts) - 1) / (2 * len(values)) if miller_madow else h


def data_entropy(said: dict[str, str], attr: str, specs: Sequence[ShapeSpec]) -> float:
    """Entropy of `attr` over the training specs that agree with the said attributes (the data's variety)."""
    return entropy([getattr(s, attr) for s in specs if all(getattr(s, k) == v for k, v in said.items())])
