r"""Batch normalization for spiking networks: multi-step BN, tdBN, TEBN, BNTT, TAB.

The shared-statistics family (BN, tdBN, TEBN) lives here; BNTT in :mod:`.bntt`, TAB in
:mod:`.tab`, re-exported here (``snnorm.layer.batch_norm.<Name>`` works for all).

Notation: a sequence ``x`` has shape ``[T, N, C, *spatial]``; per channel c,
``x̂ = (x − μ) / √(σ² + ε)``. The layers differ in where μ, σ² come from and what
multiplies x̂:

==========================  =========================================  ==========================
layer                       statistics μ, σ² per channel over          output
==========================  =========================================  ==========================
BatchNorm (step_mode 'm')   T·N·spatial                                γ x̂ + β
tdBN                        T·N·spatial                                γ x̂ + β, γ₀ = α·V_th
TEBN                        T·N·spatial                                p[t]·(γ x̂[t] + β)
TAB                         steps 0..t: (t+1)·N·spatial, at every t    p_t²·(γ_t x̂_t + β_t)
BNTT                        N·spatial, separately at every t           γ_t x̂_t (no β)
==========================  =========================================  ==========================

In training the batch statistics normalise and update the running statistics
(``running ← (1 − m)·running + m·batch``, unbiased batch variance, m = ``momentum`` or
the cumulative 1/``num_batches_tracked`` when ``momentum is None``); in eval the running
statistics normalise. Running statistics are touched only when
:func:`snnorm.memopt.should_update_running_stats` allows it, so activation checkpointing
does not update them twice. Every family resolves them, and checks its input, through
:mod:`snnorm._bn_state`.

Every layer subclasses torch's ``_BatchNorm`` (or holds torch BN modules) exactly where
spikingjelly 2.0.0 does, so ``state_dict`` s load both ways.

Before any running statistic or counter moves, a forward checks the input (shape, T,
device, dtype — the dtype policy of :mod:`snnorm._checks`: the parameters' dtype, or
float16/bfloat16 into float32) and ``eps`` > 0 and ``momentum`` ∈ [0, 1] or None (plain
attributes a user may have reassigned), and that batch statistics get more than one value
per channel; torch's own BN counts the batch first.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm

from .. import base
from .._bn_state import NormPlan, shared_statistics_plan
from .._checks import check_finite, check_positive_int
from ._bn_common import (  # noqa: F401  (the per-step BNs stay importable here: pickles name them so)
    _check_bn_args,
    _GuardedBatchNormMixin,
    _TimestepBatchNorm1d,
    _TimestepBatchNorm2d,
    _TimestepBatchNorm3d,
    batch_norm,
)
from .bntt import (  # noqa: F401  (BNTT: its own module; every name stays importable from here)
    BatchNormThroughTime1d,
    BatchNormThroughTime2d,
    BatchNormThroughTime3d,
    BatchNormTT1d,
    BatchNormTT2d,
    _BatchNormThroughTimeBase,
    _BatchNormTTBase,
    _ThroughTimeBase,
)
from .tab import (  # noqa: F401  (TAB likewise)
    TemporalAccumulatedBatchNorm1d,
    TemporalAccumulatedBatchNorm2d,
    TemporalAccumulatedBatchNorm3d,
    _TemporalAccumulatedBatchNormBase,
)

# shared-statistics BN (this module), then the re-exported BNTT and TAB families
__all__ = [
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "ThresholdDependentBatchNorm1d",
    "ThresholdDependentBatchNorm2d",
    "ThresholdDependentBatchNorm3d",
    "TemporalEffectiveBatchNorm1d",
    "TemporalEffectiveBatchNorm2d",
    "TemporalEffectiveBatchNorm3d",
    "BatchNormThroughTime1d",
    "BatchNormThroughTime2d",
    "BatchNormThroughTime3d",
    "BatchNormTT1d",
    "BatchNormTT2d",
    "TemporalAccumulatedBatchNorm1d",
    "TemporalAccumulatedBatchNorm2d",
    "TemporalAccumulatedBatchNorm3d",
]


# -- shared by BN, tdBN, TEBN -----------------------------------------------------


class _BatchNormMixin(_GuardedBatchNormMixin, base.StepModule):
    """Step modes for BN layers: 's' is torch's BN, 'm' folds T into the batch.

    Multi-step runs the op ``batch_norm_seq`` of the selected backend (``"torch"``:
    ``F.batch_norm`` on ``[T·N, C, *]``; ``"triton"``: the statistics pipeline, grouping
    ALL); single-step is torch's BN on either backend.
    """

    supported_backends = ("torch", "triton")

    def statistics_plan(self, x_seq: torch.Tensor) -> NormPlan:
        """Multi-step: one μ, σ² per channel over T·N·spatial (pipeline rule ``batch_norm``).
        Every input check first; ``commit`` counts the batch once the op has run."""
        self._check_bn_input(x_seq, multi=True)
        return shared_statistics_plan(self, x_seq)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        multi = self.step_mode == "m"
        if not multi:
            self._check_bn_input(x, multi)
            return batch_norm(self, x)
        plan = self.statistics_plan(x)
        y = self.ops.batch_norm_seq(
            x, plan.weight, plan.bias, plan.running_mean, plan.running_var, training=self.training,
            momentum=plan.momentum[0], eps=plan.eps, sync=plan.sync,
        )
        plan.commit()  # counted only once the op has succeeded
        return y

    def extra_repr(self) -> str:
        return super().extra_repr() + f", step_mode={self.step_mode}"


# -- BatchNorm with step modes --------------------------------------------------


class _StepModeBatchNorm(_BatchNormMixin):
    """torch's ``BatchNorm{1,2,3}d`` constructor (checked arguments) plus ``step_mode``; the
    subclass names torch's class second in its bases."""

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: Optional[float] = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        step_mode: str = "s",
        device=None,
        dtype=None,
    ) -> None:
        _check_bn_args(type(self).__name__, num_features, eps, momentum)
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype)
        self.step_mode = step_mode


class BatchNorm1d(_StepModeBatchNorm, nn.BatchNorm1d):
    """:class:`torch.nn.BatchNorm1d` with step modes.

    's': ``[N, C]`` or ``[N, C, L]``, statistics over N(·L). 'm': ``[T, N, C]`` or
    ``[T, N, C, L]``, statistics over T·N(·L) (T folded into the batch).
    """

    _sample_ndims = (2, 3)


class BatchNorm2d(_StepModeBatchNorm, nn.BatchNorm2d):
    """:class:`torch.nn.BatchNorm2d` with step modes: ``[N, C, H, W]`` ('s') or ``[T, N, C, H, W]`` ('m')."""

    _sample_ndims = (4,)


class BatchNorm3d(_StepModeBatchNorm, nn.BatchNorm3d):
    """:class:`torch.nn.BatchNorm3d` with step modes: ``[N, C, D, H, W]`` ('s') or ``[T, N, C, D, H, W]`` ('m')."""

    _sample_ndims = (5,)


# -- tdBN -----------------------------------------------------------------------


class _ThresholdDependentBatchNormBase(_BatchNormMixin, _BatchNorm):
    r"""Threshold-dependent BN (tdBN; Zheng et al., "Going Deeper With Directly-Trained
    Larger Spiking Neural Networks", AAAI 2021).

    .. math::
        y[t] = γ \frac{x[t] − μ}{\sqrt{σ^2 + ε}} + β,\qquad γ_0 = α V_{th},\ β_0 = 0

    with μ, σ² per channel over T·N·spatial (the whole sequence). Only the initial γ
    differs from multi-step BN: it scales the normalised input to the neuron threshold
    ``v_th`` (α is the paper's residual-branch factor, 1 or 1/√2). ``reset_parameters()``
    restores γ = α·V_th. Multi-step only (input ``[T, N, C, *spatial]``); ``affine`` must
    be True (γ is the point of the layer).
    """

    supported_step_modes = ("m",)

    def __init__(
        self,
        alpha: float,
        v_th: float,
        num_features: int,
        eps: float = 1e-5,
        momentum: Optional[float] = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device=None,
        dtype=None,
        step_mode: str = "m",
    ) -> None:
        if not affine:
            raise ValueError(
                f"{type(self).__name__} needs affine=True (its weight γ is initialised to alpha*v_th), got affine=False"
            )
        owner = type(self).__name__
        _check_bn_args(owner, num_features, eps, momentum)
        alpha, v_th = check_finite(owner, "alpha", alpha), check_finite(owner, "v_th", v_th)
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        self.step_mode = step_mode
        self.alpha = alpha
        self.v_th = v_th
        self.reset_parameters()

    def reset_parameters(self) -> None:
        super().reset_parameters()
        alpha, v_th = getattr(self, "alpha", None), getattr(self, "v_th", None)
        if alpha is not None and v_th is not None:  # None only while _BatchNorm.__init__ runs
            nn.init.constant_(self.weight, alpha * v_th)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", alpha={self.alpha}, v_th={self.v_th}"


class ThresholdDependentBatchNorm1d(_ThresholdDependentBatchNormBase):
    """tdBN on ``[T, N, C]`` or ``[T, N, C, L]``; see :class:`_ThresholdDependentBatchNormBase`."""

    _sample_ndims = (2, 3)


class ThresholdDependentBatchNorm2d(_ThresholdDependentBatchNormBase):
    """tdBN on ``[T, N, C, H, W]`` (Zheng et al., AAAI 2021): γ₀ = α·V_th, statistics over T·N·H·W."""

    _sample_ndims = (4,)


class ThresholdDependentBatchNorm3d(_ThresholdDependentBatchNormBase):
    """tdBN on ``[T, N, C, D, H, W]``; see :class:`_ThresholdDependentBatchNormBase`."""

    _sample_ndims = (5,)


# -- TEBN -----------------------------------------------------------------------


class _TemporalEffectiveBatchNormBase(_BatchNormMixin, _BatchNorm):
    r"""Temporal effective BN (TEBN; Duan et al., "Temporal Effective Batch Normalization
    in Spiking Neural Networks", NeurIPS 2022).

    .. math::
        y[t] = p[t] \left(γ \frac{x[t] − μ}{\sqrt{σ^2 + ε}} + β\right)

    μ, σ² per channel over T·N·spatial (shared by all timesteps); ``scale`` = p ∈ R^T is a
    learnable per-timestep factor starting at 1. Multi-step only; the input's T must equal
    the module's ``T``. ``supported_backends = ("torch", "triton")``: the math is the op
    ``tebn`` of the selected backend (:func:`snnorm.backends.torch_backend.tebn`).
    """

    supported_step_modes = ("m",)
    supported_backends = ("torch", "triton")

    def __init__(
        self,
        T: int,
        num_features: int,
        eps: float = 1e-5,
        momentum: Optional[float] = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device=None,
        dtype=None,
        step_mode: str = "m",
    ) -> None:
        check_positive_int(type(self).__name__, "T", T)
        _check_bn_args(type(self).__name__, num_features, eps, momentum)
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        self.step_mode = step_mode
        self.scale = nn.Parameter(torch.ones(T, device=device, dtype=dtype))

    @property
    def T(self) -> int:
        return self.scale.shape[0]

    def reset_parameters(self) -> None:
        super().reset_parameters()
        scale = getattr(self, "scale", None)
        if scale is not None:
            nn.init.ones_(scale)

    def statistics_plan(self, x_seq: torch.Tensor) -> NormPlan:
        """One μ, σ² per channel over T·N·spatial, scaled by p[t] (pipeline rule ``tebn``).
        Every input check first; ``commit`` counts the batch once the op has run."""
        self._check_bn_input(x_seq, multi=True, T=self.T)
        return shared_statistics_plan(self, x_seq, "tebn", self.scale)

    def forward(self, x_seq: torch.Tensor) -> torch.Tensor:
        plan = self.statistics_plan(x_seq)
        y_seq = self.ops.tebn(
            x_seq, plan.weight, plan.bias, plan.running_mean, plan.running_var, plan.p, training=self.training,
            momentum=plan.momentum[0], eps=plan.eps, sync=plan.sync,
        )
        plan.commit()  # counted only once the op has succeeded
        return y_seq

    def extra_repr(self) -> str:
        return super().extra_repr() + f", T={self.T}, backend={self.backend}"


class TemporalEffectiveBatchNorm1d(_TemporalEffectiveBatchNormBase):
    """TEBN on ``[T, N, C]`` or ``[T, N, C, L]`` (Duan et al., NeurIPS 2022): y[t] = p[t]·BN(x)[t]."""

    _sample_ndims = (2, 3)


class TemporalEffectiveBatchNorm2d(_TemporalEffectiveBatchNormBase):
    """TEBN on ``[T, N, C, H, W]`` (Duan et al., NeurIPS 2022): y[t] = p[t]·BN(x)[t]."""

    _sample_ndims = (4,)


class TemporalEffectiveBatchNorm3d(_TemporalEffectiveBatchNormBase):
    """TEBN on ``[T, N, C, D, H, W]`` (Duan et al., NeurIPS 2022): y[t] = p[t]·BN(x)[t]."""

    _sample_ndims = (5,)
