r"""Elementwise LIF over T steps with per-channel constants: plain LIF, MPBN with running
statistics (eval) and MPBN with the BN folded into the threshold (no adaptation).

One launch per direction over all T; the membrane stays in registers through the T loop.
Per channel c (v_r = v_reset, or 0 for soft reset)::

    h = charge(v, x[t])                       (see _device.charge)
    ĥ = (h − μ)·r + β,  r = γ/√(σ² + ε)       (FIRE_NORMALISED, or a normalised carry)
    z = h − θ | ĥ − θ | sign(γ)(h − θ'),  θ' = μ + (θ − β)√(σ² + ε)/γ
    s = Θ(z);  v = reset(ĥ if carry == "normalized" else h, s)

(MPBN: Guo et al., ICCV 2023, arXiv 2308.08359; folded threshold: arXiv 2505.05375.)

Backward, reverse time loop with the spike recomputed from the saved h::

    ∂L/∂z = (gs + ∂v/∂s·gv)·Θ'(z),  per-channel sums Σ gĥ, Σ gĥ·(h − μ), −∂θ, −∂θ'
    as fp32 partials per program, summed afterwards (deterministic, no atomics).

Precision: the charge's division is correctly rounded (``_device.charge``: h is bit-equal to
the torch backend's in fp32, on a GPU too), both launches pin ``enable_fp_fusion=False`` (the
backward recomputes the forward's spikes from h with the same expression), and fp64 launches
get τ, v_reset, α at full precision (``_device.kernel_scalars``).

Layouts: ``x`` / spikes ``[T, N, C, S]`` (spatial dims merged; strided views, no copy),
``v`` ``[N, C, S]``, per-channel tensors ``[C]``. Grid: P tiles per channel × C, ``(P, C)``,
or flat on axis 0 past 65,535 channels (``_common.tiles_grid``).

This module holds the kernels and their launchers (:func:`launch_lif_fwd`,
:func:`launch_lif_bwd`); the ops ``snnorm::lif_elementwise`` / ``_bwd`` that call them (schemas,
fake kernels, autograd) are registered in :mod:`snnorm.backends.triton_backend`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _device as dev
from ..params import LIFKernelParameters
from ._common import (
    LIF_WARPS, acc_dtype, acc_torch_dtype, as_ncs, channel_tiling, check_channel_args, launch_options, launcher,
    needs_int64, store_dtype, tiles_grid,
)

#: elements per program
BLOCK = 1024


@triton.jit
def _fire(h, th, mu, r, beta, thf, sgn, FIRE: tl.constexpr, NORM: tl.constexpr, CARRY_NORM: tl.constexpr):
    """Firing variable z and carried u of the elementwise modes."""
    h_hat = h
    if NORM:
        h_hat = (h - mu) * r + beta
    if FIRE == dev.FIRE_RAW:
        z = h - th
    elif FIRE == dev.FIRE_NORMALISED:
        z = h_hat - th
    else:
        z = sgn * (h - thf)
    if CARRY_NORM:
        u = h_hat
    else:
        u = h
    return z, u


@triton.jit
def _lif_fwd_kernel(
    x_ptr,  # [T, N, C, S] strided
    v0_ptr,  # [N, C, S] strided
    th_ptr,  # [C] threshold (reset; firing for FIRE_RAW / FIRE_NORMALISED)
    mu_ptr, r_ptr, beta_ptr,  # [C] μ, γ·rstd, β (NORM)
    thf_ptr, sgn_ptr,  # [C] θ', sign(γ) (FIRE_FOLDED)
    s_ptr,  # [T, N, C, S] contiguous out: spikes
    h_ptr,  # [T, N, C, S] contiguous out: pre-BN membrane (SAVE_H)
    vout_ptr,  # [N, C, S] contiguous out: final membrane
    T, N, C, S, S_TILES, P,
    stride_x_t, stride_x_n, stride_x_c, stride_x_s,
    stride_v_n, stride_v_c, stride_v_s,
    tau, v_reset,  # Python floats, or one-element fp64 tensors for fp64 (dev.scalar_arg)
    FIRE: tl.constexpr, NORM: tl.constexpr, CARRY_NORM: tl.constexpr, DECAY_INPUT: tl.constexpr,
    SOFT_RESET: tl.constexpr, SAVE_H: tl.constexpr, V0_SCALAR: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr, INDEX_64: tl.constexpr, ACC_DTYPE: tl.constexpr,
    FLAT_GRID: tl.constexpr,
):
    pid, c = dev.tile_and_channel(P, FLAT_GRID, INDEX_64)
    n, s, mask = dev.channel_tile(pid, N, S, S_TILES, BLOCK_N, BLOCK_S, INDEX_64)
    x_off = c * stride_x_c + n * stride_x_n + s * stride_x_s
    o_off = (n * C + c) * S + s
    step = dev.index(C, INDEX_64) * N * S

    th, mu, r, beta, thf, sgn = dev.load_fire_params(
        th_ptr, mu_ptr, r_ptr, beta_ptr, thf_ptr, sgn_ptr, c, NORM, FIRE == dev.FIRE_FOLDED, ACC_DTYPE
    )
    tau = dev.scalar_arg(tau, ACC_DTYPE)
    v_r = dev.scalar_arg(v_reset, ACC_DTYPE)

    v = dev.load_membrane(v0_ptr, c, n, s, mask, stride_v_n, stride_v_c, stride_v_s, V0_SCALAR, BLOCK_N, BLOCK_S, ACC_DTYPE)
    for t in range(T):
        ti = dev.index(t, INDEX_64)
        x = tl.load(x_ptr + ti * stride_x_t + x_off, mask=mask, other=0.0).to(ACC_DTYPE)
        h = dev.charge(v, x, tau, v_r, DECAY_INPUT)
        z, u = _fire(h, th, mu, r, beta, thf, sgn, FIRE, NORM, CARRY_NORM)
        spike = z >= 0
        v = dev.reset(u, spike, th, v_r, SOFT_RESET)
        tl.store(s_ptr + ti * step + o_off, spike.to(s_ptr.dtype.element_ty), mask=mask)
        if SAVE_H:
            tl.store(h_ptr + ti * step + o_off, h.to(h_ptr.dtype.element_ty), mask=mask)
    tl.store(vout_ptr + o_off, v.to(vout_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _lif_bwd_kernel(
    gs_ptr,  # [T, N, C, S] strided: ∂L/∂spikes (HAS_GS)
    gvout_ptr,  # [N, C, S] strided: ∂L/∂v_T (HAS_GV)
    h_ptr,  # [T, N, C, S] contiguous: saved pre-BN membrane (spikes are recomputed from it)
    th_ptr, mu_ptr, r_ptr, beta_ptr, thf_ptr, sgn_ptr,  # [C] as in the forward
    gx_ptr,  # [T, N, C, S] contiguous out
    gv0_ptr,  # [N, C, S] contiguous out (compute dtype; NEED_GV0)
    part_ptr,  # [4, P, C] out: Σ gĥ, Σ gĥ·(h − μ), −∂θ, −∂θ' per program
    T, N, C, S, S_TILES, P,
    stride_g_t, stride_g_n, stride_g_c, stride_g_s,
    stride_gv_n, stride_gv_c, stride_gv_s,
    tau, v_reset, alpha,  # as in the forward
    FIRE: tl.constexpr, NORM: tl.constexpr, CARRY_NORM: tl.constexpr, DECAY_INPUT: tl.constexpr,
    SOFT_RESET: tl.constexpr, DETACH_RESET: tl.constexpr, SURROGATE: tl.constexpr,
    HAS_GS: tl.constexpr, HAS_GV: tl.constexpr, NEED_GV0: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr, INDEX_64: tl.constexpr, ACC_DTYPE: tl.constexpr,
    FLAT_GRID: tl.constexpr,
):
    pid, c = dev.tile_and_channel(P, FLAT_GRID, INDEX_64)
    n, s, mask = dev.channel_tile(pid, N, S, S_TILES, BLOCK_N, BLOCK_S, INDEX_64)
    g_off = c * stride_g_c + n * stride_g_n + s * stride_g_s
    o_off = (n * C + c) * S + s
    step = dev.index(C, INDEX_64) * N * S

    th, mu, r, beta, thf, sgn = dev.load_fire_params(
        th_ptr, mu_ptr, r_ptr, beta_ptr, thf_ptr, sgn_ptr, c, NORM, FIRE == dev.FIRE_FOLDED, ACC_DTYPE
    )
    v_r = dev.scalar_arg(v_reset, ACC_DTYPE)
    alpha = dev.scalar_arg(alpha, ACC_DTYPE)
    x_scale, v_scale = dev.charge_grads(dev.scalar_arg(tau, ACC_DTYPE), DECAY_INPUT)

    zero = tl.zeros([BLOCK_N, BLOCK_S], dtype=ACC_DTYPE)
    gv = zero
    if HAS_GV:
        gv = tl.load(gvout_ptr + c * stride_gv_c + n * stride_gv_n + s * stride_gv_s, mask=mask, other=0.0).to(ACC_DTYPE)
    acc_b = zero  # Σ gĥ
    acc_r = zero  # Σ gĥ·(h − μ)
    acc_th = zero
    acc_thf = zero
    for tt in range(T):
        ti = dev.index(T - 1 - tt, INDEX_64)
        h = tl.load(h_ptr + ti * step + o_off, mask=mask, other=0.0).to(ACC_DTYPE)
        gs = zero
        if HAS_GS:
            gs = tl.load(gs_ptr + ti * stride_g_t + g_off, mask=mask, other=0.0).to(ACC_DTYPE)
        z, u = _fire(h, th, mu, r, beta, thf, sgn, FIRE, NORM, CARRY_NORM)
        spike = z >= 0  # bit-identical to the forward: same saved h, same expression
        gu, gs_reset, gth_reset = dev.reset_bwd(gv, spike, u, th, v_r, SOFT_RESET, DETACH_RESET)
        gz = tl.where(mask, (gs + gs_reset) * dev.surrogate_grad(z, alpha, SURROGATE), 0.0)
        acc_th += gth_reset
        gh = zero
        g_hat = zero
        if FIRE == dev.FIRE_FOLDED:
            gh = sgn * gz
            acc_thf -= sgn * gz
        else:
            acc_th -= gz
            if FIRE == dev.FIRE_RAW:
                gh = gz
            else:
                g_hat = gz
        if CARRY_NORM:
            g_hat += gu
        else:
            gh += gu
        if NORM:
            g_hat = tl.where(mask, g_hat, 0.0)
            gh += g_hat * r
            acc_b += g_hat
            acc_r += g_hat * (h - mu)
        tl.store(gx_ptr + ti * step + o_off, (gh * x_scale).to(gx_ptr.dtype.element_ty), mask=mask)
        gv = gh * v_scale
    if NEED_GV0:
        tl.store(gv0_ptr + o_off, gv.to(gv0_ptr.dtype.element_ty), mask=mask)
    part = part_ptr + dev.index(pid, INDEX_64) * C + c
    tl.store(part, dev.tile_sum(acc_b))
    tl.store(part + P * C, dev.tile_sum(acc_r))
    tl.store(part + 2 * P * C, dev.tile_sum(tl.where(mask, acc_th, 0.0)))
    tl.store(part + 3 * P * C, dev.tile_sum(acc_thf))


# ----------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------


def _modes(fire: int, carry_norm: bool) -> dict:
    return dict(FIRE=fire, NORM=(fire == dev.FIRE_NORMALISED.value) or carry_norm, CARRY_NORM=carry_norm)


def _check_fire_params(op: str, device, C: int, fire: int, carry_norm: bool, th, mu, r, beta, thf, sgn) -> None:
    """θ always, μ, r, β with a normalised firing variable or carry, θ′, sign(γ) when folded: ``[C]``."""
    norm = fire == dev.FIRE_NORMALISED.value or carry_norm
    folded = fire == dev.FIRE_FOLDED.value
    check_channel_args(
        op, device, th=(th, (C,), True), mu=(mu, (C,), norm), r=(r, (C,), norm), beta=(beta, (C,), norm),
        thf=(thf, (C,), folded), sgn=(sgn, (C,), folded),
    )


@launcher
def launch_lif_fwd(x, v0, th, mu, r, beta, thf, sgn, out_dtype, lif: LIFKernelParameters, fire, carry_norm, save_h):
    T, N, C = x.shape[:3]
    _check_fire_params("lif", x.device, C, fire, carry_norm, th, mu, r, beta, thf, sgn)
    x4, v3 = as_ncs(x, 1), as_ncs(v0, 0)
    S = x4.shape[3]
    acc = acc_torch_dtype(out_dtype)
    st = store_dtype(out_dtype)
    s = torch.empty(x.shape, dtype=st, device=x.device)
    v_out = torch.empty(x.shape[1:], dtype=st, device=x.device)
    h = torch.empty(x.shape if save_h else (0,), dtype=acc, device=x.device)
    tiles = channel_tiling(N, S, BLOCK)
    scalars, lif_flags = dev.lif_kernel_args(lif, acc=acc, device=x.device)
    grid, flat = tiles_grid(tiles.P, C)
    _lif_fwd_kernel[grid](
        x4, v3, th, mu, r, beta, thf, sgn, s, h if save_h else None, v_out,
        T, N, C, S, tiles.S_TILES, tiles.P,
        *x4.stride(), *v3.stride(),
        *scalars,
        **_modes(fire, carry_norm), **lif_flags, SAVE_H=save_h, V0_SCALAR=v3.stride() == (0, 0, 0),
        BLOCK_N=tiles.BLOCK_N, BLOCK_S=tiles.BLOCK_S, INDEX_64=needs_int64(x4, v3, s), ACC_DTYPE=acc_dtype(out_dtype),
        FLAT_GRID=flat, **launch_options(LIF_WARPS(tiles.block), acc),
    )
    return s.to(out_dtype), v_out.to(out_dtype), h


@launcher
def launch_lif_bwd(gs, gv, h, gx_dtype, th, mu, r, beta, thf, sgn, lif: LIFKernelParameters, fire, carry_norm, need_gv0):
    T, N, C = h.shape[:3]
    _check_fire_params("lif backward", h.device, C, fire, carry_norm, th, mu, r, beta, thf, sgn)
    h4 = as_ncs(h, 1)
    S = h4.shape[3]
    acc = h.dtype
    gx = torch.empty(h.shape, dtype=store_dtype(gx_dtype), device=h.device)
    gv0 = torch.empty(h.shape[1:] if need_gv0 else (0,), dtype=acc, device=h.device)
    tiles = channel_tiling(N, S, BLOCK)
    part = torch.empty((4, tiles.P, C), dtype=acc, device=h.device)
    g4 = as_ncs(gs, 1) if gs is not None else None
    gv3 = as_ncs(gv, 0) if gv is not None else None
    scalars, lif_flags = dev.lif_kernel_args(lif, backward=True, acc=acc, device=h.device)
    grid, flat = tiles_grid(tiles.P, C)
    _lif_bwd_kernel[grid](
        g4, gv3, h4, th, mu, r, beta, thf, sgn, gx, gv0 if need_gv0 else None, part,
        T, N, C, S, tiles.S_TILES, tiles.P,
        *(g4.stride() if g4 is not None else (0,) * 4), *(gv3.stride() if gv3 is not None else (0,) * 3),
        *scalars,
        **_modes(fire, carry_norm), **lif_flags, HAS_GS=gs is not None, HAS_GV=gv is not None,
        NEED_GV0=need_gv0, BLOCK_N=tiles.BLOCK_N, BLOCK_S=tiles.BLOCK_S, INDEX_64=needs_int64(h4, g4, gv3),
        ACC_DTYPE=acc_dtype(acc),
        FLAT_GRID=flat, **launch_options(LIF_WARPS(tiles.block), acc),
    )
    return gx.to(gx_dtype), gv0, part.sum(dim=1)
