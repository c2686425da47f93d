"""Fused Triton kernels for Temporal Accumulated Batch Normalization (TAB).

TAB (Jiang et al., "TAB: Temporal Accumulated Batch Normalization in Spiking Neural
Networks", ICLR 2024) normalises step t with the statistics of steps 0..t::

    μ_t, σ²_t = mean and biased variance of x[0..t] per channel, over n_t = (t+1)·M
                values (M = N·S per step)
    x̂_t = (x_t − μ_t)·r_t,   r_t = 1/√(σ²_t + ε)
    y_t = p_t²·(γ_t x̂_t + β_t)                       (γ_t, β_t ∈ R^C per step)

Forward, O(T) passes instead of the official code's O(T²):

1. per-(t, c) partial statistics: each program keeps a (count, mean, M2) triple of its
   slice of step t (the partial-statistics kernel shared with TEBN);
2. an in-order prefix combine (``_tab_prefix_kernel``, one program per channel block):
   step t's partials are combined at once in vectorised chunks (TEBN's parallel combine)
   and Chan's formula merges them into the prefix triple of steps 0..t−1, writing μ_t,
   σ²_t after each step and updating the per-step running statistics
   (r_μ[t] ← (1 − m_t)·r_μ[t] + m_t·μ_t, r_σ²[t] likewise with M2_t/(n_t − 1));
3. one fused normalise·affine·p² pass (``_tab_fwd_kernel``). Eval (running statistics)
   is this pass alone.

Backward, with g = ∂L/∂y, k_t = p_t²·γ_t and per-(t, c) sums over step t's M values
A_t = Σ g, B_t = Σ g·x̂_t (``_tab_bwd_reduce_kernel``)::

    ∂L/∂β_t = p_t²·A_t,   ∂L/∂γ_t = p_t²·B_t,   ∂L/∂p_t = 2 p_t Σ_c (γ_t B_t + β_t A_t)
    ∂L/∂μ_t = −k_t r_t A_t,   ∂L/∂σ²_t = −½ k_t r_t² B_t

and, since μ_t, σ²_t depend on every x_s with s ≤ t (∂μ_t/∂x_s = 1/n_t,
∂σ²_t/∂x_s = 2(x_s − μ_t)/n_t), for an element of step s::

    ∂L/∂x_s = k_s r_s g + U_s + V_s·(x_s − μ_s)
    V_s = Σ_{t≥s} v_t,  v_t = −k_t r_t² B_t / n_t
    U_s = Σ_{t≥s} (−k_t r_t A_t / n_t + v_t (μ_s − μ_t))

reverse sums over steps, run by ``_tab_bwd_coef_kernel`` (one program per block of
channels, steps backwards; it also gives ∂γ, ∂β, ∂p and ∂μ, ∂σ²), then one elementwise
pass (``_tab_bwd_dx_kernel``). Centring on μ_s keeps the precision when |μ| ≫ σ. Traffic
as TEBN: forward reads x twice and writes y; backward reads g and x twice, writes ∂x.

Layout: ``[T, N, C, *spatial]`` made contiguous and viewed as ``[T, N, C, S]``; the tile
grid, program slices, per-channel constant loads, partial statistics and their combine,
and the grid sized from the compiled kernel's register count are shared with TEBN
(:mod:`snnorm.kernels._bn_tiles`), with per-step vectors addressed at row t of ``[T, C]``
tensors. Absent tensors (γ, β, running statistics) reach the kernels as ``None`` with a
``HAS_*``/``UPDATE_RUNNING``/``BATCH_STATS`` flag. Arithmetic in fp32 (fp64 for fp64
inputs); y in the input dtype promoted with p's; no float atomics (partials are reduced
in a fixed order).

Registered ops (``torch.library.custom_op`` with fake kernels and autograd, so they trace
under ``torch.compile(fullgraph=True)``): ``snnorm::tab_stats`` (prefix statistics; mutates
the running statistics; gets a detached input), ``snnorm::tab_apply`` (normalise·affine·p²,
differentiable; its backward includes the path through the prefix statistics when
``batch_stats``, else returns ∂L/∂μ, ∂L/∂σ² for the caller's autograd) and
``snnorm::tab_apply_backward``.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import triton
import triton.language as tl

from ..backends import torch_backend
from ._bn_tiles import (
    as_tncs,
    chan_merge,
    channel_consts,
    combine_partials,
    combine_tiles,
    contiguous_or_none,
    fitted_geometry,
    launch_partial_stats,
    program_slice,
    slice_args,
    tile_constexprs,
    tile_offsets,
)
from ._common import acc_dtype, acc_torch_dtype, check_device

__all__ = ["tab"]


# ----------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------


@triton.jit
def _tab_prefix_kernel(
    part_mean_ptr,  # [T·PPS, C] mean of each program's slice (PPS programs per step, in order)
    part_m2_ptr,  # [T·PPS, C] Σ (x − mean)² of each slice
    part_count_ptr,  # [T·PPS] values per channel in each slice
    mean_ptr,  # [T, C] out: μ_t of steps 0..t
    var_ptr,  # [T, C] out: biased σ²_t of steps 0..t
    running_mean_ptr,  # [T, C] updated in place when UPDATE_RUNNING (else None)
    running_var_ptr,  # [T, C] updated in place (unbiased) when UPDATE_RUNNING (else None)
    momentum_ptr,  # [T] per-step factors with PER_STEP_MOMENTUM (else None)
    momentum,  # the factor of every step without PER_STEP_MOMENTUM (an fp32 scalar)
    T, PPS, C,
    UPDATE_RUNNING: tl.constexpr, PER_STEP_MOMENTUM: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, ACC_DTYPE: tl.constexpr,
):
    """Prefix statistics of a block of channels: step t's PPS partials are combined at
    once (``combine_partials``, vectorised chunks), then merged into the prefix triple of
    steps 0..t−1 with Chan's formula. Steps in order, fixed shapes: deterministic."""
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    count = tl.zeros((), ACC_DTYPE)
    mean = tl.zeros((BLOCK_C,), ACC_DTYPE)
    m2 = tl.zeros((BLOCK_C,), ACC_DTYPE)
    for t in range(0, T):  # in order: step t's prefix is steps 0..t
        count_t, mean_t, m2_t = combine_partials(
            part_mean_ptr, part_m2_ptr, part_count_ptr, t * PPS, (t + 1) * PPS, c, c_mask, C,
            BLOCK_P, BLOCK_C, ACC_DTYPE,
        )
        count, mean, m2 = chan_merge(count, mean, m2, count_t, mean_t, m2_t)
        row = t * C + c
        tl.store(mean_ptr + row, mean, mask=c_mask)
        tl.store(var_ptr + row, m2 / count, mask=c_mask)
        if UPDATE_RUNNING:
            if PER_STEP_MOMENTUM:
                m = tl.load(momentum_ptr + t).to(ACC_DTYPE)
            else:
                m = momentum
            r_mean = tl.load(running_mean_ptr + row, mask=c_mask, other=0.0).to(ACC_DTYPE)
            r_var = tl.load(running_var_ptr + row, mask=c_mask, other=0.0).to(ACC_DTYPE)
            r_mean = r_mean * (1.0 - m) + mean * m
            r_var = r_var * (1.0 - m) + (m2 / (count - 1.0)) * m
            tl.store(running_mean_ptr + row, r_mean.to(running_mean_ptr.dtype.element_ty), mask=c_mask)
            tl.store(running_var_ptr + row, r_var.to(running_var_ptr.dtype.element_ty), mask=c_mask)


@triton.jit
def _tab_fwd_kernel(
    x_ptr,  # [T, N, C, S] contiguous
    y_ptr,  # [T, N, C, S] out
    mean_ptr,  # [T, C] prefix or running mean
    var_ptr,  # [T, C] prefix (biased) or running variance
    w_ptr,  # [T, C] γ_t, or None without HAS_WEIGHT
    b_ptr,  # [T, C] β_t, or None without HAS_BIAS
    p_ptr,  # [T]
    N, C, S, N_PER_PROG, S_PER_PROG, N_SPLITS, eps,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, ACC_DTYPE: tl.constexpr,
):
    t, n_lo, n_hi, s_lo, s_hi, part = program_slice(N, S, N_PER_PROG, S_PER_PROG, N_SPLITS)
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    mean, rstd, gamma, beta = channel_consts(
        mean_ptr, var_ptr, w_ptr, b_ptr, t * C + c, c_mask, eps, HAS_WEIGHT, HAS_BIAS, ACC_DTYPE
    )
    p_t = tl.load(p_ptr + t).to(ACC_DTYPE)
    p2 = p_t * p_t
    # y = (x − μ_t)·(p² γ r) + p² β: subtracting μ first keeps precision when |μ| ≫ σ.
    scale = (p2 * gamma * rstd)[None, :, None]
    shift = (p2 * beta)[None, :, None]
    mean3 = mean[None, :, None]
    for n0 in range(n_lo, n_hi, BLOCK_N):
        for s0 in range(s_lo, s_hi, BLOCK_S):
            offs, mask = tile_offsets(t, n0, s0, n_hi, s_hi, c, c_mask, N, C, S, BLOCK_N, BLOCK_S)
            x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC_DTYPE)
            y = (x - mean3) * scale + shift
            tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _tab_bwd_reduce_kernel(
    gy_ptr,  # [T, N, C, S] contiguous ∂L/∂y
    x_ptr,  # [T, N, C, S] contiguous
    mean_ptr,  # [T, C]
    var_ptr,  # [T, C]
    part_a_ptr,  # [P, C] out: Σ g over the program's slice
    part_b_ptr,  # [P, C] out: Σ g·x̂ over the program's slice
    N, C, S, N_PER_PROG, S_PER_PROG, N_SPLITS, eps,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, ACC_DTYPE: tl.constexpr,
):
    t, n_lo, n_hi, s_lo, s_hi, part = program_slice(N, S, N_PER_PROG, S_PER_PROG, N_SPLITS)
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    mean, rstd, gamma, beta = channel_consts(
        mean_ptr, var_ptr, None, None, t * C + c, c_mask, eps, False, False, ACC_DTYPE
    )
    mean3 = mean[None, :, None]
    rstd3 = rstd[None, :, None]
    acc_g = tl.zeros((BLOCK_C,), ACC_DTYPE)
    acc_gx = tl.zeros((BLOCK_C,), ACC_DTYPE)
    for n0 in range(n_lo, n_hi, BLOCK_N):
        for s0 in range(s_lo, s_hi, BLOCK_S):
            offs, mask = tile_offsets(t, n0, s0, n_hi, s_hi, c, c_mask, N, C, S, BLOCK_N, BLOCK_S)
            g = tl.load(gy_ptr + offs, mask=mask, other=0.0).to(ACC_DTYPE)
            x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC_DTYPE)
            x_hat = tl.where(mask, (x - mean3) * rstd3, 0.0)
            acc_g += tl.sum(tl.sum(g, axis=2), axis=0)
            acc_gx += tl.sum(tl.sum(g * x_hat, axis=2), axis=0)
    tl.store(part_a_ptr + part * C + c, acc_g, mask=c_mask)
    tl.store(part_b_ptr + part * C + c, acc_gx, mask=c_mask)


@triton.jit
def _tab_bwd_coef_kernel(
    part_a_ptr,  # [T·PPS, C] Σ g of each program's slice (PPS per step, in order)
    part_b_ptr,  # [T·PPS, C] Σ g·x̂ of each slice
    mean_ptr,  # [T, C] μ_t
    var_ptr,  # [T, C] σ²_t
    w_ptr,  # [T, C] γ_t, or None without HAS_WEIGHT
    b_ptr,  # [T, C] β_t, or None without HAS_BIAS
    p_ptr,  # [T]
    dw_ptr,  # [T, C] out: ∂L/∂γ_t = p_t² B_t
    db_ptr,  # [T, C] out: ∂L/∂β_t = p_t² A_t
    part_dp_ptr,  # [C_BLOCKS, T] out: the block's share of ∂L/∂p_t
    grad_mean_ptr,  # [T, C] out: ∂L/∂μ_t = −k_t r_t A_t
    grad_var_ptr,  # [T, C] out: ∂L/∂σ²_t = −½ k_t r_t² B_t
    coef_g_ptr,  # [T, C] out: k_t r_t
    coef_u_ptr,  # [T, C] out: U_t when BATCH_STATS (else None)
    coef_v_ptr,  # [T, C] out: V_t when BATCH_STATS (else None)
    T, PPS, C, M, eps,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, BATCH_STATS: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, ACC_DTYPE: tl.constexpr,
):
    """Every per-(t, c) number of the backward, one program per block of channels.

    Steps run backwards, so that the reverse sums over t ≥ s are running sums:
    R_s = Σ ∂L/∂μ_t / n_t, V_s = Σ v_t and, centred on the last prefix mean μ_ref = μ_{T−1}
    (prefix means differ from it by about σ, so nothing cancels when |μ| ≫ σ),
    W_s = Σ v_t (μ_t − μ_ref); then U_s = R_s + (μ_s − μ_ref)·V_s − W_s.
    """
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    if BATCH_STATS:
        mean_ref = tl.load(mean_ptr + (T - 1) * C + c, mask=c_mask, other=0.0).to(ACC_DTYPE)
    r_sum = tl.zeros((BLOCK_C,), ACC_DTYPE)
    v_sum = tl.zeros((BLOCK_C,), ACC_DTYPE)
    w_sum = tl.zeros((BLOCK_C,), ACC_DTYPE)
    for i in range(0, T):
        t = T - 1 - i
        # A_t, B_t: step t's partials summed in fixed-shape chunks (deterministic)
        sum_a = tl.zeros((BLOCK_C,), ACC_DTYPE)
        sum_b = tl.zeros((BLOCK_C,), ACC_DTYPE)
        for p0 in range(t * PPS, (t + 1) * PPS, BLOCK_P):
            p = p0 + tl.arange(0, BLOCK_P)
            mask = (p < (t + 1) * PPS)[:, None] & c_mask[None, :]
            offs = p[:, None] * C + c[None, :]
            sum_a += tl.sum(tl.load(part_a_ptr + offs, mask=mask, other=0.0).to(ACC_DTYPE), axis=0)
            sum_b += tl.sum(tl.load(part_b_ptr + offs, mask=mask, other=0.0).to(ACC_DTYPE), axis=0)
        row = t * C + c
        mean, rstd, gamma, beta = channel_consts(
            mean_ptr, var_ptr, w_ptr, b_ptr, row, c_mask, eps, HAS_WEIGHT, HAS_BIAS, ACC_DTYPE
        )
        p_t = tl.load(p_ptr + t).to(ACC_DTYPE)
        p2 = p_t * p_t
        k = p2 * gamma
        grad_mean = -k * rstd * sum_a
        grad_var = -0.5 * k * rstd * rstd * sum_b
        tl.store(dw_ptr + row, p2 * sum_b, mask=c_mask)
        tl.store(db_ptr + row, p2 * sum_a, mask=c_mask)
        tl.store(grad_mean_ptr + row, grad_mean, mask=c_mask)
        tl.store(grad_var_ptr + row, grad_var, mask=c_mask)
        tl.store(coef_g_ptr + row, k * rstd, mask=c_mask)
        dp = 2.0 * p_t * tl.sum(tl.where(c_mask, gamma * sum_b + beta * sum_a, 0.0), axis=0)
        tl.store(part_dp_ptr + tl.program_id(0) * T + t, dp)
        if BATCH_STATS:
            n_t = (t + 1).to(ACC_DTYPE) * M  # M may be a specialised constant 1
            v = 2.0 * grad_var / n_t  # v_t = −k_t r_t² B_t / n_t
            r_sum += grad_mean / n_t
            v_sum += v
            w_sum += v * (mean - mean_ref)
            tl.store(coef_u_ptr + row, r_sum + (mean - mean_ref) * v_sum - w_sum, mask=c_mask)
            tl.store(coef_v_ptr + row, v_sum, mask=c_mask)


@triton.jit
def _tab_bwd_dx_kernel(
    gy_ptr,  # [T, N, C, S] contiguous ∂L/∂y
    x_ptr,  # [T, N, C, S] contiguous, or None without BATCH_STATS
    dx_ptr,  # [T, N, C, S] out ∂L/∂x
    mean_ptr,  # [T, C] μ_s, or None without BATCH_STATS
    coef_g_ptr,  # [T, C] k_s r_s
    coef_u_ptr,  # [T, C] U_s, or None without BATCH_STATS
    coef_v_ptr,  # [T, C] V_s, or None without BATCH_STATS
    N, C, S, N_PER_PROG, S_PER_PROG, N_SPLITS,
    BATCH_STATS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, ACC_DTYPE: tl.constexpr,
):
    t, n_lo, n_hi, s_lo, s_hi, part = program_slice(N, S, N_PER_PROG, S_PER_PROG, N_SPLITS)
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    row = t * C + c
    k_g = tl.load(coef_g_ptr + row, mask=c_mask, other=0.0).to(ACC_DTYPE)[None, :, None]
    if BATCH_STATS:
        mean3 = tl.load(mean_ptr + row, mask=c_mask, other=0.0).to(ACC_DTYPE)[None, :, None]
        u3 = tl.load(coef_u_ptr + row, mask=c_mask, other=0.0).to(ACC_DTYPE)[None, :, None]
        v3 = tl.load(coef_v_ptr + row, mask=c_mask, other=0.0).to(ACC_DTYPE)[None, :, None]
    for n0 in range(n_lo, n_hi, BLOCK_N):
        for s0 in range(s_lo, s_hi, BLOCK_S):
            offs, mask = tile_offsets(t, n0, s0, n_hi, s_hi, c, c_mask, N, C, S, BLOCK_N, BLOCK_S)
            g = tl.load(gy_ptr + offs, mask=mask, other=0.0).to(ACC_DTYPE)
            dx = g * k_g
            if BATCH_STATS:  # the path through the prefix statistics of steps s..T−1
                x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC_DTYPE)
                dx = dx + u3 + (x - mean3) * v3
            tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------


def _launch_tab_stats(
    x: torch.Tensor,
    running_mean: Optional[torch.Tensor],
    running_var: Optional[torch.Tensor],
    momentum: Sequence[float],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prefix (μ_t, biased σ²_t) ``[T, C]``; updates the per-step running stats in place."""
    x4, T, N, C, S = as_tncs(x)
    acc = acc_torch_dtype(x.dtype)

    part_mean, part_m2, part_count, geo = launch_partial_stats(x4, T, N, C, S, acc)

    mean = torch.empty(T, C, dtype=acc, device=x.device)
    var = torch.empty(T, C, dtype=acc, device=x.device)
    update = running_mean is not None and running_var is not None
    # the kernel updates contiguous buffers in place; a strided one goes through a copy
    r_mean = contiguous_or_none(running_mean) if update else None
    r_var = contiguous_or_none(running_var) if update else None
    # One factor for every step (the usual case) goes as a scalar: no host-to-device copy.
    # Triton passes Python floats as fp32, so fp64 keeps the tensor.
    per_step_momentum = update and (len(set(momentum)) > 1 or acc == torch.float64)
    factors = torch.tensor(list(momentum), dtype=acc, device=x.device) if per_step_momentum else None
    momentum0 = float(momentum[0]) if update and len(momentum) else 0.0
    per_step = geo.parts // T
    block_p, block_c = combine_tiles(per_step, C, x.device.type != "cuda")
    _tab_prefix_kernel[(triton.cdiv(C, block_c),)](
        part_mean, part_m2, part_count, mean, var, r_mean, r_var, factors, momentum0,
        T, per_step, C,
        UPDATE_RUNNING=update, PER_STEP_MOMENTUM=per_step_momentum,
        BLOCK_P=block_p, BLOCK_C=block_c, ACC_DTYPE=acc_dtype(acc), num_warps=4,
    )
    if update and r_mean.data_ptr() != running_mean.data_ptr():
        running_mean.copy_(r_mean)
    if update and r_var.data_ptr() != running_var.data_ptr():
        running_var.copy_(r_var)
    return mean, var


def _launch_tab_fwd(x, weight, bias, mean, var, p, eps: float) -> torch.Tensor:
    """y_t = p_t²·(γ_t (x_t − μ_t)/√(σ²_t + ε) + β_t) in one elementwise pass."""
    x4, T, N, C, S = as_tncs(x)
    acc = acc_torch_dtype(x.dtype)
    y = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, p.dtype), device=x.device)
    if x.numel() == 0:
        return y
    head = (x4, y, mean.contiguous(), var.contiguous(), contiguous_or_none(weight), contiguous_or_none(bias),
            p.contiguous(), N, C, S)
    flags = dict(HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, ACC_DTYPE=acc_dtype(acc))
    geo = fitted_geometry(_tab_fwd_kernel, T, N, C, S, x.device, x.dtype,
                          lambda g: (*head, *slice_args(g), float(eps)), flags)
    _tab_fwd_kernel[geo.grid](*head, *slice_args(geo), float(eps), **flags, **tile_constexprs(geo))
    return y


def _launch_tab_bwd(grad_y, x, weight, bias, mean, var, p, eps: float, batch_stats: bool, need_dx: bool):
    """(∂x, ∂γ, ∂β, ∂p, ∂μ, ∂σ²); all but ∂x in the accumulation dtype, per step [T, C] / [T].

    Three launches: the per-slice sums A, B; every per-(t, c) coefficient; ∂x (when needed).
    """
    x4, T, N, C, S = as_tncs(x)
    g4 = grad_y.contiguous().view(T, N, C, S)
    acc = acc_torch_dtype(x.dtype)
    dev = x.device
    mean, var = mean.contiguous(), var.contiguous()
    flags = dict(ACC_DTYPE=acc_dtype(acc))
    if x.numel() == 0:  # an empty batch (eval): no partials, so A = B = 0 and zero gradients
        part_a = part_b = torch.empty(0, C, dtype=acc, device=dev)
    else:

        def reduce_args(geo):
            part_a = torch.empty(geo.parts, C, dtype=acc, device=dev)
            part_b = torch.empty(geo.parts, C, dtype=acc, device=dev)
            return (g4, x4, mean, var, part_a, part_b, N, C, S, *slice_args(geo), float(eps))

        geo = fitted_geometry(_tab_bwd_reduce_kernel, T, N, C, S, dev, x.dtype, reduce_args, flags)
        args = reduce_args(geo)
        _tab_bwd_reduce_kernel[geo.grid](*args, **flags, **tile_constexprs(geo))
        part_a, part_b = args[4:6]
    per_step = part_a.shape[0] // T
    tc = dict(dtype=acc, device=dev)
    dw, db, grad_mean, grad_var, coef_g = (torch.empty(T, C, **tc) for _ in range(5))
    coef_u, coef_v = (torch.empty(T, C, **tc), torch.empty(T, C, **tc)) if batch_stats else (None, None)
    block_p, block_c = combine_tiles(max(per_step, 1), C, dev.type != "cuda")
    c_blocks = triton.cdiv(C, block_c)
    part_dp = torch.empty(c_blocks, T, **tc)
    _tab_bwd_coef_kernel[(c_blocks,)](
        part_a, part_b, mean, var, contiguous_or_none(weight), contiguous_or_none(bias), p.contiguous(),
        dw, db, part_dp, grad_mean, grad_var, coef_g, coef_u, coef_v,
        T, per_step, C, N * S, float(eps),
        HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, BATCH_STATS=batch_stats,
        BLOCK_P=block_p, BLOCK_C=block_c, num_warps=4, **flags,
    )
    dp = part_dp.sum(0)  # a fixed-shape reduction over channel blocks: deterministic
    if not need_dx:
        dx = x.new_empty(0)  # not needed: no full-size allocation
    elif x.numel() == 0:
        dx = torch.empty(x.shape, dtype=x.dtype, device=dev)
    else:
        dx = torch.empty(x.shape, dtype=x.dtype, device=dev)
        if batch_stats:
            head = (g4, x4, dx, mean, coef_g, coef_u, coef_v, N, C, S)
        else:  # constant statistics: ∂x = k r g
            head = (g4, None, dx, None, coef_g, None, None, N, C, S)
        dx_flags = dict(BATCH_STATS=batch_stats, **flags)
        geo = fitted_geometry(_tab_bwd_dx_kernel, T, N, C, S, dev, x.dtype, lambda g: (*head, *slice_args(g)),
                              dx_flags)
        _tab_bwd_dx_kernel[geo.grid](*head, *slice_args(geo), **dx_flags, **tile_constexprs(geo))
    return dx, dw, db, dp, grad_mean, grad_var


# ----------------------------------------------------------------------------------------
# Op registration
# ----------------------------------------------------------------------------------------


@torch.library.custom_op("snnorm::tab_stats", mutates_args=("running_mean", "running_var"))
def _tab_stats_op(
    x: torch.Tensor,
    running_mean: Optional[torch.Tensor],
    running_var: Optional[torch.Tensor],
    momentum: list[float],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prefix (mean, biased variance) ``[T, C]`` of steps 0..t; running stats updated per step."""
    check_device("tab", x)
    return _launch_tab_stats(x, running_mean, running_var, momentum)


@_tab_stats_op.register_fake
def _(x, running_mean, running_var, momentum):
    acc = acc_torch_dtype(x.dtype)
    T, C = x.shape[0], x.shape[2]
    return x.new_empty(T, C, dtype=acc), x.new_empty(T, C, dtype=acc)


@torch.library.custom_op("snnorm::tab_apply", mutates_args=())
def _tab_apply_op(
    x: torch.Tensor,
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    mean: torch.Tensor,
    var: torch.Tensor,
    p: torch.Tensor,
    eps: float,
    batch_stats: bool,
) -> torch.Tensor:
    """y_t = p_t²·(γ_t x̂_t + β_t) with the given per-step (mean, variance) ``[T, C]``.

    ``batch_stats``: (mean, var) are x's own prefix statistics (the backward then includes
    their dependence on x); otherwise constants, or tensors whose gradient the backward
    returns (∂L/∂μ, ∂L/∂σ²) for autograd to carry on.
    """
    check_device("tab", x)
    return _launch_tab_fwd(x, weight, bias, mean, var, p, eps)


@_tab_apply_op.register_fake
def _(x, weight, bias, mean, var, p, eps, batch_stats):
    return torch.empty_like(x, dtype=torch.promote_types(x.dtype, p.dtype), memory_format=torch.contiguous_format)


@torch.library.custom_op("snnorm::tab_apply_backward", mutates_args=())
def _tab_apply_backward_op(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    mean: torch.Tensor,
    var: torch.Tensor,
    p: torch.Tensor,
    eps: float,
    batch_stats: bool,
    need_dx: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    check_device("tab", x)
    return _launch_tab_bwd(grad_y, x, weight, bias, mean, var, p, eps, batch_stats, need_dx)


@_tab_apply_backward_op.register_fake
def _(grad_y, x, weight, bias, mean, var, p, eps, batch_stats, need_dx):
    acc = acc_torch_dtype(x.dtype)
    T, C = x.shape[0], x.shape[2]
    dx = torch.empty_like(x, memory_format=torch.contiguous_format) if need_dx else x.new_empty(0)
    tc = (T, C)
    return dx, x.new_empty(tc, dtype=acc), x.new_empty(tc, dtype=acc), x.new_empty(T, dtype=acc), \
        x.new_empty(tc, dtype=acc), x.new_empty(tc, dtype=acc)


def _tab_apply_setup_context(ctx, inputs, output):
    x, weight, bias, mean, var, p, eps, batch_stats = inputs
    ctx.save_for_backward(x, weight, bias, mean, var, p)
    ctx.eps = eps
    ctx.batch_stats = batch_stats


def _tab_apply_backward(ctx, grad_y):
    x, weight, bias, mean, var, p = ctx.saved_tensors
    need = ctx.needs_input_grad
    dx, dw, db, dp, dmean, dvar = torch.ops.snnorm.tab_apply_backward(
        grad_y, x, weight, bias, mean, var, p, ctx.eps, ctx.batch_stats, need[0]
    )
    return (
        dx if need[0] else None,
        dw.to(weight.dtype) if need[1] else None,
        db.to(bias.dtype) if need[2] else None,
        dmean.to(mean.dtype) if need[3] else None,  # only when (mean, var) carry their own graph
        dvar.to(var.dtype) if need[4] else None,
        dp.to(p.dtype) if need[5] else None,
        None,
        None,
    )


_tab_apply_op.register_autograd(_tab_apply_backward, setup_context=_tab_apply_setup_context)


# ----------------------------------------------------------------------------------------
# Public op
# ----------------------------------------------------------------------------------------


def tab(
    x_seq: torch.Tensor,
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    running_mean: Optional[torch.Tensor],
    running_var: Optional[torch.Tensor],
    p: torch.Tensor,
    *,
    training: bool,
    momentum: Sequence[float],
    eps: float,
    prefix: Optional[tuple] = None,
) -> tuple[torch.Tensor, Optional[tuple]]:
    """Temporal accumulated BN (Jiang et al., ICLR 2024): y_t = p_t²·(γ_t x̂_t + β_t), x̂_t
    normalised with the statistics of steps 0..t.

    Same signature and semantics as :func:`snnorm.backends.torch_backend.tab`. A whole
    sequence (``prefix=None``) runs on the kernels above. A continuation (single-step
    mode, ``prefix`` given) gets its statistics from the torch reference's differentiable
    helpers (a step's worth of data; the returned prefix must carry the gradient to the
    earlier steps) and the fused apply kernel, whose backward hands ∂L/∂μ, ∂L/∂σ² to them.
    """
    if not x_seq.is_floating_point():
        raise TypeError(f"tab expects a floating-point x_seq, got dtype {x_seq.dtype}")
    if x_seq.dim() < 3:
        raise ValueError(f"tab expects x_seq of shape [T, N, C, *spatial], got shape {tuple(x_seq.shape)}")
    check_device("tab", x_seq)
    use_batch_stats = training or running_mean is None
    if not use_batch_stats:
        y = torch.ops.snnorm.tab_apply(x_seq, weight, bias, running_mean, running_var, p, float(eps), False)
        return y, prefix
    if prefix is not None:
        n, step_mean, step_m2 = torch_backend.tab_step_stats(x_seq)
        count, mean, m2 = torch_backend.chan_prefix(n, step_mean, step_m2, prefix)
        if training and running_mean is not None:
            torch_backend.update_accumulated_running_stats(running_mean, running_var, count, mean, m2, momentum)
        var = m2 / count.unsqueeze(1)
        y = torch.ops.snnorm.tab_apply(x_seq, weight, bias, mean, var, p, float(eps), False)
        return y, (float(count[-1]), mean[-1], m2[-1])
    if math.prod(x_seq.shape[1:2]) * math.prod(x_seq.shape[3:]) < 2:
        # F.batch_norm's rule (and exception type) at step 0, raised before any update; an
        # empty batch has no statistics either
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {tuple(x_seq.shape)}")
    track = training and running_mean is not None
    mean, var = torch.ops.snnorm.tab_stats(
        x_seq.detach(), running_mean if track else None, running_var if track else None, [float(m) for m in momentum]
    )
    y = torch.ops.snnorm.tab_apply(x_seq, weight, bias, mean, var, p, float(eps), True)
    return y, None
