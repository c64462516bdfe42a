"""First-use self-check of the Triton kernels against their PyTorch references, with a fallback.

The kernels have been compiled for sm_80 and sm_90 without a GPU (tests/test_aot.py), but a first GPU, driver
or Triton version can still get one wrong. So the first time a kernel runs for a (device, dtype, shape class),
it is run once more on a small input of that class and compared with its reference. On an exception or a
mismatch beyond tolerance, backend="auto" warns once (kernel, device, driver, Triton and torch versions) and
uses the reference for that class for the rest of the process; backend="triton" raises KernelSelfCheckError.

A shape class is what changes the compiled kernel: the dtype, the constexpr sizes (head dim, GQA group, the
sampler's row block) and the code paths (causal, one split or several, top-k, top-p, greedy). A check syncs
with the host, so it cannot run inside a CUDA-graph capture: capture after one eager call of every class (as
vqgpt.generate does with its warm-up steps), or a capture meeting an unchecked class raises.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable

import torch

_RESULTS: dict[tuple, str | None] = {}  # key -> None (passed) or the failure message


class KernelSelfCheckError(RuntimeError):
    """A Triton kernel disagreed with its PyTorch reference (or failed) on its first-use check."""


def reset() -> None:
    """Forget every check (tests; or after changing the driver in-process)."""
    _RESULTS.clear()


@functools.cache
def driver_version() -> str:
    """The CUDA driver's version as 'major.minor' (cuDriverGetVersion), or 'unknown'."""
    import ctypes

    try:
        version = ctypes.c_int()
        if ctypes.CDLL("libcuda.so.1").cuDriverGetVersion(ctypes.byref(version)) != 0:
            return "unknown"
        return f"{version.value // 1000}.{version.value % 1000 // 10}"
    except (OSError, AttributeError):
        return "unknown"


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        major, minor = torch.cuda.get_device_capability(index)
        return f"{device} ({torch.cuda.get_device_name(index)}, sm_{major}{minor})"
    return f"{device} (Triton interpreter)"


def _failure_message(kernel: str, device: torch.device, dtype: torch.dtype, shape_class: tuple, err: Exception) -> str:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    return (
        f"vqgpt.kernels: the Triton kernel {kernel} failed its first-use self-check on {_device_name(device)} for "
        f"{dtype}, shape class {shape_class}: {type(err).__name__}: {str(err)[:300]} "
        f"[CUDA driver {driver_version()}, CUDA runtime {torch.version.cuda}, Triton {triton_version}, "
        f"torch {torch.__version__}]. The PyTorch reference runs instead for the rest of this process "
        f"(backend='triton' raises instead); please report this with the line above."
    )


def passes(
    kernel: str,
    device: torch.device,
    dtype: torch.dtype,
    shape_class: tuple,
    check: Callable[[], None],
    *,
    strict: bool,
) -> bool:
    """Whether the Triton kernel may run for this (kernel, device, dtype, shape class).

    The first call per key runs `check()`, which raises (AssertionError on a mismatch, or whatever the kernel
    raised) when the kernel is wrong. A failure warns once and returns False, or raises KernelSelfCheckError
    when `strict` (backend="triton"), on the first call and on every later one.
    """
    key = (kernel, str(device), dtype, shape_class)
    if key not in _RESULTS:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise KernelSelfCheckError(
                f"vqgpt.kernels: {kernel} meets a new shape class {shape_class} ({dtype}) inside a CUDA-graph "
                f"capture, where its first-use self-check cannot run; call it once eagerly before capturing"
            )
        try:
            check()
            _RESULTS[key] = None
        except Exception as err:  # any failure of a kernel on this device means: do not use it here
            _RESULTS[key] = _failure_message(kernel, device, dtype, shape_class, err)
            if strict:
                raise KernelSelfCheckError(_RESULTS[key]) from err
            warnings.warn(_RESULTS[key], RuntimeWarning, stacklevel=3)
            return False
    message = _RESULTS[key]
    if message is not None and strict:
        raise KernelSelfCheckError(message)
    return message is None


def assert_matches(out: torch.Tensor, ref: torch.Tensor, atol: float, rtol: float) -> None:
    """Raise AssertionError unless out is finite and within atol + rtol * |ref| of ref everywhere."""
    out, ref = out.float(), ref.float()
    if not torch.isfinite(out).all():
        raise AssertionError(f"{int((~torch.isfinite(out)).sum())} non-finite outputs")
    excess = (out - ref).abs() - (atol + rtol * ref.abs())
    if (excess > 0).any():
        raise AssertionError(
            f"{int((excess > 0).sum())} of {out.numel()} outputs off the reference, "
            f"max abs error {(out - ref).abs().max().item():.3g} (atol {atol}, rtol {rtol})"
        )


# Tolerances of the checks: loose enough for any correct kernel (TF32-free fp32, fp16/bf16 rounding of
# convex mixes of N(0, 1) values), far below what a broken one gives.
CHECK_TOLS = {torch.float32: (1e-4, 1e-4), torch.float16: (5e-3, 5e-3), torch.bfloat16: (3e-2, 3e-2)}


def small_randn(*shape: int, dtype: torch.dtype, device: torch.device, seed: int) -> torch.Tensor:
    """Fixed inputs (drawn on the CPU, so every device checks the same numbers)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)
