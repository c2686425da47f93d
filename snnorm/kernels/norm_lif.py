"""Fused norm → LIF: the statistics pipeline's apply stage charges, fires and resets.

A batch-statistics norm (a :class:`snnorm.kernels.bn_pipeline.NormRule`: multi-step BN /
tdBN, BNTT, TEBN, TAB) followed by an IF/LIF neuron, per element (n, c, spatial), step t::

    y_t = a_tc·(x_t − μ_row) + b_tc                    (the pipeline's coefficients, bn_pipeline)
    h_t = charge(v_{t−1}, y_t);   s_t = Θ(h_t − θ);   v_t = reset(h_t, s_t)

**Forward** (training): the pipeline's partials and reduce (``snnorm::bn_stats``) give μ, σ²
and update the running statistics once; then :func:`_norm_lif_fwd_kernel` reads x and
writes only the spikes, the final membrane and, when T > SEG, the membrane after every
SEG-th step (a checkpoint). Eval takes μ, σ² from the running statistics and runs the
kernel alone. Nothing per element
is saved for backward but x (and the checkpoints: 4/SEG B per element-step each).

**Backward** recomputes the neuron from x instead of saving h.
:func:`_norm_lif_bwd_kernel` takes the segments of SEG steps last to first; for each it
reruns the charge recurrence from the segment's first membrane (v0 or a checkpoint),
keeping h_t and x̂_t in ``[SEG, BLOCK_M]`` register tiles, then runs BPTT back through it::

    gz_t = (∂s_t + ∂reset/∂s)·Θ'(h_t − θ);   ∂h_t = gz_t + ∂reset/∂h
    ∂y_t = ∂h_t·∂h/∂y;                       ∂v_{t−1} = ∂h_t·∂h/∂v

writing ∂y_t and the per-(t, c) partial sums Σ∂y and Σ∂y·x̂ of its block; the pipeline's
coefficient and ∂x kernels finish (∂γ, ∂β, ∂p, and the path through the statistics). Both
kernels run with ``enable_fp_fusion=False`` and one device function computes h, so the
recomputed h (and spike) is bit-identical to the forward's.

fp32 bytes per element-step: forward 4 (partials read x) + 8 (x, s) + 4/T (v_T);
backward 12 (x, ∂s, ∂y) + 12 (∂y, x, ∂x) + 8/T (∂v_T, ∂v0); launches 3 and 3.

Layout: x ``[T, N, C, *spatial]`` viewed ``[T, N, C, S]`` in place (``_common.as_tncs``): every
tensor through its own strides, so channels-last convnet activations and transposed
token-major views (``[T, B, L, D]`` seen as ``[T, B, D, L]``) move the bytes contiguous ones
do, with outputs and membranes in x's memory format; ``SAME_LAYOUT`` computes one set of
offsets when the per-step tensors share x's strides; offsets are int32, int64 where one
passes 2³¹ (``INDEX_64``). A program takes one channel c and a block of BLOCK_M of its
M = N·S elements (grid (C, B1, B2): c on axis 0, the block split over axes 1 and 2, each
within CUDA's limits at any N·S), so its partial sums are row ``t·PPS + block`` of
``[T·PPS, C]``, the order the
pipeline's coefficient kernel reads. Membranes are fp32 (fp64) in the kernels.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl

from . import _device as dev
from ._common import (
    NORM_LIF_WARPS, acc_dtype, acc_torch_dtype, as_ncs, as_tncs, check_channel_args, contiguous_or_none, block_grid,
    empty_tncs_like, launch_options, launcher, ncs_strides, needs_int64, next_pow2, same_strides, tncs_strides,
)
from .bn_pipeline import NormRule, check_params, launch_backward_from_sums, out_dtype, output_like

__all__ = ["segment_length", "membrane_like", "checkpoint_buffer", "launch_norm_lif_forward",
           "launch_norm_lif_backward"]

#: the longest segment the backward keeps in registers ([SEG, BLOCK_M] tiles of h and x̂)
MAX_SEGMENT = 16
#: elements of a channel per program on a GPU, on NORM_LIF_WARPS (2) warps: 2 a thread, so with
#: SEG = 16 the two register tiles hold 32 values a thread each. ptxas spilled 8–24 B at
#: 1 a thread (4 and 8 warps) and at 4 a thread (8 warps) for SEG = 16 on sm_80/sm_90, and
#: at 2 a thread with 128 registers it spills nothing (perf/compile_check.py, triton 3.9)
GPU_BLOCK_M = 128
#: under the interpreter, which pays per program: large blocks
INTERPRETER_BLOCK_M = 1 << 14


def segment_length(T: int) -> int:
    """SEG: T's power of two up to :data:`MAX_SEGMENT` (one segment for T ≤ 16)."""
    return min(next_pow2(T), MAX_SEGMENT)


@triton.jit
def _initial_membrane(v0_ptr, offs, mask, v_init, HAS_V0: tl.constexpr, BLOCK_M: tl.constexpr,
                      ACC_DTYPE: tl.constexpr):
    if HAS_V0:
        v = tl.load(v0_ptr + offs, mask=mask, other=0.0).to(ACC_DTYPE)
    else:
        v = tl.full([BLOCK_M], v_init, ACC_DTYPE)
    return v


@triton.jit
def _norm_charge(x, v, mean, a, b, tau, v_r, DECAY_INPUT: tl.constexpr):
    """(h, x − μ): the norm's y = a·(x − μ) + b charged into the membrane (forward and recompute alike)."""
    xc = x - mean
    h = dev.charge(v, xc * a + b, tau, v_r, DECAY_INPUT)
    return h, xc


@triton.jit
def _norm_lif_fwd_kernel(
    x_ptr,  # [T, N, C, S], element strides (sx_t, sx_n, sx_c, sx_s)
    s_ptr,  # [T, N, C, S] out: spikes, strides (so_t, so_n, so_c, so_s) (x's with SAME_LAYOUT)
    v0_ptr,  # [N, C, S] initial membrane (HAS_V0), strides (sv_n, sv_c, sv_s), else v_init everywhere
    v_out_ptr,  # [N, C, S] out: final membrane, strides (sm_n, sm_c, sm_s)
    ckpt_ptr,  # [T // SEG (- 1), N, C, S] out (CHECKPOINT), strides (sk_t, ...): membrane after steps SEG, 2·SEG, ...
    mean_ptr, var_ptr,  # statistics rows: [C] or [T, C] (PER_STEP)
    w_ptr, b_ptr,  # γ, β in the statistics' layout, or None
    p_ptr,  # [T] per-step scale, or None (SCALE == 0)
    T, N, C, S, eps, threshold, v_init, tau, v_reset,
    sx_t, sx_n, sx_c, sx_s, so_t, so_n, so_c, so_s, sk_t, sk_n, sk_c, sk_s, sv_n, sv_c, sv_s, sm_n, sm_c, sm_s,
    PER_STEP: tl.constexpr, SCALE: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_V0: tl.constexpr, CHECKPOINT: tl.constexpr, SEG: tl.constexpr, SAME_LAYOUT: tl.constexpr,
    DECAY_INPUT: tl.constexpr, SOFT_RESET: tl.constexpr, BLOCK_M: tl.constexpr, INDEX_64: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
):
    eps, threshold = dev.scalar_arg(eps, ACC_DTYPE), dev.scalar_arg(threshold, ACC_DTYPE)
    v_init = dev.scalar_arg(v_init, ACC_DTYPE)
    tau, v_reset = dev.scalar_arg(tau, ACC_DTYPE), dev.scalar_arg(v_reset, ACC_DTYPE)
    cc, n, s, mask = dev.element_block(N, S, BLOCK_M, INDEX_64)
    c_mask = cc < C
    # x's offsets; with SAME_LAYOUT the spikes and the checkpoints share them (the contiguous case)
    offs = dev.element_offsets(n, cc, s, sx_n, sx_c, sx_s)
    if SAME_LAYOUT:
        o_offs = offs
        k_offs = offs
    else:
        o_offs = dev.element_offsets(n, cc, s, so_n, so_c, so_s)
        k_offs = dev.element_offsets(n, cc, s, sk_n, sk_c, sk_s)
    v = _initial_membrane(v0_ptr, dev.element_offsets(n, cc, s, sv_n, sv_c, sv_s), mask, v_init, HAS_V0, BLOCK_M,
                          ACC_DTYPE)
    for t in range(0, T):
        mean, rstd, a, b = dev.step_coefficients(
            t, cc, c_mask, C, mean_ptr, var_ptr, w_ptr, b_ptr, p_ptr, eps, PER_STEP, SCALE, HAS_WEIGHT, HAS_BIAS, ACC_DTYPE,
        )
        x = tl.load(x_ptr + dev.step_offset(t, sx_t, INDEX_64) + offs, mask=mask, other=0.0).to(ACC_DTYPE)
        h, xc = _norm_charge(x, v, mean, a, b, tau, v_reset, DECAY_INPUT)
        spike = h - threshold >= 0
        v = dev.reset(h, spike, threshold, v_reset, SOFT_RESET)
        # via the compute dtype: the interpreter cannot cast a bool block to bf16 directly
        tl.store(s_ptr + dev.step_offset(t, so_t, INDEX_64) + o_offs,
                 tl.where(spike, 1.0, 0.0).to(ACC_DTYPE).to(s_ptr.dtype.element_ty), mask=mask)
        if CHECKPOINT:
            if (t + 1) % SEG == 0:
                if t + 1 < T:
                    tl.store(ckpt_ptr + dev.step_offset((t + 1) // SEG - 1, sk_t, INDEX_64) + k_offs, v, mask=mask)
    tl.store(v_out_ptr + dev.element_offsets(n, cc, s, sm_n, sm_c, sm_s), v.to(v_out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _norm_lif_bwd_kernel(
    gs_ptr,  # [T, N, C, S] ∂L/∂s (HAS_GS), element strides (sg_t, sg_n, sg_c, sg_s)
    gv_out_ptr,  # [N, C, S] ∂L/∂v_T (HAS_GV), strides (sgv_n, sgv_c, sgv_s)
    x_ptr,  # [T, N, C, S], strides (sx_t, sx_n, sx_c, sx_s)
    v0_ptr,  # [N, C, S] (HAS_V0), strides (sv_n, sv_c, sv_s)
    ckpt_ptr,  # checkpoints as written by the forward (HAS_CKPT; None when T ≤ SEG), strides (sk_t, ...)
    gy_ptr,  # [T, N, C, S] out: ∂L/∂y (fp32/fp64), strides (so_t, so_n, so_c, so_s)
    gv0_ptr,  # [N, C, S] out: ∂L/∂v0 (NEED_GV0), strides (sm_n, sm_c, sm_s)
    part_a_ptr,  # [T·PPS, C] out: Σ ∂y over this block at step t (row t·PPS + block)
    part_b_ptr,  # [T·PPS, C] out: Σ ∂y·x̂
    mean_ptr, var_ptr, w_ptr, b_ptr, p_ptr,  # as in the forward
    T, N, C, S, PPS, eps, threshold, v_init, tau, v_reset, alpha,
    sx_t, sx_n, sx_c, sx_s, sg_t, sg_n, sg_c, sg_s, so_t, so_n, so_c, so_s, sk_t, sk_n, sk_c, sk_s,
    sv_n, sv_c, sv_s, sgv_n, sgv_c, sgv_s, sm_n, sm_c, sm_s,
    PER_STEP: tl.constexpr, SCALE: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_V0: tl.constexpr, HAS_GS: tl.constexpr, HAS_GV: tl.constexpr, NEED_GV0: tl.constexpr,
    HAS_CKPT: tl.constexpr, SEG: tl.constexpr, SAME_LAYOUT: tl.constexpr, GS_SAME_LAYOUT: tl.constexpr,
    DECAY_INPUT: tl.constexpr,
    SOFT_RESET: tl.constexpr, DETACH_RESET: tl.constexpr,
    SURROGATE: tl.constexpr, BLOCK_M: tl.constexpr, INDEX_64: tl.constexpr, ACC_DTYPE: tl.constexpr,
):
    eps, threshold = dev.scalar_arg(eps, ACC_DTYPE), dev.scalar_arg(threshold, ACC_DTYPE)
    v_init = dev.scalar_arg(v_init, ACC_DTYPE)
    tau, v_reset = dev.scalar_arg(tau, ACC_DTYPE), dev.scalar_arg(v_reset, ACC_DTYPE)
    alpha = dev.scalar_arg(alpha, ACC_DTYPE)
    cc, n, s, mask = dev.element_block(N, S, BLOCK_M, INDEX_64)
    c_mask = cc < C
    # x's offsets; with SAME_LAYOUT ∂y and the checkpoints share them (the launcher makes both in
    # x's memory format), with GS_SAME_LAYOUT ∂s does: an incoming ∂s of another layout (a
    # stride-0 expanded gradient) then costs one offset set, not three (triton 3.6 spilled 8 B)
    offs = dev.element_offsets(n, cc, s, sx_n, sx_c, sx_s)
    if SAME_LAYOUT:
        o_offs = offs
        k_offs = offs
    else:
        o_offs = dev.element_offsets(n, cc, s, so_n, so_c, so_s)
        k_offs = dev.element_offsets(n, cc, s, sk_n, sk_c, sk_s)
    if GS_SAME_LAYOUT:
        g_offs = offs
    else:
        g_offs = dev.element_offsets(n, cc, s, sg_n, sg_c, sg_s)
    x_scale, v_scale = dev.charge_grads(tau, DECAY_INPUT)
    gv = tl.zeros([BLOCK_M], ACC_DTYPE)
    if HAS_GV:
        gv_offs = dev.element_offsets(n, cc, s, sgv_n, sgv_c, sgv_s)
        gv = tl.load(gv_out_ptr + gv_offs, mask=mask, other=0.0).to(ACC_DTYPE)
    row = tl.arange(0, SEG)[:, None]
    n_seg = tl.cdiv(T, SEG)
    for kk in range(0, n_seg):
        k = n_seg - 1 - kk
        t0 = k * SEG
        v = _initial_membrane(v0_ptr, dev.element_offsets(n, cc, s, sv_n, sv_c, sv_s), mask, v_init, HAS_V0, BLOCK_M,
                              ACC_DTYPE)
        if HAS_CKPT:  # segments after the first start from the forward's checkpoints
            if k > 0:
                v = tl.load(ckpt_ptr + dev.step_offset(k - 1, sk_t, INDEX_64) + k_offs, mask=mask,
                            other=0.0).to(ACC_DTYPE)
        # the segment forward, as the forward kernel ran it: h_t and x̂_t into row j of the tiles
        hs = tl.zeros([SEG, BLOCK_M], ACC_DTYPE)
        x_hats = tl.zeros([SEG, BLOCK_M], ACC_DTYPE)
        for j in range(0, SEG):
            t = t0 + j
            if t < T:
                mean, rstd, a, b = dev.step_coefficients(
                    t, cc, c_mask, C, mean_ptr, var_ptr, w_ptr, b_ptr, p_ptr, eps, PER_STEP, SCALE, HAS_WEIGHT,
                    HAS_BIAS, ACC_DTYPE,
                )
                x = tl.load(x_ptr + dev.step_offset(t, sx_t, INDEX_64) + offs, mask=mask, other=0.0).to(ACC_DTYPE)
                h, xc = _norm_charge(x, v, mean, a, b, tau, v_reset, DECAY_INPUT)
                v = dev.reset(h, h - threshold >= 0, threshold, v_reset, SOFT_RESET)
                hs = tl.where(row == j, h[None, :], hs)
                x_hats = tl.where(row == j, (xc * rstd)[None, :], x_hats)
        # BPTT back through the segment (a row is read back exactly: the other rows add 0)
        for jj in range(0, SEG):
            j = SEG - 1 - jj
            t = t0 + j
            if t < T:
                h = tl.sum(tl.where(row == j, hs, 0.0), axis=0)
                x_hat = tl.sum(tl.where(row == j, x_hats, 0.0), axis=0)
                gs = tl.zeros([BLOCK_M], ACC_DTYPE)
                if HAS_GS:
                    gs = tl.load(gs_ptr + dev.step_offset(t, sg_t, INDEX_64) + g_offs, mask=mask,
                                 other=0.0).to(ACC_DTYPE)
                z = h - threshold
                gu, gs_reset, gth = dev.reset_bwd(gv, z >= 0, h, threshold, v_reset, SOFT_RESET, DETACH_RESET)
                gh = (gs + gs_reset) * dev.surrogate_grad(z, alpha, SURROGATE) + gu
                gy = tl.where(mask, gh * x_scale, 0.0)
                tl.store(gy_ptr + dev.step_offset(t, so_t, INDEX_64) + o_offs, gy, mask=mask)
                block = dev.block_index()
                part = (t * PPS + block) * C + cc
                p_mask = block + cc * 0 < PPS  # the grid's overshoot past the last block writes nothing
                tl.store(part_a_ptr + part, tl.sum(gy, axis=0) + tl.zeros([1], ACC_DTYPE), mask=p_mask)
                tl.store(part_b_ptr + part, tl.sum(gy * x_hat, axis=0) + tl.zeros([1], ACC_DTYPE), mask=p_mask)
                gv = gh * v_scale
    if NEED_GV0:
        tl.store(gv0_ptr + dev.element_offsets(n, cc, s, sm_n, sm_c, sm_s), gv.to(gv0_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------


def _block_m(M: int, device: torch.device) -> int:
    return min(next_pow2(M), GPU_BLOCK_M if device.type == "cuda" else INTERPRETER_BLOCK_M)


def _norm_flags(r: NormRule, weight, bias, p, v0, acc) -> dict:
    """The constexprs both kernels take besides the neuron's (``dev.lif_kernel_args``)."""
    return dict(
        PER_STEP=r.per_step, SCALE=r.scale, HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
        HAS_V0=v0 is not None, ACC_DTYPE=acc_dtype(acc),
    )


def _check(op: str, r: NormRule, x, v0, weight, bias, p, mean, var) -> None:
    """The pipeline's per-channel arguments and the membrane ``v0`` ``[N, C, *spatial]`` (read in place)."""
    check_params(op, r, x, weight, bias, mean, var, p)
    check_channel_args(f"{op} ({r.name})", x.device, v0=(v0, tuple(x.shape[1:])))


def membrane_like(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A membrane ``[N, C, *spatial]`` (v_T, ∂v0) for the input ``x`` ``[T, N, C, *spatial]``, in
    the memory format of one step of x (``torch.empty_like(x[0])``: channels-last and
    transposed views stay so), contiguous where its spatial dims would not merge. A pure
    function of x's shape and strides: the op's fake kernel gives the same strides."""
    m = torch.empty_like(x[0], dtype=dtype)
    try:
        m.view(*m.shape[:2], math.prod(m.shape[2:]))
    except RuntimeError:
        m = torch.empty(x.shape[1:], dtype=dtype, device=x.device)
    return m


def checkpoint_buffer(x: torch.Tensor, n_ckpt: int, dtype: torch.dtype) -> torch.Tensor:
    """The forward's membrane checkpoints ``[n_ckpt, N, C, S]`` in the layout of ``x[:n_ckpt]``
    (so that with x's format they share x's offsets in the kernels)."""
    T, N, C = x.shape[:3]
    S = math.prod(x.shape[3:])
    if n_ckpt == 0:  # none (T ≤ SEG, or no backward): contiguous, as a fake kernel makes an empty tensor
        return x.new_empty((0, N, C, S), dtype=dtype)
    return empty_tncs_like(x[:n_ckpt], dtype).view(n_ckpt, N, C, S)


@launcher
def launch_norm_lif_forward(
    r: NormRule, x: torch.Tensor, v0: Optional[torch.Tensor], weight, bias, p, mean: torch.Tensor,
    var: torch.Tensor, eps: float, threshold: float, v_init: float, lif, checkpoint: bool,
):
    """(spikes, final membrane, checkpoints) of the fused block (module docstring), with the
    statistics ``mean``, ``var`` in the rule's layout (the batch's, from
    :func:`snnorm.kernels.bn_pipeline.launch_stats`, or the running ones).

    ``v0`` ``[N, C, *spatial]`` or None for a membrane that starts at ``v_init``. ``lif`` is
    a :class:`snnorm.params.LIFKernelParameters`. ``checkpoint`` keeps the membrane after
    every SEG-th step for a backward (an empty tensor otherwise, or when T ≤ SEG).

    Every tensor is read in place through its strides and the spikes and the final membrane
    come back in x's memory format (:func:`output_like`, :func:`membrane_like`).
    """
    _check("norm_lif", r, x, v0, weight, bias, p, mean, var)
    x4, T, N, C, S = as_tncs(x)
    acc = acc_torch_dtype(x.dtype)
    mean, var = mean.to(acc).contiguous(), var.to(acc).contiguous()
    dtype = out_dtype(x, p)
    spikes = output_like(x, dtype)
    v_out = membrane_like(x, dtype)
    seg = segment_length(T)
    n_ckpt = (triton.cdiv(T, seg) - 1) if checkpoint else 0
    ckpt = checkpoint_buffer(x, n_ckpt, acc)
    if x.numel() == 0:
        return spikes, v_out, ckpt
    s4 = spikes.view(x4.shape)
    v03 = as_ncs(v0, 0) if v0 is not None else None
    k4 = ckpt if n_ckpt else None
    block_m = _block_m(N * S, x.device)
    scalars, lif_flags = dev.lif_kernel_args(lif)
    scalars = dev.kernel_scalars((eps, threshold, v_init, *scalars), acc, x.device)  # fp64: at full precision
    _norm_lif_fwd_kernel[block_grid(C, triton.cdiv(N * S, block_m))](
        x4, s4, v03, v_out, k4, mean, var,
        contiguous_or_none(weight), contiguous_or_none(bias), contiguous_or_none(p),
        T, N, C, S, *scalars,
        *tncs_strides(x4), *tncs_strides(s4), *tncs_strides(k4), *ncs_strides(v03), *ncs_strides(as_ncs(v_out, 0)),
        CHECKPOINT=n_ckpt > 0, SEG=seg, SAME_LAYOUT=same_strides(x4, s4, k4), BLOCK_M=block_m,
        INDEX_64=needs_int64(x4, s4, k4, v03, v_out),
        **_norm_flags(r, weight, bias, p, v0, acc), **lif_flags,
        **launch_options(NORM_LIF_WARPS(block_m), acc),
    )
    return spikes, v_out, ckpt


@launcher
def launch_norm_lif_backward(
    r: NormRule, grad_s: Optional[torch.Tensor], grad_v: Optional[torch.Tensor], x: torch.Tensor,
    v0: Optional[torch.Tensor], ckpt: torch.Tensor, weight, bias, p, mean: torch.Tensor, var: torch.Tensor,
    eps: float, batch_stats: bool, threshold: float, v_init: float, lif, need_dx: bool, need_dv0: bool,
    all_reduce=None,
):
    """(∂x, ∂v0, ∂γ, ∂β, ∂p) of the fused block; ∂γ, ∂β, ∂p in the accumulation dtype.

    ``grad_s``/``grad_v`` may be None (no gradient reached the spikes / the final
    membrane). Three launches: the recompute-and-BPTT kernel (∂y and its per-(t, c) sums),
    then the pipeline's coefficient and ∂x kernels. ``all_reduce``: synchronised batch
    statistics (:func:`snnorm.kernels.bn_pipeline.launch_backward_from_sums`). x, ∂s, ∂v_T,
    v0 are read in place; ∂y (internal), ∂x and ∂v0 are written in x's memory format.
    """
    _check("norm_lif backward", r, x, v0, weight, bias, p, mean, var)
    x4, T, N, C, S = as_tncs(x)  # a copy only where the spatial dims cannot merge, then shared below
    acc = acc_torch_dtype(x.dtype)
    dev_ = x.device
    gs4 = as_tncs(grad_s)[0] if grad_s is not None else None
    gs_same = same_strides(x4, gs4)
    block_m = _block_m(N * S, dev_)
    warps = NORM_LIF_WARPS(block_m)
    if not gs_same and acc != torch.float64:  # ∂s needs its own offsets: the block on 1 warp (2 warps
        warps = 1  # spilled 8 B with triton 3.6; half the block on 1 warp spilled with 3.9)
    pps = max(1, triton.cdiv(N * S, block_m))
    grad_y = output_like(x, acc)
    # every (step, block, channel) row is written by the kernel; no element: all sums are 0
    alloc = torch.empty if x.numel() > 0 else torch.zeros
    part_a = alloc(T * pps, C, dtype=acc, device=dev_)
    part_b = alloc(T * pps, C, dtype=acc, device=dev_)
    grad_v0 = membrane_like(x, v0.dtype if v0 is not None else x.dtype) if need_dv0 else None
    if x.numel() > 0:
        seg = segment_length(T)
        scalars, lif_flags = dev.lif_kernel_args(lif, backward=True)
        scalars = dev.kernel_scalars((eps, threshold, v_init, *scalars), acc, dev_)  # fp64: at full precision
        flags = {**_norm_flags(r, weight, bias, p, v0, acc), **lif_flags}
        gy4 = grad_y.view(x4.shape)
        gv3 = as_ncs(grad_v, 0) if grad_v is not None else None
        v03 = as_ncs(v0, 0) if v0 is not None else None
        k4 = ckpt if ckpt.numel() else None
        gv03 = as_ncs(grad_v0, 0) if grad_v0 is not None else None
        _norm_lif_bwd_kernel[block_grid(C, pps)](
            gs4, gv3, x4, v03, k4, gy4, grad_v0, part_a, part_b, mean, var,
            contiguous_or_none(weight), contiguous_or_none(bias), contiguous_or_none(p),
            T, N, C, S, pps, *scalars,
            *tncs_strides(x4), *tncs_strides(gs4), *tncs_strides(gy4), *tncs_strides(k4),
            *ncs_strides(v03), *ncs_strides(gv3), *ncs_strides(gv03),
            HAS_GS=grad_s is not None, HAS_GV=grad_v is not None, NEED_GV0=need_dv0, HAS_CKPT=ckpt.numel() > 0,
            SEG=seg, SAME_LAYOUT=same_strides(x4, gy4, k4), GS_SAME_LAYOUT=gs_same, BLOCK_M=block_m,
            INDEX_64=needs_int64(x4, gs4, gy4, k4, v03, gv3, grad_v0),
            **flags, **launch_options(warps, acc),
        )
    elif need_dv0:
        grad_v0.zero_() if grad_v is None else grad_v0.copy_(grad_v)
    dx, dw, db, dp, _, _ = launch_backward_from_sums(
        r, part_a, part_b, grad_y, x4.view(x.shape), weight, bias, mean, var, p, eps, batch_stats, need_dx,
        all_reduce,
    )
    return dx, grad_v0, dw, db, dp
