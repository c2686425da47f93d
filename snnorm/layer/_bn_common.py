r"""What the BN families (:mod:`.batch_norm`, :mod:`.bntt`, :mod:`.tab`) share: the
constructor-argument check, :func:`batch_norm` (torch's ``_BatchNorm.forward`` on
``[N, C, *]`` or a sequence, with the checkpointing guard and the cross-rank hook) and
the per-timestep BN inside BNTT. Per channel c::

    y = γ (x − μ)/√(σ² + ε) + β
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.modules.batchnorm import _BatchNorm

from .._bn_state import check_batch_values, check_bn_input, resolve_running_stats, stats_sync, uses_batch_stats
from .._checks import check_eps, check_momentum, check_positive_int
from ..backends import torch_backend


def _check_bn_args(owner, num_features, eps, momentum, name: str = "num_features") -> None:
    """Constructor arguments every BN-like layer shares (ValueError/TypeError naming them)."""
    check_positive_int(owner, name, num_features)
    check_eps(owner, eps)
    check_momentum(owner, momentum)


def batch_norm(bn: _BatchNorm, x: torch.Tensor, channel_dim: int = 1, owner: Optional[nn.Module] = None) -> torch.Tensor:
    """torch's ``_BatchNorm.forward`` with the checkpointing guard, on ``[N, C, *]``, or on a
    sequence ``[T, N, C, *]`` (``channel_dim=2``) with statistics over T·N·spatial.

    When ``owner`` (default ``bn``; BNTT for its step BNs) is synchronised across ranks, the
    batch statistics pool every rank's batch (the torch backend's ``batch_norm_seq``).
    The batch is counted in ``num_batches_tracked`` only once the op has returned."""
    over = "over T·N·spatial" if channel_dim == 2 else ""
    batch_stats = uses_batch_stats(bn)
    check_batch_values(bn, x, batch_stats=batch_stats, channel_dim=channel_dim, over=over)
    sync = stats_sync(owner if owner is not None else bn, x, channel_dim=channel_dim, batch_stats=batch_stats)
    stats = resolve_running_stats(bn)
    if sync is not None:
        seq = x if channel_dim == 2 else x.unsqueeze(0)
        y = torch_backend.batch_norm_seq(seq, bn.weight, bn.bias, stats.mean, stats.var, training=True,
                                         momentum=stats.factor, eps=bn.eps, sync=sync)
    else:
        flat = x.flatten(0, 1) if channel_dim == 2 else x
        y = F.batch_norm(flat, stats.mean, stats.var, bn.weight, bn.bias, batch_stats, stats.factor, bn.eps)
    stats.commit()
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
