"""Argument checks shared by every snnorm module (layers, neurons, surrogates).

Each check returns the normalised value or raises ValueError (a value out of range) or
TypeError (a value of the wrong type) whose message names the module, the argument,
what was expected and what came. Constructors call them before building anything, and
forwards call :func:`check_eps` / :func:`check_momentum` again before touching state,
since ``eps`` and ``momentum`` are plain attributes a user can reassign.

The second half checks input tensors (shape, T, dtype, device) for the layers and
neurons; every rejection names what was expected and what came. Checks run before a
module touches any state, so a rejected call changes nothing (running statistics,
``num_batches_tracked``, timestep counters, masks, membranes).

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

import math
import numbers
from typing import Iterable

import torch

__all__ = [
    "owner_name",
    "as_float",
    "check_bool",
    "check_positive_int",
    "check_finite",
    "check_positive",
    "check_eps",
    "check_momentum",
    "check_unit_interval",
    "check_tau",
    "check_threshold",
    "layout",
    "check_tensor",
    "check_ndim",
    "check_size",
    "check_time_steps",
    "check_dtype",
    "check_sequence",
    "check_device",
]


def owner_name(owner) -> str:
    """A module's class name (or ``owner`` itself when it is already a string)."""
    return owner if isinstance(owner, str) else type(owner).__name__


def as_float(owner, name: str, value) -> float:
    """``float(value)``; TypeError unless ``value`` is a real number (bools are not)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{owner_name(owner)}: {name} must be a real number, got {type(value).__name__} {value!r}")
    return float(value)


def check_bool(owner, name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{owner_name(owner)}: {name} must be a bool, got {type(value).__name__} {value!r}")
    return value


def check_positive_int(owner, name: str, value) -> int:
    """``value`` as an int ≥ 1. TypeError for a non-int (floats and bools included)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{owner_name(owner)}: {name} must be a positive int, got {type(value).__name__} {value!r}")
    if value < 1:
        raise ValueError(f"{owner_name(owner)}: {name} must be a positive int (>= 1), got {value!r}")
    return int(value)


def check_finite(owner, name: str, value) -> float:
    """``value`` as a finite float (thresholds, reset potentials, scale factors)."""
    value = as_float(owner, name, value)
    if not math.isfinite(value):
        raise ValueError(f"{owner_name(owner)}: {name} must be finite, got {value}")
    return value


def check_positive(owner, name: str, value) -> float:
    """``value`` as a finite float > 0."""
    value = as_float(owner, name, value)
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{owner_name(owner)}: {name} must be a finite number > 0, got {value}")
    return value


def check_eps(owner, value, name: str = "eps", *, batch_stats: bool = False, reason: str | None = None) -> float:
    r"""``value`` as a finite float ≥ 0: the ε of :math:`\hat x = (x − μ)/\sqrt{σ^2 + ε}`.

    torch's rule (``F.batch_norm``): ε = 0 is accepted where the statistics are fixed
    (running statistics in eval, a weight standardisation), but a layer that
    normalises with batch statistics (``batch_stats=True``: training, or no running
    statistics) needs ε > 0, since a channel whose batch values are all equal has σ² = 0.
    torch raises that only after counting the batch; forwards check it first. GroupNorm
    normalises each sample with the statistics of its own groups, computed from the input
    like batch statistics, so it passes ``batch_stats=True`` too, with its own ``reason``
    for the message. Negative, NaN and infinite values are refused everywhere.
    """
    value = as_float(owner, name, value)
    if not (value >= 0 and math.isfinite(value)):
        raise ValueError(f"{owner_name(owner)}: {name} must be a finite number >= 0, got {value}")
    if batch_stats and value == 0:
        if reason is not None:
            raise ValueError(f"{owner_name(owner)}: {name} must be > 0, got {value}; {reason}")
        raise ValueError(
            f"{owner_name(owner)}: {name} must be > 0 when normalising with batch statistics "
            f"(training mode, or no running statistics), got {value}; eps = 0 is accepted only "
            "with running statistics (eval), as in torch.nn.functional.batch_norm"
        )
    return value


def check_unit_interval(owner, name: str, value) -> float:
    """``value`` as a float in [0, 1]."""
    value = as_float(owner, name, value)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{owner_name(owner)}: {name} must be in [0, 1], got {value}")
    return value


def check_momentum(owner, value, name: str = "momentum"):
    """``None`` (cumulative average) or a float in [0, 1]."""
    if value is None:
        return None
    try:
        return check_unit_interval(owner, name, value)
    except TypeError:
        raise TypeError(
            f"{owner_name(owner)}: {name} must be None or a real number in [0, 1], got {type(value).__name__} {value!r}"
        ) from None


def check_tau(owner, value) -> float:
    """The membrane time constant τ: a real number > 1 (an int is accepted)."""
    value = as_float(owner, "tau", value)
    if not value > 1.0:
        raise ValueError(f"{owner_name(owner)}: tau must be > 1, got {value}")
    return value


def check_threshold(owner, value, name: str = "v_threshold") -> float:
    r"""The firing threshold V_th of :math:`S[t] = Θ(H[t] − V_{th})`: a finite float > 0.

    A neuron at rest has H = v_reset (0 for a soft reset) plus its input, so with
    V_th ≤ 0 it fires on every step from rest, whatever the input: ValueError.
    """
    value = check_finite(owner, name, value)
    if not value > 0:
        raise ValueError(
            f"{owner_name(owner)}: {name} must be > 0, got {value}; a neuron with V_th <= 0 fires on "
            "every step from rest (S = Θ(H − V_th) with H = 0)"
        )
    return value


# -- input tensors ----------------------------------------------------------------------

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
