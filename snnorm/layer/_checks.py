"""Input checks shared by the layers and neurons: every rejection names what was expected
and what came.

Checks run before a module touches any state, so a rejected call changes nothing
(running statistics, ``num_batches_tracked``, timestep counters, masks, membranes).
Constructor-argument checks are in :mod:`snnorm._checks`.

**The dtype policy** (:func:`check_dtype`), the same on every backend: a module with
floating-point parameters or buffers (the BN family, GroupNorm, NeuNorm, the MPBN
neuron) takes an input of exactly their dtype, or a float16/bfloat16 input when they are
float32 (mixed precision, e.g. a conv's output under ``torch.autocast``; statistics are
then computed in float32). Anything else, e.g. a float64 input into a float32 module,
is a TypeError before any state changes: convert the module (``.double()``) or the
input. This is torch's own BatchNorm rule, checked before the op, so the triton backend
(which could compute it) and the torch backend (which raises "mixed dtype" after
counting the batch) behave alike. Modules without floating parameters (LIF/IF neurons,
pooling, dropout) take any floating input.
"""

from __future__ import annotations

from typing import Iterable

import torch

# Per-sample layouts by number of dims; a multi-step layout prefixes "T, ".
_LAYOUTS = {1: "C", 2: "N, C", 3: "N, C, L", 4: "N, C, H, W", 5: "N, C, D, H, W"}


def layout(ndim: int, step_mode: str) -> str:
    """``[N, C, H, W]`` for ``ndim=4, step_mode='s'``; ``[T, N, C, H, W]`` for 5 and 'm'."""
    if step_mode == "m":
        inner = _LAYOUTS.get(ndim - 1, f"{ndim - 1}-D")
        return f"[T, {inner}]"
    return f"[{_LAYOUTS.get(ndim, f'{ndim}-D')}]"


def check_tensor(module, x, *, floating: bool = True) -> None:
    """TypeError unless ``x`` is a tensor (of a floating dtype when ``floating``)."""
    name = type(module).__name__
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} expects a torch.Tensor input, got {type(x).__name__}")
    if floating and not x.is_floating_point():
        raise TypeError(f"{name} expects a floating-point input tensor, got dtype {x.dtype}")


def check_ndim(module, x: torch.Tensor, allowed: Iterable[int], step_mode: str | None = None) -> None:
    """ValueError unless ``x.dim()`` is one of ``allowed`` (dims counted with T in 'm' mode)."""
    allowed = tuple(allowed)
    if x.dim() in allowed:
        return
    mode = module.step_mode if step_mode is None else step_mode
    shapes = " or ".join(f"{layout(n, mode)} ({n}-D)" for n in allowed)
    # "expected x with shape [...], but got x with shape" is spikingjelly's wording (user code matches on it)
    raise ValueError(
        f"{type(module).__name__} (step_mode={mode!r}): expected x with shape {shapes}, "
        f"but got x with shape {tuple(x.shape)} ({x.dim()}-D)"
    )


def check_size(module, x: torch.Tensor, dim: int, expected: int, what: str) -> None:
    """ValueError unless ``x.shape[dim] == expected`` (``what`` names the dim)."""
    if x.shape[dim] != expected:
        raise ValueError(
            f"{type(module).__name__} expects {expected} {what} at dim {dim}, "
            f"got input of shape {tuple(x.shape)} with {x.shape[dim]}"
        )


def check_time_steps(module, x_seq: torch.Tensor, T: int) -> None:
    """ValueError unless the sequence length ``x_seq.shape[0]`` equals the module's ``T``."""
    if x_seq.shape[0] != T:
        # "temporal length": the phrase spikingjelly's T errors use, which ported code matches on
        raise ValueError(
            f"{type(module).__name__} was built for T={T} timesteps and expects a sequence "
            f"[T={T}, N, ...] (temporal length {T}), got shape {tuple(x_seq.shape)} (T={x_seq.shape[0]})"
        )


_MIXED_PRECISION_INPUTS = (torch.float16, torch.bfloat16)


def check_dtype(module, x: torch.Tensor, reference: torch.Tensor | None) -> None:
    """TypeError unless ``x.dtype`` fits the dtype policy (module doc) for a module whose
    floating parameters/buffers have ``reference.dtype`` (None: no such tensors, any dtype)."""
    if reference is None or x.dtype == reference.dtype:
        return
    if reference.dtype == torch.float32 and x.dtype in _MIXED_PRECISION_INPUTS:
        return
    allowed = f"{reference.dtype}" + (" (or float16/bfloat16)" if reference.dtype == torch.float32 else "")
    raise TypeError(
        f"{type(module).__name__}: input dtype {x.dtype} does not match the module's {reference.dtype} "
        f"parameters; expected {allowed}. Convert the input (x.to({reference.dtype})) or the module "
        f"(module.to({x.dtype}))"
    )


def check_sequence(module, x_seq: torch.Tensor) -> None:
    """ValueError for an empty sequence (T = 0) in multi-step mode."""
    if x_seq.dim() >= 1 and x_seq.shape[0] == 0:
        raise ValueError(
            f"{type(module).__name__} (step_mode='m') expects a sequence [T, N, ...] with T >= 1, "
            f"got an empty sequence of shape {tuple(x_seq.shape)} (T=0)"
        )


def check_device(module, x: torch.Tensor, reference: torch.Tensor | None) -> None:
    """ValueError when ``x`` and the module's tensors live on different devices."""
    if reference is not None and x.device != reference.device:
        raise ValueError(
            f"{type(module).__name__}: input is on {x.device} but the module's parameters/buffers "
            f"are on {reference.device}; move one of them with .to()"
        )
