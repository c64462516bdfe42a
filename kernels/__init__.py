"""Triton kernels for sampling from vqgpt, each with the PyTorch reference it is tested against.

- attention: prefill attention (causal, GQA, any head dim), forward only
- decode_attention: one query token per row over the live prefix of a static KV cache, split-KV
- cfg_sample: CFG mix + temperature + top-k/top-p + a seeded Gumbel-max draw in one launch

Every public function takes backend="auto" | "triton" | "torch": "auto" runs the Triton kernel when the
tensors are on CUDA and triton imports (or when TRITON_INTERPRET=1 is set, as in the tests), the reference
otherwise. The first Triton run of each (device, dtype, shape class) is checked against the reference on a
small input (kernels/selfcheck.py): on a failure "auto" warns once and falls back to the reference, "triton"
raises KernelSelfCheckError. Installed as `vqgpt.kernels`; importable without triton (the references still work).
"""

from .attention import attention, attention_reference, use_triton
from .attention import triton as _triton
from .decode_attention import decode_attention, decode_attention_reference
from .sampling import cfg_sample, cfg_sample_reference, philox4x32_reference, philox_uniform_reference
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
    "philox4x32_reference",
    "philox_uniform_reference",
    "use_triton",
]
