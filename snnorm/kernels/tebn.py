"""Fused Triton kernels for Temporal Effective Batch Normalization (TEBN).

TEBN (Duan et al., "Temporal Effective Batch Normalization in Spiking Neural Networks",
NeurIPS 2022) normalises a multi-step tensor with statistics shared over time and scales
every timestep by its own learnable factor p[t]::

    μ_c  = mean over (t, n, spatial) of x[t, n, c, ...]
    σ²_c = biased variance over the same M = T·N·S elements
    x̂    = (x − μ_c) / √(σ²_c + ε)
    y[t] = p[t] · (γ_c · x̂[t] + β_c)

Training (or no running statistics): μ, σ² are the batch statistics and, when running
statistics are given, they are updated in place exactly as ``F.batch_norm`` does:
``r_μ ← (1 − m)·r_μ + m·μ`` and ``r_σ² ← (1 − m)·r_σ² + m·σ²·M/(M − 1)``. Eval: μ, σ² are
the running statistics and the whole op is one elementwise pass with a per-(t, c) scale
``p[t]·γ_c·rstd_c`` and shift ``p[t]·β_c``.

Backward, with g = ∂L/∂y, g' = g·p[t] (the gradient w.r.t. γ x̂ + β), sums over (t, n, spatial)::

    ∂L/∂β_c = A_c = Σ g'        ∂L/∂γ_c = B_c = Σ g'·x̂
    ∂L/∂p[t] = Σ over (n, c, spatial) of g·(γ_c x̂ + β_c)
    ∂L/∂x = γ_c·rstd_c·(g' − A_c/M − x̂·B_c/M)     (batch statistics)
    ∂L/∂x = γ_c·rstd_c·g'                           (running statistics)

Layout and grid: the tile grid, program slices, partial statistics (per-program (count,
mean, M2) triples merged with Chan's formula, then combined per block of channels in
vectorised chunks, deterministically) and the register-based grid sizing are shared with
TAB in :mod:`snnorm.kernels._bn_tiles`. Weight and scale gradients are per-program
partial sums reduced afterwards by ``torch.sum`` (no float atomics). Absent tensors (γ,
β, running statistics) reach the kernels as ``None`` with a ``HAS_*`` flag. Arithmetic
is fp32 (fp64 for fp64 inputs); outputs are stored in the input dtype promoted with p's
dtype (the torch reference's ``y * p``), gradients in their parameter's dtype. Offsets
are int64.

Registered ops (``torch.library.custom_op``, with fake kernels, so they trace under
``torch.compile(fullgraph=True)``): ``snnorm::tebn_stats`` (batch statistics; mutates the
running statistics, not differentiable: it receives a detached input),
``snnorm::tebn_apply`` (normalise·affine·scale; differentiable, its backward includes the
path through the batch statistics when ``batch_stats``) and ``snnorm::tebn_apply_backward``.
"""

import math
from typing import Optional

import torch
import triton
import triton.language as tl

from ._bn_tiles import (
    as_tncs,
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

__all__ = ["tebn"]


# ----------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------


@triton.jit
def _tebn_stats_combine_kernel(
    part_mean_ptr,  # [P, C]
    part_m2_ptr,  # [P, C]
    part_count_ptr,  # [P]
    mean_ptr,  # [C] out: batch mean
    var_ptr,  # [C] out: biased batch variance
    running_mean_ptr,  # [C] updated in place when UPDATE_RUNNING (else None)
    running_var_ptr,  # [C] updated in place (unbiased variance) when UPDATE_RUNNING (else None)
    P, C, momentum,
    UPDATE_RUNNING: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, ACC_DTYPE: tl.constexpr,
):
    """Combine the P partials of a block of channels (:func:`combine_partials`); running stats."""
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    count, mean, m2 = combine_partials(
        part_mean_ptr, part_m2_ptr, part_count_ptr, 0, P, c, c_mask, C, BLOCK_P, BLOCK_C, ACC_DTYPE
    )
    var = m2 / count
    tl.store(mean_ptr + c, mean, mask=c_mask)
    tl.store(var_ptr + c, var, mask=c_mask)
    if UPDATE_RUNNING:
        r_mean = tl.load(running_mean_ptr + c, mask=c_mask, other=0.0).to(ACC_DTYPE)
        r_var = tl.load(running_var_ptr + c, mask=c_mask, other=0.0).to(ACC_DTYPE)
        r_mean = r_mean * (1.0 - momentum) + mean * momentum
        r_var = r_var * (1.0 - momentum) + (m2 / (count - 1.0)) * momentum
        tl.store(running_mean_ptr + c, r_mean.to(running_mean_ptr.dtype.element_ty), mask=c_mask)
        tl.store(running_var_ptr + c, r_var.to(running_var_ptr.dtype.element_ty), mask=c_mask)


@triton.jit
def _tebn_fwd_kernel(
    x_ptr,  # [T, N, C, S] contiguous
    y_ptr,  # [T, N, C, S] out
    mean_ptr,  # [C] batch or running mean
    var_ptr,  # [C] biased batch variance or running variance
    w_ptr,  # [C] γ, or None without HAS_WEIGHT
    b_ptr,  # [C] β, or None without HAS_BIAS
    p_ptr,  # [T] per-timestep scale
    N, C, S, N_PER_PROG, S_PER_PROG, N_SPLITS, eps,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, ACC_DTYPE: tl.constexpr,
):
    t, n_lo, n_hi, s_lo, s_hi, part = program_slice(N, S, N_PER_PROG, S_PER_PROG, N_SPLITS)
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    mean, rstd, gamma, beta = channel_consts(
        mean_ptr, var_ptr, w_ptr, b_ptr, c, c_mask, eps, HAS_WEIGHT, HAS_BIAS, ACC_DTYPE
    )
    p_t = tl.load(p_ptr + t).to(ACC_DTYPE)
    # y = (x − μ)·(p γ rstd) + p β: subtracting μ first keeps precision when |μ| ≫ σ.
    scale = (p_t * gamma * rstd)[None, :, None]
    shift = (p_t * beta)[None, :, None]
    mean3 = mean[None, :, None]
    for n0 in range(n_lo, n_hi, BLOCK_N):
        for s0 in range(s_lo, s_hi, BLOCK_S):
            offs, mask = tile_offsets(t, n0, s0, n_hi, s_hi, c, c_mask, N, C, S, BLOCK_N, BLOCK_S)
            x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC_DTYPE)
            y = (x - mean3) * scale + shift
            tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _tebn_bwd_reduce_kernel(
    gy_ptr,  # [T, N, C, S] contiguous ∂L/∂y
    x_ptr,  # [T, N, C, S] contiguous
    mean_ptr,  # [C]
    var_ptr,  # [C]
    w_ptr,  # [C] γ, or None without HAS_WEIGHT
    b_ptr,  # [C] β, or None without HAS_BIAS
    p_ptr,  # [T]
    part_a_ptr,  # [P, C] out: Σ g·p[t]        (→ ∂L/∂β)
    part_b_ptr,  # [P, C] out: Σ g·p[t]·x̂     (→ ∂L/∂γ)
    part_p_ptr,  # [C_BLOCKS, P] out: Σ g·(γ x̂ + β) over the program's tile (→ ∂L/∂p[t])
    N, C, S, N_PER_PROG, S_PER_PROG, N_SPLITS, P, eps,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, ACC_DTYPE: tl.constexpr,
):
    t, n_lo, n_hi, s_lo, s_hi, part = program_slice(N, S, N_PER_PROG, S_PER_PROG, N_SPLITS)
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    mean, rstd, gamma, beta = channel_consts(
        mean_ptr, var_ptr, w_ptr, b_ptr, c, c_mask, eps, HAS_WEIGHT, HAS_BIAS, ACC_DTYPE
    )
    p_t = tl.load(p_ptr + t).to(ACC_DTYPE)
    mean3 = mean[None, :, None]
    rstd3 = rstd[None, :, None]
    acc_g = tl.zeros((BLOCK_C,), ACC_DTYPE)  # Σ g
    acc_gx = tl.zeros((BLOCK_C,), ACC_DTYPE)  # Σ g·x̂
    for n0 in range(n_lo, n_hi, BLOCK_N):
        for s0 in range(s_lo, s_hi, BLOCK_S):
            offs, mask = tile_offsets(t, n0, s0, n_hi, s_hi, c, c_mask, N, C, S, BLOCK_N, BLOCK_S)
            g = tl.load(gy_ptr + offs, mask=mask, other=0.0).to(ACC_DTYPE)
            x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC_DTYPE)
            x_hat = tl.where(mask, (x - mean3) * rstd3, 0.0)
            acc_g += tl.sum(tl.sum(g, axis=2), axis=0)
            acc_gx += tl.sum(tl.sum(g * x_hat, axis=2), axis=0)
    # p[t] is constant over the program, so it multiplies the sums, not every element.
    tl.store(part_a_ptr + part * C + c, acc_g * p_t, mask=c_mask)
    tl.store(part_b_ptr + part * C + c, acc_gx * p_t, mask=c_mask)
    dp = tl.sum(tl.where(c_mask, gamma * acc_gx + beta * acc_g, 0.0), axis=0)
    tl.store(part_p_ptr + tl.program_id(0) * P + part, dp)


@triton.jit
def _tebn_bwd_dx_kernel(
    gy_ptr,  # [T, N, C, S] contiguous ∂L/∂y
    x_ptr,  # [T, N, C, S] contiguous
    dx_ptr,  # [T, N, C, S] out ∂L/∂x
    mean_ptr,  # [C]
    var_ptr,  # [C]
    w_ptr,  # [C] γ, or None without HAS_WEIGHT
    sum_a_ptr,  # [C] A = Σ g·p[t], or None without BATCH_STATS
    sum_b_ptr,  # [C] B = Σ g·p[t]·x̂, or None without BATCH_STATS
    p_ptr,  # [T]
    N, C, S, N_PER_PROG, S_PER_PROG, N_SPLITS, inv_m, eps,
    HAS_WEIGHT: tl.constexpr, BATCH_STATS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, ACC_DTYPE: tl.constexpr,
):
    t, n_lo, n_hi, s_lo, s_hi, part = program_slice(N, S, N_PER_PROG, S_PER_PROG, N_SPLITS)
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    mean, rstd, gamma, beta = channel_consts(
        mean_ptr, var_ptr, w_ptr, w_ptr, c, c_mask, eps, HAS_WEIGHT, False, ACC_DTYPE
    )
    p_t = tl.load(p_ptr + t).to(ACC_DTYPE)
    k = gamma * rstd
    # dx = k·p[t]·g − k·A/M − x̂·k·B/M   (the last two only through the batch statistics)
    k_g = (k * p_t)[None, :, None]
    if BATCH_STATS:
        sum_a = tl.load(sum_a_ptr + c, mask=c_mask, other=0.0).to(ACC_DTYPE)
        sum_b = tl.load(sum_b_ptr + c, mask=c_mask, other=0.0).to(ACC_DTYPE)
        k_a = (k * sum_a * inv_m)[None, :, None]
        k_b = (k * sum_b * inv_m)[None, :, None]
    mean3 = mean[None, :, None]
    rstd3 = rstd[None, :, None]
    for n0 in range(n_lo, n_hi, BLOCK_N):
        for s0 in range(s_lo, s_hi, BLOCK_S):
            offs, mask = tile_offsets(t, n0, s0, n_hi, s_hi, c, c_mask, N, C, S, BLOCK_N, BLOCK_S)
            g = tl.load(gy_ptr + offs, mask=mask, other=0.0).to(ACC_DTYPE)
            dx = g * k_g
            if BATCH_STATS:
                x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC_DTYPE)
                dx = dx - k_a - (x - mean3) * rstd3 * k_b
            tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------


def _launch_tebn_stats(
    x: torch.Tensor,
    running_mean: Optional[torch.Tensor],
    running_var: Optional[torch.Tensor],
    momentum: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch mean and biased variance per channel; updates the running stats in place."""
    x4, T, N, C, S = as_tncs(x)
    acc = acc_torch_dtype(x.dtype)
    if x.numel() == 0:  # as F.batch_norm: an empty batch updates nothing
        return x.new_zeros(C, dtype=acc), x.new_ones(C, dtype=acc)

    part_mean, part_m2, part_count, geo = launch_partial_stats(x4, T, N, C, S, acc)

    mean = torch.empty(C, dtype=acc, device=x.device)
    var = torch.empty(C, dtype=acc, device=x.device)
    update = running_mean is not None and running_var is not None
    # the kernel updates contiguous buffers in place; a strided one goes through a copy
    r_mean = contiguous_or_none(running_mean) if update else None
    r_var = contiguous_or_none(running_var) if update else None
    block_p, block_c = combine_tiles(geo.parts, C, x.device.type != "cuda")
    _tebn_stats_combine_kernel[(triton.cdiv(C, block_c),)](
        part_mean, part_m2, part_count, mean, var, r_mean, r_var,
        geo.parts, C, float(momentum),
        UPDATE_RUNNING=update, BLOCK_P=block_p, BLOCK_C=block_c, ACC_DTYPE=acc_dtype(acc), num_warps=4,
    )
    if update and r_mean.data_ptr() != running_mean.data_ptr():
        running_mean.copy_(r_mean)
    if update and r_var.data_ptr() != running_var.data_ptr():
        running_var.copy_(r_var)
    return mean, var


def _launch_tebn_fwd(
    x: torch.Tensor,
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    mean: torch.Tensor,
    var: torch.Tensor,
    scale: torch.Tensor,
    eps: float,
) -> torch.Tensor:
    """y[t] = p[t]·(γ (x − μ)/√(σ² + ε) + β) in one elementwise pass."""
    x4, T, N, C, S = as_tncs(x)
    acc = acc_torch_dtype(x.dtype)
    y = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, scale.dtype), device=x.device)
    if x.numel() == 0:
        return y
    head = (x4, y, mean.contiguous(), var.contiguous(), contiguous_or_none(weight), contiguous_or_none(bias),
            scale.contiguous(), N, C, S)
    flags = dict(HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, ACC_DTYPE=acc_dtype(acc))
    geo = fitted_geometry(_tebn_fwd_kernel, T, N, C, S, x.device, x.dtype,
                           lambda g: (*head, *slice_args(g), float(eps)), flags)
    _tebn_fwd_kernel[geo.grid](*head, *slice_args(geo), float(eps), **flags, **tile_constexprs(geo))
    return y


def _launch_tebn_bwd(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    mean: torch.Tensor,
    var: torch.Tensor,
    scale: torch.Tensor,
    eps: float,
    batch_stats: bool,
    need_dx: bool,
    need_dparams: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(∂L/∂x, ∂L/∂γ, ∂L/∂β, ∂L/∂p); the last three in the accumulation dtype.

    Custom ops cannot return None: an unneeded ∂L/∂x comes back empty (numel 0), unneeded
    parameter gradients as zeros; the reduction pass is skipped when nothing needs it.
    """
    x4, T, N, C, S = as_tncs(x)
    g4 = grad_y.contiguous().view(T, N, C, S)
    acc = acc_torch_dtype(x.dtype)
    dev = x.device
    if x.numel() == 0:  # an empty batch: zero gradients, as the torch reference gives
        dx = torch.empty(x.shape if need_dx else (0,), dtype=x.dtype, device=dev)
        zeros_c = torch.zeros(C, dtype=acc, device=dev)
        return dx, zeros_c, zeros_c.clone(), torch.zeros(T, dtype=acc, device=dev)
    scale_c = scale.contiguous()
    mean, var = mean.contiguous(), var.contiguous()
    w_arg, b_arg = contiguous_or_none(weight), contiguous_or_none(bias)
    if batch_stats or need_dparams:

        def reduce_args(geo):
            part_a = torch.empty(geo.parts, C, dtype=acc, device=dev)
            part_b = torch.empty(geo.parts, C, dtype=acc, device=dev)
            part_p = torch.empty(geo.c_blocks, geo.parts, dtype=acc, device=dev)
            return (g4, x4, mean, var, w_arg, b_arg, scale_c, part_a, part_b, part_p,
                    N, C, S, *slice_args(geo), geo.parts, float(eps))

        flags = dict(HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, ACC_DTYPE=acc_dtype(acc))
        geo = fitted_geometry(_tebn_bwd_reduce_kernel, T, N, C, S, dev, x.dtype, reduce_args, flags)
        args = reduce_args(geo)
        _tebn_bwd_reduce_kernel[geo.grid](*args, **flags, **tile_constexprs(geo))
        part_a, part_b, part_p = args[7:10]
        # Fixed-shape torch reductions of the partials: deterministic, no atomics.
        sum_a = part_a.sum(0)
        sum_b = part_b.sum(0)
        dscale = part_p.view(geo.c_blocks, T, -1).sum((0, 2))
    else:
        sum_a = torch.zeros(C, dtype=acc, device=dev)
        sum_b = torch.zeros(C, dtype=acc, device=dev)
        dscale = torch.zeros(T, dtype=acc, device=dev)
    if need_dx:
        dx = torch.empty(x.shape, dtype=x.dtype, device=dev)
        head = (g4, x4, dx, mean, var, w_arg, sum_a if batch_stats else None, sum_b if batch_stats else None,
                scale_c, N, C, S)
        tail = (1.0 / (T * N * S), float(eps))
        flags = dict(HAS_WEIGHT=weight is not None, BATCH_STATS=batch_stats, ACC_DTYPE=acc_dtype(acc))
        geo = fitted_geometry(_tebn_bwd_dx_kernel, T, N, C, S, dev, x.dtype,
                               lambda g: (*head, *slice_args(g), *tail), flags)
        _tebn_bwd_dx_kernel[geo.grid](*head, *slice_args(geo), *tail, **flags, **tile_constexprs(geo))
    else:
        dx = x.new_empty(0)  # not needed: no full-size allocation
    # ∂L/∂β = Σ g·p = A, ∂L/∂γ = Σ g·p·x̂ = B.
    return dx, sum_b, sum_a, dscale


# ----------------------------------------------------------------------------------------
# Op registration
# ----------------------------------------------------------------------------------------


@torch.library.custom_op("snnorm::tebn_stats", mutates_args=("running_mean", "running_var"))
def _tebn_stats_op(
    x: torch.Tensor,
    running_mean: Optional[torch.Tensor],
    running_var: Optional[torch.Tensor],
    momentum: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch (mean, biased variance) per channel over T·N·spatial; running stats updated."""
    check_device("tebn", x)
    return _launch_tebn_stats(x, running_mean, running_var, momentum)


@_tebn_stats_op.register_fake
def _(x, running_mean, running_var, momentum):
    acc = acc_torch_dtype(x.dtype)
    C = x.shape[2]
    return x.new_empty(C, dtype=acc), x.new_empty(C, dtype=acc)


@torch.library.custom_op("snnorm::tebn_apply", mutates_args=())
def _tebn_apply_op(
    x: torch.Tensor,
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    mean: torch.Tensor,
    var: torch.Tensor,
    scale: torch.Tensor,
    eps: float,
    batch_stats: bool,
) -> torch.Tensor:
    """y[t] = p[t]·(γ x̂[t] + β) with the given (mean, variance).

    ``batch_stats`` says whether (mean, var) are the batch statistics of x (then the
    backward includes their dependence on x) or constants (running statistics).
    """
    check_device("tebn", x)
    return _launch_tebn_fwd(x, weight, bias, mean, var, scale, eps)


@_tebn_apply_op.register_fake
def _(x, weight, bias, mean, var, scale, eps, batch_stats):
    return torch.empty_like(x, dtype=torch.promote_types(x.dtype, scale.dtype), memory_format=torch.contiguous_format)


@torch.library.custom_op("snnorm::tebn_apply_backward", mutates_args=())
def _tebn_apply_backward_op(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    mean: torch.Tensor,
    var: torch.Tensor,
    scale: torch.Tensor,
    eps: float,
    batch_stats: bool,
    need_dx: bool,
    need_dparams: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    check_device("tebn", x)
    return _launch_tebn_bwd(grad_y, x, weight, bias, mean, var, scale, eps, batch_stats, need_dx, need_dparams)


@_tebn_apply_backward_op.register_fake
def _(grad_y, x, weight, bias, mean, var, scale, eps, batch_stats, need_dx, need_dparams):
    acc = acc_torch_dtype(x.dtype)
    C, T = x.shape[2], x.shape[0]
    dx = torch.empty_like(x, memory_format=torch.contiguous_format) if need_dx else x.new_empty(0)
    return dx, x.new_empty(C, dtype=acc), x.new_empty(C, dtype=acc), x.new_empty(T, dtype=acc)


def _tebn_apply_setup_context(ctx, inputs, output):
    x, weight, bias, mean, var, scale, eps, batch_stats = inputs
    ctx.save_for_backward(x, weight, bias, mean, var, scale)
    ctx.eps = eps
    ctx.batch_stats = batch_stats


def _tebn_apply_backward(ctx, grad_y):
    x, weight, bias, mean, var, scale = ctx.saved_tensors
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    need_p = ctx.needs_input_grad[5]
    dx, dw, db, dp = torch.ops.snnorm.tebn_apply_backward(
        grad_y, x, weight, bias, mean, var, scale, ctx.eps, ctx.batch_stats,
        need_x, need_w or need_b or need_p,
    )
    return (
        dx if need_x else None,
        dw.to(weight.dtype) if need_w else None,
        db.to(bias.dtype) if need_b else None,
        None,  # mean, var: constants, or batch statistics whose path is inside dx
        None,
        dp.to(scale.dtype) if need_p else None,
        None,
        None,
    )


_tebn_apply_op.register_autograd(_tebn_apply_backward, setup_context=_tebn_apply_setup_context)


# ----------------------------------------------------------------------------------------
# Public op
# ----------------------------------------------------------------------------------------


def tebn(
    x_seq: torch.Tensor,
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    running_mean: Optional[torch.Tensor],
    running_var: Optional[torch.Tensor],
    scale: torch.Tensor,
    *,
    training: bool,
    momentum: float,
    eps: float,
) -> torch.Tensor:
    """Temporal effective BN (Duan et al., NeurIPS 2022): y[t] = p[t]·(γ x̂[t] + β).

    Same signature and semantics as :func:`snnorm.backends.torch_backend.tebn`:
    ``x_seq`` is ``[T, N, C, *spatial]`` (0 to 3 spatial dims), ``scale`` is p ``[T]``,
    ``weight``/``bias`` ``[C]`` or None. Batch statistics over T·N·spatial in training
    or without running stats (then the running stats, if given, are updated in place with
    factor ``momentum`` and the unbiased variance); running statistics in eval.
    """
    if not x_seq.is_floating_point():
        raise TypeError(f"tebn expects a floating-point x_seq, got dtype {x_seq.dtype}")
    if x_seq.dim() < 3:
        raise ValueError(f"tebn expects x_seq of shape [T, N, C, *spatial], got shape {tuple(x_seq.shape)}")
    check_device("tebn", x_seq, weight, bias, running_mean, running_var, scale)
    use_batch_stats = training or running_mean is None
    if use_batch_stats:
        if math.prod(x_seq.shape[:2]) * math.prod(x_seq.shape[3:]) == 1:
            # the same rule (and exception type) as F.batch_norm; raised before any update
            raise ValueError(
                f"Expected more than 1 value per channel when training, got input size {tuple(x_seq.shape)}"
            )
        track = training and running_mean is not None
        mean, var = torch.ops.snnorm.tebn_stats(
            x_seq.detach(),
            running_mean if track else None,
            running_var if track else None,
            float(momentum),
        )
    else:
        mean, var = running_mean, running_var
    return torch.ops.snnorm.tebn_apply(x_seq, weight, bias, mean, var, scale, float(eps), use_batch_stats)
