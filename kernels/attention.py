"""Prefill attention: a fused causal/GQA attention forward in Triton, with its PyTorch reference.

One program owns BLOCK_M query rows of one (batch, query head) and streams the K/V tiles of the matching
KV head through an online softmax (Milakov & Gimelshein 2018, "Online normalizer calculation for softmax";
the tiling of FlashAttention, Dao et al. 2022; layout after Triton tutorial 06-fused-attention). The scores
are kept in log2 units so the exponentials are exp2. With causal masking the tiles right of the diagonal
are never loaded, and the tiles left of it run without masks.

Forward only: sampling never needs a backward.
"""

from __future__ import annotations

import math
from functools import partial

import torch

from vqgpt.model import interpreting, use_triton

from .selfcheck import CHECK_TOLS, assert_matches, passes, small_randn

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: every public function falls back to its reference
    triton = None

RCP_LN2 = 1.4426950408889634  # 1 / ln(2): exp(x) == exp2(x * RCP_LN2)


# Prefill tile configs, autotuned per (T, head dim, dtype) as in Triton's fused-attention tutorial, but a short
# list per class so that a first call compiles a handful, not dozens (tests/test_aot.py compiles every one
# for sm_80 and sm_90 and bounds their shared memory and spills): (BLOCK_M, BLOCK_N, num_warps, num_stages).
PREFILL_CONFIGS = {
    "half_d64": [(128, 64, 4, 3), (128, 64, 8, 3), (64, 64, 4, 3), (128, 32, 4, 4)],
    "half_d128": [(128, 64, 8, 3), (128, 32, 8, 3), (64, 64, 4, 3)],  # (128, 128, 8, 2): 112 B spills on sm_80
    "fp32_or_wide": [(64, 32, 4, 2), (64, 32, 8, 2), (32, 32, 4, 2)],
}
INTERPRETER_CONFIG = (32, 16, 4, 1)  # small tiles: fast on the interpreter, still several tiles and a diagonal


def prefill_config_class(dtype: torch.dtype, head_dim: int) -> str:
    """Which PREFILL_CONFIGS list a (dtype, head dim) autotunes over."""
    block_d = max(16, 1 << (head_dim - 1).bit_length())
    if dtype == torch.float32 or block_d > 128:
        return "fp32_or_wide"
    return "half_d64" if block_d <= 64 else "half_d128"


def prefill_configs(dtype: torch.dtype, head_dim: int, T: int) -> list[tuple[int, int, int, int]]:
    """The configs a prefill of T queries autotunes over, with the query block shrunk for short prompts (fewer
    masked rows, more programs) and BLOCK_N <= BLOCK_M (the causal split at start_m * BLOCK_M must fall on a
    K/V tile edge); duplicates after shrinking are dropped."""
    cap = max(16, 1 << max(T - 1, 0).bit_length())
    out = []
    for bm, bn, warps, stages in PREFILL_CONFIGS[prefill_config_class(dtype, head_dim)]:
        bm = min(bm, cap)
        config = (bm, min(bn, bm), warps, stages)
        if config not in out:
            out.append(config)
    return out


if triton is not None:

    def _prune_prefill_configs(configs, named_args, **kwargs):
        """early_config_prune: keep the configs of this call's class (dtype, head dim, T)."""
        wanted = prefill_configs(named_args["q_ptr"].dtype, kwargs["HEAD_DIM"], named_args["T"])
        return [triton.Config(dict(BLOCK_M=bm, BLOCK_N=bn), num_warps=w, num_stages=st) for bm, bn, w, st in wanted]

    _ALL_PREFILL_CONFIGS = [
        triton.Config(dict(BLOCK_M=bm, BLOCK_N=bn), num_warps=w, num_stages=st)
        for configs in PREFILL_CONFIGS.values()
        for bm, bn, w, st in configs
    ]

    @triton.jit
    def online_softmax_update(acc, l_i, m_i, qk, qk_scale, v, INPUT_PRECISION: tl.constexpr):
        """Fold one tile into a running softmax-weighted sum (Milakov & Gimelshein 2018), for both attention
        kernels: raw scores qk (ROWS, BLOCK_N), -inf where masked, times qk_scale (which carries 1/ln 2, so
        the exponentials are exp2), and values v (BLOCK_N, BLOCK_D) -> the new (acc, l_i, m_i): the unnormalized
        output (ROWS, BLOCK_D), its normalizer and the running max (ROWS,), in log2 units.

        Every row must have met a live key by this tile or an earlier one (m_new finite: exp2(-inf - m_new)
        is 0, never NaN); a row that has not yet stays at acc = 0, l_i = 0 if its scores are all -inf.
        """
        m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        p = tl.exp2(qk * qk_scale - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=INPUT_PRECISION)
        return acc, l_i, m_new

    @triton.jit
    def _attn_fwd_inner(
        acc,
        l_i,
        m_i,
        q,
        k_base,
        v_base,
        stride_kn,
        stride_kd,
        stride_vn,
        stride_vd,
        offs_m,
        offs_d,
        lo,
        hi,
        S,
        qk_scale,
        BLOCK_N: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        MASK_KV: tl.constexpr,
        CAUSAL: tl.constexpr,
        INPUT_PRECISION: tl.constexpr,
    ):
        """Fold the K/V tiles [lo, hi) into the running (acc, l_i, m_i) of one query block.

        MASK_KV is off for the tiles that lie wholly inside the sequence and left of the diagonal, so the
        bulk of the loop carries no per-element masks; the diagonal and tail tiles turn it on.
        """
        offs_n0 = tl.arange(0, BLOCK_N)
        d_ok = offs_d[None, :] < HEAD_DIM  # (1, BLOCK_D): false only on the padded head dims
        for start_n in range(lo, hi, BLOCK_N):
            offs_n = start_n + offs_n0
            kv_mask = d_ok
            if MASK_KV:
                kv_mask = kv_mask & (offs_n[:, None] < S)
            k = tl.load(
                k_base + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd, mask=kv_mask, other=0.0
            )  # (BLOCK_N, BLOCK_D)
            qk = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION)  # (BLOCK_M, BLOCK_N)
            if MASK_KV:
                valid = offs_n[None, :] < S
                if CAUSAL:
                    valid = valid & (offs_m[:, None] >= offs_n[None, :])
                qk = tl.where(valid, qk, float("-inf"))
            v = tl.load(
                v_base + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd, mask=kv_mask, other=0.0
            )  # (BLOCK_N, BLOCK_D)
            # Every row meets at least one live key by the time it reaches here (key 0 is in the first
            # tile and is never masked), so the running max is finite.
            acc, l_i, m_i = online_softmax_update(acc, l_i, m_i, qk, qk_scale, v, INPUT_PRECISION)
        return acc, l_i, m_i

    @triton.jit
    def _attn_fwd_kernel_impl(
        q_ptr,
        k_ptr,
        v_ptr,
        o_ptr,
        stride_qb,
        stride_qh,
        stride_qt,
        stride_qd,
        stride_kb,
        stride_kh,
        stride_kn,
        stride_kd,
        stride_vb,
        stride_vh,
        stride_vn,
        stride_vd,
        stride_ob,
        stride_oh,
        stride_ot,
        stride_od,
        H_Q,
        GROUP,
        T,
        S,
        qk_scale,
        CAUSAL: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        BLOCK_D: tl.constexpr,
        INPUT_PRECISION: tl.constexpr,
    ):
        # One flat grid axis (no 65535 limit on B * Hq): the query blocks of one head are neighbours, so
        # its K/V stay in L2 between them, and the longest causal blocks (the last ones) start first.
        N_M_BLOCKS = tl.cdiv(T, BLOCK_M)
        pid = tl.program_id(0)
        start_m = N_M_BLOCKS - 1 - pid % N_M_BLOCKS
        off_bh = pid // N_M_BLOCKS
        off_b = (off_bh // H_Q).to(tl.int64)
        off_h = (off_bh % H_Q).to(tl.int64)
        off_hkv = off_h // GROUP  # GQA: GROUP consecutive query heads share one KV head

        offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        q_mask = (offs_m[:, None] < T) & (offs_d[None, :] < HEAD_DIM)
        q_base = q_ptr + off_b * stride_qb + off_h * stride_qh
        q = tl.load(
            q_base + offs_m[:, None] * stride_qt + offs_d[None, :] * stride_qd, mask=q_mask, other=0.0
        )  # (BLOCK_M, BLOCK_D)
        k_base = k_ptr + off_b * stride_kb + off_hkv * stride_kh
        v_base = v_ptr + off_b * stride_vb + off_hkv * stride_vh

        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        if CAUSAL:
            # T == S: keys < start_m * BLOCK_M are visible to every row of this block and inside the
            # sequence; the diagonal block needs the mask; keys past the block's last row are skipped.
            lo_masked = start_m * BLOCK_M
            hi = tl.minimum((start_m + 1) * BLOCK_M, S)
        else:
            lo_masked = (S // BLOCK_N) * BLOCK_N
            hi = S
        acc, l_i, m_i = _attn_fwd_inner(
            acc,
            l_i,
            m_i,
            q,
            k_base,
            v_base,
            stride_kn,
            stride_kd,
            stride_vn,
            stride_vd,
            offs_m,
            offs_d,
            0,
            lo_masked,
            S,
            qk_scale,
            BLOCK_N,
            HEAD_DIM,
            False,
            CAUSAL,
            INPUT_PRECISION,
        )
        acc, l_i, m_i = _attn_fwd_inner(
            acc,
            l_i,
            m_i,
            q,
            k_base,
            v_base,
            stride_kn,
            stride_kd,
            stride_vn,
            stride_vd,
            offs_m,
            offs_d,
            lo_masked,
            hi,
            S,
            qk_scale,
            BLOCK_N,
            HEAD_DIM,
            True,
            CAUSAL,
            INPUT_PRECISION,
        )
        o = acc / l_i[:, None]
        o_base = o_ptr + off_b * stride_ob + off_h * stride_oh
        tl.store(
            o_base + offs_m[:, None] * stride_ot + offs_d[None, :] * stride_od,
            o.to(o_ptr.dtype.element_ty),
            mask=q_mask,
        )

    # Autotuned on the first call of each (T, HEAD_DIM, BLOCK_D, CAUSAL, dtypes); the timings are kept in
    # Triton's cache directory, so later processes on the same machine and Triton reuse the choice.
    _attn_fwd_kernel = triton.autotune(
        configs=_ALL_PREFILL_CONFIGS,
        key=["T", "HEAD_DIM", "BLOCK_D", "CAUSAL"],
        prune_configs_by={"early_config_prune": _prune_prefill_configs},
        cache_results=True,
    )(_attn_fwd_kernel_impl)


def _check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            f"attention expects q (B, Hq, T, D) and k, v (B, Hkv, S, D); got q {tuple(q.shape)}, "
            f"k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    B, Hq, T, D = q.shape
    if k.shape != v.shape or k.shape[0] != B or k.shape[3] != D:
        raise ValueError(f"k and v must both be (B={B}, Hkv, S, D={D}); got k {tuple(k.shape)}, v {tuple(v.shape)}")
    if Hq % k.shape[1] != 0:
        raise ValueError(f"query heads ({Hq}) must be a multiple of KV heads ({k.shape[1]}) for GQA")
    if causal and T != k.shape[2]:
        raise ValueError(
            f"causal attention here is for prefill and needs T == S; got T={T}, S={k.shape[2]} "
            "(use decode_attention for single-token steps)"
        )
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(
            f"q, k, v must share one dtype of float16, bfloat16, float32; got {q.dtype}, {k.dtype}, {v.dtype}"
        )
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device; got {q.device}, {k.device}, {v.device}")


def _attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, sm_scale: float):
    B, Hq, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    o = torch.empty((B, Hq, T, D), dtype=q.dtype, device=q.device)
    if o.numel() == 0:
        return o
    block_d = max(16, triton.next_power_of_2(D))
    args = (q, k, v, o, *q.stride(), *k.stride(), *v.stride(), *o.stride(), Hq, Hq // Hkv, T, S, sm_scale * RCP_LN2)
    meta = dict(
        CAUSAL=causal,
        HEAD_DIM=D,
        BLOCK_D=block_d,
        # fp32 inputs ask for fp32 accuracy, so no silent TF32 on the tensor cores
        INPUT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        enable_fp_fusion=True,
    )

    def grid(meta):
        return (triton.cdiv(T, meta["BLOCK_M"]) * B * Hq,)

    if interpreting():  # no autotuning on the interpreter: one small config
        block_m, block_n, num_warps, num_stages = INTERPRETER_CONFIG
        block_m = max(16, min(block_m, triton.next_power_of_2(T)))
        _attn_fwd_kernel_impl[grid](
            *args, BLOCK_M=block_m, BLOCK_N=min(block_n, block_m), num_warps=num_warps, num_stages=num_stages, **meta
        )
    else:
        _attn_fwd_kernel[grid](*args, **meta)
    return o


def attention_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = True, sm_scale: float | None = None
) -> torch.Tensor:
    """Plain PyTorch attention in fp32 (the test oracle and the CPU fallback); same contract as `attention`."""
    _check_qkv(q, k, v, causal)
    B, Hq, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(D) if sm_scale is None else sm_scale
    qg = q.float().reshape(B, Hkv, Hq // Hkv, T, D)  # (B, Hkv, G, T, D): GQA groups share one KV head
    scores = torch.einsum("bkgtd,bksd->bkgts", qg, k.float()) * scale  # (B, Hkv, G, T, S)
    if causal:
        visible = torch.ones(T, S, dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~visible, float("-inf"))
    p = torch.softmax(scores, dim=-1)
    o = torch.einsum("bkgts,bksd->bkgtd", p, v.float())  # (B, Hkv, G, T, D)
    return o.reshape(B, Hq, T, D).to(q.dtype)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = True,
    sm_scale: float | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """softmax(q k^T * sm_scale [+ causal mask]) v for prefill.

    q (B, Hq, T, D); k, v (B, Hkv, S, D) with Hq % Hkv == 0 (query head h reads KV head h // (Hq // Hkv));
    causal needs T == S. Any strides, fp16/bf16/fp32, any head dim (padded to a power of 2 inside the
    kernel). sm_scale defaults to 1/sqrt(D). Returns o (B, Hq, T, D), contiguous, in q's dtype.
    backend: "auto" (Triton on CUDA or under TRITON_INTERPRET=1, else the reference), "triton", "torch".
    """
    _check_qkv(q, k, v, causal)
    scale = 1.0 / math.sqrt(q.shape[-1]) if sm_scale is None else float(sm_scale)
    if not use_triton(backend, q, k, v):
        return attention_reference(q, k, v, causal=causal, sm_scale=scale)
    if k.shape[2] == 0 and q.shape[2] > 0:
        raise ValueError("attention over an empty key sequence (S == 0) is undefined")
    shape_class = (q.shape[-1], q.shape[1] // k.shape[1], causal)  # head dim, GQA group, causal
    if not passes(
        "attention",
        q.device,
        q.dtype,
        shape_class,
        partial(_self_check, q.device, q.dtype, *shape_class),
        strict=backend == "triton",
    ):
        return attention_reference(q, k, v, causal=causal, sm_scale=scale)
    return _attention_triton(q, k, v, causal, scale)


def _self_check(device: torch.device, dtype: torch.dtype, head_dim: int, group: int, causal: bool) -> None:
    """The kernel against the reference on a small input of one shape class (see kernels/selfcheck.py):
    37 keys cross several tiles and the diagonal."""
    T, S = (37, 37) if causal else (5, 37)
    q = small_randn(1, group, T, head_dim, dtype=dtype, device=device, seed=0)
    k = small_randn(1, 1, S, head_dim, dtype=dtype, device=device, seed=1)
    v = small_randn(1, 1, S, head_dim, dtype=dtype, device=device, seed=2)
    out = _attention_triton(q, k, v, causal, head_dim**-0.5)
    assert_matches(out, attention_reference(q, k, v, causal=causal), *CHECK_TOLS[dtype])
