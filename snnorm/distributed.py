r"""Multi-process training: batch statistics synchronised across ranks.

:func:`convert_sync_batchnorm` marks every BN-like snnorm layer of a network so that its
batch statistics pool the batches of all ranks of a ``torch.distributed`` process group,
keeping each layer's temporal semantics and its backend:

=================================  ===========================================================
layer                              synchronised statistics, per channel
=================================  ===========================================================
``BatchNorm1d/2d/3d`` ('s')        over N·spatial of every rank
``BatchNorm1d/2d/3d`` ('m'), tdBN  over T·N·spatial of every rank
TEBN                               over T·N·spatial of every rank; y[t] = p[t]·(γ x̂[t] + β)
TAB                                for step t over steps 0..t, N·spatial of every rank
BNTT (``BatchNormThroughTime*``,   per timestep t, over N·spatial of every rank
``BatchNormTT*``)
``MPBNLIFNode`` (membrane BN)      per timestep, inside the neuron's time loop, over the
                                   N·spatial of H[t] of every rank
=================================  ===========================================================

How: synchronisation is one stage of the statistics pipeline (DESIGN.md §8), the hook
:class:`snnorm.backends.sync.StatsSync`. Each step's partials (count, mean, M2) are
gathered from every rank and combined in rank order with Chan's formula before the
layer's grouping (all steps, each step, the prefix 0..t); in the backward the per-(t, c)
sums Σg, Σg·x̂ are all-reduced. One collective per stage (per step for MPBN-LIF), O(T·C)
values per layer, never O(elements). Both backends run it: a synchronised layer keeps
its backend, and a fused norm → neuron block stays fused. The triton MPBN-LIF op takes
its pipelined path when synchronised (one launch per step, the collective between
launches; the resident path runs all T steps in one launch and cannot wait for other
ranks). Parameter gradients stay per rank, so under ``DistributedDataParallel`` (which
averages them) training equals one process on the concatenated batch with the mean of
the per-rank losses. Works with any backend that all-gathers the tensors' device (gloo
on CPU, nccl on GPU).

This module only converts, reverts and chooses the group: the conversion is **in
place** and attaches a :class:`SyncGroup` as each layer's ``stats_sync`` attribute
(modules keep their class, identity, parameters, buffers and ``state_dict``, so
checkpoints load both ways); :func:`revert_sync_batchnorm` removes it. Outside an
initialised process group, with a group of one rank, and in eval mode a synchronised
layer computes exactly what the original computes (as torch's ``SyncBatchNorm``, eval
never communicates: running statistics, or each rank's own batch statistics for a layer
without them, so evaluating on one rank alone cannot hang). At every synchronised call
a layer's ranks first exchange a 4-value header (layer, T, C, samples) in one small
all-gather: a mismatch of T or C at any step raises
:class:`snnorm.backends.sync.SyncShapeError` on every rank instead of hanging, and a step
where every rank's batch is empty raises ValueError on every rank. A rank with an empty
batch (0 samples) still joins every collective and adds nothing: the group computes what
one process computes on the other ranks' samples (outputs, gradients and running
statistics), as torch's ``SyncBatchNorm``. Folded MPBN
neurons (``re_parameterize_v_threshold``) have no BN left; their test-time threshold
adaptation stays per rank.

Unlike ``torch.nn.SyncBatchNorm.convert_sync_batchnorm``, which replaces every
``_BatchNorm`` subclass by a plain ``SyncBatchNorm`` (dropping TEBN's p[t], its T check
and tdBN's step mode; MPBN is never synchronised), this conversion keeps each layer.
Plain ``torch.nn.BatchNorm*`` layers are left alone (a warning names them).

Zhang et al. ("Context Encoding for Semantic Segmentation", CVPR 2018) introduced
cross-GPU BN; Chan, Golub & LeVeque, "Algorithms for computing the sample variance",
1983, for combining partial statistics.
"""

from __future__ import annotations

import os
import warnings
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm

from .backends.sync import StatsSync
from .layer.batch_norm import _BatchNormMixin
from .layer.bntt import _ThroughTimeBase
from .layer.tab import _TemporalAccumulatedBatchNormBase
from .neuron import MPBNBaseNode

__all__ = ["convert_sync_batchnorm", "revert_sync_batchnorm", "is_synchronized", "SyncGroup"]

def _tracing_or_capturing() -> bool:
    """Inside ``torch.compile``'s trace or a CUDA-graph capture (no host read of a collective)."""
    if torch.compiler.is_compiling():
        return True
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


#: the layers whose smallest statistic is over one step (N·spatial), not over all T steps
PER_STEP = (_ThroughTimeBase, _TemporalAccumulatedBatchNormBase, MPBNBaseNode)

#: the layers whose batch statistics synchronise (BNTT's per-step BNs through their BNTT)
SYNCABLE = (
    _BatchNormMixin,  # BatchNorm1d/2d/3d, tdBN, TEBN
    _ThroughTimeBase,  # BNTT, BatchNormTT
    _TemporalAccumulatedBatchNormBase,  # TAB
    MPBNBaseNode,
)


def _check_process_group(process_group) -> None:
    if process_group is None:
        return
    if not dist.is_available():
        raise RuntimeError(
            f"convert_sync_batchnorm: process_group={process_group!r} was given but torch.distributed "
            "is not available in this build of torch"
        )
    if not isinstance(process_group, dist.ProcessGroup):
        raise TypeError(
            "convert_sync_batchnorm: process_group must be a torch.distributed.ProcessGroup or None, "
            f"got {type(process_group).__name__}"
        )


class SyncGroup:
    """What :func:`convert_sync_batchnorm` attaches to a layer (its ``stats_sync``): the
    process group to synchronise over (None: the whole world), chosen anew at every call."""

    def __init__(self, process_group: Optional[dist.ProcessGroup] = None) -> None:
        self.process_group = process_group

    def hook(self, module: nn.Module, *, T: int, C: int, n: int) -> Optional[StatsSync]:
        """The hook for a training call of ``module`` with batch statistics, or None to compute
        locally (no process group, or one rank). Raises RuntimeError where running alone would
        silently train on a fraction of the batch: the module was converted with a group that
        no longer exists, or the launcher (torchrun) set ``WORLD_SIZE`` > 1 but
        ``init_process_group`` was never called.

        Every synchronised call first exchanges its header (:meth:`StatsSync.check_call`: the
        layer, ``T``, ``C`` and this rank's ``n`` values per (step, channel), 0 for an empty
        batch): SyncShapeError on every rank when T or C differ, ValueError on every rank when
        every batch is empty or the group holds one value per channel. Skipped while
        ``torch.compile`` traces (a host read would break the graph; the eager calls check)
        and during CUDA-graph capture (no host read is possible there)."""
        name = type(module).__name__
        group = self._active_group(name)
        if group is None:
            return None
        sync = StatsSync(group)
        if not _tracing_or_capturing():
            sync.check_call(name, layer=name, T=T, C=C, n=n, per_step=isinstance(module, PER_STEP))
        return sync

    def active(self, module: nn.Module) -> bool:
        """Whether a training call of ``module`` with batch statistics synchronises now (its
        one-value check is then the hook's, on the count of every rank's batch)."""
        return self._active_group(type(module).__name__) is not None

    def _active_group(self, name: str):
        if not dist.is_available():
            return None
        if not dist.is_initialized():
            if self.process_group is not None:
                raise RuntimeError(
                    f"{name}: converted with process_group={self.process_group!r}, but torch.distributed is not "
                    "initialised (was the group destroyed?); call torch.distributed.init_process_group(...) before "
                    "training"
                )
            world = os.environ.get("WORLD_SIZE", "1")
            if world.isdigit() and int(world) > 1:
                raise RuntimeError(
                    f"{name}: WORLD_SIZE={world} (set by the launcher, e.g. torchrun) but torch.distributed is not "
                    "initialised, so batch statistics cannot be synchronised; call "
                    "torch.distributed.init_process_group(backend='nccl' or 'gloo') before training"
                )
            return None
        group = dist.group.WORLD if self.process_group is None else self.process_group
        return group if dist.get_world_size(group) > 1 else None

    def __deepcopy__(self, memo) -> "SyncGroup":
        return SyncGroup(self.process_group)  # a copy synchronises over the same group

    def __repr__(self) -> str:
        return f"SyncGroup(process_group={self.process_group!r})"


def is_synchronized(module: nn.Module) -> bool:
    """Whether :func:`convert_sync_batchnorm` marked ``module`` (and no revert since)."""
    return isinstance(module.__dict__.get("stats_sync"), SyncGroup)


def _targets(net: nn.Module) -> tuple[list[tuple[str, nn.Module]], list[str]]:
    """(BN-like snnorm modules to mark, names of plain torch BN layers left alone)."""
    targets, plain = [], []

    def visit(name: str, module: nn.Module) -> None:
        if isinstance(module, SYNCABLE):
            targets.append((name, module))
            if isinstance(module, (MPBNBaseNode, _ThroughTimeBase)):
                return  # their inner BNs hold parameters and buffers; the layer synchronises them
        elif isinstance(module, _BatchNorm) and not isinstance(module, nn.SyncBatchNorm):
            plain.append(f"{name or '<root>'} ({type(module).__name__})")
        for child_name, child in module.named_children():
            visit(f"{name}.{child_name}" if name else child_name, child)

    visit("", net)
    return targets, plain


def convert_sync_batchnorm(net: nn.Module, process_group=None) -> nn.Module:
    """Synchronise the batch statistics of every BN-like snnorm layer of ``net``, in place.

    Marks multi- and single-step ``BatchNorm1d/2d/3d``, tdBN, TEBN, TAB, BNTT
    (``BatchNormThroughTime*`` and snntorch's ``BatchNormTT*``) and MPBN neurons (the
    membrane BN, per timestep); see the module documentation for the equations. Returns
    ``net`` itself (modules keep class, identity, parameters, buffers, ``state_dict`` keys
    and backend). ``process_group`` (default: the whole world) is the group to synchronise
    over; converting again replaces it. Call it before wrapping the network in
    ``DistributedDataParallel``.

    :raises TypeError: ``net`` is not an ``nn.Module`` or ``process_group`` not a ProcessGroup.
    """
    if not isinstance(net, nn.Module):
        raise TypeError(f"convert_sync_batchnorm: expected an nn.Module, got {type(net).__name__}")
    _check_process_group(process_group)
    targets, plain = _targets(net)
    if plain:
        warnings.warn(
            "convert_sync_batchnorm: these torch.nn batch-norm layers are not snnorm layers and are left "
            f"unsynchronised: {', '.join(plain)} (use snnorm.layer.BatchNorm*d, a drop-in replacement)",
            stacklevel=2,
        )
    for _, module in targets:
        module.stats_sync = SyncGroup(process_group)
    return net


def revert_sync_batchnorm(net: nn.Module) -> nn.Module:
    """Undo :func:`convert_sync_batchnorm` in place (the layers compute locally again)."""
    if not isinstance(net, nn.Module):
        raise TypeError(f"revert_sync_batchnorm: expected an nn.Module, got {type(net).__name__}")
    for module in net.modules():
        module.__dict__.pop("stats_sync", None)
    return net
