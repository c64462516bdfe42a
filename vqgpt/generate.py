"""Sampling image codes from the GPT: small pure functions in the style of gpt-fast's generate.py.

    codes = generate(model, text_ids, SamplingConfig(cfg_scale=3.0, top_k=100), seeds)   # (B, h, w)

- Classifier-free guidance (Ho & Salimans 2022): each prompt row is paired with an unconditional row
  (the null caption, all PAD, or a negative prompt's ids: `uncond_ids`) in one batch of 2B rows; the
  sampler sees u + s * (c - u) and both rows of a pair receive the same token. cfg_scale == 1 runs the B
  conditional rows only.
- Randomness is counter based: the noise for (row seed, step, vocab index) is Philox4x32-10 keyed by the
  seed with counter (vocab index, step, 0, 0) (`counter_uniform`), computed with torch integer ops on the
  logits' device. A seed gives the same image in any batch, at any position, on any device; a step needs
  no host sync and has no data-dependent shape (CUDA-graph capturable); and since Philox is what Triton
  exposes as tl.philox, a fused sampling kernel can draw exactly the same tokens.
- A draw is an exponential race, argmax_i p_i / E_i with E_i ~ Exp(1) i.i.d., which picks i with
  probability p_i (the Gumbel-max trick in another form: -log E_i is Gumbel).
- Every step (`decode_step`: sample, feed the token) works in place on static tensors, so it can be replayed
  as a CUDA graph (`generate(..., cuda_graph=True)`) or compiled (`compile=True`); docs/BENCHMARKS.md times both.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from .model import import_kernels, use_triton_kernels

CFG_SCHEDULES = ("constant", "linear", "interval")


# Sampling bounds that keep every intermediate finite in float32 (max ~3.4e38, smallest normal ~1.2e-38):
# logits / temperature and the guidance mix (1 + s) * cond - s * uncond stay far from overflow, and a top-p
# mass below 1e-6 is top-1 anyway.
MIN_TEMPERATURE, MAX_TEMPERATURE = 1e-4, 1e4
MAX_CFG = 1e4
MIN_TOP_P = 1e-6


@dataclass
class SamplingConfig:
    cfg_scale: float = 3.0  # guidance scale s in u + s * (c - u); 1 = no guidance (conditional only)
    cfg_schedule: str = "constant"  # "constant" | "linear" (1 -> cfg_scale over the image) | "interval"
    cfg_interval: int | None = None  # "interval": guidance on for the first cfg_interval image tokens only
    top_k: int | None = None  # sample among the k most likely codes; None = the whole codebook
    top_p: float = 1.0  # nucleus: the smallest set (within the top-k) holding this probability mass
    temperature: float = 1.0  # logits / temperature; 0 = greedy (argmax)

    def validate(self, codebook_size: int) -> None:
        """Raise ValueError naming the first bad field and the allowed range."""
        s = self.cfg_scale
        # Bounds are float32's, where the logits live: 1e39 is finite in Python and inf there.
        if isinstance(s, bool) or not isinstance(s, numbers.Real) or not math.isfinite(s) or not 0 <= s <= MAX_CFG:
            raise ValueError(f"cfg_scale must be a number in [0, {MAX_CFG:g}] (1 = no guidance), got {s!r}")
        if self.cfg_schedule not in CFG_SCHEDULES:
            raise ValueError(f"unknown cfg_schedule {self.cfg_schedule!r}; choose one of {CFG_SCHEDULES}")
        if self.cfg_schedule == "interval":
            if not _is_int(self.cfg_interval) or self.cfg_interval < 0:
                raise ValueError(f"cfg_schedule='interval' needs cfg_interval, an int >= 0; got {self.cfg_interval!r}")
        elif self.cfg_interval is not None:
            raise ValueError(
                f"cfg_interval={self.cfg_interval!r} is only used with cfg_schedule='interval' "
                f"(cfg_schedule is {self.cfg_schedule!r}); leave it None"
            )
        if self.top_k is not None and (not _is_int(self.top_k) or not 1 <= self.top_k <= codebook_size):
            raise ValueError(
                f"top_k must be None or an int in [1, {codebook_size}] (codebook size), got {self.top_k!r}"
            )
        p = self.top_p
        if isinstance(p, bool) or not isinstance(p, numbers.Real) or not MIN_TOP_P <= p <= 1:
            raise ValueError(f"top_p must be in [{MIN_TOP_P:g}, 1] (1 = off), got {p!r}")
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, numbers.Real) or not math.isfinite(t) or t < 0 or \
                0 < t < MIN_TEMPERATURE or t > MAX_TEMPERATURE:
            raise ValueError(f"temperature must be 0 (greedy) or in [{MIN_TEMPERATURE:g}, {MAX_TEMPERATURE:g}], "
                             f"got {t!r}")

    def scales(self, n_tokens: int) -> list[float]:
        """Guidance scale at each of the n_tokens image steps (python floats: known before sampling)."""
        s = float(self.cfg_scale)
        if self.cfg_schedule == "linear":  # ramps from 1 at the first code to s at the last
            return [1 + (s - 1) * k / max(n_tokens - 1, 1) for k in range(n_tokens)]
        if self.cfg_schedule == "interval":
            return [s if k < self.cfg_interval else 1.0 for k in range(n_tokens)]
        return [s] * n_tokens


def _is_int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


# ----------------------------------------------------------------------------------------------------
# Counter-based noise: Philox4x32-10 (Salmon et al. 2011, "Parallel Random Numbers: As Easy as 1, 2, 3"),
# the generator behind triton.language.philox, so a Triton sampler can reproduce it exactly:
#   key = the row's seed (low word, high word), counter = (vocab index, step, 0, 0), first output word.
# uint32 values live in int64 tensors; the round products wrap modulo 2^64 (see _mulhilo32), so the
# arithmetic is exact and the same on every device.

PHILOX_ROUND_A = 0xD2511F53  # the two round multipliers
PHILOX_ROUND_B = 0xCD9E8D57
PHILOX_KEY_A = 0x9E3779B9  # key schedule increments: 2^32 / golden ratio
PHILOX_KEY_B = 0xBB67AE85  # and 2^32 * (sqrt(3) - 1)
PHILOX_ROUNDS = 10
MASK32 = 0xFFFFFFFF
TWO_POW_M23 = 2.0**-23  # a 23-bit integer + 0.5, times this, is exact in float32 and strictly inside (0, 1)
# generate draws the noise of a whole image up front when it is at most this many values (B * N * V): one
# Philox call on 2^17 values costs about what 64 per-step calls on a few hundred do on a CPU.
NOISE_TABLE_MAX = 2**17


def _mulhilo32(a: int | Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """(high, low) 32-bit words of a * b for uint32 multipliers a and uint32 values b (held in int64).

    The product needs all 64 bits: int64 multiplication keeps it modulo 2^64 (two's complement wrap-around,
    as on every torch backend), so its low word is p & MASK32 and its high word (p >> 32) & MASK32 (the mask
    drops the sign bits an arithmetic shift brings in). Four tensor ops where splitting b into 16-bit
    halves to stay below 2^63 takes eleven; the known-answer tests pin the result.
    """
    p = a * b
    return (p >> 32) & MASK32, p & MASK32


def _lanes(words: tuple[Tensor, Tensor], ndim: int) -> Tensor:
    """Stack two broadcastable words into (2, ...) with `ndim` trailing dims (leading 1s, as broadcasting)."""
    a, b = torch.broadcast_tensors(*words)
    return torch.stack([a, b]).view(2, *[1] * (ndim - a.ndim), *a.shape)


def philox4x32(counter: tuple[Tensor, Tensor, Tensor, Tensor], key: tuple[Tensor, Tensor]) -> tuple[Tensor, ...]:
    """Philox4x32-10 on broadcastable int64 tensors of uint32 words -> the four output words.

    A round maps (c0, c1, c2, c3) to (hi(B c2) ^ c1 ^ k0, lo(B c2), hi(A c0) ^ c3 ^ k1, lo(A c0)) for the
    round multipliers A, B. Both products run as one stacked tensor, (c2, c0) times (B, A), which gives the
    new (c0, c2) = hi ^ (c1, c3) ^ (k0, k1) and the new (c1, c3) = lo: half the tensor ops of two separate
    products, and the per-op overhead is what a small decode step pays for.
    """
    ndim = len(torch.broadcast_shapes(*(w.shape for w in (*counter, *key))))
    c0, c1, c2, c3 = counter
    even, odd = _lanes((c0, c2), ndim), _lanes((c1, c3), ndim)  # (c0, c2), (c1, c3)
    keys = _lanes(key, ndim)  # (k0, k1)
    device, shape = even.device, (2,) + (1,) * ndim
    # Filled rather than torch.tensor(...): a host-to-device copy would sync a CUDA stream.
    multipliers = torch.empty(shape, dtype=torch.long, device=device)
    multipliers[0], multipliers[1] = PHILOX_ROUND_B, PHILOX_ROUND_A
    key_step = torch.empty(shape, dtype=torch.long, device=device)
    key_step[0], key_step[1] = PHILOX_KEY_A, PHILOX_KEY_B
    for _ in range(PHILOX_ROUNDS):
        hi, lo = _mulhilo32(multipliers, even.flip(0))  # (hi(B c2), hi(A c0)), (lo(B c2), lo(A c0))
        even, odd = hi ^ odd ^ keys, lo
        keys = (keys + key_step) & MASK32
    (c0, c2), (c1, c3) = even.unbind(0), odd.unbind(0)
    return c0, c1, c2, c3


def counter_uniform(seeds: Tensor, step: int | Tensor, vocab: int | Tensor) -> Tensor:
    """Uniform(0, 1) noise in float32, a pure function of (seeds[b], step, vocab index).

    vocab: the vocabulary size V (noise for every index: (B, V)), or (B, n) vocab indices to draw at.
    u = ((bits >> 9) + 0.5) * 2^-23 with bits = Philox4x32-10(key=seed, counter=(index, step, 0, 0))[0].
    23 bits, not 24: (2^24 - 1) + 0.5 rounds to 2^24 in float32, which would give u == 1 and E == 0.
    """
    seeds = seeds.long()
    if isinstance(vocab, Tensor):
        index = vocab.long()  # (B, n)
    else:
        index = torch.arange(vocab, device=seeds.device).expand(seeds.shape[0], vocab)  # (B, V)
    return _philox_uniform(seeds[:, None], step, index)


def _philox_uniform(seeds: Tensor, step: int | Tensor, index: Tensor) -> Tensor:
    """counter_uniform on broadcastable int64 tensors (step may be an int): seeds, steps, vocab indices -> noise."""
    zero = index.new_zeros(())  # broadcast by philox4x32: no (B, V) tensors of zeros
    bits = philox4x32((index, zero + (step & MASK32), zero, zero), (seeds & MASK32, (seeds >> 32) & MASK32))[0]
    return ((bits >> 9).float() + 0.5) * TWO_POW_M23


def exponential_noise(seeds: Tensor, step: int | Tensor, vocab: int | Tensor) -> Tensor:
    """Exp(1) noise for the exponential race in `sample` (inverse CDF of `counter_uniform`, same shapes)."""
    return -torch.log(counter_uniform(seeds, step, vocab))


def exponential_noise_table(seeds: Tensor, n_steps: int, vocab: int) -> Tensor:
    """(B, n_steps, V): exponential_noise(seeds, k, vocab) of every step k < n_steps, in one Philox call.

    The same values as n_steps separate calls. Philox is ~150 tensor ops whatever their size, so where the
    table is small (a few prompts, a small codebook: see NOISE_TABLE_MAX) drawing it up front takes most
    of the per-op overhead out of a decode step on a CPU.
    """
    device = seeds.device
    steps = torch.arange(n_steps, device=device)[None, :, None]  # (1, N, 1)
    index = torch.arange(vocab, device=device)[None, None, :]  # (1, 1, V)
    return -torch.log(_philox_uniform(seeds.long()[:, None, None], steps, index))  # (B, N, V)


# ----------------------------------------------------------------------------------------------------
# Logits -> token


def logits_to_probs(logits: Tensor, temperature: float, top_k: int | None, top_p: float) -> Tensor:
    """(..., V) logits -> (..., V) float32 probabilities after temperature, top-k, then top-p.

    top-p keeps the smallest most-likely prefix of the top-k set (of the whole vocab when top_k is None)
    whose mass reaches top_p, measured on the tempered top-k distribution (the order HF's warpers use);
    only that set is sorted. temperature 0 puts all mass on the argmax.
    """
    logits = logits.float()
    if temperature == 0:
        return torch.zeros_like(logits).scatter_(-1, logits.argmax(-1, keepdim=True), 1.0)
    if temperature != 1:  # x / 1 is x: skip the op
        logits = logits / temperature
    if top_k is None and top_p >= 1:
        return torch.softmax(logits, dim=-1)
    if top_k is not None:
        vals, idx = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1)  # (..., k), sorted descending
    else:
        vals, idx = torch.sort(logits, dim=-1, descending=True)  # (..., V)
    if top_p < 1:
        p = torch.softmax(vals, dim=-1)
        mass_before = p.cumsum(-1) - p  # mass of the strictly more likely tokens
        vals = vals.masked_fill(mass_before >= top_p, float("-inf"))  # the first token always stays
    return torch.zeros_like(logits).scatter_(-1, idx, torch.softmax(vals, dim=-1))


def sample(logits: Tensor, cfg: SamplingConfig, noise: Tensor) -> Tensor:
    """(B, V) logits, (B, V) Exp(1) noise -> (B,) tokens: argmax(probs / noise), a draw from probs."""
    if cfg.temperature == 0:
        return logits.argmax(-1)
    probs = logits_to_probs(logits, cfg.temperature, cfg.top_k, cfg.top_p)
    return (probs / noise).argmax(-1)


def sample_seeded(
    logits: Tensor, cfg: SamplingConfig, seeds: Tensor, step: int | Tensor, noise: Tensor | None = None
) -> Tensor:
    """`sample` with each row's counter-based noise for `step`, drawn only where it can matter.

    With top_k set only the k candidates get noise: the noise of a vocab index does not depend on which
    other indices are drawn, so the tokens are those of `sample(logits, cfg, exponential_noise(seeds,
    step, V))` at a fraction of the work for a large codebook. `noise`: that step's (B, V) noise, already
    drawn (a row of `exponential_noise_table`).
    """
    if cfg.temperature == 0 or cfg.top_k is None:
        return sample(logits, cfg, noise if noise is not None else exponential_noise(seeds, step, logits.shape[-1]))
    vals, idx = torch.topk(logits.float(), cfg.top_k, dim=-1)  # (B, k), sorted descending
    within = replace(cfg, top_k=None)  # the top-k restriction is done; temperature and top-p remain
    noise = noise.gather(-1, idx) if noise is not None else exponential_noise(seeds, step, idx)  # (B, k)
    choice = sample(vals, within, noise)  # (B,) positions in the top k
    return idx.gather(-1, choice[:, None]).squeeze(-1)


def apply_cfg(logits: Tensor, scale: float | Tensor) -> Tensor:
    """(2B, V) logits, conditional rows first, then their unconditional twins -> (B, V) u + s * (c - u)."""
    cond, uncond = logits.float().chunk(2, dim=0)
    return uncond + scale * (cond - uncond)


# ----------------------------------------------------------------------------------------------------
# The decode loop


def prefill(model, text_ids: Tensor) -> Tensor:
    """Run [text][BOI] through the model, filling its KV cache -> logits (B, V) for the first code."""
    return model.forward_cached(text_ids=text_ids)


def decode_one_token(model, token: Tensor, pos: Tensor) -> Tensor:
    """Feed token (B,) at sequence position pos (0-d LongTensor on the device) -> next-code logits (B, V)."""
    return model.forward_cached(codes=token, input_pos=pos)


def sample_step(
    logits: Tensor,
    cfg: SamplingConfig,
    seeds: Tensor,
    step: Tensor,
    *,
    scale_per_step: Tensor | None,
    fused=None,
    scale: float | None = None,
    noise_table: Tensor | None = None,
) -> Tensor:
    """Draw image code `step` (0-d LongTensor) for each prompt from the step's logits (2B or B rows) -> (B,).

    Guidance: scale_per_step[step] on the PyTorch path (a device tensor; None: no guidance), the python float
    `scale` in the fused kernel (`fused`: vqgpt.kernels, or None for PyTorch). Both draw the same tokens.
    noise_table: the PyTorch path's noise of every step, drawn up front (`exponential_noise_table`), or None
    to draw this step's now.
    """
    if fused is not None:
        return fused.cfg_sample(
            logits,
            cfg_scale=scale,
            temperature=cfg.temperature,
            top_k=cfg.top_k or 0,  # the kernel's "off" is 0
            top_p=cfg.top_p,
            seeds=seeds,
            step=step,
        )
    if scale_per_step is not None:  # index_select: indexing by a 0-d tensor would read it on the host
        logits = apply_cfg(logits, scale_per_step.index_select(0, step.view(1)))
    noise = noise_table.index_select(1, step.view(1)).squeeze(1) if noise_table is not None else None  # (B, V)
    return sample_seeded(logits, cfg, seeds, step, noise)


def decode_step(
    model,
    logits: Tensor,
    cfg: SamplingConfig,
    seeds: Tensor,
    step: Tensor,
    input_pos: Tensor,
    *,
    scale_per_step: Tensor | None,
    fused=None,
    scale: float | None = None,
    noise_table: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """One step of the loop: draw code `step` from logits and feed it (twice under guidance: both rows of a
    pair) at input_pos -> (codes (B,), logits for the next code). What compile=True compiles."""
    token = sample_step(
        logits, cfg, seeds, step, scale_per_step=scale_per_step, fused=fused, scale=scale, noise_table=noise_table
    )
    fed = token.repeat(2) if scale_per_step is not None else token  # guided: conditional rows, then null
    return token, decode_one_token(model, fed, input_pos)


def capture_cuda_graph(fn, warmup: int = 2) -> torch.cuda.CUDAGraph:
    """Record fn() (all in-place on static tensors) as a CUDA graph, after warm-up runs on a side stream
    (Triton JIT compiles, allocator pools settle); replay() then launches the whole step at once."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


@torch.no_grad()
def generate(
    model,
    text_ids: Tensor,
    cfg: SamplingConfig,
    seeds: Tensor,
    *,
    progress: bool = False,
    cuda_graph: bool = False,
    compile: bool = False,
    uncond_ids: Tensor | None = None,
) -> Tensor:
    """Sample image codes (B, h, w) for text_ids (B, T_text), one seed per row (LongTensor (B,)).

    uncond_ids: (B, T_text) text of the guidance rows (a negative prompt: u is then the logits given it,
    and guidance pushes away from it); None = the null caption (all PAD), what training dropped captions to.

    The model runs in eval mode (restored afterwards) with a KV cache of 2B rows under guidance, B without.
    Two ways to take the per-step launch overhead away, both paying a one-time cost first:
    - cuda_graph=True (a CUDA model): one decode step is recorded as a CUDA graph in each call and replayed:
      the same kernels as without. With the fused kernels (attn_backend "auto") the guidance scale is baked
      into the graph, so it must be constant.
    - compile=True (the PyTorch path: a CPU, or attn_backend "torch"): `decode_step` goes through
      torch.compile (fullgraph, static shapes), kept in model.compiled_decode_step; a new batch size or
      SamplingConfig compiles again. Float rounding differs from eager, which can flip a near-tie draw.
    """
    mc = model.config
    if text_ids.ndim != 2 or text_ids.shape[0] == 0:
        raise ValueError(f"text_ids must be a non-empty (B, {mc.text_len}) batch, got {tuple(text_ids.shape)}")
    if text_ids.shape[1] != mc.text_len:
        raise ValueError(
            f"text_ids has {text_ids.shape[1]} tokens per row but the model's text context is {mc.text_len}"
        )
    B, N = text_ids.shape[0], mc.n_image
    if seeds.shape != (B,) or seeds.dtype.is_floating_point or seeds.dtype == torch.bool:
        raise ValueError(f"seeds must be an integer tensor of shape ({B},), got {seeds.dtype} {tuple(seeds.shape)}")
    if uncond_ids is not None and uncond_ids.shape != text_ids.shape:
        raise ValueError(f"uncond_ids must have text_ids' shape {tuple(text_ids.shape)}, got {tuple(uncond_ids.shape)}")
    cfg.validate(mc.image_vocab_size)

    device = model.head.weight.device
    text_ids, seeds = text_ids.to(device), seeds.to(device, torch.long)
    scales = cfg.scales(N)
    guided = any(s != 1.0 for s in scales)
    if guided:  # rows [0, B) conditional, [B, 2B) their null-caption (or negative-prompt) twins
        uncond = torch.full_like(text_ids, mc.text_pad_id) if uncond_ids is None else uncond_ids.to(device)
        text_ids = torch.cat([text_ids, uncond])
    scale_per_step = torch.tensor(scales, device=device) if guided else None  # (N,)
    # The fused CFG + top-k/top-p + draw kernel, on the same switch as attention; same Philox noise.
    fused = import_kernels() if use_triton_kernels(mc.attn_backend, seeds) else None
    # The PyTorch sampler's noise for the whole image in one go where that table is small (see
    # exponential_noise_table); the fused kernel draws its own, and greedy decoding needs none.
    noise_table = None
    if fused is None and cfg.temperature > 0 and B * N * mc.image_vocab_size <= NOISE_TABLE_MAX:
        noise_table = exponential_noise_table(seeds, N, mc.image_vocab_size)  # (B, N, V)
    if cuda_graph and compile:
        raise ValueError("cuda_graph=True and compile=True are two ways to the same end; pick one")
    if cuda_graph and device.type != "cuda":
        raise ValueError(f"cuda_graph=True needs the model on a CUDA device; it is on {device}")
    if cuda_graph and fused is not None and len(set(scales)) > 1:
        raise ValueError(
            f"cuda_graph=True with the fused sampler needs a constant guidance scale; cfg_schedule="
            f"{cfg.cfg_schedule!r} varies it (use cfg_schedule='constant', or attn_backend='torch')"
        )
    if compile and fused is not None:
        raise ValueError(
            f"compile=True compiles the PyTorch decode step, but this model samples with the Triton kernels "
            f"(attn_backend {mc.attn_backend!r} on {device}): use cuda_graph=True, or set "
            f"model.config.attn_backend = 'torch'"
        )
    step_fn = decode_step
    if compile:
        if getattr(model, "compiled_decode_step", None) is None:
            model.compiled_decode_step = torch.compile(decode_step, fullgraph=True, dynamic=False)
        step_fn = model.compiled_decode_step

    steps = range(N)
    if progress:
        from tqdm import tqdm

        steps = tqdm(steps, desc="sampling", unit="tok")
    was_training = model.training
    model.eval()
    try:
        # Inference mode drops autograd's bookkeeping, which a small decode step pays for on every op.
        with torch.inference_mode():
            model.setup_cache(text_ids.shape[0])
            # Every step works in place on static tensors, so it can also be replayed as a CUDA graph.
            codes = torch.empty(B, N, dtype=torch.long, device=device)
            step = torch.zeros((), dtype=torch.long, device=device)  # image step k, advanced in place
            input_pos = torch.full((), mc.image_start, dtype=torch.long, device=device)  # position of code k
            logits = prefill(model, text_ids)

            def advance(k: int) -> None:
                """Draw code k, record it, feed it back: logits then predict code k + 1."""
                token, next_logits = step_fn(
                    model,
                    logits,
                    cfg,
                    seeds,
                    step,
                    input_pos,
                    scale_per_step=scale_per_step,
                    fused=fused,
                    scale=scales[k] if fused is not None else None,
                    noise_table=noise_table,
                )
                codes.index_copy_(1, step.view(1), token[:, None])
                logits.copy_(next_logits)
                input_pos.add_(1)
                step.add_(1)

            graph = None
            if cuda_graph and N > 1:
                first_logits = logits.clone()
                # Warm-up and capture run steps as well: the K/V they write sit at positions the real steps
                # overwrite before reading them, and the state they advance is reset here.
                graph = capture_cuda_graph(lambda: advance(0))
                logits.copy_(first_logits)
                step.zero_()
                input_pos.fill_(mc.image_start)
            for k in steps:
                if k + 1 == N:  # the last code feeds nothing
                    codes[:, k] = sample_step(
                        logits, cfg, seeds, step, scale_per_step=scale_per_step, fused=fused, scale=scales[k],
                        noise_table=noise_table,
                    )  # fmt: skip
                elif graph is not None:
                    graph.replay()
                else:
                    advance(k)
    finally:
        model.train(was_training)
    return codes.view(B, *mc.image_grid).clone()  # a normal tensor again, outside inference mode
