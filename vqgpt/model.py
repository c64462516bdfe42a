"""The text-to-image GPT: one decoder-only transformer over `[text][BOI][image codes]`.

    sequence position   0 .. T-1         T      T+1 .. T+N-1            (T = text_len, N = h * w)
    input token         text ids (PAD)   BOI    codes[0 .. N-2]
    output head         (text head)      code 0 code 1 .. code N-1       image logits only

LLaMA-style blocks (RMSNorm, SwiGLU, grouped-query attention) with rotary embeddings that are 1D over
the text and 2D over the image grid (see `rope_positions`). Captions are right-padded with PAD and PAD is
an ordinary, attended token, so the sequence layout is static and the all-PAD null caption is a real
input the model learns through caption dropout (classifier-free guidance, Ho & Salimans 2022).

Attention goes through one backend switch, `use_triton` (also the fused sampler's, and that of every
vqgpt.kernels function): PyTorch SDPA, or the Triton kernels in `vqgpt.kernels`. Cached decoding
(`setup_cache`, `forward_cached`) keeps static shapes and takes positions as tensors so a decode step can be
CUDA-graph captured.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import os
from dataclasses import dataclass, field, fields

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

ATTN_BACKENDS = ("auto", "torch", "triton")


# What a config may hold: far beyond any real model, so that a corrupt or hostile config.json is an error
# before any memory is sized from it (n_layer=100000 would allocate gigabytes before the weights are read).
INT_LIMITS = {
    "text_vocab_size": (1, 2**24),
    "text_pad_id": (0, 2**24),
    "text_len": (0, 8192),
    "image_vocab_size": (1, 2**24),
    "dim": (4, 32768),
    "n_layer": (1, 512),
    "n_head": (1, 1024),
    "n_kv_head": (1, 1024),
    "ffn_hidden": (1, 2**18),
}
FLOAT_LIMITS = {
    "rope_base": (1.0, 1e12),
    "dropout": (0.0, 1.0),
    "norm_eps": (0.0, 1.0),
    "text_loss_weight": (0.0, 1e6),
    "cfg_dropout": (0.0, 1.0),
}
MAX_GRID = 512


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_fields(config, ints: dict, floats: dict) -> None:
    """Type and range of each numeric field (None is allowed where the field's default is None)."""
    name = type(config).__name__
    for field_name, (low, high) in ints.items():
        v = getattr(config, field_name)
        if v is not None and (not _is_int(v) or not low <= v <= high):
            raise ValueError(f"{name}.{field_name} must be an int in [{low}, {high}], got {v!r}")
    for field_name, (low, high) in floats.items():
        v = getattr(config, field_name)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not low <= v <= high:
            raise ValueError(f"{name}.{field_name} must be a finite number in [{low:g}, {high:g}], got {v!r}")


@dataclass
class GPTConfig:
    text_vocab_size: int = 1024  # text ids (TextTokenizer.vocab_size)
    text_pad_id: int = 0  # the text [PAD] id (TextTokenizer.pad_id): padding, and all-PAD = null caption
    text_len: int = 32  # T_text: captions are right-padded / truncated to this many tokens
    image_vocab_size: int = 1024  # image codebook size (ImageTokenizer.codebook_size)
    image_grid: tuple[int, int] = (8, 8)  # (h, w) of the code grid; codes are modelled in raster order
    dim: int = 256  # residual stream width
    n_layer: int = 6  # transformer blocks
    n_head: int = 8  # query heads
    n_kv_head: int | None = None  # key/value heads (GQA, Ainslie et al. 2023); None -> n_head
    ffn_hidden: int | None = None  # SwiGLU hidden width; None -> LLaMA's 2/3 * 4 * dim, rounded up
    rope_base: float = 10000.0  # RoPE base period (Su et al. 2021)
    dropout: float = 0.0  # attention-prob and residual dropout, training only
    norm_eps: float = 1e-5  # RMSNorm epsilon
    text_loss_weight: float = 0.0  # weight of an auxiliary next-text-token loss; > 0 adds a text head
    cfg_dropout: float = 0.1  # per-row prob of replacing the caption by the null caption in training
    attn_backend: str = "auto"  # "torch" (SDPA) | "triton" (vqgpt.kernels) | "auto": see use_triton
    # Derived in __post_init__, never passed in nor stored in config.json:
    n_image: int = field(init=False)  # N = h * w image tokens
    image_start: int = field(init=False)  # sequence position of the first image code (text_len + 1)
    seq_len: int = field(init=False)  # text_len + 1 + n_image: the KV cache length
    head_dim: int = field(init=False)  # dim // n_head

    def __post_init__(self):
        check_fields(self, INT_LIMITS, FLOAT_LIMITS)  # before anything is sized from them
        if (
            not isinstance(self.image_grid, (list, tuple))
            or len(self.image_grid) != 2
            or not all(_is_int(s) and 1 <= s <= MAX_GRID for s in self.image_grid)
        ):
            raise ValueError(f"image_grid must be two ints (h, w) in [1, {MAX_GRID}], got {self.image_grid!r}")
        self.image_grid = tuple(int(s) for s in self.image_grid)
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if self.dim % self.n_head:
            raise ValueError(f"dim={self.dim} is not divisible by n_head={self.n_head}")
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_head={self.n_head} is not a multiple of n_kv_head={self.n_kv_head}")
        self.head_dim = self.dim // self.n_head
        if self.head_dim % 4:
            # 2D RoPE splits each head's rotary pairs evenly between the row and the column.
            raise ValueError(f"head_dim={self.head_dim} (dim / n_head) must be a multiple of 4 for 2D RoPE")
        if self.ffn_hidden is None:
            # LLaMA rounds 8/3 * dim up to a multiple of 256; a toy width rounds to itself instead.
            multiple = min(256, self.dim)
            self.ffn_hidden = multiple * math.ceil(8 * self.dim / 3 / multiple)
        if self.attn_backend not in ATTN_BACKENDS:
            raise ValueError(f"unknown attn_backend {self.attn_backend!r}; choose one of {ATTN_BACKENDS}")
        if not 0.0 <= self.cfg_dropout <= 1.0:
            raise ValueError(f"cfg_dropout must be in [0, 1], got {self.cfg_dropout}")
        if not 0 <= self.text_pad_id < self.text_vocab_size:
            raise ValueError(f"text_pad_id={self.text_pad_id} is outside the text vocab [0, {self.text_vocab_size})")
        self.n_image = self.image_grid[0] * self.image_grid[1]
        self.image_start = self.text_len + 1
        self.seq_len = self.text_len + 1 + self.n_image

    def to_dict(self) -> dict:
        """JSON-able dict of the constructor fields (what config.json stores)."""
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.init}
        d["image_grid"] = list(self.image_grid)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> GPTConfig:
        init_names = {f.name for f in fields(cls) if f.init}
        derived = {f.name for f in fields(cls) if not f.init}
        unknown = set(d) - init_names - derived
        if unknown:
            raise ValueError(f"unknown GPTConfig fields {sorted(unknown)}; known: {sorted(init_names)}")
        return cls(**{k: v for k, v in d.items() if k in init_names})


# LlamaGen-like sizes (Sun et al. 2024, GPT-B/L/XL); counts quoted with a 16384-entry codebook.
PRESETS: dict[str, dict] = {
    "tiny": dict(dim=64, n_layer=2, n_head=4),  # smoke tests: seconds on a CPU
    "demo": dict(dim=192, n_layer=4, n_head=6),  # ~2M params + embeddings: trains on 2 CPU cores in minutes
    "B": dict(dim=768, n_layer=12, n_head=12),  # ~111M
    "L": dict(dim=1024, n_layer=24, n_head=16),  # ~343M
    "XL": dict(dim=1280, n_layer=36, n_head=20),  # ~775M
}


def gpt_config(preset: str, **overrides) -> GPTConfig:
    """A preset's architecture plus overrides: `gpt_config("B", image_vocab_size=16384, text_len=64)`."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    return GPTConfig(**{**PRESETS[preset], **overrides})


# ----------------------------------------------------------------------------------------------------
# Rotary embeddings: 1D on text, 2D on the image grid


def rope_positions(config: GPTConfig) -> Tensor:
    """(seq_len, 2) long: the (row, col) rotary index of every sequence position.

    Text token t and BOI (t = text_len) use (t, t): with the same index on both axes the 2D rotation is
    exactly plain 1D RoPE, since the row and column pairs together hold the whole 1D frequency set.
    Image code k at grid cell (r, c) uses (image_start + r, image_start + c): BOI sits at (T, T) and
    code 0 at (T + 1, T + 1), so the image follows the text along both axes and every text -> image
    offset is positive, while image -> image offsets are the 2D grid offsets.
    """
    t = torch.arange(config.image_start)
    k = torch.arange(config.n_image)
    w = config.image_grid[1]
    image = torch.stack([k // w, k % w], dim=-1) + config.image_start
    return torch.cat([torch.stack([t, t], dim=-1), image])


def rope_angles(pos: Tensor, head_dim: int, base: float) -> Tensor:
    """(..., 2) (row, col) indices -> (..., head_dim // 2) rotation angles in float32.

    Pair i has the 1D RoPE frequency base^(-2i / head_dim); even pairs turn with the row index and odd
    pairs with the column, so each axis gets frequencies spread over the whole range.
    Computed on the fly (a few tiny ops per forward) rather than stored as a float buffer, which
    `model.to(torch.bfloat16)` would round into wrong angles at large positions.
    """
    idx = torch.arange(head_dim // 2, device=pos.device)
    inv_freq = base ** (-2.0 * idx.float() / head_dim)  # (D/2,)
    axis_index = torch.where(idx % 2 == 0, pos[..., 0:1], pos[..., 1:2])  # (..., D/2)
    return axis_index.float() * inv_freq


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate consecutive pairs (x[2i], x[2i+1]) of x (B, H, T, D) by the angles behind cos/sin (T, D/2).

    Eagerly each pair is a complex number turned by a product with cos + i sin: one kernel where the real
    arithmetic takes six, and decoding pays per kernel, once per layer and token. Under torch.compile the
    real form is kept: inductor fuses it, and it generates no code for complex numbers.
    """
    if torch.compiler.is_compiling():
        x0, x1 = x.float().unflatten(-1, (-1, 2)).unbind(-1)  # (B, H, T, D/2) each
        out = torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1)  # (B, H, T, D/2, 2)
        return out.flatten(-2).type_as(x)
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))  # (B, H, T, D/2) complex64, no copy
    return torch.view_as_real(pairs * torch.complex(cos, sin)).flatten(-2).type_as(x)  # (B, H, T, D)


# ----------------------------------------------------------------------------------------------------
# The backend switch, and attention through it


def interpreting() -> bool:
    """True when TRITON_INTERPRET asks Triton to run kernels on the CPU interpreter (as the tests do)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


@functools.cache
def triton_installed() -> bool:
    """Whether triton can be imported, without importing it (that costs a second, and `import vqgpt` stays light)."""
    return importlib.util.find_spec("triton") is not None


def use_triton(backend: str, *tensors: Tensor, needs_grad: bool = False) -> bool:
    """The one backend switch: whether the Triton kernels of vqgpt.kernels run on `tensors`.

    Both GPTConfig.attn_backend and the `backend` argument of every vqgpt.kernels function resolve here:
    - "torch": never (PyTorch: SDPA in the model, the references in vqgpt.kernels);
    - "auto": on CUDA tensors when triton is installed, unless the call needs gradients or dropout
      (`needs_grad`: the kernels are forward-only);
    - "triton": always, or a one-line RuntimeError where Triton cannot run: triton missing, or tensors off
      CUDA (under TRITON_INTERPRET=1 the CPU interpreter counts as Triton, as in the tests).
    """
    if backend == "torch":
        return False
    if backend == "auto":
        return not needs_grad and _on_triton_device(tensors) and triton_installed()
    if backend != "triton":
        raise ValueError(f"unknown backend {backend!r}; choose one of {list(ATTN_BACKENDS)}")
    if not triton_installed():
        raise RuntimeError(
            "backend 'triton' needs the triton package (pip install 'vqgpt[triton]' on Linux); use 'auto' or 'torch'"
        )
    if not (_on_triton_device(tensors) or interpreting()):
        devices = sorted({str(t.device) for t in tensors})
        raise RuntimeError(
            f"backend 'triton' needs CUDA tensors, these are on {', '.join(devices)}; use 'auto' or "
            "'torch', or set TRITON_INTERPRET=1 before importing triton (the CPU interpreter)"
        )
    return True


def _on_triton_device(tensors: tuple[Tensor, ...]) -> bool:
    """Whether Triton compiles for the tensors' device: CUDA."""
    return all(t.is_cuda for t in tensors)


def _sdpa(q: Tensor, k: Tensor, v: Tensor, **kwargs) -> Tensor:
    if k.shape[1] != q.shape[1]:
        # GQA: query head h reads kv head h // (Hq / Hkv), the repeat_interleave layout of LLaMA's repeat_kv.
        n_rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(n_rep, dim=1), v.repeat_interleave(n_rep, dim=1)
    return F.scaled_dot_product_attention(q, k, v, **kwargs)


def attention(q: Tensor, k: Tensor, v: Tensor, *, causal: bool, backend: str, dropout_p: float = 0.0) -> Tensor:
    """q (B, Hq, T, D), k/v (B, Hkv, T, D) -> (B, Hq, T, D). `causal` assumes q and k start at position 0."""
    if use_triton(backend, q, needs_grad=dropout_p > 0 or (torch.is_grad_enabled() and q.requires_grad)):
        from vqgpt import kernels

        return kernels.attention(q, k, v, causal=causal, backend=backend)
    return _sdpa(q, k, v, is_causal=causal, dropout_p=dropout_p)


def decode_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, cache_len: Tensor | int, *, backend: str) -> Tensor:
    """One query per row over a static cache: q (B, Hq, D), k/v_cache (B, Hkv, Smax, D), cache_len (B,)
    -> (B, Hq, D). Only cache positions < cache_len[b] are read; the rest may hold stale values.

    cache_len may be an int when every row has the same live length (a host value: CPU decoding). Attention then
    reads only that prefix, with no mask; a (B,) tensor keeps the step free of host syncs (CUDA graphs).
    """
    if use_triton(backend, q, needs_grad=torch.is_grad_enabled() and q.requires_grad):
        from vqgpt import kernels

        if isinstance(cache_len, int):
            cache_len = torch.full((q.shape[0],), cache_len, device=q.device)
        return kernels.decode_attention(q, k_cache, v_cache, cache_len, backend=backend)
    if isinstance(cache_len, int):
        # One query per row: two batched matmuls over the live prefix, which beat SDPA's flash kernel from a
        # few dozen rows on (142 against 173 us a layer at 32 rows here). Under GQA the query heads of one K/V
        # head stand in for its query positions, so K/V are read once, never repeated.
        B, Hq, D = q.shape
        Hkv = k_cache.shape[1]
        k, v = k_cache[:, :, :cache_len], v_cache[:, :, :cache_len]  # (B, Hkv, L, D)
        scores = torch.matmul(q.reshape(B, Hkv, Hq // Hkv, D) * D**-0.5, k.transpose(-1, -2))  # (B, Hkv, Hq/Hkv, L)
        return torch.matmul(scores.softmax(-1, dtype=torch.float32).to(v.dtype), v).view(B, Hq, D)
    live = torch.arange(k_cache.shape[2], device=q.device) < cache_len[:, None]  # (B, Smax)
    out = _sdpa(q.unsqueeze(2), k_cache, v_cache, attn_mask=live[:, None, None, :])  # (B, Hq, 1, D)
    return out.squeeze(2)


class KVCache(nn.Module):
    """Preallocated keys/values (B, n_kv_head, seq_len, head_dim), written in place so the buffers keep
    their addresses (CUDA graphs). Batches smaller than the allocation use the first rows."""

    def __init__(self, batch_size: int, n_kv_head: int, seq_len: int, head_dim: int, device=None, dtype=None):
        super().__init__()
        shape = (batch_size, n_kv_head, seq_len, head_dim)
        self.register_buffer("k_cache", torch.zeros(shape, device=device, dtype=dtype), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, device=device, dtype=dtype), persistent=False)

    def update(self, pos: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write k/v (B, Hkv, T, D) at sequence positions pos (T,); return the (B, Hkv, Smax, D) caches."""
        B = k.shape[0]
        k_out, v_out = self.k_cache[:B], self.v_cache[:B]
        k_out.index_copy_(2, pos, k.to(k_out.dtype))
        v_out.index_copy_(2, pos, v.to(v_out.dtype))
        return k_out, v_out


# ----------------------------------------------------------------------------------------------------
# The transformer


def dropout(x: Tensor, p: float, training: bool) -> Tensor:
    """F.dropout that is not even called when it would return x (eval, p = 0): decoding pays per op."""
    return F.dropout(x, p, training=True) if training and p > 0 else x


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype == torch.float32:  # the same arithmetic without two no-op casts: a decode step pays per op
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


class Attention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config  # shared: reads config.attn_backend at call time, so it can be switched after loading
        self.wqkv = nn.Linear(config.dim, (config.n_head + 2 * config.n_kv_head) * config.head_dim, bias=False)
        self.wo = nn.Linear(config.n_head * config.head_dim, config.dim, bias=False)
        self.kv_cache: KVCache | None = None

    def forward(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        input_pos: Tensor | None = None,
        cache_len: Tensor | int | None = None,
    ) -> Tensor:
        """input_pos: cache positions to write (None: no cache); cache_len: live cache length when decoding."""
        B, T, _ = x.shape
        nh, nkv, hd = self.config.n_head, self.config.n_kv_head, self.config.head_dim
        qkv = self.wqkv(x).view(B, T, nh + 2 * nkv, hd).transpose(1, 2)  # (B, nh + 2 nkv, T, hd)
        qk = apply_rope(qkv[:, : nh + nkv], cos, sin)  # queries and keys turn together: one call
        q, k = qk.split([nh, nkv], dim=1)  # (B, nh, T, hd), (B, nkv, T, hd)
        v = qkv[:, nh + nkv :]  # (B, nkv, T, hd)
        backend = self.config.attn_backend
        if input_pos is None:  # full sequence, no cache (training, scoring)
            dropout_p = self.config.dropout if self.training else 0.0
            y = attention(q, k, v, causal=True, backend=backend, dropout_p=dropout_p)
        else:
            k_all, v_all = self.kv_cache.update(input_pos, k, v)
            if T == 1:  # decode: one new token attends to the cache up to and including itself
                if k_all.dtype != q.dtype:  # under autocast
                    k_all, v_all = k_all.to(q.dtype), v_all.to(q.dtype)
                y = decode_attention(q[:, :, 0], k_all, v_all, cache_len, backend=backend).unsqueeze(2)
            else:  # prefill from position 0: the fresh k/v are the whole live cache
                y = attention(q, k, v, causal=True, backend=backend)
        y = y.transpose(1, 2).reshape(B, T, nh * hd)  # (B, T, dim)
        return dropout(self.wo(y), self.config.dropout, self.training)


class MLP(nn.Module):
    """SwiGLU feed-forward (Shazeer 2020): w2(silu(w1 x) * w3 x)."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.w1 = nn.Linear(config.dim, config.ffn_hidden, bias=False)
        self.w3 = nn.Linear(config.dim, config.ffn_hidden, bias=False)
        self.w2 = nn.Linear(config.ffn_hidden, config.dim, bias=False)
        self.config = config  # shared, as in Attention

    def forward(self, x: Tensor) -> Tensor:
        return dropout(self.w2(F.silu(self.w1(x)) * self.w3(x)), self.config.dropout, self.training)


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.attn_norm = RMSNorm(config.dim, config.norm_eps)
        self.attn = Attention(config)
        self.mlp_norm = RMSNorm(config.dim, config.norm_eps)
        self.mlp = MLP(config)

    def forward(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        input_pos: Tensor | None = None,
        cache_len: Tensor | int | None = None,
    ) -> Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin, input_pos, cache_len)
        return x + self.mlp(self.mlp_norm(x))


class GPT(nn.Module):
    """`forward`/`loss` for teacher-forced training, `setup_cache` + `forward_cached` for sampling."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        # Separate tables: text ids and image codes are different vocabularies; BOI is one learned vector.
        self.text_emb = nn.Embedding(config.text_vocab_size, config.dim)
        self.boi = nn.Parameter(torch.zeros(config.dim))
        self.image_emb = nn.Embedding(config.image_vocab_size, config.dim)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.head = nn.Linear(config.dim, config.image_vocab_size, bias=False)
        self.text_head = (
            nn.Linear(config.dim, config.text_vocab_size, bias=False) if config.text_loss_weight > 0 else None
        )
        # Integer, so .to(dtype) leaves it exact; not persistent: it is derived from the config.
        self.register_buffer("rope_pos", rope_positions(config), persistent=False)
        self.cache_batch_size = 0
        self.rope_table: tuple[Tensor, Tensor] | None = None  # cos/sin of every position, see setup_cache
        self._init_weights()

    def _init_weights(self) -> None:
        # GPT-2 / LLaMA: N(0, 0.02), residual output projections scaled by 1/sqrt(2 n_layer) so the
        # residual stream's variance does not grow with depth; the heads start at zero so the first
        # prediction is uniform (loss = ln V) (LlamaGen does the same).
        std = 0.02
        for module in self.modules():
            if isinstance(module, nn.Linear | nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=std)
        for name, p in self.named_parameters():
            if name.endswith(("attn.wo.weight", "mlp.w2.weight")):
                nn.init.normal_(p, mean=0.0, std=std / math.sqrt(2 * self.config.n_layer))
        nn.init.normal_(self.boi, mean=0.0, std=std)
        nn.init.zeros_(self.head.weight)
        if self.text_head is not None:
            nn.init.zeros_(self.text_head.weight)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def _rope(self, pos: Tensor) -> tuple[Tensor, Tensor]:
        angles = rope_angles(self.rope_pos[pos], self.config.head_dim, self.config.rope_base)  # (T, D/2)
        return angles.cos(), angles.sin()

    def _check_text(self, text_ids: Tensor) -> None:
        if text_ids.ndim != 2 or text_ids.shape[1] != self.config.text_len:
            raise ValueError(f"text_ids must be (B, {self.config.text_len}) (text_len), got {tuple(text_ids.shape)}")

    def _hidden(self, text_ids: Tensor, codes: Tensor) -> Tensor:
        """Teacher-forced trunk: normalized hidden states (B, T_text + N, dim) of [text][BOI][codes[:-1]]."""
        self._check_text(text_ids)
        B, N = codes.shape
        if codes.shape[0] != text_ids.shape[0] or not 1 <= N <= self.config.n_image:
            raise ValueError(
                f"codes must be (B, h, w) or (B, N) with N <= {self.config.n_image} and the same B as "
                f"text_ids {tuple(text_ids.shape)}, got {tuple(codes.shape)}"
            )
        x = torch.cat(
            [self.text_emb(text_ids), self.boi.expand(B, 1, -1), self.image_emb(codes[:, :-1])],
            dim=1,
        )  # (B, T_text + N, dim)
        cos, sin = self._rope(torch.arange(x.shape[1], device=x.device))
        x = dropout(x, self.config.dropout, self.training)
        for layer in self.layers:
            x = layer(x, cos, sin)
        return self.norm(x)

    def forward(self, text_ids: Tensor, codes: Tensor) -> Tensor:
        """text_ids (B, T_text), codes (B, h, w) or (B, N) -> logits (B, N, image_vocab_size).

        logits[:, i] predicts codes[:, i] from the text and codes[:, :i] (teacher forcing); a prefix of
        the codes (N < h * w) is accepted and scores only that prefix.
        """
        codes = codes.flatten(1)
        h = self._hidden(text_ids, codes)
        return self.head(h[:, self.config.text_len :])

    def drop_captions(self, text_ids: Tensor) -> Tensor:
        """Replace each row by the null caption (all PAD) with prob cfg_dropout, drawn from torch's RNG."""
        drop = torch.rand(text_ids.shape[0], device=text_ids.device) < self.config.cfg_dropout  # (B,)
        return text_ids.masked_fill(drop[:, None], self.config.text_pad_id)

    def loss(self, text_ids: Tensor, codes: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """Next-code cross-entropy over the image positions (+ text_loss_weight * next-text-token loss).

        Caption dropout is applied in training mode only. Returns (loss, stats); stats are detached 0-d
        tensors (call .item() when logging, not every step, to avoid a host sync).
        """
        config = self.config
        codes = codes.flatten(1)
        if self.training and config.cfg_dropout > 0:
            text_ids = self.drop_captions(text_ids)
        h = self._hidden(text_ids, codes)
        logits = self.head(h[:, config.text_len :]).float()  # (B, N, V)
        image_loss = F.cross_entropy(logits.flatten(0, 1), codes.flatten())
        loss = image_loss
        stats = {
            "image_loss": image_loss.detach(),
            "image_acc": (logits.argmax(-1) == codes).float().mean(),
            "null_captions": (text_ids == config.text_pad_id).all(1).float().mean(),
        }
        if self.text_head is not None and config.text_len > 1:
            # Position t predicts text token t + 1; PAD targets are ignored (nothing to learn there).
            text_logits = self.text_head(h[:, : config.text_len - 1]).float()  # (B, T_text - 1, V_text)
            targets = text_ids[:, 1:]
            per_token = F.cross_entropy(
                text_logits.flatten(0, 1), targets.flatten(), ignore_index=config.text_pad_id, reduction="sum"
            )
            text_loss = per_token / (targets != config.text_pad_id).sum().clamp(min=1)
            loss = loss + config.text_loss_weight * text_loss
            stats["text_loss"] = text_loss.detach()
        stats["loss"] = loss.detach()
        return loss, stats

    # ------------------------------------------------------------------------------------------------
    # Cached decoding

    def setup_cache(self, max_batch_size: int, device=None, dtype=None) -> None:
        """Allocate a static KV cache per layer (kept if one at least this large already exists)."""
        p = self.head.weight
        device = torch.device(device) if device is not None else p.device
        dtype = dtype or p.dtype
        cache = self.layers[0].attn.kv_cache
        if (
            cache is not None
            and self.cache_batch_size >= max_batch_size
            and cache.k_cache.device == device
            and cache.k_cache.dtype == dtype
        ):
            return
        config = self.config
        # Ordinary tensors even when called under torch.inference_mode (as generate does), so that the
        # cache can still be written by forward_cached outside it.
        with torch.inference_mode(False):
            for layer in self.layers:
                layer.attn.kv_cache = KVCache(
                    max_batch_size, config.n_kv_head, config.seq_len, config.head_dim, device=device, dtype=dtype
                )
            # A decode step looks its rotation up instead of recomputing it. A float32 attribute, not a
            # buffer, so model.to(bfloat16) cannot round the angles (forward_cached rebuilds it on a move).
            self.rope_table = self._rope(torch.arange(config.seq_len, device=device))
        self.cache_batch_size = max_batch_size

    def forward_cached(
        self, *, text_ids: Tensor | None = None, codes: Tensor | None = None, input_pos: Tensor | None = None
    ) -> Tensor:
        """Incremental decoding over the KV cache; returns the logits (B, image_vocab_size) of the next code.

        Prefill: `forward_cached(text_ids=(B, T_text))` runs [text][BOI] at positions 0..T_text, fills the
        cache and returns the logits for code 0.
        Decode: `forward_cached(codes=(B,) or (B, 1), input_pos=0-d LongTensor)` feeds the code at
        sequence position input_pos (code k sits at image_start + k) and returns the logits for the code
        after it. The prefix is never recomputed; shapes depend only on B.
        """
        if self.cache_batch_size == 0:
            raise RuntimeError("call setup_cache(max_batch_size) before forward_cached")
        if text_ids is not None:
            self._check_text(text_ids)
            B = text_ids.shape[0]
            x = torch.cat([self.text_emb(text_ids), self.boi.expand(B, 1, -1)], dim=1)  # (B, T_text + 1, dim)
            input_pos = torch.arange(x.shape[1], device=x.device)
            cache_len = None  # prefill attends causally over its own keys
        elif codes is not None and input_pos is not None:
            x = self.image_emb(codes.reshape(-1, 1))  # (B, 1, dim)
            input_pos = input_pos.reshape(1)
            # Live length after this step, shared by all rows and layers. A CPU reads it for free as an
            # int (attention over the live prefix, no mask); elsewhere, and under torch.compile (where a
            # host read breaks the graph), it stays a (B,) device tensor.
            if input_pos.device.type == "cpu" and not torch.compiler.is_compiling():
                cache_len = int(input_pos) + 1
            else:
                cache_len = (input_pos + 1).expand(x.shape[0]).contiguous()  # (B,)
        else:
            raise ValueError("forward_cached needs text_ids (prefill) or codes and input_pos (decode)")
        if x.shape[0] > self.cache_batch_size:
            raise ValueError(
                f"batch of {x.shape[0]} rows exceeds the KV cache ({self.cache_batch_size} rows); "
                "call setup_cache with a larger max_batch_size"
            )
        if self.rope_table[0].device != x.device:  # the model moved after setup_cache
            with torch.inference_mode(False):
                self.rope_table = self._rope(torch.arange(self.config.seq_len, device=x.device))
        cos, sin = (t[input_pos] for t in self.rope_table)  # (T, D/2) each
        for layer in self.layers:
            x = layer(x, cos, sin, input_pos, cache_len)
        return self.head(self.norm(x[:, -1]))
