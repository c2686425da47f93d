r"""Per-token normalizations of spiking transformers: LayerNorm and RMSNorm with step modes.

Both normalise each row — the last ``len(normalized_shape)`` dims of one token at one step —
with statistics of that row alone (no batch, no time), so train and eval agree and the math
is the same in either step mode:

.. math::
    \text{LayerNorm:}\quad y = γ \frac{x − \mathrm{mean}_D(x)}{\sqrt{\mathrm{var}_D(x) + ε}} + β
    \qquad\qquad
    \text{RMSNorm:}\quad y = γ \frac{x}{\sqrt{\mathrm{mean}_D(x^2) + ε}}

(Ba, Kiros & Hinton, "Layer Normalization", 2016; Zhang & Sennrich, "Root Mean Square Layer
Normalization", NeurIPS 2019), with D the number of elements of ``normalized_shape`` and
var_D the biased variance. SpikeGPT puts LayerNorm before its spiking neurons; spiking LLMs
use RMSNorm. The math is the op ``row_norm`` of the module's backend, on ``x`` viewed as
rows ``[..., D]``; followed by an IF/LIF neuron, :func:`snnorm.functional.fuse_norm_neurons`
runs both as one op on the triton backend (``row_norm_lif``).

The classes subclass torch's, so their ``state_dict`` is torch's (``weight``, ``bias``)
and loads both ways.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
import torch.nn as nn

from .. import base
from .._checks import check_bool, check_device, check_dtype, check_eps, check_positive_int, check_sequence, \
    check_tensor

__all__ = ["LayerNorm", "RMSNorm", "RowNormPlan"]

_ShapeArg = Union[int, Sequence[int], torch.Size]


@dataclass(frozen=True)
class RowNormPlan:
    """What the ``row_norm`` ops take for one checked input: γ and β flattened to ``[D]``
    (None without them), ε resolved to a float, ``rms`` (RMSNorm: no mean, no β), and the
    normalised dims, with the views between an input and its rows ``[..., D]``."""

    weight: Optional[torch.Tensor]
    bias: Optional[torch.Tensor]
    eps: float
    rms: bool
    normalized_shape: tuple[int, ...]

    def rows(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` with its normalised dims flattened into one last dim D (a view where strides allow)."""
        return x.flatten(-len(self.normalized_shape)) if len(self.normalized_shape) > 1 else x

    def unrows(self, y: torch.Tensor) -> torch.Tensor:
        """The inverse of :meth:`rows` (always a view: it splits the last dim)."""
        return y.unflatten(-1, self.normalized_shape) if len(self.normalized_shape) > 1 else y


def _check_normalized_shape(owner: str, normalized_shape) -> tuple[int, ...]:
    if isinstance(normalized_shape, numbers.Integral) and not isinstance(normalized_shape, bool):
        normalized_shape = (normalized_shape,)
    if not isinstance(normalized_shape, (tuple, list, torch.Size)):
        raise TypeError(
            f"{owner}: normalized_shape must be an int or a sequence of ints, got "
            f"{type(normalized_shape).__name__} {normalized_shape!r}"
        )
    if len(normalized_shape) == 0:
        raise ValueError(f"{owner}: normalized_shape must name at least one dim, got {tuple(normalized_shape)}")
    return tuple(check_positive_int(owner, "normalized_shape", d) for d in normalized_shape)


class _RowNormMixin(base.StepModule):
    """Input checks, step modes and the backend op shared by :class:`LayerNorm` and :class:`RMSNorm`."""

    supported_backends = ("torch", "triton")
    _RMS: bool = False
    _EPS_REASON = (
        "it normalises each row with statistics of that row alone, and a row of equal values (a token "
        "with no spikes) has {what} 0, so eps = 0 divides by zero"
    )

    def _eps_for(self, x: torch.Tensor) -> float:
        """ε as a float, checked again here since ``eps`` is a plain attribute a user may reassign
        (RMSNorm's ``eps=None``: torch's default, the machine epsilon of the computation's dtype)."""
        if self.eps is None:  # opmath: float32 for float16/bfloat16 inputs, as torch's rms_norm
            return torch.finfo(torch.promote_types(x.dtype, torch.float32)).eps
        what = "mean square" if self._RMS else "variance"
        return check_eps(self, self.eps, batch_stats=True, reason=self._EPS_REASON.format(what=what))

    def _check_input(self, x: torch.Tensor) -> None:
        check_tensor(self, x)
        shape = tuple(self.normalized_shape)
        k = len(shape)
        multi = self.step_mode == "m"
        least = k + 1 + multi  # [N, ..., *shape] or [T, N, ..., *shape]
        if x.dim() < least:
            layout = ("[T, N, ..., " if multi else "[N, ..., ") + ", ".join(map(str, shape)) + "]"
            raise ValueError(
                f"{type(self).__name__} (step_mode={self.step_mode!r}): expected x with shape {layout} "
                f"(at least {least}-D), but got x with shape {tuple(x.shape)} ({x.dim()}-D)"
            )
        if tuple(x.shape[-k:]) != shape:
            raise ValueError(
                f"{type(self).__name__}: expected the input's last {k} dim(s) to be normalized_shape {shape}, "
                f"got input of shape {tuple(x.shape)} ending in {tuple(x.shape[-k:])}"
            )
        if multi:
            check_sequence(self, x)
        check_device(self, x, self.weight)
        check_dtype(self, x, self.weight)

    def row_norm_plan(self, x: torch.Tensor) -> RowNormPlan:
        """Every input check (shape, step mode, T, device, dtype, ε), then what the ``row_norm``
        ops take for ``x`` (:class:`RowNormPlan`)."""
        self._check_input(x)
        eps = self._eps_for(x)
        weight = None if self.weight is None else self.weight.flatten()
        bias = getattr(self, "bias", None)  # RMSNorm has none
        return RowNormPlan(weight, None if bias is None else bias.flatten(), eps, self._RMS,
                           tuple(self.normalized_shape))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        plan = self.row_norm_plan(x)
        y = self.ops.row_norm(plan.rows(x), plan.weight, plan.bias, eps=plan.eps, rms=plan.rms)
        return plan.unrows(y)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", step_mode={self.step_mode}, backend={self.backend}"


class LayerNorm(_RowNormMixin, nn.LayerNorm):
    r""":class:`torch.nn.LayerNorm` with step modes and a triton backend (Ba et al., "Layer
    Normalization", 2016).

    .. math::
        y = γ \frac{x − \mathrm{mean}_D(x)}{\sqrt{\mathrm{var}_D(x) + ε}} + β

    over the last ``len(normalized_shape)`` dims of each token (D elements, biased variance),
    per step: 's' takes ``[N, ..., *normalized_shape]``, 'm' ``[T, N, ..., *normalized_shape]``
    (T ≥ 1). torch's constructor arguments (``bias=False``: no β) and ``state_dict``.

    ``eps`` must be > 0 (torch takes 0): a row whose values are all equal — a token that got
    no spikes — has variance 0, and ε = 0 would give 0/0. Refused in the constructor and
    again by every forward (``eps`` is a plain attribute).
    """

    _RMS = False

    def __init__(
        self,
        normalized_shape: _ShapeArg,
        eps: float = 1e-5,
        elementwise_affine: bool = True,
        bias: bool = True,
        step_mode: str = "s",
        device=None,
        dtype=None,
    ) -> None:
        owner = type(self).__name__
        normalized_shape = _check_normalized_shape(owner, normalized_shape)
        check_bool(owner, "elementwise_affine", elementwise_affine)
        check_bool(owner, "bias", bias)
        check_eps(owner, eps, batch_stats=True, reason=self._EPS_REASON.format(what="variance"))
        super().__init__(normalized_shape, eps, elementwise_affine, bias, device=device, dtype=dtype)
        self.step_mode = step_mode


class RMSNorm(_RowNormMixin, nn.RMSNorm):
    r""":class:`torch.nn.RMSNorm` with step modes and a triton backend (Zhang & Sennrich, "Root
    Mean Square Layer Normalization", NeurIPS 2019).

    .. math::
        y = γ \frac{x}{\sqrt{\mathrm{mean}_D(x^2) + ε}}

    over the last ``len(normalized_shape)`` dims of each token (D elements), per step: 's'
    takes ``[N, ..., *normalized_shape]``, 'm' ``[T, N, ..., *normalized_shape]`` (T ≥ 1).
    torch's constructor arguments and ``state_dict``.

    ``eps=None`` (the default) is torch's: the machine epsilon of the dtype the norm computes
    in (``torch.finfo(float32).eps`` for float32, float16 and bfloat16 inputs, float64's for
    float64). A given ``eps`` must be > 0 (torch takes 0): a token with no spikes is a row of
    zeros, whose mean square is 0, and ε = 0 would give 0/0.
    """

    _RMS = True

    def __init__(
        self,
        normalized_shape: _ShapeArg,
        eps: Optional[float] = None,
        elementwise_affine: bool = True,
        step_mode: str = "s",
        device=None,
        dtype=None,
    ) -> None:
        owner = type(self).__name__
        normalized_shape = _check_normalized_shape(owner, normalized_shape)
        check_bool(owner, "elementwise_affine", elementwise_affine)
        if eps is not None:
            check_eps(owner, eps, batch_stats=True, reason=self._EPS_REASON.format(what="mean square"))
        super().__init__(normalized_shape, eps, elementwise_affine, device=device, dtype=dtype)
        self.step_mode = step_mode
