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
exactly. Parameter gradients stay per rank (DistributedDataParallel averages them); the
gradient that reaches x through the statistics is that of the sum of every rank's loss,
as torch's ``SyncBatchNorm``.
"""

from __future__ import annotations

import contextlib
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
    contributes), ``all_reduce``, and ``reduce_scatter`` (the backward of a differentiable
    gather: the gradient of every rank's rows)."""
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

    def check_shapes(self, what: str, **dims: int) -> None:
        """One small all-gather of ``dims`` (e.g. T, C): SyncShapeError, on every rank, naming
        each rank's values when they differ (instead of a hang or a silent mix later)."""
        local = torch.tensor(list(dims.values()), dtype=torch.int64, device=self._device())
        _record("all_gather", local)
        rows = self._all_gather(local).tolist()
        if any(row != rows[0] for row in rows):
            per_rank = "; ".join(
                f"rank {r}: " + ", ".join(f"{k}={v}" for k, v in zip(dims, row)) for r, row in enumerate(rows)
            )
            raise SyncShapeError(
                f"{what}: the ranks of its process group must agree on {', '.join(dims)} to synchronise batch "
                f"statistics, got {per_rank}"
            )

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
