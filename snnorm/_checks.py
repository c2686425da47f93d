"""Argument checks shared by every snnorm module (layers, neurons, surrogates).

Each check returns the normalised value or raises ValueError (a value out of range) or
TypeError (a value of the wrong type) whose message names the module, the argument,
what was expected and what came. Constructors call them before building anything, and
forwards call :func:`check_eps` / :func:`check_momentum` again before touching state,
since ``eps`` and ``momentum`` are plain attributes a user can reassign.

Input-tensor checks (shape, T, dtype, device) live in :mod:`snnorm.layer._checks`.
"""

from __future__ import annotations

import math
import numbers

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


def check_eps(owner, value, name: str = "eps", *, batch_stats: bool = False) -> float:
    r"""``value`` as a finite float ≥ 0: the ε of :math:`\hat x = (x − μ)/\sqrt{σ^2 + ε}`.

    torch's rule (``F.batch_norm``): ε = 0 is accepted where the statistics are fixed
    (running statistics in eval, GroupNorm, a weight standardisation), but a layer that
    normalises with batch statistics (``batch_stats=True``: training, or no running
    statistics) needs ε > 0, since a channel whose batch values are all equal has σ² = 0.
    torch raises that only after counting the batch; forwards check it first. Negative,
    NaN and infinite values are refused everywhere.
    """
    value = as_float(owner, name, value)
    if not (value >= 0 and math.isfinite(value)):
        raise ValueError(f"{owner_name(owner)}: {name} must be a finite number >= 0, got {value}")
    if batch_stats and value == 0:
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
