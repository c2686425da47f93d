r"""BN through time (BNTT; Kim & Panda 2021): one BN per timestep, spikingjelly's
``BatchNormThroughTime{1,2,3}d`` and snntorch's ``BatchNormTT{1,2}d`` layouts::

    y[t] = γ_t (x[t] − μ_t)/√(σ_t² + ε)     (μ_t, σ_t² over N·spatial of step t; no β)
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm

from .. import base
from .._bn_state import NormPlan, check_batch_values, check_bn_input, resolve_running_stats, stats_sync, uses_batch_stats
from .._checks import check_positive_int
from ..backends.torch_backend import stack_steps, unstack_steps
from .._recompute import check_stateful_recompute
from ._bn_common import _check_bn_args, _TimestepBatchNorm1d, _TimestepBatchNorm2d, _TimestepBatchNorm3d, batch_norm

__all__ = [
    "BatchNormThroughTime1d",
    "BatchNormThroughTime2d",
    "BatchNormThroughTime3d",
    "BatchNormTT1d",
    "BatchNormTT2d",
]


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
        statistics back into the steps' buffers, counts each step's batch and advances ``t``
        to the sequence's end. Every input check first."""
        self._check_sequence_start(x_seq)
        bns = self._bns()
        stats, sync = self._step_statistics(x_seq)
        mean, var = stack_steps([s.mean for s in stats]), stack_steps([s.var for s in stats])
        weight = stack_steps([bn.weight for bn in bns])

        def commit() -> None:
            if mean is not None and uses_batch_stats(bns[0]):
                unstack_steps(mean, [s.mean for s in stats])
                unstack_steps(var, [s.var for s in stats])
            for s in stats:
                s.commit()
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
        for s in stats:  # counted, and t advanced, only once the op has succeeded
            s.commit()
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
