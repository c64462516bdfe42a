"""vqgpt.metrics: PSNR and SSIM on known cases, codebook statistics, the shapes judge."""

import math
import time

import numpy as np
import pytest
import torch

from vqgpt.data import COLORS, SHAPES, ShapeSpec, all_specs, load_image_tensors, parse_shape_caption, render_shape
from vqgpt.metrics import ATTRIBUTES, codebook_stats, load_judge, psnr, ssim


def _const(value: float, b: int = 1, size: int = 16) -> torch.Tensor:
    return torch.full((b, 3, size, size), value)


def test_psnr_known_values():
    x = torch.rand(2, 3, 16, 16)
    assert psnr(x, x) == math.inf
    assert psnr(_const(0.5), _const(0.6)) == pytest.approx(20.0)  # MSE 0.01 -> 10 log10(1 / 0.01)
    # the mean of per-image PSNRs (20 and 40 dB), not the PSNR of the pooled MSE
    a = torch.cat([_const(0.5), _const(0.5)])
    b = torch.cat([_const(0.6), _const(0.51)])
    assert psnr(a, b) == pytest.approx(30.0)
    with pytest.raises(ValueError, match="shape"):
        psnr(x, x[:1])


def _ssim_reference(x: np.ndarray, y: np.ndarray) -> float:
    """SSIM written out window by window (Wang et al. 2004), for one (H, W) channel."""
    r = np.arange(11) - 5
    g = np.exp(-(r**2) / (2 * 1.5**2))
    w = np.outer(g, g) / np.outer(g, g).sum()
    c1, c2 = 0.01**2, 0.03**2
    values = []
    for i in range(x.shape[0] - 10):
        for j in range(x.shape[1] - 10):
            a, b = x[i : i + 11, j : j + 11], y[i : i + 11, j : j + 11]
            ma, mb = (w * a).sum(), (w * b).sum()
            va, vb = (w * (a - ma) ** 2).sum(), (w * (b - mb) ** 2).sum()
            cov = (w * (a - ma) * (b - mb)).sum()
            values.append(((2 * ma * mb + c1) * (2 * cov + c2)) / ((ma**2 + mb**2 + c1) * (va + vb + c2)))
    return float(np.mean(values))


def test_ssim_known_values():
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    assert ssim(x, x) == pytest.approx(1.0, abs=1e-9)
    # flat images: only the luminance term is left, (2ab + C1) / (a^2 + b^2 + C1)
    c1 = 0.01**2
    assert ssim(_const(0.5), _const(0.25)) == pytest.approx((2 * 0.125 + c1) / (0.25 + 0.0625 + c1))
    noisy = (x + 0.1 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1))).clamp(0, 1)
    expected = np.mean([_ssim_reference(x[b, c].numpy(), noisy[b, c].numpy()) for b in range(2) for c in range(3)])
    assert ssim(x, noisy) == pytest.approx(expected, rel=1e-6)
    assert ssim(x, noisy) == pytest.approx(ssim(noisy, x))
    assert 0 < ssim(x, noisy) < 0.99
    with pytest.raises(ValueError, match="at least 11x11"):
        ssim(_const(0.5, size=8), _const(0.5, size=8))


def test_codebook_stats():
    k = 16
    uniform = codebook_stats(torch.arange(k).repeat(10).view(10, 4, 4), k)
    assert uniform["usage"] == 1.0 and uniform["perplexity"] == pytest.approx(k)
    single = codebook_stats(torch.full((3, 4, 4), 5), k)
    assert single["usage"] == 1 / k and single["perplexity"] == pytest.approx(1.0)
    half = codebook_stats(torch.arange(k // 2).repeat(4), k)
    assert half["usage"] == 0.5 and half["perplexity"] == pytest.approx(k / 2)
    skewed = codebook_stats(torch.tensor([0, 0, 0, 1]), k)  # entropy of (3/4, 1/4)
    assert skewed["perplexity"] == pytest.approx(math.exp(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25))))
    with pytest.raises(ValueError, match="outside"):
        codebook_stats(torch.tensor([0, k]), k)


@pytest.fixture(scope="module")
def judge():
    """The judge from the real cache (trains once, then loads in milliseconds): it is a fixed artifact
    that the evals share, so there is nothing to keep apart from the user's cache."""
    t0 = time.time()
    j = load_judge(64)
    print(f"load_judge took {time.time() - t0:.1f} s")
    return j


def test_judge_accuracy_on_fresh_shapes(judge):
    acc = judge.accuracy_on_fresh(n=500)
    assert set(acc) == set(ATTRIBUTES) | {"mean"}
    for attr in ATTRIBUTES:
        assert acc[attr] >= 0.98, acc


def test_judge_reads_the_held_out_test_split(judge, tmp_path, monkeypatch):
    monkeypatch.setenv("VQGPT_CACHE", str(tmp_path))
    images, captions = load_image_tensors("shapes", "test", 64, limit=80)
    scores = judge.score(images.float() / 255, [parse_shape_caption(c) for c in captions])
    assert min(scores[a] for a in ATTRIBUTES) >= 0.95, scores


def test_judge_scores_wrong_prompts_low(judge):
    specs = all_specs()[::13][:100]
    images = torch.stack([torch.from_numpy(np.array(render_shape(s))).permute(2, 0, 1) for s in specs]) / 255
    predictions = judge.predict(images)
    assert len(predictions) == len(specs) and set(predictions[0]) == set(ATTRIBUTES)
    # ask for another shape and, where the background allows it, another colour
    colors = list(COLORS)
    wrong = [
        ShapeSpec(
            SHAPES[(SHAPES.index(s.shape) + 1) % len(SHAPES)],
            next(c for c in colors[colors.index(s.color) + 1 :] + colors if c not in (s.color, s.background)),
            s.size,
            s.position,
            s.background,
        )
        for s in specs
    ]
    scores = judge.score(images, wrong)
    assert scores["shape"] < 0.05 and scores["color"] < 0.05 and scores["size"] > 0.95
    assert scores["mean"] == pytest.approx(sum(scores[a] for a in ATTRIBUTES) / len(ATTRIBUTES))


def test_judge_handles_other_sizes_and_blank_images(judge):
    spec = all_specs()[0]
    big = torch.from_numpy(np.array(render_shape(spec, 128))).permute(2, 0, 1)[None] / 255
    assert judge.predict(big)[0]["shape"] == spec.shape  # resized to the judge's 64 px
    blank = torch.ones(2, 3, 64, 64)
    assert [p["background"] for p in judge.predict(blank)] == ["white", "white"]
    with pytest.raises(ValueError, match="images"):
        judge.predict(torch.ones(2, 64, 64))
