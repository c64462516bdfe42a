"""Fused classifier-free-guidance sampling: CFG mix, temperature, top-k, top-p and the draw in one launch.

The sampling rules are vqgpt.generate's, their one definition (`cfg_sample_reference` is those functions
in this signature); the kernel draws the same tokens without sorting the vocabulary. One program owns one
sample row:
1. z = u + s * (c - u) from the conditional row c and the unconditional row u (Ho & Salimans 2022,
   "Classifier-Free Diffusion Guidance") in fp32, with generate.apply_cfg's roundings (no fused multiply-add).
2. top-k on z: the k-th largest value is found exactly by a 32-step bitwise search over order-preserving
   uint32 keys of the floats (each step counts the keys >= a candidate; the count is monotone in the
   candidate, so the bits can be fixed from the most significant down). The tie rule is generate's: of the
   tokens tied at the k-th value, the lower indices are kept, exactly k in all (a budget of ties, counted
   in index order by a prefix sum).
3. top-p (nucleus, Holtzman et al. 2020) within the top-k, on x = z / temperature: the same bitwise search
   finds the value at which the kept mass reaches top_p, and of the tokens tied there the lower indices are
   kept while the mass before them is < top_p (generate.logits_to_probs keeps a token when the mass
   strictly before it, in the ranking, is < top_p).
4. the draw: the exponential race argmax p_i / E_i over the kept tokens (generate.sample), with
   p_i = exp(x_i - max x) (the softmax without its common denominator) and E_i = -log u_i, u_i the
   Philox4x32-10 noise of generate.counter_uniform: keyed by the row's seed, counter (i, step, 0, 0),
   ((bits >> 9) + 0.5) / 2^23. It depends on nothing else (not on the grid, the tiling or the device), so
   the kernel and the reference draw the same tokens, up to the rounding of exp and log in near ties.
temperature == 0 is greedy decoding (argmax of the mixed logits, lowest index on ties).

Rows of V <= MAX_RESIDENT_V keep their keys in registers through the searches and draw in DRAW_TILE chunks
(Philox's four words a token would not fit for the whole row); longer rows stream tiles from L2 in every pass.
"""

from __future__ import annotations

from functools import partial

import torch

from vqgpt.generate import TWO_POW_M23, SamplingConfig, apply_cfg, sample_seeded
from vqgpt.model import interpreting, use_triton

from .attention import RCP_LN2
from .selfcheck import passes, small_randn

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

MAX_RESIDENT_V = 16384  # largest row kept in registers (16 warps: 32 fp32 per thread per live array)
TILE_V = 4096  # tile of the streaming path for longer rows
DRAW_TILE = 2048  # tokens a resident row draws its Philox noise for at a time (4 words a token in registers)
SIGN_BIT = 0x80000000  # the highest bit of a uint32 key: the first candidate of the bitwise search


if triton is not None:
    # jit code may read module globals only as tl.constexpr
    _RCP_LN2 = tl.constexpr(RCP_LN2)
    _TWO_POW_M23 = tl.constexpr(TWO_POW_M23)
    _SIGN_BIT = tl.constexpr(SIGN_BIT)

    @triton.jit
    def _mixed_logits(logits_ptr, row_c, row_u, offs, V, stride_v, cfg_scale, MIX: tl.constexpr):
        """z = u + s * (c - u) in fp32 for the tokens `offs` (apply_cfg's order of operations); -inf past V."""
        ok = offs < V
        z = tl.load(logits_ptr + row_c + offs * stride_v, mask=ok, other=0.0).to(tl.float32)
        if MIX:
            u = tl.load(logits_ptr + row_u + offs * stride_v, mask=ok, other=0.0).to(tl.float32)
            z = u + cfg_scale * (z - u)
        return tl.where(ok, z, float("-inf"))

    @triton.jit
    def _ordered_key(z):
        """uint32 keys with key(a) < key(b) exactly when a < b: flip the sign bit of non-negative floats and
        every bit of negative ones (generate.rank_keys' high word, shifted by 2^31)."""
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
    def _tie_ranks(keys, thr, seen):
        """Where keys == thr: the number of tokens tied at thr before each token (`seen` of them in earlier
        tiles, the rest by index within this one): the tie rule's order."""
        tied = (keys == thr).to(tl.int32)
        return seen + tl.cumsum(tied, 0) - tied

    @triton.jit
    def _kept(keys, thr, ranks, budget):
        """The tokens a cut at (thr, budget) keeps: key above thr, or equal to it among the first `budget` ties."""
        return (keys > thr) | ((keys == thr) & (ranks < budget))

    @triton.jit
    def _weight(z, temperature, xmax):
        """exp(z / temperature - xmax): a probability up to the softmax's common denominator."""
        return tl.exp2((z / temperature - xmax) * _RCP_LN2)

    @triton.jit
    def _exp_noise(seed, step, offs):
        """Exp(1) noise of tokens `offs` for (seed, step): -log(u), u as generate.counter_uniform draws it."""
        c0 = offs.to(tl.uint32)
        zero = c0 * 0
        c1 = zero + step.to(tl.uint32)
        bits, _, _, _ = tl.philox(seed, c0, c1, zero, zero)
        u = ((bits >> 9).to(tl.float32) + 0.5) * _TWO_POW_M23
        return -tl.log(u)

    @triton.jit
    def _draw_tiled(
        logits_ptr,
        row_c,
        row_u,
        V,
        stride_v,
        cfg_scale,
        temperature,
        xmax,
        thr,
        budget,
        seed,
        step,
        MIX: tl.constexpr,
        BLOCK_V: tl.constexpr,
    ):
        """The exponential race over the kept tokens, BLOCK_V tokens at a time (Philox holds 4 words a token,
        so a whole resident row of noise at once would not fit in registers); the first index wins a tie."""
        best_score = tl.full([], -1.0, tl.float32)  # below every kept token's score (>= 0)
        best = tl.zeros([], tl.int64)
        seen = tl.zeros([], tl.int32)  # tokens tied at thr in the tiles before
        for start in range(0, V, BLOCK_V):
            offs = start + tl.arange(0, BLOCK_V)
            z = _mixed_logits(logits_ptr, row_c, row_u, offs, V, stride_v, cfg_scale, MIX)
            keys = tl.where(offs < V, _ordered_key(z), 0)
            race = _weight(z, temperature, xmax) / _exp_noise(seed, step, offs)
            score = tl.where(_kept(keys, thr, _tie_ranks(keys, thr, seen), budget), race, -1.0)
            seen += tl.sum((keys == thr).to(tl.int32), 0)
            tile_best = tl.max(score, 0)
            best = tl.where(tile_best > best_score, start + tl.argmax(score, 0).to(tl.int64), best)
            best_score = tl.maximum(best_score, tile_best)
        return best

    @triton.jit
    def _top_p_ties(target, mass_above, n_tied, thr_p, temperature, xmax):
        """How many of the n_tied kept tokens at thr_p top-p keeps: in index order, while the mass before a
        token is < target (the mass above thr_p is already short of it, so at least one)."""
        n_keep = tl.math.ceil((target - mass_above) / _weight(_key_value(thr_p), temperature, xmax))
        return tl.minimum(tl.maximum(n_keep.to(tl.int32), 1), n_tied)

    @triton.jit(do_not_specialize=["step"])
    def _sample_resident_kernel(
        logits_ptr,
        seeds_ptr,
        step_ptr,
        scale_ptr,
        out_ptr,
        stride_row,
        stride_v,
        B,
        V,
        step,
        cfg_scale,
        temperature,
        top_k,
        top_p,
        MIX: tl.constexpr,
        GREEDY: tl.constexpr,
        TOP_K: tl.constexpr,
        TOP_P: tl.constexpr,
        STEP_FROM_PTR: tl.constexpr,
        SCALE_FROM_PTR: tl.constexpr,
        BLOCK_V: tl.constexpr,
        DRAW_V: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        row_c = row * stride_row
        row_u = (row + B) * stride_row
        if SCALE_FROM_PTR:
            cfg_scale = tl.load(scale_ptr).to(tl.float32)
        offs = tl.arange(0, BLOCK_V)
        z = _mixed_logits(logits_ptr, row_c, row_u, offs, V, stride_v, cfg_scale, MIX)  # (BLOCK_V,)
        if GREEDY:
            tl.store(out_ptr + row, tl.argmax(z, 0).to(tl.int64))
        else:
            # Only the keys stay live through the searches (z is recovered from them bit-exactly) and "kept"
            # is always a cut (thr, budget), so 32 values a thread fit the register budget of 16 warps at
            # V = 16384 (tests/test_aot.py checks the spills on sm_80 and sm_90).
            keys = tl.where(offs < V, _ordered_key(z), 0)  # 0 is below every real float's key
            xmax = _key_value(tl.max(keys, 0)) / temperature
            thr = tl.full([], 1, tl.uint32)  # keys of real logits are >= 1, the padding's are 0
            budget = tl.full([], BLOCK_V, tl.int32)  # every token at thr is kept
            if TOP_K:
                thr = tl.full([], 0, tl.uint32)
                bit = tl.full([], _SIGN_BIT, tl.uint32)
                for _ in range(32):  # fix the threshold's bits from the top: the k-th largest key
                    cand = thr | bit
                    n_ge = tl.sum((keys >= cand).to(tl.int32), 0)
                    thr = tl.where(n_ge >= top_k, cand, thr)
                    bit = bit >> 1
                budget = top_k - tl.sum((keys > thr).to(tl.int32), 0)  # of a tie at the k-th value: the lowest
            if TOP_P:
                kept = _kept(keys, thr, _tie_ranks(keys, thr, 0), budget)
                w = tl.where(kept, _weight(_key_value(keys), temperature, xmax), 0.0)  # unnormalized
                target = top_p * tl.sum(w, 0)
                thr_p = tl.full([], 0, tl.uint32)
                bit = tl.full([], _SIGN_BIT, tl.uint32)
                for _ in range(32):  # the largest threshold that still keeps >= top_p of the mass
                    cand = thr_p | bit
                    mass = tl.sum(tl.where(keys >= cand, w, 0.0), 0)
                    thr_p = tl.where(mass >= target, cand, thr_p)
                    bit = bit >> 1
                # thr_p (>= thr) is the key of a kept token of weight > 0 (where the mass steps), so w > 0 tells
                # the kept ones of its ties: no mask of the kept set stays live through the search (registers).
                # Kept ties at thr_p are the first ones by index, so a budget over all its ties cuts them.
                mass_above = tl.sum(tl.where(keys > thr_p, w, 0.0), 0)
                n_tied = tl.sum(((keys == thr_p) & (w > 0)).to(tl.int32), 0)
                budget = _top_p_ties(target, mass_above, n_tied, thr_p, temperature, xmax)
                thr = thr_p
            if STEP_FROM_PTR:
                step = tl.load(step_ptr)
            seed = tl.load(seeds_ptr + row)
            # the row is in L2 now: one more pass over it, DRAW_V tokens at a time
            best = _draw_tiled(
                logits_ptr,
                row_c,
                row_u,
                V,
                stride_v,
                cfg_scale,
                temperature,
                xmax,
                thr,
                budget,
                seed,
                step,
                MIX,
                DRAW_V,
            )
            tl.store(out_ptr + row, best)

    @triton.jit
    def _row_sum_tiled(
        logits_ptr,
        row_c,
        row_u,
        V,
        stride_v,
        cfg_scale,
        temperature,
        xmax,
        thr,
        budget,
        key,
        WHAT: tl.constexpr,
        MIX: tl.constexpr,
        BLOCK_V: tl.constexpr,
    ):
        """A sum over the whole row, tile by tile. WHAT: 0 counts the keys >= key; 1 is the mass of the tokens
        kept by (thr, budget) whose key is >= key; 2 counts the kept tokens whose key is `key`. Counts are
        exact in fp32 (far below 2^24)."""
        total = tl.zeros([], tl.float32)
        seen = tl.zeros([], tl.int32)  # tokens tied at thr in the tiles before
        for start in range(0, V, BLOCK_V):
            offs = start + tl.arange(0, BLOCK_V)
            z = _mixed_logits(logits_ptr, row_c, row_u, offs, V, stride_v, cfg_scale, MIX)
            keys = tl.where(offs < V, _ordered_key(z), 0)
            if WHAT == 0:
                total += tl.sum((keys >= key).to(tl.float32), 0)
            else:
                kept = _kept(keys, thr, _tie_ranks(keys, thr, seen), budget)
                seen += tl.sum((keys == thr).to(tl.int32), 0)
                if WHAT == 1:
                    total += tl.sum(tl.where(kept & (keys >= key), _weight(z, temperature, xmax), 0.0), 0)
                else:
                    total += tl.sum((kept & (keys == key)).to(tl.float32), 0)
        return total

    @triton.jit(do_not_specialize=["step"])
    def _sample_tiled_kernel(
        logits_ptr,
        seeds_ptr,
        step_ptr,
        scale_ptr,
        out_ptr,
        stride_row,
        stride_v,
        B,
        V,
        step,
        cfg_scale,
        temperature,
        top_k,
        top_p,
        MIX: tl.constexpr,
        GREEDY: tl.constexpr,
        TOP_K: tl.constexpr,
        TOP_P: tl.constexpr,
        STEP_FROM_PTR: tl.constexpr,
        SCALE_FROM_PTR: tl.constexpr,
        BLOCK_V: tl.constexpr,
    ):
        """The same algorithm as _sample_resident_kernel for rows too long for registers: every pass
        re-reads the row tile by tile (from L2 after the first pass) and recomputes z."""
        row = tl.program_id(0).to(tl.int64)
        row_c = row * stride_row
        row_u = (row + B) * stride_row
        if SCALE_FROM_PTR:
            cfg_scale = tl.load(scale_ptr).to(tl.float32)
        zmax = tl.full([], float("-inf"), tl.float32)
        best = tl.zeros([], tl.int64)
        for start in range(0, V, BLOCK_V):  # the row max (and, greedy, the first index reaching it)
            offs = start + tl.arange(0, BLOCK_V)
            z = _mixed_logits(logits_ptr, row_c, row_u, offs, V, stride_v, cfg_scale, MIX)
            tile_max = tl.max(z, 0)
            best = tl.where(tile_max > zmax, start + tl.argmax(z, 0).to(tl.int64), best)
            zmax = tl.maximum(zmax, tile_max)
        if GREEDY:
            tl.store(out_ptr + row, best)
        else:
            xmax = zmax / temperature
            thr = tl.full([], 0, tl.uint32)
            budget = tl.zeros([], tl.int32) + V  # every token at thr is kept
            if TOP_K:
                bit = tl.full([], _SIGN_BIT, tl.uint32)
                for _ in range(32):
                    cand = thr | bit
                    n_ge = _row_sum_tiled(
                        logits_ptr,
                        row_c,
                        row_u,
                        V,
                        stride_v,
                        cfg_scale,
                        temperature,
                        xmax,
                        thr,
                        budget,
                        cand,
                        0,
                        MIX,
                        BLOCK_V,
                    )
                    thr = tl.where(n_ge >= top_k, cand, thr)
                    bit = bit >> 1
                n_above = _row_sum_tiled(
                    logits_ptr,
                    row_c,
                    row_u,
                    V,
                    stride_v,
                    cfg_scale,
                    temperature,
                    xmax,
                    thr,
                    budget,
                    thr + 1,
                    0,
                    MIX,
                    BLOCK_V,
                )
                budget = top_k - n_above.to(tl.int32)
            if TOP_P:
                target = top_p * _row_sum_tiled(
                    logits_ptr,
                    row_c,
                    row_u,
                    V,
                    stride_v,
                    cfg_scale,
                    temperature,
                    xmax,
                    thr,
                    budget,
                    thr,
                    1,
                    MIX,
                    BLOCK_V,
                )
                thr_p = tl.full([], 0, tl.uint32)  # ends >= thr: the mass at or above thr is the total
                bit = tl.full([], _SIGN_BIT, tl.uint32)
                for _ in range(32):
                    cand = thr_p | bit
                    mass = _row_sum_tiled(
                        logits_ptr,
                        row_c,
                        row_u,
                        V,
                        stride_v,
                        cfg_scale,
                        temperature,
                        xmax,
                        thr,
                        budget,
                        cand,
                        1,
                        MIX,
                        BLOCK_V,
                    )
                    thr_p = tl.where(mass >= target, cand, thr_p)
                    bit = bit >> 1
                mass_above = _row_sum_tiled(
                    logits_ptr,
                    row_c,
                    row_u,
                    V,
                    stride_v,
                    cfg_scale,
                    temperature,
                    xmax,
                    thr,
                    budget,
                    thr_p + 1,
                    1,
                    MIX,
                    BLOCK_V,
                )
                n_tied = _row_sum_tiled(
                    logits_ptr,
                    row_c,
                    row_u,
                    V,
                    stride_v,
                    cfg_scale,
                    temperature,
                    xmax,
                    thr,
                    budget,
                    thr_p,
                    2,
                    MIX,
                    BLOCK_V,
                )
                budget = _top_p_ties(target, mass_above, n_tied.to(tl.int32), thr_p, temperature, xmax)
                thr = thr_p
            if STEP_FROM_PTR:
                step = tl.load(step_ptr)
            seed = tl.load(seeds_ptr + row)
            best = _draw_tiled(
                logits_ptr,
                row_c,
                row_u,
                V,
                stride_v,
                cfg_scale,
                temperature,
                xmax,
                thr,
                budget,
                seed,
                step,
                MIX,
                BLOCK_V,
            )
            tl.store(out_ptr + row, best)


def _check_sample_args(logits, seeds, step, cfg_scale, temperature, top_k, top_p) -> tuple[int, bool]:
    """Validate the arguments; return (B, whether the CFG mix runs)."""
    if seeds.dim() != 1 or seeds.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"seeds must be an int64 tensor of shape (B,); got {seeds.dtype} {tuple(seeds.shape)}")
    B = seeds.shape[0]
    if logits.dim() != 2 or logits.shape[0] not in (B, 2 * B):
        raise ValueError(
            f"logits must be (2B, V) (conditional rows, then unconditional) or (B, V) with "
            f"B = len(seeds) = {B}; got {tuple(logits.shape)}"
        )
    if logits.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"logits must be float16, bfloat16 or float32; got {logits.dtype}")
    if logits.shape[1] == 0:
        raise ValueError("logits have an empty vocabulary")
    if isinstance(cfg_scale, torch.Tensor):
        if cfg_scale.numel() != 1 or cfg_scale.dtype != torch.float32 or cfg_scale.device != logits.device:
            raise ValueError(
                f"cfg_scale must be a number or a one-element float32 tensor on {logits.device}; got "
                f"{cfg_scale.dtype} {tuple(cfg_scale.shape)} on {cfg_scale.device}"
            )
        mix = True  # read on the device: the mix runs whatever its value, as generate's PyTorch path does
    else:
        mix = cfg_scale != 1.0
    if mix and logits.shape[0] != 2 * B:
        raise ValueError(
            f"cfg_scale={cfg_scale} needs (2B, V) logits with the unconditional rows after the "
            f"conditional ones; got {tuple(logits.shape)} for B={B}"
        )
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
            raise ValueError(
                f"step must be an int or a one-element int64 tensor on {logits.device}; got "
                f"{step.dtype} {tuple(step.shape)} on {step.device}"
            )
    elif not isinstance(step, int):
        raise TypeError(f"step must be an int or a one-element int64 tensor; got {type(step).__name__}")
    return B, mix


def cfg_sample_reference(
    logits: torch.Tensor,
    *,
    cfg_scale: float | torch.Tensor,
    temperature: float,
    top_k: int,
    top_p: float = 1.0,
    seeds: torch.Tensor,
    step: int | torch.Tensor,
) -> torch.Tensor:
    """`cfg_sample` in PyTorch: vqgpt.generate's sampling rules (apply_cfg, then sample_seeded), the one
    definition the kernel is tested against and falls back to. Same arguments, same tokens."""
    B, mix = _check_sample_args(logits, seeds, step, cfg_scale, temperature, top_k, top_p)
    mixed = apply_cfg(logits, cfg_scale) if mix else logits[:B].float()  # (B, V) fp32
    top_k = top_k if 0 < top_k < logits.shape[1] else None  # generate's "off" is None
    sampling = SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p)
    return sample_seeded(mixed, sampling, seeds.long(), step)


def _self_check(
    device,
    dtype,
    V: int,
    mix: bool,
    temperature: float,
    top_k: int,
    top_p: float,
    step_on_device: bool,
    scale_on_device: bool,
) -> None:
    """The kernel draws the reference's tokens for 8 rows of fixed logits, 2 on the interpreter, which runs the
    programs one after another (see kernels/selfcheck.py)."""
    B = 2 if interpreting() else 8
    logits = small_randn(2 * B if mix else B, V, dtype=torch.float32, device=device, seed=6).mul(3).to(dtype)
    seeds = torch.arange(B, device=device, dtype=torch.int64) * 1_000_003
    step = torch.tensor(5, device=device) if step_on_device else 5
    cfg_scale = 2.5 if mix else 1.0
    if scale_on_device:
        cfg_scale = torch.full((1,), cfg_scale, device=device)
    out = _cfg_sample_triton(logits, seeds, step, cfg_scale, temperature, top_k, top_p, B=B, mix=mix)
    ref = cfg_sample_reference(
        logits, cfg_scale=cfg_scale, temperature=temperature, top_k=top_k, top_p=top_p, seeds=seeds, step=step
    )
    if not torch.equal(out, ref):
        raise AssertionError(
            f"rows {torch.nonzero(out != ref).flatten().tolist()} of {B} drew other tokens "
            f"({out.tolist()}) than the reference ({ref.tolist()})"
        )


def _sample_launch_config(V: int) -> tuple:
    """(kernel, meta-parameters) for a row of V tokens: resident rows hold 32 values a thread per live array
    (up to 16 warps), longer rows stream TILE_V tiles with 4 warps."""
    if V > MAX_RESIDENT_V:
        return _sample_tiled_kernel, dict(BLOCK_V=TILE_V, num_warps=max(1, min(16, TILE_V // 1024)))
    block_v = triton.next_power_of_2(V)
    return _sample_resident_kernel, dict(
        BLOCK_V=block_v, DRAW_V=min(block_v, DRAW_TILE), num_warps=max(1, min(16, block_v // 1024))
    )


def cfg_sample(
    logits: torch.Tensor,
    *,
    cfg_scale: float | torch.Tensor,
    temperature: float,
    top_k: int,
    top_p: float = 1.0,
    seeds: torch.Tensor,
    step: int | torch.Tensor,
    backend: str = "auto",
) -> torch.Tensor:
    """Draw one token per sample row from CFG-mixed, tempered, top-k/top-p filtered logits.

    logits (2B, V): rows [0, B) conditional, rows [B, 2B) unconditional. cfg_scale is a number, or a
    one-element float32 tensor on the logits' device (read there: a CUDA graph then follows a schedule, and
    the mix runs whatever its value). A number 1 skips the mix, and (B, V) is accepted (given 2B rows, the
    unconditional ones are not read). temperature == 0 is greedy; top_k == 0 or >= V and top_p == 1 switch
    those filters off. seeds (B,) int64 and step (an int or a one-element int64 tensor, both on the logits'
    device) key the noise: the same (seed, step) gives the same token on every backend. backend: see
    vqgpt.model.use_triton. No host sync, one launch. Returns tokens (B,) int64.
    """
    B, mix = _check_sample_args(logits, seeds, step, cfg_scale, temperature, top_k, top_p)
    if not use_triton(backend, logits, seeds):
        return cfg_sample_reference(
            logits, cfg_scale=cfg_scale, temperature=temperature, top_k=top_k, top_p=top_p, seeds=seeds, step=step
        )
    V = logits.shape[1]
    # the row block (from V) and the code paths: CFG mix, greedy, top-k, top-p, step and scale on the device
    on_device = (isinstance(step, torch.Tensor), isinstance(cfg_scale, torch.Tensor))
    shape_class = (V if V <= MAX_RESIDENT_V else "tiled", mix, temperature == 0, 0 < top_k < V, top_p < 1.0, *on_device)
    check = partial(_self_check, logits.device, logits.dtype, V, mix, temperature, top_k, top_p, *on_device)
    if not passes("cfg_sample", logits.device, logits.dtype, shape_class, check, strict=backend == "triton"):
        return cfg_sample_reference(
            logits, cfg_scale=cfg_scale, temperature=temperature, top_k=top_k, top_p=top_p, seeds=seeds, step=step
        )
    return _cfg_sample_triton(logits, seeds, step, cfg_scale, temperature, top_k, top_p, B=B, mix=mix)


def _cfg_sample_triton(
    logits, seeds, step, cfg_scale, temperature: float, top_k: int, top_p: float, *, B: int, mix: bool
) -> torch.Tensor:
    """The launcher (arguments already checked)."""
    V = logits.shape[1]
    out = torch.empty(B, dtype=torch.int64, device=logits.device)
    if B == 0:
        return out
    step_from_ptr, scale_from_ptr = isinstance(step, torch.Tensor), isinstance(cfg_scale, torch.Tensor)
    kernel, meta = _sample_launch_config(V)
    kernel[(B,)](
        logits,
        seeds,
        step if step_from_ptr else seeds,
        cfg_scale if scale_from_ptr else logits,
        out,
        logits.stride(0),
        logits.stride(1),
        B,
        V,
        0 if step_from_ptr else step,
        1.0 if scale_from_ptr else float(cfg_scale),
        float(temperature) if temperature > 0 else 1.0,
        top_k,
        float(top_p),
        MIX=mix,
        GREEDY=temperature == 0,
        TOP_K=0 < top_k < V,
        TOP_P=top_p < 1.0,
        STEP_FROM_PTR=step_from_ptr,
        SCALE_FROM_PTR=scale_from_ptr,
        **meta,
        # no fused multiply-adds: the CFG mix then rounds exactly like the reference's separate torch ops
        enable_fp_fusion=False,
    )
    return out
