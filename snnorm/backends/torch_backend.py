"""The reference backend: plain PyTorch, one readable loop per op.

This file is the executable specification of every op. Other backends (Triton) must
fill the same slots with the same signatures and agree with these numerically.

Shapes: ``x_seq`` is ``[T, N, C, *spatial]`` (spatial may be empty), ``v`` is the
membrane ``[N, C, *spatial]``; per-channel tensors are ``[C]``. A threshold is a float
or a ``[C]`` tensor (learnable / folded thresholds). Ops never validate user input:
modules do that before calling them.

LIF charge (spikingjelly ``lif_charge``), with v_r = v_reset or 0 for soft reset::

    decay_input:      h = v + (x − (v − v_r)) / τ
    not decay_input:  h = v − (v − v_r) / τ + x

Fire ``s = Θ(u − θ)`` with the surrogate's backward; reset
``v = s·v_reset + (1 − s)·u`` (hard) or ``v = u − s·θ`` (soft, v_reset None), where s is
detached in the reset when ``detach_reset``.

The neuron ops take their constants as bundles (:mod:`snnorm.params`): ``neuron``
(:class:`~snnorm.params.LIFParameters`: τ, decay_input, v_reset, detach_reset, surrogate),
``norm`` (:class:`~snnorm.params.MPBNParameters`: ε, carry), ``stats``
(:class:`~snnorm.params.BNStatistics`) and ``adapt`` (:class:`~snnorm.params.AdaptParameters`).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from ..params import AdaptParameters, BNStatistics, LIFParameters, MPBNParameters
from .sync import StatsSync, combine_rank_partials, gather_step_partials

def channel_view(value, like: torch.Tensor):
    """A float stays a float; a [C] tensor becomes [1, C, 1, ...] to broadcast with ``like``."""
    if isinstance(value, torch.Tensor):
        return value.view(1, -1, *([1] * (like.dim() - 2)))
    return value


def lif_charge(x, v, neuron: LIFParameters):
    v_r = neuron.v_rest
    if neuron.decay_input:
        return v + (x - (v - v_r)) / neuron.tau
    return v - (v - v_r) / neuron.tau + x


def lif_reset(u, spike, threshold, neuron: LIFParameters):
    if neuron.detach_reset:
        spike = spike.detach()
    if neuron.v_reset is None:
        return u - spike * threshold
    return spike * neuron.v_reset + (1.0 - spike) * u


def lif(x_seq: torch.Tensor, v: torch.Tensor, threshold, neuron: LIFParameters) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain LIF over T steps. Returns (spike_seq [T, N, C, *], v after the last step)."""
    th = channel_view(threshold, x_seq[0])
    spikes = []
    for x in x_seq:
        h = lif_charge(x, v, neuron)
        s = neuron.surrogate(h - th)
        v = lif_reset(h, s, th, neuron)
        spikes.append(s)
    return torch.stack(spikes), v


def mpbn_lif(
    x_seq: torch.Tensor,
    v: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    threshold,
    neuron: LIFParameters,
    norm: MPBNParameters,
    stats: BNStatistics,
    *,
    sync: StatsSync | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """LIF with batch-normalised membrane (MPBN, Guo et al., ICCV 2023, arXiv 2308.08359).

    Per step t::

        h = charge(v, x[t]);  ĥ = γ (h − μ) / √(σ² + ε) + β;  s = Θ(ĥ − θ)
        v = reset(ĥ, s)   if norm.carry == "normalized"   (spikingjelly)
        v = reset(h, s)   if norm.carry == "raw"          (the MPBN paper's code)

    In training (``stats.training``, or without running statistics) μ, σ² are the batch
    statistics of h over every dim but C at that step, and the running statistics (if given)
    are updated in place at every step with factor ``stats.momentum`` (or
    1/(batches_tracked + t + 1) when it is None, torch's cumulative average), unbiased
    variance. In eval μ, σ² are the running statistics. The caller counts
    ``num_batches_tracked`` (+T). With ``sync`` (training) the statistics of H[t] pool every
    rank's batch: one gather per step (:func:`synced_norm`, grouping "each").
    """
    th = channel_view(threshold, x_seq[0])
    use_batch_stats = stats.training or running_mean is None
    spikes = []
    for t, x in enumerate(x_seq):
        h = lif_charge(x, v, neuron)
        factor = stats.momentum if stats.momentum is not None else 1.0 / (stats.batches_tracked + t + 1)
        if sync is not None and use_batch_stats:
            running = (running_mean.view(1, -1), running_var.view(1, -1)) if running_mean is not None else (None, None)
            h_hat = synced_norm("each", h.unsqueeze(0), weight, bias, *running, None, momentum=[factor],
                                eps=norm.eps, sync=sync)[0][0].to(h.dtype)
        else:
            h_hat = F.batch_norm(h, running_mean, running_var, weight, bias, use_batch_stats, factor, norm.eps)
        s = neuron.surrogate(h_hat - th)
        v = lif_reset(h_hat if norm.carry == "normalized" else h, s, th, neuron)
        spikes.append(s)
    return torch.stack(spikes), v


def folded_threshold(threshold, mu, std, gamma, beta) -> torch.Tensor:
    """θ' = μ + (θ − β)·std/γ with std = √(σ² + ε): the raw-membrane threshold equivalent to ĥ ≥ θ."""
    return (threshold - beta) * std / gamma + mu


def mpbn_lif_folded(
    x_seq: torch.Tensor,
    v: torch.Tensor,
    mu: torch.Tensor,
    sigma2: torch.Tensor,
    gamma: torch.Tensor,
    beta: torch.Tensor,
    threshold,
    neuron: LIFParameters,
    norm: MPBNParameters,
    adapt: AdaptParameters,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """MPBN-LIF after threshold re-parameterisation (the BN folded into the threshold).

    Per step t (m = adapt.momentum)::

        h = charge(v, x[t])
        (test-time threshold modulation, Zhao et al., arXiv 2505.05375)
        adapt.mode == "batch":   μ, σ² = mean_b(h), var_b(h)            (unbiased, per channel)
        adapt.mode == "running": μ ← (1 − m)μ + m·mean_b(h), σ² likewise; m ← max(m·decay, min_momentum)
        θ' = μ + (θ − β)·√(σ² + ε)/γ
        s = Θ(sign(γ)·(h − θ'))                  (⇔ ĥ ≥ θ; the comparison flips for γ < 0)
        v = reset(γ(h − μ)/√(σ² + ε) + β, s)     if norm.carry == "normalized"
        v = reset(h, s)                          if norm.carry == "raw"

    With adapt.mode == "none" this equals :func:`mpbn_lif` in eval mode with running stats
    μ, σ² in real arithmetic; in floating point a spike can differ only where h is
    within rounding (a few ulps) of θ' (see ``MPBNBaseNode``). Statistics with a batch of one
    sample and no spatial extent are skipped (variance undefined). Returns
    (spike_seq, v, μ, σ², m) with the updated statistics (new tensors, detached).
    """
    th = channel_view(threshold, x_seq[0])
    sign = channel_view(torch.sign(gamma), x_seq[0])
    reduce_dims = [0, *range(2, x_seq.dim() - 1)]
    momentum = adapt.momentum
    spikes = []
    for x in x_seq:
        h = lif_charge(x, v, neuron)
        if adapt.mode != "none" and h.numel() // h.shape[1] > 1:
            batch_mu = h.detach().mean(dim=reduce_dims)
            batch_var = h.detach().var(dim=reduce_dims, unbiased=True)
            if adapt.mode == "running":
                mu = mu * (1 - momentum) + batch_mu * momentum
                sigma2 = sigma2 * (1 - momentum) + batch_var * momentum
                momentum = max(momentum * adapt.decay, adapt.min_momentum)
            else:
                mu, sigma2 = batch_mu, batch_var
        std = torch.sqrt(sigma2 + norm.eps)
        mu_c, std_c = channel_view(mu, h), channel_view(std, h)
        theta = channel_view(folded_threshold(threshold, mu, std, gamma, beta), h)
        s = neuron.surrogate(sign * (h - theta))
        if norm.carry == "normalized":
            u = (h - mu_c) / std_c * channel_view(gamma, h) + channel_view(beta, h)
        else:
            u = h
        v = lif_reset(u, s, th, neuron)
        spikes.append(s)
    return torch.stack(spikes), v, mu, sigma2, momentum


def tebn(
    x_seq: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    scale: torch.Tensor,
    *,
    training: bool,
    momentum: float,
    eps: float,
    sync: StatsSync | None = None,
) -> torch.Tensor:
    """Temporal effective BN (Duan et al., NeurIPS 2022): y[t] = p[t]·(γ x̂[t] + β).

    x̂ uses statistics shared over T·N·spatial (batch statistics in training or without
    running stats, running statistics in eval); running stats are updated in place with
    factor ``momentum`` (resolved by the caller). ``scale`` is p, shape [T]. With ``sync``
    (training) the statistics pool every rank's batch (:func:`synced_norm`).
    """
    use_batch_stats = training or running_mean is None
    if sync is not None and use_batch_stats:
        y, _ = synced_norm("all", x_seq, weight, bias, running_mean, running_var, scale, momentum=[momentum], eps=eps,
                           sync=sync)
        return y.to(torch.promote_types(x_seq.dtype, scale.dtype))
    y = F.batch_norm(x_seq.flatten(0, 1), running_mean, running_var, weight, bias, use_batch_stats, momentum, eps)
    y = y.view(x_seq.shape)
    return y * scale.view(-1, *([1] * (y.dim() - 1)))


def tab_step_stats(x_seq: torch.Tensor) -> tuple[int, torch.Tensor, torch.Tensor]:
    """Per-step partial statistics of ``x_seq`` ``[T, N, C, *]``: (n, mean [T, C], M2 [T, C]).

    n = N·spatial values per (t, c); M2 = Σ (x − mean)², computed in float32 at least
    (float64 for float64 input). Differentiable in ``x_seq``. An empty batch (n = 0) gives
    mean = M2 = 0: a partial that adds nothing when combined.
    """
    acc = torch.promote_types(x_seq.dtype, torch.float32)
    x = x_seq.to(acc)
    n = x.numel() // max(x.shape[0] * x.shape[2], 1)
    if n == 0:
        zeros = x.new_zeros((x.shape[0], x.shape[2])) + 0.0 * x.sum()  # keeps x in the graph
        return 0, zeros, zeros
    dims = (1, *range(3, x.dim()))  # N and spatial: per (t, c)
    mean = x.mean(dim=dims)
    m2 = ((x - mean.view(tab_scale_shape(x))) ** 2).sum(dim=dims)
    return n, mean, m2


def synced_statistics(sync: StatsSync, x_seq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-step statistics of ``x_seq`` ``[T, N, C, *]`` over the batches of every rank:
    ``count [T]`` (float64), ``mean``, ``m2`` ``[T, C]`` (float32 at least). This rank's
    partials (:func:`tab_step_stats`) gathered and combined in rank order; differentiable in
    ``x_seq`` (the grouping reduce comes after)."""
    n, mean, m2 = tab_step_stats(x_seq)
    count = torch.full((x_seq.shape[0],), float(n), dtype=torch.float64, device=x_seq.device)
    return combine_rank_partials(*gather_step_partials(sync, count, mean, m2))


def chan_prefix(
    n: int,
    mean: torch.Tensor,
    m2: torch.Tensor,
    prefix: tuple | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Prefix statistics of the steps so far: Chan et al.'s pairwise combination, in order.

    ``mean``, ``m2`` are the per-step partials ``[T, C]`` of n values each; ``prefix`` is
    (count, mean [C], M2 [C]) of the steps before them, or None. Returns (count [T],
    mean [T, C], M2 [T, C]) of steps 0..t for every t::

        count' = count + n,   δ = mean_t − mean
        mean'  = mean + δ·n/count',   M2' = M2 + M2_t + δ²·count·n/count'

    Differentiable in the partials and in ``prefix``. The merge is :func:`snnorm._welford.chan_merge`.
    """
    from .._welford import chan_merge

    count0, run_mean, run_m2 = prefix if prefix is not None else (0, None, None)  # (0, None, None): empty
    count, means, m2s = count0, [], []
    for mean_t, m2_t in zip(mean, m2):
        if run_mean is None:
            count, run_mean, run_m2 = n, mean_t, m2_t
        else:
            count, run_mean, run_m2 = chan_merge(count, run_mean, run_m2, n, mean_t, m2_t)
        means.append(run_mean)
        m2s.append(run_m2)
    # count after step t: count0 + n·(t + 1), exact in float64. Built on the device from a factory
    # and arithmetic (``n`` and ``count0`` may be device scalars): no host read, no host copy
    steps = torch.arange(1, mean.shape[0] + 1, dtype=torch.float64, device=mean.device)
    return (steps * n + count0).to(mean.dtype), torch.stack(means), torch.stack(m2s)


def update_accumulated_running_stats(
    running_mean,
    running_var,
    count: torch.Tensor,
    mean: torch.Tensor,
    m2: torch.Tensor,
    momentum: Sequence[float],
) -> None:
    """Running statistics per statistics row, in place: r_μ[t] ← (1 − m_t)·r_μ[t] + m_t·μ_t and
    r_σ²[t] ← (1 − m_t)·r_σ²[t] + m_t·M2_t/(n_t − 1) (unbiased, as torch's BN).

    ``running_mean``/``running_var``: a ``[rows, C]`` tensor or a sequence of ``rows`` ``[C]``
    buffers (BNTT's steps); ``count`` ``[rows]``, ``mean``, ``m2`` ``[rows, C]``."""
    with torch.no_grad():
        for t, (r_mean, r_var) in enumerate(zip(running_mean, running_var)):
            factor = float(momentum[t])
            unbiased = m2[t] / (count[t] - 1)
            r_mean.mul_(1 - factor).add_((factor * mean[t]).to(r_mean.dtype))
            r_var.mul_(1 - factor).add_((factor * unbiased).to(r_var.dtype))


def tab_scale_shape(x_seq: torch.Tensor) -> tuple[int, ...]:
    """View shape that broadcasts a per-step, per-channel [T, C] tensor over [T, N, C, *spatial]."""
    return (x_seq.shape[0], 1, -1, *([1] * (x_seq.dim() - 3)))


def tab(
    x_seq: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    p: torch.Tensor,
    *,
    training: bool,
    momentum: Sequence[float],
    eps: float,
    prefix: tuple | None = None,
    sync: StatsSync | None = None,
) -> tuple[torch.Tensor, tuple | None]:
    """Temporal accumulated BN (TAB; Jiang et al., ICLR 2024), O(T).

    Step t is normalised with the statistics of every step up to and including it::

        μ_t, σ²_t = mean and biased variance of x[0..t] per channel (n_t = (t+1)·N·spatial)
        y_t = p_t²·(γ_t (x_t − μ_t)/√(σ²_t + ε) + β_t)

    The prefix statistics come from per-step partials combined in order
    (:func:`chan_prefix`), so the whole sequence costs O(T), not the official code's
    O(T²); gradients flow through μ_t, σ²_t into every earlier step. Per-step tensors:
    ``weight``, ``bias``, running statistics ``[T, C]`` (or None), ``p`` ``[T]``,
    ``momentum`` T factors (resolved by the caller). In training, running statistics are
    updated in place per step (:func:`update_accumulated_running_stats`). In eval (with
    running statistics) step t uses r_μ[t], r_σ²[t].

    ``prefix=None``: ``x_seq`` is a whole sequence; returns ``(y, None)``. Otherwise
    ``x_seq`` continues a sequence (single-step mode: steps t0..t0+T−1) and ``prefix`` =
    (count, mean [C], M2 [C]) holds the statistics of steps 0..t0−1 (``(0, None, None)``
    at t0 = 0); returns ``(y, prefix')`` with the statistics after the chunk (differentiable,
    so the next step's gradient reaches these steps), or ``(y, prefix)`` unchanged when
    running statistics normalise. With ``sync`` (batch statistics) each step's partials
    pool every rank's batch before the prefix combination (:func:`synced_norm`).
    """
    if sync is not None and (training or running_mean is None):
        track = training and running_mean is not None
        y, (count, mean, m2) = synced_norm(
            "prefix", x_seq, weight, bias, running_mean if track else None, running_var if track else None, p * p,
            momentum=momentum, eps=eps, sync=sync, prefix=prefix,
        )
        state = None if prefix is None else (float(count[-1]), mean[-1], m2[-1])
        return y.to(torch.promote_types(x_seq.dtype, p.dtype)), state
    if training or running_mean is None:
        n, step_mean, step_m2 = tab_step_stats(x_seq)
        count, mean, m2 = chan_prefix(n, step_mean, step_m2, prefix)
        var = m2 / count.unsqueeze(1)
        if training and running_mean is not None:
            update_accumulated_running_stats(running_mean, running_var, count, mean, m2, momentum)
        state = None if prefix is None else (float(count[-1]), mean[-1], m2[-1])
    else:
        mean, var, state = running_mean, running_var, prefix
    return tab_apply(x_seq, weight, bias, mean, var, p, eps), state


def tab_apply(x_seq, weight, bias, mean, var, p, eps: float) -> torch.Tensor:
    """y_t = p_t²·(γ_t (x_t − μ_t)/√(σ²_t + ε) + β_t) with per-step ``[T, C]`` μ, σ², γ, β."""
    return scale_apply(x_seq, weight, bias, mean, var, p * p, eps).to(torch.promote_types(x_seq.dtype, p.dtype))


def scale_apply(x_seq, weight, bias, mean, var, s, eps) -> torch.Tensor:
    """y_t = s_t·(γ (x_t − μ)/√(σ² + ε) + β): the pipeline's coefficient and apply stages.

    μ, σ², γ, β have one row ``[C]`` (shared by every step) or T rows ``[T, C]``; ``s`` is the
    per-step scale ``[T]`` or None (1); ``eps`` a float or a ``[rows, 1]`` tensor. Centred
    first (x − μ), so it stays precise when |μ| ≫ σ. Returns the statistics' dtype."""
    T, C = x_seq.shape[0], x_seq.shape[2]

    def rows(t: torch.Tensor) -> torch.Tensor:  # [rows, C] → broadcastable over [T, N, C, *]
        return t.reshape(-1, 1, C, *([1] * (x_seq.dim() - 3)))

    scale = torch.rsqrt(var.reshape(-1, C) + eps)
    shift = bias.reshape(-1, C) if bias is not None else None
    if s is not None:
        scale = s.view(T, 1) * scale
        shift = s.view(T, 1) * shift if shift is not None else None
    if weight is not None:
        scale = scale * weight.reshape(-1, C)
    y = (x_seq.to(mean.dtype) - rows(mean)) * rows(scale)
    return y + rows(shift) if shift is not None else y


def synced_norm(
    grouping: str,
    x_seq: torch.Tensor,
    weight,
    bias,
    running_mean,
    running_var,
    s,
    *,
    momentum: Sequence[float],
    eps,
    sync: StatsSync,
    prefix: tuple | None = None,
):
    """A batch-statistics norm whose statistics pool every rank's batch (training).

    The per-step partials of ``x_seq`` are gathered over ``sync``'s group and combined in
    rank order (:func:`synced_statistics`), then reduced over the
    grouping: ``"all"`` steps (one row ``[C]``), ``"each"`` step (``[T, C]``) or the
    ``"prefix"`` 0..t (continuing ``prefix`` as :func:`chan_prefix`). The running
    statistics (``[rows, C]`` tensors or per-row sequences, or None) are updated in place
    with the global count; y = s_t·(γ x̂ + β) (:func:`scale_apply`). Returns
    (y, (count [rows], μ, M2)).
    """
    count, mean, m2 = synced_statistics(sync, x_seq)
    if grouping == "all":  # the steps' partials combined like ranks': one row
        count, mean, m2 = combine_rank_partials(count.view(-1, 1), mean.unsqueeze(1), m2.unsqueeze(1))
    elif grouping == "prefix":
        count, mean, m2 = chan_prefix(float(count[0]), mean, m2, prefix)
    elif grouping != "each":
        raise ValueError(f"synced_norm: unknown grouping {grouping!r}; expected 'all', 'each' or 'prefix'")
    var = m2 / count.to(m2.dtype).unsqueeze(1)
    if running_mean is not None:
        if isinstance(running_mean, torch.Tensor):
            running_mean, running_var = running_mean.view(-1, mean.shape[1]), running_var.view(-1, mean.shape[1])
        update_accumulated_running_stats(running_mean, running_var, count, mean, m2, momentum)
    return scale_apply(x_seq, weight, bias, mean, var, s, eps), (count, mean, m2)


def load_ops():
    return {
        "lif": lif, "mpbn_lif": mpbn_lif, "mpbn_lif_folded": mpbn_lif_folded, "tebn": tebn, "tab": tab,
        "batch_norm_seq": batch_norm_seq, "bntt": bntt, "row_norm": row_norm,
    }


# ----------------------------------------------------------------------------------
# multi-step BatchNorm / tdBN and BNTT (the statistics pipeline's ALL and EACH groupings)
# ----------------------------------------------------------------------------------


def batch_norm_seq(
    x_seq: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    *,
    training: bool,
    momentum: float,
    eps: float,
    sync: StatsSync | None = None,
) -> torch.Tensor:
    """Multi-step BatchNorm 1d/2d/3d and tdBN: y = γ (x − μ)/√(σ² + ε) + β with one μ, σ²
    per channel over T·N·spatial (T folded into the batch).

    Batch statistics in training or without running statistics (the running statistics,
    if given, updated in place with factor ``momentum``, resolved by the caller, and the
    unbiased variance); running statistics in eval. ``F.batch_norm`` on ``[T·N, C, *]``; with
    ``sync`` (batch statistics) the statistics pool every rank's batch (:func:`synced_norm`).
    """
    use_batch_stats = training or running_mean is None
    if sync is not None and use_batch_stats:
        y, _ = synced_norm("all", x_seq, weight, bias, running_mean, running_var, None, momentum=[momentum], eps=eps,
                           sync=sync)
        return y.to(x_seq.dtype)
    y = F.batch_norm(x_seq.flatten(0, 1), running_mean, running_var, weight, bias, use_batch_stats, momentum, eps)
    return y.view(x_seq.shape)


def stack_steps(per_step: Sequence[torch.Tensor | None]) -> torch.Tensor | None:
    """BNTT's T per-step tensors (γ_t or running statistics, each ``[C]``) as one ``[T, C]``
    for the statistics pipeline; None when a step has none."""
    return torch.stack(list(per_step)) if all(t is not None for t in per_step) else None


@torch.no_grad()
def unstack_steps(stacked: torch.Tensor, per_step: Sequence[torch.Tensor]) -> None:
    """Copy the rows of a ``[T, C]`` stack the pipeline updated back into the per-step buffers."""
    for t, target in enumerate(per_step):
        target.copy_(stacked[t])


def bntt(
    x_seq: torch.Tensor,
    weights: Sequence[torch.Tensor | None],
    running_means: Sequence[torch.Tensor | None],
    running_vars: Sequence[torch.Tensor | None],
    *,
    training: bool,
    momentum: Sequence[float],
    eps: Sequence[float],
    sync: StatsSync | None = None,
) -> torch.Tensor:
    """BN through time (BNTT; Kim & Panda 2021): y[t] = γ_t (x[t] − μ_t)/√(σ_t² + ε_t).

    One BN per step without a shift: μ_t, σ_t² over N·spatial of step t alone (batch
    statistics in training or without running statistics, step t's running statistics in
    eval). Per-step lists of T entries: ``weights`` (γ_t ``[C]`` or None),
    ``running_means``/``running_vars`` (step t's buffers, updated in place with factor
    ``momentum[t]``, or None), ``eps``. With ``sync`` (batch statistics) each step's
    statistics pool every rank's batch (:func:`synced_norm`, grouping "each").
    """
    tracked = all(r is not None for r in running_means) and all(r is not None for r in running_vars)
    if sync is not None and (training or not tracked):
        weight = stack_steps(weights)
        eps_rows = torch.tensor([float(e) for e in eps], dtype=torch.promote_types(x_seq.dtype, torch.float32),
                                device=x_seq.device).view(-1, 1)
        y, _ = synced_norm("each", x_seq, weight, None, running_means if training and tracked else None,
                           running_vars, None, momentum=momentum, eps=eps_rows, sync=sync)
        return y.to(x_seq.dtype)
    ys = []
    for t, x in enumerate(x_seq):
        use_batch_stats = training or running_means[t] is None
        ys.append(
            F.batch_norm(x, running_means[t], running_vars[t], weights[t], None, use_batch_stats, momentum[t], eps[t])
        )
    return torch.stack(ys)


# ----------------------------------------------------------------------------------
# per-token norms of spiking transformers (no batch statistics)
# ----------------------------------------------------------------------------------


def row_norm(
    x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, *, eps: float, rms: bool
) -> torch.Tensor:
    r"""LayerNorm or RMSNorm of every row of ``x`` ``[..., D]`` over its last dim:

    .. math::
        \text{LayerNorm:}\ y = γ \frac{x − \mathrm{mean}_D(x)}{\sqrt{\mathrm{var}_D(x) + ε}} + β
        \qquad \text{RMSNorm (rms):}\ y = γ \frac{x}{\sqrt{\mathrm{mean}_D(x^2) + ε}}

    (Ba, Kiros & Hinton, "Layer Normalization", 2016; Zhang & Sennrich, "Root Mean Square Layer
    Normalization", NeurIPS 2019), var_D biased; γ, β ``[D]`` or None (RMSNorm: ``bias`` None).
    ``F.layer_norm`` / ``F.rms_norm``. A float16/bfloat16 ``x`` with float32 γ (mixed precision)
    is computed in float32 and rounded once to x's dtype: what torch's modules compute, upcast
    here because ``F.rms_norm`` warns on mixed dtypes (it cannot use its fused path).
    """
    shape = (x.shape[-1],)
    mixed = weight is not None and weight.dtype != x.dtype
    xc = x.to(weight.dtype) if mixed else x
    y = F.rms_norm(xc, shape, weight, eps) if rms else F.layer_norm(xc, shape, weight, bias, eps)
    return y.to(x.dtype)
