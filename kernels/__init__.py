"""Triton kernels for sampling from vqgpt, each with the PyTorch reference it is tested against.

- attention: prefill attention (causal, GQA, any head dim), forward only
- decode_attention: one query token per row over the live prefix of a static KV cache, split-KV
- cfg_sample: CFG mix + temperature + top-k/top-p + the seeded draw in one launch, by vqgpt.generate's rules

Every public function takes backend="auto" | "triton" | "torch", resolved by vqgpt.model.use_triton (the one
backend switch, also GPTConfig.attn_backend's): "auto" runs the Triton kernel on CUDA tensors when triton
imports and the reference otherwise; "triton" runs it or raises a one-line error (TRITON_INTERPRET=1, the CPU
interpreter of the tests, counts as Triton); "torch" runs the reference. The first Triton run of each
(device, dtype, shape class) is checked against the reference on a small input (kernels/selfcheck.py): on a
failure "auto" warns once and falls back to the reference, "triton" raises KernelSelfCheckError. Installed as
`vqgpt.kernels`; importable without triton (the references still work).
"""

from vqgpt.model import use_triton

from .attention import attention, attention_reference
from .attention import triton as _triton
from .decode_attention import decode_attention, decode_attention_reference
from .sampling import cfg_sample, cfg_sample_reference
from .selfcheck import KernelSelfCheckError

HAS_TRITON = _triton is not None  # False: every function runs its reference

__all__ = [
    "HAS_TRITON",
    "KernelSelfCheckError",
    "attention",
    "attention_reference",
    "cfg_sample",
    "cfg_sample_reference",
    "decode_attention",
    "decode_attention_reference",
    "use_triton",
]
