"""Input checks shared by the layers: every rejection names what was expected and what came.

Checks run before a layer touches any state, so a rejected call changes nothing
(running statistics, ``num_batches_tracked``, timestep counters, masks).
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
        raise ValueError(
            f"{type(module).__name__} was built for T={T} timesteps and expects a sequence "
            f"[T={T}, N, ...], got shape {tuple(x_seq.shape)} (T={x_seq.shape[0]})"
        )


def check_device(module, x: torch.Tensor, reference: torch.Tensor | None) -> None:
    """ValueError when ``x`` and the module's tensors live on different devices."""
    if reference is not None and x.device != reference.device:
        raise ValueError(
            f"{type(module).__name__}: input is on {x.device} but the module's parameters/buffers "
            f"are on {reference.device}; move one of them with .to()"
        )
