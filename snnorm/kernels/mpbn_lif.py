r"""Fused Triton kernels for LIF and MPBN-LIF (the ``lif``, ``mpbn_lif`` and
``mpbn_lif_folded`` slots of the op table).

Equations (per channel c, per step t; v_r = v_reset, or 0 for soft reset)::

    charge   h = v + (x − (v − v_r))/τ            (decay_input)
             h = v − (v − v_r)/τ + x               (otherwise)
    MPBN     ĥ = γ (h − μ_t)·rstd_t + β,  rstd_t = 1/√(σ_t² + ε)
             (Guo et al., "Membrane Potential Batch Normalization for Spiking Neural
             Networks", ICCV 2023, arXiv 2308.08359)
    fire     s = Θ(z),  z = h − θ (LIF) | ĥ − θ (MPBN) | sign(γ)(h − θ') (folded,
             θ' = μ + (θ − β)√(σ² + ε)/γ; test-time threshold modulation, arXiv 2505.05375)
    reset    v = s·v_r + (1 − s)·u (hard) | u − s·θ (soft),  u = ĥ (carry "normalized") | h ("raw")

Training uses per-step batch statistics μ_t, σ_t² of h over M = N·∏spatial elements
(biased σ² to normalise; the running statistics are updated in-kernel at every step
with the unbiased σ²·M/(M − 1)). The backward pass runs the reverse time loop with the
batch-norm backward per step (x̂ = (h − μ_t)·rstd_t, gŷ = ∂L/∂ĥ)::

    A = Σ gŷ,  B = Σ gŷ·x̂,  ∂L/∂h = γ·rstd_t·(gŷ − A/M − x̂·B/M),  ∂L/∂γ += B,  ∂L/∂β += A

Layouts: ``x_seq`` / spikes ``[T, N, C, *spatial]`` (read through a ``[T, N, C, H, W]``
view with explicit strides: non-contiguous and expanded inputs are not copied, except
>2 spatial dims that do not merge), membrane ``v`` ``[N, C, *spatial]``, per-channel
tensors ``[C]``, saved statistics ``[T, C]``. Outputs are contiguous.

Kernels:

* ``_lif_fwd_kernel`` / ``_lif_bwd_kernel``: elementwise with per-channel constants, one
  launch over all T, grid (⌈M/BLOCK⌉, C). Serves plain LIF, MPBN in eval (running
  statistics) and the folded threshold without adaptation. Per-channel gradients are
  written as fp32 partials per program and summed afterwards (deterministic).
* ``_mpbn_lif_fwd_kernel`` / ``_mpbn_lif_bwd_kernel``: the resident training path, one
  program per channel holding the whole channel (M ≤ ``RESIDENT_MAX_M``) in registers
  for the whole T loop; exact two-pass mean/variance per step. Also serves the
  adaptive folded modes (per-step statistics, forward only).
* ``_mpbn_lif_stats_kernel`` + ``_mpbn_lif_apply_kernel`` (forward) and
  ``_mpbn_lif_bwd_partial_kernel`` + ``_mpbn_lif_bwd_apply_kernel`` (backward): the split
  path for large M, two launches per step, a channel spread over ⌈M/SPLIT_BLOCK⌉
  programs; partial (count, mean, M2) combined with the multi-way Chan formula
  M2 = Σ M2_p + Σ n_p (μ_p − μ)² in a fixed order (deterministic). The membrane lives
  in an fp32 global buffer between launches.

Precision: everything is computed in fp32 (fp64 for fp64 tensors) and stored in the
output dtype. For fp16/bf16 inputs the membrane is kept in fp32 inside the kernels
(and in the split path's buffer), whereas the torch reference keeps it in the input
dtype: the Triton result is the more accurate one. Scalars (τ, v_reset, ε, momentum, α)
reach the kernels as fp32, so fp64 tensors agree with an fp64 reference to ~1e-7 only.

Saved for backward: the pre-BN membrane h in the compute dtype and, in training, μ_t and
rstd_t ([T, C]) — nothing else. The backward kernels recompute the spikes from h with the
forward's own expression (bit-identical), so they need not be saved: at fp32 with the
MPBN defaults (hard reset) this is ¼ of what the torch reference keeps (h, ĥ − θ, 1 − s, u).
"""

from __future__ import annotations

import warnings
from typing import Callable, Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..backends import torch_backend
from ._common import acc_dtype, acc_torch_dtype, as_4d, as_5d, check_device, interpreter_active, next_pow2

__all__ = ["lif", "mpbn_lif", "mpbn_lif_folded"]

#: channels with at most this many elements per step (N·∏spatial) take the resident path
RESIDENT_MAX_M = 8192
#: elements per program in the split (large-M) path
SPLIT_BLOCK = 2048
#: elements per program in the elementwise kernels
ELEMENTWISE_BLOCK = 1024

_SURROGATES = {"sigmoid": 0, "atan": 1}


# ----------------------------------------------------------------------------------
# device helpers
# ----------------------------------------------------------------------------------


@triton.jit
def _charge(v, x, tau, v_r, DECAY_INPUT: tl.constexpr):
    # same operation order as torch_backend.lif_charge (bit-equal in fp32)
    if DECAY_INPUT:
        h = v + (x - (v - v_r)) / tau
    else:
        h = v - (v - v_r) / tau + x
    return h


@triton.jit
def _reset(u, spike, th, v_reset, SOFT_RESET: tl.constexpr):
    if SOFT_RESET:
        v = tl.where(spike, u - th, u)
    else:
        v = tl.where(spike, v_reset, u)
    return v


@triton.jit
def _surrogate_grad(z, alpha, SURROGATE: tl.constexpr):
    """dΘ/dz of the surrogate: 0 → Sigmoid α·σ(αz)(1 − σ(αz)); 1 → ATan (α/2)/(1 + (π/2·αz)²)."""
    if SURROGATE == 0:
        sg = 1.0 / (1.0 + tl.exp(-(z * alpha)))
        g = (1.0 - sg) * sg * alpha
    else:
        w = 1.5707963267948966 * alpha * z
        g = (alpha * 0.5) / (1.0 + w * w)
    return g


@triton.jit
def _reset_bwd(gv, spike, u, th, v_reset, SOFT_RESET: tl.constexpr, DETACH_RESET: tl.constexpr):
    """Gradients of v = reset(u, s) w.r.t. u and s (s's part is 0 with detach_reset) and −∂v/∂θ·gv."""
    if SOFT_RESET:
        gu = gv
        gs = -gv * th
        gth = tl.where(spike, -gv, 0.0)
    else:
        gu = tl.where(spike, 0.0, gv)
        gs = gv * (v_reset - u)
        gth = gv * 0.0
    if DETACH_RESET:
        gs = gs * 0.0
    return gu, gs, gth


@triton.jit
def _sqrt(x, ACC: tl.constexpr):
    # correctly rounded square root (tl.sqrt may lower to an approximation for fp32)
    if ACC == tl.float64:
        r = tl.sqrt(x)
    else:
        r = tl.sqrt_rn(x)
    return r


@triton.jit
def _step_normalise(
    h, mean, m2, M, gamma, beta, th, eps, mu, s2, mt,
    ADAPT: tl.constexpr, CARRY_NORM: tl.constexpr, ACC: tl.constexpr,
):
    """From the step statistics (mean, M2) of h: the firing variable z, the carried u,
    rstd (training) and the adapted (μ, σ²) state (folded modes)."""
    if ADAPT == 0:
        rstd = 1.0 / _sqrt(m2 / M + eps, ACC)
        h_hat = (h - mean) * rstd * gamma + beta
        z = h_hat - th
        if CARRY_NORM:
            u = h_hat
        else:
            u = h
    else:
        var_u = m2 / (M - 1)
        if ADAPT == 1:
            mu = mean
            s2 = var_u
        else:
            mu = mu * (1.0 - mt) + mean * mt
            s2 = s2 * (1.0 - mt) + var_u * mt
        std = _sqrt(s2 + eps, ACC)
        th_fold = (th - beta) * std / gamma + mu
        sgn = tl.where(gamma > 0, 1.0, tl.where(gamma < 0, -1.0, 0.0))
        z = sgn * (h - th_fold)
        if CARRY_NORM:
            u = (h - mu) / std * gamma + beta
        else:
            u = h
        rstd = 1.0 / std
    return z, u, rstd, mu, s2


# ----------------------------------------------------------------------------------
# elementwise kernels: plain LIF, MPBN eval, folded threshold (no adaptation)
# ----------------------------------------------------------------------------------


@triton.jit
def _lif_fwd_kernel(
    x_ptr,  # [T, N, C, H, W] strided
    v0_ptr,  # [N, C, H, W] strided
    th_ptr,  # [C] threshold (reset; firing for MODE 0/1)
    mu_ptr,  # [C] μ            (NORM)
    r_ptr,  # [C] γ·rstd       (NORM)
    beta_ptr,  # [C] β            (NORM)
    thf_ptr,  # [C] folded θ'    (MODE 2)
    sgn_ptr,  # [C] sign(γ)      (MODE 2)
    s_ptr,  # [T, N, C, H, W] contiguous out: spikes
    h_ptr,  # [T, N, C, H, W] contiguous out: pre-BN membrane (SAVE_H)
    vout_ptr,  # [N, C, H, W] contiguous out: final membrane
    T, C, H, W, M,
    stride_x_t, stride_x_n, stride_x_c, stride_x_h, stride_x_w,
    stride_v_n, stride_v_c, stride_v_h, stride_v_w,
    tau, v_reset,
    MODE: tl.constexpr,  # 0: z = h − θ;  1: z = ĥ − θ;  2: z = sign(γ)(h − θ')
    NORM: tl.constexpr,  # ĥ = (h − μ)·r + β is needed (MODE 1 or normalized carry)
    CARRY_NORM: tl.constexpr,
    DECAY_INPUT: tl.constexpr,
    SOFT_RESET: tl.constexpr,
    SAVE_H: tl.constexpr,
    BLOCK: tl.constexpr,
    ACC: tl.constexpr,
):
    pid_m = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1).to(tl.int64)
    m = pid_m * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    mask = m < M
    HW = H * W
    n = m // HW
    r_sp = m % HW
    i = r_sp // W
    j = r_sp % W
    x_off = n * stride_x_n + c * stride_x_c + i * stride_x_h + j * stride_x_w
    v_off = n * stride_v_n + c * stride_v_c + i * stride_v_h + j * stride_v_w
    o_off = (n * C + c) * HW + r_sp
    step = tl.cast(C, tl.int64) * M  # int64: T·N·C·H·W may pass 2**31

    th = tl.load(th_ptr + c).to(ACC)
    if NORM:
        mu = tl.load(mu_ptr + c).to(ACC)
        r = tl.load(r_ptr + c).to(ACC)
        beta = tl.load(beta_ptr + c).to(ACC)
    if MODE == 2:
        thf = tl.load(thf_ptr + c).to(ACC)
        sgn = tl.load(sgn_ptr + c).to(ACC)
    v_r = tl.cast(v_reset, ACC)

    v = tl.load(v0_ptr + v_off, mask=mask, other=0.0).to(ACC)
    for t in range(T):
        x = tl.load(x_ptr + tl.cast(t, tl.int64) * stride_x_t + x_off, mask=mask, other=0.0).to(ACC)
        h = _charge(v, x, tau, v_r, DECAY_INPUT)
        if NORM:
            h_hat = (h - mu) * r + beta
        if MODE == 0:
            z = h - th
        elif MODE == 1:
            z = h_hat - th
        else:
            z = sgn * (h - thf)
        if CARRY_NORM:
            u = h_hat
        else:
            u = h
        spike = z >= 0
        v = _reset(u, spike, th, v_r, SOFT_RESET)
        tl.store(s_ptr + t * step + o_off, spike.to(s_ptr.dtype.element_ty), mask=mask)
        if SAVE_H:
            tl.store(h_ptr + t * step + o_off, h.to(h_ptr.dtype.element_ty), mask=mask)
    tl.store(vout_ptr + o_off, v.to(vout_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _lif_bwd_kernel(
    gs_ptr,  # [T, N, C, H, W] strided: ∂L/∂spikes
    gvout_ptr,  # [N, C, H, W] strided: ∂L/∂v_T (HAS_GV)
    h_ptr,  # [T, N, C, H, W] contiguous saved pre-BN membrane (spikes are recomputed from it)
    th_ptr, mu_ptr, r_ptr, beta_ptr, thf_ptr, sgn_ptr,  # [C] as in the forward
    gx_ptr,  # [T, N, C, H, W] contiguous out
    gv0_ptr,  # [N, C, H, W] contiguous out (fp32/fp64)
    part_ptr,  # [4, P, C] fp32/fp64 out: Σ gĥ, Σ gĥ·(h − μ), −∂θ, −∂θ' per program
    T, C, H, W, M, P,
    stride_g_t, stride_g_n, stride_g_c, stride_g_h, stride_g_w,
    stride_gv_n, stride_gv_c, stride_gv_h, stride_gv_w,
    tau, v_reset, alpha,
    MODE: tl.constexpr,
    NORM: tl.constexpr,
    CARRY_NORM: tl.constexpr,
    DECAY_INPUT: tl.constexpr,
    SOFT_RESET: tl.constexpr,
    DETACH_RESET: tl.constexpr,
    SURROGATE: tl.constexpr,
    HAS_GV: tl.constexpr,
    BLOCK: tl.constexpr,
    ACC: tl.constexpr,
):
    pid_m = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1).to(tl.int64)
    m = pid_m * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    mask = m < M
    HW = H * W
    n = m // HW
    r_sp = m % HW
    i = r_sp // W
    j = r_sp % W
    g_off = n * stride_g_n + c * stride_g_c + i * stride_g_h + j * stride_g_w
    o_off = (n * C + c) * HW + r_sp
    step = tl.cast(C, tl.int64) * M  # int64: T·N·C·H·W may pass 2**31

    th = tl.load(th_ptr + c).to(ACC)
    if NORM:
        mu = tl.load(mu_ptr + c).to(ACC)
        r = tl.load(r_ptr + c).to(ACC)
        beta = tl.load(beta_ptr + c).to(ACC)
    if MODE == 2:
        thf = tl.load(thf_ptr + c).to(ACC)
        sgn = tl.load(sgn_ptr + c).to(ACC)
    v_r = tl.cast(v_reset, ACC)
    x_scale = 1.0
    if DECAY_INPUT:
        x_scale = 1.0 / tau
    v_scale = 1.0 - 1.0 / tau

    if HAS_GV:
        gv_off = n * stride_gv_n + c * stride_gv_c + i * stride_gv_h + j * stride_gv_w
        gv = tl.load(gvout_ptr + gv_off, mask=mask, other=0.0).to(ACC)
    else:
        gv = tl.zeros([BLOCK], dtype=ACC)
    acc_b = tl.zeros([BLOCK], dtype=ACC)  # Σ gĥ
    acc_r = tl.zeros([BLOCK], dtype=ACC)  # Σ gĥ·(h − μ)
    acc_th = tl.zeros([BLOCK], dtype=ACC)
    acc_thf = tl.zeros([BLOCK], dtype=ACC)
    for tt in range(T):
        t = T - 1 - tt
        h = tl.load(h_ptr + t * step + o_off, mask=mask, other=0.0).to(ACC)
        gs = tl.load(gs_ptr + tl.cast(t, tl.int64) * stride_g_t + g_off, mask=mask, other=0.0).to(ACC)
        if NORM:
            h_hat = (h - mu) * r + beta
        if MODE == 0:
            z = h - th
        elif MODE == 1:
            z = h_hat - th
        else:
            z = sgn * (h - thf)
        if CARRY_NORM:
            u = h_hat
        else:
            u = h
        spike = z >= 0  # bit-identical to the forward: same saved h, same expression
        gu, gs_reset, gth_reset = _reset_bwd(gv, spike, u, th, v_r, SOFT_RESET, DETACH_RESET)
        gz = (gs + gs_reset) * _surrogate_grad(z, alpha, SURROGATE)
        gz = tl.where(mask, gz, 0.0)
        acc_th += gth_reset
        if MODE == 2:
            gh = sgn * gz
            acc_thf -= sgn * gz
            g_hat = gz * 0.0
        else:
            acc_th -= gz
            if MODE == 0:
                gh = gz
                g_hat = gz * 0.0
            else:
                gh = gz * 0.0
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
        tl.store(gx_ptr + t * step + o_off, (gh * x_scale).to(gx_ptr.dtype.element_ty), mask=mask)
        gv = gh * v_scale
    tl.store(gv0_ptr + o_off, gv.to(gv0_ptr.dtype.element_ty), mask=mask)
    part = part_ptr + pid_m * C + c
    tl.store(part, tl.sum(acc_b, axis=0))
    tl.store(part + P * C, tl.sum(acc_r, axis=0))
    tl.store(part + 2 * P * C, tl.sum(tl.where(mask, acc_th, 0.0), axis=0))
    tl.store(part + 3 * P * C, tl.sum(acc_thf, axis=0))


# ----------------------------------------------------------------------------------
# resident kernels: one program holds a whole channel for the whole T loop
# ----------------------------------------------------------------------------------


@triton.jit
def _mpbn_lif_fwd_kernel(
    x_ptr,  # [T, N, C, H, W] strided
    v0_ptr,  # [N, C, H, W] strided
    w_ptr, b_ptr,  # [C] γ, β (AFFINE)
    th_ptr,  # [C] threshold
    rm_ptr, rv_ptr,  # [C] running mean / var, updated in place (TRACK)
    mu_ptr, s2_ptr,  # [C] adaptive μ, σ² in (ADAPT > 0)
    mom_ptr,  # [T] adaptation momentum per step (ADAPT == 2)
    s_ptr,  # [T, N, C, H, W] contiguous out: spikes
    h_ptr,  # [T, N, C, H, W] contiguous out: pre-BN membrane (SAVE)
    vout_ptr,  # [N, C, H, W] contiguous out
    mean_ptr, rstd_ptr,  # [T, C] out (SAVE)
    mu_out_ptr, s2_out_ptr,  # [C] out (ADAPT > 0)
    T, C, H, W, M,
    stride_x_t, stride_x_n, stride_x_c, stride_x_h, stride_x_w,
    stride_v_n, stride_v_c, stride_v_h, stride_v_w,
    tau, v_reset, eps, momentum, batches_tracked,
    ADAPT: tl.constexpr,  # 0 training BN; 1 folded + batch statistics; 2 folded + running adaptation
    AFFINE: tl.constexpr,
    TRACK: tl.constexpr,
    USE_MOMENTUM: tl.constexpr,
    CARRY_NORM: tl.constexpr,
    DECAY_INPUT: tl.constexpr,
    SOFT_RESET: tl.constexpr,
    SAVE: tl.constexpr,
    BLOCK: tl.constexpr,
    ACC: tl.constexpr,
):
    c = tl.program_id(0).to(tl.int64)
    m = tl.arange(0, BLOCK).to(tl.int64)
    mask = m < M
    HW = H * W
    n = m // HW
    r_sp = m % HW
    i = r_sp // W
    j = r_sp % W
    x_off = n * stride_x_n + c * stride_x_c + i * stride_x_h + j * stride_x_w
    v_off = n * stride_v_n + c * stride_v_c + i * stride_v_h + j * stride_v_w
    o_off = (n * C + c) * HW + r_sp
    step = tl.cast(C, tl.int64) * M  # int64: T·N·C·H·W may pass 2**31

    th = tl.load(th_ptr + c).to(ACC)
    if AFFINE:
        gamma = tl.load(w_ptr + c).to(ACC)
        beta = tl.load(b_ptr + c).to(ACC)
    else:
        gamma = th * 0.0 + 1.0
        beta = th * 0.0
    if TRACK:
        rm = tl.load(rm_ptr + c).to(ACC)
        rv = tl.load(rv_ptr + c).to(ACC)
    mu = th * 0.0
    s2 = th * 0.0
    if ADAPT > 0:
        mu = tl.load(mu_ptr + c).to(ACC)
        s2 = tl.load(s2_ptr + c).to(ACC)
    v_r = tl.cast(v_reset, ACC)

    v = tl.load(v0_ptr + v_off, mask=mask, other=0.0).to(ACC)
    for t in range(T):
        x = tl.load(x_ptr + tl.cast(t, tl.int64) * stride_x_t + x_off, mask=mask, other=0.0).to(ACC)
        h = tl.where(mask, _charge(v, x, tau, v_r, DECAY_INPUT), 0.0)
        mean = tl.sum(h, axis=0) / M
        d = tl.where(mask, h - mean, 0.0)
        m2 = tl.sum(d * d, axis=0)
        mt = 0.0
        if ADAPT == 2:
            mt = tl.load(mom_ptr + t).to(ACC)
        z, u, rstd, mu, s2 = _step_normalise(h, mean, m2, M, gamma, beta, th, eps, mu, s2, mt, ADAPT, CARRY_NORM, ACC)
        spike = z >= 0
        v = _reset(u, spike, th, v_r, SOFT_RESET)
        tl.store(s_ptr + t * step + o_off, spike.to(s_ptr.dtype.element_ty), mask=mask)
        if SAVE:
            tl.store(h_ptr + t * step + o_off, h.to(h_ptr.dtype.element_ty), mask=mask)
            tl.store(mean_ptr + t * C + c, mean)
            tl.store(rstd_ptr + t * C + c, rstd)
        if TRACK:
            if USE_MOMENTUM:
                f = momentum
            else:
                f = 1.0 / (batches_tracked + t + 1.0)
            rm = (1.0 - f) * rm + f * mean
            rv = (1.0 - f) * rv + f * (m2 / (M - 1))
    tl.store(vout_ptr + o_off, v.to(vout_ptr.dtype.element_ty), mask=mask)
    if TRACK:
        tl.store(rm_ptr + c, rm.to(rm_ptr.dtype.element_ty))
        tl.store(rv_ptr + c, rv.to(rv_ptr.dtype.element_ty))
    if ADAPT > 0:
        tl.store(mu_out_ptr + c, mu.to(mu_out_ptr.dtype.element_ty))
        tl.store(s2_out_ptr + c, s2.to(s2_out_ptr.dtype.element_ty))


@triton.jit
def _mpbn_bn_bwd_step(
    h, gs, gv, mask, mean, rstd, gamma, beta, th, v_r, alpha,
    SOFT_RESET: tl.constexpr, DETACH_RESET: tl.constexpr, CARRY_NORM: tl.constexpr, SURROGATE: tl.constexpr,
):
    """Per step, up to the BN reduction: x̂, ∂L/∂ĥ (gŷ), the raw-carry gradient and −∂θ.

    The spike is recomputed from the saved h, μ_t, rstd_t with the forward's expression
    (so it is bit-identical and need not be saved)."""
    xhat = (h - mean) * rstd
    h_hat = xhat * gamma + beta
    z = h_hat - th
    spike = z >= 0
    xhat = tl.where(mask, xhat, 0.0)
    if CARRY_NORM:
        u = h_hat
    else:
        u = h
    gu, gs_reset, gth = _reset_bwd(gv, spike, u, th, v_r, SOFT_RESET, DETACH_RESET)
    gz = (gs + gs_reset) * _surrogate_grad(z, alpha, SURROGATE)
    if CARRY_NORM:
        g_hat = gz + gu
        g_direct = gz * 0.0
    else:
        g_hat = gz
        g_direct = gu
    g_hat = tl.where(mask, g_hat, 0.0)
    gth = tl.where(mask, gth - gz, 0.0)
    return xhat, g_hat, g_direct, gth


@triton.jit
def _mpbn_lif_bwd_kernel(
    gs_ptr,  # [T, N, C, H, W] strided
    gvout_ptr,  # [N, C, H, W] strided (HAS_GV)
    h_ptr,  # [T, N, C, H, W] contiguous saved pre-BN membrane
    mean_ptr, rstd_ptr,  # [T, C] saved
    w_ptr, b_ptr, th_ptr,  # [C]
    gx_ptr,  # [T, N, C, H, W] contiguous out
    gv0_ptr,  # [N, C, H, W] contiguous out
    gw_ptr, gb_ptr, gth_ptr,  # [C] out (compute dtype)
    T, C, H, W, M,
    stride_g_t, stride_g_n, stride_g_c, stride_g_h, stride_g_w,
    stride_gv_n, stride_gv_c, stride_gv_h, stride_gv_w,
    tau, v_reset, alpha,
    AFFINE: tl.constexpr,
    CARRY_NORM: tl.constexpr,
    DECAY_INPUT: tl.constexpr,
    SOFT_RESET: tl.constexpr,
    DETACH_RESET: tl.constexpr,
    SURROGATE: tl.constexpr,
    HAS_GV: tl.constexpr,
    BLOCK: tl.constexpr,
    ACC: tl.constexpr,
):
    c = tl.program_id(0).to(tl.int64)
    m = tl.arange(0, BLOCK).to(tl.int64)
    mask = m < M
    HW = H * W
    n = m // HW
    r_sp = m % HW
    i = r_sp // W
    j = r_sp % W
    g_off = n * stride_g_n + c * stride_g_c + i * stride_g_h + j * stride_g_w
    o_off = (n * C + c) * HW + r_sp
    step = tl.cast(C, tl.int64) * M  # int64: T·N·C·H·W may pass 2**31

    th = tl.load(th_ptr + c).to(ACC)
    if AFFINE:
        gamma = tl.load(w_ptr + c).to(ACC)
        beta = tl.load(b_ptr + c).to(ACC)
    else:
        gamma = th * 0.0 + 1.0
        beta = th * 0.0
    v_r = tl.cast(v_reset, ACC)
    x_scale = 1.0
    if DECAY_INPUT:
        x_scale = 1.0 / tau
    v_scale = 1.0 - 1.0 / tau

    if HAS_GV:
        gv_off = n * stride_gv_n + c * stride_gv_c + i * stride_gv_h + j * stride_gv_w
        gv = tl.load(gvout_ptr + gv_off, mask=mask, other=0.0).to(ACC)
    else:
        gv = tl.zeros([BLOCK], dtype=ACC)
    acc_w = tl.zeros([BLOCK], dtype=ACC)
    acc_b = tl.zeros([BLOCK], dtype=ACC)
    acc_th = tl.zeros([BLOCK], dtype=ACC)
    for tt in range(T):
        t = T - 1 - tt
        h = tl.load(h_ptr + t * step + o_off, mask=mask, other=0.0).to(ACC)
        gs = tl.load(gs_ptr + tl.cast(t, tl.int64) * stride_g_t + g_off, mask=mask, other=0.0).to(ACC)
        mean = tl.load(mean_ptr + t * C + c).to(ACC)
        rstd = tl.load(rstd_ptr + t * C + c).to(ACC)
        xhat, g_hat, g_direct, gth = _mpbn_bn_bwd_step(
            h, gs, gv, mask, mean, rstd, gamma, beta, th, v_r, alpha,
            SOFT_RESET, DETACH_RESET, CARRY_NORM, SURROGATE,
        )
        a_sum = tl.sum(g_hat, axis=0)
        b_sum = tl.sum(g_hat * xhat, axis=0)
        acc_w += g_hat * xhat
        acc_b += g_hat
        acc_th += gth
        gh = gamma * rstd * (g_hat - a_sum / M - xhat * (b_sum / M)) + g_direct
        tl.store(gx_ptr + t * step + o_off, (gh * x_scale).to(gx_ptr.dtype.element_ty), mask=mask)
        gv = gh * v_scale
    tl.store(gv0_ptr + o_off, gv.to(gv0_ptr.dtype.element_ty), mask=mask)
    tl.store(gw_ptr + c, tl.sum(acc_w, axis=0))
    tl.store(gb_ptr + c, tl.sum(acc_b, axis=0))
    tl.store(gth_ptr + c, tl.sum(acc_th, axis=0))


# ----------------------------------------------------------------------------------
# split kernels (large M): two launches per step, a channel over P programs
# ----------------------------------------------------------------------------------


@triton.jit
def _mpbn_lif_stats_kernel(
    x_ptr,  # [T, N, C, H, W] strided (step t)
    v_ptr,  # [N, C, H, W] contiguous membrane buffer (compute dtype)
    h_ptr,  # [N, C, H, W] contiguous out: h of this step (into the saved [T, ...] buffer)
    pmean_ptr, pm2_ptr,  # [P, C] out: partial mean and M2 of h per program
    t, C, H, W, M,
    stride_x_t, stride_x_n, stride_x_c, stride_x_h, stride_x_w,
    tau, v_reset,
    DECAY_INPUT: tl.constexpr,
    BLOCK: tl.constexpr,
    ACC: tl.constexpr,
):
    pid_m = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1).to(tl.int64)
    m = pid_m * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    mask = m < M
    HW = H * W
    n = m // HW
    r_sp = m % HW
    i = r_sp // W
    j = r_sp % W
    x_off = tl.cast(t, tl.int64) * stride_x_t + n * stride_x_n + c * stride_x_c + i * stride_x_h + j * stride_x_w
    o_off = (n * C + c) * HW + r_sp
    x = tl.load(x_ptr + x_off, mask=mask, other=0.0).to(ACC)
    v = tl.load(v_ptr + o_off, mask=mask, other=0.0).to(ACC)
    h = tl.where(mask, _charge(v, x, tau, tl.cast(v_reset, ACC), DECAY_INPUT), 0.0)
    tl.store(h_ptr + o_off, h.to(h_ptr.dtype.element_ty), mask=mask)
    count = tl.minimum(M - pid_m * BLOCK, BLOCK).to(ACC)
    mean = tl.sum(h, axis=0) / count
    d = tl.where(mask, h - mean, 0.0)
    tl.store(pmean_ptr + pid_m * C + c, mean)
    tl.store(pm2_ptr + pid_m * C + c, tl.sum(d * d, axis=0))


@triton.jit
def _mpbn_lif_apply_kernel(
    h_ptr,  # [N, C, H, W] contiguous: h of this step
    v_ptr,  # [N, C, H, W] contiguous membrane buffer, overwritten with the new membrane
    s_ptr,  # [N, C, H, W] contiguous out: spikes of this step
    pmean_ptr, pm2_ptr,  # [P, C] partial statistics from _mpbn_lif_stats_kernel
    w_ptr, b_ptr, th_ptr,  # [C]
    rm_ptr, rv_ptr,  # [C] running statistics, updated by program 0 (TRACK)
    mean_ptr, rstd_ptr,  # [C] out: this step's row of the saved [T, C] statistics
    mu_hist_ptr, s2_hist_ptr,  # [T + 1, C] adaptive state; reads row t, program 0 writes row t + 1
    mom_ptr,  # [T] adaptation momentum per step
    t, C, H, W, M, P,
    v_reset, eps, momentum, batches_tracked,
    ADAPT: tl.constexpr,
    AFFINE: tl.constexpr,
    TRACK: tl.constexpr,
    USE_MOMENTUM: tl.constexpr,
    CARRY_NORM: tl.constexpr,
    SOFT_RESET: tl.constexpr,
    BLOCK: tl.constexpr,
    BLOCK_P: tl.constexpr,
    ACC: tl.constexpr,
):
    pid_m = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1).to(tl.int64)
    # multi-way Chan combine of the P partials, same order in every program
    p = tl.arange(0, BLOCK_P).to(tl.int64)
    pmask = p < P
    counts = tl.where(pmask, tl.minimum(M - p * BLOCK, BLOCK), 0).to(ACC)
    pmean = tl.load(pmean_ptr + p * C + c, mask=pmask, other=0.0).to(ACC)
    pm2 = tl.load(pm2_ptr + p * C + c, mask=pmask, other=0.0).to(ACC)
    mean = tl.sum(counts * pmean, axis=0) / M
    dm = tl.where(pmask, pmean - mean, 0.0)
    m2 = tl.sum(pm2, axis=0) + tl.sum(counts * dm * dm, axis=0)

    th = tl.load(th_ptr + c).to(ACC)
    if AFFINE:
        gamma = tl.load(w_ptr + c).to(ACC)
        beta = tl.load(b_ptr + c).to(ACC)
    else:
        gamma = th * 0.0 + 1.0
        beta = th * 0.0
    mu = th * 0.0
    s2 = th * 0.0
    mt = 0.0
    if ADAPT > 0:
        mu = tl.load(mu_hist_ptr + t * C + c).to(ACC)
        s2 = tl.load(s2_hist_ptr + t * C + c).to(ACC)
    if ADAPT == 2:
        mt = tl.load(mom_ptr + t).to(ACC)

    m = pid_m * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    mask = m < M
    HW = H * W
    o_off = ((m // HW) * C + c) * HW + m % HW
    h = tl.load(h_ptr + o_off, mask=mask, other=0.0).to(ACC)
    z, u, rstd, mu, s2 = _step_normalise(h, mean, m2, M, gamma, beta, th, eps, mu, s2, mt, ADAPT, CARRY_NORM, ACC)
    spike = z >= 0
    v = _reset(u, spike, th, tl.cast(v_reset, ACC), SOFT_RESET)
    tl.store(s_ptr + o_off, spike.to(s_ptr.dtype.element_ty), mask=mask)
    tl.store(v_ptr + o_off, v.to(v_ptr.dtype.element_ty), mask=mask)
    if pid_m == 0:
        tl.store(mean_ptr + c, mean)
        tl.store(rstd_ptr + c, rstd)
        if ADAPT > 0:
            tl.store(mu_hist_ptr + (t + 1) * C + c, mu)
            tl.store(s2_hist_ptr + (t + 1) * C + c, s2)
        if TRACK:
            if USE_MOMENTUM:
                f = momentum
            else:
                f = 1.0 / (batches_tracked + t + 1.0)
            rm = tl.load(rm_ptr + c).to(ACC)
            rv = tl.load(rv_ptr + c).to(ACC)
            rm = (1.0 - f) * rm + f * mean
            rv = (1.0 - f) * rv + f * (m2 / (M - 1))
            tl.store(rm_ptr + c, rm.to(rm_ptr.dtype.element_ty))
            tl.store(rv_ptr + c, rv.to(rv_ptr.dtype.element_ty))


@triton.jit
def _mpbn_lif_bwd_partial_kernel(
    gs_ptr,  # [T, N, C, H, W] strided
    h_ptr,  # [N, C, H, W] contiguous: step t of the saved h
    gv_ptr,  # [N, C, H, W] contiguous: ∂L/∂v_t in, overwritten with the raw-carry gradient
    ghat_ptr,  # [N, C, H, W] contiguous out: gŷ
    mean_ptr, rstd_ptr,  # [C] row t of the saved statistics
    w_ptr, b_ptr, th_ptr,  # [C]
    pa_ptr, pb_ptr,  # [P, C] out: partial Σ gŷ, Σ gŷ·x̂
    pth_ptr,  # [P, C] accumulated −∂θ partials (read-modify-write of the program's own slot)
    t, C, H, W, M,
    stride_g_t, stride_g_n, stride_g_c, stride_g_h, stride_g_w,
    v_reset, alpha,
    AFFINE: tl.constexpr,
    CARRY_NORM: tl.constexpr,
    SOFT_RESET: tl.constexpr,
    DETACH_RESET: tl.constexpr,
    SURROGATE: tl.constexpr,
    BLOCK: tl.constexpr,
    ACC: tl.constexpr,
):
    pid_m = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1).to(tl.int64)
    m = pid_m * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    mask = m < M
    HW = H * W
    n = m // HW
    r_sp = m % HW
    i = r_sp // W
    j = r_sp % W
    g_off = tl.cast(t, tl.int64) * stride_g_t + n * stride_g_n + c * stride_g_c + i * stride_g_h + j * stride_g_w
    o_off = (n * C + c) * HW + r_sp

    th = tl.load(th_ptr + c).to(ACC)
    if AFFINE:
        gamma = tl.load(w_ptr + c).to(ACC)
        beta = tl.load(b_ptr + c).to(ACC)
    else:
        gamma = th * 0.0 + 1.0
        beta = th * 0.0
    mean = tl.load(mean_ptr + c).to(ACC)
    rstd = tl.load(rstd_ptr + c).to(ACC)
    h = tl.load(h_ptr + o_off, mask=mask, other=0.0).to(ACC)
    gs = tl.load(gs_ptr + g_off, mask=mask, other=0.0).to(ACC)
    gv = tl.load(gv_ptr + o_off, mask=mask, other=0.0).to(ACC)
    xhat, g_hat, g_direct, gth = _mpbn_bn_bwd_step(
        h, gs, gv, mask, mean, rstd, gamma, beta, th, tl.cast(v_reset, ACC), alpha,
        SOFT_RESET, DETACH_RESET, CARRY_NORM, SURROGATE,
    )
    tl.store(ghat_ptr + o_off, g_hat, mask=mask)
    tl.store(gv_ptr + o_off, g_direct, mask=mask)
    slot = pid_m * C + c
    tl.store(pa_ptr + slot, tl.sum(g_hat, axis=0))
    tl.store(pb_ptr + slot, tl.sum(g_hat * xhat, axis=0))
    tl.store(pth_ptr + slot, tl.load(pth_ptr + slot) + tl.sum(gth, axis=0))


@triton.jit
def _mpbn_lif_bwd_apply_kernel(
    h_ptr,  # [N, C, H, W] contiguous: step t of the saved h
    ghat_ptr,  # [N, C, H, W] contiguous: gŷ
    gv_ptr,  # [N, C, H, W] contiguous: raw-carry gradient in, ∂L/∂v_{t−1} out
    gx_ptr,  # [N, C, H, W] contiguous out: step t of ∂L/∂x
    mean_ptr, rstd_ptr,  # [C] row t
    w_ptr,  # [C]
    pa_ptr, pb_ptr,  # [P, C] partial Σ gŷ, Σ gŷ·x̂
    gw_ptr, gb_ptr,  # [C] accumulated by program 0
    C, H, W, M, P,
    tau,
    AFFINE: tl.constexpr,
    CARRY_NORM: tl.constexpr,
    DECAY_INPUT: tl.constexpr,
    BLOCK: tl.constexpr,
    BLOCK_P: tl.constexpr,
    ACC: tl.constexpr,
):
    pid_m = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1).to(tl.int64)
    p = tl.arange(0, BLOCK_P).to(tl.int64)
    pmask = p < P
    a_sum = tl.sum(tl.load(pa_ptr + p * C + c, mask=pmask, other=0.0), axis=0)
    b_sum = tl.sum(tl.load(pb_ptr + p * C + c, mask=pmask, other=0.0), axis=0)
    mean = tl.load(mean_ptr + c).to(ACC)
    rstd = tl.load(rstd_ptr + c).to(ACC)
    if AFFINE:
        gamma = tl.load(w_ptr + c).to(ACC)
    else:
        gamma = rstd * 0.0 + 1.0
    m = pid_m * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    mask = m < M
    HW = H * W
    o_off = ((m // HW) * C + c) * HW + m % HW
    h = tl.load(h_ptr + o_off, mask=mask, other=0.0).to(ACC)
    g_hat = tl.load(ghat_ptr + o_off, mask=mask, other=0.0).to(ACC)
    xhat = (h - mean) * rstd
    gh = gamma * rstd * (g_hat - a_sum / M - xhat * (b_sum / M))
    if not CARRY_NORM:
        gh += tl.load(gv_ptr + o_off, mask=mask, other=0.0).to(ACC)
    x_scale = 1.0
    if DECAY_INPUT:
        x_scale = 1.0 / tau
    tl.store(gx_ptr + o_off, (gh * x_scale).to(gx_ptr.dtype.element_ty), mask=mask)
    tl.store(gv_ptr + o_off, (gh * (1.0 - 1.0 / tau)).to(gv_ptr.dtype.element_ty), mask=mask)
    if pid_m == 0:
        tl.store(gw_ptr + c, tl.load(gw_ptr + c) + b_sum)
        tl.store(gb_ptr + c, tl.load(gb_ptr + c) + a_sum)


# ----------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------


def _store_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype kernels write outputs in. Under the Triton interpreter bf16 stores are
    emulated with truncation (and bool → bf16 casts fail), so there the kernels write
    fp32 and torch rounds to bf16 (round-to-nearest-even, as a GPU store does)."""
    if dtype == torch.bfloat16 and interpreter_active():
        return torch.float32
    return dtype


def _num_warps(block: int) -> int:
    return max(1, min(16, block // 256))


def _elementwise_block(M: int) -> int:
    return min(next_pow2(M), ELEMENTWISE_BLOCK)


def _lif_cfg(mode, carry_norm, decay_input, soft_reset):
    return dict(
        MODE=mode,
        NORM=(mode == 1) or carry_norm,
        CARRY_NORM=carry_norm,
        DECAY_INPUT=decay_input,
        SOFT_RESET=soft_reset,
    )


def _launch_lif_fwd(x, v0, th, mu, r, beta, thf, sgn, out_dtype, tau, v_reset, mode, carry_norm, decay_input, soft_reset, save_h):
    T, N, C = x.shape[:3]
    x5, v4 = as_5d(x), as_4d(v0)
    H, W = x5.shape[3:]
    M = N * H * W
    acc = acc_torch_dtype(out_dtype)
    st = _store_dtype(out_dtype)
    s = torch.empty(x.shape, dtype=st, device=x.device)
    v_out = torch.empty(x.shape[1:], dtype=st, device=x.device)
    h = torch.empty(x.shape if save_h else (0,), dtype=acc, device=x.device)
    dummy = th
    BLOCK = _elementwise_block(M)
    grid = (triton.cdiv(M, BLOCK), C)
    _lif_fwd_kernel[grid](
        x5, v4, th,
        dummy if mu is None else mu, dummy if r is None else r, dummy if beta is None else beta,
        dummy if thf is None else thf, dummy if sgn is None else sgn,
        s, h if save_h else s, v_out,
        T, C, H, W, M,
        *x5.stride(), *v4.stride(),
        float(tau), float(v_reset),
        **_lif_cfg(mode, carry_norm, decay_input, soft_reset),
        SAVE_H=save_h, BLOCK=BLOCK, ACC=acc_dtype(out_dtype), num_warps=_num_warps(BLOCK),
    )
    return s.to(out_dtype), v_out.to(out_dtype), h


def _launch_lif_bwd(gs, gv, h, gx_dtype, th, mu, r, beta, thf, sgn, tau, v_reset, alpha, mode, carry_norm, decay_input, soft_reset, detach_reset, surrogate):
    T, N, C = h.shape[:3]
    g5 = as_5d(gs)
    H, W = g5.shape[3:]
    M = N * H * W
    acc = h.dtype
    gx = torch.empty(h.shape, dtype=_store_dtype(gx_dtype), device=h.device)
    gv0 = torch.empty(h.shape[1:], dtype=acc, device=h.device)
    BLOCK = _elementwise_block(M)
    P = triton.cdiv(M, BLOCK)
    part = torch.empty((4, P, C), dtype=acc, device=h.device)
    gv4 = as_4d(gv) if gv is not None else None
    gv_strides = gv4.stride() if gv4 is not None else (0, 0, 0, 0)
    dummy = th
    _lif_bwd_kernel[(P, C)](
        g5, gv4, h, th,
        dummy if mu is None else mu, dummy if r is None else r, dummy if beta is None else beta,
        dummy if thf is None else thf, dummy if sgn is None else sgn,
        gx, gv0, part,
        T, C, H, W, M, P,
        *g5.stride(), *gv_strides,
        float(tau), float(v_reset), float(alpha),
        **_lif_cfg(mode, carry_norm, decay_input, soft_reset),
        DETACH_RESET=detach_reset, SURROGATE=_SURROGATES[surrogate], HAS_GV=gv is not None,
        BLOCK=BLOCK, ACC=acc_dtype(acc), num_warps=_num_warps(BLOCK),
    )
    return gx.to(gx_dtype), gv0, part.sum(dim=1)


def _stat_flags(weight, running_mean, momentum):
    return dict(AFFINE=weight is not None, TRACK=running_mean is not None, USE_MOMENTUM=momentum is not None)


def _launch_mpbn_lif_fwd(
    x, v0, weight, bias, running_mean, running_var, th, mu, s2, mom, out_dtype, *,
    adapt, momentum, batches_tracked, eps, tau, v_reset, carry_norm, decay_input, soft_reset, save,
):
    """Training (adapt == 0) or adaptive folded (adapt 1: batch, 2: running) forward.

    Returns spikes, v_T, saved h ([T, ...] compute dtype, or empty), mean and rstd
    ([T, C]) and the adapted μ, σ² ([C], compute dtype; empty when adapt == 0).
    """
    T, N, C = x.shape[:3]
    x5, v4 = as_5d(x), as_4d(v0)
    H, W = x5.shape[3:]
    M = N * H * W
    acc = acc_torch_dtype(out_dtype)
    dev = x.device
    st = _store_dtype(out_dtype)
    s = torch.empty(x.shape, dtype=st, device=dev)
    stats_shape = (T, C) if save else (0,)
    mean = torch.empty(stats_shape, dtype=acc, device=dev)
    rstd = torch.empty(stats_shape, dtype=acc, device=dev)
    ad_shape = (C,) if adapt else (0,)
    mu_out = torch.empty(ad_shape, dtype=acc, device=dev)
    s2_out = torch.empty(ad_shape, dtype=acc, device=dev)
    dummy = th
    common = dict(
        ADAPT=adapt, CARRY_NORM=carry_norm, SOFT_RESET=soft_reset, ACC=acc_dtype(out_dtype),
        **_stat_flags(weight, running_mean, momentum),
    )
    mom_f = 0.0 if momentum is None else float(momentum)
    if M <= RESIDENT_MAX_M:
        v_out = torch.empty(x.shape[1:], dtype=st, device=dev)
        h = torch.empty(x.shape if save else (0,), dtype=acc, device=dev)
        BLOCK = next_pow2(M)
        _mpbn_lif_fwd_kernel[(C,)](
            x5, v4,
            dummy if weight is None else weight, dummy if bias is None else bias, th,
            dummy if running_mean is None else running_mean, dummy if running_var is None else running_var,
            dummy if mu is None else mu, dummy if s2 is None else s2, dummy if mom is None else mom,
            s, h if save else s, v_out, mean if save else s, rstd if save else s,
            mu_out if adapt else s, s2_out if adapt else s,
            T, C, H, W, M,
            *x5.stride(), *v4.stride(),
            float(tau), float(v_reset), float(eps), mom_f, int(batches_tracked),
            DECAY_INPUT=decay_input, SAVE=save, BLOCK=BLOCK, num_warps=_num_warps(BLOCK), **common,
        )
        return s.to(out_dtype), v_out.to(out_dtype), h, mean, rstd, mu_out, s2_out

    # split path: the membrane in a compute-dtype buffer, two launches per step
    BLOCK = SPLIT_BLOCK
    P = triton.cdiv(M, BLOCK)
    BLOCK_P = next_pow2(P)
    v_buf = torch.empty(x.shape[1:], dtype=acc, device=dev)
    v_buf.copy_(v0)
    h = torch.empty(x.shape if save else x.shape[1:], dtype=acc, device=dev)
    pmean = torch.empty((P, C), dtype=acc, device=dev)
    pm2 = torch.empty((P, C), dtype=acc, device=dev)
    if not save:  # statistics rows still have to go somewhere
        mean_rows = torch.empty((T, C), dtype=acc, device=dev)
        rstd_rows = torch.empty((T, C), dtype=acc, device=dev)
    else:
        mean_rows, rstd_rows = mean, rstd
    if adapt:
        mu_hist = torch.empty((T + 1, C), dtype=acc, device=dev)
        s2_hist = torch.empty((T + 1, C), dtype=acc, device=dev)
        mu_hist[0].copy_(mu)
        s2_hist[0].copy_(s2)
    else:
        mu_hist = s2_hist = pmean
    grid = (P, C)
    for t in range(T):
        h_t = h[t] if save else h
        _mpbn_lif_stats_kernel[grid](
            x5, v_buf, h_t, pmean, pm2,
            t, C, H, W, M, *x5.stride(), float(tau), float(v_reset),
            DECAY_INPUT=decay_input, BLOCK=BLOCK, ACC=acc_dtype(out_dtype), num_warps=_num_warps(BLOCK),
        )
        _mpbn_lif_apply_kernel[grid](
            h_t, v_buf, s[t], pmean, pm2,
            dummy if weight is None else weight, dummy if bias is None else bias, th,
            dummy if running_mean is None else running_mean, dummy if running_var is None else running_var,
            mean_rows[t], rstd_rows[t], mu_hist, s2_hist, dummy if mom is None else mom,
            t, C, H, W, M, P,
            float(v_reset), float(eps), mom_f, int(batches_tracked),
            BLOCK=BLOCK, BLOCK_P=BLOCK_P, num_warps=_num_warps(BLOCK), **common,
        )
    if adapt:
        mu_out.copy_(mu_hist[T])
        s2_out.copy_(s2_hist[T])
    if not save:
        h = torch.empty((0,), dtype=acc, device=dev)
    return s.to(out_dtype), v_buf.to(out_dtype), h, mean, rstd, mu_out, s2_out


def _launch_mpbn_lif_bwd(
    gs, gv, h, gx_dtype, mean, rstd, weight, bias, th, *, tau, v_reset, alpha, carry_norm, decay_input, soft_reset, detach_reset, surrogate,
):
    T, N, C = h.shape[:3]
    g5 = as_5d(gs)
    H, W = g5.shape[3:]
    M = N * H * W
    acc = h.dtype
    dev = h.device
    gx_st = _store_dtype(gx_dtype)
    gx = torch.empty(h.shape, dtype=gx_st, device=dev)
    gw = torch.zeros(C, dtype=acc, device=dev)
    gb = torch.zeros(C, dtype=acc, device=dev)
    gth = torch.zeros(C, dtype=acc, device=dev)
    dummy = th
    flags = dict(
        AFFINE=weight is not None, CARRY_NORM=carry_norm, SOFT_RESET=soft_reset, DETACH_RESET=detach_reset,
        SURROGATE=_SURROGATES[surrogate], ACC=acc_dtype(acc),
    )
    w = dummy if weight is None else weight
    b = dummy if bias is None else bias
    if M <= RESIDENT_MAX_M:
        gv0 = torch.empty(h.shape[1:], dtype=acc, device=dev)
        gv4 = as_4d(gv) if gv is not None else None
        BLOCK = next_pow2(M)
        _mpbn_lif_bwd_kernel[(C,)](
            g5, gv4, h, mean, rstd, w, b, th,
            gx, gv0, gw, gb, gth,
            T, C, H, W, M,
            *g5.stride(), *(gv4.stride() if gv4 is not None else (0, 0, 0, 0)),
            float(tau), float(v_reset), float(alpha),
            DECAY_INPUT=decay_input, HAS_GV=gv is not None, BLOCK=BLOCK, num_warps=_num_warps(BLOCK), **flags,
        )
        return gx.to(gx_dtype), gv0, gw, gb, gth

    BLOCK = SPLIT_BLOCK
    P = triton.cdiv(M, BLOCK)
    BLOCK_P = next_pow2(P)
    gv_buf = torch.zeros(h.shape[1:], dtype=acc, device=dev)
    if gv is not None:
        gv_buf.copy_(gv)
    ghat = torch.empty(h.shape[1:], dtype=acc, device=dev)
    pa = torch.empty((P, C), dtype=acc, device=dev)
    pb = torch.empty((P, C), dtype=acc, device=dev)
    pth = torch.zeros((P, C), dtype=acc, device=dev)
    grid = (P, C)
    for t in reversed(range(T)):
        _mpbn_lif_bwd_partial_kernel[grid](
            g5, h[t], gv_buf, ghat, mean[t], rstd[t], w, b, th, pa, pb, pth,
            t, C, H, W, M, *g5.stride(), float(v_reset), float(alpha),
            BLOCK=BLOCK, num_warps=_num_warps(BLOCK), **flags,
        )
        _mpbn_lif_bwd_apply_kernel[grid](
            h[t], ghat, gv_buf, gx[t], mean[t], rstd[t], w, pa, pb, gw, gb,
            C, H, W, M, P, float(tau),
            AFFINE=weight is not None, CARRY_NORM=carry_norm, DECAY_INPUT=decay_input,
            BLOCK=BLOCK, BLOCK_P=BLOCK_P, ACC=acc_dtype(acc), num_warps=_num_warps(BLOCK),
        )
    gth.copy_(pth.sum(dim=0))
    return gx.to(gx_dtype), gv_buf, gw, gb, gth


# ----------------------------------------------------------------------------------
# op registration (torch.library custom ops: torch.compile and opcheck friendly)
# ----------------------------------------------------------------------------------


@torch.library.custom_op("snnorm::lif_elementwise", mutates_args=())
def _lif_elementwise_op(
    x: Tensor, v: Tensor, th: Tensor,
    mu: Optional[Tensor], r: Optional[Tensor], beta: Optional[Tensor],
    thf: Optional[Tensor], sgn: Optional[Tensor],
    tau: float, decay_input: bool, v_reset: float, soft_reset: bool, detach_reset: bool,
    surrogate: str, alpha: float, mode: int, carry_norm: bool, save_h: bool, out_dtype: torch.dtype,
) -> tuple[Tensor, Tensor, Tensor]:
    """(spikes, v_T, saved h) for plain LIF (mode 0), MPBN eval (1), folded threshold (2)."""
    return _launch_lif_fwd(x, v, th, mu, r, beta, thf, sgn, out_dtype, tau, v_reset, mode, carry_norm, decay_input, soft_reset, save_h)


@_lif_elementwise_op.register_fake
def _(x, v, th, mu, r, beta, thf, sgn, tau, decay_input, v_reset, soft_reset, detach_reset, surrogate, alpha, mode, carry_norm, save_h, out_dtype):
    odt = out_dtype
    h = x.new_empty(x.shape if save_h else (0,), dtype=acc_torch_dtype(odt))
    return x.new_empty(x.shape, dtype=odt), x.new_empty(x.shape[1:], dtype=odt), h


@torch.library.custom_op("snnorm::lif_elementwise_bwd", mutates_args=())
def _lif_elementwise_bwd_op(
    gs: Tensor, gv: Optional[Tensor], h: Tensor, gx_dtype: torch.dtype, th: Tensor,
    mu: Optional[Tensor], r: Optional[Tensor], beta: Optional[Tensor],
    thf: Optional[Tensor], sgn: Optional[Tensor],
    tau: float, decay_input: bool, v_reset: float, soft_reset: bool, detach_reset: bool,
    surrogate: str, alpha: float, mode: int, carry_norm: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """(∂x, ∂v0, [4, C] per-channel sums: Σgĥ, Σgĥ·(h − μ), ∂θ, ∂θ')."""
    return _launch_lif_bwd(gs, gv, h, gx_dtype, th, mu, r, beta, thf, sgn, tau, v_reset, alpha, mode, carry_norm, decay_input, soft_reset, detach_reset, surrogate)


@_lif_elementwise_bwd_op.register_fake
def _(gs, gv, h, gx_dtype, th, mu, r, beta, thf, sgn, tau, decay_input, v_reset, soft_reset, detach_reset, surrogate, alpha, mode, carry_norm):
    return h.new_empty(h.shape, dtype=gx_dtype), h.new_empty(h.shape[1:]), h.new_empty((4, h.shape[2]))


def _lif_elementwise_setup(ctx, inputs, output):
    x, v, th, mu, r, beta, thf, sgn, tau, decay_input, v_reset, soft_reset, detach_reset, surrogate, alpha, mode, carry_norm, save_h, _ = inputs
    s, _, h = output
    ctx.set_materialize_grads(False)  # an unused v_T gets None, not a zeros tensor the kernel would read
    if not save_h:
        ctx.missing_h = True
        return
    ctx.missing_h = False
    ctx.save_for_backward(h, th, mu, r, beta, thf, sgn)
    ctx.cfg = (tau, decay_input, v_reset, soft_reset, detach_reset, surrogate, alpha, mode, carry_norm)
    ctx.dtypes = (x.dtype, v.dtype)


def _lif_elementwise_backward(ctx, gs, gv, gh_unused):
    if ctx.missing_h:
        raise RuntimeError(
            "snnorm::lif_elementwise was called with save_h=False (no gradient was expected) but a backward pass was requested"
        )
    h, th, mu, r, beta, thf, sgn = ctx.saved_tensors
    if gs is None:
        gs = torch.zeros_like(h)
    gx, gv0, sums = _lif_elementwise_bwd_op(gs, gv, h, ctx.dtypes[0], th, mu, r, beta, thf, sgn, *ctx.cfg)
    g_beta, g_r, g_th, g_thf = sums.unbind(0)

    def cast(g, like):
        return None if like is None else g.to(like.dtype)

    g_mu = None if mu is None else (-(g_beta * r.to(g_beta.dtype))).to(mu.dtype)
    return (
        gx.to(ctx.dtypes[0]), gv0.to(ctx.dtypes[1]), cast(g_th, th),
        g_mu, cast(g_r, r), cast(g_beta, beta), cast(g_thf, thf), None,
    ) + (None,) * 11


_lif_elementwise_op.register_autograd(_lif_elementwise_backward, setup_context=_lif_elementwise_setup)


def _no_double_backward(op: str):
    def backward(ctx, *grads):
        raise NotImplementedError(
            f"snnorm triton {op}: double backward (differentiating a gradient taken with create_graph=True) "
            "is not supported by the fused kernels; use the torch backend (snnorm.functional.set_backend(net, 'torch')) "
            "for higher-order gradients"
        )

    return backward


_lif_elementwise_bwd_op.register_autograd(_no_double_backward("lif"), setup_context=lambda ctx, inputs, output: None)


@torch.library.custom_op("snnorm::mpbn_lif_train", mutates_args=())
def _mpbn_lif_train_op(
    x: Tensor, v: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
    running_mean: Optional[Tensor], running_var: Optional[Tensor], th: Tensor,
    momentum: Optional[float], batches_tracked: int, eps: float,
    tau: float, decay_input: bool, v_reset: float, soft_reset: bool, detach_reset: bool,
    surrogate: str, alpha: float, carry_norm: bool, save: bool, out_dtype: torch.dtype,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """MPBN-LIF with batch statistics: (spikes, v_T, saved h, mean [T, C], rstd [T, C],
    updated running mean, updated running var).

    Functional (autograd needs that): the running statistics come back as new tensors
    (empty when None) and the op-table wrapper copies them into the buffers.
    """
    acc = acc_torch_dtype(out_dtype)
    rm_new = running_mean.to(acc, copy=True) if running_mean is not None else None
    rv_new = running_var.to(acc, copy=True) if running_var is not None else None
    s, v_out, h, mean, rstd, _, _ = _launch_mpbn_lif_fwd(
        x, v, weight, bias, rm_new, rv_new, th, None, None, None, out_dtype,
        adapt=0, momentum=momentum, batches_tracked=batches_tracked, eps=eps, tau=tau, v_reset=v_reset,
        carry_norm=carry_norm, decay_input=decay_input, soft_reset=soft_reset, save=save,
    )
    if rm_new is None:  # distinct empty outputs: custom-op outputs must not alias
        rm_new, rv_new = x.new_empty((0,), dtype=acc), x.new_empty((0,), dtype=acc)
    return s, v_out, h, mean, rstd, rm_new, rv_new


@_mpbn_lif_train_op.register_fake
def _(x, v, weight, bias, running_mean, running_var, th, momentum, batches_tracked, eps, tau, decay_input, v_reset, soft_reset, detach_reset, surrogate, alpha, carry_norm, save, out_dtype):
    odt = out_dtype
    acc = acc_torch_dtype(odt)
    T, C = x.shape[0], x.shape[2]
    return (
        x.new_empty(x.shape, dtype=odt), x.new_empty(x.shape[1:], dtype=odt),
        x.new_empty(x.shape if save else (0,), dtype=acc),
        x.new_empty((T, C) if save else (0,), dtype=acc), x.new_empty((T, C) if save else (0,), dtype=acc),
        x.new_empty((0,) if running_mean is None else running_mean.shape, dtype=acc),
        x.new_empty((0,) if running_var is None else running_var.shape, dtype=acc),
    )


@torch.library.custom_op("snnorm::mpbn_lif_train_bwd", mutates_args=())
def _mpbn_lif_train_bwd_op(
    gs: Tensor, gv: Optional[Tensor], h: Tensor, gx_dtype: torch.dtype, mean: Tensor, rstd: Tensor,
    weight: Optional[Tensor], bias: Optional[Tensor], th: Tensor,
    tau: float, decay_input: bool, v_reset: float, soft_reset: bool, detach_reset: bool,
    surrogate: str, alpha: float, carry_norm: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(∂x, ∂v0, ∂γ, ∂β, ∂θ) of MPBN-LIF training."""
    return _launch_mpbn_lif_bwd(
        gs, gv, h, gx_dtype, mean, rstd, weight, bias, th, tau=tau, v_reset=v_reset, alpha=alpha, carry_norm=carry_norm,
        decay_input=decay_input, soft_reset=soft_reset, detach_reset=detach_reset, surrogate=surrogate,
    )


@_mpbn_lif_train_bwd_op.register_fake
def _(gs, gv, h, gx_dtype, mean, rstd, weight, bias, th, tau, decay_input, v_reset, soft_reset, detach_reset, surrogate, alpha, carry_norm):
    C = h.shape[2]
    return (
        h.new_empty(h.shape, dtype=gx_dtype), h.new_empty(h.shape[1:]),
        h.new_empty((C,)), h.new_empty((C,)), h.new_empty((C,)),
    )


def _mpbn_lif_train_setup(ctx, inputs, output):
    x, v, weight, bias, rm, rv, th, momentum, bt, eps, tau, decay_input, v_reset, soft_reset, detach_reset, surrogate, alpha, carry_norm, save, _ = inputs
    s, _, h, mean, rstd, _, _ = output
    ctx.set_materialize_grads(False)  # an unused v_T gets None, not a zeros tensor the kernel would read
    ctx.missing_h = not save
    if save:
        ctx.save_for_backward(h, mean, rstd, weight, bias, th)
    ctx.cfg = (tau, decay_input, v_reset, soft_reset, detach_reset, surrogate, alpha, carry_norm)
    ctx.dtypes = (x.dtype, v.dtype)


def _mpbn_lif_train_backward(ctx, gs, gv, gh, gmean, grstd, grm, grv):
    if ctx.missing_h:
        raise RuntimeError("snnorm::mpbn_lif_train was called with save=False (no gradient was expected) but a backward pass was requested")
    h, mean, rstd, weight, bias, th = ctx.saved_tensors
    if gs is None:
        gs = torch.zeros_like(h)
    gx, gv0, gw, gb, gth = _mpbn_lif_train_bwd_op(gs, gv, h, ctx.dtypes[0], mean, rstd, weight, bias, th, *ctx.cfg)
    return (
        gx.to(ctx.dtypes[0]), gv0.to(ctx.dtypes[1]),
        None if weight is None else gw.to(weight.dtype), None if bias is None else gb.to(bias.dtype),
        None, None, gth.to(th.dtype),
    ) + (None,) * 13


_mpbn_lif_train_op.register_autograd(_mpbn_lif_train_backward, setup_context=_mpbn_lif_train_setup)
_mpbn_lif_train_bwd_op.register_autograd(_no_double_backward("mpbn_lif"), setup_context=lambda ctx, inputs, output: None)


@torch.library.custom_op("snnorm::mpbn_lif_adapt", mutates_args=())
def _mpbn_lif_adapt_op(
    x: Tensor, v: Tensor, mu: Tensor, sigma2: Tensor, gamma: Tensor, beta: Tensor, th: Tensor, mom: Tensor,
    running: bool, eps: float, tau: float, decay_input: bool, v_reset: float, soft_reset: bool, carry_norm: bool,
    out_dtype: torch.dtype,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Folded MPBN-LIF with test-time threshold modulation: (spikes, v_T, μ_T, σ²_T). Forward only."""
    s, v_out, _, _, _, mu_out, s2_out = _launch_mpbn_lif_fwd(
        x, v, gamma, beta, None, None, th, mu, sigma2, mom, out_dtype,
        adapt=2 if running else 1, momentum=None, batches_tracked=0, eps=eps, tau=tau, v_reset=v_reset,
        carry_norm=carry_norm, decay_input=decay_input, soft_reset=soft_reset, save=False,
    )
    return s, v_out, mu_out, s2_out


@_mpbn_lif_adapt_op.register_fake
def _(x, v, mu, sigma2, gamma, beta, th, mom, running, eps, tau, decay_input, v_reset, soft_reset, carry_norm, out_dtype):
    odt = out_dtype
    C = x.shape[2]
    acc = acc_torch_dtype(odt)
    return x.new_empty(x.shape, dtype=odt), x.new_empty(x.shape[1:], dtype=odt), x.new_empty((C,), dtype=acc), x.new_empty((C,), dtype=acc)


def _mpbn_lif_adapt_backward(ctx, *grads):
    raise NotImplementedError(
        "snnorm triton mpbn_lif_folded: backward through test-time threshold adaptation (adapt='batch'/'running') "
        "is not implemented; use the torch backend, or adapt='none', to differentiate through a folded MPBN-LIF"
    )


_mpbn_lif_adapt_op.register_autograd(_mpbn_lif_adapt_backward, setup_context=lambda ctx, inputs, output: None)


# ----------------------------------------------------------------------------------
# op-table functions (signatures of snnorm.backends.torch_backend)
# ----------------------------------------------------------------------------------


def _out_dtype(x: Tensor, v: Tensor, *others) -> torch.dtype:
    """The dtype the torch reference's spikes and state end in: x, v and the tensors that
    enter the firing comparison promote together (Python floats do not promote)."""
    dtype = torch.promote_types(x.dtype, v.dtype)
    for o in others:
        if isinstance(o, Tensor):
            dtype = torch.promote_types(dtype, o.dtype)
    return dtype


def _surrogate_spec(surrogate: Callable, op: str):
    spec = surrogate.kernel_spec() if hasattr(surrogate, "kernel_spec") else None
    if spec is None or spec[0] not in _SURROGATES:
        warnings.warn(
            f"snnorm triton {op}: surrogate {type(surrogate).__name__} has no fused kernel "
            "(only Sigmoid and ATan do); falling back to the torch backend op",
            RuntimeWarning,
            stacklevel=3,
        )
        return None
    return spec[0], float(spec[1])


def _threshold_tensor(threshold, x: Tensor) -> Tensor:
    """A float threshold as a [C] tensor of the compute dtype (a tensor passes through)."""
    if isinstance(threshold, Tensor):
        return threshold
    return torch.full((x.shape[2],), float(threshold), dtype=acc_torch_dtype(x.dtype), device=x.device)


def _prepare(x_seq: Tensor, v, op: str) -> Tensor:
    if not isinstance(v, Tensor):
        v = torch.full((), float(v), dtype=x_seq.dtype, device=x_seq.device)
    check_device(op, x_seq, v)
    return v.expand(x_seq.shape[1:])  # a view: broadcast states are read with stride 0


def _wants_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(isinstance(t, Tensor) and t.requires_grad for t in tensors)


def _reset_args(v_reset):
    return (0.0, True) if v_reset is None else (float(v_reset), False)


def lif(
    x_seq: Tensor,
    v: Tensor,
    threshold,
    *,
    tau: float,
    decay_input: bool,
    v_reset: float | None,
    surrogate: Callable,
    detach_reset: bool,
) -> tuple[Tensor, Tensor]:
    """Plain LIF over T steps (see :func:`snnorm.backends.torch_backend.lif`), one fused kernel."""
    spec = _surrogate_spec(surrogate, "lif")
    if spec is None:
        return torch_backend.lif(
            x_seq, v, threshold, tau=tau, decay_input=decay_input, v_reset=v_reset, surrogate=surrogate, detach_reset=detach_reset
        )
    if x_seq.dim() == 2:  # [T, N]: no channel dim (a neuron after Flatten-free Linear, or single-step [N])
        s, v_out = lif(
            x_seq.unsqueeze(-1), v.unsqueeze(-1) if isinstance(v, Tensor) and v.dim() > 0 else v, threshold, tau=tau,
            decay_input=decay_input, v_reset=v_reset, surrogate=surrogate, detach_reset=detach_reset,
        )
        return s.squeeze(-1), v_out.squeeze(-1)
    v = _prepare(x_seq, v, "lif")
    th = _threshold_tensor(threshold, x_seq)
    vr, soft = _reset_args(v_reset)
    s, v_out, _ = _lif_elementwise_op(
        x_seq, v, th, None, None, None, None, None,
        float(tau), bool(decay_input), vr, soft, bool(detach_reset), spec[0], spec[1], 0, False,
        _wants_grad(x_seq, v, th), _out_dtype(x_seq, v, threshold),
    )
    return s, v_out


def _check_batch_size(x_seq: Tensor) -> None:
    # the same rule (and message) as torch.nn.functional.batch_norm in training
    if x_seq.shape[1] * (x_seq[0, 0, 0].numel()) == 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {tuple(x_seq.shape[1:])}")


def mpbn_lif(
    x_seq: Tensor,
    v: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    threshold,
    *,
    training: bool,
    momentum: float | None,
    batches_tracked: int,
    eps: float,
    tau: float,
    decay_input: bool,
    v_reset: float | None,
    surrogate: Callable,
    detach_reset: bool,
    carry: str,
) -> tuple[Tensor, Tensor]:
    """MPBN-LIF (see :func:`snnorm.backends.torch_backend.mpbn_lif`), fused.

    Batch statistics (training, or no running statistics): the resident kernel (or the
    split path for M > RESIDENT_MAX_M) with the running statistics updated in place.
    Running statistics (eval): the elementwise kernel with ĥ = (h − μ)·γ/√(σ² + ε) + β.
    """
    spec = _surrogate_spec(surrogate, "mpbn_lif")
    if spec is None:
        return torch_backend.mpbn_lif(
            x_seq, v, weight, bias, running_mean, running_var, threshold, training=training, momentum=momentum,
            batches_tracked=batches_tracked, eps=eps, tau=tau, decay_input=decay_input, v_reset=v_reset,
            surrogate=surrogate, detach_reset=detach_reset, carry=carry,
        )
    v = _prepare(x_seq, v, "mpbn_lif")
    th = _threshold_tensor(threshold, x_seq)
    vr, soft = _reset_args(v_reset)
    carry_norm = carry == "normalized"
    if training or running_mean is None:
        _check_batch_size(x_seq)
        if weight is None and bias is not None:
            weight = torch.ones_like(bias)
        if bias is None and weight is not None:
            bias = torch.zeros_like(weight)
        track = training and running_mean is not None
        s, v_out, _, _, _, rm_new, rv_new = _mpbn_lif_train_op(
            x_seq, v, weight, bias, running_mean if track else None, running_var if track else None, th,
            None if momentum is None else float(momentum), int(batches_tracked), float(eps),
            float(tau), bool(decay_input), vr, soft, bool(detach_reset), spec[0], spec[1], carry_norm,
            _wants_grad(x_seq, v, weight, bias, th), _out_dtype(x_seq, v, threshold),
        )
        if track:
            with torch.no_grad():
                running_mean.copy_(rm_new)
                running_var.copy_(rv_new)
        return s, v_out
    # eval with running statistics: per-channel constants (differentiable in γ, β, θ)
    r = 1.0 / torch.sqrt(running_var + eps)
    if weight is not None:
        r = weight * r
    beta = bias if bias is not None else torch.zeros_like(r)
    s, v_out, _ = _lif_elementwise_op(
        x_seq, v, th, running_mean, r, beta, None, None,
        float(tau), bool(decay_input), vr, soft, bool(detach_reset), spec[0], spec[1], 1, carry_norm,
        _wants_grad(x_seq, v, th, r, beta), _out_dtype(x_seq, v, threshold),
    )
    return s, v_out


def mpbn_lif_folded(
    x_seq: Tensor,
    v: Tensor,
    mu: Tensor,
    sigma2: Tensor,
    gamma: Tensor,
    beta: Tensor,
    threshold,
    *,
    eps: float,
    tau: float,
    decay_input: bool,
    v_reset: float | None,
    surrogate: Callable,
    detach_reset: bool,
    carry: str,
    adapt: str,
    adapt_momentum: float,
    adapt_decay: float,
    adapt_min_momentum: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor, float]:
    """Folded MPBN-LIF (see :func:`snnorm.backends.torch_backend.mpbn_lif_folded`), fused.

    adapt == "none": the elementwise kernel, differentiable. adapt == "batch"/"running":
    per-step statistics in the resident/split kernels, forward only (backward raises
    NotImplementedError).
    """
    spec = _surrogate_spec(surrogate, "mpbn_lif_folded")
    if spec is None:
        return torch_backend.mpbn_lif_folded(
            x_seq, v, mu, sigma2, gamma, beta, threshold, eps=eps, tau=tau, decay_input=decay_input, v_reset=v_reset,
            surrogate=surrogate, detach_reset=detach_reset, carry=carry, adapt=adapt, adapt_momentum=adapt_momentum,
            adapt_decay=adapt_decay, adapt_min_momentum=adapt_min_momentum,
        )
    v = _prepare(x_seq, v, "mpbn_lif_folded")
    th = _threshold_tensor(threshold, x_seq)
    vr, soft = _reset_args(v_reset)
    carry_norm = carry == "normalized"
    T = x_seq.shape[0]
    if adapt != "none" and x_seq[0, :, 0].numel() > 1:
        running = adapt == "running"
        moms = []
        m = adapt_momentum
        for _ in range(T):
            moms.append(m)
            m = max(m * adapt_decay, adapt_min_momentum)
        mom = torch.tensor(moms, dtype=torch.float64, device=x_seq.device)
        s, v_out, mu_t, s2_t = _mpbn_lif_adapt_op(
            x_seq, v, mu, sigma2, gamma, beta, th, mom, running, float(eps),
            float(tau), bool(decay_input), vr, soft, carry_norm, _out_dtype(x_seq, v, threshold, mu, sigma2, gamma, beta),
        )
        stat_dtype = torch.promote_types(mu.dtype, x_seq.dtype) if running else x_seq.dtype
        return s, v_out, mu_t.to(stat_dtype), s2_t.to(stat_dtype), (m if running else adapt_momentum)
    std = torch.sqrt(sigma2 + eps)
    thf = torch_backend.folded_threshold(threshold, mu, std, gamma, beta)
    sgn = torch.sign(gamma)
    r = gamma / std if carry_norm else None
    s, v_out, _ = _lif_elementwise_op(
        x_seq, v, th, mu if carry_norm else None, r, beta if carry_norm else None, thf, sgn,
        float(tau), bool(decay_input), vr, soft, bool(detach_reset), spec[0], spec[1], 2, carry_norm,
        _wants_grad(x_seq, v, th, thf, r, beta, mu), _out_dtype(x_seq, v, threshold, thf),
    )
    return s, v_out, mu, sigma2, adapt_momentum
