r"""LayerNorm / RMSNorm over the last dimension fused with an IF/LIF neuron, one kernel a direction.

Per row of D values (a token's features) and step t, with the row norm of
:mod:`snnorm.kernels.row_norm` (statistics per row and step: no coupling across rows,
batch or time)::

    y_t = γ·x̂_t + β,   x̂_t = (x_t − μ_t)·rstd_t       (RMSNorm: μ_t = 0, no β)
    h_t = charge(v_{t−1}, y_t);   s_t = Θ(h_t − θ);   v_t = reset(h_t, s_t)

as in SpikeGPT (Zhu et al., 2023: LayerNorm before spiking neurons) and spiking LLMs (RMSNorm).

**Forward** (:func:`_row_norm_lif_fwd_kernel`): a program owns ``[BLOCK_R, BLOCK_D]`` tiles
(whole rows, D ≤ :func:`snnorm.kernels.row_norm.one_pass_max_d`) and, for each of its row blocks
(a persistent grid, as the plain row norm), runs all T steps with the membrane in registers:
load x_t, the rows' μ_t and rstd_t in registers, normalise, charge, fire, reset, store the
spikes. It writes only the spikes, the final membrane, μ_t and rstd_t per (t, row) and, for a
backward with T > SEG, the membrane after every SEG-th step (a checkpoint).

**Backward** (:func:`_row_norm_lif_bwd_kernel`) recomputes the neuron instead of saving h: the
segments of SEG steps last to first; for each it reruns the charge recurrence from the
segment's first membrane (v0 or a checkpoint) with the saved μ_t, rstd_t (no reduction over
x again), keeping h_t and x̂_t in ``[SEG, BLOCK_R, BLOCK_D]`` register tiles, then BPTT::

    gz_t = (∂s_t + ∂reset/∂s)·Θ'(h_t − θ);   ∂h_t = gz_t + ∂reset/∂h
    ∂y_t = ∂h_t·∂h/∂y;   ∂v_{t−1} = ∂h_t·∂h/∂v;   g = γ·∂y_t
    ∂x_t = rstd_t·(g − mean_D(g) − x̂_t·mean_D(g·x̂_t))    (RMSNorm: no mean_D(g))

and the ∂γ = Σ ∂y·x̂, ∂β = Σ ∂y column partials of its program (``[P, D]``, summed after).
One device function (:func:`snnorm.kernels.row_norm.normalise`) computes y in the forward and
the recompute, every launch has ``enable_fp_fusion=False``: the recomputed h and spikes are
bit-identical to the forward's.

fp32 bytes per element-step: forward 8 (x, s) + 4/T (v_T; + 4/T reading a v0 tensor) +
8/D (μ, rstd) + 4/SEG·(1 − SEG/T) (checkpoints); backward 12 (x, ∂s, ∂x) + 8/T (∂v_T, ∂v0)
+ 8/D + 4/SEG·(1 − SEG/T) (+ 4/T re-reading a v0 tensor). One launch each way (+ a sum of
the ``[2, P, D]`` partials). Measured (interpreter meter, T = 4, D = 256, 16 rows, float
state): forward 9.16, backward 13.30, saved beyond the inputs 0.03 (μ, rstd).

GPU (sm_80/sm_90, triton 3.9 and 3.6, ptxas -v): one tile holds a row up to 2048 (1024 for fp64;
:func:`snnorm.kernels.row_norm.one_pass_max_d`), wider rows run the row norm then the LIF
kernel; no configuration of fp32/fp16/bf16/fp64 at D = 1–2048 spills on triton 3.9 (the
backward reaches 99–128 registers), one on 3.6: the backward at D = 2048 with a strided ∂s,
8 B on sm_80 (``perf/results/compile/``).

SEG: T's power of two up to :data:`MAX_SEGMENT`, and on a GPU at most 16 values a thread per
register tile (:func:`segment_length`). τ, v_reset, θ, the initial value and ε reach the
kernels as every LIF kernel takes them (:func:`snnorm.kernels._device.kernel_scalars`): fp64
keeps their digits.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from . import _device as dev
from . import row_norm as _rn
from ._common import acc_dtype, acc_torch_dtype, launch_options, launcher, next_pow2, store_dtype
from .row_norm import (
    GPU_DEFAULT_PER_THREAD, GPU_PER_THREAD, check_row_args, load_affine_row, normalise, row_block,
    row_config, row_grad_x, row_stats, rows_view,
)

__all__ = ["MAX_SEGMENT", "segment_length", "launch_row_norm_lif_forward", "launch_row_norm_lif_backward"]

#: the longest segment the backward keeps in registers (under the interpreter; a GPU also
#: caps it at 16 values a thread per tile, :func:`segment_length`)
MAX_SEGMENT = 16
#: the forward holds one row tile (no segment tiles): at most 8 warps. On 16 warps (D = 2048,
#: fp32, RMSNorm, soft reset) ptxas spilled 8 B on sm_80 at 40 registers; fp64 (two registers a
#: value, D = 1024) spilled 4 B at 8 warps and at 16 (64 registers), and takes 4 (up to 255)
FWD_MAX_WARPS = {torch.float64: 4}
FWD_DEFAULT_MAX_WARPS = 8
#: register values a thread gives each of the backward's two [SEG, BLOCK_R, BLOCK_D] tiles on a GPU
GPU_SEGMENT_VALUES = 16


def segment_length(T: int, D: int, device_type: str, dtype: Optional[torch.dtype] = None) -> int:
    """SEG, the steps between membrane checkpoints: T's power of two up to :data:`MAX_SEGMENT`;
    on a GPU also ≤ 16 / (elements a thread holds of a row tile), so the backward's h and x̂
    tiles stay at 16 registers a thread (D ≤ 1024: SEG ≤ 8; D = 8192: SEG = 1, a checkpoint
    every step)."""
    seg = min(next_pow2(T), MAX_SEGMENT)
    if device_type == "cuda":
        per_thread = GPU_PER_THREAD.get(next_pow2(D), GPU_DEFAULT_PER_THREAD)
        values = per_thread * (2 if dtype == torch.float64 else 1)  # fp64: two registers a value
        seg = min(seg, max(1, GPU_SEGMENT_VALUES // values))
    return seg


def checkpoint_count(T: int, D: int, device_type: str, save: bool, dtype: Optional[torch.dtype] = None) -> int:
    """Membrane checkpoints a forward keeps for its backward (after steps SEG, 2·SEG, … < T)."""
    return triton.cdiv(T, segment_length(T, D, device_type, dtype)) - 1 if save and T > 0 else 0


@triton.jit
def _initial_membrane(v0_ptr, r, d, mask, sv_r, sv_d, v_init, HAS_V0: tl.constexpr,
                      BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, ACC_DTYPE: tl.constexpr):
    if HAS_V0:
        v = tl.load(v0_ptr + r * sv_r + d * sv_d, mask=mask, other=0.0).to(ACC_DTYPE)
    else:
        v = tl.zeros([BLOCK_R, BLOCK_D], ACC_DTYPE) + v_init
    return v


@triton.jit
def _row_scalar(ptr, r, row_mask):
    """``ptr[r]`` of a ``[BLOCK_R, 1]`` row index as a ``[BLOCK_R]`` vector (0 past R)."""
    return tl.sum(tl.load(ptr + r, mask=row_mask[:, None], other=0.0), axis=1)


@triton.jit
def _row_norm_lif_fwd_kernel(
    x_ptr,  # [T, R, D] strided
    v0_ptr,  # [R, D] strided (HAS_V0), else every membrane starts at v_init
    w_ptr, b_ptr,  # γ, β [D] or None
    s_ptr,  # [T, R, D] out: spikes
    v_out_ptr,  # [R, D] out: final membrane
    mean_ptr, rstd_ptr,  # [T, R] out: the rows' μ_t, rstd_t (accumulation dtype)
    ckpt_ptr,  # [T // SEG (− 1), R, D] out (CHECKPOINT): membrane after steps SEG, 2·SEG, …
    T, R, D, sx_t, sx_r, sx_d, sv_r, sv_d,
    eps, threshold, v_init, tau, v_reset,
    RMS: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_V0: tl.constexpr,
    CHECKPOINT: tl.constexpr, SEG: tl.constexpr, DECAY_INPUT: tl.constexpr, SOFT_RESET: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, ACC_DTYPE: tl.constexpr,
):
    pid = tl.program_id(0)
    eps = dev.scalar_arg(eps, ACC_DTYPE)
    threshold = dev.scalar_arg(threshold, ACC_DTYPE)
    v_init = dev.scalar_arg(v_init, ACC_DTYPE)
    tau = dev.scalar_arg(tau, ACC_DTYPE)
    v_reset = dev.scalar_arg(v_reset, ACC_DTYPE)
    gamma, beta = load_affine_row(w_ptr, b_ptr, tl.arange(0, BLOCK_D)[None, :], D, HAS_WEIGHT, HAS_BIAS, ACC_DTYPE)
    step_x = tl.zeros((), tl.int64) + sx_t
    step = (tl.zeros((), tl.int64) + R) * D  # one step of the contiguous outputs
    for blk in range(pid, tl.cdiv(R, BLOCK_R), tl.num_programs(0)):
        r, d, mask, row_mask = row_block(blk, R, D, BLOCK_R, BLOCK_D)
        offs = r * D + d
        v = _initial_membrane(v0_ptr, r, d, mask, sv_r, sv_d, v_init, HAS_V0, BLOCK_R, BLOCK_D, ACC_DTYPE)
        for t in range(0, T):
            x = tl.load(x_ptr + t * step_x + r * sx_r + d * sx_d, mask=mask, other=0.0).to(ACC_DTYPE)
            mean, rstd = row_stats(x, mask, D, eps, RMS, ACC_DTYPE)
            _, y = normalise(x, mean, rstd, gamma, beta, mask)
            h = dev.charge(v, y, tau, v_reset, DECAY_INPUT)
            spike = h - threshold >= 0
            v = dev.reset(h, spike, threshold, v_reset, SOFT_RESET)
            # via the compute dtype: the interpreter cannot cast a bool block to bf16 directly
            tl.store(s_ptr + t * step + offs, tl.where(spike, 1.0, 0.0).to(ACC_DTYPE).to(s_ptr.dtype.element_ty),
                     mask=mask)
            tl.store(mean_ptr + t * R + r, mean[:, None], mask=row_mask[:, None])
            tl.store(rstd_ptr + t * R + r, rstd[:, None], mask=row_mask[:, None])
            if CHECKPOINT:
                if (t + 1) % SEG == 0:
                    if t + 1 < T:
                        tl.store(ckpt_ptr + ((t + 1) // SEG - 1) * step + offs, v, mask=mask)
        tl.store(v_out_ptr + offs, v.to(v_out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _row_norm_lif_bwd_kernel(
    gs_ptr,  # [T, R, D] strided ∂L/∂s (HAS_GS)
    gv_ptr,  # [R, D] strided ∂L/∂v_T (HAS_GV)
    x_ptr, v0_ptr, w_ptr, b_ptr, mean_ptr, rstd_ptr,  # as in the forward (μ, rstd as it wrote them)
    ckpt_ptr,  # the forward's checkpoints (HAS_CKPT)
    dx_ptr,  # [T, R, D] out: ∂L/∂x (NEED_DX)
    gv0_ptr,  # [R, D] out: ∂L/∂v0 (NEED_GV0, accumulation dtype)
    part_ptr,  # [2, P, D] out: this program's Σ ∂y·x̂ (row pid) and Σ ∂y (row P + pid)
    T, R, D, sx_t, sx_r, sx_d, sv_r, sv_d, sg_t, sg_r, sg_d, sgv_r, sgv_d,
    threshold, v_init, tau, v_reset, alpha,
    RMS: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_V0: tl.constexpr,
    HAS_GS: tl.constexpr, HAS_GV: tl.constexpr, NEED_DX: tl.constexpr, NEED_GV0: tl.constexpr,
    HAS_CKPT: tl.constexpr, SEG: tl.constexpr, DECAY_INPUT: tl.constexpr, SOFT_RESET: tl.constexpr,
    DETACH_RESET: tl.constexpr, SURROGATE: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, ACC_DTYPE: tl.constexpr,
):
    pid = tl.program_id(0)
    P = tl.num_programs(0)
    threshold = dev.scalar_arg(threshold, ACC_DTYPE)
    v_init = dev.scalar_arg(v_init, ACC_DTYPE)
    tau = dev.scalar_arg(tau, ACC_DTYPE)
    v_reset = dev.scalar_arg(v_reset, ACC_DTYPE)
    alpha = dev.scalar_arg(alpha, ACC_DTYPE)
    x_scale, v_scale = dev.charge_grads(tau, DECAY_INPUT)
    gamma, beta = load_affine_row(w_ptr, b_ptr, tl.arange(0, BLOCK_D)[None, :], D, HAS_WEIGHT, HAS_BIAS, ACC_DTYPE)
    part_w = tl.zeros([BLOCK_D], ACC_DTYPE)
    part_b = tl.zeros([BLOCK_D], ACC_DTYPE)
    step_x = tl.zeros((), tl.int64) + sx_t
    step_g = tl.zeros((), tl.int64) + sg_t
    step = (tl.zeros((), tl.int64) + R) * D
    seg_row = tl.arange(0, SEG)[:, None, None]
    n_seg = tl.cdiv(T, SEG)
    # ∂s's column offsets in int32 (the launcher keeps (D − 1)·|stride| < 2³¹): as an int64 tile
    # held across the loops they spilled 8–32 B at D = 2048 with a strided ∂s (sm_80, triton 3.6)
    cols = tl.arange(0, BLOCK_D)[None, :]
    for blk in range(pid, tl.cdiv(R, BLOCK_R), P):
        r, d, mask, row_mask = row_block(blk, R, D, BLOCK_R, BLOCK_D)
        offs = r * D + d
        gv = tl.zeros([BLOCK_R, BLOCK_D], ACC_DTYPE)
        if HAS_GV:
            gv = tl.load(gv_ptr + r * sgv_r + d * sgv_d, mask=mask, other=0.0).to(ACC_DTYPE)
        for kk in range(0, n_seg):
            k = n_seg - 1 - kk
            t0 = k * SEG
            v = _initial_membrane(v0_ptr, r, d, mask, sv_r, sv_d, v_init, HAS_V0, BLOCK_R, BLOCK_D, ACC_DTYPE)
            if HAS_CKPT:  # segments after the first start from the forward's checkpoints
                if k > 0:
                    v = tl.load(ckpt_ptr + (k - 1) * step + offs, mask=mask, other=0.0).to(ACC_DTYPE)
            # the segment's forward as the forward kernel ran it: h_t and x̂_t into row j of the tiles
            hs = tl.zeros([SEG, BLOCK_R, BLOCK_D], ACC_DTYPE)
            x_hats = tl.zeros([SEG, BLOCK_R, BLOCK_D], ACC_DTYPE)
            for j in range(0, SEG):
                t = t0 + j
                if t < T:
                    x = tl.load(x_ptr + t * step_x + r * sx_r + d * sx_d, mask=mask, other=0.0).to(ACC_DTYPE)
                    mean = _row_scalar(mean_ptr + t * R, r, row_mask)
                    rstd = _row_scalar(rstd_ptr + t * R, r, row_mask)
                    x_hat, y = normalise(x, mean, rstd, gamma, beta, mask)
                    h = dev.charge(v, y, tau, v_reset, DECAY_INPUT)
                    v = dev.reset(h, h - threshold >= 0, threshold, v_reset, SOFT_RESET)
                    hs = tl.where(seg_row == j, h[None, :, :], hs)
                    x_hats = tl.where(seg_row == j, x_hat[None, :, :], x_hats)
            # BPTT back through the segment (a row of the tiles is read back exactly: the others add 0)
            for jj in range(0, SEG):
                j = SEG - 1 - jj
                t = t0 + j
                if t < T:
                    h = tl.sum(tl.where(seg_row == j, hs, 0.0), axis=0)
                    x_hat = tl.sum(tl.where(seg_row == j, x_hats, 0.0), axis=0)
                    gs = tl.zeros([BLOCK_R, BLOCK_D], ACC_DTYPE)
                    if HAS_GS:
                        gs_cols = (cols * sg_d).to(tl.int64)
                        gs = tl.load(gs_ptr + t * step_g + r * sg_r + gs_cols, mask=mask, other=0.0).to(ACC_DTYPE)
                    z = h - threshold
                    gu, gs_reset, _ = dev.reset_bwd(gv, z >= 0, h, threshold, v_reset, SOFT_RESET, DETACH_RESET)
                    gh = (gs + gs_reset) * dev.surrogate_grad(z, alpha, SURROGATE) + gu
                    gy = tl.where(mask, gh * x_scale, 0.0)
                    part_w += tl.sum(gy * x_hat, axis=0)
                    part_b += tl.sum(gy, axis=0)
                    if NEED_DX:
                        rstd = _row_scalar(rstd_ptr + t * R, r, row_mask)
                        dx = row_grad_x(gy * gamma, x_hat, rstd, D, RMS, ACC_DTYPE)
                        tl.store(dx_ptr + t * step + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)
                    gv = gh * v_scale
        if NEED_GV0:
            tl.store(gv0_ptr + offs, gv, mask=mask)
    cols = tl.arange(0, BLOCK_D)
    tl.store(part_ptr + pid * D + cols, part_w, mask=cols < D)
    tl.store(part_ptr + (P + pid) * D + cols, part_b, mask=cols < D)


# ----------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------


def _check(op: str, x: torch.Tensor, v0, weight, bias, rms: bool) -> None:
    check_row_args(op, x, weight, bias, rms, min_dim=2)
    limit = _rn.one_pass_max_d(x.device.type, fused=True, dtype=x.dtype)
    if x.shape[-1] > limit:
        raise ValueError(f"{op}: rows of D = {x.shape[-1]} > {limit} do not fit one tile; "
                         "normalise with the row norm op and run the neuron after it")
    if v0 is not None and tuple(v0.shape) != tuple(x.shape[1:]):
        raise ValueError(f"{op}: v0 must have shape {list(x.shape[1:])} (x_seq's without T), got {list(v0.shape)}")


def out_dtype(x: torch.Tensor, v0: Optional[torch.Tensor]) -> torch.dtype:
    """The spikes' and the membrane's dtype: the torch reference's y (x's dtype) charged into v."""
    return x.dtype if v0 is None else torch.promote_types(x.dtype, v0.dtype)


@launcher
def launch_row_norm_lif_forward(
    x: torch.Tensor, v0: Optional[torch.Tensor], weight, bias, eps: float, rms: bool, threshold: float,
    v_init: float, lif, save: bool,
):
    """(spikes, v_T, μ ``[T, R]``, rstd ``[T, R]``, checkpoints) of the fused block (module
    docstring) for x ``[T, *rows, D]``; ``v0`` ``x.shape[1:]`` or None (every membrane starts
    at ``v_init``). ``lif``: :class:`snnorm.params.LIFKernelParameters`. ``save``: keep the
    checkpoints a backward needs (an empty tensor otherwise, or when T ≤ SEG)."""
    _check("row_norm_lif", x, v0, weight, bias, rms)
    T, D = x.shape[0], x.shape[-1]
    x3 = rows_view(x, 1)
    R = x3.shape[1]
    acc = acc_torch_dtype(x.dtype)
    dtype = out_dtype(x, v0)
    spikes = torch.empty(x.shape, dtype=store_dtype(dtype), device=x.device)
    v_out = torch.empty(x.shape[1:], dtype=store_dtype(dtype), device=x.device)
    alloc = torch.empty if x.numel() else torch.zeros  # the kernel writes every (t, row)
    mean = alloc((T, R), dtype=acc, device=x.device)
    rstd = alloc((T, R), dtype=acc, device=x.device)
    n_ckpt = checkpoint_count(T, D, x.device.type, save, x.dtype)
    ckpt = torch.empty((n_ckpt, R, D), dtype=acc, device=x.device)
    if x.numel() == 0:
        if v_out.numel():
            v_out.copy_(v0 if v0 is not None else torch.full_like(v_out, float(v_init)))
        return spikes.to(dtype), v_out.to(dtype), mean, rstd, ckpt
    v2 = rows_view(v0, 0) if v0 is not None else None
    cfg = row_config(R, D, x.device, x.dtype)
    scalars, flags = dev.lif_kernel_args(lif)
    _row_norm_lif_fwd_kernel[(cfg.programs,)](
        x3, v2, weight, bias, spikes, v_out, mean, rstd, ckpt if n_ckpt else None,
        T, R, D, *x3.stride(), *(v2.stride() if v2 is not None else (0, 0)),
        *dev.kernel_scalars((eps, threshold, v_init, *scalars), acc, x.device),
        RMS=bool(rms), HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, HAS_V0=v0 is not None,
        CHECKPOINT=n_ckpt > 0, SEG=segment_length(T, D, x.device.type, x.dtype), **flags,
        BLOCK_R=cfg.BLOCK_R, BLOCK_D=cfg.BLOCK_D, ACC_DTYPE=acc_dtype(x.dtype),
        **launch_options(min(cfg.num_warps, FWD_MAX_WARPS.get(x.dtype, FWD_DEFAULT_MAX_WARPS)), acc),
    )
    return spikes.to(dtype), v_out.to(dtype), mean, rstd, ckpt


@launcher
def launch_row_norm_lif_backward(
    grad_s: Optional[torch.Tensor], grad_v: Optional[torch.Tensor], x: torch.Tensor, v0: Optional[torch.Tensor],
    weight, bias, mean: torch.Tensor, rstd: torch.Tensor, ckpt: torch.Tensor, rms: bool, threshold: float,
    v_init: float, lif, need_dx: bool, need_dv0: bool,
):
    """(∂x in x's dtype, ∂v0 in the accumulation dtype, ∂γ, ∂β in the accumulation dtype) of
    :func:`launch_row_norm_lif_forward` from what it saved (μ, rstd, checkpoints); ∂x / ∂v0 are
    empty unless asked for. ``grad_s``/``grad_v`` may be None (no gradient reached the spikes /
    the final membrane). One launch, then the sum of the ``[2, P, D]`` column partials."""
    _check("row_norm_lif backward", x, v0, weight, bias, rms)
    T, D = x.shape[0], x.shape[-1]
    x3 = rows_view(x, 1)
    R = x3.shape[1]
    acc = acc_torch_dtype(x.dtype)
    dx = torch.empty(x.shape if need_dx else (0,), dtype=store_dtype(x.dtype), device=x.device)
    gv0 = torch.empty(x.shape[1:] if need_dv0 else (0,), dtype=acc, device=x.device)
    if x.numel() == 0:
        if need_dv0:
            gv0.zero_() if grad_v is None else gv0.copy_(grad_v)
        z = torch.zeros(D, dtype=acc, device=x.device)
        return dx.to(x.dtype), gv0, z, z.clone()
    seg = segment_length(T, D, x.device.type, x.dtype)
    if ckpt.shape[0] != checkpoint_count(T, D, x.device.type, True, x.dtype):
        raise ValueError(f"row_norm_lif backward: {ckpt.shape[0]} membrane checkpoints, expected "
                         f"{checkpoint_count(T, D, x.device.type, True, x.dtype)} (the forward ran without save=True?)")
    cfg = row_config(R, D, x.device, x.dtype)
    part = torch.empty((2, cfg.programs, D), dtype=acc, device=x.device)
    v2 = rows_view(v0, 0) if v0 is not None else None
    g3 = rows_view(grad_s, 1) if grad_s is not None else None
    if g3 is not None and (D - 1) * abs(g3.stride(-1)) >= 2**31:  # the kernel's int32 column offsets of ∂s
        g3 = g3.contiguous()
    gv2 = rows_view(grad_v, 0) if grad_v is not None else None
    scalars, flags = dev.lif_kernel_args(lif, backward=True)
    _row_norm_lif_bwd_kernel[(cfg.programs,)](
        g3, gv2, x3, v2, weight, bias, mean, rstd, ckpt if ckpt.numel() else None,
        dx if need_dx else None, gv0 if need_dv0 else None, part,
        T, R, D, *x3.stride(), *(v2.stride() if v2 is not None else (0, 0)),
        *(g3.stride() if g3 is not None else (0, 0, 0)), *(gv2.stride() if gv2 is not None else (0, 0)),
        *dev.kernel_scalars((threshold, v_init, *scalars), acc, x.device),
        RMS=bool(rms), HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, HAS_V0=v0 is not None,
        HAS_GS=grad_s is not None, HAS_GV=grad_v is not None, NEED_DX=bool(need_dx), NEED_GV0=bool(need_dv0),
        HAS_CKPT=ckpt.numel() > 0, SEG=seg, **flags,
        BLOCK_R=cfg.BLOCK_R, BLOCK_D=cfg.BLOCK_D, ACC_DTYPE=acc_dtype(x.dtype),
        **launch_options(cfg.num_warps, acc),
    )
    return dx.to(x.dtype), gv0, part[0].sum(dim=0), part[1].sum(dim=0)  # two tensors: an op's outputs may not alias
