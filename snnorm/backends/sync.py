r"""The statistics pipeline's cross-rank hook: synchronised batch statistics (DESIGN.md §8).

Every batch-statistics norm reduces per-(t, c) partials — (count, mean, M2) of each step —
over its grouping (all steps, each step, the prefix 0..t). Across the ranks of a process
group the same partials are gathered here, *before* the grouping, and combined in rank
order with Chan's formula; the backward's per-(t, c) sums Σg, Σg·x̂ are all-reduced. So a
synchronised layer moves O(T·C) values per stage, never O(elements), and one hook serves
every norm on both backends:

* the torch backend combines the gathered partials with differentiable torch ops
  (:func:`snnorm.backends.torch_backend.synced_statistics`); the gather's backward sums every rank's gradient of this
  rank's slice, so ∂x includes the path through the statistics of every rank's batch;
* the triton backend passes the group's name into its ``torch.library`` ops, which gather
  between the partials and the reduce kernel and all-reduce the gradient sums between the
  backward's reduce and coefficient kernels (:mod:`snnorm.kernels.bn_pipeline`); the
  MPBN-LIF op does both once per step, between its pipelined launches.

Combining rank partials (n_a, μ_a, M2_a) and (n_b, μ_b, M2_b), in rank order (Chan, Golub &
LeVeque, 1983)::

    n = n_a + n_b,  δ = μ_b − μ_a,  μ = μ_a + δ·n_b/n,  M2 = M2_a + M2_b + δ²·n_a·n_b/n

Counts travel with the partials (float64, exact), so uneven per-rank batches combine
exactly, and a rank with an empty batch (count 0, mean 0, M2 0) adds nothing: its rank
joins every collective, and the group's statistics are those of the other ranks' samples.

Before any of a call's collectives, :meth:`StatsSync.check_call` all-gathers a fixed-size
header (layer, T, C, n): 4 int64 per rank, one more small collective per synchronised
layer call. Every rank then knows every rank's shape and count, so a change of T or C on
one rank (at any step), an all-empty step or a single value per channel over the group
raise the same error on every rank instead of a hang or a gloo abort on collectives of
different sizes. Parameter gradients stay per rank (DistributedDataParallel averages them); the
gradient that reaches x through the statistics is that of the sum of every rank's loss,
as torch's ``SyncBatchNorm``.
"""

from __future__ import annotations

import contextlib
import zlib
from typing import Iterator, Optional

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["StatsSync", "SyncShapeError", "gather_step_partials", "combine_rank_partials", "count_collectives"]

#: the wire dtype of partials and gradient sums: counts are exact, fp32/fp16 values convert exactly
WIRE_DTYPE = torch.float64

_METERS: list[list] = []


@contextlib.contextmanager
def count_collectives() -> Iterator[list]:
    """Records every collective the hook issues in this process as ``(kind, bytes)`` into the
    yielded list (perf/ and the O(T·C) test read it): ``all_gather`` (the bytes this rank
    contributes), ``all_reduce``, ``reduce_scatter`` (the backward of a differentiable
    gather: the gradient of every rank's rows) and ``header`` (the per-call all-gather of
    :meth:`StatsSync.check_call`: 4 int64 per rank)."""
    log: list = []
    _METERS.append(log)
    try:
        yield log
    finally:
        _METERS.remove(log)


def _record(kind: str, tensor: Tensor) -> None:
    for log in _METERS:
        log.append((kind, tensor.numel() * tensor.element_size()))


class SyncShapeError(ValueError):
    """The ranks of a synchronised layer disagree on T or C (raised on every rank)."""


def _layer_id(name: str) -> int:
    """A stable int63 for a layer's class name (the same in every process, unlike ``hash``)."""
    return zlib.crc32(name.encode()) & 0x7FFFFFFF


class StatsSync:
    """One process group's collectives on per-(t, c) statistics.

    ``gather`` is differentiable (the torch backend's path); the triton ops, which cannot
    take a process group as an argument, carry :attr:`group_name` and call
    :meth:`from_name` inside.
    """

    def __init__(self, group: dist.ProcessGroup) -> None:
        self.group = group
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)

    @property
    def group_name(self) -> str:
        return self.group.group_name

    @staticmethod
    def from_name(name: str) -> Optional["StatsSync"]:
        """The hook of the group named ``name`` (an op argument), or None for ``""``."""
        if not name:
            return None
        from torch.distributed.distributed_c10d import _resolve_process_group

        return StatsSync(_resolve_process_group(name))

    def gather(self, values: Tensor) -> Tensor:
        """``[K]`` from every rank → ``[world, K]`` in rank order (one all-gather).

        Differentiable: the backward sums, over ranks, the gradients of this rank's row."""
        values = values.contiguous()
        _record("all_gather", values)
        if torch.is_grad_enabled() and values.requires_grad:
            import torch.distributed._functional_collectives as funcol

            # renamed in torch 2.12 (the device machine has 2.11)
            gather = getattr(funcol, "all_gather_single_autograd", None) or funcol.all_gather_tensor_autograd
            out = funcol.wait_tensor(gather(values, 0, self.group)).view(self.world, -1)
            if _METERS:  # its backward reduce-scatters the gradient of every rank's rows
                out.register_hook(lambda grad: _record("reduce_scatter", grad))
            return out
        return self._all_gather(values.reshape(-1))

    def all_reduce(self, values: Tensor) -> Tensor:
        """Σ over ranks of ``values`` (a new tensor; not differentiable: the triton backward's sums)."""
        out = values.contiguous().clone()
        _record("all_reduce", out)
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=self.group)
        return out

    def check_call(self, what: str, *, layer: str, T: int, C: int, n: int, per_step: bool) -> int:
        """The per-call header: one all-gather of four int64 per rank — (layer, T, C, n) — sent
        before any of the call's variable-size collectives, so every rank learns every rank's
        shape and batch and raises the same error, instead of a hang or a gloo abort at a
        collective of mismatched size. Returns the group's count N·spatial (Σ n).

        ``layer`` names the layer class (ranks must call the same synchronised layers in the
        same order), ``T``, ``C`` its input's steps and channels, ``n`` this rank's values per
        (step, channel): N·spatial, 0 for an empty batch. ``per_step``: the layer's smallest
        statistic is over one step (BNTT, TAB's first prefix, MPBN), else over all T steps.

        :raises SyncShapeError: the ranks disagree on the layer, T or C (every rank).
        :raises ValueError: every rank's batch is empty, or the group's batch has a single
            value per channel (every rank: the counts are in the header).
        """
        local = torch.tensor([_layer_id(layer), T, C, n], dtype=torch.int64)
        device = self._device()
        if device.type != "cpu":
            local = local.to(device, non_blocking=True)
        _record("header", local)
        rows = [tuple(row) for row in self._all_gather(local).tolist()]
        if any(row[:3] != rows[0][:3] for row in rows):
            per_rank = "; ".join(f"rank {r}: T={row[1]}, C={row[2]}" for r, row in enumerate(rows))
            layers = "" if all(row[0] == rows[0][0] for row in rows) else (
                " (the ranks reached different synchronised layers: every rank must call the same synchronised "
                "layers in the same order)")
            raise SyncShapeError(
                f"{what}: the ranks of its process group must agree on T and C at every call to synchronise "
                f"batch statistics, got {per_rank}{layers}"
            )
        total = sum(row[3] for row in rows)
        counts = ", ".join(str(row[3]) for row in rows)
        if total == 0:
            raise ValueError(
                f"{what}: every rank of its process group has an empty batch (values per channel and step on "
                f"ranks 0..{len(rows) - 1}: {counts}); synchronised batch statistics need at least one rank with "
                "samples: skip the step on every rank, or use eval mode"
            )
        if total * (1 if per_step else T) == 1:
            raise ValueError(
                f"{what}: batch statistics need more than one value per channel, got 1 over the whole process "
                f"group (values per channel{' and step' if per_step else ''} on ranks 0..{len(rows) - 1}: "
                f"{counts}); use a larger batch or eval mode"
            )
        return total

    def _all_gather(self, flat: Tensor) -> Tensor:
        """``[K]`` → ``[world, K]`` (the c10d call: gloo wants a flat output)."""
        out = flat.new_empty(self.world * flat.numel())
        gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # renamed in torch 2.12
        gather(out, flat, group=self.group)
        return out.view(self.world, -1)

    def _device(self) -> torch.device:
        # nccl collectives need CUDA tensors, gloo CPU ones
        backend = dist.get_backend(self.group)
        if backend == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")


def gather_step_partials(sync: StatsSync, count: Tensor, mean: Tensor, m2: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Every rank's per-step partials in one all-gather: ``count [T]``, ``mean``/``m2``
    ``[T, C]`` → ``[W, T]``, ``[W, T, C]``, ``[W, T, C]`` (mean's dtype; counts float64)."""
    T, C = mean.shape
    packed = torch.cat([count.to(WIRE_DTYPE).reshape(T), mean.to(WIRE_DTYPE).reshape(-1), m2.to(WIRE_DTYPE).reshape(-1)])
    everyone = sync.gather(packed)
    counts = everyone[:, :T].detach()
    means = everyone[:, T:T + T * C].reshape(sync.world, T, C).to(mean.dtype)
    m2s = everyone[:, T + T * C:].reshape(sync.world, T, C).to(m2.dtype)
    return counts, means, m2s


def combine_rank_partials(count: Tensor, mean: Tensor, m2: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Chan's combination over the rank axis, in rank order: ``[W, T]``, ``[W, T, C]`` ×2 →
    ``count [T]`` (float64), ``mean``, ``m2`` ``[T, C]``. Differentiable in mean and m2; a
    rank with an empty batch (count 0) adds nothing (:func:`snnorm._welford.chan_merge`)."""
    from .._welford import chan_merge

    n, mu, s = count[0], mean[0], m2[0]
    for r in range(1, count.shape[0]):
        n, mu, s = chan_merge(n, mu, s, count[r], mean[r], m2[r])
    return n, mu, s
