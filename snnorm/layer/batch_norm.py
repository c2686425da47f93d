r"""Batch normalization for spiking networks: multi-step BN, tdBN, TEBN, BNTT, TAB.

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
:mod:`snnorm.layer._bn_state`.

Every layer subclasses torch's ``_BatchNorm`` (or holds torch BN modules) exactly where
spikingjelly 2.0.0 does, so ``state_dict`` s load both ways.

Before any running statistic or counter moves, a forward checks the input (shape, T,
device, dtype — the dtype policy of :mod:`snnorm.layer._checks`: the parameters' dtype, or
float16/bfloat16 into float32) and ``eps`` > 0 and ``momentum`` ∈ [0, 1] or None (plain
attributes a user may have reassigned), and that batch statistics get more than one value
per channel; torch's own BN counts the batch first.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.modules.batchnorm import _BatchNorm

from .. import base
from .._checks import check_eps, check_finite, check_momentum, check_positive_int
from ..memopt import check_stateful_recompute
from ..backends import torch_backend
from ._bn_state import (
    NormPlan, check_batch_values, check_bn_input, resolve_running_stats, stats_sync, uses_batch_stats,
)

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


# -- shared BN bookkeeping ------------------------------------------------------


def _check_bn_args(owner, num_features, eps, momentum, name: str = "num_features") -> None:
    """Constructor arguments every BN-like layer shares (ValueError/TypeError naming them)."""
    check_positive_int(owner, name, num_features)
    check_eps(owner, eps)
    check_momentum(owner, momentum)


def batch_norm(bn: _BatchNorm, x: torch.Tensor, channel_dim: int = 1, owner: Optional[nn.Module] = None) -> torch.Tensor:
    """torch's ``_BatchNorm.forward`` with the checkpointing guard, on ``[N, C, *]``, or on a
    sequence ``[T, N, C, *]`` (``channel_dim=2``) with statistics over T·N·spatial.

    When ``owner`` (default ``bn``; BNTT for its step BNs) is synchronised across ranks, the
    batch statistics pool every rank's batch (the torch backend's ``batch_norm_seq``)."""
    over = "over T·N·spatial" if channel_dim == 2 else ""
    batch_stats = uses_batch_stats(bn)
    check_batch_values(bn, x, batch_stats=batch_stats, channel_dim=channel_dim, over=over)
    sync = stats_sync(owner if owner is not None else bn, x, channel_dim=channel_dim, batch_stats=batch_stats)
    stats = resolve_running_stats(bn)
    if sync is not None:
        seq = x if channel_dim == 2 else x.unsqueeze(0)
        y = torch_backend.batch_norm_seq(seq, bn.weight, bn.bias, stats.mean, stats.var, training=True,
                                         momentum=stats.factor, eps=bn.eps, sync=sync)
        return y.view(x.shape)
    flat = x.flatten(0, 1) if channel_dim == 2 else x
    y = F.batch_norm(flat, stats.mean, stats.var, bn.weight, bn.bias, uses_batch_stats(bn), stats.factor, bn.eps)
    return y.view(x.shape)


class _GuardedBatchNormMixin:
    """Input checks and a bias-tolerant ``reset_parameters`` for BN layers.

    ``_sample_ndims`` lists the accepted dims of one timestep ``[N, C, *spatial]``;
    a multi-step input has one more (T in front).
    """

    _sample_ndims: tuple[int, ...] = ()

    def reset_parameters(self) -> None:
        # BNTT sets bias to None; older torch's reset_parameters assumes a bias.
        self.reset_running_stats()
        if self.affine:
            nn.init.ones_(self.weight)
            if self.bias is not None:
                nn.init.zeros_(self.bias)

    def _check_bn_input(self, x: torch.Tensor, multi: bool, T: Optional[int] = None) -> None:
        check_bn_input(self, x, multi=multi, sample_ndims=self._sample_ndims, num_features=self.num_features, T=T)


class _BatchNormMixin(_GuardedBatchNormMixin, base.StepModule):
    """Step modes for BN layers: 's' is torch's BN, 'm' folds T into the batch.

    Multi-step runs the op ``batch_norm_seq`` of the selected backend (``"torch"``:
    ``F.batch_norm`` on ``[T·N, C, *]``; ``"triton"``: the statistics pipeline, grouping
    ALL); single-step is torch's BN on either backend.
    """

    supported_backends = ("torch", "triton")

    def statistics_plan(self, x_seq: torch.Tensor) -> NormPlan:
        """Multi-step: one μ, σ² per channel over T·N·spatial (pipeline rule ``batch_norm``).
        Every input check first, then the batch is counted."""
        self._check_bn_input(x_seq, multi=True)
        batch_stats = uses_batch_stats(self)
        check_batch_values(self, x_seq, batch_stats=batch_stats, channel_dim=2, over="over T·N·spatial")
        sync = stats_sync(self, x_seq, channel_dim=2, batch_stats=batch_stats)
        stats = resolve_running_stats(self)
        return NormPlan("batch_norm", self.weight, self.bias, None, stats.mean, stats.var, stats.factors, self.eps,
                        batch_stats, sync=sync)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        multi = self.step_mode == "m"
        if not multi:
            self._check_bn_input(x, multi)
            return batch_norm(self, x)
        plan = self.statistics_plan(x)
        return self.ops.batch_norm_seq(
            x, plan.weight, plan.bias, plan.running_mean, plan.running_var, training=self.training,
            momentum=plan.momentum[0], eps=plan.eps, sync=plan.sync,
        )

    def extra_repr(self) -> str:
        return super().extra_repr() + f", step_mode={self.step_mode}"


class _TimestepBatchNormMixin(_GuardedBatchNormMixin):
    """The per-timestep BN inside BNTT: torch's BN with the checkpointing guard.

    Deliberately not a StepModule: ``set_step_mode(net, 'm')`` must not switch the
    children of a BNTT, which always see one timestep.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_bn_input(x, multi=False)
        return batch_norm(self, x)


class _TimestepBatchNorm1d(_TimestepBatchNormMixin, nn.BatchNorm1d):
    _sample_ndims = (2, 3)


class _TimestepBatchNorm2d(_TimestepBatchNormMixin, nn.BatchNorm2d):
    _sample_ndims = (4,)


class _TimestepBatchNorm3d(_TimestepBatchNormMixin, nn.BatchNorm3d):
    _sample_ndims = (5,)


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
        Every input check first, then the batch is counted."""
        self._check_bn_input(x_seq, multi=True, T=self.T)
        batch_stats = uses_batch_stats(self)
        check_batch_values(self, x_seq, batch_stats=batch_stats, channel_dim=2, over="over T·N·spatial")
        sync = stats_sync(self, x_seq, channel_dim=2, batch_stats=batch_stats)
        stats = resolve_running_stats(self)
        return NormPlan("tebn", self.weight, self.bias, self.scale, stats.mean, stats.var, stats.factors, self.eps,
                        batch_stats, sync=sync)

    def forward(self, x_seq: torch.Tensor) -> torch.Tensor:
        plan = self.statistics_plan(x_seq)
        return self.ops.tebn(
            x_seq, plan.weight, plan.bias, plan.running_mean, plan.running_var, plan.p, training=self.training,
            momentum=plan.momentum[0], eps=plan.eps, sync=plan.sync,
        )

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


# -- BNTT -----------------------------------------------------------------------


class _ThroughTimeBase(base.MemoryModule):
    r"""Shared logic of BN through time (BNTT; Kim & Panda, "Revisiting Batch
    Normalization for Training Low-Latency Deep Spiking Neural Networks From Scratch",
    Frontiers in Neuroscience 2021, arXiv:2010.01729).

    .. math::
        y[t] = γ_t \frac{x[t] − μ_t}{\sqrt{σ_t^2 + ε}}

    One BN (no bias) per timestep t = 0..T−1, each with its own γ_t and running
    statistics; μ_t, σ_t² are over N·spatial of timestep t only. The memory ``t`` is the
    index of the last processed timestep (−1 after ``reset()``):

    * ``step_mode='s'``: each call processes the next timestep. A call after T steps
      raises ValueError (call ``reset()`` between sequences).
    * ``step_mode='m'``: a call processes a whole ``[T, N, ...]`` sequence (its T must
      equal the module's) from a fresh state and leaves ``t = T − 1``, as spikingjelly.

    A rejected call changes neither ``t`` nor any running statistic.
    """

    #: multi-step mode runs the op ``bntt`` of the selected backend; single-step mode is
    #: the step's torch BN on either backend
    supported_backends = ("torch", "triton")

    def _bns(self) -> Sequence[_BatchNorm]:
        raise NotImplementedError

    @property
    def T(self) -> int:
        return len(self._bns())

    def _check_sequence_input(self, x: torch.Tensor, multi: bool) -> None:
        bns = self._bns()
        # every timestep's BN, so a multi-step call cannot fail half-way (t, counters moved)
        check_bn_input(
            self, x, multi=multi, sample_ndims=bns[0]._sample_ndims, num_features=bns[0].num_features, bns=bns,
            T=self.T,
        )

    def _check_step_values(self, bn: _BatchNorm, x: torch.Tensor) -> None:
        """One timestep's batch must hold more than one value per channel (checked under this
        module's name before any timestep's BN counts its batch)."""
        check_batch_values(self, x, batch_stats=uses_batch_stats(bn), over="at each timestep")

    def _step_statistics(self, x_seq: torch.Tensor):
        """(each step's running statistics, as each step's BN would resolve them: its buffers,
        its counter, its factor; the cross-rank hook or None), after the one-value check; the
        input checks have run."""
        bns = self._bns()
        self._check_step_values(bns[0], x_seq[0])
        sync = stats_sync(self, x_seq, channel_dim=2, batch_stats=uses_batch_stats(bns[0]))
        return [resolve_running_stats(bn) for bn in bns], sync

    def statistics_plan(self, x_seq: torch.Tensor) -> NormPlan:
        """Multi-step: μ_t, σ²_t of each step alone (pipeline rule ``bntt``), the steps' γ_t
        and running statistics stacked ``[T, C]``; ``commit`` copies the updated running
        statistics back into the steps' buffers and advances ``t`` to the sequence's end.
        Every input check first, then each step's batch is counted."""
        self._check_sequence_start(x_seq)
        bns = self._bns()
        stats, sync = self._step_statistics(x_seq)
        tracked = all(s.mean is not None for s in stats)
        mean = torch.stack([s.mean for s in stats]) if tracked else None
        var = torch.stack([s.var for s in stats]) if tracked else None
        weight = torch.stack([bn.weight for bn in bns]) if bns[0].weight is not None else None

        def commit() -> None:
            if tracked and uses_batch_stats(bns[0]):
                with torch.no_grad():
                    for t, s in enumerate(stats):
                        s.mean.copy_(mean[t])
                        s.var.copy_(var[t])
            self.t = self.T - 1

        eps = {float(bn.eps) for bn in bns}
        return NormPlan("bntt", weight, None, None, mean, var, [s.factor for s in stats], eps.pop() if len(eps) == 1
                        else None, uses_batch_stats(bns[0]), commit, sync)

    def single_step_forward(self, x: torch.Tensor) -> torch.Tensor:
        check_stateful_recompute(self)  # a plain checkpoint would restart from the advanced t
        self._check_sequence_input(x, multi=False)
        t = self.t + 1
        if t >= self.T:
            raise ValueError(
                f"{type(self).__name__} has T={self.T} timesteps (its temporal length) and has already processed all of them "
                f"(t={self.t}); call reset() (snnorm.functional.reset_net) before the next sequence"
            )
        bn = self._bns()[t]
        self._check_step_values(bn, x)
        y = batch_norm(bn, x, owner=self)  # the step's BN, synchronised with this module
        self.t = t
        return y

    def _check_sequence_start(self, x_seq: torch.Tensor) -> None:
        """A multi-step call's checks: a whole sequence, from t = 0."""
        check_stateful_recompute(self)
        self._check_sequence_input(x_seq, multi=True)
        if self.t != -1:
            raise ValueError(
                f"{type(self).__name__}: a multi-step call processes a whole sequence from t=0, but "
                f"{self.t + 1} timestep(s) have been processed since the last reset(); call reset() "
                "(snnorm.functional.reset_net) before the next sequence"
            )

    def multi_step_forward(self, x_seq: torch.Tensor) -> torch.Tensor:
        self._check_sequence_start(x_seq)
        bns = self._bns()
        stats, sync = self._step_statistics(x_seq)
        y_seq = self.ops.bntt(
            x_seq, [bn.weight for bn in bns], [s.mean for s in stats], [s.var for s in stats],
            training=bns[0].training, momentum=[s.factor for s in stats], eps=[bn.eps for bn in bns], sync=sync,
        )
        self.t = self.T - 1
        return y_seq

    def extra_repr(self) -> str:
        return f"T={self.T}, step_mode={self.step_mode}"


class _BatchNormThroughTimeBase(_ThroughTimeBase):
    """BNTT with spikingjelly's layout: per-timestep BNs in ``bn_list`` (keys ``bn_list.{t}.*``)."""

    bn_type: type = _TimestepBatchNorm2d

    def __init__(
        self,
        T: int,
        num_features: int,
        eps: float = 1e-5,
        momentum: Optional[float] = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        step_mode: str = "s",
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        check_positive_int(self, "T", T)
        _check_bn_args(self, num_features, eps, momentum)
        self.bn_list = nn.ModuleList(
            self.bn_type(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype)
            for _ in range(T)
        )
        for bn in self.bn_list:
            bn.bias = None  # BNTT has no shift
        self.step_mode = step_mode
        self.register_memory("t", -1)

    def _bns(self) -> Sequence[_BatchNorm]:
        return self.bn_list


class BatchNormThroughTime1d(_BatchNormThroughTimeBase):
    """BNTT on ``[N, C(, L)]`` per call ('s') or ``[T, N, C(, L)]`` ('m'); see :class:`_ThroughTimeBase`."""

    bn_type = _TimestepBatchNorm1d


class BatchNormThroughTime2d(_BatchNormThroughTimeBase):
    """BNTT on ``[N, C, H, W]`` per call ('s') or ``[T, N, C, H, W]`` ('m'); see :class:`_ThroughTimeBase`."""

    bn_type = _TimestepBatchNorm2d


class BatchNormThroughTime3d(_BatchNormThroughTimeBase):
    """BNTT on ``[N, C, D, H, W]`` per call ('s') or ``[T, N, C, D, H, W]`` ('m'); see :class:`_ThroughTimeBase`."""

    bn_type = _TimestepBatchNorm3d


# -- snntorch's BatchNormTT -------------------------------------------------------


class _BatchNormTTBase(_ThroughTimeBase, nn.ModuleList):
    """BNTT with snntorch's layout: a ModuleList of per-timestep BNs (keys ``{t}.*``).

    snntorch's ``BatchNormTT1d/2d(input_features, time_steps, eps, momentum, affine)``
    return a bare ``nn.ModuleList`` that cannot be called; users index it
    (``bntt[t](x)``). This is that ModuleList (indexing, iteration and ``state_dict``
    are identical, so snntorch checkpoints load both ways) that can also be called:
    one timestep per call (``step_mode='s'``, counter ``t``, ``reset()`` between
    sequences) or a whole ``[T, N, ...]`` sequence (``step_mode='m'``).
    """

    bn_type: type = _TimestepBatchNorm2d

    def __init__(
        self,
        input_features: int,
        time_steps: int,
        eps: float = 1e-5,
        momentum: Optional[float] = 0.1,
        affine: bool = True,
        step_mode: str = "s",
    ) -> None:
        super().__init__()
        check_positive_int(self, "time_steps", time_steps)
        _check_bn_args(self, input_features, eps, momentum, name="input_features")
        for _ in range(time_steps):
            bn = self.bn_type(input_features, eps=eps, momentum=momentum, affine=affine)
            bn.bias = None  # BNTT has no shift
            self.append(bn)
        self.step_mode = step_mode
        self.register_memory("t", -1)

    def _bns(self) -> Sequence[_BatchNorm]:
        return self

    def __repr__(self) -> str:
        return nn.Module.__repr__(self)


class BatchNormTT1d(_BatchNormTTBase):
    """snntorch's ``BatchNormTT1d(input_features, time_steps, eps=1e-5, momentum=0.1, affine=True)``,
    callable: ``[N, C(, L)]`` per call ('s') or ``[T, N, C(, L)]`` ('m'). BNTT (Kim & Panda 2021):
    y[t] = γ_t (x[t] − μ_t)/√(σ_t² + ε)."""

    bn_type = _TimestepBatchNorm1d


class BatchNormTT2d(_BatchNormTTBase):
    """snntorch's ``BatchNormTT2d(input_features, time_steps, eps=1e-5, momentum=0.1, affine=True)``,
    callable: ``[N, C, H, W]`` per call ('s') or ``[T, N, C, H, W]`` ('m'). BNTT (Kim & Panda 2021):
    y[t] = γ_t (x[t] − μ_t)/√(σ_t² + ε)."""

    bn_type = _TimestepBatchNorm2d


# -- TAB ------------------------------------------------------------------------


class _TemporalAccumulatedBatchNormBase(base.MemoryModule):
    r"""Temporal accumulated BN (TAB; Jiang et al., "TAB: Temporal Accumulated Batch
    Normalization in Spiking Neural Networks", ICLR 2024).

    Step t is normalised with the statistics of all steps up to and including t:

    .. math::
        μ_t, σ_t^2 = \text{mean, biased variance of } x[0..t] \text{ per channel}
        \quad (n_t = (t+1)·N·\text{spatial values}),\qquad
        y_t = p_t^2 \left(γ_t \frac{x_t − μ_t}{\sqrt{σ_t^2 + ε}} + β_t\right)

    with a γ_t, β_t per step and p ∈ R^T (init 1; p² scales the bias too). Gradients flow
    through μ_t, σ_t² into every earlier step. Running statistics are kept per step and
    updated in training with μ_t and the unbiased σ_t²·n_t/(n_t − 1) (factor ``momentum``,
    or the cumulative 1/``num_batches_tracked[t]`` when ``momentum is None``); eval
    normalises step t with ``running_mean[t]``, ``running_var[t]``. With
    ``track_running_stats=False`` the accumulated batch statistics are used in eval too.

    * ``step_mode='m'`` (default): ``[T, N, C, *spatial]``, T equal to the module's.
      The prefix statistics come from per-step partial (count, mean, M2) combined in
      order (Chan et al.), so a sequence costs O(T) passes (the official code re-normalises
      x[0..t] at every step: O(T²)). Memories are not touched.
    * ``step_mode='s'``: ``[N, C, *spatial]`` per call; the accumulated count, mean and M2
      per channel are memories (``stat_count``, ``stat_mean``, ``stat_m2``, and the step
      index ``t``), cleared by ``reset()`` / :func:`snnorm.functional.reset_net`. T calls
      give exactly the multi-step result; call T + 1 without a reset raises ValueError.

    ``state_dict`` uses the official code's keys (HaiyanJiang/SNN-TAB: ``bn_list.{t}.weight``,
    ``.bias``, ``.running_mean``, ``.running_var``, ``.num_batches_tracked`` and ``p``), so
    its checkpoints load here; its ``p`` of shape [T, 1, 1, 1, 1] loads as well as [T].
    Internally the per-step tensors are stacked: ``weight``, ``bias``, ``running_mean``,
    ``running_var`` are ``[T, C]``, ``num_batches_tracked`` and ``p`` are ``[T]``.
    ``supported_backends = ("torch", "triton")``: the math is the op ``tab`` of the selected
    backend (:func:`snnorm.backends.torch_backend.tab`).
    """

    supported_backends = ("torch", "triton")
    _sample_ndims: tuple[int, ...] = ()

    def __init__(
        self,
        T: int,
        num_features: int,
        eps: float = 1e-5,
        momentum: Optional[float] = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        step_mode: str = "m",
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        check_positive_int(type(self).__name__, "T", T)
        _check_bn_args(type(self).__name__, num_features, eps, momentum)
        factory = {"device": device, "dtype": dtype}
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        self.affine = affine
        self.track_running_stats = track_running_stats
        if affine:
            self.weight = nn.Parameter(torch.ones(T, num_features, **factory))
            self.bias = nn.Parameter(torch.zeros(T, num_features, **factory))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        self.p = nn.Parameter(torch.ones(T, **factory))
        if track_running_stats:
            self.register_buffer("running_mean", torch.zeros(T, num_features, **factory))
            self.register_buffer("running_var", torch.ones(T, num_features, **factory))
            self.register_buffer("num_batches_tracked", torch.zeros(T, dtype=torch.long, device=device))
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
            self.register_buffer("num_batches_tracked", None)
        self.step_mode = step_mode
        self.register_memory("t", -1)  # last processed step in single-step mode
        self.register_memory("stat_count", 0)  # statistics of steps 0..t (single-step mode)
        self.register_memory("stat_mean", None)
        self.register_memory("stat_m2", None)

    @property
    def T(self) -> int:
        return self.p.shape[0]

    def reset_running_stats(self) -> None:
        if self.track_running_stats:
            self.running_mean.zero_()
            self.running_var.fill_(1)
            self.num_batches_tracked.zero_()

    def reset_parameters(self) -> None:
        self.reset_running_stats()
        with torch.no_grad():
            if self.affine:
                self.weight.fill_(1)
                self.bias.zero_()
            self.p.fill_(1)

    # -- input checks -----------------------------------------------------------------
    def _check_input(self, x: torch.Tensor, multi: bool) -> None:
        check_bn_input(
            self, x, multi=multi, sample_ndims=self._sample_ndims, num_features=self.num_features,
            T=self.T if multi else None,
        )

    def _check_first_step(self, x_step: torch.Tensor) -> None:
        """Step 0 alone (the first prefix, the fewest values) must give more than one value
        per channel; not an empty batch either, whose statistics would put NaN into the
        running statistics."""
        check_batch_values(self, x_step, batch_stats=uses_batch_stats(self), over="at t=0", empty_ok=False)

    # -- forward -------------------------------------------------------------------
    def _tab(self, x_seq: torch.Tensor, t0: int, prefix):
        window = slice(t0, t0 + x_seq.shape[0])
        sync = stats_sync(self, x_seq, channel_dim=2, batch_stats=uses_batch_stats(self))
        stats = resolve_running_stats(self, window=window)
        return self.ops.tab(
            x_seq,
            None if self.weight is None else self.weight[window],
            None if self.bias is None else self.bias[window],
            stats.mean,
            stats.var,
            self.p[window],
            training=self.training,
            momentum=stats.factors,
            eps=self.eps,
            prefix=prefix,
            sync=sync,
        )

    def statistics_plan(self, x_seq: torch.Tensor) -> NormPlan:
        """Multi-step: step t normalised with the statistics of steps 0..t, scaled by p_t²
        (pipeline rule ``tab``). Every input check first, then every step is counted."""
        self._check_input(x_seq, multi=True)
        self._check_first_step(x_seq[0])
        batch_stats = uses_batch_stats(self)
        sync = stats_sync(self, x_seq, channel_dim=2, batch_stats=batch_stats)
        stats = resolve_running_stats(self, window=slice(0, x_seq.shape[0]))
        return NormPlan("tab", self.weight, self.bias, self.p, stats.mean, stats.var, stats.factors, self.eps,
                        batch_stats, sync=sync)

    def multi_step_forward(self, x_seq: torch.Tensor) -> torch.Tensor:
        self._check_input(x_seq, multi=True)
        self._check_first_step(x_seq[0])
        y_seq, _ = self._tab(x_seq, 0, None)
        return y_seq

    def single_step_forward(self, x: torch.Tensor) -> torch.Tensor:
        check_stateful_recompute(self)  # a plain checkpoint would restart from the advanced t
        self._check_input(x, multi=False)
        t = self.t + 1
        if t >= self.T:
            raise ValueError(
                f"{type(self).__name__} has T={self.T} timesteps (its temporal length) and has already processed all of them "
                f"(t={self.t}); call reset() (snnorm.functional.reset_net) before the next sequence"
            )
        if t == 0:
            self._check_first_step(x)
        y, state = self._tab(x.unsqueeze(0), t, (self.stat_count, self.stat_mean, self.stat_m2))
        self.stat_count, self.stat_mean, self.stat_m2 = state
        self.t = t
        return y[0]

    # -- state_dict in the official layout ------------------------------------------
    def _official_entries(self):
        """(key, tensor) pairs of the official state_dict layout (views of this module's tensors)."""
        for t in range(self.T):
            if self.affine:
                yield f"bn_list.{t}.weight", self.weight, t
                yield f"bn_list.{t}.bias", self.bias, t
            if self.track_running_stats:
                yield f"bn_list.{t}.running_mean", self.running_mean, t
                yield f"bn_list.{t}.running_var", self.running_var, t
                yield f"bn_list.{t}.num_batches_tracked", self.num_batches_tracked, t
        yield "p", self.p, None

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        for key, tensor, t in self._official_entries():
            value = tensor if keep_vars else tensor.detach()
            # p in the official shape [T, 1, 1, 1, 1], so the official TAB_Layer loads it too
            destination[prefix + key] = value.view(-1, 1, 1, 1, 1) if t is None else value[t]

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        expected = set()
        for key, tensor, t in self._official_entries():
            expected.add(prefix + key)
            if prefix + key not in state_dict:
                missing_keys.append(prefix + key)
                continue
            value = state_dict[prefix + key]
            target = tensor if t is None else tensor[t]
            if not isinstance(value, torch.Tensor):
                error_msgs.append(f"{prefix + key}: expected a tensor, got {type(value).__name__}")
                continue
            if t is None and value.dim() >= 1 and value.shape[0] == self.T and value.numel() == self.T:
                value = value.reshape(self.T)  # the official p is [T, 1, 1, 1, 1]
            if value.shape != target.shape:
                error_msgs.append(
                    f"size mismatch for {prefix + key}: copying a param with shape {tuple(value.shape)} from "
                    f"checkpoint, the shape in current model is {tuple(target.shape)}"
                )
                continue
            with torch.no_grad():
                target.copy_(value)
        if strict:
            for key in state_dict:
                if key.startswith(prefix) and key not in expected:  # no submodules: every key is ours
                    unexpected_keys.append(key)

    def extra_repr(self) -> str:
        return (
            f"T={self.T}, {self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}, "
            f"track_running_stats={self.track_running_stats}, step_mode={self.step_mode}, backend={self.backend}"
        )


class TemporalAccumulatedBatchNorm1d(_TemporalAccumulatedBatchNormBase):
    """TAB on ``[T, N, C]`` or ``[T, N, C, L]`` ('m'), ``[N, C(, L)]`` per call ('s'); see
    :class:`_TemporalAccumulatedBatchNormBase` (Jiang et al., ICLR 2024)."""

    _sample_ndims = (2, 3)


class TemporalAccumulatedBatchNorm2d(_TemporalAccumulatedBatchNormBase):
    """TAB on ``[T, N, C, H, W]`` ('m'), ``[N, C, H, W]`` per call ('s') (Jiang et al., ICLR 2024):
    y_t = p_t²·(γ_t (x_t − μ_{0..t})/√(σ²_{0..t} + ε) + β_t)."""

    _sample_ndims = (4,)


class TemporalAccumulatedBatchNorm3d(_TemporalAccumulatedBatchNormBase):
    """TAB on ``[T, N, C, D, H, W]`` ('m'), ``[N, C, D, H, W]`` per call ('s'); see
    :class:`_TemporalAccumulatedBatchNormBase` (Jiang et al., ICLR 2024)."""

    _sample_ndims = (5,)
