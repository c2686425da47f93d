"""One statistics pipeline for every batch-statistics norm.

Multi-step BatchNorm/tdBN, BNTT, TEBN and TAB are the same computation on a
``[T, N, C, *spatial]`` tensor (viewed as ``[T, N, C, S]``, M = N·S values per (t, c)),
differing only in a :class:`NormRule`: which steps' values a step's statistics pool (its
*grouping*) and what scales the normalised value::

    grouping ALL     one μ_c, σ²_c over T·M values              (BN multi-step, tdBN, TEBN)
    grouping EACH    μ_tc, σ²_tc over step t's M values alone    (BNTT)
    grouping PREFIX  μ_tc, σ²_tc over steps 0..t, n_t = (t+1)·M  (TAB)
    scale NONE: s_t = 1,  LINEAR: s_t = p_t (TEBN),  SQUARE: s_t = p_t² (TAB)

γ, β (and the running statistics) are ``[C]`` under ALL and ``[T, C]`` (per step) otherwise.
The rules (:data:`RULES`; the ops ``snnorm::bn_*`` take one by name):

* ``batch_norm`` (ALL, NONE): multi-step BatchNorm 1d/2d/3d and tdBN;
* ``bntt`` (EACH, NONE): BNTT, one BN per step;
* ``tebn`` (ALL, LINEAR): TEBN (Duan et al., "Temporal Effective Batch Normalization in
  Spiking Neural Networks", NeurIPS 2022): y[t] = p[t]·(γ x̂ + β) with statistics shared
  over time, ∂L/∂p[t] = Σ over (n, c, spatial) of g·(γ x̂ + β);
* ``tab`` (PREFIX, SQUARE): TAB (Jiang et al., "TAB: Temporal Accumulated Batch
  Normalization in Spiking Neural Networks", ICLR 2024): y_t = p_t²·(γ_t x̂_t + β_t) with the
  statistics of steps 0..t, in O(T) passes (step t's partials merged into the prefix with
  Chan's formula) instead of the official code's O(T²), and the per-step running statistics
  updated with M2_t/(n_t − 1).

Forward stages (launches):

1. **partials** (``stats_partial_kernel``): per (t, c) and program slice, the
   (count, mean, M2) of x, merged tile by tile with Chan's formula (never Σx²);
2. **reduce** (``_stats_reduce_kernel``, one program per block of channels): the partials
   combined over the grouping — all of them (ALL), step t's (EACH), or step t's merged into
   the prefix of steps 0..t−1 (PREFIX) — giving μ, biased σ² per statistics row, and the
   running statistics updated here, once:
   ``r_μ ← (1 − m)·r_μ + m·μ``, ``r_σ² ← (1 − m)·r_σ² + m·M2/(n − 1)``;
3. **coefficients** (``_device.step_coefficients``, the apply kernel's device function; the
   backward coefficient kernel reads the same μ, r, γ, β and ``_device.step_scale``) per
   (t, c): a = s_t·γ/√(σ² + ε), b = s_t·β, so that
   y = a·(x − μ) + b, which is a·x + (s_t·β − a·μ) evaluated centred: subtracting μ first
   keeps the digits when |μ| ≫ σ;
4. **apply** (``_apply_kernel``): y = a·(x − μ) + b elementwise.

Eval (running statistics) skips 1–2. fp32 traffic: training reads x twice and writes y
(12 B per element-step), eval reads x and writes y (8 B).

Backward, with g = ∂L/∂y and x̂ = (x − μ)·r, r = 1/√(σ² + ε), k_t = s_t·γ_t:

1. ``_bwd_reduce_kernel``: per (t, c) and program slice the sums Σg and Σg·x̂;
2. ``_bwd_coef_kernel`` (one program per channel block, steps backwards): step sums
   A_t = Σ g, B_t = Σ g·x̂; parameter gradients ∂β = Σ s_t A_t, ∂γ = Σ s_t B_t (over t
   under ALL, per step otherwise), ∂p_t = s_t'·Σ_c (γ B_t + β A_t); each step's share of the
   statistics' gradients ∂L/∂μ = −k_t r A_t, ∂L/∂σ² = −½ k_t r² B_t, summed into the
   statistics row it read; and per (t, c) coefficients of
   ``∂x = k_t r_t·g + U + V·(x − μ)``. With batch statistics, since ∂μ_j/∂x = 1/n_j and
   ∂σ²_j/∂x = 2(x − μ_j)/n_j for every x that row j pools::

       ALL:    U = Σ_t ∂L/∂μ|_t / (T·M),   V = 2 Σ_t ∂L/∂σ²|_t / (T·M)      (one row)
       EACH:   U_t = ∂L/∂μ_t / M,          V_t = 2 ∂L/∂σ²_t / M
       PREFIX: V_s = Σ_{t≥s} v_t, v_t = 2 ∂L/∂σ²_t / n_t,
               U_s = Σ_{t≥s} (∂L/∂μ_t / n_t + v_t (μ_s − μ_t))   (reverse running sums)

   (constant statistics: U = V = 0);
3. ``_bwd_dx_kernel``: ∂x elementwise. fp32 traffic: g and x read twice, ∂x written (20 B).

Synchronised statistics (several ranks, :mod:`snnorm.backends.sync`; the collectives come
as callables): :func:`launch_stats` with ``gather`` reduces, gathers and combines per-step
(n_t, μ_t, M2_t) partials, so the statistics and the running update see the global count;
the backward with ``all_reduce`` sums A, B over ranks (:func:`launch_backward_from_sums`).
Each moves O(T·C) values; without the callables nothing changes.

Layouts: x, ∂y (and y, ∂x) are addressed through their own strides as ``[T, N, C, S]`` views
(``_common.as_tncs``), so channels-last convnet activations and transposed token-major views
(Spikformer's BatchNorm1d on ``[T, B, L, D]``.transpose(-1, -2)) are read in place in both
directions and move the contiguous bytes; y and ∂x come back in x's memory format
(:func:`output_like`, as torch's BatchNorm). Only spatial dims that cannot merge into one
strided S (a transposed H, W) are still copied. Every launch pins ``enable_fp_fusion=False`` (:func:`launch_options`).

Everything is fp32 (fp64 for fp64 input); partials are reduced in a fixed order (no float
atomics), so results are deterministic. Absent tensors (γ, β, p, running statistics) reach
the kernels as None with a ``HAS_*`` flag. This module launches kernels only; the
``torch.library`` ops and their autograd live in :mod:`snnorm.backends.triton_backend`.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional, Sequence

import torch
import triton

from .._common import (
    COEF_WARPS,
    REDUCE_WARPS,
    STATS_WARPS,
    SYNC_DTYPE,
    acc_dtype,
    acc_torch_dtype,
    as_tncs,
    check_channel_args,
    combine_tiles,
    contiguous_or_none,
    device_vector,
    empty_tncs_like,
    fitted_geometry,
    launch_options,
    launcher,
    same_strides,
    slice_args,
    tile_constexprs,
    tncs_strides,
)
from .._device import GROUPING_ALL, GROUPING_EACH, GROUPING_PREFIX, SCALE_LINEAR, SCALE_NONE, SCALE_SQUARE, kernel_scalars
from ._kernels import (
    _apply_kernel,
    _bwd_coef_kernel,
    _bwd_dx_kernel,
    _bwd_reduce_kernel,
    stats_partial_kernel,
    _stats_reduce_kernel,
)

__all__ = [
    "ALL", "EACH", "PREFIX", "NONE", "LINEAR", "SQUARE", "NormRule", "RULES", "rule",
    "launch_stats", "launch_apply", "launch_backward", "launch_backward_from_sums", "stats_shape", "param_shape",
    "output_like",
]

#: groupings: which steps' values a statistics row pools (the host's ints of the kernels' named modes)
ALL, EACH, PREFIX = GROUPING_ALL.value, GROUPING_EACH.value, GROUPING_PREFIX.value
#: per-step output scale s_t: 1, p_t, p_t²
NONE, LINEAR, SQUARE = SCALE_NONE.value, SCALE_LINEAR.value, SCALE_SQUARE.value


class NormRule(NamedTuple):
    """A batch-statistics norm as the pipeline sees it: a grouping and a scale rule."""

    name: str
    grouping: int  # ALL, EACH or PREFIX
    scale: int  # NONE, LINEAR or SQUARE

    @property
    def per_step(self) -> bool:
        """Statistics, γ, β and running statistics per step ([T, C]) rather than [C]."""
        return self.grouping != ALL


RULES = {
    r.name: r
    for r in (
        NormRule("batch_norm", ALL, NONE),  # multi-step BN 1d/2d/3d, tdBN
        NormRule("bntt", EACH, NONE),
        NormRule("tebn", ALL, LINEAR),
        NormRule("tab", PREFIX, SQUARE),
    )
}


def rule(name: str) -> NormRule:
    """The rule named ``name`` (ValueError naming the known ones otherwise)."""
    try:
        return RULES[name]
    except KeyError:
        raise ValueError(f"unknown norm rule {name!r}; known: {sorted(RULES)}") from None


def stats_shape(r: NormRule, T: int, C: int) -> tuple:
    """Shape of the statistics (and running statistics): [C] under ALL, [T, C] otherwise."""
    return (T, C) if r.per_step else (C,)


param_shape = stats_shape  # γ, β have the statistics' layout


def check_params(op: str, r: NormRule, x: torch.Tensor, weight, bias, mean, var, p) -> None:
    """γ, β, μ, σ² in :func:`stats_shape` (μ, σ² required), p ``[T]`` (required with a scale)."""
    T, C = x.shape[0], x.shape[2]
    shape = stats_shape(r, T, C)
    check_channel_args(
        f"{op} ({r.name})", x.device, weight=(weight, shape), bias=(bias, shape), mean=(mean, shape, True),
        var=(var, shape, True), p=(p, (T,), r.scale != NONE),
    )


# ----------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------

#: partials × channels the backward coefficient kernel sums per chunk on a GPU (on
#: ``_common.COEF_WARPS``, one warp: its work is O(T·C·partials))
COEF_CHUNK = 256


#: ``gather(count [T], mean [T, C], m2 [T, C])`` → every rank's ``([W, T], [W, T, C], [W, T, C])``
#: in rank order (:func:`snnorm.backends.sync.gather_step_partials` bound to a group)
Gather = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
#: ``all_reduce(t)`` → Σ over ranks of ``t`` (a new tensor)
AllReduce = Callable[[torch.Tensor], torch.Tensor]


@launcher
def launch_partial_stats(x4: torch.Tensor, T: int, N: int, C: int, S: int, acc: torch.dtype):
    """Stage 1: per-(program slice, channel) partial statistics of ``x4`` [T, N, C, S]:
    (count, mean, M2) rows for every part of every step, combined afterwards in a fixed order.
    Returns (part_mean [parts, C], part_m2 [parts, C], part_count [parts], geometry)."""

    def partials(geo):
        part_mean = torch.empty(geo.parts, C, dtype=acc, device=x4.device)
        part_m2 = torch.empty(geo.parts, C, dtype=acc, device=x4.device)
        part_count = torch.empty(geo.parts, dtype=acc, device=x4.device)
        return (x4, part_mean, part_m2, part_count, N, C, S, *slice_args(geo), *tncs_strides(x4))

    flags = dict(ACC_DTYPE=acc_dtype(acc))
    geo = fitted_geometry(stats_partial_kernel, T, N, C, S, x4.device, x4.dtype, partials, flags,
                          warps=STATS_WARPS)
    args = partials(geo)
    stats_partial_kernel[geo.grid](*args, **flags, **tile_constexprs(geo, acc))
    return (*args[1:4], geo)


def _reduce(
    part_mean, part_m2, part_count, rows: int, per_group: int, C: int, prefix: bool, running_mean, running_var,
    momentum: Sequence[float], store_m2: bool, acc: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One ``_stats_reduce_kernel`` launch over ``rows`` groups of ``per_group`` partials:
    ``[rows, C]`` (μ, σ² or M2); running statistics updated in place when given."""
    device = part_mean.device
    mean = torch.empty(rows, C, dtype=acc, device=device)
    var = torch.empty(rows, C, dtype=acc, device=device)
    update = running_mean is not None and running_var is not None
    # the kernel updates contiguous buffers in place; a strided one goes through a copy
    r_mean = contiguous_or_none(running_mean) if update else None
    r_var = contiguous_or_none(running_var) if update else None
    # One factor for every row (the usual case) goes as a scalar. Triton passes Python floats
    # as fp32, so fp64 and differing factors go as a tensor built by fills (no host copy).
    per_row = update and (len(set(momentum)) > 1 or acc == torch.float64)
    factors = device_vector(momentum, acc, device) if per_row else None
    momentum0 = float(momentum[0]) if update else 0.0
    block_p, block_c = combine_tiles(per_group, C, device.type != "cuda")
    _stats_reduce_kernel[(triton.cdiv(C, block_c),)](
        part_mean, part_m2, part_count, mean, var, r_mean, r_var, factors, momentum0,
        rows, per_group, C,
        PREFIX_MERGE=prefix, UPDATE_RUNNING=update, PER_ROW_MOMENTUM=per_row, STORE_M2=store_m2,
        BLOCK_P=block_p, BLOCK_C=block_c, ACC_DTYPE=acc_dtype(acc),
        **launch_options(REDUCE_WARPS(block_p * block_c), acc),
    )
    if update and r_mean.data_ptr() != running_mean.data_ptr():
        running_mean.copy_(r_mean)
    if update and r_var.data_ptr() != running_var.data_ptr():
        running_var.copy_(r_var)
    return mean, var


@launcher
def launch_stats(
    r: NormRule,
    x: torch.Tensor,
    running_mean: Optional[torch.Tensor],
    running_var: Optional[torch.Tensor],
    momentum: Sequence[float],
    gather: Optional[Gather] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stages 1–2: (μ, biased σ²) in :func:`stats_shape`; running statistics updated in place.

    ``momentum`` has one factor per statistics row (1 under ALL, T otherwise). An empty
    batch gives μ = 0, σ² = 1 and updates nothing (as ``F.batch_norm``).

    With ``gather`` (synchronised statistics) the local partials are first reduced per
    step (EACH, no update) to (n_t, μ_t, M2_t), every rank's are gathered (one collective
    of O(T·C) values; an empty local batch sends n_t = 0, which adds nothing), and the
    W·T rank partials, each step's W together in rank order, enter the reduce over the
    rule's grouping: the statistics and the running update use the global count.
    """
    T, C = x.shape[0], x.shape[2]
    shape = stats_shape(r, T, C)
    check_channel_args(
        f"stats ({r.name})", x.device, running_mean=(running_mean, shape), running_var=(running_var, shape)
    )
    x4, T, N, C, S = as_tncs(x)
    acc = acc_torch_dtype(x.dtype)
    rows = T if r.per_step else 1
    update = running_mean is not None and running_var is not None
    if update and len(momentum) != rows:
        raise ValueError(f"{r.name} statistics: expected {rows} momentum factor(s), got {len(momentum)}")
    if gather is None:
        if x.numel() == 0:
            return x.new_zeros(shape, dtype=acc), x.new_ones(shape, dtype=acc)
        part_mean, part_m2, part_count, geo = launch_partial_stats(x4, T, N, C, S, acc)
        mean, var = _reduce(part_mean, part_m2, part_count, rows, geo.parts // rows, C, r.grouping == PREFIX,
                            running_mean, running_var, momentum, False, acc)
        return mean.view(shape), var.view(shape)
    if x.numel() == 0:
        step_mean = torch.zeros(T, C, dtype=acc, device=x.device)
        step_m2 = torch.zeros(T, C, dtype=acc, device=x.device)
    else:
        part_mean, part_m2, part_count, geo = launch_partial_stats(x4, T, N, C, S, acc)
        step_mean, step_m2 = _reduce(part_mean, part_m2, part_count, T, geo.parts // T, C, False, None, None, (),
                                     True, acc)
    counts, means, m2s = gather(torch.full((T,), float(N * S), dtype=acc, device=x.device), step_mean, step_m2)
    W = counts.shape[0]
    # [W, T, ·] → [T·W, ·]: each step's rank partials consecutive (the reduce's groups)
    g_count = counts.to(acc).t().reshape(T * W).contiguous()
    g_mean = means.to(acc).transpose(0, 1).reshape(T * W, C).contiguous()
    g_m2 = m2s.to(acc).transpose(0, 1).reshape(T * W, C).contiguous()
    mean, var = _reduce(g_mean, g_m2, g_count, rows, T * W // rows, C, r.grouping == PREFIX, running_mean,
                        running_var, momentum, False, acc)
    return mean.view(shape), var.view(shape)


def out_dtype(x: torch.Tensor, p: Optional[torch.Tensor]) -> torch.dtype:
    """y's dtype: x's, promoted with p's when a scale multiplies (the torch reference's y·p)."""
    return x.dtype if p is None else torch.promote_types(x.dtype, p.dtype)


def output_like(x: torch.Tensor, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """An output (y, ∂x, spikes) for the ``[T, N, C, *spatial]`` input ``x``, in x's memory
    format as torch's BatchNorm gives it (``torch.empty_like`` semantics; contiguous only where
    x's spatial dims cannot merge). The ops' fake kernels call it too, so the real and the
    fake outputs have the same strides."""
    return empty_tncs_like(x, dtype)


@launcher
def launch_apply(
    r: NormRule, x: torch.Tensor, weight, bias, mean: torch.Tensor, var: torch.Tensor, p, eps: float
) -> torch.Tensor:
    """Stages 3–4: y = s_t·(γ (x − μ)/√(σ² + ε) + β) in one elementwise pass."""
    check_params("apply", r, x, weight, bias, mean, var, p)
    x4, T, N, C, S = as_tncs(x)
    acc = acc_torch_dtype(x.dtype)
    y = output_like(x, out_dtype(x, p))
    if x.numel() == 0:
        return y
    y4 = y.view(x4.shape)
    head = (x4, y4, mean.contiguous(), var.contiguous(), contiguous_or_none(weight), contiguous_or_none(bias),
            contiguous_or_none(p), N, C, S)
    strides = (*tncs_strides(x4), *tncs_strides(y4))
    flags = dict(PER_STEP=r.per_step, SCALE=r.scale, HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
                 SAME_LAYOUT=same_strides(x4, y4), ACC_DTYPE=acc_dtype(acc))
    (eps_arg,) = kernel_scalars((eps,), acc, x.device)
    geo = fitted_geometry(_apply_kernel, T, N, C, S, x.device, x.dtype,
                          lambda g: (*head, *slice_args(g), eps_arg, *strides), flags)
    _apply_kernel[geo.grid](*head, *slice_args(geo), eps_arg, *strides, **flags, **tile_constexprs(geo, acc))
    return y


@launcher
def launch_backward(
    r: NormRule, grad_y: torch.Tensor, x: torch.Tensor, weight, bias, mean: torch.Tensor, var: torch.Tensor, p,
    eps: float, batch_stats: bool, need_dx: bool, need_sums: bool, all_reduce: Optional[AllReduce] = None,
):
    """(∂x, ∂γ, ∂β, ∂p, ∂μ, ∂σ²); all but ∂x in the accumulation dtype, γ/β/μ/σ² in the
    statistics' layout, ∂p ``[T]`` (zeros without a scale).

    Three launches: the partial sums (skipped when neither the statistics' path nor any
    parameter needs them: ``need_sums`` False and constant statistics), every per-(t, c)
    coefficient, ∂x (when ``need_dx``). An unneeded ∂x comes back empty (numel 0).
    ``all_reduce``: synchronised statistics (:func:`launch_backward_from_sums`).
    """
    check_params("backward", r, x, weight, bias, mean, var, p)
    check_channel_args(f"backward ({r.name})", x.device, grad_y=(grad_y, tuple(x.shape), True))
    x4, T, N, C, S = as_tncs(x)  # in place (a copy only for spatial dims that cannot merge)
    acc = acc_torch_dtype(x.dtype)
    dev = x.device
    mean, var = mean.contiguous(), var.contiguous()
    tc = dict(dtype=acc, device=dev)
    if x.numel() == 0 or not (batch_stats or need_sums):  # no sums: A = B = 0
        part_a = part_b = torch.zeros(T, C, **tc)
    else:
        g4 = as_tncs(grad_y)[0]
        grad_y = g4.view(grad_y.shape)
        strides = (*tncs_strides(g4), *tncs_strides(x4))
        (eps_arg,) = kernel_scalars((eps,), acc, dev)

        def reduce_args(geo):
            part_a = torch.empty(geo.parts, C, **tc)
            part_b = torch.empty(geo.parts, C, **tc)
            return (g4, x4, mean, var, part_a, part_b, N, C, S, *slice_args(geo), eps_arg, *strides)

        same = same_strides(g4, x4)
        red_flags = dict(PER_STEP=r.per_step, SAME_LAYOUT=same, ACC_DTYPE=acc_dtype(acc))
        # ∂y in another layout than x (two offset sets): without a register budget ptxas of
        # triton 3.6 spilled 8–16 B on sm_90 (at 48 registers; with it, 56–62 and none)
        geo = fitted_geometry(_bwd_reduce_kernel, T, N, C, S, dev, x.dtype, reduce_args, red_flags, budget=not same)
        args = reduce_args(geo)
        _bwd_reduce_kernel[geo.grid](*args, **red_flags, **tile_constexprs(geo, acc, budget=not same))
        part_a, part_b = args[4:6]
    # the views read here (a layout that needed a copy is copied once for both launchers)
    return launch_backward_from_sums(r, part_a, part_b, grad_y, x4.view(x.shape), weight, bias, mean, var, p, eps,
                                     batch_stats, need_dx, all_reduce)


def _coefficients(
    r: NormRule, part_a, part_b, T: int, C: int, mean, var, weight, bias, p, eps: float, batch_stats: bool, M: int,
    count: Optional[torch.Tensor],
):
    """One ``_bwd_coef_kernel`` launch on the sums ``[T·PPS, C]``: (∂γ, ∂β, ∂p, ∂μ, ∂σ², k r,
    U, V), U and V None without ``batch_stats``. ``count`` (a ``[1]`` device tensor) replaces
    the per-step count M when given."""
    dev = part_a.device
    acc = part_a.dtype
    tc = dict(dtype=acc, device=dev)
    per_step = part_a.shape[0] // T
    shape = stats_shape(r, T, C)
    dw, db, grad_mean, grad_var = (torch.empty(shape, **tc) for _ in range(4))
    coef_g = torch.empty(T, C, **tc)
    coef_u, coef_v = (torch.empty(shape, **tc), torch.empty(shape, **tc)) if batch_stats else (None, None)
    block_p, block_c = combine_tiles(max(per_step, 1), C, dev.type != "cuda")
    if dev.type == "cuda":
        # O(T·C·PPS) work: the chunk size does not matter, a small one keeps registers low
        block_p = min(block_p, max(1, COEF_CHUNK // block_c))
    c_blocks = triton.cdiv(C, block_c)
    part_dp = torch.empty(c_blocks, T, **tc) if r.scale != NONE else None
    _bwd_coef_kernel[(c_blocks,)](
        part_a, part_b, mean, var, contiguous_or_none(weight), contiguous_or_none(bias), contiguous_or_none(p),
        dw, db, part_dp, grad_mean, grad_var, coef_g, coef_u, coef_v, count,
        T, per_step, C, M, *kernel_scalars((eps,), acc, dev),
        GROUPING=r.grouping, SCALE=r.scale, HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
        BATCH_STATS=batch_stats, COUNT_FROM_PTR=count is not None, BLOCK_P=block_p, BLOCK_C=block_c,
        ACC_DTYPE=acc_dtype(acc), **launch_options(COEF_WARPS(block_p * block_c), acc),
    )
    # a fixed-shape reduction over channel blocks: deterministic
    dp = part_dp.sum(0) if part_dp is not None else torch.zeros(T, **tc)
    return dw, db, dp, grad_mean, grad_var, coef_g, coef_u, coef_v


@launcher
def launch_backward_from_sums(
    r: NormRule, part_a: torch.Tensor, part_b: torch.Tensor, grad_y: torch.Tensor, x: torch.Tensor, weight, bias,
    mean: torch.Tensor, var: torch.Tensor, p, eps: float, batch_stats: bool, need_dx: bool,
    all_reduce: Optional[AllReduce] = None,
):
    """Backward stages 2–3 from the per-(t, c) partial sums ``part_a`` (Σ g) and ``part_b``
    (Σ g·x̂), ``[T·PPS, C]`` with each step's PPS rows together: what :func:`launch_backward`
    returns. The fused norm → LIF backward (:mod:`snnorm.kernels.norm_lif`) makes its sums
    itself, with ∂y, and enters here.

    With ``all_reduce`` (synchronised batch statistics) the sums are summed per step
    (A_t, B_t ``[T, C]``) and, with the local count N·S, all-reduced as one packed tensor
    (O(T·C) values). The coefficient kernel runs twice: on the local sums for ∂γ, ∂β, ∂p
    (per rank: DistributedDataParallel averages parameter gradients, as for torch's
    ``SyncBatchNorm``), and on the global sums with the global count for ∂μ, ∂σ² and ∂x's
    U, V, since every rank's loss reaches x through the shared statistics.
    """
    check_params("backward", r, x, weight, bias, mean, var, p)
    x4, T, N, C, S = as_tncs(x)
    acc = acc_torch_dtype(x.dtype)
    dev = x.device
    mean, var = mean.contiguous(), var.contiguous()
    synced = all_reduce is not None and batch_stats
    # no element: no statistics path (and no 0/0 in U, V); a synchronised rank still joins the collective
    batch_stats = batch_stats and (x.numel() > 0 or synced)
    common = (T, C, mean, var, weight, bias, p, eps)
    if not synced:
        dw, db, dp, grad_mean, grad_var, coef_g, coef_u, coef_v = _coefficients(
            r, part_a, part_b, *common, batch_stats, N * S, None)
    else:
        sums = torch.stack((part_a, part_b)).view(2, T, -1, C).sum(2)  # [2, T, C]: A_t, B_t
        packed = torch.cat((sums.reshape(-1).to(SYNC_DTYPE),
                            torch.full((1,), float(N * S), dtype=SYNC_DTYPE, device=dev)))
        total = all_reduce(packed)
        global_sums = total[:-1].view(2, T, C).to(acc)
        count = total[-1:].to(acc)
        dw, db, dp, *_ = _coefficients(r, part_a, part_b, *common, False, N * S, None)
        _, _, _, grad_mean, grad_var, coef_g, coef_u, coef_v = _coefficients(
            r, global_sums[0], global_sums[1], *common, True, 1, count)
    if not need_dx:
        dx = x.new_empty(0)  # not needed: no full-size allocation
    elif x.numel() == 0:
        dx = output_like(x)
    else:
        g4 = as_tncs(grad_y)[0]
        dx = output_like(x)
        dx4 = dx.view(x4.shape)
        x_used = x4 if batch_stats else None
        if batch_stats:
            head = (g4, x4, dx4, mean, coef_g, coef_u, coef_v, N, C, S)
        else:  # constant statistics: ∂x = k r g
            head = (g4, None, dx4, None, coef_g, None, None, N, C, S)
        strides = (*tncs_strides(g4), *tncs_strides(x_used), *tncs_strides(dx4))
        dx_flags = dict(PER_STEP=r.per_step, BATCH_STATS=batch_stats, SAME_LAYOUT=same_strides(g4, x_used, dx4),
                        ACC_DTYPE=acc_dtype(acc))
        geo = fitted_geometry(_bwd_dx_kernel, T, N, C, S, dev, x.dtype, lambda g: (*head, *slice_args(g), *strides),
                              dx_flags)
        _bwd_dx_kernel[geo.grid](*head, *slice_args(geo), *strides, **dx_flags, **tile_constexprs(geo, acc))
    return dx, dw, db, dp, grad_mean, grad_var
