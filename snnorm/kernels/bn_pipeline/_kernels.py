"""The statistics pipeline's kernels, stage by stage (the equations and the stages: the
package docstring, :mod:`snnorm.kernels.bn_pipeline`). Forward: ``stats_partial_kernel``
(stage 1, partials), ``_stats_reduce_kernel`` (stage 2), ``_apply_kernel`` (stages 3–4);
backward: ``_bwd_reduce_kernel``, ``_bwd_coef_kernel``, ``_bwd_dx_kernel``. Device
functions and modes: :mod:`snnorm.kernels._device`.

The elementwise kernels address every ``[T, N, C, S]`` tensor through its own element
strides (``_device.tile_offsets``): channels-last and transposed token-major inputs are read,
and their outputs written, in place. ``SAME_LAYOUT`` (every such tensor of the launch has the
same strides: the contiguous case, and any input whose output and gradient follow its format)
computes one set of offsets for all of them."""

from __future__ import annotations

import triton
import triton.language as tl

from .._device import (
    GROUPING_ALL,
    GROUPING_EACH,
    GROUPING_PREFIX,
    SCALE_NONE,
    chan_merge,
    channel_consts,
    combine_partials,
    div_rn,
    program_slice,
    scalar_arg,
    step_coefficients,
    step_scale,
    tile_offsets,
)


@triton.jit
def stats_partial_kernel(
    x_ptr,  # [T, N, C, S], element strides (sx_t, sx_n, sx_c, sx_s)
    part_mean_ptr,  # [P, C] out: mean of each program's slice
    part_m2_ptr,  # [P, C] out: Σ (x − mean)² of each program's slice
    part_count_ptr,  # [P] out: elements per channel in each program's slice
    N, C, S, N_PER_PROG, S_PER_PROG, N_SPLITS, sx_t, sx_n, sx_c, sx_s,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, ACC_DTYPE: tl.constexpr,
):
    """Stage 1: per-program (count, mean, M2) of its slice, merged tile by tile (Chan)."""
    t, n_lo, n_hi, s_lo, s_hi, part = program_slice(N, S, N_PER_PROG, S_PER_PROG, N_SPLITS)
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    count = tl.zeros((), ACC_DTYPE)
    mean = tl.zeros((BLOCK_C,), ACC_DTYPE)
    m2 = tl.zeros((BLOCK_C,), ACC_DTYPE)
    for n0 in range(n_lo, n_hi, BLOCK_N):
        for s0 in range(s_lo, s_hi, BLOCK_S):
            offs, mask = tile_offsets(t, n0, s0, n_hi, s_hi, c, c_mask, sx_t, sx_n, sx_c, sx_s, BLOCK_N, BLOCK_S)
            x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC_DTYPE)
            count_b = (tl.minimum(n_hi - n0, BLOCK_N) * tl.minimum(s_hi - s0, BLOCK_S)).to(ACC_DTYPE)
            mean_b = div_rn(tl.sum(tl.sum(x, axis=2), axis=0), count_b, ACC_DTYPE)
            d = tl.where(mask, x - mean_b[None, :, None], 0.0)
            m2_b = tl.sum(tl.sum(d * d, axis=2), axis=0)
            count, mean, m2 = chan_merge(count, mean, m2, count_b, mean_b, m2_b)
    tl.store(part_mean_ptr + part * C + c, mean, mask=c_mask)
    tl.store(part_m2_ptr + part * C + c, m2, mask=c_mask)
    tl.store(part_count_ptr + part, count, mask=tl.program_id(0) == 0)


@triton.jit
def _stats_reduce_kernel(
    part_mean_ptr,  # [G·PPG, C] partial means, PPG consecutive partials per group
    part_m2_ptr,  # [G·PPG, C]
    part_count_ptr,  # [G·PPG]
    mean_ptr,  # [G, C] out: μ of each statistics row
    var_ptr,  # [G, C] out: biased σ² (M2 itself with STORE_M2)
    running_mean_ptr,  # [G, C] updated in place when UPDATE_RUNNING (else None)
    running_var_ptr,  # [G, C] updated in place (unbiased) when UPDATE_RUNNING (else None)
    momentum_ptr,  # [G] per-row factors with PER_ROW_MOMENTUM (else None)
    momentum,  # the factor of every row without PER_ROW_MOMENTUM (an fp32 scalar)
    G, PPG, C,
    PREFIX_MERGE: tl.constexpr, UPDATE_RUNNING: tl.constexpr, PER_ROW_MOMENTUM: tl.constexpr,
    STORE_M2: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, ACC_DTYPE: tl.constexpr,
):
    """Stage 2: the partials of each group combined (vectorised chunks, Chan between
    chunks); with PREFIX_MERGE each group is merged into the triple of the groups before
    it. Row g's statistics are stored and its running statistics updated. Groups run in
    order with fixed shapes: deterministic. STORE_M2 stores M2 instead of σ² = M2/n (the
    per-step partials a synchronised reduce gathers: no M2 = σ²·n round trip)."""
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    count = tl.zeros((), ACC_DTYPE)
    mean = tl.zeros((BLOCK_C,), ACC_DTYPE)
    m2 = tl.zeros((BLOCK_C,), ACC_DTYPE)
    for g in range(0, G):
        count_g, mean_g, m2_g = combine_partials(
            part_mean_ptr, part_m2_ptr, part_count_ptr, g * PPG, (g + 1) * PPG, c, c_mask, C,
            BLOCK_P, BLOCK_C, ACC_DTYPE,
        )
        if PREFIX_MERGE:
            count, mean, m2 = chan_merge(count, mean, m2, count_g, mean_g, m2_g)
        else:
            count, mean, m2 = count_g, mean_g, m2_g
        row = g * C + c
        tl.store(mean_ptr + row, mean, mask=c_mask)
        if STORE_M2:
            tl.store(var_ptr + row, m2, mask=c_mask)
        else:
            tl.store(var_ptr + row, div_rn(m2, count, ACC_DTYPE), mask=c_mask)
        if UPDATE_RUNNING:
            if PER_ROW_MOMENTUM:
                m = tl.load(momentum_ptr + g).to(ACC_DTYPE)
            else:
                m = momentum
            r_mean = tl.load(running_mean_ptr + row, mask=c_mask, other=0.0).to(ACC_DTYPE)
            r_var = tl.load(running_var_ptr + row, mask=c_mask, other=0.0).to(ACC_DTYPE)
            r_mean = r_mean * (1.0 - m) + mean * m
            r_var = r_var * (1.0 - m) + div_rn(m2, count - 1.0, ACC_DTYPE) * m
            tl.store(running_mean_ptr + row, r_mean.to(running_mean_ptr.dtype.element_ty), mask=c_mask)
            tl.store(running_var_ptr + row, r_var.to(running_var_ptr.dtype.element_ty), mask=c_mask)


@triton.jit
def _apply_kernel(
    x_ptr,  # [T, N, C, S], element strides (sx_t, sx_n, sx_c, sx_s)
    y_ptr,  # [T, N, C, S] out, strides (sy_t, sy_n, sy_c, sy_s) (x's with SAME_LAYOUT)
    mean_ptr,  # [C] or [T, C]: batch or running mean
    var_ptr,  # [C] or [T, C]: biased batch variance or running variance
    w_ptr,  # γ ([C] or [T, C]), or None without HAS_WEIGHT
    b_ptr,  # β, or None without HAS_BIAS
    p_ptr,  # [T], or None with SCALE_NONE
    N, C, S, N_PER_PROG, S_PER_PROG, N_SPLITS, eps, sx_t, sx_n, sx_c, sx_s, sy_t, sy_n, sy_c, sy_s,
    PER_STEP: tl.constexpr, SCALE: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    SAME_LAYOUT: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, ACC_DTYPE: tl.constexpr,
):
    """Stage 4: y = a·(x − μ) + b over the program's slice of step t (y in its own strides;
    SAME_LAYOUT: x's, one set of offsets)."""
    eps = scalar_arg(eps, ACC_DTYPE)  # fp64: the full-precision ε (kernels/_device.kernel_scalars)
    t, n_lo, n_hi, s_lo, s_hi, part = program_slice(N, S, N_PER_PROG, S_PER_PROG, N_SPLITS)
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    mean, rstd, a, b = step_coefficients(
        t, c, c_mask, C, mean_ptr, var_ptr, w_ptr, b_ptr, p_ptr, eps, PER_STEP, SCALE, HAS_WEIGHT, HAS_BIAS,
        ACC_DTYPE,
    )
    mean3 = mean[None, :, None]
    a3 = a[None, :, None]
    b3 = b[None, :, None]
    for n0 in range(n_lo, n_hi, BLOCK_N):
        for s0 in range(s_lo, s_hi, BLOCK_S):
            offs, mask = tile_offsets(t, n0, s0, n_hi, s_hi, c, c_mask, sx_t, sx_n, sx_c, sx_s, BLOCK_N, BLOCK_S)
            x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC_DTYPE)
            y = (x - mean3) * a3 + b3
            if not SAME_LAYOUT:
                offs, mask = tile_offsets(t, n0, s0, n_hi, s_hi, c, c_mask, sy_t, sy_n, sy_c, sy_s, BLOCK_N, BLOCK_S)
            tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _bwd_reduce_kernel(
    gy_ptr,  # [T, N, C, S] ∂L/∂y, element strides (sg_t, sg_n, sg_c, sg_s) (x's with SAME_LAYOUT)
    x_ptr,  # [T, N, C, S], element strides (sx_t, sx_n, sx_c, sx_s)
    mean_ptr,  # [C] or [T, C]
    var_ptr,  # [C] or [T, C]
    part_a_ptr,  # [P, C] out: Σ g over the program's slice
    part_b_ptr,  # [P, C] out: Σ g·x̂ over the program's slice
    N, C, S, N_PER_PROG, S_PER_PROG, N_SPLITS, eps, sg_t, sg_n, sg_c, sg_s, sx_t, sx_n, sx_c, sx_s,
    PER_STEP: tl.constexpr, SAME_LAYOUT: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, ACC_DTYPE: tl.constexpr,
):
    """Backward stage 1: per-(t, c) partial sums Σg and Σg·x̂ (x̂ with the row's μ, r)."""
    eps = scalar_arg(eps, ACC_DTYPE)
    t, n_lo, n_hi, s_lo, s_hi, part = program_slice(N, S, N_PER_PROG, S_PER_PROG, N_SPLITS)
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    if PER_STEP:
        offs_c = t * C + c
    else:
        offs_c = c
    mean, rstd, gamma, beta = channel_consts(
        mean_ptr, var_ptr, None, None, offs_c, c_mask, eps, False, False, ACC_DTYPE
    )
    mean3 = mean[None, :, None]
    rstd3 = rstd[None, :, None]
    acc_g = tl.zeros((BLOCK_C,), ACC_DTYPE)
    acc_gx = tl.zeros((BLOCK_C,), ACC_DTYPE)
    for n0 in range(n_lo, n_hi, BLOCK_N):
        for s0 in range(s_lo, s_hi, BLOCK_S):
            offs, mask = tile_offsets(t, n0, s0, n_hi, s_hi, c, c_mask, sx_t, sx_n, sx_c, sx_s, BLOCK_N, BLOCK_S)
            x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC_DTYPE)
            if not SAME_LAYOUT:
                offs, mask = tile_offsets(t, n0, s0, n_hi, s_hi, c, c_mask, sg_t, sg_n, sg_c, sg_s, BLOCK_N, BLOCK_S)
            g = tl.load(gy_ptr + offs, mask=mask, other=0.0).to(ACC_DTYPE)
            # no mask needed: g is 0 on masked lanes (and the select spilled on sm_90, triton 3.6)
            x_hat = (x - mean3) * rstd3
            acc_g += tl.sum(tl.sum(g, axis=2), axis=0)
            acc_gx += tl.sum(tl.sum(g * x_hat, axis=2), axis=0)
    tl.store(part_a_ptr + part * C + c, acc_g, mask=c_mask)
    tl.store(part_b_ptr + part * C + c, acc_gx, mask=c_mask)


@triton.jit
def _bwd_coef_kernel(
    part_a_ptr,  # [T·PPS, C] Σ g of each program's slice (PPS per step, in order)
    part_b_ptr,  # [T·PPS, C] Σ g·x̂ of each slice
    mean_ptr,  # statistics rows: [C] (ALL) or [T, C]
    var_ptr,
    w_ptr,  # γ in the statistics' layout, or None without HAS_WEIGHT
    b_ptr,  # β, or None without HAS_BIAS
    p_ptr,  # [T], or None with SCALE_NONE
    dw_ptr,  # out: ∂L/∂γ in γ's layout
    db_ptr,  # out: ∂L/∂β in β's layout
    part_dp_ptr,  # [C_BLOCKS, T] out: the block's share of ∂L/∂p_t (SCALE != SCALE_NONE)
    grad_mean_ptr,  # out: ∂L/∂μ per statistics row
    grad_var_ptr,  # out: ∂L/∂σ² per statistics row
    coef_g_ptr,  # [T, C] out: k_t r_t
    coef_u_ptr,  # statistics rows, out: U when BATCH_STATS (else None)
    coef_v_ptr,  # statistics rows, out: V when BATCH_STATS (else None)
    count_ptr,  # [1] the values per (t, c) of every rank together with COUNT_FROM_PTR (else None)
    T, PPS, C, M, eps,
    GROUPING: tl.constexpr, SCALE: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    BATCH_STATS: tl.constexpr, COUNT_FROM_PTR: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
):
    """Backward stage 2: every per-(t, c) number, one program per block of channels.

    Steps run backwards so that PREFIX's sums over t ≥ s are running sums, centred on the
    last prefix mean μ_ref = μ_{T−1}: R_s = Σ ∂L/∂μ_t / n_t, V_s = Σ v_t,
    W_s = Σ v_t (μ_t − μ_ref), U_s = R_s + (μ_s − μ_ref)·V_s − W_s (prefix means differ
    from μ_ref by about σ: nothing cancels when |μ| ≫ σ).

    M is the values per (t, c) a statistics row pools per step: N·S, or with
    COUNT_FROM_PTR (synchronised statistics) every rank's together, read from the device
    (the all-reduce's result: no host round trip).
    """
    eps = scalar_arg(eps, ACC_DTYPE)
    if COUNT_FROM_PTR:
        m_step = tl.load(count_ptr).to(ACC_DTYPE)
    else:
        m_step = M  # a new name: M may be a specialised constexpr, never rebound to a tensor
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    # accumulators exist only where their grouping uses them (static ifs): a dead
    # loop-carried value cost triton 3.6 a local-memory spill
    r_sum = tl.zeros((BLOCK_C,), ACC_DTYPE)  # PREFIX: Σ ∂L/∂μ_t / n_t; ALL: Σ ∂L/∂μ|_t
    v_sum = tl.zeros((BLOCK_C,), ACC_DTYPE)  # PREFIX: Σ v_t; ALL: Σ ∂L/∂σ²|_t
    if GROUPING == GROUPING_ALL:
        dw_sum = tl.zeros((BLOCK_C,), ACC_DTYPE)  # Σ_t s_t B_t
        db_sum = tl.zeros((BLOCK_C,), ACC_DTYPE)  # Σ_t s_t A_t
    if GROUPING == GROUPING_PREFIX:
        if BATCH_STATS:
            mean_ref = tl.load(mean_ptr + (T - 1) * C + c, mask=c_mask, other=0.0).to(ACC_DTYPE)
            w_sum = tl.zeros((BLOCK_C,), ACC_DTYPE)
    for i in range(0, T):
        t = T - 1 - i
        if GROUPING != GROUPING_ALL:
            row = t * C + c
        else:
            row = c
        # rstd first: its correctly rounded √ and division call slow-path subroutines, and the
        # step's sums live across those calls spilled 4 B in fp64 (the same values either way)
        mean, rstd, gamma, beta = channel_consts(
            mean_ptr, var_ptr, w_ptr, b_ptr, row, c_mask, eps, HAS_WEIGHT, HAS_BIAS, ACC_DTYPE
        )
        # A_t, B_t: step t's partials summed in fixed-shape chunks (deterministic)
        sum_a = tl.zeros((BLOCK_C,), ACC_DTYPE)
        sum_b = tl.zeros((BLOCK_C,), ACC_DTYPE)
        for p0 in range(t * PPS, (t + 1) * PPS, BLOCK_P):
            p = p0 + tl.arange(0, BLOCK_P)
            mask = (p < (t + 1) * PPS)[:, None] & c_mask[None, :]
            offs = p[:, None] * C + c[None, :]
            sum_a += tl.sum(tl.load(part_a_ptr + offs, mask=mask, other=0.0).to(ACC_DTYPE), axis=0)
            sum_b += tl.sum(tl.load(part_b_ptr + offs, mask=mask, other=0.0).to(ACC_DTYPE), axis=0)
        s, ds = step_scale(p_ptr, t, SCALE, ACC_DTYPE)
        k = s * gamma
        grad_mean = -k * rstd * sum_a  # step t's share of ∂L/∂μ of the row it read
        grad_var = -0.5 * k * rstd * rstd * sum_b
        tl.store(coef_g_ptr + t * C + c, k * rstd, mask=c_mask)
        if SCALE != SCALE_NONE:
            dp = ds * tl.sum(tl.where(c_mask, gamma * sum_b + beta * sum_a, 0.0), axis=0)
            tl.store(part_dp_ptr + tl.program_id(0) * T + t, dp)
        if GROUPING == GROUPING_ALL:
            dw_sum += s * sum_b
            db_sum += s * sum_a
            r_sum += grad_mean
            v_sum += grad_var
        else:
            tl.store(dw_ptr + row, s * sum_b, mask=c_mask)
            tl.store(db_ptr + row, s * sum_a, mask=c_mask)
            tl.store(grad_mean_ptr + row, grad_mean, mask=c_mask)
            tl.store(grad_var_ptr + row, grad_var, mask=c_mask)
            if BATCH_STATS:
                if GROUPING == GROUPING_EACH:
                    tl.store(coef_u_ptr + row, grad_mean / m_step, mask=c_mask)
                    tl.store(coef_v_ptr + row, 2.0 * grad_var / m_step, mask=c_mask)
                else:
                    n_t = (t + 1).to(ACC_DTYPE) * m_step  # M may be a specialised constant 1
                    v = 2.0 * grad_var / n_t
                    r_sum += grad_mean / n_t
                    v_sum += v
                    w_sum += v * (mean - mean_ref)
                    tl.store(coef_u_ptr + row, r_sum + (mean - mean_ref) * v_sum - w_sum, mask=c_mask)
                    tl.store(coef_v_ptr + row, v_sum, mask=c_mask)
    if GROUPING == GROUPING_ALL:
        tl.store(dw_ptr + c, dw_sum, mask=c_mask)
        tl.store(db_ptr + c, db_sum, mask=c_mask)
        tl.store(grad_mean_ptr + c, r_sum, mask=c_mask)
        tl.store(grad_var_ptr + c, v_sum, mask=c_mask)
        if BATCH_STATS:
            n = (tl.zeros((), ACC_DTYPE) + T) * m_step  # T, M may be specialised constants (1)
            tl.store(coef_u_ptr + c, r_sum / n, mask=c_mask)
            tl.store(coef_v_ptr + c, 2.0 * v_sum / n, mask=c_mask)


@triton.jit
def _bwd_dx_kernel(
    gy_ptr,  # [T, N, C, S] ∂L/∂y, element strides (sg_t, sg_n, sg_c, sg_s)
    x_ptr,  # [T, N, C, S], strides (sx_t, sx_n, sx_c, sx_s), or None without BATCH_STATS
    dx_ptr,  # [T, N, C, S] out ∂L/∂x, strides (sd_t, sd_n, sd_c, sd_s)
    mean_ptr,  # statistics rows, or None without BATCH_STATS
    coef_g_ptr,  # [T, C] k_t r_t
    coef_u_ptr,  # statistics rows: U, or None without BATCH_STATS
    coef_v_ptr,  # statistics rows: V, or None without BATCH_STATS
    N, C, S, N_PER_PROG, S_PER_PROG, N_SPLITS,
    sg_t, sg_n, sg_c, sg_s, sx_t, sx_n, sx_c, sx_s, sd_t, sd_n, sd_c, sd_s,
    PER_STEP: tl.constexpr, BATCH_STATS: tl.constexpr, SAME_LAYOUT: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, ACC_DTYPE: tl.constexpr,
):
    """Backward stage 3: ∂x = k_t r_t·g + U + V·(x − μ) elementwise. SAME_LAYOUT: ∂y, x and
    ∂x share ∂y's strides (one set of offsets)."""
    t, n_lo, n_hi, s_lo, s_hi, part = program_slice(N, S, N_PER_PROG, S_PER_PROG, N_SPLITS)
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    k_g = tl.load(coef_g_ptr + t * C + c, mask=c_mask, other=0.0).to(ACC_DTYPE)[None, :, None]
    if BATCH_STATS:
        if PER_STEP:
            row = t * C + c
        else:
            row = c
        mean3 = tl.load(mean_ptr + row, mask=c_mask, other=0.0).to(ACC_DTYPE)[None, :, None]
        u3 = tl.load(coef_u_ptr + row, mask=c_mask, other=0.0).to(ACC_DTYPE)[None, :, None]
        v3 = tl.load(coef_v_ptr + row, mask=c_mask, other=0.0).to(ACC_DTYPE)[None, :, None]
    for n0 in range(n_lo, n_hi, BLOCK_N):
        for s0 in range(s_lo, s_hi, BLOCK_S):
            offs, mask = tile_offsets(t, n0, s0, n_hi, s_hi, c, c_mask, sg_t, sg_n, sg_c, sg_s, BLOCK_N, BLOCK_S)
            g = tl.load(gy_ptr + offs, mask=mask, other=0.0).to(ACC_DTYPE)
            dx = g * k_g
            if BATCH_STATS:  # the path through the statistics
                if not SAME_LAYOUT:
                    offs, mask = tile_offsets(t, n0, s0, n_hi, s_hi, c, c_mask, sx_t, sx_n, sx_c, sx_s, BLOCK_N,
                                              BLOCK_S)
                x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC_DTYPE)
                dx = dx + u3 + (x - mean3) * v3
            if not SAME_LAYOUT:
                offs, mask = tile_offsets(t, n0, s0, n_hi, s_hi, c, c_mask, sd_t, sd_n, sd_c, sd_s, BLOCK_N, BLOCK_S)
            tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)
