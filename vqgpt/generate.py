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
  exposes as tl.philox, the fused sampling kernel (vqgpt.kernels.cfg_sample) draws the same tokens.
- A draw is an exponential race, argmax_i p_i / E_i with E_i ~ Exp(1) i.i.d., which picks i with
  probability p_i (the Gumbel-max trick in another form: -log E_i is Gumbel).
- These functions are the one definition of the sampling rules (Philox, the guidance mix, temperature,
  top-k, top-p, the tie rule, the draw): the fused kernel is tested against them and falls back to them.
- A `generate` call builds its `Sampler` once (seeds, guidance scales, noise, which sampler draws); every
  step (`decode_step`: sample, feed the token) works in place on static tensors, so it can be replayed as a
  CUDA graph (`generate(..., cuda_graph=True)`) or compiled (`compile=True`); docs/BENCHMARKS.md times both.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, replace
from types import ModuleType

import torch
from torch import Tensor

from .model import GPTConfig, use_triton

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
        if (
            isinstance(t, bool)
            or not isinstance(t, numbers.Real)
            or not math.isfinite(t)
            or t < 0
            or 0 < t < MIN_TEMPERATURE
            or t > MAX_TEMPERATURE
        ):
            raise ValueError(
                f"temperature must be 0 (greedy) or in [{MIN_TEMPERATURE:g}, {MAX_TEMPERATURE:g}], got {t!r}"
            )

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
# Logits -> token: the sampling rules. This is their one definition: vqgpt.kernels' fused sampler is tested
# against these functions (kernels/sampling.py, cfg_sample_reference) and falls back to them.
#
# One tie rule everywhere: tokens are ranked by value, and equal values by vocab index, lower first. top-k
# keeps exactly k tokens (at a tie across the k-th value, the lower indices), top-p keeps a prefix of that
# ranking, and temperature 0 takes the first maximum.


def apply_cfg(logits: Tensor, scale: float | Tensor) -> Tensor:
    """(2B, V) logits, conditional rows first, then their unconditional twins -> (B, V) u + s * (c - u)."""
    cond, uncond = logits.float().chunk(2, dim=0)
    return uncond + scale * (cond - uncond)


def rank_keys(logits: Tensor) -> Tensor:
    """(..., V) float32 -> int64 keys in the order of the tie rule: value first, then the lower index.

    The high word is the float's bit pattern made order-preserving as a signed int32 (a negative float's
    magnitude bits are flipped), the low word MASK32 - index; so the keys are distinct, and torch.topk over
    them gives the k largest values with a tie at the k-th value broken towards the lower indices (torch.topk
    over the floats breaks it as its algorithm happens to).
    """
    bits = logits.view(torch.int32).long()
    ordered = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # monotone in the float value
    index = torch.arange(logits.shape[-1], device=logits.device)
    return ordered * 2**32 + (MASK32 - index)


def top_k_ranked(logits: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """(..., V) logits -> (values, indices) (..., k) of the k highest-ranked tokens, best first."""
    logits = logits.float()
    idx = torch.topk(rank_keys(logits), k, dim=-1).indices  # (..., k)
    return logits.gather(-1, idx), idx


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
        vals, idx = top_k_ranked(logits, min(top_k, logits.shape[-1]))  # (..., k), best first
    else:  # stable: equal values keep the lower index first
        vals, idx = torch.sort(logits, dim=-1, descending=True, stable=True)  # (..., V)
    if top_p < 1:
        p = torch.softmax(vals, dim=-1)
        mass_before = p.cumsum(-1) - p  # mass of the tokens ranked before
        vals = vals.masked_fill(mass_before >= top_p, float("-inf"))  # the first token always stays
    return torch.zeros_like(logits).scatter_(-1, idx, torch.softmax(vals, dim=-1))


def sample(logits: Tensor, sampling: SamplingConfig, noise: Tensor) -> Tensor:
    """(B, V) logits, (B, V) Exp(1) noise -> (B,) tokens: argmax(probs / noise), a draw from probs."""
    if sampling.temperature == 0:
        return logits.argmax(-1)
    probs = logits_to_probs(logits, sampling.temperature, sampling.top_k, sampling.top_p)
    return (probs / noise).argmax(-1)


def sample_seeded(
    logits: Tensor, sampling: SamplingConfig, seeds: Tensor, step: int | Tensor, noise: Tensor | None = None
) -> Tensor:
    """`sample` with each row's counter-based noise for `step`, drawn only where it can matter.

    With top_k set only the k candidates get noise: the noise of a vocab index does not depend on which
    other indices are drawn, so the tokens are those of `sample(logits, sampling, exponential_noise(seeds,
    step, V))` at a fraction of the work for a large codebook. `noise`: that step's (B, V) noise, already
    drawn (a row of `exponential_noise_table`).
    """
    if sampling.temperature == 0 or sampling.top_k is None:
        noise = noise if noise is not None else exponential_noise(seeds, step, logits.shape[-1])
        return sample(logits, sampling, noise)
    vals, idx = top_k_ranked(logits, sampling.top_k)  # (B, k), best first
    within = replace(sampling, top_k=None)  # the top-k restriction is done; temperature and top-p remain
    noise = noise.gather(-1, idx) if noise is not None else exponential_noise(seeds, step, idx)  # (B, k)
    choice = sample(vals, within, noise)  # (B,) positions in the top k
    return idx.gather(-1, choice[:, None]).squeeze(-1)


# ----------------------------------------------------------------------------------------------------
# The decode loop


@dataclass(frozen=True, eq=False)
class Sampler:
    """How one `generate` call draws each image code: built once per call (`Sampler.build`), then called
    as sampler(logits, step) with the step as a 0-d device tensor, so that a step has no host sync."""

    sampling: SamplingConfig
    seeds: Tensor  # (B,) int64 on the model's device: row b's noise is keyed by seeds[b]
    scales: Tensor | None  # (N,) float32 guidance scale of every image step; None: no guidance, B rows
    noise: Tensor | None  # (B, N, V) the PyTorch path's noise of every step, drawn up front, or None
    kernels: ModuleType | None  # vqgpt.kernels when its fused sampler draws (attn_backend's switch), else None
    backend: str  # attn_backend, handed to the fused sampler ("triton": a failed self-check raises)

    @classmethod
    def build(cls, config: GPTConfig, sampling: SamplingConfig, seeds: Tensor) -> Sampler:
        """The sampler of a model with this config: guided when any step's scale is not 1; the fused kernel
        on the attention's backend switch; the noise table where it is small (see NOISE_TABLE_MAX) and the
        PyTorch path needs noise."""
        scales = sampling.scales(config.n_image)
        guided = any(s != 1.0 for s in scales)
        kernels = None
        if use_triton(config.attn_backend, seeds):
            from vqgpt import kernels
        noise = None
        if (
            kernels is None
            and sampling.temperature > 0
            and seeds.shape[0] * config.n_image * config.image_vocab_size <= NOISE_TABLE_MAX
        ):
            noise = exponential_noise_table(seeds, config.n_image, config.image_vocab_size)  # (B, N, V)
        return cls(
            sampling,
            seeds,
            torch.tensor(scales, device=seeds.device) if guided else None,
            noise,
            kernels,
            config.attn_backend,
        )

    @property
    def guided(self) -> bool:
        return self.scales is not None

    def __call__(self, logits: Tensor, step: Tensor) -> Tensor:
        """Draw image code `step` for each prompt from that step's logits (2B rows guided, else B) -> (B,)."""
        # index_select, not scales[step]: indexing by a 0-d tensor would read it on the host
        scale = self.scales.index_select(0, step.view(1)) if self.guided else 1.0
        if self.kernels is not None:
            s = self.sampling
            return self.kernels.cfg_sample(
                logits,
                cfg_scale=scale,
                temperature=s.temperature,
                top_k=s.top_k or 0,
                top_p=s.top_p,
                seeds=self.seeds,
                step=step,
                backend=self.backend,
            )
        if self.guided:
            logits = apply_cfg(logits, scale)
        noise = self.noise.index_select(1, step.view(1)).squeeze(1) if self.noise is not None else None  # (B, V)
        return sample_seeded(logits, self.sampling, self.seeds, step, noise)


def prefill(model, text_ids: Tensor) -> Tensor:
    """Run [text][BOI] through the model, filling its KV cache -> logits (B, V) for the first code."""
    return model.forward_cached(text_ids=text_ids)


def decode_one_token(model, token: Tensor, pos: Tensor) -> Tensor:
    """Feed token (B,) at sequence position pos (0-d LongTensor on the device) -> next-code logits (B, V)."""
    return model.forward_cached(codes=token, input_pos=pos)


def decode_step(model, logits: Tensor, sampler: Sampler, step: Tensor, input_pos: Tensor) -> tuple[Tensor, Tensor]:
    """One step of the loop: draw code `step` from logits and feed it (twice under guidance: both rows of a
    pair) at input_pos -> (codes (B,), logits for the next code). What compile=True compiles."""
    token = sampler(logits, step)
    fed = token.repeat(2) if sampler.guided else token  # guided: conditional rows, then their twins
    return token, decode_one_token(model, fed, input_pos)


def capture_cuda_graph(fn, warmup: int = 2) -> torch.cuda.CUDAGraph:
    """Record fn() (all in-place on static tensors) as a CUDA graph, after warm-up runs on a side stream
    (Triton JIT compiles every specialisation the step meets, the kernels' first-use self-checks run, allocator
    pools settle); replay() then launches the whole step at once."""
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


def _check_generate_args(
    model,
    text_ids: Tensor,
    sampling: SamplingConfig,
    seeds: Tensor,
    uncond_ids: Tensor | None,
    cuda_graph: bool,
    compile: bool,
) -> None:
    """Every argument error of `generate`, before any work: one ValueError naming the argument."""
    config, device = model.config, model.head.weight.device
    if text_ids.ndim != 2 or text_ids.shape[0] == 0:
        raise ValueError(f"text_ids must be a non-empty (B, {config.text_len}) batch, got {tuple(text_ids.shape)}")
    if text_ids.shape[1] != config.text_len:
        raise ValueError(
            f"text_ids has {text_ids.shape[1]} tokens per row but the model's text context is {config.text_len}"
        )
    B = text_ids.shape[0]
    if seeds.shape != (B,) or seeds.dtype.is_floating_point or seeds.dtype == torch.bool:
        raise ValueError(f"seeds must be an integer tensor of shape ({B},), got {seeds.dtype} {tuple(seeds.shape)}")
    if uncond_ids is not None and uncond_ids.shape != text_ids.shape:
        raise ValueError(f"uncond_ids must have text_ids' shape {tuple(text_ids.shape)}, got {tuple(uncond_ids.shape)}")
    sampling.validate(config.image_vocab_size)
    if cuda_graph and compile:
        raise ValueError("cuda_graph=True and compile=True are two ways to the same end; pick one")
    if cuda_graph and device.type != "cuda":
        raise ValueError(f"cuda_graph=True needs the model on a CUDA device; it is on {device}")
    if compile and use_triton(config.attn_backend, model.head.weight):
        raise ValueError(
            f"compile=True compiles the PyTorch decode step, but this model samples with the Triton kernels "
            f"(attn_backend {config.attn_backend!r} on {device}): use cuda_graph=True, or set "
            f"model.config.attn_backend = 'torch'"
        )


@torch.no_grad()
def generate(
    model,
    text_ids: Tensor,
    sampling: SamplingConfig,
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
      the same kernels as without.
    - compile=True (the PyTorch path: a CPU, or attn_backend "torch"): `decode_step` goes through
      torch.compile (fullgraph, static shapes), kept in model.compiled_decode_step; a new batch size or
      SamplingConfig compiles again. Float rounding differs from eager, which can flip a near-tie draw.
    """
    _check_generate_args(model, text_ids, sampling, seeds, uncond_ids, cuda_graph, compile)
    config, device = model.config, model.head.weight.device
    sampler = Sampler.build(config, sampling, seeds.to(device, torch.long))
    text_ids = text_ids.to(device)
    if sampler.guided:  # rows [0, B) conditional, [B, 2B) their null-caption (or negative-prompt) twins
        uncond = torch.full_like(text_ids, config.text_pad_id) if uncond_ids is None else uncond_ids.to(device)
        text_ids = torch.cat([text_ids, uncond])
    step_fn = decode_step
    if compile:
        if getattr(model, "compiled_decode_step", None) is None:
            model.compiled_decode_step = torch.compile(decode_step, fullgraph=True, dynamic=False)
        step_fn = model.compiled_decode_step
    was_training = model.training
    model.eval()
    try:
        # Inference mode drops autograd's bookkeeping, which a small decode step pays for on every op.
        with torch.inference_mode():
            codes = _decode(model, text_ids, sampler, step_fn, cuda_graph=cuda_graph, progress=progress)
    finally:
        model.train(was_training)
    return codes.view(-1, *config.image_grid).clone()  # a normal tensor again, outside inference mode


def _decode(model, text_ids: Tensor, sampler: Sampler, step_fn, *, cuda_graph: bool, progress: bool) -> Tensor:
    """The loop of `generate`: prefill, then draw each code and feed it back -> codes (B, N).

    Every step works in place on static tensors (the step counter and position included), so that one step
    can be recorded as a CUDA graph and replayed.
    """
    config, device = model.config, text_ids.device
    B, N = sampler.seeds.shape[0], config.n_image
    model.setup_cache(text_ids.shape[0])
    codes = torch.empty(B, N, dtype=torch.long, device=device)
    step = torch.zeros((), dtype=torch.long, device=device)  # image step k, advanced in place
    input_pos = torch.full((), config.image_start, dtype=torch.long, device=device)  # position of code k
    logits = prefill(model, text_ids)

    def advance() -> None:
        """Draw code k, record it, feed it back: logits then predict code k + 1."""
        token, next_logits = step_fn(model, logits, sampler, step, input_pos)
        codes.index_copy_(1, step.view(1), token[:, None])
        logits.copy_(next_logits)
        input_pos.add_(1)
        step.add_(1)

    graph = None
    if cuda_graph and N > 1:
        first_logits = logits.clone()
        # Warm-up and capture run steps as well: the K/V they write sit at positions the real steps
        # overwrite before reading them, and the state they advance is reset here.
        graph = capture_cuda_graph(advance)
        logits.copy_(first_logits)
        step.zero_()
        input_pos.fill_(config.image_start)
    steps = range(N)
    if progress:
        from tqdm import tqdm

        steps = tqdm(steps, desc="sampling", unit="tok")
    for k in steps:
        if k + 1 == N:  # the last code feeds nothing
            codes[:, k] = sampler(logits, step)
        elif graph is not None:
            graph.replay()
        else:
            advance()
    return codes
