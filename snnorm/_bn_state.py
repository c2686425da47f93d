r"""BN bookkeeping shared by every BN-like layer: the input check, the batch-size rule and
the running statistics a forward reads or updates.

One place for what torch's ``_BatchNorm.forward`` does around ``F.batch_norm``, for the
layers whose statistics are per channel over N·spatial (BN 's', BNTT's steps),
T·N·spatial (BN 'm', tdBN, TEBN) or a prefix of steps (TAB), and for the MPBN neuron's
membrane BN (one statistic per step):

* :func:`check_bn_input` — shape, T, device, dtype, ``eps``, ``momentum``: before any
  running statistic, counter or memory moves, so a rejected call changes nothing.
* :func:`check_batch_values` — batch statistics need more than one value per channel
  (torch's "Expected more than 1 value per channel when training", raised by torch only
  after it counted the batch).
* :func:`resolve_running_stats` — the running buffers and momentum factors to hand the
  op, and (:meth:`RunningStats.commit`, called once the op has returned) the count of the
  batch in ``num_batches_tracked``; throw-away copies where
  :func:`snnorm._recompute.should_update_running_stats` says no (a checkpoint recompute).

The running update the op then performs, with the factor m resolved here::

    running ← (1 − m)·running + m·batch        (batch variance unbiased: σ²·n/(n − 1))
    m = momentum,  or 1/num_batches_tracked when momentum is None (cumulative average)
"""

from __future__ import annotations

from typing import Callable, Iterable, NamedTuple, Optional, Sequence

import torch
import torch.nn as nn

from ._checks import (
    check_device, check_dtype, check_eps, check_momentum, check_ndim, check_sequence, check_size, check_tensor,
    check_time_steps,
)
from ._recompute import should_update_running_stats
from .backends.sync import StatsSync

__all__ = [
    "RunningStats",
    "uses_batch_stats",
    "reference_tensor",
    "check_bn_input",
    "check_batch_values",
    "stats_sync",
    "resolve_running_stats",
    "NormPlan",
]


def uses_batch_stats(bn: nn.Module) -> bool:
    """Whether a forward normalises with batch statistics: in training, or without running
    statistics (torch's ``bn_training``)."""
    return bn.training or (bn.running_mean is None and bn.running_var is None)


def reference_tensor(module: nn.Module) -> Optional[torch.Tensor]:
    """The tensor whose device and dtype an input must match: the module's first floating
    parameter, else its first floating buffer (torch's BN: ``weight``, else ``running_mean``;
    TAB: ``weight``, else ``p``); None when it has neither (any input dtype is fine)."""
    for tensor in (*module.parameters(recurse=False), *module.buffers(recurse=False)):
        if tensor.is_floating_point():
            return tensor
    return None


# -- checks ------------------------------------------------------------------------------


def check_bn_input(
    module: nn.Module,
    x: torch.Tensor,
    *,
    multi: bool,
    sample_ndims: Sequence[int],
    num_features: int,
    bns: Iterable[nn.Module] = (),
    T: Optional[int] = None,
) -> None:
    """Every check a BN-like forward runs on its input before any state moves.

    ``x`` is one step ``[N, C, *spatial]`` (``multi=False``; ``sample_ndims`` lists the
    accepted dims) or a sequence ``[T, N, C, *spatial]`` with T ≥ 1 (``multi=True``; one dim
    more), with ``num_features`` channels. Its device and dtype must fit
    (:func:`snnorm._checks.check_dtype`) the tensors of ``module`` and of every BN in
    ``bns`` (BNTT: every timestep's BN, so a sequence cannot fail half-way), whose ``eps``
    and ``momentum`` (plain attributes a user may have reassigned) must be valid; ``bns``
    empty means ``module`` itself. With ``T`` a sequence must have exactly T steps.
    Errors name ``module`` (TypeError for a non-tensor or wrong dtype, ValueError else).
    """
    check_tensor(module, x)
    check_ndim(module, x, tuple(n + multi for n in sample_ndims), "m" if multi else "s")
    if multi:
        check_sequence(module, x)
    check_size(module, x, 1 + multi, num_features, "channels")
    for bn in tuple(bns) or (module,):
        reference = reference_tensor(bn)
        check_device(module, x, reference)
        check_dtype(module, x, reference)
        check_eps(module, bn.eps, batch_stats=uses_batch_stats(bn))
        check_momentum(module, bn.momentum)
    if multi and T is not None:
        check_time_steps(module, x, T)


def check_batch_values(
    module: nn.Module,
    x: torch.Tensor,
    *,
    batch_stats: bool,
    channel_dim: int = 1,
    over: str = "",
    empty_ok: bool = True,
) -> None:
    r"""ValueError when batch statistics would rest on a single value per channel.

    ``x`` holds the values of the smallest set one statistic is computed over, channels at
    ``channel_dim``: the whole input (BN, and with ``channel_dim=2`` a sequence for tdBN,
    TEBN: T·N·spatial), one timestep (BNTT, MPBN: N·spatial) or step 0 alone (TAB's first
    prefix). With ``batch_stats`` its n = ``x.numel() / C`` values per channel must not be
    1: the unbiased variance σ²·n/(n − 1) that updates the running statistics is undefined
    (torch's rule, which torch checks only after counting the batch). An empty batch
    (n = 0) passes, as in ``F.batch_norm``, which leaves the statistics untouched then;
    ``empty_ok=False`` rejects it where the op has no such case and would write NaN into
    them (TAB). ``over`` says in the message which values (e.g. "at t=0").
    """
    if not batch_stats:
        return
    target = module.__dict__.get("stats_sync")
    if target is not None and module.training and target.active(module):
        return  # synchronised: the hook checks the count of every rank's batch (SyncGroup.hook)
    n = x.numel() // max(x.shape[channel_dim], 1)
    if n == 1 or (n == 0 and not empty_ok):
        where = f" {over}" if over else ""
        raise ValueError(
            f"{type(module).__name__}: batch statistics need more than one value per channel, got input of "
            f"shape {tuple(x.shape)} ({n} value(s) per channel{where}); use a larger batch or eval mode"
        )


# -- running statistics -------------------------------------------------------------------


class RunningStats(NamedTuple):
    """What a BN op needs besides the input and the affine parameters.

    ``mean``, ``var``: the running buffers the op reads (eval) or updates in place
    (training); throw-away copies in a recompute; None when batch statistics normalise and
    nothing is updated. ``factors``: the momentum factor of every step the forward updates
    (one for a BN, T for TAB's per-step statistics or the MPBN neuron's steps).
    ``batches_before``: the shared ``num_batches_tracked`` before this forward counts it,
    when the factors are cumulative (``momentum is None``), for an op that derives them
    itself as 1/(batches_before + t + 1) (``mpbn_lif``); 0 otherwise.

    The batches are counted by :meth:`commit`, which the forward calls **after** its op
    returned: a forward whose op fails (a kernel that cannot launch, an out-of-memory
    error) leaves ``num_batches_tracked`` where it was, as it leaves the running statistics
    the op did not write. ``counter`` (the counter, or the view of the steps it counts) and
    ``count`` (how many batches it adds) say what :meth:`commit` does; None: nothing to count.
    """

    mean: Optional[torch.Tensor]
    var: Optional[torch.Tensor]
    factors: list[float]
    batches_before: int = 0
    counter: Optional[torch.Tensor] = None
    count: int = 0

    @property
    def factor(self) -> float:
        """The one factor of a single-step update (F.batch_norm's ``momentum``)."""
        if len(self.factors) != 1:
            raise ValueError(f"RunningStats.factor: expected one momentum factor, got {len(self.factors)}")
        return self.factors[0]

    def commit(self) -> None:
        """Count this forward's batches in ``num_batches_tracked`` (after its op succeeded)."""
        if self.counter is not None:  # a buffer (or a view of one): no autograd history
            self.counter.add_(self.count)


def resolve_running_stats(
    module: nn.Module, bn: Optional[nn.Module] = None, *, window: Optional[slice] = None, steps: int = 1
) -> RunningStats:
    r"""The running statistics a forward of ``module`` hands its op, as torch's
    ``_BatchNorm.forward`` resolves them, with the checkpoint guard.

    ``bn`` holds ``running_mean``, ``running_var``, ``num_batches_tracked``, ``momentum``
    and ``track_running_stats`` (default: ``module``; the MPBN neuron: its ``vbn``).

    * eval: the buffers (None without running statistics), nothing counted;
    * training without running statistics (``track_running_stats`` False or no buffers):
      None, None — batch statistics only;
    * training where :func:`should_update_running_stats` (``module``) says no (a
      checkpoint recompute, ``gc_1st_forward``): throw-away copies of the buffers, so batch
      statistics still normalise, the real buffers stay put and the op saves the same
      tensors as the first forward (non-reentrant checkpointing checks that);
    * else the buffers themselves, and the forward's batches are counted by
      :meth:`RunningStats.commit` once the op has run (nothing is counted here).

    Counting: with ``window`` (a ``slice(t0, t1)``) the buffers are per step (TAB: ``[T, C]``
    and a counter per step) and steps t0..t1−1 count once each on their own counter,
    m_t = 1/n_t with n_t the count including this batch. Without it one counter counts
    ``steps`` batches (one BN: 1; the MPBN neuron: one per timestep), m_k = 1/(n + k) for
    k = 1..steps, n the count before. With ``momentum`` set, m = momentum at every step.
    """
    bn = module if bn is None else bn
    if window is not None:
        steps = window.stop - window.start
    momentum = bn.momentum
    factors = [0.0 if momentum is None else float(momentum)] * steps
    mean, var = bn.running_mean, bn.running_var
    if mean is not None and window is not None:
        mean, var = mean[window], var[window]
    if not module.training:
        return RunningStats(mean, var, factors)
    if not bn.track_running_stats or mean is None:
        return RunningStats(None, None, factors)
    if not should_update_running_stats(module):
        return RunningStats(mean.clone(), var.clone(), factors)
    tracked = bn.num_batches_tracked
    if tracked is None:
        return RunningStats(mean, var, factors)
    if window is not None:
        tracked = tracked[window]
        if momentum is None:  # cumulative moving average, per step
            factors = [1.0 / float(n + 1) for n in tracked.tolist()]
        return RunningStats(mean, var, factors, counter=tracked, count=1)
    if momentum is None:  # cumulative moving average (reading the counter syncs: only here)
        before = int(tracked)
        return RunningStats(mean, var, [1.0 / (before + k) for k in range(1, steps + 1)], before, tracked, steps)
    return RunningStats(mean, var, factors, counter=tracked, count=steps)


class NormPlan(NamedTuple):
    """What a batch-statistics norm's multi-step forward hands the statistics pipeline
    (:mod:`snnorm.kernels.bn_pipeline`), after its checks; the batch is counted by ``commit``.

    ``rule`` names the pipeline rule (``batch_norm``, ``bntt``, ``tebn``, ``tab``); ``weight``,
    ``bias``, ``running_mean``, ``running_var`` are in the rule's layout (``[C]``, or
    ``[T, C]`` per step); ``p`` is the per-step scale ``[T]`` (TEBN, TAB) or None;
    ``momentum`` one factor per statistics row; ``batch_stats`` whether the batch's
    statistics normalise (else the running ones). ``commit``, if any, runs after the op
    succeeded: it counts the batch in ``num_batches_tracked`` (and, for BNTT, copies the
    stacked running statistics back into the steps' buffers), so a failed op changes nothing.
    """

    rule: str
    weight: Optional[torch.Tensor]
    bias: Optional[torch.Tensor]
    p: Optional[torch.Tensor]
    running_mean: Optional[torch.Tensor]
    running_var: Optional[torch.Tensor]
    momentum: list
    eps: float
    batch_stats: bool
    commit: Optional[Callable[[], None]] = None
    sync: Optional[StatsSync] = None


def stats_sync(module: nn.Module, x: torch.Tensor, *, channel_dim: int, batch_stats: bool) -> Optional[StatsSync]:
    """The cross-rank hook a forward of ``module`` hands its op, or None (statistics of this
    rank's batch alone).

    A hook only for a layer converted by :func:`snnorm.convert_sync_batchnorm` (its
    ``stats_sync`` attribute), in training with batch statistics, inside an initialised
    process group of more than one rank (eval never communicates, as torch's
    ``SyncBatchNorm``). Call it after the input checks and before the batch is counted:
    it raises where running alone would silently train on a fraction of the batch, and on
    every synchronised call the ranks compare T, C and their counts (:class:`SyncShapeError`;
    ValueError for an all-empty group).
    """
    target = module.__dict__.get("stats_sync")
    if target is None or not (batch_stats and module.training):
        return None
    T = x.shape[0] if channel_dim == 2 else 1
    C = x.shape[channel_dim]
    return target.hook(module, T=T, C=C, n=x.numel() // max(T * C, 1))


def shared_statistics_plan(
    module: nn.Module, x_seq: torch.Tensor, rule: str = "batch_norm", p: Optional[torch.Tensor] = None
) -> NormPlan:
    """The plan of a norm with one μ, σ² per channel over T·N·spatial of ``x_seq``
    ``[T, N, C, ...]`` (rule ``batch_norm``, or ``tebn`` with its per-step scale ``p``), once
    the module has checked the input's shape: the batch's values, the cross-rank hook and the
    running statistics, resolved before anything is counted (``commit`` counts)."""
    batch_stats = uses_batch_stats(module)
    check_batch_values(module, x_seq, batch_stats=batch_stats, channel_dim=2, over="over T·N·spatial")
    sync = stats_sync(module, x_seq, channel_dim=2, batch_stats=batch_stats)
    stats = resolve_running_stats(module)
    return NormPlan(rule, module.weight, module.bias, p, stats.mean, stats.var, stats.factors, module.eps,
                    batch_stats, stats.commit, sync)
