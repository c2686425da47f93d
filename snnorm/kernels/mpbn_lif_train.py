r"""MPBN-LIF with batch statistics (training): the kernels and launchers behind the
``snnorm::mpbn_lif_train`` op (:func:`launch_batch_stats_fwd`, :func:`launch_train_bwd`), and
the batch-statistics forward that the adaptive folded op ``snnorm::mpbn_lif_adapt`` shares
(its statistics modes STATS_FOLD_BATCH / STATS_FOLD_RUNNING). Both ops (schemas, fake
kernels, autograd) are registered in :mod:`snnorm.backends.triton_backend`.

Per channel c and step t (Guo et al., "Membrane Potential Batch Normalization for Spiking
Neural Networks", ICCV 2023, arXiv 2308.08359)::

    h = charge(v, x[t]);  μ_t, σ_t² = mean, biased variance of h over M = N·S elements
    ĥ = γ (h − μ_t)·rstd_t + β,  rstd_t = 1/√(σ_t² + ε);  s = Θ(ĥ − θ);  v = reset(ĥ | h, s)
    running statistics: updated every step with the unbiased σ_t²·M/(M − 1)

Backward, reverse time loop, batch-norm backward per step (x̂ = (h − μ_t)·rstd_t,
gŷ = ∂L/∂ĥ)::

    A = Σ gŷ,  B = Σ gŷ·x̂,  ∂L/∂h = γ·rstd_t·(gŷ − A/M − x̂·B/M) (+ the raw-carry part),
    ∂L/∂γ += B,  ∂L/∂β += A

Two paths (:func:`uses_resident_path`):

* **resident**: one program per channel holds the whole ``[N, S]`` channel in registers
  for the whole T loop; one launch each way; exact two-pass statistics.
* **pipelined** (large M, or too few channels to fill the GPU): a channel is split into P
  tiles, one program each, and every launch finishes one step and starts the next with
  the membrane still in registers. Forward launch t: combine step t's partial statistics,
  normalise, fire and reset step t (read h_t, write s_t), then charge step t + 1 (read
  x_{t+1}, write h_{t+1} and the tile's partial (mean, M2)) — T + 1 launches, 16 B per
  element-step in fp32. Backward launch t: apply step t + 1 (read gŷ_{t+1}, h_{t+1}; its
  A, B from the partials; write ∂x_{t+1}) and, with ∂v in registers, form gŷ_t and the
  partial sums of step t (read h_t, ∂s_t; write gŷ_t) — T + 1 launches, 24 B per
  element-step (32 with the raw carry, which also passes the bypass gradient). Partials
  combine with the multi-way Chan formula in one fixed order (deterministic).

Synchronised batch statistics (``sync_stats`` / ``sync_sums``, the op's process-group name;
:mod:`snnorm.backends.sync`): always the pipelined path. The resident path runs the whole
T loop inside one launch, so there is no point between two steps where the host could
exchange statistics with the other ranks. Between the launch that charges step t and the
one that finishes it, the host combines step t's P tile partials to one (count, mean, M2)
per channel and exchanges it (one all-gather + Chan in rank order); the finishing launch
(``SYNCED``) reads the global count M and (mean, M2) from a ``[T, 1 + 2C]`` float64 buffer
instead of combining its partials, and normalises and updates the running statistics
(M2/(M − 1)) with them. Backward likewise: between the launch that forms step t's partial
A, B and the one that applies it, one all-reduce of (M, A [C], B [C]); ∂h takes the global
sums, ∂γ, ∂β this rank's. One collective of 1 + 2C float64 values per step each way,
whatever N and the spatial size; without a sync nothing changes.

Choosing the path (so that the GPU fills and nothing spills, ``ptxas -v`` on sm_80/sm_90):
the resident path needs a padded channel ≤ RESIDENT_MAX_M = 2048 elements (8 warps, 8
fp32 elements a thread: ≤ 128 registers in fp32, ≤ 230 in fp64, no spills; at 8192
elements and 16 warps it spilled up to 4 KB a thread) and C ≥ 132 programs. Otherwise the
pipelined path tiles a channel with up to SPLIT_BLOCK = 2048 elements, halving the tile
(down to 256) until C·P ≥ 132. At the perf shapes: (T=4, N=64, C=128, 32×32) 32 tiles ×
128 = 4096 programs; (4, 128, 256, 8×8) 4 × 256 = 1024; (8, 32, 64, 56×56) 52 × 64 = 3328.
The pipelined path moves 16 (+4/T for v_T) fp32 B per element-step forward and 24 backward
against 12 + 8/T for the resident one, but a grid of C < 132 resident programs leaves SMs
idle, which costs more than the bytes.

Layouts: ``x`` / spikes ``[T, N, C, S]`` (strided views), ``v`` ``[N, C, S]``, per-channel
tensors ``[C]``, saved statistics ``[T, C]``, partials ``[T, P, C]``. Saved for backward:
h (compute dtype) and μ_t, rstd_t — the spikes are recomputed bit-identically.

Precision (every kernel of ``kernels/``): computed in fp32 (fp64 for fp64 tensors), stored
in the output dtype. For fp16/bf16 inputs the membrane stays fp32 inside the kernels and in
the saved h, whereas the torch reference keeps it in the input dtype: the Triton result is
the more accurate one. Scalars (τ, v_reset, ε, momentum, α) reach fp32 kernels as fp32
arguments and fp64 kernels as one-element fp64 tensors (``_device.kernel_scalars``), so fp64
agrees with an fp64 reference to rounding (~1e-15). Every division and square root that a
spike depends on is correctly rounded (``_device.div_rn``, ``rstd_of``; only the surrogate
gradient's is plain) and every launch pins ``enable_fp_fusion=False``: the backward's
recomputed spikes are the forward's, on any Triton.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from .._welford import chan_combine
from ..params import BNKernelParameters, LIFKernelParameters
from . import _device as dev
from ._common import (
    LIF_WARPS, PIPELINED_WARPS, SYNC_DTYPE, Tiling, acc_dtype, acc_torch_dtype, as_ncs, channel_tiling, check_channel_args,
    launch_options, launcher, needs_int64, next_pow2, store_dtype, tiles_grid,
)

#: a channel of at most this many (padded) elements per step may take the resident path
RESIDENT_MAX_M = 2048
#: the resident path only when it gives at least this many programs (an H100 has 132 SMs)
MIN_PROGRAMS = 132
#: largest tile (elements per program) of the pipelined path
SPLIT_BLOCK = 2048
#: partial statistics combined per chunk (a bound on registers however many tiles a channel has;
#: at 256 the backward on 16 warps spilled 4 B, ``perf/compile_check.py --grid full``)
MAX_BLOCK_P = 128
#: smallest tile the pipelined path shrinks to while looking for MIN_PROGRAMS programs
SPLIT_MIN_BLOCK = 256


def resident_tiling(N: int, S: int) -> Tiling:
    return Tiling(next_pow2(N), next_pow2(S), 1, 1)


def uses_resident_path(N: int, C: int, S: int) -> bool:
    """One program per channel when the channel fits in registers and C programs fill the GPU."""
    return resident_tiling(N, S).block <= RESIDENT_MAX_M and C >= MIN_PROGRAMS


def pipelined_tiling(N: int, C: int, S: int) -> Tiling:
    """The largest tile ≤ SPLIT_BLOCK that still gives MIN_PROGRAMS programs (down to SPLIT_MIN_BLOCK)."""
    block = SPLIT_BLOCK
    while block > SPLIT_MIN_BLOCK and channel_tiling(N, S, block).P * C < MIN_PROGRAMS:
        block //= 2
    return channel_tiling(N, S, block)


# ----------------------------------------------------------------------------------
# resident kernels: one program holds a whole channel for the whole T loop
# ----------------------------------------------------------------------------------


@triton.jit
def _mpbn_lif_resident_fwd_kernel(
    x_ptr,  # [T, N, C, S] strided
    v0_ptr,  # [N, C, S] strided
    w_ptr, b_ptr,  # [C] γ, β (HAS_WEIGHT, HAS_BIAS)
    th_ptr,  # [C] threshold
    rm_ptr, rv_ptr,  # [C] running mean / var, updated in place (TRACK)
    mu_ptr, s2_ptr,  # [C] adaptive μ, σ² in (STATS != STATS_TRAIN)
    mom_ptr,  # [T] adaptation momentum per step (STATS_FOLD_RUNNING)
    s_ptr,  # [T, N, C, S] contiguous out: spikes
    h_ptr,  # [T, N, C, S] contiguous out: pre-BN membrane (SAVE)
    vout_ptr,  # [N, C, S] contiguous out
    mean_ptr, rstd_ptr,  # [T, C] out (SAVE)
    mu_out_ptr, s2_out_ptr,  # [C] out (STATS != STATS_TRAIN)
    T, N, C, S,
    stride_x_t, stride_x_n, stride_x_c, stride_x_s,
    stride_v_n, stride_v_c, stride_v_s,
    tau, v_reset, eps, momentum, batches_tracked,
    STATS: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, TRACK: tl.constexpr,
    USE_MOMENTUM: tl.constexpr,
    CARRY_NORM: tl.constexpr, DECAY_INPUT: tl.constexpr, SOFT_RESET: tl.constexpr, SAVE: tl.constexpr,
    V0_SCALAR: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr, INDEX_64: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
):
    c = dev.index(tl.program_id(0), INDEX_64)
    n, s, mask = dev.channel_tile(0, N, S, 1, BLOCK_N, BLOCK_S, INDEX_64)
    x_off = c * stride_x_c + n * stride_x_n + s * stride_x_s
    o_off = (n * C + c) * S + s
    step = dev.index(C, INDEX_64) * N * S
    M = N * S

    th = tl.load(th_ptr + c).to(ACC_DTYPE)
    gamma, beta = dev.load_affine(w_ptr, b_ptr, c, HAS_WEIGHT, HAS_BIAS, ACC_DTYPE)
    rm = dev.load_channel(rm_ptr, c, TRACK, ACC_DTYPE)
    rv = dev.load_channel(rv_ptr, c, TRACK, ACC_DTYPE)
    mu = dev.load_channel(mu_ptr, c, STATS != dev.STATS_TRAIN, ACC_DTYPE)
    s2 = dev.load_channel(s2_ptr, c, STATS != dev.STATS_TRAIN, ACC_DTYPE)
    tau = dev.scalar_arg(tau, ACC_DTYPE)
    v_r = dev.scalar_arg(v_reset, ACC_DTYPE)
    eps = dev.scalar_arg(eps, ACC_DTYPE)
    momentum = dev.scalar_arg(momentum, ACC_DTYPE)

    v = dev.load_membrane(v0_ptr, c, n, s, mask, stride_v_n, stride_v_c, stride_v_s, V0_SCALAR, BLOCK_N, BLOCK_S, ACC_DTYPE)
    for t in range(T):
        ti = dev.index(t, INDEX_64)
        x = tl.load(x_ptr + ti * stride_x_t + x_off, mask=mask, other=0.0).to(ACC_DTYPE)
        h = tl.where(mask, dev.charge(v, x, tau, v_r, DECAY_INPUT), 0.0)
        mean, m2 = dev.tile_moments(h, mask, M)
        mt = dev.load_channel(mom_ptr, t, STATS == dev.STATS_FOLD_RUNNING, ACC_DTYPE)
        z, u, rstd, mu, s2 = dev.normalise_step(h, mean, m2, M, gamma, beta, th, eps, mu, s2, mt, STATS, CARRY_NORM, ACC_DTYPE)
        spike = z >= 0
        v = dev.reset(u, spike, th, v_r, SOFT_RESET)
        tl.store(s_ptr + ti * step + o_off, spike.to(s_ptr.dtype.element_ty), mask=mask)
        if SAVE:
            tl.store(h_ptr + ti * step + o_off, h.to(h_ptr.dtype.element_ty), mask=mask)
            tl.store(mean_ptr + ti * C + c, mean)
            tl.store(rstd_ptr + ti * C + c, rstd)
        if TRACK:
            rm, rv = dev.running_update(rm, rv, mean, m2, M, t, momentum, batches_tracked, USE_MOMENTUM)
    tl.store(vout_ptr + o_off, v.to(vout_ptr.dtype.element_ty), mask=mask)
    if TRACK:
        tl.store(rm_ptr + c, rm.to(rm_ptr.dtype.element_ty))
        tl.store(rv_ptr + c, rv.to(rv_ptr.dtype.element_ty))
    if STATS != dev.STATS_TRAIN:
        tl.store(mu_out_ptr + c, mu.to(mu_out_ptr.dtype.element_ty))
        tl.store(s2_out_ptr + c, s2.to(s2_out_ptr.dtype.element_ty))


@triton.jit
def _mpbn_lif_resident_bwd_kernel(
    gs_ptr,  # [T, N, C, S] strided (HAS_GS)
    gvout_ptr,  # [N, C, S] strided (HAS_GV)
    h_ptr,  # [T, N, C, S] contiguous saved pre-BN membrane
    mean_ptr, rstd_ptr,  # [T, C] saved
    w_ptr, b_ptr, th_ptr,  # [C]
    gx_ptr,  # [T, N, C, S] contiguous out
    gv0_ptr,  # [N, C, S] contiguous out (NEED_GV0)
    gw_ptr, gb_ptr, gth_ptr,  # [C] out (compute dtype)
    T, N, C, S,
    stride_g_t, stride_g_n, stride_g_c, stride_g_s,
    stride_gv_n, stride_gv_c, stride_gv_s,
    tau, v_reset, alpha,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, CARRY_NORM: tl.constexpr, DECAY_INPUT: tl.constexpr,
    SOFT_RESET: tl.constexpr,
    DETACH_RESET: tl.constexpr, SURROGATE: tl.constexpr, HAS_GS: tl.constexpr, HAS_GV: tl.constexpr,
    NEED_GV0: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr, INDEX_64: tl.constexpr, ACC_DTYPE: tl.constexpr,
):
    c = dev.index(tl.program_id(0), INDEX_64)
    n, s, mask = dev.channel_tile(0, N, S, 1, BLOCK_N, BLOCK_S, INDEX_64)
    g_off = c * stride_g_c + n * stride_g_n + s * stride_g_s
    o_off = (n * C + c) * S + s
    step = dev.index(C, INDEX_64) * N * S
    M = N * S

    th = tl.load(th_ptr + c).to(ACC_DTYPE)
    gamma, beta = dev.load_affine(w_ptr, b_ptr, c, HAS_WEIGHT, HAS_BIAS, ACC_DTYPE)
    v_r = dev.scalar_arg(v_reset, ACC_DTYPE)
    alpha = dev.scalar_arg(alpha, ACC_DTYPE)
    x_scale, v_scale = dev.charge_grads(dev.scalar_arg(tau, ACC_DTYPE), DECAY_INPUT)

    zero = tl.zeros([BLOCK_N, BLOCK_S], dtype=ACC_DTYPE)
    gv = zero
    if HAS_GV:
        gv = tl.load(gvout_ptr + c * stride_gv_c + n * stride_gv_n + s * stride_gv_s, mask=mask, other=0.0).to(ACC_DTYPE)
    # per-channel sums as scalars (a [BLOCK] accumulator per sum would cost registers in the T loop)
    sum_w = tl.sum(tl.sum(zero, axis=1), axis=0)
    sum_b = sum_w
    sum_th = sum_w
    for tt in range(T):
        ti = dev.index(T - 1 - tt, INDEX_64)
        h = tl.load(h_ptr + ti * step + o_off, mask=mask, other=0.0).to(ACC_DTYPE)
        gs = zero
        if HAS_GS:
            gs = tl.load(gs_ptr + ti * stride_g_t + g_off, mask=mask, other=0.0).to(ACC_DTYPE)
        mean = tl.load(mean_ptr + ti * C + c).to(ACC_DTYPE)
        rstd = tl.load(rstd_ptr + ti * C + c).to(ACC_DTYPE)
        xhat, g_hat, g_direct, gth = dev.bn_bwd_step(
            h, gs, gv, mask, mean, rstd, gamma, beta, th, v_r, alpha, SOFT_RESET, DETACH_RESET, CARRY_NORM, SURROGATE,
        )
        a_sum = dev.tile_sum(g_hat)
        b_sum = dev.tile_sum(g_hat * xhat)
        sum_w += b_sum
        sum_b += a_sum
        sum_th += dev.tile_sum(gth)
        gh = gamma * rstd * (g_hat - dev.div_rn(a_sum, M, ACC_DTYPE) - xhat * dev.div_rn(b_sum, M, ACC_DTYPE)) + g_direct
        tl.store(gx_ptr + ti * step + o_off, (gh * x_scale).to(gx_ptr.dtype.element_ty), mask=mask)
        gv = gh * v_scale
    if NEED_GV0:
        tl.store(gv0_ptr + o_off, gv.to(gv0_ptr.dtype.element_ty), mask=mask)
    tl.store(gw_ptr + c, sum_w)
    tl.store(gb_ptr + c, sum_b)
    tl.store(gth_ptr + c, sum_th)


# ----------------------------------------------------------------------------------
# pipelined kernels: a channel over P programs, one launch per step boundary
# ----------------------------------------------------------------------------------


@triton.jit
def _mpbn_lif_pipelined_fwd_kernel(
    x_ptr,  # [T, N, C, S] strided
    v0_ptr,  # [N, C, S] strided (FIRST)
    h_ptr,  # [T, N, C, S] (SAVE) or [2, N, C, S] ping-pong, contiguous, compute dtype
    s_ptr,  # [T, N, C, S] contiguous out: spikes
    vout_ptr,  # [N, C, S] contiguous out (LAST)
    pmean_ptr, pm2_ptr,  # [T, P, C] partial mean and M2 of h per tile
    w_ptr, b_ptr, th_ptr,  # [C]
    rm_ptr, rv_ptr,  # [C] running statistics, updated by tile 0 (TRACK)
    mean_ptr, rstd_ptr,  # [T, C] out (tile 0)
    mu_hist_ptr, s2_hist_ptr,  # [T + 1, C] adaptive state: reads row t, tile 0 writes row t + 1
    mom_ptr,  # [T] adaptation momentum per step (STATS_FOLD_RUNNING)
    sync_ptr,  # [T, 1 + 2C] float64 (SYNCED): every rank's (count, mean, M2) of each step
    t,  # the step this launch finishes (−1 on the FIRST launch, which only charges step 0)
    N, C, S, S_TILES, P,
    stride_x_t, stride_x_n, stride_x_c, stride_x_s,
    stride_v_n, stride_v_c, stride_v_s,
    tau, v_reset, eps, momentum, batches_tracked,
    STATS: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, TRACK: tl.constexpr,
    USE_MOMENTUM: tl.constexpr,
    CARRY_NORM: tl.constexpr, DECAY_INPUT: tl.constexpr, SOFT_RESET: tl.constexpr, SAVE: tl.constexpr,
    V0_SCALAR: tl.constexpr, FIRST: tl.constexpr, LAST: tl.constexpr, SYNCED: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_P: tl.constexpr, INDEX_64: tl.constexpr, ACC_DTYPE: tl.constexpr,
    FLAT_GRID: tl.constexpr,
):
    pid, c = dev.tile_and_channel(P, FLAT_GRID, INDEX_64)
    n, s, mask = dev.channel_tile(pid, N, S, S_TILES, BLOCK_N, BLOCK_S, INDEX_64)
    o_off = (n * C + c) * S + s
    step = dev.index(C, INDEX_64) * N * S
    M = N * S
    tau = dev.scalar_arg(tau, ACC_DTYPE)
    v_r = dev.scalar_arg(v_reset, ACC_DTYPE)
    eps = dev.scalar_arg(eps, ACC_DTYPE)
    momentum = dev.scalar_arg(momentum, ACC_DTYPE)

    if FIRST:
        v = dev.load_membrane(v0_ptr, c, n, s, mask, stride_v_n, stride_v_c, stride_v_s, V0_SCALAR, BLOCK_N, BLOCK_S, ACC_DTYPE)
    else:  # finish step t: normalise, fire, reset
        ti = dev.index(t, INDEX_64)
        h_row = ti if SAVE else ti % 2
        if SYNCED:  # the statistics of every rank's batch, combined on the host between the launches
            row = sync_ptr + ti * (1 + 2 * C)
            M = tl.load(row).to(ACC_DTYPE)
            mean = tl.load(row + 1 + c).to(ACC_DTYPE)
            m2 = tl.load(row + 1 + C + c).to(ACC_DTYPE)
        else:
            mean, m2 = dev.combine_tile_partials(
                pmean_ptr + ti * P * C, pm2_ptr + ti * P * C, c, C, P, N, S, S_TILES, BLOCK_N, BLOCK_S, BLOCK_P, ACC_DTYPE,
            )
        th = tl.load(th_ptr + c).to(ACC_DTYPE)
        gamma, beta = dev.load_affine(w_ptr, b_ptr, c, HAS_WEIGHT, HAS_BIAS, ACC_DTYPE)
        adapt: tl.constexpr = STATS != dev.STATS_TRAIN
        mu = tl.full([], 0.0, ACC_DTYPE)
        s2 = tl.full([], 0.0, ACC_DTYPE)
        if adapt:
            mu = tl.load(mu_hist_ptr + ti * C + c).to(ACC_DTYPE)
            s2 = tl.load(s2_hist_ptr + ti * C + c).to(ACC_DTYPE)
        mt = dev.load_channel(mom_ptr, ti, STATS == dev.STATS_FOLD_RUNNING, ACC_DTYPE)
        h = tl.load(h_ptr + h_row * step + o_off, mask=mask, other=0.0).to(ACC_DTYPE)
        z, u, rstd, mu, s2 = dev.normalise_step(h, mean, m2, M, gamma, beta, th, eps, mu, s2, mt, STATS, CARRY_NORM, ACC_DTYPE)
        spike = z >= 0
        v = dev.reset(u, spike, th, v_r, SOFT_RESET)
        tl.store(s_ptr + ti * step + o_off, spike.to(s_ptr.dtype.element_ty), mask=mask)
        if pid == 0:
            tl.store(mean_ptr + ti * C + c, mean)
            tl.store(rstd_ptr + ti * C + c, rstd)
            if adapt:
                tl.store(mu_hist_ptr + (ti + 1) * C + c, mu)
                tl.store(s2_hist_ptr + (ti + 1) * C + c, s2)
            if TRACK:
                rm, rv = dev.running_update(
                    tl.load(rm_ptr + c).to(ACC_DTYPE), tl.load(rv_ptr + c).to(ACC_DTYPE), mean, m2, M, t, momentum, batches_tracked,
                    USE_MOMENTUM,
                )
                tl.store(rm_ptr + c, rm.to(rm_ptr.dtype.element_ty))
                tl.store(rv_ptr + c, rv.to(rv_ptr.dtype.element_ty))
    if LAST:
        tl.store(vout_ptr + o_off, v.to(vout_ptr.dtype.element_ty), mask=mask)
    else:  # charge step t + 1 with v still in registers
        tn = dev.index(t + 1, INDEX_64)
        x = tl.load(
            x_ptr + tn * stride_x_t + c * stride_x_c + n * stride_x_n + s * stride_x_s, mask=mask, other=0.0
        ).to(ACC_DTYPE)
        h = tl.where(mask, dev.charge(v, x, tau, v_r, DECAY_INPUT), 0.0)
        h_row = tn if SAVE else tn % 2
        tl.store(h_ptr + h_row * step + o_off, h.to(h_ptr.dtype.element_ty), mask=mask)
        mean, m2 = dev.tile_moments(h, mask, dev.tile_count(pid, N, S, S_TILES, BLOCK_N, BLOCK_S).to(ACC_DTYPE))
        slot = (tn * P + pid) * C + c
        tl.store(pmean_ptr + slot, mean)
        tl.store(pm2_ptr + slot, m2)


@triton.jit
def _mpbn_lif_pipelined_bwd_kernel(
    gs_ptr,  # [T, N, C, S] strided (HAS_GS)
    gvout_ptr,  # [N, C, S] strided (HAS_GV; read by the FIRST launch)
    h_ptr,  # [T, N, C, S] contiguous saved pre-BN membrane
    ghat_ptr,  # [2, N, C, S] ping-pong: gŷ of the step formed last launch / this launch
    gdir_ptr,  # [2, N, C, S] ping-pong: the raw-carry gradient that bypasses the BN (not CARRY_NORM)
    gx_ptr,  # [T, N, C, S] contiguous out
    gv0_ptr,  # [N, C, S] contiguous out (LAST and NEED_GV0)
    mean_ptr, rstd_ptr,  # [T, C] saved
    w_ptr, b_ptr, th_ptr,  # [C]
    pa_ptr, pb_ptr,  # [T, P, C] partial Σ gŷ, Σ gŷ·x̂ per tile
    pth_ptr,  # [P, C] −∂θ per tile, accumulated over the launches
    gw_ptr, gb_ptr,  # [C] out, accumulated by tile 0
    sync_ptr,  # [T, 1 + 2C] float64 (SYNCED): every rank's (count, A, B) of each step
    t,  # the step this launch forms (after applying step t + 1); −1 on the LAST launch
    T, N, C, S, S_TILES, P,
    stride_g_t, stride_g_n, stride_g_c, stride_g_s,
    stride_gv_n, stride_gv_c, stride_gv_s,
    tau, v_reset, alpha,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, CARRY_NORM: tl.constexpr, DECAY_INPUT: tl.constexpr,
    SOFT_RESET: tl.constexpr,
    DETACH_RESET: tl.constexpr, SURROGATE: tl.constexpr, HAS_GS: tl.constexpr, HAS_GV: tl.constexpr,
    NEED_GV0: tl.constexpr, FIRST: tl.constexpr, LAST: tl.constexpr, SYNCED: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_P: tl.constexpr, INDEX_64: tl.constexpr, ACC_DTYPE: tl.constexpr,
    FLAT_GRID: tl.constexpr,
):
    pid, c = dev.tile_and_channel(P, FLAT_GRID, INDEX_64)
    n, s, mask = dev.channel_tile(pid, N, S, S_TILES, BLOCK_N, BLOCK_S, INDEX_64)
    o_off = (n * C + c) * S + s
    step = dev.index(C, INDEX_64) * N * S
    M = N * S
    zero = tl.zeros([BLOCK_N, BLOCK_S], dtype=ACC_DTYPE)

    # A correctly rounded division calls a slow-path subroutine, and what is live across that
    # call can spill (8 B on sm_90, fp32 and fp64): the apply's two divisions come first, before
    # γ, β, the scalars and the tile are loaded (static ifs: names carry over between them)
    if not FIRST:  # apply step t + 1: its A, B are complete now
        tp = dev.index(t + 1, INDEX_64)
        a_sum = dev.sum_partials(pa_ptr + tp * P * C, c, C, P, BLOCK_P, ACC_DTYPE)
        b_sum = dev.sum_partials(pb_ptr + tp * P * C, c, C, P, BLOCK_P, ACC_DTYPE)
        # ∂h takes the sums and count of every rank's batch; ∂γ, ∂β below stay this rank's (DDP averages them)
        a_h, b_h, m_h = a_sum, b_sum, M
        if SYNCED:
            row = sync_ptr + tp * (1 + 2 * C)
            m_h = tl.load(row).to(ACC_DTYPE)
            a_h = tl.load(row + 1 + c).to(ACC_DTYPE)
            b_h = tl.load(row + 1 + C + c).to(ACC_DTYPE)
        a_m = dev.div_rn(a_h, m_h, ACC_DTYPE)
        b_m = dev.div_rn(b_h, m_h, ACC_DTYPE)
    gamma, beta = dev.load_affine(w_ptr, b_ptr, c, HAS_WEIGHT, HAS_BIAS, ACC_DTYPE)
    if FIRST:
        gv = zero
        if HAS_GV:
            gv = tl.load(
                gvout_ptr + c * stride_gv_c + n * stride_gv_n + s * stride_gv_s, mask=mask, other=0.0
            ).to(ACC_DTYPE)
    else:
        mean = tl.load(mean_ptr + tp * C + c).to(ACC_DTYPE)
        rstd = tl.load(rstd_ptr + tp * C + c).to(ACC_DTYPE)
        h = tl.load(h_ptr + tp * step + o_off, mask=mask, other=0.0).to(ACC_DTYPE)
        g_hat = tl.load(ghat_ptr + (tp % 2) * step + o_off, mask=mask, other=0.0).to(ACC_DTYPE)
        xhat = (h - mean) * rstd
        gh = gamma * rstd * (g_hat - a_m - xhat * b_m)
        if not CARRY_NORM:
            gh += tl.load(gdir_ptr + (tp % 2) * step + o_off, mask=mask, other=0.0).to(ACC_DTYPE)
        x_scale, v_scale = dev.charge_grads(dev.scalar_arg(tau, ACC_DTYPE), DECAY_INPUT)
        tl.store(gx_ptr + tp * step + o_off, (gh * x_scale).to(gx_ptr.dtype.element_ty), mask=mask)
        gv = gh * v_scale
        if pid == 0:  # the first apply (step T − 1) writes, later ones accumulate
            first_apply = t + 1 == T - 1
            tl.store(gw_ptr + c, tl.where(first_apply, 0.0, tl.load(gw_ptr + c)) + b_sum)
            tl.store(gb_ptr + c, tl.where(first_apply, 0.0, tl.load(gb_ptr + c)) + a_sum)
    if LAST:
        if NEED_GV0:
            tl.store(gv0_ptr + o_off, gv.to(gv0_ptr.dtype.element_ty), mask=mask)
    else:  # form step t with ∂v in registers
        ti = dev.index(t, INDEX_64)
        v_r = dev.scalar_arg(v_reset, ACC_DTYPE)
        alpha = dev.scalar_arg(alpha, ACC_DTYPE)
        th = tl.load(th_ptr + c).to(ACC_DTYPE)
        h = tl.load(h_ptr + ti * step + o_off, mask=mask, other=0.0).to(ACC_DTYPE)
        gs = zero
        if HAS_GS:
            gs = tl.load(
                gs_ptr + ti * stride_g_t + c * stride_g_c + n * stride_g_n + s * stride_g_s, mask=mask, other=0.0
            ).to(ACC_DTYPE)
        mean = tl.load(mean_ptr + ti * C + c).to(ACC_DTYPE)
        rstd = tl.load(rstd_ptr + ti * C + c).to(ACC_DTYPE)
        xhat, g_hat, g_direct, gth = dev.bn_bwd_step(
            h, gs, gv, mask, mean, rstd, gamma, beta, th, v_r, alpha,
            SOFT_RESET, DETACH_RESET, CARRY_NORM, SURROGATE,
        )
        # this order (ĝ stored, the tile sums, then the raw-carry gradient) left ptxas of triton 3.6
        # one 4 B spill in the compile check's grids, where storing both first left 3–6 (ATan, raw carry)
        tl.store(ghat_ptr + (ti % 2) * step + o_off, g_hat, mask=mask)
        sum_a = dev.tile_sum(g_hat)
        sum_b = dev.tile_sum(g_hat * xhat)
        sum_th = dev.tile_sum(gth)
        if not CARRY_NORM:
            tl.store(gdir_ptr + (ti % 2) * step + o_off, g_direct, mask=mask)
        slot = (ti * P + pid) * C + c
        tl.store(pa_ptr + slot, sum_a)
        tl.store(pb_ptr + slot, sum_b)
        th_slot = pth_ptr + pid * C + c
        prev = 0.0
        if not FIRST:
            prev = tl.load(th_slot)
        tl.store(th_slot, prev + sum_th)


# ----------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------


def _strides(t: Optional[Tensor], dims: int) -> tuple:
    return t.stride() if t is not None else (0,) * dims


#: ``(count [1], mean [1, C], M2 [1, C])`` of one step on this rank → the same over every rank
#: (float64; e.g. an all-gather and Chan's combination in rank order)
StepStatsSync = Callable[[Tensor, Tensor, Tensor], tuple[Tensor, Tensor, Tensor]]
#: a float64 vector → its sum over every rank (an all-reduce)
SumsSync = Callable[[Tensor], Tensor]


def tile_counts(tiles: Tiling, N: int, S: int, device) -> Tensor:
    """Elements per tile ``[P]`` (float64), as the kernels' ``tile_count`` counts them."""
    p = torch.arange(tiles.P, device=device)
    rows = (N - (p // tiles.S_TILES) * tiles.BLOCK_N).clamp(max=tiles.BLOCK_N)
    cols = (S - (p % tiles.S_TILES) * tiles.BLOCK_S).clamp(max=tiles.BLOCK_S)
    return (rows * cols).to(SYNC_DTYPE)


def local_step_statistics(counts: Tensor, pmean: Tensor, pm2: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """One step's P tile partials ``[P, C]`` (``counts`` ``[P]``) combined in float64 with the
    multi-way Chan formula (:func:`snnorm._welford.chan_combine`, centred on tile 0's mean):
    n = Σ n_p, μ = Σ n_p μ_p / n, M2 = Σ M2_p + Σ n_p (μ_p − μ)².
    Returns ``count [1]``, ``mean [1, C]``, ``M2 [1, C]``."""
    n, mean, m2 = chan_combine(counts, pmean.to(SYNC_DTYPE), pm2.to(SYNC_DTYPE))
    return n.view(1), mean.view(1, -1), m2.view(1, -1)


@launcher
def launch_batch_stats_fwd(
    x, v0, weight, bias, running_mean, running_var, th, mu, s2, mom, out_dtype, *,
    lif: LIFKernelParameters, bn: BNKernelParameters, stats: int, carry_norm: bool, save: bool,
    sync_stats: Optional[StepStatsSync] = None,
):
    """Forward with batch statistics: training (STATS_TRAIN) or an adaptive fold (STATS_FOLD_*).

    ``bn``: ε and the running-statistics factor (its momentum and batches_tracked are read
    only when running statistics are given).

    ``sync_stats`` (training only): every step's statistics pool every rank's batch. Always
    the pipelined path — the resident one runs the whole T loop in one launch, with no point
    between steps where the host could exchange statistics. After the launch that charges
    step t, its P tile partials are combined here (:func:`local_step_statistics`, float64)
    and handed to ``sync_stats`` (one collective, 1 + 2C values); the next launch (SYNCED)
    finishes step t with the returned global (count, mean, M2) instead of its own partials,
    and normalises and updates the running statistics with the global count M.

    Returns spikes, v_T, saved h ([T, ...] compute dtype, or empty), mean and rstd
    ([T, C]; empty unless saved) and the adapted μ, σ² ([C]; empty in training).
    """
    T, N, C = x.shape[:3]
    adapt = stats != dev.STATS_TRAIN.value
    check_channel_args(  # before anything is written (the running statistics are updated in place)
        "mpbn_lif", x.device, th=(th, (C,), True), weight=(weight, (C,)), bias=(bias, (C,)),
        running_mean=(running_mean, (C,), running_var is not None),
        running_var=(running_var, (C,), running_mean is not None),
        mu=(mu, (C,), adapt), s2=(s2, (C,), adapt),
        **({"mom": (mom, (T,), True)} if stats == dev.STATS_FOLD_RUNNING.value else {}),
    )
    x4, v3 = as_ncs(x, 1), as_ncs(v0, 0)
    S = x4.shape[3]
    acc = acc_torch_dtype(out_dtype)
    dev_ = x.device
    st = store_dtype(out_dtype)
    s = torch.empty(x.shape, dtype=st, device=dev_)
    v_out = torch.empty(x.shape[1:], dtype=st, device=dev_)
    mu_out = torch.empty((C,) if adapt else (0,), dtype=acc, device=dev_)
    s2_out = torch.empty((C,) if adapt else (0,), dtype=acc, device=dev_)
    lif_scalars, lif_flags = dev.lif_kernel_args(lif)  # floats: kernel_scalars below makes them fp64 for fp64
    flags = dict(
        STATS=stats, HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, TRACK=running_mean is not None,
        USE_MOMENTUM=bn.momentum is not None,
        CARRY_NORM=carry_norm, SAVE=save, V0_SCALAR=v3.stride() == (0, 0, 0), INDEX_64=needs_int64(x4, v3, s),
        ACC_DTYPE=acc_dtype(out_dtype), **lif_flags,
    )
    momentum = 0.0 if bn.momentum is None else float(bn.momentum)
    scalars = (*dev.kernel_scalars((*lif_scalars, float(bn.eps), momentum), acc, dev_), int(bn.batches_tracked))
    if sync_stats is not None and adapt:
        raise ValueError(
            f"launch_batch_stats_fwd: synchronised statistics are for training (stats=STATS_TRAIN), got stats={stats}"
        )

    if sync_stats is None and uses_resident_path(N, C, S):
        tiles = resident_tiling(N, S)
        h = torch.empty(x.shape if save else (0,), dtype=acc, device=dev_)
        mean = torch.empty((T, C) if save else (0,), dtype=acc, device=dev_)
        rstd = torch.empty((T, C) if save else (0,), dtype=acc, device=dev_)
        _mpbn_lif_resident_fwd_kernel[(C,)](
            x4, v3, weight, bias, th, running_mean, running_var, mu, s2, mom,
            s, h if save else None, v_out, mean if save else None, rstd if save else None,
            mu_out if adapt else None, s2_out if adapt else None,
            T, N, C, S, *x4.stride(), *v3.stride(), *scalars,
            BLOCK_N=tiles.BLOCK_N, BLOCK_S=tiles.BLOCK_S, **launch_options(LIF_WARPS(tiles.block), acc),
            **flags,
        )
        return s.to(out_dtype), v_out.to(out_dtype), h, mean, rstd, mu_out, s2_out

    tiles = pipelined_tiling(N, C, S)
    P = tiles.P
    h = torch.empty(x.shape if save else (2, *x.shape[1:]), dtype=acc, device=dev_)
    pmean = torch.empty((T, P, C), dtype=acc, device=dev_)
    pm2 = torch.empty((T, P, C), dtype=acc, device=dev_)
    mean = torch.empty((T, C), dtype=acc, device=dev_)  # tile 0 writes the rows even when not saved
    rstd = torch.empty((T, C), dtype=acc, device=dev_)
    mu_hist = s2_hist = None
    if adapt:
        mu_hist = torch.cat([mu.to(acc).view(1, C), torch.empty((T, C), dtype=acc, device=dev_)])
        s2_hist = torch.cat([s2.to(acc).view(1, C), torch.empty((T, C), dtype=acc, device=dev_)])
    synced = sync_stats is not None
    if synced:  # per step: the global count, mean [C], M2 [C]
        glob = torch.empty((T, 1 + 2 * C), dtype=SYNC_DTYPE, device=dev_)
        counts = tile_counts(tiles, N, S, dev_)
    grid, flat = tiles_grid(P, C)
    for t in range(-1, T):
        _mpbn_lif_pipelined_fwd_kernel[grid](
            x4, v3, h, s, v_out, pmean, pm2, weight, bias, th, running_mean, running_var, mean, rstd,
            mu_hist, s2_hist, mom, glob if synced else None, t, N, C, S, tiles.S_TILES, P, *x4.stride(), *v3.stride(),
            *scalars, FIRST=t == -1, LAST=t == T - 1, SYNCED=synced, BLOCK_N=tiles.BLOCK_N, BLOCK_S=tiles.BLOCK_S,
            BLOCK_P=min(next_pow2(P), MAX_BLOCK_P), FLAT_GRID=flat, **launch_options(PIPELINED_WARPS(tiles.block), acc),
            **flags,
        )
        if synced and t + 1 < T:  # step t + 1 is charged: its statistics over every rank, before it is applied
            n, mu_, m2_ = sync_stats(*local_step_statistics(counts, pmean[t + 1], pm2[t + 1]))
            glob[t + 1] = torch.cat([n.reshape(1), mu_.reshape(C), m2_.reshape(C)]).to(SYNC_DTYPE)
    if adapt:
        mu_out, s2_out = mu_hist[T].clone(), s2_hist[T].clone()  # own storage: op outputs must not be views
    if not save:
        empty = torch.empty((0,), dtype=acc, device=dev_)
        h, mean, rstd = empty, empty.clone(), empty.clone()
    return s.to(out_dtype), v_out.to(out_dtype), h, mean, rstd, mu_out, s2_out


@launcher
def launch_train_bwd(
    gs, gv, h, gx_dtype, mean, rstd, weight, bias, th, *, lif: LIFKernelParameters, carry_norm: bool, need_gv0: bool = True,
    sync_sums: Optional[SumsSync] = None,
):
    """Backward of MPBN-LIF training: (∂x, ∂v0, ∂γ, ∂β, ∂θ).

    ``sync_sums`` (the forward was synchronised): always the pipelined path. After the launch
    that forms step t's partial sums, they are summed here into this rank's
    (M, A = Σ gŷ, B = Σ gŷ·x̂) and handed to ``sync_sums`` (one all-reduce, 1 + 2C values);
    the launch that applies step t uses the global M, A, B in
    ∂h = γ·rstd·(gŷ − A/M − x̂·B/M), whereas ∂γ += B and ∂β += A keep this rank's sums
    (DistributedDataParallel averages parameter gradients, as for torch's SyncBatchNorm).
    """
    T, N, C = h.shape[:3]
    check_channel_args(
        "mpbn_lif backward", h.device, mean=(mean, (T, C), True), rstd=(rstd, (T, C), True), weight=(weight, (C,)),
        bias=(bias, (C,)), th=(th, (C,), True),
    )
    h4 = as_ncs(h, 1)
    S = h4.shape[3]
    g4 = as_ncs(gs, 1) if gs is not None else None
    gv3 = as_ncs(gv, 0) if gv is not None else None
    acc = h.dtype
    dev_ = h.device
    gx = torch.empty(h.shape, dtype=store_dtype(gx_dtype), device=dev_)
    gv0 = torch.empty(h.shape[1:] if need_gv0 else (0,), dtype=acc, device=dev_)
    # with no element (N·S = 0: an empty rank) no program writes ∂γ, ∂β: zeros, else no fill
    alloc = torch.empty if h.numel() > 0 else torch.zeros
    gw = alloc(C, dtype=acc, device=dev_)
    gb = alloc(C, dtype=acc, device=dev_)
    scalars, lif_flags = dev.lif_kernel_args(lif, backward=True, acc=acc, device=dev_)
    flags = dict(
        HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, CARRY_NORM=carry_norm, HAS_GS=gs is not None,
        HAS_GV=gv is not None,
        NEED_GV0=need_gv0, INDEX_64=needs_int64(h4, g4, gv3), ACC_DTYPE=acc_dtype(acc), **lif_flags,
    )
    strides = (*_strides(g4, 4), *_strides(gv3, 3))
    synced = sync_sums is not None
    if not synced and uses_resident_path(N, C, S):
        tiles = resident_tiling(N, S)
        gth = torch.empty(C, dtype=acc, device=dev_)
        _mpbn_lif_resident_bwd_kernel[(C,)](
            g4, gv3, h4, mean, rstd, weight, bias, th, gx, gv0 if need_gv0 else None, gw, gb, gth,
            T, N, C, S, *strides, *scalars,
            BLOCK_N=tiles.BLOCK_N, BLOCK_S=tiles.BLOCK_S, **launch_options(LIF_WARPS(tiles.block), acc),
            **flags,
        )
        return gx.to(gx_dtype), gv0, gw, gb, gth

    tiles = pipelined_tiling(N, C, S)
    P = tiles.P
    ghat = torch.empty((2, *h.shape[1:]), dtype=acc, device=dev_)
    gdir = None if carry_norm else torch.empty((2, *h.shape[1:]), dtype=acc, device=dev_)
    pa = torch.empty((T, P, C), dtype=acc, device=dev_)
    pb = torch.empty((T, P, C), dtype=acc, device=dev_)
    pth = torch.empty((P, C), dtype=acc, device=dev_)
    if synced:  # per step: the global count, A [C], B [C]
        glob = torch.empty((T, 1 + 2 * C), dtype=SYNC_DTYPE, device=dev_)
        count = torch.full((1,), float(N * S), dtype=SYNC_DTYPE, device=dev_)
    grid, flat = tiles_grid(P, C)
    for t in range(T - 1, -2, -1):
        _mpbn_lif_pipelined_bwd_kernel[grid](
            g4, gv3, h4, ghat, gdir, gx, gv0 if need_gv0 else None, mean, rstd, weight, bias, th, pa, pb, pth, gw, gb,
            glob if synced else None, t, T, N, C, S, tiles.S_TILES, P, *strides, *scalars,
            FIRST=t == T - 1, LAST=t == -1, SYNCED=synced, BLOCK_N=tiles.BLOCK_N, BLOCK_S=tiles.BLOCK_S,
            BLOCK_P=min(next_pow2(P), MAX_BLOCK_P), FLAT_GRID=flat, **launch_options(PIPELINED_WARPS(tiles.block), acc),
            **flags,
        )
        if synced and t >= 0:  # step t's sums over every rank, before the launch that applies it
            local = torch.cat([count, pa[t].to(SYNC_DTYPE).sum(dim=0), pb[t].to(SYNC_DTYPE).sum(dim=0)])
            glob[t] = sync_sums(local).to(SYNC_DTYPE)
    return gx.to(gx_dtype), gv0, gw, gb, pth.sum(dim=0)
