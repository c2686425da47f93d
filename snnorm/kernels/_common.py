"""Helpers shared by the Triton kernel files: device checks, canonical views, sizes, tiles.

Kernels address ``[T, N, C, *spatial]`` tensors through a ``[T, N, C, S]`` view with the
spatial dims merged (:func:`as_ncs`) and pass every stride, so non-contiguous,
channels-last and expanded (stride-0) inputs are read in place without a copy; only
spatial dims that cannot merge (e.g. a transposed H, W) are copied.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Union

import torch
import triton
import triton.language as tl

from ..params import op_schema_fields

__all__ = [
    "interpreter_active",
    "device_error",
    "check_device",
    "next_pow2",
    "acc_dtype",
    "acc_torch_dtype",
    "as_ncs",
    "needs_int64",
    "store_dtype",
    "num_warps",
    "Tiling",
    "channel_tiling",
    "OpSignature",
    "op_signature",
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


def next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def acc_dtype(dtype: torch.dtype):
    """The compute dtype inside kernels: fp64 for fp64 tensors, fp32 otherwise."""
    return tl.float64 if dtype == torch.float64 else tl.float32


#: what synchronised launchers hand the cross-rank collectives (and keep between launches):
#: float64, so counts are exact and fp32 statistics and sums convert without rounding
SYNC_DTYPE = torch.float64


def acc_torch_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def as_ncs(t: torch.Tensor, lead: int) -> torch.Tensor:
    """``[*lead dims, N, C, *spatial]`` as ``[*lead, N, C, S]`` with the spatial dims merged into S.

    A view whenever the spatial dims merge (contiguous, channels-last, sliced or expanded
    inputs all do), so the kernels read it in place and a unit stride along S vectorises;
    a copy only for layouts whose spatial dims cannot merge (e.g. a transposed H, W).
    """
    shape = (*t.shape[: lead + 2], math.prod(t.shape[lead + 2 :]))
    try:
        return t.view(shape)
    except RuntimeError:
        return t.reshape(shape)


def needs_int64(*tensors) -> bool:
    """True when some element offset of a tensor reaches 2**31 (int32 offsets would overflow)."""
    for t in tensors:
        if t is not None and t.numel():
            if sum((size - 1) * abs(stride) for size, stride in zip(t.shape, t.stride())) >= 2**31 - 1:
                return True
    return False


def store_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype kernels write outputs in. Under the Triton interpreter bf16 stores are
    emulated with truncation (and bool → bf16 casts fail), so there the kernels write
    fp32 and torch rounds to bf16 (round-to-nearest-even, as a GPU store does)."""
    if dtype == torch.bfloat16 and interpreter_active():
        return torch.float32
    return dtype


def num_warps(block: int) -> int:
    """Warps for a tile of ``block`` elements: 8 fp32 elements per thread, 1 to 8 warps."""
    return max(1, min(8, block // 256))


class Tiling(NamedTuple):
    """How a channel's ``[N, S]`` elements split into ``[BLOCK_N, BLOCK_S]`` tiles (one per program)."""

    BLOCK_N: int
    BLOCK_S: int
    S_TILES: int  # tiles along S
    P: int  # tiles (programs) per channel

    @property
    def block(self) -> int:
        return self.BLOCK_N * self.BLOCK_S


def _block_s(S: int, block: int) -> int:
    """The widest power-of-two tile width ≤ ``block`` that pads S by at most 1/8."""
    bs = min(next_pow2(S), block)
    while bs > 16 and triton.cdiv(S, bs) * bs - S > S // 8:
        bs //= 2
    return bs


def channel_tiling(N: int, S: int, block: int) -> Tiling:
    """Tiles of at most ``block`` elements (a power of two) over a channel's ``[N, S]``."""
    bs = _block_s(S, block)
    bn = min(next_pow2(N), max(1, block // bs))
    s_tiles = triton.cdiv(S, bs)
    return Tiling(bn, bs, s_tiles, triton.cdiv(N, bn) * s_tiles)


class OpSignature(NamedTuple):
    """A custom op's argument list, written once: its schema and its argument count."""

    schema: str
    n_args: int

    def grads(self, *grads) -> tuple:
        """An autograd backward's return: ``grads`` for the leading (tensor) arguments, then None
        for every argument after them (the count comes from the schema, not from the caller)."""
        if len(grads) > self.n_args:
            raise ValueError(f"{len(grads)} gradients for an op of {self.n_args} arguments ({self.schema})")
        return tuple(grads) + (None,) * (self.n_args - len(grads))


def op_signature(*parts: Union[str, type], returns: str) -> OpSignature:
    """Join ``parts`` — schema fragments (``"Tensor x, Tensor? mu"``) and plain-value bundles of
    :mod:`snnorm.params` (their fields, in order) — into a custom op's schema."""
    fragments = [op_schema_fields(p) if isinstance(p, type) else p for p in parts]
    args = [a for fragment in fragments for a in fragment.split(",") if a.strip()]
    return OpSignature(f"({', '.join(a.strip() for a in args)}) -> {returns}", len(args))
