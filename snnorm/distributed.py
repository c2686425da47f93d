r"""Multi-process training: batch statistics synchronised across ranks.

:func:`convert_sync_batchnorm` turns every BN-like snnorm layer of a network into a
version whose batch statistics are computed over the batches of all ranks of a
``torch.distributed`` process group, keeping each layer's temporal semantics:

=================================  ===========================================================
layer                              synchronised statistics, per channel
=================================  ===========================================================
``BatchNorm1d/2d/3d`` ('s')        over N·spatial of every rank
``BatchNorm1d/2d/3d`` ('m'), tdBN  over T·N·spatial of every rank
TEBN                               over T·N·spatial of every rank; y[t] = p[t]·(γ x̂[t] + β)
TAB                                for step t over steps 0..t, N·spatial of every rank;
                                   y_t = p_t²·(γ_t x̂_t + β_t) (per-step statistics
                                   all-reduced, then combined in order)
BNTT (``BatchNormThroughTime*``,   per timestep t, over N·spatial of every rank (one
``BatchNormTT*``)                  synchronised BN per timestep, each with its own γ_t)
``MPBNLIFNode`` (membrane BN)      per timestep, inside the neuron's time loop, over the
                                   N·spatial of H[t] of every rank
=================================  ===========================================================

Statistics (Chan et al.'s two-pass scheme across ranks; never raw Σx²)::

    n = Σ_r n_r,   μ = (Σ_r Σ_i x_ri) / n                 (1st all-reduce: sums and counts)
    M2 = Σ_r Σ_i (x_ri − μ)²,   σ² = M2 / n               (2nd all-reduce)
    x̂ = (x − μ)/√(σ² + ε)
    running ← (1 − m)·running + m·(μ, M2/(n − 1))         (unbiased with the global count)

Both all-reduces are differentiable (an autograd function whose backward all-reduces too):
the backward pass sums the gradient that reaches μ and σ² on every rank, so under
``DistributedDataParallel`` (which averages parameter gradients over ranks) the result is
the gradient of the mean of the per-rank losses, as one process computing it on the
concatenated batch. Works with any backend that all-reduces the tensors' device (gloo on
CPU, nccl on GPU). Sums and counts travel in float64 (a count is exact there).

The conversion is **in place**: each module keeps its identity, parameters, buffers and
``state_dict`` keys (its class becomes a synchronised subclass, e.g.
``SyncTemporalEffectiveBatchNorm2d``), so checkpoints load both ways and
:func:`revert_sync_batchnorm` undoes it. Synchronised modules support only the
``torch`` backend (``supported_backends = ("torch",)``); a module on another backend is
refused by the conversion (switch it with ``set_backend(net, "torch")`` first). Outside an
initialised process group, with a group of one rank, and in eval mode a synchronised
module computes exactly what the original computes (as torch's ``SyncBatchNorm``, eval
never communicates: running statistics, or each rank's own batch statistics for a layer
without them, so evaluating on one rank alone cannot hang).
Folded MPBN neurons (``re_parameterize_v_threshold``) have no BN left; their test-time
threshold adaptation stays per rank.

Unlike ``torch.nn.SyncBatchNorm.convert_sync_batchnorm``, which replaces every
``_BatchNorm`` subclass by a plain ``SyncBatchNorm`` (dropping TEBN's p[t], its T check
and tdBN's step mode; MPBN is never synchronised), this conversion keeps each layer.
Plain ``torch.nn.BatchNorm*`` layers are left alone (a warning names them).

Zhang et al. ("Context Encoding for Semantic Segmentation", CVPR 2018) introduced
cross-GPU BN; Chan, Golub & LeVeque, "Algorithms for computing the sample variance",
1983, for the stable two-pass variance.
"""

from __future__ import annotations

import functools
import os
import warnings
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm

from . import backends
from .backends import torch_backend
from .base import StepModule
from .layer import batch_norm as _bn
from .layer._bn_state import check_batch_values, resolve_running_stats, uses_batch_stats
from .neuron import MPBNBaseNode

__all__ = [
    "convert_sync_batchnorm",
    "revert_sync_batchnorm",
    "is_synchronized",
    "global_batch_stats",
    "sync_batch_norm",
    "sync_tebn",
    "sync_tab",
    "sync_mpbn_lif",
]


# -- process groups ------------------------------------------------------------------


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


def _active_group(module: nn.Module, strict: bool):
    """The process group to synchronise ``module`` over now, or None to compute locally.

    None when torch.distributed is unavailable or uninitialised (a single process) or the
    group has one rank. With ``strict`` it raises RuntimeError where running alone would
    silently train on a fraction of the batch: the module was converted with a group
    that no longer exists, or the launcher (torchrun) set ``WORLD_SIZE`` > 1 but
    ``init_process_group`` was never called.
    """
    group = module.__dict__.get("process_group")
    name = type(module).__name__
    if not dist.is_available():
        return None
    if not dist.is_initialized():
        if not strict:
            return None
        if group is not None:
            raise RuntimeError(
                f"{name}: converted with process_group={group!r}, but torch.distributed is not initialised "
                "(was the group destroyed?); call torch.distributed.init_process_group(...) before training"
            )
        world = os.environ.get("WORLD_SIZE", "1")
        if world.isdigit() and int(world) > 1:
            raise RuntimeError(
                f"{name}: WORLD_SIZE={world} (set by the launcher, e.g. torchrun) but torch.distributed is "
                "not initialised, so batch statistics cannot be synchronised; call "
                "torch.distributed.init_process_group(backend='nccl' or 'gloo') before training"
            )
        return None
    group = dist.group.WORLD if group is None else group
    return group if dist.get_world_size(group) > 1 else None


# -- the math ------------------------------------------------------------------------


class _AllReduceSum(torch.autograd.Function):
    """Σ over ranks; its backward is the same sum of the incoming gradients, because every
    rank's output depends on every rank's input."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        out = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad, None


def _all_reduce_sum(tensor: torch.Tensor, group) -> torch.Tensor:
    return _AllReduceSum.apply(tensor, group)


def _channel_shape(x: torch.Tensor) -> list[int]:
    return [1, x.shape[1]] + [1] * (x.dim() - 2)


def global_batch_stats(x: torch.Tensor, group) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""Per-channel statistics of ``x`` ``[N, C, *]`` over the batches of every rank of ``group``.

    Returns ``(mean, M2, count)``: μ and M2 = Σ(x − μ)² (shape ``[C]``, in the compute
    dtype: float32 for half inputs, else x's) and the global count n per channel (a float64
    scalar tensor). The global mean comes first, then the global sum of squared deviations
    from it (stable at any mean/std ratio). Differentiable in ``x``. Every rank of
    ``group`` must call it (a collective).
    """
    acc = torch.promote_types(x.dtype, torch.float32)
    dims = [0, *range(2, x.dim())]
    xa = x.to(acc)
    count_local = x.numel() // max(x.shape[1], 1)
    local_sum = xa.sum(dim=dims).to(torch.float64)
    packed = torch.cat([local_sum, local_sum.new_full((1,), float(count_local))])
    packed = _all_reduce_sum(packed, group)
    count = packed[-1].detach()
    mean = (packed[:-1] / count).to(acc)
    m2 = ((xa - mean.view(_channel_shape(x))) ** 2).sum(dim=dims)
    m2 = _all_reduce_sum(m2, group)
    return mean, m2, count


def sync_batch_norm(
    x: torch.Tensor,
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    running_mean: Optional[torch.Tensor],
    running_var: Optional[torch.Tensor],
    momentum: float,
    eps: float,
    group,
) -> torch.Tensor:
    r"""Batch normalisation of ``x`` ``[N, C, *]`` with statistics over every rank of ``group``.

    ``y = γ (x − μ)/√(σ² + ε) + β`` with μ, σ² (biased) from :func:`global_batch_stats`;
    running statistics, when given, are updated in place with factor ``momentum`` and the
    unbiased M2/(n − 1). Returns x's dtype. Every rank must call it (a collective).
    """
    mean, m2, count = global_batch_stats(x, group)
    shape = _channel_shape(x)
    var = m2 / count.to(m2.dtype)
    scale = torch.rsqrt(var + eps)
    if weight is not None:
        scale = scale * weight
    y = (x.to(mean.dtype) - mean.view(shape)) * scale.view(shape)
    if bias is not None:
        y = y + bias.view(shape)
    if running_mean is not None:
        with torch.no_grad():
            unbiased = (m2.detach().to(torch.float64) / (count - 1)).to(running_var.dtype)
            running_mean.mul_(1.0 - momentum).add_(mean.detach().to(running_mean.dtype), alpha=momentum)
            running_var.mul_(1.0 - momentum).add_(unbiased, alpha=momentum)
    return y.to(x.dtype)


def sync_tebn(
    x_seq, weight, bias, running_mean, running_var, scale, *, training: bool, momentum: float, eps: float, group
) -> torch.Tensor:
    """TEBN (the ``tebn`` op of :mod:`snnorm.backends.torch_backend`) with statistics over
    T·N·spatial of every rank: y[t] = p[t]·(γ x̂[t] + β)."""
    if group is None or not training:
        return torch_backend.tebn(
            x_seq, weight, bias, running_mean, running_var, scale, training=training, momentum=momentum, eps=eps
        )
    update = running_mean is not None
    y = sync_batch_norm(
        x_seq.flatten(0, 1), weight, bias, running_mean if update else None, running_var if update else None,
        momentum, eps, group,
    ).view(x_seq.shape)
    return y * scale.view(-1, *([1] * (y.dim() - 1)))


def sync_tab(
    x_seq, weight, bias, running_mean, running_var, p, *, training: bool, momentum, eps: float, prefix=None, group
):
    """TAB (the ``tab`` op of :mod:`snnorm.backends.torch_backend`) whose accumulated
    statistics of steps 0..t cover every rank's batch: the per-step statistics of all T
    steps travel in one pair of all-reduces (T·C channels), then combine in order."""
    if group is None or not training:
        return torch_backend.tab(
            x_seq, weight, bias, running_mean, running_var, p, training=training, momentum=momentum, eps=eps,
            prefix=prefix,
        )
    T, N, C = x_seq.shape[:3]
    per_step = x_seq.movedim(0, 1).reshape(N, T * C, -1)  # steps as channels: [N, T·C, spatial]
    step_mean, step_m2, count = global_batch_stats(per_step, group)
    n = float(count)
    total, mean, m2 = torch_backend.chan_prefix(n, step_mean.view(T, C), step_m2.view(T, C), prefix)
    if running_mean is not None:
        torch_backend.update_accumulated_running_stats(running_mean, running_var, total, mean, m2, momentum)
    y = torch_backend.tab_apply(x_seq, weight, bias, mean, m2 / total.unsqueeze(1), p, eps)
    return y, None if prefix is None else (float(total[-1]), mean[-1], m2[-1])


def sync_mpbn_lif(x_seq, v, weight, bias, running_mean, running_var, threshold, neuron, norm, stats, *, group):
    """MPBN-LIF (the ``mpbn_lif`` op of :mod:`snnorm.backends.torch_backend`) whose membrane
    BN uses, at every step t, the statistics of H[t] over every rank's batch."""
    if group is None or not stats.training:
        return torch_backend.mpbn_lif(x_seq, v, weight, bias, running_mean, running_var, threshold, neuron, norm, stats)
    update = running_mean is not None
    th = torch_backend.channel_view(threshold, x_seq[0])
    spikes = []
    for t, x in enumerate(x_seq):
        h = torch_backend.lif_charge(x, v, neuron)
        factor = stats.momentum if stats.momentum is not None else 1.0 / (stats.batches_tracked + t + 1)
        h_hat = sync_batch_norm(
            h, weight, bias, running_mean if update else None, running_var if update else None, factor, norm.eps, group
        )
        s = neuron.surrogate(h_hat - th)
        v = torch_backend.lif_reset(h_hat if norm.carry == "normalized" else h, s, th, neuron)
        spikes.append(s)
    return torch.stack(spikes), v


def _sync_ops(group) -> backends.OpTable:
    """The torch op table with the batch-statistics ops synchronised over ``group``."""
    return backends.OpTable(
        "torch",
        {
            "lif": torch_backend.lif,
            "mpbn_lif": functools.partial(sync_mpbn_lif, group=group),
            "mpbn_lif_folded": torch_backend.mpbn_lif_folded,
            "tebn": functools.partial(sync_tebn, group=group),
            "tab": functools.partial(sync_tab, group=group),
            # BN/tdBN and BNTT synchronise in their own (step) BN modules, never through these
            "batch_norm_seq": torch_backend.batch_norm_seq,
            "bntt": torch_backend.bntt,
        },
    )


# -- synchronised module classes -------------------------------------------------------


class _SyncMixin:
    """Shared by every synchronised class: torch backend only, the process group, and a
    check (before any state changes) that a training forward can synchronise."""

    supported_backends = ("torch",)
    _unsynced_class: type = nn.Module

    def _syncs(self) -> bool:
        """Whether this forward synchronises (training; eval never does, as torch's SyncBatchNorm)."""
        return self.training

    def _check_sync(self) -> None:
        if self._syncs():
            _active_group(self, strict=True)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", sync=True, process_group={self.__dict__.get('process_group')}"


class _SyncBatchNormMixin(_SyncMixin):
    """BatchNorm1d/2d/3d, tdBN and the per-timestep BNs of BNTT: the module's own forward
    with :func:`sync_batch_norm` in place of ``F.batch_norm``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        multi = isinstance(self, StepModule) and self.step_mode == "m"
        channel_dim = 2 if multi else 1
        self._check_bn_input(x, multi)
        check_batch_values(self, x, batch_stats=uses_batch_stats(self), channel_dim=channel_dim)
        self._check_sync()
        group = _active_group(self, strict=False)
        if group is None or not self._syncs():
            return _bn.batch_norm(self, x, channel_dim)  # exactly the original
        stats = resolve_running_stats(self)
        update = self.training and stats.mean is not None
        y = sync_batch_norm(
            x.flatten(0, 1) if multi else x, self.weight, self.bias, stats.mean if update else None,
            stats.var if update else None, stats.factor, self.eps, group,
        )
        return y.view(x.shape)


class _SyncOpsMixin(_SyncMixin):
    """TEBN and MPBN neurons: the module's own forward, with ``self.ops`` the torch op
    table whose batch-statistics op is synchronised."""

    def forward(self, *args, **kwargs):
        self._check_sync()  # before the forward touches running statistics or memories
        return super().forward(*args, **kwargs)

    @property
    def ops(self) -> backends.OpTable:
        return _sync_ops(_active_group(self, strict=False))


class _SyncMPBNMixin(_SyncOpsMixin):
    def _syncs(self) -> bool:
        return self.training and self.mpbn and not self.fold_bn


_SYNC_CLASSES: dict[type, type] = {}


def _mixin_for(cls: type) -> Optional[type]:
    if issubclass(cls, _SyncMixin):
        return None
    if issubclass(cls, (_bn._TemporalEffectiveBatchNormBase, _bn._TemporalAccumulatedBatchNormBase)):
        return _SyncOpsMixin
    if issubclass(cls, (_bn._BatchNormMixin, _bn._TimestepBatchNormMixin)):
        return _SyncBatchNormMixin
    if issubclass(cls, MPBNBaseNode):
        return _SyncMPBNMixin
    return None


def _sync_class(cls: type) -> type:
    """The synchronised subclass of ``cls`` (made once, registered in this module so that
    pickling a converted module finds it)."""
    sync_cls = _SYNC_CLASSES.get(cls)
    if sync_cls is None:
        mixin = _mixin_for(cls)
        name = f"Sync{cls.__name__}" if not cls.__name__.startswith("_") else f"_Sync{cls.__name__.lstrip('_')}"
        if name in globals():
            name = f"{name}_{len(_SYNC_CLASSES)}"
        sync_cls = type(name, (mixin, cls), {"__module__": __name__, "__qualname__": name, "_unsynced_class": cls})
        sync_cls.__doc__ = (
            f"{cls.__name__} with batch statistics synchronised across the ranks of a process group "
            f"(see :mod:`snnorm.distributed`).\n\n{cls.__doc__ or ''}"
        )
        _SYNC_CLASSES[cls] = sync_cls
        globals()[name] = sync_cls
    return sync_cls


def _predefine() -> None:
    from . import layer

    for name in (
        "BatchNorm1d", "BatchNorm2d", "BatchNorm3d",
        "ThresholdDependentBatchNorm1d", "ThresholdDependentBatchNorm2d", "ThresholdDependentBatchNorm3d",
        "TemporalEffectiveBatchNorm1d", "TemporalEffectiveBatchNorm2d", "TemporalEffectiveBatchNorm3d",
        "TemporalAccumulatedBatchNorm1d", "TemporalAccumulatedBatchNorm2d", "TemporalAccumulatedBatchNorm3d",
    ):
        _sync_class(getattr(layer, name))
    for cls in (_bn._TimestepBatchNorm1d, _bn._TimestepBatchNorm2d, _bn._TimestepBatchNorm3d):
        _sync_class(cls)
    from .neuron import MPBNLIFNode

    _sync_class(MPBNLIFNode)


_predefine()


def is_synchronized(module: nn.Module) -> bool:
    """Whether ``module`` is a synchronised module made by :func:`convert_sync_batchnorm`."""
    return isinstance(module, _SyncMixin)


def _targets(net: nn.Module) -> tuple[list[tuple[str, nn.Module]], list[str]]:
    """(BN-like snnorm modules to convert, names of plain torch BN layers left alone)."""
    targets, plain = [], []

    def visit(name: str, module: nn.Module) -> None:
        if _mixin_for(type(module)) is not None or isinstance(module, _SyncMixin):
            targets.append((name, module))
            if isinstance(module, MPBNBaseNode):
                return  # its vbn holds the membrane BN's parameters; it is never called
        elif isinstance(module, _BatchNorm) and not isinstance(module, nn.SyncBatchNorm):
            plain.append(f"{name or '<root>'} ({type(module).__name__})")
        for child_name, child in module.named_children():
            visit(f"{name}.{child_name}" if name else child_name, child)

    visit("", net)
    return targets, plain


def convert_sync_batchnorm(net: nn.Module, process_group=None) -> nn.Module:
    """Synchronise the batch statistics of every BN-like snnorm layer of ``net``, in place.

    Converts multi-step ``BatchNorm1d/2d/3d``, tdBN, TEBN, TAB, BNTT (``BatchNormThroughTime*``
    and snntorch's ``BatchNormTT*``: each per-timestep BN) and MPBN neurons (the membrane
    BN, per timestep) to synchronised subclasses; see the module documentation for the
    equations. Returns ``net`` itself (modules keep identity, parameters, buffers and
    ``state_dict`` keys). ``process_group`` (default: the whole world) is the group to
    synchronise over; converting again replaces it.

    Call it before wrapping the network in ``DistributedDataParallel``. Synchronised
    modules run the torch backend only.

    :raises TypeError: ``net`` is not an ``nn.Module`` or ``process_group`` not a ProcessGroup.
    :raises ValueError: a module to convert uses another backend than torch (nothing is
        converted then).
    """
    if not isinstance(net, nn.Module):
        raise TypeError(f"convert_sync_batchnorm: expected an nn.Module, got {type(net).__name__}")
    _check_process_group(process_group)
    targets, plain = _targets(net)
    wrong_backend = [
        f"{name or '<root>'} ({type(m).__name__}, backend={m.backend!r})"
        for name, m in targets
        if getattr(m, "backend", "torch") != "torch"
    ]
    if wrong_backend:
        raise ValueError(
            "convert_sync_batchnorm: synchronised modules support only the 'torch' backend, but "
            f"{', '.join(wrong_backend)} use another; call snnorm.functional.set_backend(net, 'torch') first"
        )
    if plain:
        warnings.warn(
            "convert_sync_batchnorm: these torch.nn batch-norm layers are not snnorm layers and are left "
            f"unsynchronised: {', '.join(plain)} (use snnorm.layer.BatchNorm*d, a drop-in replacement)",
            stacklevel=2,
        )
    for _, module in targets:
        if not isinstance(module, _SyncMixin):
            module.__class__ = _sync_class(type(module))
        module.__dict__["process_group"] = process_group
    return net


def revert_sync_batchnorm(net: nn.Module) -> nn.Module:
    """Undo :func:`convert_sync_batchnorm` in place (modules get their original classes back)."""
    if not isinstance(net, nn.Module):
        raise TypeError(f"revert_sync_batchnorm: expected an nn.Module, got {type(net).__name__}")
    for module in net.modules():
        if isinstance(module, _SyncMixin):
            module.__class__ = module._unsynced_class
            module.__dict__.pop("process_group", None)
    return net
