"""Fused classifier-free-guidance sampling: CFG mix, temperature, top-k, top-p and the draw in one launch.

One program owns one sample row and never sorts the vocabulary:
1. z = (u + s * (c - u)) / temperature from the conditional row c and the unconditional row u (Ho & Salimans
   2022, "Classifier-Free Diffusion Guidance"), in fp32.
2. top-k: the k-th largest z is found exactly by a 32-step bitwise search over order-preserving uint32 keys
   of the floats (each step counts the keys >= a candidate; the count is monotone in the candidate, so the
   bits can be fixed from the most significant down). Every token with z >= that value is kept, so a tie at
   the k-th value keeps all tied tokens.
3. top-p (nucleus, Holtzman et al. 2020) within the top-k: the same bitwise search finds the largest
   threshold whose kept probability mass is still >= top_p, i.e. the smallest head of the sorted
   distribution that reaches top_p.
4. the draw: argmax over kept tokens of z + Gumbel noise (the Gumbel-max trick: an exponential race, it
   draws exactly from softmax(z) restricted to the kept set). The noise is counter-based: uniform u of token
   i is Philox4x32-10 (Salmon et al. 2011) keyed by the row's seed with counter (i, step, 0, 0), mapped to
   (0, 1) as ((bits >> 9) + 0.5) / 2^23. It depends on nothing else (not on the grid, the tiling or the
   device), so the reference below (and vqgpt.generate's counter_uniform) reproduces the same tokens, up
   to rounding of the transcendentals in near ties.
temperature == 0 is greedy decoding (argmax of the mixed logits, lowest index on ties).

Rows of V <= MAX_RESIDENT_V keep their keys in registers through both searches and draw in DRAW_TILE chunks
(Philox's four words a token would not fit for the whole row); longer rows stream tiles from L2 in every pass.
"""

from __future__ import annotations

from functools import partial

import torch

from .attention import RCP_LN2, use_triton
from .selfcheck import passes, small_randn

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

MAX_RESIDENT_V = 16384  # largest row kept in registers (16 warps: 32 fp32 per thread per live array)
TILE_V = 4096  # tile of the streaming path for longer rows
DRAW_TILE = 2048  # tokens a resident row draws its Philox noise for at a time (4 words a token in registers)
# 2^-23: a 23-bit integer + 0.5 is exact in float32 and, times this, lies strictly inside (0, 1). (With 24
# bits, (2^24 - 1) + 0.5 would round up to 2^24: u == 1, zero exponential noise, an infinite Gumbel.)
TWO_POW_M23 = 1.1920928955078125e-07
SIGN_BIT = 0x80000000  # the highest bit of a uint32 key: the first candidate of the bitwise search

# Philox4x32 constants (Salmon et al. 2011; the same values as triton.language.random).
PHILOX_KEY_A = 0x9E3779B9  # key schedule increments: 2^32 / golden ratio
PHILOX_KEY_B = 0xBB67AE85  # and 2^32 * (sqrt(3) - 1)
PHILOX_ROUND_A = 0xD2511F53  # the two round multipliers
PHILOX_ROUND_B = 0xCD9E8D57
PHILOX_ROUNDS = 10
MASK32 = 0xFFFFFFFF


if triton is not None:
    # jit code may read module globals only as tl.constexpr
    _RCP_LN2 = tl.constexpr(RCP_LN2)
    _TWO_POW_M23 = tl.constexpr(TWO_POW_M23)
    _SIGN_BIT = tl.constexpr(SIGN_BIT)

    @triton.jit
    def _mixed_logits(logits_ptr, row_c, row_u, offs, V, stride_v, cfg_scale, inv_temp, MIX: tl.constexpr):
        """z = (u + s * (c - u)) * inv_temp in fp32 for the tokens `offs`; -inf past the vocabulary."""
        ok = offs < V
        z = tl.load(logits_ptr + row_c + offs * stride_v, mask=ok, other=0.0).to(tl.float32)
        if MIX:
            u = tl.load(logits_ptr + row_u + offs * stride_v, mask=ok, other=0.0).to(tl.float32)
            z = u + cfg_scale * (z - u)
        return tl.where(ok, z * inv_temp, float("-inf"))

    @triton.jit
    def _ordered_key(z):
        """uint32 keys with key(a) < key(b) exactly when a < b: flip the sign bit of non-negative floats and
        every bit of negative ones."""
        bits = z.to(tl.int32, bitcast=True)
        flip = (bits >> 31) | -2147483648  # arithmetic shift: all ones for negatives, else just the sign bit
        return (bits ^ flip).to(tl.uint32, bitcast=True)

    @triton.jit
    def _key_value(key):
        """The float whose _ordered_key is `key`, bit-exactly (its inverse)."""
        bits = key.to(tl.int32, bitcast=True)
        bits = tl.where(bits < 0, bits & 0x7FFFFFFF, ~bits)  # sign bit set: a non-negative float
        return bits.to(tl.float32, bitcast=True)

    @triton.jit
    def _gumbel(seed, step, offs):
        """Gumbel(0, 1) noise of tokens `offs` for (seed, step): -log(-log(u)), u from Philox."""
        c0 = offs.to(tl.uint32)
        zero = c0 * 0
        c1 = zero + step.to(tl.uint32)
        bits, _, _, _ = tl.philox(seed, c0, c1, zero, zero)
        u = ((bits >> 9).to(tl.float32) + 0.5) * _TWO_POW_M23
        return -tl.log(-tl.log(u))

    @triton.jit
    def _draw_tiled(logits_ptr, row_c, row_u, V, stride_v, cfg_scale, inv_temp, thr, seed, step,
                    MIX: tl.constexpr, BLOCK_V: tl.constexpr):
        """The Gumbel-max draw over the tokens whose key is >= thr, BLOCK_V tokens at a time: Philox holds
        4 words a token, so a whole resident row of noise at once would not fit in registers."""
        best_score = tl.full([], float("-inf"), tl.float32)
        best = tl.zeros([], tl.int64)
        for start in range(0, V, BLOCK_V):
            offs = start + tl.arange(0, BLOCK_V)
            z = _mixed_logits(logits_ptr, row_c, row_u, offs, V, stride_v, cfg_scale, inv_temp, MIX)
            keys = tl.where(offs < V, _ordered_key(z), 0)
            score = tl.where(keys >= thr, z + _gumbel(seed, step, offs), float("-inf"))
            tile_best = tl.max(score, 0)
            best = tl.where(tile_best > best_score, start + tl.argmax(score, 0).to(tl.int64), best)
            best_score = tl.maximum(best_score, tile_best)
        return best

    @triton.jit(do_not_specialize=["step"])
    def _sample_resident_kernel(
        logits_ptr, seeds_ptr, step_ptr, out_ptr,
        stride_row, stride_v, B, V, step, cfg_scale, inv_temp, top_k, top_p,
        MIX: tl.constexpr, GREEDY: tl.constexpr, TOP_K: tl.constexpr, TOP_P: tl.constexpr,
        STEP_FROM_PTR: tl.constexpr, BLOCK_V: tl.constexpr, DRAW_V: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        row_c = row * stride_row
        row_u = (row + B) * stride_row
        offs = tl.arange(0, BLOCK_V)
        z = _mixed_logits(logits_ptr, row_c, row_u, offs, V, stride_v, cfg_scale, inv_temp, MIX)  # (BLOCK_V,)
        if GREEDY:
            tl.store(out_ptr + row, tl.argmax(z, 0).to(tl.int64))
        else:
            # Only the keys stay live through the searches (z is recovered from them bit-exactly) and
            # "kept" is always keys >= thr, so 32 values a thread fit the register budget of 16 warps at
            # V = 16384 (tests/test_aot.py checks the spills on sm_80 and sm_90).
            keys = tl.where(offs < V, _ordered_key(z), 0)  # 0 is below every real float's key
            thr = tl.full([], 1, tl.uint32)  # keys of real logits are >= 1, the padding's are 0
            if TOP_K:
                thr = tl.full([], 0, tl.uint32)
                bit = tl.full([], _SIGN_BIT, tl.uint32)
                for _ in range(32):  # fix the threshold's bits from the top: the k-th largest key
                    cand = thr | bit
                    n_ge = tl.sum((keys >= cand).to(tl.int32), 0)
                    thr = tl.where(n_ge >= top_k, cand, thr)
                    bit = bit >> 1
            if TOP_P:
                zmax = _key_value(tl.max(keys, 0))
                w = tl.where(keys >= thr, tl.exp2((_key_value(keys) - zmax) * _RCP_LN2), 0.0)  # unnormalized
                target = top_p * tl.sum(w, 0)
                thr_p = tl.full([], 0, tl.uint32)
                bit = tl.full([], _SIGN_BIT, tl.uint32)
                for _ in range(32):  # the largest threshold that still keeps >= top_p of the mass
                    cand = thr_p | bit
                    mass = tl.sum(tl.where(keys >= cand, w, 0.0), 0)
                    thr_p = tl.where(mass >= target, cand, thr_p)
                    bit = bit >> 1
                thr = thr_p  # >= the top-k threshold: all the mass lies at or above that one
            if STEP_FROM_PTR:
                step = tl.load(step_ptr)
            seed = tl.load(seeds_ptr + row)
            # the row is in L2 now: one more pass over it, DRAW_V tokens at a time
            best = _draw_tiled(logits_ptr, row_c, row_u, V, stride_v, cfg_scale, inv_temp, thr, seed, step,
                               MIX, DRAW_V)
            tl.store(out_ptr + row, best)

    @triton.jit
    def _count_ge_tiled(logits_ptr, row_c, row_u, V, stride_v, cfg_scale, inv_temp, cand, zmax, thr,
                        MIX: tl.constexpr, WEIGHTED: tl.constexpr, BLOCK_V: tl.constexpr):
        """Over the whole row: the number (or, WEIGHTED, the probability mass among keys >= thr) of tokens
        whose key is >= cand."""
        total = tl.zeros([], tl.float32)
        for start in range(0, V, BLOCK_V):
            offs = start + tl.arange(0, BLOCK_V)
            z = _mixed_logits(logits_ptr, row_c, row_u, offs, V, stride_v, cfg_scale, inv_temp, MIX)
            keys = tl.where(offs < V, _ordered_key(z), 0)
            if WEIGHTED:
                w = tl.exp2((z - zmax) * _RCP_LN2)
                total += tl.sum(tl.where((keys >= cand) & (keys >= thr), w, 0.0), 0)
            else:
                total += tl.sum((keys >= cand).to(tl.float32), 0)  # exact: counts stay far below 2^24
        return total

    @triton.jit(do_not_specialize=["step"])
    def _sample_tiled_kernel(
        logits_ptr, seeds_ptr, step_ptr, out_ptr,
        stride_row, stride_v, B, V, step, cfg_scale, inv_temp, top_k, top_p,
        MIX: tl.constexpr, GREEDY: tl.constexpr, TOP_K: tl.constexpr, TOP_P: tl.constexpr,
        STEP_FROM_PTR: tl.constexpr, BLOCK_V: tl.constexpr,
    ):
        """The same algorithm as _sample_resident_kernel for rows too long for registers: every pass
        re-reads the row tile by tile (from L2 after the first pass) and recomputes z."""
        row = tl.program_id(0).to(tl.int64)
        row_c = row * stride_row
        row_u = (row + B) * stride_row
        zmax = tl.full([], float("-inf"), tl.float32)
        best = tl.zeros([], tl.int64)
        for start in range(0, V, BLOCK_V):  # the row max (and, greedy, the first index reaching it)
            offs = start + tl.arange(0, BLOCK_V)
            z = _mixed_logits(logits_ptr, row_c, row_u, offs, V, stride_v, cfg_scale, inv_temp, MIX)
            tile_max = tl.max(z, 0)
            best = tl.where(tile_max > zmax, start + tl.argmax(z, 0).to(tl.int64), best)
            zmax = tl.maximum(zmax, tile_max)
        if GREEDY:
            tl.store(out_ptr + row, best)
        else:
            thr = tl.full([], 0, tl.uint32)
            if TOP_K:
                bit = tl.full([], _SIGN_BIT, tl.uint32)
                for _ in range(32):
                    cand = thr | bit
                    n_ge = _count_ge_tiled(logits_ptr, row_c, row_u, V, stride_v, cfg_scale, inv_temp,
                                           cand, zmax, thr, MIX, False, BLOCK_V)
                    thr = tl.where(n_ge >= top_k, cand, thr)
                    bit = bit >> 1
            if TOP_P:
                target = top_p * _count_ge_tiled(logits_ptr, row_c, row_u, V, stride_v, cfg_scale, inv_temp,
                                                 thr, zmax, thr, MIX, True, BLOCK_V)
                thr_p = tl.full([], 0, tl.uint32)  # ends >= thr: the mass at or above thr is the total
                bit = tl.full([], _SIGN_BIT, tl.uint32)
                for _ in range(32):
                    cand = thr_p | bit
                    mass = _count_ge_tiled(logits_ptr, row_c, row_u, V, stride_v, cfg_scale, inv_temp,
                                           cand, zmax, thr, MIX, True, BLOCK_V)
                    thr_p = tl.where(mass >= target, cand, thr_p)
                    bit = bit >> 1
                thr = thr_p
            if STEP_FROM_PTR:
                step = tl.load(step_ptr)
            seed = tl.load(seeds_ptr + row)
            best = _draw_tiled(logits_ptr, row_c, row_u, V, stride_v, cfg_scale, inv_temp, thr, seed, step,
                               MIX, BLOCK_V)
            tl.store(out_ptr + row, best)


def _check_sample_args(logits, seeds, step, cfg_scale, temperature, top_k, top_p) -> tuple[int, bool]:
    """Validate the arguments; return (B, whether the CFG mix runs)."""
    if seeds.dim() != 1 or seeds.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"seeds must be an int64 tensor of shape (B,); got {seeds.dtype} {tuple(seeds.shape)}")
    B = seeds.shape[0]
    if logits.dim() != 2 or logits.shape[0] not in (B, 2 * B):
        raise ValueError(f"logits must be (2B, V) (conditional rows, then unconditional) or (B, V) with "
                         f"B = len(seeds) = {B}; got {tuple(logits.shape)}")
    if logits.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"logits must be float16, bfloat16 or float32; got {logits.dtype}")
    if logits.shape[1] == 0:
        raise ValueError("logits have an empty vocabulary")
    mix = cfg_scale != 1.0
    if mix and logits.shape[0] != 2 * B:
        raise ValueError(f"cfg_scale={cfg_scale} needs (2B, V) logits with the unconditional rows after the "
                         f"conditional ones; got {tuple(logits.shape)} for B={B}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy); got {temperature}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 = no top-k); got {top_k}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1] (1 = no top-p); got {top_p}")
    if seeds.device != logits.device:
        raise ValueError(f"seeds must be on the logits' device {logits.device}; got {seeds.device}")
    if isinstance(step, torch.Tensor):
        if step.numel() != 1 or step.dtype not in (torch.int64, torch.int32) or step.device != logits.device:
            raise ValueError(f"step must be an int or a one-element int64 tensor on {logits.device}; got "
                             f"{step.dtype} {tuple(step.shape)} on {step.device}")
    elif not isinstance(step, int):
        raise TypeError(f"step must be an int or a one-element int64 tensor; got {type(step).__name__}")
    return B, mix


def _mix_reference(logits: torch.Tensor, B: int, mix: bool, cfg_scale: float) -> torch.Tensor:
    c = logits[:B].float()
    if not mix:
        return c
    u = logits[B:].float()
    return u + cfg_scale * (c - u)


def _mulhilo32(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) 32-bit halves of a * b for a uint32 constant and uint32 values held in int64: b is split
    into 16-bit halves so no partial product overflows int64."""
    p_lo = a * (b & 0xFFFF)  # < 2^48
    p_hi = a * (b >> 16)  # < 2^48
    mid = p_lo + ((p_hi & 0xFFFF) << 16)  # a * b == (p_hi >> 16) * 2^32 + mid
    return (p_hi >> 16) + (mid >> 32), mid & MASK32


def philox4x32_reference(
    counter: tuple[torch.Tensor, ...], key: tuple[torch.Tensor, torch.Tensor]
) -> tuple[torch.Tensor, ...]:
    """Philox4x32-10 on broadcastable int64 tensors holding uint32 words: 4 counter words, 2 key words ->
    the 4 output words (the rounds of triton.language.random.philox_impl)."""
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for _ in range(PHILOX_ROUNDS):
        hi_b, lo_b = _mulhilo32(PHILOX_ROUND_B, c2)
        hi_a, lo_a = _mulhilo32(PHILOX_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + PHILOX_KEY_A) & MASK32
        k1 = (k1 + PHILOX_KEY_B) & MASK32
    return c0, c1, c2, c3


def philox_uniform_reference(seeds: torch.Tensor, step: int | torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """The kernel's uniforms in torch: Philox4x32-10 with key = seed, counter = (offs, step, 0, 0), first
    output word, ((bits >> 9) + 0.5) / 2^23. seeds and offs broadcast."""
    seeds = seeds.to(torch.int64)
    c0 = offs.to(torch.int64) & MASK32
    step = step if isinstance(step, torch.Tensor) else torch.tensor(step, device=offs.device)
    c1 = (step.to(torch.int64).reshape(()) & MASK32).expand_as(c0)
    zero = torch.zeros_like(c0)
    bits = philox4x32_reference((c0, c1, zero, zero), (seeds & MASK32, (seeds >> 32) & MASK32))[0]
    return ((bits >> 9).to(torch.float32) + 0.5) * TWO_POW_M23


def cfg_sample_reference(
    logits: torch.Tensor,
    *,
    cfg_scale: float,
    temperature: float,
    top_k: int,
    top_p: float = 1.0,
    seeds: torch.Tensor,
    step: int | torch.Tensor,
) -> torch.Tensor:
    """PyTorch version of `cfg_sample` (the test oracle and the CPU fallback): torch.topk for the k-th
    value, a sort of the top-k survivors for top-p, and the same counter-based Philox Gumbel noise as the
    kernel (generated only for the kept tokens), so both draw the same tokens for the same seeds and step."""
    B, mix = _check_sample_args(logits, seeds, step, cfg_scale, temperature, top_k, top_p)
    V = logits.shape[1]
    z = _mix_reference(logits, B, mix, cfg_scale)  # (B, V) fp32
    if temperature == 0:
        return z.argmax(dim=-1)
    z = z * (1.0 / temperature)
    keep = torch.ones_like(z, dtype=torch.bool)
    if 0 < top_k < V:
        kth = torch.topk(z, top_k, dim=-1).values[:, -1:]  # (B, 1)
        keep = z >= kth  # ties at the k-th value are all kept, as in the kernel
    if top_p < 1.0:
        w = torch.where(keep, torch.exp(z - z.max(dim=-1, keepdim=True).values), 0.0)
        w_sorted, order = torch.sort(w, dim=-1, descending=True)
        cum = w_sorted.cumsum(dim=-1)
        n_before = (cum < top_p * cum[:, -1:]).sum(dim=-1, keepdim=True)  # the head still short of top_p
        thr = z.gather(-1, order.gather(-1, n_before.clamp(max=V - 1)))  # z of the token that reaches it
        keep &= z >= thr
    rows, cols = keep.nonzero(as_tuple=True)
    u = philox_uniform_reference(seeds[rows], step, cols)
    score = torch.full_like(z, float("-inf"))
    score[rows, cols] = z[rows, cols] - torch.log(-torch.log(u))
    return score.argmax(dim=-1)


def _self_check(device, dtype, V: int, cfg_scale: float, temperature: float, top_k: int, top_p: float,
                step_on_device: bool) -> None:
    """The kernel draws the reference's tokens for 8 rows of fixed logits (see kernels/selfcheck.py)."""
    B, mix = 8, cfg_scale != 1.0
    logits = small_randn(2 * B if mix else B, V, dtype=torch.float32, device=device, seed=6).mul(3).to(dtype)
    seeds = torch.arange(B, device=device, dtype=torch.int64) * 1_000_003
    step = torch.tensor(5, device=device) if step_on_device else 5
    out = _cfg_sample_triton(logits, seeds, step, B, mix, cfg_scale, temperature, top_k, top_p)
    ref = cfg_sample_reference(logits, cfg_scale=cfg_scale, temperature=temperature, top_k=top_k, top_p=top_p,
                               seeds=seeds, step=step)
    if not torch.equal(out, ref):
        raise AssertionError(f"rows {torch.nonzero(out != ref).flatten().tolist()} of {B} drew other tokens "
                             f"({out.tolist()}) than the reference ({ref.tolist()})")


def _sample_launch_config(V: int) -> tuple:
    """(kernel, meta-parameters) for a row of V tokens: resident rows hold 32 values a thread per live array
    (up to 16 warps), longer rows stream TILE_V tiles with 4 warps."""
    if V > MAX_RESIDENT_V:
        return _sample_tiled_kernel, dict(BLOCK_V=TILE_V, num_warps=max(1, min(16, TILE_V // 1024)))
    block_v = triton.next_power_of_2(V)
    return _sample_resident_kernel, dict(BLOCK_V=block_v, DRAW_V=min(block_v, DRAW_TILE),
                                         num_warps=max(1, min(16, block_v // 1024)))


def cfg_sample(
    logits: torch.Tensor,
    *,
    cfg_scale: float,
    temperature: float,
    top_k: int,
    top_p: float = 1.0,
    seeds: torch.Tensor,
    step: int | torch.Tensor,
    backend: str = "auto",
) -> torch.Tensor:
    """Draw one token per sample row from CFG-mixed, tempered, top-k/top-p filtered logits.

    logits (2B, V): rows [0, B) conditional, rows [B, 2B) unconditional; with cfg_scale == 1 the mix is
    skipped and (B, V) is accepted (given 2B rows, the unconditional ones are not read). temperature == 0
    is greedy; top_k == 0 or >= V and top_p == 1 switch those filters off. seeds (B,) int64 and step (an
    int or a one-element int64 tensor, both on the logits' device) key the noise: the same (seed, step)
    gives the same token on every backend. No host sync, one launch. Returns tokens (B,) int64.
    """
    B, mix = _check_sample_args(logits, seeds, step, cfg_scale, temperature, top_k, top_p)
    if not use_triton(backend, logits, seeds):
        return cfg_sample_reference(logits, cfg_scale=cfg_scale, temperature=temperature, top_k=top_k,
                                    top_p=top_p, seeds=seeds, step=step)
    V = logits.shape[1]
    # the row block (from V) and the code paths: CFG mix, greedy, top-k, top-p, step on the device
    shape_class = (V if V <= MAX_RESIDENT_V else "tiled", mix, temperature == 0, 0 < top_k < V, top_p < 1.0,
                   isinstance(step, torch.Tensor))
    check = partial(_self_check, logits.device, logits.dtype, V, cfg_scale, temperature, top_k, top_p,
                    isinstance(step, torch.Tensor))
    if not passes("cfg_sample", logits.device, logits.dtype, shape_class, check, strict=backend == "triton"):
        return cfg_sample_reference(logits, cfg_scale=cfg_scale, temperature=temperature, top_k=top_k,
                                    top_p=top_p, seeds=seeds, step=step)
    return _cfg_sample_triton(logits, seeds, step, B, mix, cfg_scale, temperature, top_k, top_p)


def _cfg_sample_triton(logits, seeds, step, B: int, mix: bool, cfg_scale: float, temperature: float, top_k: int,
                       top_p: float) -> torch.Tensor:
    """The launcher (arguments already checked)."""
    V = logits.shape[1]
    out = torch.empty(B, dtype=torch.int64, device=logits.device)
    if B == 0:
        return out
    step_from_ptr = isinstance(step, torch.Tensor)
    kernel, meta = _sample_launch_config(V)
    kernel[(B,)](
        logits, seeds, step if step_from_ptr else seeds, out,
        logits.stride(0), logits.stride(1), B, V, 0 if step_from_ptr else step,
        float(cfg_scale), 1.0 if temperature == 0 else 1.0 / temperature, top_k, float(top_p),
        MIX=mix, GREEDY=temperature == 0, TOP_K=0 < top_k < V, TOP_P=top_p < 1.0,
        STEP_FROM_PTR=step_from_ptr, **meta,
        # no fused multiply-adds: the CFG mix then rounds exactly like the reference's separate torch ops
        enable_fp_fusion=False,
    )
    return out
