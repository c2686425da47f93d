r"""LayerNorm and RMSNorm over the last dimension D of a tensor: per row, per call.

LayerNorm (Ba et al., 2016, "Layer Normalization") and RMSNorm (Zhang & Sennrich, 2019,
"Root Mean Square Layer Normalization"), per row x of D values::

    LayerNorm  μ = mean_D(x),  σ² = mean_D((x − μ)²),  x̂ = (x − μ)·rstd,  rstd = 1/√(σ² + ε)
    RMSNorm    μ = 0,          rstd = 1/√(mean_D(x²) + ε),                x̂ = x·rstd
    y = γ·x̂ + β   (γ = 1 without a weight, β = 0 without a bias; RMSNorm has no β)

Backward, with g = γ·∂y::

    ∂x = rstd·(g − mean_D(g) − x̂·mean_D(g·x̂))     (RMSNorm: without the mean_D(g) term)
    ∂γ = Σ_rows ∂y·x̂,   ∂β = Σ_rows ∂y

**Kernels.** A program owns ``[BLOCK_R, BLOCK_D]`` tiles, BLOCK_D = next_pow2(D) (a whole row
in registers), and loops over the row blocks ``pid, pid + P, …`` (a persistent grid of P
programs: grid axis 0 stays small at any number of rows R, and the backward's ∂γ/∂β column
partials are ``[P, D]``, summed after the kernel in a fixed order: deterministic, no atomics).
Statistics are two-pass in registers (exact), accumulated in fp32 (fp64 for fp64 tensors);
μ and rstd are written per row for the backward, which reads x and ∂y once and never
recomputes a reduction over x. fp32 bytes per element: forward 8 (x, y), backward 12
(x, ∂y, ∂x), plus 8/D for (μ, rstd).

**Wide rows** (D > :func:`one_pass_max_d`: :data:`MAX_D` = 8192 under the interpreter,
:data:`GPU_MAX_D` on a GPU, where a wider row does not fit the registers of one CTA without
spilling): the ``_wide`` kernels loop over the row in chunks of :data:`WIDE_CHUNK` (forward: a
pass for μ, one for σ², one to normalise; backward: one for the two row sums, one for ∂x),
rereading x from memory: correct at any D, slower.

x is read through its strides (any ``[R, D]`` view: sliced, transposed, expanded) when the
leading dimensions merge into rows, else from one copy (:func:`rows_view`); outputs are
contiguous. The ``@triton.jit`` functions here (:func:`row_stats`, :func:`normalise`) are
shared with the fused norm → IF/LIF kernels (:mod:`snnorm.kernels.row_norm_lif`), so the
forward and its recompute compute bit-identical x̂ and y.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from . import _device as dev
from ._common import (
    acc_dtype, acc_torch_dtype, check_channel_args, device_props, launch_options, launcher, next_pow2, store_dtype,
)

__all__ = [
    "MAX_D", "GPU_MAX_D", "GPU_FUSED_MAX_D", "WIDE_CHUNK", "one_pass_max_d", "RowConfig", "row_config", "rows_view", "check_row_args",
    "launch_row_norm_forward", "launch_row_norm_backward",
]

#: the widest row kept whole in registers (one pass); wider rows take the looped ``_wide`` path
MAX_D = 8192
#: ... on a GPU: the plain backward holds x, ∂y, x̂, γ·∂y, γ and two column-partial rows, 8 a
#: thread each at 4096 on 16 warps; at 8192 (16 a thread) ptxas spilled 16–68 B (sm_80/sm_90,
#: triton 3.9), so wider rows loop
GPU_MAX_D = 4096
#: ... for the fused norm → LIF kernels (row_norm_lif.py): their backward keeps the h and x̂
#: segment tiles besides; at 2048 (4 a thread, 16 warps) ≤ 128 registers without spills, at
#: 8192 (SEG = 1) it spilled 380–700 B. Wider rows run the row norm, then the LIF kernel
GPU_FUSED_MAX_D = 2048
#: the chunk of a wide row the ``_wide`` kernels hold at a time
WIDE_CHUNK = 4096
#: programs per SM of the persistent grid on a GPU
PROGRAMS_PER_SM = 4
#: under the interpreter (which pays per program and per operation, not per element): tiles
#: of up to this many elements, one program
INTERPRETER_TILE = 1 << 14
#: GPU tiles: BLOCK_D -> elements a thread holds of a [BLOCK_R, BLOCK_D] tile (rows ≤ 512 wide
#: are stacked into a 512-element tile). num_warps = tile / (32 · this), at most 16 (a CTA's
#: 512 threads: from D = 2048 a thread holds D / 512); the fused backward keeps two
#: [SEG, BLOCK_R, BLOCK_D] tiles of 16 // this values a thread each
#: (:func:`snnorm.kernels.row_norm_lif.segment_length`)
GPU_PER_THREAD = {2048: 4, 4096: 8, 8192: 16}
GPU_MIN_TILE = 512
GPU_DEFAULT_PER_THREAD = 2


class RowConfig(NamedTuple):
    BLOCK_R: int  # rows per tile
    BLOCK_D: int  # columns per tile (next_pow2(D), or WIDE_CHUNK on the wide path)
    num_warps: int
    per_thread: int  # elements of one tile a thread holds (GPU); 0 under the interpreter
    programs: int  # P, the persistent grid


def row_config(R: int, D: int, device: torch.device, dtype: Optional[torch.dtype] = None) -> RowConfig:
    """The tile, warps and grid for R rows of D (one tile per row block up to
    :func:`one_pass_max_d`; wider rows: chunks of WIDE_CHUNK)."""
    wide = D > one_pass_max_d(device.type, dtype=dtype)
    block_d = next_pow2(min(D, WIDE_CHUNK) if wide else D)
    n_rows = next_pow2(max(R, 1))
    if device.type != "cuda":
        block_r = min(n_rows, max(1, INTERPRETER_TILE // block_d)) if not wide else 1
        return RowConfig(block_r, block_d, 4, 0, 1)
    block_r = min(n_rows, max(1, GPU_MIN_TILE // block_d)) if not wide else 1
    per_thread = GPU_PER_THREAD.get(block_d, GPU_DEFAULT_PER_THREAD)
    if dtype == torch.float64:  # two registers a value: twice the threads (the fused backward spilled 8–32 B)
        per_thread = max(1, per_thread // 2)
    warps = max(1, min(16, block_r * block_d // (32 * per_thread)))
    per_thread = max(1, block_r * block_d // (32 * warps))
    blocks = triton.cdiv(max(R, 1), block_r)
    return RowConfig(block_r, block_d, warps, per_thread, min(blocks, PROGRAMS_PER_SM * device_props(device).multi_processor_count))


def one_pass_max_d(device_type: str, fused: bool = False, dtype: Optional[torch.dtype] = None) -> int:
    """The widest row one tile holds: :data:`MAX_D` under the interpreter; on a GPU
    :data:`GPU_MAX_D` (plain) or :data:`GPU_FUSED_MAX_D` (fused with a neuron), halved for
    fp64 (two registers a value: the fused backward spilled 44–330 B at 1024–2048), never above MAX_D."""
    if device_type != "cuda":
        return MAX_D
    limit = GPU_FUSED_MAX_D if fused else GPU_MAX_D
    return min(MAX_D, limit // 2 if dtype == torch.float64 else limit)


def rows_view(t: torch.Tensor, lead: int) -> torch.Tensor:
    """``[*lead dims, *rows, D]`` as ``[*lead dims, R, D]``: a view when the row dims merge (read
    in place through its strides), else one copy."""
    shape = (*t.shape[:lead], math.prod(t.shape[lead:-1]), t.shape[-1])
    try:
        return t.view(shape)
    except RuntimeError:
        return t.reshape(shape)


def check_row_args(op: str, x: torch.Tensor, weight, bias, rms: bool, min_dim: int = 1) -> None:
    """x floating point with ≥ ``min_dim`` dims; γ, β ``[D]`` (D = x's last dimension), no β for RMSNorm."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"{op}: expected a floating-point tensor x, got {getattr(x, 'dtype', type(x).__name__)}")
    if x.dim() < min_dim:
        raise ValueError(f"{op}: expected x with at least {min_dim} dimension(s) [..., D], got shape {list(x.shape)}")
    if rms and bias is not None:
        raise ValueError(f"{op}: RMSNorm has no bias; got a bias of shape {list(bias.shape)}")
    D = x.shape[-1]
    check_channel_args(f"{op} (x of shape {list(x.shape)}, normalised over its last dimension D = {D})", x.device,
                       weight=(weight, (D,)), bias=(bias, (D,)))


# ----------------------------------------------------------------------------------------
# Device functions (shared with row_norm_lif.py)
# ----------------------------------------------------------------------------------------


@triton.jit
def row_block(blk, R, D, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """Rows ``[BLOCK_R, 1]`` (int64), columns ``[1, BLOCK_D]`` (int64), the tile's mask and the rows' mask."""
    r = tl.cast(blk, tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    d = tl.arange(0, BLOCK_D).to(tl.int64)
    row_mask = r < R
    return r[:, None], d[None, :], row_mask[:, None] & (d < D)[None, :], row_mask


@triton.jit
def load_affine_row(w_ptr, b_ptr, d, D, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, ACC_DTYPE: tl.constexpr):
    """γ, β at columns ``d`` ``[1, BLOCK_D]`` (1 and 0 where absent or past D)."""
    if HAS_WEIGHT:
        gamma = tl.load(w_ptr + d, mask=d < D, other=1.0).to(ACC_DTYPE)
    else:
        gamma = tl.full(d.shape, 1.0, ACC_DTYPE)
    if HAS_BIAS:
        beta = tl.load(b_ptr + d, mask=d < D, other=0.0).to(ACC_DTYPE)
    else:
        beta = tl.zeros(d.shape, ACC_DTYPE)
    return gamma, beta


@triton.jit
def row_mean(total, D, ACC_DTYPE: tl.constexpr):
    """total / D, IEEE-rounded (fp32 ``/`` may be approximate on a GPU; μ and σ² reach the spikes,
    and the compile check refuses an approximate division anywhere in a spike-deciding kernel)."""
    return dev.div_rn(total, tl.zeros_like(total) + D, ACC_DTYPE)


@triton.jit
def row_stats(x, mask, D, eps, RMS: tl.constexpr, ACC_DTYPE: tl.constexpr):
    """(μ, rstd) ``[BLOCK_R]`` of the rows of ``x`` (masked lanes hold 0): two-pass in registers."""
    if RMS:
        ms = row_mean(tl.sum(x * x, axis=1), D, ACC_DTYPE)
        mean = ms * 0.0
        rstd = dev.rstd_of(ms, eps, ACC_DTYPE)
    else:
        mean = row_mean(tl.sum(x, axis=1), D, ACC_DTYPE)
        xc = tl.where(mask, x - mean[:, None], 0.0)
        rstd = dev.rstd_of(row_mean(tl.sum(xc * xc, axis=1), D, ACC_DTYPE), eps, ACC_DTYPE)
    return mean, rstd


@triton.jit
def normalise(x, mean, rstd, gamma, beta, mask):
    """(x̂, y = γ·x̂ + β) of a tile from its rows' μ, rstd ``[BLOCK_R]``; x̂ is 0 on masked lanes.
    The one formula of the forward and of every recompute (bit-identical without FMA fusion)."""
    x_hat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
    return x_hat, x_hat * gamma + beta


@triton.jit
def row_grad_x(g, x_hat, rstd, D, RMS: tl.constexpr, ACC_DTYPE: tl.constexpr):
    """∂x of a whole-row tile, g = γ·∂y (0 on masked lanes): :func:`grad_x_from_means`."""
    c2 = row_mean(tl.sum(g * x_hat, axis=1), D, ACC_DTYPE)
    c1 = tl.zeros_like(c2)
    if not RMS:
        c1 = row_mean(tl.sum(g, axis=1), D, ACC_DTYPE)
    return grad_x_from_means(g, x_hat, rstd, c1, c2, RMS)


@triton.jit
def grad_x_from_means(g, x_hat, rstd, c1, c2, RMS: tl.constexpr):
    """∂x = rstd·(g − c1 − x̂·c2) with the rows' c1 = mean_D(g), c2 = mean_D(g·x̂) (RMS: no c1)."""
    if RMS:
        dx = (g - x_hat * c2[:, None]) * rstd[:, None]
    else:
        dx = (g - c1[:, None] - x_hat * c2[:, None]) * rstd[:, None]
    return dx


# ----------------------------------------------------------------------------------------
# Plain row norm: one tile per row block
# ----------------------------------------------------------------------------------------


@triton.jit
def _row_norm_fwd_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr, mean_ptr, rstd_ptr,  # y [R, D], μ and rstd [R] out
    R, D, sx_r, sx_d, eps,
    RMS: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, ACC_DTYPE: tl.constexpr,
):
    pid = tl.program_id(0)
    eps = dev.scalar_arg(eps, ACC_DTYPE)
    d0 = tl.arange(0, BLOCK_D)[None, :]
    gamma, beta = load_affine_row(w_ptr, b_ptr, d0, D, HAS_WEIGHT, HAS_BIAS, ACC_DTYPE)
    for blk in range(pid, tl.cdiv(R, BLOCK_R), tl.num_programs(0)):
        r, d, mask, row_mask = row_block(blk, R, D, BLOCK_R, BLOCK_D)
        x = tl.load(x_ptr + r * sx_r + d * sx_d, mask=mask, other=0.0).to(ACC_DTYPE)
        mean, rstd = row_stats(x, mask, D, eps, RMS, ACC_DTYPE)
        _, y = normalise(x, mean, rstd, gamma, beta, mask)
        tl.store(y_ptr + r * D + d, y.to(y_ptr.dtype.element_ty), mask=mask)
        tl.store(mean_ptr + r, mean[:, None], mask=row_mask[:, None])
        tl.store(rstd_ptr + r, rstd[:, None], mask=row_mask[:, None])


@triton.jit
def _row_norm_bwd_kernel(
    gy_ptr, x_ptr, w_ptr, mean_ptr, rstd_ptr, dx_ptr, part_ptr,  # part [2, P, D] out: Σ ∂y·x̂, Σ ∂y
    R, D, sg_r, sg_d, sx_r, sx_d,
    RMS: tl.constexpr, HAS_WEIGHT: tl.constexpr, NEED_DX: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, ACC_DTYPE: tl.constexpr,
):
    pid = tl.program_id(0)
    P = tl.num_programs(0)
    part_w = tl.zeros([BLOCK_D], ACC_DTYPE)
    part_b = tl.zeros([BLOCK_D], ACC_DTYPE)
    for blk in range(pid, tl.cdiv(R, BLOCK_R), P):
        r, d, mask, row_mask = row_block(blk, R, D, BLOCK_R, BLOCK_D)
        # γ read per tile (an L1/L2 hit; the meter's bytes are per tile too): held across the loop,
        # it was 8 more registers a thread at 4096, and ptxas (triton 3.6) spilled 4–8 B at fp16/bf16
        gamma, beta = load_affine_row(w_ptr, w_ptr, d, D, HAS_WEIGHT, False, ACC_DTYPE)
        x = tl.load(x_ptr + r * sx_r + d * sx_d, mask=mask, other=0.0).to(ACC_DTYPE)
        gy = tl.load(gy_ptr + r * sg_r + d * sg_d, mask=mask, other=0.0).to(ACC_DTYPE)
        mean = tl.load(mean_ptr + r, mask=row_mask[:, None], other=0.0)
        rstd = tl.load(rstd_ptr + r, mask=row_mask[:, None], other=0.0)
        x_hat, _ = normalise(x, tl.sum(mean, axis=1), tl.sum(rstd, axis=1), gamma, beta, mask)
        part_w += tl.sum(gy * x_hat, axis=0)
        part_b += tl.sum(gy, axis=0)
        if NEED_DX:
            dx = row_grad_x(gy * gamma, x_hat, tl.sum(rstd, axis=1), D, RMS, ACC_DTYPE)
            tl.store(dx_ptr + r * D + d, dx.to(dx_ptr.dtype.element_ty), mask=mask)
    cols = tl.arange(0, BLOCK_D)
    tl.store(part_ptr + pid * D + cols, part_w, mask=cols < D)
    tl.store(part_ptr + (P + pid) * D + cols, part_b, mask=cols < D)


# ----------------------------------------------------------------------------------------
# Wide rows (D > MAX_D): the same, looping over a row in chunks of BLOCK_D
# ----------------------------------------------------------------------------------------


@triton.jit
def _row_norm_fwd_wide_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr, mean_ptr, rstd_ptr,
    R, D, sx_r, sx_d, eps,
    RMS: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, ACC_DTYPE: tl.constexpr,
):
    pid = tl.program_id(0)
    eps = dev.scalar_arg(eps, ACC_DTYPE)
    for blk in range(pid, tl.cdiv(R, BLOCK_R), tl.num_programs(0)):
        r, d, first_mask, row_mask = row_block(blk, R, D, BLOCK_R, BLOCK_D)  # first chunk's mask: unused
        acc = tl.zeros([BLOCK_R], ACC_DTYPE)
        for c0 in range(0, D, BLOCK_D):  # Σ x (LayerNorm) or Σ x² (RMSNorm)
            mask = row_mask[:, None] & (c0 + d < D)
            x = tl.load(x_ptr + r * sx_r + (c0 + d) * sx_d, mask=mask, other=0.0).to(ACC_DTYPE)
            if RMS:
                acc += tl.sum(x * x, axis=1)
            else:
                acc += tl.sum(x, axis=1)
        if RMS:
            mean = acc * 0.0
            rstd = dev.rstd_of(row_mean(acc, D, ACC_DTYPE), eps, ACC_DTYPE)
        else:
            mean = row_mean(acc, D, ACC_DTYPE)
            m2 = tl.zeros([BLOCK_R], ACC_DTYPE)
            for c0 in range(0, D, BLOCK_D):  # Σ (x − μ)²: the exact second pass
                mask = row_mask[:, None] & (c0 + d < D)
                x = tl.load(x_ptr + r * sx_r + (c0 + d) * sx_d, mask=mask, other=0.0).to(ACC_DTYPE)
                xc = tl.where(mask, x - mean[:, None], 0.0)
                m2 += tl.sum(xc * xc, axis=1)
            rstd = dev.rstd_of(row_mean(m2, D, ACC_DTYPE), eps, ACC_DTYPE)
        for c0 in range(0, D, BLOCK_D):
            mask = row_mask[:, None] & (c0 + d < D)
            x = tl.load(x_ptr + r * sx_r + (c0 + d) * sx_d, mask=mask, other=0.0).to(ACC_DTYPE)
            gamma, beta = load_affine_row(w_ptr, b_ptr, c0 + d, D, HAS_WEIGHT, HAS_BIAS, ACC_DTYPE)
            x_hat, y = normalise(x, mean, rstd, gamma, beta, mask)
            tl.store(y_ptr + r * D + c0 + d, y.to(y_ptr.dtype.element_ty), mask=mask)
        tl.store(mean_ptr + r, mean[:, None], mask=row_mask[:, None])
        tl.store(rstd_ptr + r, rstd[:, None], mask=row_mask[:, None])


@triton.jit
def _row_norm_bwd_wide_kernel(
    gy_ptr, x_ptr, w_ptr, mean_ptr, rstd_ptr, dx_ptr, part_ptr,  # part [2, P, D], zeroed, accumulated by its program
    R, D, sg_r, sg_d, sx_r, sx_d,
    RMS: tl.constexpr, HAS_WEIGHT: tl.constexpr, NEED_DX: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, ACC_DTYPE: tl.constexpr,
):
    pid = tl.program_id(0)
    P = tl.num_programs(0)
    for blk in range(pid, tl.cdiv(R, BLOCK_R), P):
        r, d, first_mask, row_mask = row_block(blk, R, D, BLOCK_R, BLOCK_D)  # first chunk's mask: unused
        mean = tl.sum(tl.load(mean_ptr + r, mask=row_mask[:, None], other=0.0), axis=1)
        rstd = tl.sum(tl.load(rstd_ptr + r, mask=row_mask[:, None], other=0.0), axis=1)
        c1 = tl.zeros([BLOCK_R], ACC_DTYPE)
        c2 = tl.zeros([BLOCK_R], ACC_DTYPE)
        for c0 in range(0, D, BLOCK_D):  # the row sums Σ g, Σ g·x̂ and this program's column partials
            mask = row_mask[:, None] & (c0 + d < D)
            x = tl.load(x_ptr + r * sx_r + (c0 + d) * sx_d, mask=mask, other=0.0).to(ACC_DTYPE)
            gy = tl.load(gy_ptr + r * sg_r + (c0 + d) * sg_d, mask=mask, other=0.0).to(ACC_DTYPE)
            gamma, beta = load_affine_row(w_ptr, w_ptr, c0 + d, D, HAS_WEIGHT, False, ACC_DTYPE)
            x_hat, y_unused = normalise(x, mean, rstd, gamma, beta, mask)
            g = gy * gamma
            c1 += tl.sum(g, axis=1)
            c2 += tl.sum(g * x_hat, axis=1)
            cols = c0 + tl.arange(0, BLOCK_D)
            pw = part_ptr + pid * D + cols
            pb = part_ptr + (P + pid) * D + cols
            tl.store(pw, tl.load(pw, mask=cols < D, other=0.0) + tl.sum(gy * x_hat, axis=0), mask=cols < D)
            tl.store(pb, tl.load(pb, mask=cols < D, other=0.0) + tl.sum(gy, axis=0), mask=cols < D)
        if NEED_DX:
            c1 = row_mean(c1, D, ACC_DTYPE)
            c2 = row_mean(c2, D, ACC_DTYPE)
            for c0 in range(0, D, BLOCK_D):
                mask = row_mask[:, None] & (c0 + d < D)
                x = tl.load(x_ptr + r * sx_r + (c0 + d) * sx_d, mask=mask, other=0.0).to(ACC_DTYPE)
                gy = tl.load(gy_ptr + r * sg_r + (c0 + d) * sg_d, mask=mask, other=0.0).to(ACC_DTYPE)
                gamma, beta = load_affine_row(w_ptr, w_ptr, c0 + d, D, HAS_WEIGHT, False, ACC_DTYPE)
                x_hat, y_unused = normalise(x, mean, rstd, gamma, beta, mask)
                dx = grad_x_from_means(gy * gamma, x_hat, rstd, c1, c2, RMS)
                tl.store(dx_ptr + r * D + c0 + d, dx.to(dx_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------


@launcher
def launch_row_norm_forward(x: torch.Tensor, weight, bias, eps: float, rms: bool):
    """(y, μ, rstd) of LayerNorm (``rms=False``) or RMSNorm over x's last dimension: y like x
    (x's dtype), μ and rstd ``[R]`` in the accumulation dtype (μ = 0 for RMSNorm)."""
    check_row_args("row_norm", x, weight, bias, rms)
    D = x.shape[-1]
    x2 = rows_view(x, 0)
    R = x2.shape[0]
    acc = acc_torch_dtype(x.dtype)
    y = torch.empty(x.shape, dtype=store_dtype(x.dtype), device=x.device)
    mean = torch.empty(R, dtype=acc, device=x.device)
    rstd = torch.empty(R, dtype=acc, device=x.device)
    if x.numel() > 0:
        cfg = row_config(R, D, x.device, x.dtype)
        kernel = _row_norm_fwd_wide_kernel if D > one_pass_max_d(x.device.type, dtype=x.dtype) else _row_norm_fwd_kernel
        kernel[(cfg.programs,)](
            x2, weight, bias, y, mean, rstd, R, D, *x2.stride(), *dev.kernel_scalars((eps,), acc, x.device),
            RMS=bool(rms), HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
            BLOCK_R=cfg.BLOCK_R, BLOCK_D=cfg.BLOCK_D, ACC_DTYPE=acc_dtype(x.dtype),
            **launch_options(cfg.num_warps, acc),
        )
    elif R > 0:  # D = 0: no values; torch gives an empty y too
        mean.zero_(), rstd.zero_()
    return y.to(x.dtype), mean, rstd


@launcher
def launch_row_norm_backward(grad_y: torch.Tensor, x: torch.Tensor, weight: Optional[torch.Tensor],
                             mean: torch.Tensor, rstd: torch.Tensor, rms: bool, need_dx: bool):
    """(∂x in x's dtype or an empty tensor without ``need_dx``, ∂γ, ∂β in the accumulation dtype)
    of :func:`launch_row_norm_forward` from its saved μ, rstd. ∂β is Σ ∂y (the caller drops it
    without a bias)."""
    check_row_args("row_norm backward", x, weight, None, rms)
    if tuple(grad_y.shape) != tuple(x.shape):
        raise ValueError(f"row_norm backward: grad_y must have x's shape {list(x.shape)}, got {list(grad_y.shape)}")
    D = x.shape[-1]
    x2, g2 = rows_view(x, 0), rows_view(grad_y, 0)
    R = x2.shape[0]
    acc = acc_torch_dtype(x.dtype)
    dx = torch.empty(x.shape if need_dx else (0,), dtype=store_dtype(x.dtype), device=x.device)
    if x.numel() == 0:
        z = torch.zeros(D, dtype=acc, device=x.device)
        return dx.to(x.dtype), z, z.clone()
    cfg = row_config(R, D, x.device, x.dtype)
    wide = D > one_pass_max_d(x.device.type, dtype=x.dtype)
    part = (torch.zeros if wide else torch.empty)((2, cfg.programs, D), dtype=acc, device=x.device)
    kernel = _row_norm_bwd_wide_kernel if wide else _row_norm_bwd_kernel
    kernel[(cfg.programs,)](
        g2, x2, weight, mean, rstd, dx if need_dx else None, part, R, D, *g2.stride(), *x2.stride(),
        RMS=bool(rms), HAS_WEIGHT=weight is not None, NEED_DX=bool(need_dx),
        BLOCK_R=cfg.BLOCK_R, BLOCK_D=cfg.BLOCK_D, ACC_DTYPE=acc_dtype(x.dtype),
        **launch_options(cfg.num_warps, acc),
    )
    return dx.to(x.dtype), part[0].sum(dim=0), part[1].sum(dim=0)  # two tensors: an op's outputs may not alias
