r"""Welford/Chan statistics on the host: the one place where (count, mean, M2) triples merge.

A set of values is summarised by its count n, mean μ and M2 = Σ (x − μ)² (never Σx, Σx²,
which cancel catastrophically when |μ| ≫ σ). Two sets a, b merge with Chan et al.'s
pairwise formula (:func:`chan_merge`)::

    n = n_a + n_b,   δ = μ_b − μ_a
    μ = μ_a + δ·n_b/n,   M2 = M2_a + M2_b + δ²·n_a·n_b/n

and many at once with the multi-way form (:func:`chan_combine`), centred on the first
part's mean (the reference shift: a plain Σ n_p μ_p would lose the digits of a small
spread around a large mean)::

    n = Σ n_p,   μ = μ_0 + Σ n_p (μ_p − μ_0)/n,   M2 = Σ M2_p + Σ n_p (μ_p − μ)²

Empty parts (n = 0: a rank with no batch, a step of no samples) add nothing: merging with
one returns the other part, never 0/0 = NaN, and the union of empty parts is empty
(n = 0, μ = 0, M2 = 0). The Triton kernels run the same formulas on the device
(:mod:`snnorm.kernels._device`). Pure torch; differentiable in the means and M2s.

Used by the torch reference (``torch_backend.chan_prefix``), the synchronisation hook
(``sync.combine_rank_partials``) and the synchronised MPBN launcher
(``kernels.mpbn_lif_train.local_step_statistics``).
"""

from __future__ import annotations

from typing import Union

import torch
from torch import Tensor

__all__ = ["chan_merge", "chan_combine"]

Count = Union[int, float, Tensor]


def _weights(count_a: Count, count_b: Count) -> tuple[Count, Count, Count]:
    """(n, n_b/n, n_a·n_b/n), with n clamped to ≥ 1 in the divisions (counts are whole numbers,
    so the clamp changes nothing unless both parts are empty, where both weights are 0)."""
    total = count_a + count_b
    if isinstance(total, Tensor):
        safe = total.clamp(min=1)
    else:
        safe = max(total, 1)
    return total, count_b / safe, count_a * count_b / safe


def chan_merge(
    count_a: Count, mean_a: Tensor, m2_a: Tensor, count_b: Count, mean_b: Tensor, m2_b: Tensor
) -> tuple[Count, Tensor, Tensor]:
    """(count, mean, M2) of the union of sets a and b (Chan et al.'s pairwise formula).

    Counts are numbers or tensors that broadcast against the means after a trailing channel
    axis (a ``[T]`` count with ``[T, C]`` means). A part with count 0 adds nothing: merged
    with an empty a, the result is b's mean and M2 (δ·1 added to a's mean of 0), and an empty
    b leaves a as it was.
    """
    total, w_b, w_ab = _weights(count_a, count_b)
    if isinstance(w_b, Tensor) and w_b.dim() > 0 and mean_a.dim() > w_b.dim():
        w_b, w_ab = w_b.unsqueeze(-1), w_ab.unsqueeze(-1)
    if isinstance(w_b, Tensor):
        w_b, w_ab = w_b.to(mean_a.dtype), w_ab.to(mean_a.dtype)
    delta = mean_b - mean_a
    return total, mean_a + delta * w_b, m2_a + m2_b + delta * delta * w_ab


def chan_combine(counts: Tensor, means: Tensor, m2s: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(count, mean, M2) of the union of the parts along dim 0 (the multi-way formula,
    centred on part 0's mean), in the means' dtype.

    ``counts`` ``[P]``, ``means`` and ``m2s`` ``[P, *channels]``. Returns ``count`` (a
    0-dim tensor) and ``mean``, ``M2`` ``[*channels]``. Empty parts add nothing; all parts
    empty give (0, 0, 0) (the reference shift drops out: μ_0 + 0 is replaced by 0).
    """
    if means.shape[0] == 0:  # no parts (no tile: an empty batch): the empty set
        return counts.sum(), means.new_zeros(means.shape[1:]), m2s.new_zeros(m2s.shape[1:])
    n_p = counts.to(means.dtype).reshape(-1, *([1] * (means.dim() - 1)))
    n = n_p.sum(dim=0)
    ref = means[0]
    dev = means - ref
    shift = (n_p * dev).sum(dim=0) / n.clamp(min=1)
    m2 = m2s.sum(dim=0) + (n_p * (dev - shift) ** 2).sum(dim=0)
    mean = torch.where(n > 0, ref + shift, torch.zeros_like(ref))
    return counts.sum(), mean, m2
