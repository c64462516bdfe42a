"""Decode attention: one query token per row against a preallocated KV cache, split-KV in Triton.

A decode step is a pure memory read (every live K/V byte is used once), so the kernel is shaped to read
each byte once and to keep the whole GPU busy:
- only positions < cache_len[b] are read; the static cache beyond the live length is never touched;
- GQA: the Hq/Hkv query heads that share a KV head are one (BLOCK_H, D) tile of a single program, so each
  K/V tile is loaded once for all of them;
- split-KV ("flash-decoding", Dao et al. 2023): when B * Hkv programs cannot fill the GPU, the live length
  of every row is cut into NUM_SPLITS chunks, each chunk writes its normalized partial output and its
  log-sum-exp, and a second small kernel merges them. cache_len stays on the device: the chunk bounds are
  computed inside the kernel, and a split that starts past the live length writes lse = -inf and a zero
  partial, which the merge weighs as 0 (no NaN, also for a row with cache_len == 0, whose output is 0).
"""

from __future__ import annotations

import functools
import math

import torch

from vqgpt.model import interpreting, use_triton

from .attention import RCP_LN2
from .selfcheck import CHECK_TOLS, assert_matches, passes, small_randn

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

if triton is not None:
    from .attention import online_softmax_update

    @triton.jit
    def _decode_split_kernel(
        q_ptr,
        k_ptr,
        v_ptr,
        cache_len_ptr,
        o_ptr,
        part_o_ptr,
        part_lse_ptr,
        stride_qb,
        stride_qh,
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
        stride_od,
        H_Q,
        H_KV,
        S_MAX,
        NUM_SPLITS,
        qk_scale,
        GROUP: tl.constexpr,
        BLOCK_H: tl.constexpr,
        BLOCK_N: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        BLOCK_D: tl.constexpr,
        SINGLE_SPLIT: tl.constexpr,
        INPUT_PRECISION: tl.constexpr,
    ):
        off_bkv = tl.program_id(0)
        split = tl.program_id(1)
        off_b = (off_bkv // H_KV).to(tl.int64)
        off_hkv = (off_bkv % H_KV).to(tl.int64)

        # Live length of this row, clamped so a bad cache_len can never read outside the cache.
        n_live = tl.load(cache_len_ptr + off_b).to(tl.int32)
        n_live = tl.minimum(tl.maximum(n_live, 0), S_MAX)
        # Chunks are whole K/V tiles, so only the last live tile of a row is partial.
        chunk = tl.cdiv(tl.cdiv(n_live, NUM_SPLITS), BLOCK_N) * BLOCK_N
        start = split * chunk
        end = tl.minimum(start + chunk, n_live)

        offs_h = tl.arange(0, BLOCK_H)  # the query heads of this KV head's group, padded for tl.dot
        offs_d = tl.arange(0, BLOCK_D)
        h_ok = offs_h < GROUP
        d_ok = offs_d < HEAD_DIM
        heads = off_hkv * GROUP + offs_h  # (BLOCK_H,) query head indices
        q = tl.load(
            q_ptr + off_b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :] * stride_qd,
            mask=h_ok[:, None] & d_ok[None, :],
            other=0.0,
        )  # (BLOCK_H, BLOCK_D)
        k_base = k_ptr + off_b * stride_kb + off_hkv * stride_kh
        v_base = v_ptr + off_b * stride_vb + off_hkv * stride_vh

        m_i = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
        acc = tl.zeros([BLOCK_H, BLOCK_D], dtype=tl.float32)
        offs_n0 = tl.arange(0, BLOCK_N)
        for start_n in range(start, end, BLOCK_N):
            offs_n = start_n + offs_n0
            n_ok = offs_n < end
            kv_mask = n_ok[:, None] & d_ok[None, :]
            k = tl.load(
                k_base + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd, mask=kv_mask, other=0.0
            )  # (BLOCK_N, BLOCK_D)
            qk = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION)  # (BLOCK_H, BLOCK_N)
            qk = tl.where(n_ok[None, :], qk, float("-inf"))
            v = tl.load(
                v_base + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd, mask=kv_mask, other=0.0
            )  # (BLOCK_N, BLOCK_D)
            # The first position of every tile is live, so the running max is finite and no NaN can form.
            acc, l_i, m_i = online_softmax_update(acc, l_i, m_i, qk, qk_scale, v, INPUT_PRECISION)

        live = l_i > 0  # false for an empty split (and for every split of a row with cache_len == 0)
        l_safe = tl.where(live, l_i, 1.0)
        o = acc / l_safe[:, None]  # an empty split leaves acc == 0, so o == 0
        if SINGLE_SPLIT:
            tl.store(
                o_ptr + off_b * stride_ob + heads[:, None] * stride_oh + offs_d[None, :] * stride_od,
                o.to(o_ptr.dtype.element_ty),
                mask=h_ok[:, None] & d_ok[None, :],
            )
        else:
            # part_o (B * Hq, NUM_SPLITS, HEAD_DIM) and part_lse (B * Hq, NUM_SPLITS), contiguous fp32
            rows = off_b * H_Q + heads
            lse = tl.where(live, m_i + tl.log2(l_safe), float("-inf"))  # log2 units, like the scores
            tl.store(part_lse_ptr + rows * NUM_SPLITS + split, lse, mask=h_ok)
            tl.store(
                part_o_ptr + (rows[:, None] * NUM_SPLITS + split) * HEAD_DIM + offs_d[None, :],
                o,
                mask=h_ok[:, None] & d_ok[None, :],
            )

    @triton.jit
    def _decode_merge_kernel(
        part_o_ptr,
        part_lse_ptr,
        o_ptr,
        stride_ob,
        stride_oh,
        stride_od,
        H_Q,
        NUM_SPLITS,
        HEAD_DIM: tl.constexpr,
        BLOCK_D: tl.constexpr,
        BLOCK_S: tl.constexpr,
    ):
        """o = sum_s w_s o_s / sum_s w_s with w_s = 2^(lse_s - max lse): the exact softmax over all splits."""
        row = tl.program_id(0).to(tl.int64)  # b * Hq + h
        off_b = row // H_Q
        off_h = row % H_Q
        offs_s = tl.arange(0, BLOCK_S)
        offs_d = tl.arange(0, BLOCK_D)
        s_ok = offs_s < NUM_SPLITS
        d_ok = offs_d < HEAD_DIM
        lse = tl.load(part_lse_ptr + row * NUM_SPLITS + offs_s, mask=s_ok, other=float("-inf"))
        lse_max = tl.max(lse, 0)
        lse_max = tl.where(lse_max == float("-inf"), 0.0, lse_max)  # all splits empty: weights all 0
        w = tl.exp2(lse - lse_max)  # (BLOCK_S,)
        parts = tl.load(
            part_o_ptr + (row * NUM_SPLITS + offs_s[:, None]) * HEAD_DIM + offs_d[None, :],
            mask=s_ok[:, None] & d_ok[None, :],
            other=0.0,
        )  # (BLOCK_S, BLOCK_D)
        denom = tl.sum(w, 0)
        o = tl.sum(w[:, None] * parts, 0) / tl.where(denom > 0, denom, 1.0)
        tl.store(
            o_ptr + off_b * stride_ob + off_h * stride_oh + offs_d * stride_od, o.to(o_ptr.dtype.element_ty), mask=d_ok
        )


@functools.cache
def _sm_count(device_index: int) -> int:
    """Streaming multiprocessors of a device, from Triton's driver (the GPU's, or tests/test_aot.py's stand-in)."""
    return triton.runtime.driver.active.utils.get_device_properties(device_index)["multiprocessor_count"]


def num_splits_heuristic(programs: int, num_sms: int, num_n_blocks: int, max_splits: int = 128) -> int:
    """Split-KV count after FlashAttention's num_splits_heuristic (flash_api.cpp): no split when the
    programs already fill 80% of the SMs; otherwise the smallest split count whose wave efficiency
    (programs * splits / SMs over its ceiling) is within 85% of the best, skipping counts that give the same
    tiles per split as one fewer (they only add empty splits)."""
    if programs >= 0.8 * num_sms:
        return 1
    max_splits = min(max_splits, num_sms, num_n_blocks)

    def eligible(n: int) -> bool:
        return n == 1 or math.ceil(num_n_blocks / n) != math.ceil(num_n_blocks / (n - 1))

    def efficiency(n: int) -> float:
        waves = programs * n / num_sms
        return waves / math.ceil(waves)

    candidates = [n for n in range(1, max_splits + 1) if eligible(n)]
    best = max(efficiency(n) for n in candidates)
    return next(n for n in candidates if efficiency(n) >= 0.85 * best)


def _pick_num_splits(q: torch.Tensor, programs: int, s_max: int, block_n: int) -> int:
    """The split count from shapes only (cache_len is never read on the host): the heuristic over the S_max
    tiles, or 4 on the interpreter (to exercise the split path and the merge)."""
    if interpreting():
        return max(1, min(4, triton.cdiv(s_max, block_n)))
    device = q.device.index if q.is_cuda else triton.runtime.driver.active.get_current_device()
    return num_splits_heuristic(programs, _sm_count(device), triton.cdiv(s_max, block_n))


def _check_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cache_len: torch.Tensor):
    if q.dim() != 3 or k_cache.dim() != 4:
        raise ValueError(
            f"decode_attention expects q (B, Hq, D) and caches (B, Hkv, S_max, D); got q "
            f"{tuple(q.shape)}, k_cache {tuple(k_cache.shape)}"
        )
    B, Hq, D = q.shape
    if k_cache.shape != v_cache.shape or k_cache.shape[0] != B or k_cache.shape[3] != D:
        raise ValueError(
            f"k_cache and v_cache must both be (B={B}, Hkv, S_max, D={D}); got "
            f"{tuple(k_cache.shape)} and {tuple(v_cache.shape)}"
        )
    if Hq % k_cache.shape[1] != 0:
        raise ValueError(f"query heads ({Hq}) must be a multiple of KV heads ({k_cache.shape[1]}) for GQA")
    if cache_len.shape != (B,) or cache_len.dtype not in (torch.int64, torch.int32):
        raise ValueError(
            f"cache_len must be an int64 (or int32) tensor of shape ({B},); got "
            f"{cache_len.dtype} {tuple(cache_len.shape)}"
        )
    if not (q.dtype == k_cache.dtype == v_cache.dtype) or q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(
            f"q and the caches must share one dtype of float16, bfloat16, float32; got {q.dtype}, "
            f"{k_cache.dtype}, {v_cache.dtype}"
        )
    if not (q.device == k_cache.device == v_cache.device == cache_len.device):
        raise ValueError(
            f"q, caches and cache_len must be on one device (cache_len too: reading it from the "
            f"host would sync); got {q.device}, {k_cache.device}, {v_cache.device}, "
            f"{cache_len.device}"
        )


def _decode_triton(q, k_cache, v_cache, cache_len, sm_scale: float, num_splits: int | None):
    B, Hq, D = q.shape
    Hkv, s_max = k_cache.shape[1], k_cache.shape[2]
    group = Hq // Hkv
    o = torch.empty((B, Hq, D), dtype=q.dtype, device=q.device)
    if o.numel() == 0:
        return o
    if s_max == 0:
        return o.zero_()
    block_d = max(16, triton.next_power_of_2(D))
    block_h = max(16, triton.next_power_of_2(group))  # tl.dot needs M >= 16; padded rows are masked
    block_n = 16 if interpreting() else (64 if block_d <= 64 else 32)
    if num_splits is None:
        num_splits = _pick_num_splits(q, B * Hkv, s_max, block_n)
    if num_splits < 1:
        raise ValueError(f"num_splits must be >= 1; got {num_splits}")
    single = num_splits == 1
    if single:  # the split kernel writes o itself; the partial buffers are never touched
        part_o = part_lse = o
    else:
        part_o = torch.empty((B * Hq, num_splits, D), dtype=torch.float32, device=q.device)
        part_lse = torch.empty((B * Hq, num_splits), dtype=torch.float32, device=q.device)
    _decode_split_kernel[(B * Hkv, num_splits)](
        q,
        k_cache,
        v_cache,
        cache_len,
        o,
        part_o,
        part_lse,
        *q.stride(),
        *k_cache.stride(),
        *v_cache.stride(),
        *o.stride(),
        Hq,
        Hkv,
        s_max,
        num_splits,
        sm_scale * RCP_LN2,
        GROUP=group,
        BLOCK_H=block_h,
        BLOCK_N=block_n,
        HEAD_DIM=D,
        BLOCK_D=block_d,
        SINGLE_SPLIT=single,
        INPUT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=4,
        num_stages=1 if interpreting() else 3,
        enable_fp_fusion=True,
    )
    if not single:
        _decode_merge_kernel[(B * Hq,)](
            part_o,
            part_lse,
            o,
            *o.stride(),
            Hq,
            num_splits,
            HEAD_DIM=D,
            BLOCK_D=block_d,
            BLOCK_S=max(2, triton.next_power_of_2(num_splits)),
            num_warps=1 if block_d <= 64 else 2,
            enable_fp_fusion=True,
        )
    return o


def decode_attention_reference(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_len: torch.Tensor,
    *,
    sm_scale: float | None = None,
) -> torch.Tensor:
    """Plain PyTorch decode attention in fp32 over the whole static cache with a length mask (the test
    oracle and the CPU fallback). A row with cache_len == 0 gets a zero output, as the kernel gives."""
    _check_decode(q, k_cache, v_cache, cache_len)
    B, Hq, D = q.shape
    Hkv, s_max = k_cache.shape[1], k_cache.shape[2]
    scale = 1.0 / math.sqrt(D) if sm_scale is None else sm_scale
    qg = q.float().reshape(B, Hkv, Hq // Hkv, D)  # (B, Hkv, G, D): GQA groups share one KV head
    scores = torch.einsum("bkgd,bksd->bkgs", qg, k_cache.float()) * scale  # (B, Hkv, G, S_max)
    live = torch.arange(s_max, device=q.device)[None, :] < cache_len[:, None]  # (B, S_max)
    scores = scores.masked_fill(~live[:, None, None, :], float("-inf"))
    p = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # an all-masked row softmaxes to NaN: make it 0
    v = v_cache.float().masked_fill(~live[:, None, :, None], 0.0)  # dead slots may hold garbage (NaN * 0)
    o = torch.einsum("bkgs,bksd->bkgd", p, v)  # (B, Hkv, G, D)
    return o.reshape(B, Hq, D).to(q.dtype)


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_len: torch.Tensor,
    *,
    sm_scale: float | None = None,
    backend: str = "auto",
    num_splits: int | None = None,
) -> torch.Tensor:
    """Attention of one new query token per row over the live prefix of a static KV cache.

    q (B, Hq, D); k_cache, v_cache (B, Hkv, S_max, D) with Hq % Hkv == 0; cache_len (B,) int64 on q's
    device: row b attends to positions [0, cache_len[b]) (the new token's own K/V must already be written).
    sm_scale defaults to 1/sqrt(D). num_splits (Triton only) overrides the split-KV count chosen from the
    shapes. No host sync: the launch never reads cache_len, so it can be captured in a CUDA graph.
    Returns o (B, Hq, D) in q's dtype.
    """
    _check_decode(q, k_cache, v_cache, cache_len)
    scale = 1.0 / math.sqrt(q.shape[-1]) if sm_scale is None else float(sm_scale)
    if not use_triton(backend, q, k_cache, v_cache, cache_len):
        return decode_attention_reference(q, k_cache, v_cache, cache_len, sm_scale=scale)
    shape_class = (q.shape[-1], q.shape[1] // k_cache.shape[1])  # head dim, GQA group
    check = functools.partial(_self_check, q.device, q.dtype, *shape_class)
    if not passes("decode_attention", q.device, q.dtype, shape_class, check, strict=backend == "triton"):
        return decode_attention_reference(q, k_cache, v_cache, cache_len, sm_scale=scale)
    return _decode_triton(q, k_cache, v_cache, cache_len, scale, num_splits)


def _self_check(device: torch.device, dtype: torch.dtype, head_dim: int, group: int) -> None:
    """The kernel against the reference on two rows of 70 and 9 live positions, unsplit and in 3 splits (see
    kernels/selfcheck.py)."""
    q = small_randn(2, group, head_dim, dtype=dtype, device=device, seed=3)
    k_cache = small_randn(2, 1, 70, head_dim, dtype=dtype, device=device, seed=4)
    v_cache = small_randn(2, 1, 70, head_dim, dtype=dtype, device=device, seed=5)
    cache_len = torch.tensor([70, 9], device=device)
    ref = decode_attention_reference(q, k_cache, v_cache, cache_len)
    for num_splits in (1, 3):
        assert_matches(
            _decode_triton(q, k_cache, v_cache, cache_len, head_dim**-0.5, num_splits), ref, *CHECK_TOLS[dtype]
        )
