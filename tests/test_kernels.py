"""Triton kernels against their PyTorch references.

Without a GPU the kernels run on the Triton interpreter (TRITON_INTERPRET=1, set below before triton is
imported) at small sizes; with one, the same tests run natively, plus bigger sizes and bf16 (which the
interpreter computes wrongly). Sampling is checked exactly against the one definition of the rules,
vqgpt.generate (the reference calls it: same counter-based noise, same tie rule, so the same tokens), and
statistically (with fixed seeds, so the frequency tests are deterministic: they cannot flake).
"""

import importlib
import math
import os

import pytest
import torch

ON_GPU = torch.cuda.is_available()
if not ON_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first `import triton`
DEVICE = "cuda" if ON_GPU else "cpu"

import vqgpt.generate  # noqa: E402 (after TRITON_INTERPRET, which must precede the first `import triton`)
import vqgpt.kernels as K  # noqa: E402
import vqgpt.model  # noqa: E402

sampling_module = importlib.import_module("vqgpt.kernels.sampling")


def _triton_runnable() -> str | None:
    """Why the Triton kernels cannot run here, or None when they can."""
    if not K.HAS_TRITON:
        return "triton is not installed"
    if ON_GPU:
        return None
    import triton.language.standard
    from triton.runtime.interpreter import InterpretedFunction

    if not isinstance(triton.language.standard.cdiv, InterpretedFunction):
        return (
            "triton was imported before TRITON_INTERPRET=1 was set, so its kernels cannot run on the CPU "
            "interpreter: export TRITON_INTERPRET=1 (or set it in conftest.py) when there is no GPU"
        )
    return None


needs_triton = pytest.mark.skipif(_triton_runnable() is not None, reason=str(_triton_runnable()))
gpu_only = pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU (too big or bf16 for the interpreter)")


def test_triton_kernels_can_run_here():
    """With triton installed, every kernel test must run (natively or on the interpreter), never skip."""
    if not K.HAS_TRITON:
        pytest.skip("triton is not installed: only the references are tested")
    reason = _triton_runnable()
    assert reason is None, reason


# (dtype, atol, rtol): outputs are convex mixes of N(0, 1) values, so these are absolute-scale bounds.
DTYPE_TOLS = [
    pytest.param(torch.float16, 3e-3, 3e-3, id="fp16"),
    pytest.param(torch.float32, 2e-5, 2e-5, id="fp32"),
    pytest.param(torch.bfloat16, 2e-2, 2e-2, id="bf16", marks=gpu_only),
]


def assert_close(out: torch.Tensor, ref: torch.Tensor, atol: float, rtol: float, what: str) -> None:
    """Like torch.testing.assert_close, with a message that names the case, the worst index and values."""
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    assert out.dtype == ref.dtype, f"{what}: dtype {out.dtype} != reference {ref.dtype}"
    out, ref = out.float().cpu(), ref.float().cpu()
    nonfinite = ~torch.isfinite(out)
    if nonfinite.any():
        idx = tuple(torch.nonzero(nonfinite)[0].tolist())
        raise AssertionError(f"{what}: {int(nonfinite.sum())} non-finite outputs, first at {idx}: {out[idx]}")
    err = (out - ref).abs()
    excess = err - (atol + rtol * ref.abs())
    if (excess > 0).any():
        idx = tuple(int(i) for i in torch.unravel_index(excess.argmax(), excess.shape))
        raise AssertionError(
            f"{what}: {int((excess > 0).sum())} of {out.numel()} elements off (atol={atol}, rtol={rtol}); "
            f"max abs err {err.max().item():.3g}, worst at index {idx}: got {out[idx].item():.6g}, "
            f"reference {ref[idx].item():.6g}"
        )


def _randn(*shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(device=DEVICE, dtype=dtype)


# ---------------------------------------------------------------------------------------------------------
# prefill attention

# (B, Hq, Hkv, T, S, D, causal): odd lengths around the interpreter's 32/16 tiles, GQA and MHA, a padded
# head dim (48 -> 64), and a non-causal T != S.
ATTN_CASES = [
    (1, 2, 1, 1, 1, 64, True),
    (2, 4, 2, 7, 7, 64, True),
    (1, 2, 1, 63, 63, 64, True),
    (1, 2, 2, 65, 65, 48, True),
    (1, 2, 1, 129, 129, 64, True),
    (1, 2, 1, 7, 65, 48, False),
]
ATTN_GPU_CASES = [
    (2, 16, 16, 320, 320, 64, True),  # the config of record's prompt + image
    (3, 8, 2, 1000, 1000, 128, True),
    (2, 4, 4, 257, 257, 80, True),
    (2, 8, 4, 130, 515, 64, False),
]


def _attn_inputs(case, dtype, seed=0):
    B, Hq, Hkv, T, S, D, causal = case
    q = _randn(B, Hq, T, D, dtype=dtype, seed=seed)
    k = _randn(B, Hkv, S, D, dtype=dtype, seed=seed + 1)
    v = _randn(B, Hkv, S, D, dtype=dtype, seed=seed + 2)
    return q, k, v, causal


@needs_triton
@pytest.mark.parametrize("dtype,atol,rtol", DTYPE_TOLS)
@pytest.mark.parametrize("case", ATTN_CASES + [pytest.param(c, marks=gpu_only) for c in ATTN_GPU_CASES], ids=str)
def test_attention_matches_reference(case, dtype, atol, rtol):
    q, k, v, causal = _attn_inputs(case, dtype)
    out = K.attention(q, k, v, causal=causal, backend="triton")
    ref = K.attention_reference(q, k, v, causal=causal)
    assert_close(out, ref, atol, rtol, f"attention {case} {dtype}")


@needs_triton
def test_attention_strided_inputs_and_scale():
    """q, k, v as head-transposed views of (B, T, H, D) projections, as a model produces them."""
    B, T, Hq, Hkv, D = 1, 33, 4, 2, 64
    q = _randn(B, T, Hq, D, dtype=torch.float32, seed=3).transpose(1, 2)  # (B, Hq, T, D), strided
    kv = _randn(B, T, 2, Hkv, D, dtype=torch.float32, seed=4)
    k, v = kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)  # (B, Hkv, T, D)
    out = K.attention(q, k, v, sm_scale=0.3, backend="triton")
    ref = K.attention_reference(q, k, v, sm_scale=0.3)
    assert_close(out, ref, 2e-5, 2e-5, "attention on strided views, sm_scale=0.3")


def test_attention_reference_matches_sdpa():
    """The oracle itself, against PyTorch's SDPA (GQA by repeating KV heads)."""
    q, k, v, _ = _attn_inputs((2, 4, 2, 9, 9, 16, True), torch.float32)
    ref = K.attention_reference(q, k, v, causal=True)
    sdpa = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1), is_causal=True
    )
    assert_close(ref, sdpa, 1e-5, 1e-5, "attention_reference vs SDPA")


def test_backend_switch(monkeypatch):
    """ "auto" is Triton on CUDA only (the reference here); "triton" runs Triton or says in one line why not."""
    q, k, v, _ = _attn_inputs((1, 2, 1, 5, 5, 16, True), torch.float32)
    if not ON_GPU:
        launches = []
        monkeypatch.setattr(attention_module, "_attention_triton", lambda *a: launches.append(a))
        assert torch.equal(K.attention(q, k, v), K.attention_reference(q, k, v)) and not launches
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
        with pytest.raises(RuntimeError, match=r"^backend 'triton' needs CUDA tensors, these are on cpu; use"):
            K.attention(q, k, v, backend="triton")
    monkeypatch.setattr(vqgpt.model, "triton_installed", lambda: False)
    with pytest.raises(RuntimeError, match=r"^backend 'triton' needs the triton package"):
        K.cfg_sample(_logits(2, 10), cfg_scale=2.0, temperature=1.0, top_k=3, seeds=_seeds(2), step=0, backend="triton")


def test_attention_argument_errors():
    q, k, v, _ = _attn_inputs((1, 3, 2, 4, 4, 16, True), torch.float32)
    with pytest.raises(ValueError, match="multiple of KV heads"):
        K.attention(q, k, v)
    q, k, v, _ = _attn_inputs((1, 2, 1, 4, 6, 16, False), torch.float32)
    with pytest.raises(ValueError, match="T == S"):
        K.attention(q, k, v, causal=True)
    with pytest.raises(ValueError, match="unknown backend"):
        K.attention(q, k, v, causal=False, backend="cuda")


# ---------------------------------------------------------------------------------------------------------
# decode attention

# (Hq, Hkv, S_max, D, cache_len per row, num_splits): lengths 0 and 1, lengths that leave splits empty
# (cache_len 1 with 4 splits: splits 1..3 read nothing), a padded head dim, GQA, forced and automatic splits.
DECODE_CASES = [
    (4, 2, 129, 64, (1, 7, 65, 129), 4),
    (2, 2, 63, 48, (0, 63, 17), 3),
    (4, 1, 40, 64, (40, 1), 1),
    (2, 2, 100, 64, (5, 100), None),
    (2, 2, 70, 64, (70, 3), 16),  # more splits than live tiles
]
DECODE_GPU_CASES = [
    (16, 16, 321, 64, tuple(range(1, 322, 5)), None),  # 65 rows of the config of record
    (16, 4, 2048, 128, (1, 2048, 1000, 31), None),
    (8, 8, 4096, 64, (4096, 0, 4000), 32),
]


@needs_triton
@pytest.mark.parametrize("dtype,atol,rtol", DTYPE_TOLS)
@pytest.mark.parametrize("case", DECODE_CASES + [pytest.param(c, marks=gpu_only) for c in DECODE_GPU_CASES], ids=str)
def test_decode_attention_matches_reference(case, dtype, atol, rtol):
    Hq, Hkv, s_max, D, lens, num_splits = case
    B = len(lens)
    q = _randn(B, Hq, D, dtype=dtype, seed=10)
    k_cache = _randn(B, Hkv, s_max, D, dtype=dtype, seed=11)
    v_cache = _randn(B, Hkv, s_max, D, dtype=dtype, seed=12)
    cache_len = torch.tensor(lens, device=DEVICE)
    out = K.decode_attention(q, k_cache, v_cache, cache_len, num_splits=num_splits, backend="triton")
    ref = K.decode_attention_reference(q, k_cache, v_cache, cache_len)
    assert_close(out, ref, atol, rtol, f"decode_attention {case} {dtype}")
    if 0 in lens:
        assert (out[torch.tensor(lens) == 0] == 0).all(), "a row with cache_len 0 must give a zero output"


@needs_triton
def test_decode_attention_ignores_dead_cache_and_matches_prefill():
    """Garbage (even NaN) past cache_len is never read, and decoding the last token equals the last row of
    causal prefill attention."""
    B, Hq, Hkv, T, s_max, D = 2, 4, 2, 21, 48, 64
    q, k, v, _ = _attn_inputs((B, Hq, Hkv, T, T, D, True), torch.float32, seed=20)
    k_cache = torch.full((B, Hkv, s_max, D), float("nan"), device=DEVICE)
    v_cache = torch.full((B, Hkv, s_max, D), float("nan"), device=DEVICE)
    k_cache[:, :, :T], v_cache[:, :, :T] = k, v
    cache_len = torch.full((B,), T, device=DEVICE)
    out = K.decode_attention(q[:, :, -1], k_cache, v_cache, cache_len, num_splits=3, backend="triton")
    prefill = K.attention_reference(q, k, v, causal=True)[:, :, -1]
    assert_close(out, prefill, 2e-5, 2e-5, "decode of the last token vs causal prefill")


def test_decode_attention_argument_errors():
    q = torch.zeros(2, 4, 16)
    cache = torch.zeros(2, 2, 8, 16)
    with pytest.raises(ValueError, match="cache_len"):
        K.decode_attention(q, cache, cache, torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="multiple of KV heads"):
        K.decode_attention(torch.zeros(2, 3, 16), cache, cache, torch.tensor([1, 2]))


# ---------------------------------------------------------------------------------------------------------
# fused CFG sampling

SAMPLE_CONFIGS = [  # (cfg_scale, temperature, top_k, top_p)
    pytest.param(3.0, 1.0, 10, 1.0, id="cfg3-topk10"),
    pytest.param(1.5, 0.7, 0, 1.0, id="cfg1.5-t0.7-nofilter"),
    pytest.param(2.0, 1.3, 20, 0.6, id="cfg2-topk20-topp0.6"),
    pytest.param(1.0, 1.0, 0, 0.8, id="nocfg-topp0.8"),
    pytest.param(4.0, 0.0, 5, 1.0, id="greedy"),
]


def _logits(B, V, dtype=torch.float32, seed=0, scale=2.0):
    return _randn(2 * B, V, dtype=torch.float32, seed=seed).mul(scale).to(dtype)


def _seeds(B, offset=0):
    return torch.arange(B, device=DEVICE, dtype=torch.int64) * 1_000_003 + offset


@needs_triton
@pytest.mark.parametrize("cfg_scale,temperature,top_k,top_p", SAMPLE_CONFIGS)
def test_cfg_sample_matches_reference(cfg_scale, temperature, top_k, top_p):
    """Same seeds and step -> the kernel draws exactly the reference's tokens (shared Philox noise)."""
    B, V = (64, 16384) if ON_GPU else (4, 100)
    logits = _logits(B, V, seed=1)
    for step in (0, 255, torch.tensor(7, device=DEVICE)):
        kw = dict(cfg_scale=cfg_scale, temperature=temperature, top_k=top_k, top_p=top_p, seeds=_seeds(B), step=step)
        out = K.cfg_sample(logits, backend="triton", **kw)
        ref = K.cfg_sample_reference(logits, **kw)
        assert out.dtype == torch.int64 and out.shape == (B,)
        diff = torch.nonzero(out != ref).flatten().tolist()
        assert not diff, f"step {step}: rows {diff} drew {out[diff].tolist()}, the reference {ref[diff].tolist()}"


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float16, pytest.param(torch.bfloat16, marks=gpu_only)])
def test_cfg_sample_breaks_ties_at_the_kth_value_like_generate(dtype):
    """Half-precision logits repeat values (here forced: a 1/4 grid), so the k-th value is often tied: like
    vqgpt.generate, the kernel keeps exactly k tokens, the lower indices of the tie."""
    B, V, k = (32, 16384, 1000) if ON_GPU else (4, 200, 50)
    logits = (_logits(B, V, seed=2) * 4).round().div(4).to(dtype)
    c = logits[:B].float()
    assert ((c >= c.topk(k, dim=-1).values[:, -1:]).sum(-1) > k).any(), "no tie at the k-th value: no test"
    for top_p in (1.0, 0.3):  # 0.3: a top-p cut inside the ties as well
        kw = dict(cfg_scale=1.0, temperature=3.0, top_k=k, top_p=top_p, seeds=_seeds(B, 5), step=3)
        out = K.cfg_sample(logits, backend="triton", **kw)
        ref = K.cfg_sample_reference(logits, **kw)
        assert torch.equal(out, ref), f"top_p {top_p}: rows {torch.nonzero(out != ref).flatten().tolist()} differ"
    # many draws of one tied row never leave generate's top-k set
    n = 256 if ON_GPU else 32
    row = logits[:1].expand(n, V).contiguous()
    allowed = set(vqgpt.generate.top_k_ranked(row[:1].float(), k)[1].flatten().tolist())
    drawn = K.cfg_sample(row, cfg_scale=1.0, temperature=50.0, top_k=k, seeds=_seeds(n), step=0, backend="triton")
    assert set(drawn.tolist()) <= allowed, f"drew tokens outside generate's top-{k}: {set(drawn.tolist()) - allowed}"


@needs_triton
def test_cfg_sample_noise_is_generate_counter_uniform():
    """Equal logits (all tied): the draw is the token of the smallest Exp(1) noise, i.e. of the largest uniform
    of vqgpt.generate.counter_uniform, among all V tokens, or among the k lowest indices under top-k."""
    B, V = (64, 4096) if ON_GPU else (8, 96)
    logits = torch.zeros(B, V, device=DEVICE)
    seeds = torch.tensor([0, 1, 2**40 + 5, -3, 17, 2**33, 123456789, 5][:B] + list(range(8, B)), device=DEVICE)
    for step, top_k in ((0, 0), (7, 0), (2**33 + 1, 0), (4, 10)):
        u = vqgpt.generate.counter_uniform(seeds.cpu(), step, V)
        expected = (u[:, :top_k] if top_k else u).argmax(-1)
        out = K.cfg_sample(
            logits, cfg_scale=1.0, temperature=1.0, top_k=top_k, seeds=seeds, step=step, backend="triton"
        )
        assert torch.equal(out.cpu(), expected), f"step {step}, top_k {top_k}: {out.tolist()} vs {expected.tolist()}"


@needs_triton
@pytest.mark.parametrize("scale", [1.0, 2.5])
def test_cfg_sample_scale_on_the_device(scale):
    """A one-element device tensor scale (generate's guidance schedule, CUDA-graph friendly) mixes even at 1,
    as generate's PyTorch path does, and draws the reference's tokens."""
    B, V = (64, 16384) if ON_GPU else (4, 100)
    logits = _logits(B, V, seed=13)
    scale_t = torch.full((1,), scale, device=DEVICE)
    for kw in (
        dict(temperature=1.0, top_k=10),
        dict(temperature=0.8, top_k=0, top_p=0.7),
        dict(temperature=0.0, top_k=0),
    ):
        step = torch.tensor(2, device=DEVICE)
        out = K.cfg_sample(logits, cfg_scale=scale_t, seeds=_seeds(B), step=step, backend="triton", **kw)
        ref = K.cfg_sample_reference(logits, cfg_scale=scale_t, seeds=_seeds(B), step=step, **kw)
        assert torch.equal(out, ref), f"{kw}: rows {torch.nonzero(out != ref).flatten().tolist()} differ"


@needs_triton
def test_cfg_sample_streaming_path(monkeypatch):
    """Rows longer than MAX_RESIDENT_V stream tiles: shrink the limits so a small row takes that path."""
    monkeypatch.setattr(sampling_module, "MAX_RESIDENT_V", 32)
    monkeypatch.setattr(sampling_module, "TILE_V", 16)
    B, V = 1, 40
    logits = _logits(B, V, seed=3)
    for kw in (
        dict(cfg_scale=2.0, temperature=1.0, top_k=6, top_p=0.7),
        dict(cfg_scale=2.0, temperature=0.0, top_k=0),
        dict(cfg_scale=1.0, temperature=2.0, top_k=0),
    ):
        out = K.cfg_sample(logits, backend="triton", seeds=_seeds(B), step=9, **kw)
        ref = K.cfg_sample_reference(logits, seeds=_seeds(B), step=9, **kw)
        assert torch.equal(out, ref), f"{kw}: kernel {out.tolist()} vs reference {ref.tolist()}"
    B = 2
    tied = (_logits(B, V, seed=14) * 2).round().div(2)  # mixed at scale 2: still on a 1/2 grid, full of ties
    mixed = _mixed(tied, B, 2.0)
    assert ((mixed >= mixed.topk(7, dim=-1).values[:, -1:]).sum(-1) > 7).any(), "no tie at the 7th value"
    scale_on_device = torch.full((1,), 2.0, device=DEVICE)  # generate's way: read by the kernel
    for kw in (dict(cfg_scale=2.0, top_k=7, top_p=0.5), dict(cfg_scale=scale_on_device, top_k=12, top_p=0.4)):
        kw.update(temperature=4.0, seeds=_seeds(B, 1), step=9)
        out = K.cfg_sample(tied, backend="triton", **kw)
        ref = K.cfg_sample_reference(tied, **kw)
        assert torch.equal(out, ref), f"tied logits, {kw}: kernel {out.tolist()} vs reference {ref.tolist()}"


@gpu_only
def test_cfg_sample_large_vocab_streams():
    """A text-sized vocabulary (above MAX_RESIDENT_V) on the streaming kernel, at its real tile size."""
    B, V = 16, 50257
    assert V > sampling_module.MAX_RESIDENT_V
    logits = _logits(B, V, dtype=torch.bfloat16, seed=12)
    for kw in (
        dict(cfg_scale=3.0, temperature=1.0, top_k=1000, top_p=0.9),
        dict(cfg_scale=3.0, temperature=0.9, top_k=0),
        dict(cfg_scale=3.0, temperature=0.0, top_k=0),
    ):
        out = K.cfg_sample(logits, backend="triton", seeds=_seeds(B), step=17, **kw)
        ref = K.cfg_sample_reference(logits, seeds=_seeds(B), step=17, **kw)
        assert torch.equal(out, ref), f"{kw}: rows {torch.nonzero(out != ref).flatten().tolist()} differ"


def _mixed(logits, B, cfg_scale):
    c, u = logits[:B].float(), logits[B:].float()
    return u + cfg_scale * (c - u)


@needs_triton
def test_cfg_sample_top1_and_greedy_are_argmax():
    B, V = (256, 16384) if ON_GPU else (8, 64)
    logits = _logits(B, V, seed=4)
    argmax = _mixed(logits, B, 2.5).argmax(-1)
    top1 = K.cfg_sample(logits, cfg_scale=2.5, temperature=1.0, top_k=1, seeds=_seeds(B), step=0, backend="triton")
    greedy = K.cfg_sample(logits, cfg_scale=2.5, temperature=0.0, top_k=50, seeds=_seeds(B), step=0, backend="triton")
    assert torch.equal(top1, argmax), f"top_k=1: rows {torch.nonzero(top1 != argmax).flatten().tolist()}"
    assert torch.equal(greedy, argmax), f"temperature=0: rows {torch.nonzero(greedy != argmax).flatten().tolist()}"


@needs_triton
def test_cfg_sample_never_draws_outside_top_k():
    """A hot temperature spreads the draws over the whole top-k set; none may land outside it."""
    B, V, k = (4096, 16384, 1000) if ON_GPU else (24, 48, 3)
    row = _randn(2, V, dtype=torch.float32, seed=5)
    logits = torch.cat([row[:1].expand(B, V), row[1:].expand(B, V)])  # every row the same distribution
    out = K.cfg_sample(logits, cfg_scale=2.0, temperature=10.0, top_k=k, seeds=_seeds(B, 11), step=2, backend="triton")
    allowed = set(_mixed(row, 1, 2.0)[0].topk(k).indices.tolist())
    drawn = set(out.tolist())
    assert drawn <= allowed, f"drew tokens outside the top-{k}: {sorted(drawn - allowed)}"
    assert len(drawn) > min(k, B) // 2, f"only {len(drawn)} distinct tokens: the draw is not spreading"


def _frequency_check(tokens: torch.Tensor, probs: torch.Tensor, what: str) -> None:
    """Chi-square of the token counts against probs, with a critical value so far out (p ~ 1e-6) that a
    correct sampler fails it for no fixed seed set we would plausibly pick, and a total-variation bound."""
    n = tokens.numel()
    counts = torch.bincount(tokens.cpu(), minlength=probs.numel()).double()
    expected = probs.double().cpu() * n
    support = expected > 0
    impossible = torch.nonzero(~support & (counts > 0)).flatten().tolist()
    assert not impossible, f"{what}: drew tokens of probability 0: {impossible}"
    chi2 = ((counts[support] - expected[support]) ** 2 / expected[support]).sum().item()
    df = int(support.sum()) - 1
    critical = df + 8.0 * math.sqrt(2 * df) + 12.0  # far beyond the 1e-6 quantile for these df
    tv = 0.5 * (counts / n - probs.double().cpu()).abs().sum().item()
    assert chi2 < critical, f"{what}: chi2 {chi2:.1f} >= {critical:.1f} (df {df}, n {n}); counts {counts.tolist()}"
    assert tv < math.sqrt(df / n), f"{what}: total variation {tv:.4f} too large for n={n}"


@needs_triton
def test_cfg_sample_frequencies_match_the_distribution():
    """Seeded draws (one per row, fixed seeds) follow softmax(mixed / T) restricted to the top-k."""
    B, V, k = (32768, 64, 16) if ON_GPU else (200, 6, 0)
    row = _randn(2, V, dtype=torch.float32, seed=6)
    logits = torch.cat([row[:1].expand(B, V), row[1:].expand(B, V)])
    z = _mixed(row, 1, 1.5)[0] / 0.8
    if k:
        z = z.masked_fill(z < z.topk(k).values[-1], float("-inf"))
    probs = torch.softmax(z, -1)
    out = K.cfg_sample(logits, cfg_scale=1.5, temperature=0.8, top_k=k, seeds=_seeds(B, 77), step=1, backend="triton")
    _frequency_check(out, probs, f"kernel, top_k={k}")


def test_cfg_sample_reference_frequencies_with_top_k_and_top_p():
    """The reference (the CPU fallback, and the kernel's exact twin above) over many draws."""
    B, V = (200000, 12) if ON_GPU else (2500, 12)  # CPU: small enough that torch stays single-threaded
    row = _randn(2, V, dtype=torch.float32, seed=7)
    logits = torch.cat([row[:1].expand(B, V), row[1:].expand(B, V)])
    z = _mixed(row, 1, 2.0)[0]
    probs_k = torch.softmax(z.masked_fill(z < z.topk(6).values[-1], float("-inf")), -1)
    # top-p within the top-6: keep the smallest head of the sorted distribution reaching 0.7 of the mass
    p_sorted, order = probs_k.sort(descending=True)
    n_keep = int((p_sorted.cumsum(0) < 0.7).sum()) + 1
    probs_kp = torch.zeros_like(probs_k)
    probs_kp[order[:n_keep]] = p_sorted[:n_keep] / p_sorted[:n_keep].sum()
    assert 1 < n_keep < 6, "pick logits whose top-p cut falls strictly inside the top-k"
    for top_p, probs in ((1.0, probs_k), (0.7, probs_kp)):
        out = K.cfg_sample_reference(
            logits, cfg_scale=2.0, temperature=1.0, top_k=6, top_p=top_p, seeds=_seeds(B, 3), step=4
        )
        _frequency_check(out, probs, f"reference, top_k=6, top_p={top_p}")


@needs_triton
def test_cfg_sample_seeds_and_steps():
    """Same seed + step -> same tokens; another seed or another step -> different tokens."""
    B, V = (64, 16384) if ON_GPU else (6, 256)
    logits = _logits(B, V, seed=8, scale=0.5)  # flat distributions: many likely tokens
    kw = dict(cfg_scale=2.0, temperature=1.0, top_k=100, backend="triton")
    a = K.cfg_sample(logits, seeds=_seeds(B), step=5, **kw)
    b = K.cfg_sample(logits, seeds=_seeds(B), step=5, **kw)
    other_seed = K.cfg_sample(logits, seeds=_seeds(B, 1), step=5, **kw)
    other_step = K.cfg_sample(logits, seeds=_seeds(B), step=6, **kw)
    assert torch.equal(a, b), "the same seeds and step drew different tokens"
    assert (a != other_seed).sum() >= B // 2, f"other seeds changed only {(a != other_seed).sum()} of {B} rows"
    assert (a != other_step).sum() >= B // 2, f"another step changed only {(a != other_step).sum()} of {B} rows"


@needs_triton
def test_cfg_scale_one_ignores_unconditional_rows():
    B, V = (16, 16384) if ON_GPU else (4, 64)
    logits = _logits(B, V, seed=9)
    changed = logits.clone()
    changed[B:] = _randn(B, V, dtype=torch.float32, seed=10) * 5
    kw = dict(cfg_scale=1.0, temperature=1.0, top_k=10, seeds=_seeds(B), step=0, backend="triton")
    a = K.cfg_sample(logits, **kw)
    b = K.cfg_sample(changed, **kw)
    c = K.cfg_sample(logits[:B].contiguous(), **kw)  # only the conditional rows
    assert torch.equal(a, b) and torch.equal(a, c), f"{a.tolist()} / {b.tolist()} / {c.tolist()}"


def test_cfg_sample_argument_errors():
    logits = torch.zeros(4, 10)
    seeds = torch.arange(2)
    with pytest.raises(ValueError, match="needs \\(2B, V\\)"):
        K.cfg_sample(logits[:2], cfg_scale=2.0, temperature=1.0, top_k=3, seeds=seeds, step=0)
    with pytest.raises(ValueError, match="top_p"):
        K.cfg_sample(logits, cfg_scale=2.0, temperature=1.0, top_k=3, top_p=0.0, seeds=seeds, step=0)
    with pytest.raises(ValueError, match="temperature"):
        K.cfg_sample(logits, cfg_scale=2.0, temperature=-1.0, top_k=3, seeds=seeds, step=0)


# ---------------------------------------------------------------------------------------------------------
# GPU-only: no host sync, CUDA-graph capture


@gpu_only
def test_kernels_never_sync_and_capture_in_a_cuda_graph():
    B, Hq, Hkv, s_max, D, V = 4, 8, 8, 320, 64, 16384
    q = _randn(B, Hq, D, dtype=torch.bfloat16, seed=30)
    k_cache = _randn(B, Hkv, s_max, D, dtype=torch.bfloat16, seed=31)
    v_cache = _randn(B, Hkv, s_max, D, dtype=torch.bfloat16, seed=32)
    cache_len = torch.tensor([1, 100, 320, 64], device=DEVICE)
    logits = _logits(B, V, dtype=torch.bfloat16, seed=33)
    seeds, step = _seeds(B), torch.tensor(3, device=DEVICE)

    def decode_and_sample():
        o = K.decode_attention(q, k_cache, v_cache, cache_len, backend="triton")
        t = K.cfg_sample(
            logits, cfg_scale=3.0, temperature=1.0, top_k=1000, top_p=0.95, seeds=seeds, step=step, backend="triton"
        )
        return o, t

    o_eager, t_eager = decode_and_sample()  # compiles outside the capture
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        decode_and_sample()  # any host sync raises here
    finally:
        torch.cuda.set_sync_debug_mode("default")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        o_graph, t_graph = decode_and_sample()
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(o_graph, o_eager) and torch.equal(t_graph, t_eager), "graph replay differs from eager"
    step.fill_(4)  # a device-side step advances the noise without re-capture
    graph.replay()
    t_next = K.cfg_sample_reference(logits, cfg_scale=3.0, temperature=1.0, top_k=1000, top_p=0.95, seeds=seeds, step=4)
    assert torch.equal(t_graph, t_next), f"replay at step 4 drew {t_graph.tolist()}, expected {t_next.tolist()}"


# ---------------------------------------------------------------------------------------------------------
# first-use self-check and fallback (kernels/selfcheck.py), tuning heuristics

selfcheck = importlib.import_module("vqgpt.kernels.selfcheck")
attention_module = importlib.import_module("vqgpt.kernels.attention")
decode_module = importlib.import_module("vqgpt.kernels.decode_attention")


@pytest.fixture
def fresh_checks():
    selfcheck.reset()
    yield
    selfcheck.reset()


@pytest.fixture
def auto_on_the_interpreter(monkeypatch):
    """backend="auto" runs Triton on CUDA tensors only; without a GPU, let the interpreter stand in for one, so
    that the self-check's "auto" fallback can be tested."""
    if not ON_GPU:
        monkeypatch.setattr(vqgpt.model, "_on_triton_device", lambda tensors: True)


@needs_triton
def test_self_check_falls_back_once_on_a_wrong_kernel(fresh_checks, auto_on_the_interpreter, monkeypatch):
    """A prefill kernel made wrong (its exp2 scale off) fails its first-use check: "auto" warns once, naming
    the kernel, device, driver and Triton version, then serves the reference for that class; "triton" raises."""
    q, k, v, causal = _attn_inputs((1, 2, 1, 20, 20, 32, True), torch.float32)
    ref = K.attention_reference(q, k, v, causal=causal)
    assert_close(K.attention(q, k, v, backend="auto"), ref, 2e-5, 2e-5, "the kernel before it is broken")
    selfcheck.reset()
    monkeypatch.setattr(attention_module, "RCP_LN2", 1.0)  # softmax in the wrong base: a wrong kernel
    with pytest.warns(RuntimeWarning, match=r"attention failed its first-use self-check on cpu.*driver.*Triton \d"):
        out = K.attention(q, k, v, backend="auto")
    assert torch.equal(out, ref), "after a failed check, auto must return the reference's output"
    launches = []
    monkeypatch.setattr(attention_module, "_attention_triton", lambda *a: launches.append(a))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once: no second warning
        assert torch.equal(K.attention(q, k, v, backend="auto"), ref)
    assert not launches, "the failed kernel ran again"
    with pytest.raises(K.KernelSelfCheckError, match="attention failed its first-use self-check"):
        K.attention(q, k, v, backend="triton")
    other = _attn_inputs((1, 2, 1, 20, 20, 16, True), torch.float32)[:3]  # another head dim: its own check
    with pytest.raises(K.KernelSelfCheckError):
        K.attention(*other, backend="triton")


@needs_triton
def test_self_check_catches_a_kernel_that_raises(fresh_checks, auto_on_the_interpreter, monkeypatch):
    """A decode kernel that cannot even launch (here: a Triton kernel of the wrong signature)."""
    import triton

    @triton.jit
    def _wrong_kernel(x_ptr):
        pass

    monkeypatch.setattr(decode_module, "_decode_split_kernel", _wrong_kernel)
    q = _randn(2, 4, 16, dtype=torch.float32, seed=1)
    cache = _randn(2, 2, 24, 16, dtype=torch.float32, seed=2)
    cache_len = torch.tensor([24, 3])
    with pytest.warns(RuntimeWarning, match="decode_attention failed its first-use self-check"):
        out = K.decode_attention(q, cache, cache, cache_len)
    assert torch.equal(out, K.decode_attention_reference(q, cache, cache, cache_len))
    with pytest.raises(K.KernelSelfCheckError, match="TypeError"):
        K.decode_attention(q, cache, cache, cache_len, backend="triton")


@needs_triton
def test_self_check_passes_a_correct_kernel_per_class(fresh_checks):
    B, V = 2, 64
    logits = _logits(B, V, seed=3)
    kw = dict(cfg_scale=2.0, temperature=1.0, top_k=5, seeds=_seeds(B), step=1)
    assert torch.equal(K.cfg_sample(logits, backend="triton", **kw), K.cfg_sample_reference(logits, **kw))
    assert torch.equal(
        K.cfg_sample(logits, backend="triton", **dict(kw, temperature=0.0)),
        K.cfg_sample_reference(logits, **dict(kw, temperature=0.0)),
    )
    classes = [key for key, failure in selfcheck._RESULTS.items() if key[0] == "cfg_sample"]
    assert len(classes) == 2 and all(selfcheck._RESULTS[key] is None for key in classes), selfcheck._RESULTS


def test_num_splits_heuristic():
    """FlashAttention's rule: no split once the programs fill 80% of the SMs; else good wave efficiency with
    as few splits as possible, never more than the K/V tiles."""
    h = decode_module.num_splits_heuristic
    assert h(programs=1024, num_sms=132, num_n_blocks=6) == 1
    assert h(programs=106, num_sms=132, num_n_blocks=6) == 1  # 106 >= 0.8 * 132
    assert h(programs=32, num_sms=132, num_n_blocks=6) == 3  # 96 of 132 SMs busy; 4 and 5 splits: 2 waves
    assert h(programs=1, num_sms=132, num_n_blocks=6) == 6  # capped by the tiles
    assert h(programs=2, num_sms=108, num_n_blocks=500) == 46  # the fewest splits within 85% of one full wave
    for programs in (1, 7, 33, 64, 100):
        for tiles in (1, 5, 11, 40):
            n = h(programs=programs, num_sms=132, num_n_blocks=tiles)
            assert 1 <= n <= tiles, (programs, tiles, n)


def test_prefill_configs_fit_short_prompts():
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        for d in (32, 64, 80, 128, 256):
            for T in (1, 7, 65, 320, 4096):
                configs = attention_module.prefill_configs(dtype, d, T)
                assert configs and len(set(configs)) == len(configs), (dtype, d, T, configs)
                for bm, bn, *_ in configs:
                    assert 16 <= bm <= max(16, triton_next_pow2(T)) and bn <= bm and bm % bn == 0, (T, bm, bn)


def triton_next_pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()
