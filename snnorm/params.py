"""Parameter bundles of the spiking-neuron ops: one immutable NamedTuple per concern.

The modules (:mod:`snnorm.neuron`) build them from their attributes, the op tables
(:mod:`snnorm.backends`) take them as single values, and the Triton kernels' custom ops
receive their plain-value twins (``*Kernel*`` bundles below), because a
``torch.library`` custom op takes only scalars, strings, dtypes and tensors.

============================  ====================================================
bundle                        what it holds
============================  ====================================================
:class:`LIFParameters`        the neuron: charge (τ, decay_input), reset (v_reset,
                              detach_reset) and the surrogate spike function
:class:`MPBNParameters`       the membrane BN: ε and which membrane the reset carries
:class:`BNStatistics`         how a BN's batch statistics are used and tracked
:class:`AdaptParameters`      test-time adaptation of a folded threshold
:class:`LIFKernelParameters`  ``LIFParameters`` as plain values (surrogate by name)
:class:`BNKernelParameters`   ε and the running-statistics factor, as plain values
============================  ====================================================

A kernel bundle's fields are, in order, a slice of its custom op's argument list: the op's
schema is generated from the bundle's annotations (:func:`op_schema_fields`),
``bundle.to_op_args()`` gives the arguments, and
``Bundle.from_op_args(args)`` takes them back, so no op, fake or backward counts them by
hand.

This module imports neither triton nor the backends: kernels, backends and modules all
depend on it, never the other way round.
"""

from __future__ import annotations

import typing
from typing import Callable, NamedTuple, Optional

__all__ = [
    "CARRY_MODES",
    "LIFParameters",
    "MPBNParameters",
    "BNStatistics",
    "AdaptParameters",
    "LIFKernelParameters",
    "BNKernelParameters",
    "op_schema_fields",
]

#: which membrane the reset of an MPBN neuron carries: ĥ (spikingjelly) or the raw h (the MPBN paper)
CARRY_MODES = ("normalized", "raw")


class LIFParameters(NamedTuple):
    """The LIF neuron's constants (spikingjelly numerics), with v_r = v_reset, or 0 for soft reset::

        decay_input:      h = v + (x − (v − v_r))/τ
        not decay_input:  h = v − (v − v_r)/τ + x            (τ = ∞: IF, h = v + x)
        s = Θ(u − θ)  forward, ``surrogate``'s derivative backward
        v = s·v_reset + (1 − s)·u  (hard)   or   u − s·θ  (soft, v_reset None)

    ``detach_reset`` detaches s in the reset. The threshold θ is not part of the bundle: it
    may be a ``[C]`` tensor that carries a gradient (learnable or folded thresholds).
    """

    surrogate: Callable  # a spike function, e.g. snnorm.surrogate.Sigmoid(): Θ forward, its derivative backward
    tau: float = 2.0
    decay_input: bool = True
    v_reset: Optional[float] = 0.0
    detach_reset: bool = False

    @property
    def soft_reset(self) -> bool:
        return self.v_reset is None

    @property
    def v_rest(self) -> float:
        """v_r, the value the charge decays towards: v_reset, or 0 for soft reset."""
        return 0.0 if self.v_reset is None else self.v_reset

    def for_kernel(self, surrogate: str, alpha: float) -> "LIFKernelParameters":
        """The plain-value twin for the kernels, with the surrogate resolved to its kernel name and α."""
        return LIFKernelParameters(
            float(self.tau), bool(self.decay_input), float(self.v_rest), self.soft_reset, bool(self.detach_reset),
            surrogate, float(alpha),
        )


class MPBNParameters(NamedTuple):
    """The membrane BN of an MPBN neuron: ĥ = γ(h − μ)/√(σ² + ε) + β, and the carried state
    ``carry`` = "normalized" (reset ĥ, spikingjelly) or "raw" (reset h, the MPBN paper's code)."""

    eps: float = 1e-5
    carry: str = "normalized"


class BNStatistics(NamedTuple):
    """How a batch norm's statistics are used and tracked in one forward.

    ``training`` (or no running statistics): normalise with the batch statistics and, if
    running statistics are given, update them at every step with factor ``momentum``, or
    1/(batches_tracked + t + 1) when ``momentum`` is None (torch's cumulative average).
    Otherwise normalise with the running statistics.
    """

    training: bool = True
    momentum: Optional[float] = 0.1
    batches_tracked: int = 0


class AdaptParameters(NamedTuple):
    """Test-time adaptation of a folded threshold (Zhao et al., arXiv 2505.05375), per step::

        mode "none":    μ, σ² stay
        mode "batch":   μ, σ² = the step's batch statistics
        mode "running": μ ← (1 − m)μ + m·mean, σ² likewise;  m ← max(m·decay, min_momentum)
    """

    mode: str = "none"
    momentum: float = 0.1
    decay: float = 0.94
    min_momentum: float = 0.005


# ----------------------------------------------------------------------------------
# plain-value bundles: slices of the kernels' custom-op argument lists
# ----------------------------------------------------------------------------------

_SCHEMA_TYPES = {float: "float", bool: "bool", int: "int", str: "str", Optional[float]: "float?"}


def op_schema_fields(bundle: type) -> str:
    """The bundle's fields as a ``torch.library`` schema fragment, e.g. ``"float tau, bool decay_input"``."""
    hints = typing.get_type_hints(bundle)
    return ", ".join(f"{_SCHEMA_TYPES[hints[name]]} {name}" for name in bundle._fields)


def _split_op_args(bundle: type, args) -> tuple:
    n = len(bundle._fields)
    return bundle(*args[:n]), tuple(args[n:])


class LIFKernelParameters(NamedTuple):
    """:class:`LIFParameters` as the kernels take them: v_reset is v_r (0 for a soft reset,
    which ``soft_reset`` says), the surrogate is its kernel name and α."""

    tau: float
    decay_input: bool
    v_reset: float
    soft_reset: bool
    detach_reset: bool
    surrogate: str
    alpha: float

    def to_op_args(self) -> tuple:
        return tuple(self)

    @classmethod
    def from_op_args(cls, args) -> tuple:
        """(bundle, the arguments after its fields) from a custom op's arguments that start with them."""
        return _split_op_args(cls, args)


class BNKernelParameters(NamedTuple):
    """A BN's ε and running-statistics factor as the kernels take them (see :class:`BNStatistics`)."""

    eps: float
    momentum: Optional[float]
    batches_tracked: int

    def to_op_args(self) -> tuple:
        return tuple(self)

    @classmethod
    def from_op_args(cls, args) -> tuple:
        """(bundle, the arguments after its fields) from a custom op's arguments that start with them."""
        return _split_op_args(cls, args)


def _check_fields_cover_schema() -> None:  # every field type must have a schema spelling
    for bundle in (LIFKernelParameters, BNKernelParameters):
        op_schema_fields(bundle)


_check_fields_cover_schema()
