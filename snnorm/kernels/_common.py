"""Helpers shared by the Triton kernel files: device checks, canonical views, sizes.

Kernels address ``[T, N, C, *spatial]`` tensors through a 5-d view ``[T, N, C, H, W]``
(missing spatial dims become size-1 dims, which cost nothing) and pass every stride,
so non-contiguous and expanded (stride-0) inputs are read in place without a copy.
Only inputs with more than two spatial dims whose trailing dims cannot be merged
into one are copied (by :func:`as_5d`'s ``reshape``).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

__all__ = [
    "interpreter_active",
    "device_error",
    "check_device",
    "as_5d",
    "as_4d",
    "next_pow2",
    "acc_dtype",
]


@triton.jit
def _probe_kernel(x_ptr):  # never launched: tells whether @triton.jit built interpreted kernels
    pass


def interpreter_active() -> bool:
    """True when this module's kernels were built by the Triton interpreter.

    The interpreter is chosen when ``triton`` decorates the kernels (import time), so
    setting ``TRITON_INTERPRET=1`` afterwards has no effect: this asks the kernels.
    """
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(_probe_kernel, InterpretedFunction)


def device_error(device_type: str, interpreting: bool) -> str | None:
    """Why a tensor on ``device_type`` cannot run the kernels, or None if it can."""
    if device_type == "cuda":
        return None
    if device_type == "cpu":
        if interpreting:
            return None
        return (
            "got a CPU tensor but the Triton interpreter is off: set TRITON_INTERPRET=1 "
            "before triton is first imported to run the kernels on CPU, or use a CUDA tensor"
        )
    return f"got a tensor on device {device_type!r}; the Triton kernels run on 'cuda' (or 'cpu' under TRITON_INTERPRET=1)"


def check_device(op: str, *tensors) -> None:
    """Raise RuntimeError when the kernels cannot run on the tensors' device."""
    interpreting = interpreter_active()
    for t in tensors:
        if isinstance(t, torch.Tensor):
            reason = device_error(t.device.type, interpreting)
            if reason is not None:
                raise RuntimeError(f"snnorm triton op {op}: {reason}")


def as_5d(x: torch.Tensor) -> torch.Tensor:
    """``[T, N, C, *spatial]`` as a ``[T, N, C, H, W]`` view (a copy only for >2 spatial dims that will not merge)."""
    T, N, C = x.shape[:3]
    sp = x.shape[3:]
    if len(sp) == 0:
        return x.reshape(T, N, C, 1, 1) if x.dim() != 3 else x.unsqueeze(-1).unsqueeze(-1)
    if len(sp) == 1:
        return x.unsqueeze(3)
    if len(sp) == 2:
        return x
    return x.reshape(T, N, C, sp[0], math.prod(sp[1:]))


def as_4d(v: torch.Tensor) -> torch.Tensor:
    """``[N, C, *spatial]`` as an ``[N, C, H, W]`` view (see :func:`as_5d`)."""
    return as_5d(v.unsqueeze(0))[0]


def next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def acc_dtype(dtype: torch.dtype):
    """The compute dtype inside kernels: fp64 for fp64 tensors, fp32 otherwise."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def acc_torch_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32
