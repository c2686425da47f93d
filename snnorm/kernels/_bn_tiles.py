"""The tile grid, statistics kernels and grid sizing shared by the TEBN and TAB kernels.

Both ops read a ``[T, N, C, *spatial]`` tensor, made contiguous and viewed as
``[T, N, C, S]`` (S = prod(spatial), 1 for ``[T, N, C]``; :func:`as_tncs`), and run every
elementwise and reducing kernel on a grid of tiles ``[BLOCK_N, BLOCK_C, BLOCK_S]``:
program axis 0 is a block of channels, axis 1 a (timestep, slice of N) pair, axis 2 a
slice of S; a program loops over its slice in tiles (:func:`program_slice`,
:func:`tile_offsets`). The partials of timestep t are therefore contiguous: rows
``t·P/T .. (t+1)·P/T − 1`` of the ``[P, C]`` partial tensors.

Statistics never come from raw Σx, Σx²: :func:`stats_partial_kernel` keeps a (count,
mean, M2) triple per program, updated tile by tile with Chan's pairwise formula
(:func:`chan_merge`), and :func:`combine_partials` combines a range of partials in
vectorised ``[BLOCK_P, BLOCK_C]`` chunks (multi-way formula within a chunk, Chan's between
chunks; fixed order, so deterministic). TEBN combines all P partials of a channel at
once; TAB combines those of each step and merges them into the prefix of steps 0..t.

On a GPU the slices are sized so that the grid is one wave: as many programs as the SMs
hold at once, read from the compiled kernel's register count and shared memory
(:func:`fitted_geometry`, :func:`resident_programs_per_sm`). Under the interpreter, one
program per (channel block, timestep). :data:`TUNING` is a test hook that forces small
tiles or many programs.
"""

from __future__ import annotations

import math
import warnings
from typing import Callable, NamedTuple, Optional

import torch
import triton
import triton.language as tl

from ._common import acc_dtype, next_pow2

__all__ = [
    "program_slice",
    "tile_offsets",
    "channel_consts",
    "chan_merge",
    "combine_partials",
    "stats_partial_kernel",
    "TUNING",
    "FALLBACK_PROGRAMS_PER_SM",
    "Geometry",
    "geometry",
    "fitted_geometry",
    "resident_programs_per_sm",
    "tile_constexprs",
    "slice_args",
    "combine_tiles",
    "as_tncs",
    "contiguous_or_none",
]


# ----------------------------------------------------------------------------------------
# Device functions
# ----------------------------------------------------------------------------------------


@triton.jit
def program_slice(N, S, N_PER_PROG, S_PER_PROG, N_SPLITS):
    """The timestep and the (n, s) ranges of this program, and its partial index."""
    pid_tn = tl.program_id(1)
    pid_s = tl.program_id(2)
    t = pid_tn // N_SPLITS
    n_lo = (pid_tn % N_SPLITS) * N_PER_PROG
    n_hi = tl.minimum(n_lo + N_PER_PROG, N)
    s_lo = pid_s * S_PER_PROG
    s_hi = tl.minimum(s_lo + S_PER_PROG, S)
    part = pid_tn * tl.num_programs(2) + pid_s
    return t, n_lo, n_hi, s_lo, s_hi, part


@triton.jit
def tile_offsets(t, n0, s0, n_hi, s_hi, c, c_mask, N, C, S, BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr):
    """int64 offsets and mask of the [BLOCK_N, BLOCK_C, BLOCK_S] tile at (t, n0, :, s0)."""
    n = n0 + tl.arange(0, BLOCK_N)
    s = s0 + tl.arange(0, BLOCK_S)
    row = (t * N + n).to(tl.int64)
    offs = (row[:, None, None] * C + c[None, :, None]) * S + s[None, None, :]
    mask = (n < n_hi)[:, None, None] & c_mask[None, :, None] & (s < s_hi)[None, None, :]
    return offs, mask


@triton.jit
def channel_consts(
    mean_ptr, var_ptr, w_ptr, b_ptr, offs, mask, eps,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, ACC_DTYPE: tl.constexpr,
):
    """μ, rstd = 1/√(σ² + ε), γ, β of a block of channels, in the accumulation dtype.

    ``offs`` addresses the channels in all four tensors: ``c`` for ``[C]`` vectors (TEBN),
    ``t·C + c`` for row t of ``[T, C]`` ones (TAB). ``w_ptr``/``b_ptr`` may be None
    without HAS_WEIGHT/HAS_BIAS (γ = 1, β = 0).
    """
    mean = tl.load(mean_ptr + offs, mask=mask, other=0.0).to(ACC_DTYPE)
    var = tl.load(var_ptr + offs, mask=mask, other=1.0).to(ACC_DTYPE)
    if ACC_DTYPE == tl.float64:
        rstd = 1.0 / tl.sqrt(var + eps)  # fp64 sqrt and division are IEEE-rounded
    else:
        # round-to-nearest (fp32 tl.sqrt and / are approximate on GPUs); per channel, so free
        rstd = tl.div_rn(tl.full(var.shape, 1.0, ACC_DTYPE), tl.sqrt_rn(var + eps))
    if HAS_WEIGHT:
        gamma = tl.load(w_ptr + offs, mask=mask, other=0.0).to(ACC_DTYPE)
    else:
        gamma = tl.full(offs.shape, 1.0, ACC_DTYPE)
    if HAS_BIAS:
        beta = tl.load(b_ptr + offs, mask=mask, other=0.0).to(ACC_DTYPE)
    else:
        beta = tl.zeros(offs.shape, ACC_DTYPE)
    return mean, rstd, gamma, beta


@triton.jit
def chan_merge(count, mean, m2, count_b, mean_b, m2_b):
    """Chan et al.'s pairwise formula: the (count, mean, M2) of the union of two sets."""
    total = count + count_b
    delta = mean_b - mean
    # counts are whole numbers: max(total, 1) is total unless both sets are empty (a rank
    # with no batch in a synchronised reduce), where the union stays empty instead of 0/0
    frac = count_b / tl.maximum(total, 1.0)
    return total, mean + delta * frac, m2 + (m2_b + delta * delta * count * frac)


@triton.jit
def combine_partials(
    part_mean_ptr,  # [P, C]
    part_m2_ptr,  # [P, C]
    part_count_ptr,  # [P]
    p_lo, p_hi, c, c_mask, C,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, ACC_DTYPE: tl.constexpr,
):
    """(count, mean, M2) of partials p_lo..p_hi − 1 of a block of channels, BLOCK_P at a time.

    A chunk of partials is combined at once with the multi-way formula
    n = Σ n_p, μ = Σ n_p μ_p / n, M2 = Σ M2_p + Σ n_p (μ_p − μ)² (vectorised sums over a
    [BLOCK_P, BLOCK_C] tile); chunks merge in order with Chan's pairwise formula. Every
    sum has a fixed shape and order: deterministic. A partial may hold 0 elements (a rank
    with an empty batch, gathered by a synchronised reduce): it adds nothing.
    """
    count = tl.zeros((), ACC_DTYPE)
    mean = tl.zeros((BLOCK_C,), ACC_DTYPE)
    m2 = tl.zeros((BLOCK_C,), ACC_DTYPE)
    for p0 in range(p_lo, p_hi, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        p_mask = p < p_hi
        mask = p_mask[:, None] & c_mask[None, :]
        offs = p[:, None] * C + c[None, :]
        n_p = tl.load(part_count_ptr + p, mask=p_mask, other=0.0).to(ACC_DTYPE)
        mean_p = tl.load(part_mean_ptr + offs, mask=mask, other=0.0).to(ACC_DTYPE)
        m2_p = tl.load(part_m2_ptr + offs, mask=mask, other=0.0).to(ACC_DTYPE)
        count_b = tl.sum(n_p, axis=0)
        # Weighted mean of the deviations from the chunk's first partial mean: a plain
        # Σ n_p μ_p would lose the digits of a small spread around a large mean.
        ref = tl.load(part_mean_ptr + p0 * C + c, mask=c_mask, other=0.0).to(ACC_DTYPE)
        dev = tl.where(mask, mean_p - ref[None, :], 0.0)
        shift = tl.sum(n_p[:, None] * dev, axis=0) / tl.maximum(count_b, 1.0)  # 0 for a chunk of empty partials
        d = tl.where(mask, dev - shift[None, :], 0.0)  # μ_p − μ_b
        m2_b = tl.sum(m2_p, axis=0) + tl.sum(n_p[:, None] * d * d, axis=0)
        count, mean, m2 = chan_merge(count, mean, m2, count_b, ref + shift, m2_b)
    return count, mean, m2


@triton.jit
def stats_partial_kernel(
    x_ptr,  # [T, N, C, S] contiguous
    part_mean_ptr,  # [P, C] out: mean of each program's slice
    part_m2_ptr,  # [P, C] out: Σ (x − mean)² of each program's slice
    part_count_ptr,  # [P] out: elements per channel in each program's slice
    N, C, S, N_PER_PROG, S_PER_PROG, N_SPLITS,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, ACC_DTYPE: tl.constexpr,
):
    """Per-program (count, mean, M2) of its slice, merged tile by tile (Chan)."""
    t, n_lo, n_hi, s_lo, s_hi, part = program_slice(N, S, N_PER_PROG, S_PER_PROG, N_SPLITS)
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    count = tl.zeros((), ACC_DTYPE)
    mean = tl.zeros((BLOCK_C,), ACC_DTYPE)
    m2 = tl.zeros((BLOCK_C,), ACC_DTYPE)
    for n0 in range(n_lo, n_hi, BLOCK_N):
        for s0 in range(s_lo, s_hi, BLOCK_S):
            offs, mask = tile_offsets(t, n0, s0, n_hi, s_hi, c, c_mask, N, C, S, BLOCK_N, BLOCK_S)
            x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC_DTYPE)
            count_b = (tl.minimum(n_hi - n0, BLOCK_N) * tl.minimum(s_hi - s0, BLOCK_S)).to(ACC_DTYPE)
            mean_b = tl.sum(tl.sum(x, axis=2), axis=0) / count_b
            d = tl.where(mask, x - mean_b[None, :, None], 0.0)
            m2_b = tl.sum(tl.sum(d * d, axis=2), axis=0)
            count, mean, m2 = chan_merge(count, mean, m2, count_b, mean_b, m2_b)
    tl.store(part_mean_ptr + part * C + c, mean, mask=c_mask)
    tl.store(part_m2_ptr + part * C + c, m2, mask=c_mask)
    tl.store(part_count_ptr + part, count, mask=tl.program_id(0) == 0)


# ----------------------------------------------------------------------------------------
# Grid geometry
# ----------------------------------------------------------------------------------------

#: Test hook: force small tiles / many programs to exercise the tile loops and the
#: partial combination under the interpreter. None keeps the defaults.
TUNING: dict = {"tile_elems": None, "programs": None}

#: Programs per SM when the compiled kernel's resources cannot be read (see programs_per_sm).
FALLBACK_PROGRAMS_PER_SM = 8


class Geometry(NamedTuple):
    BLOCK_N: int
    BLOCK_C: int
    BLOCK_S: int
    n_per_prog: int
    s_per_prog: int
    n_splits: int
    s_splits: int
    c_blocks: int
    grid: tuple
    parts: int  # P = T · n_splits · s_splits: partials per channel
    num_warps: int


_DEVICE_PROPS: dict = {}


def device_props(device: torch.device):
    """``torch.cuda.get_device_properties``, cached."""
    if device not in _DEVICE_PROPS:
        _DEVICE_PROPS[device] = torch.cuda.get_device_properties(device)
    return _DEVICE_PROPS[device]


def tile_elems(interp: bool) -> int:
    """Elements per tile: large under the interpreter (which pays per tile), 2048 on a GPU.

    2048 elements on 8 warps is 8 a thread: at 4096 (16 a thread) the forward kernels
    spilled on sm_90 with bf16 inputs (triton 3.6, ``perf/compile_check.py``), and 16 warps
    did not cure it. (On 4 warps the backward reduction spilled up to 32 B.)
    """
    return TUNING["tile_elems"] or (1 << 16 if interp else 2048)


def geometry(
    T: int, N: int, C: int, S: int, device: torch.device, programs: Optional[int] = None,
    num_warps: Optional[int] = None,
) -> Geometry:
    """Tile sizes and the split of each (channel block, timestep) over about ``programs`` programs.

    ``programs`` is what fits on the device at once (:func:`fitted_geometry`); without it,
    one program under the interpreter (which pays per program) and
    FALLBACK_PROGRAMS_PER_SM per SM on a GPU. ``TUNING["programs"]`` overrides both.
    ``num_warps`` overrides the tile's default warp count (for a kernel that spills with it).
    """
    interp = device.type != "cuda"
    tile = tile_elems(interp)
    # Contiguous axis first: S when there is one, else the channel axis (S == 1).
    BLOCK_S = min(next_pow2(S), tile if interp else 1024)
    BLOCK_C = min(next_pow2(C), max(1, tile // BLOCK_S), 1 << 16 if interp else 64)
    BLOCK_N = min(next_pow2(N), max(1, tile // (BLOCK_S * BLOCK_C)))
    c_blocks = triton.cdiv(C, BLOCK_C)
    n_blocks = triton.cdiv(N, BLOCK_N)
    s_blocks = triton.cdiv(S, BLOCK_S)
    if TUNING["programs"] is not None:
        programs = TUNING["programs"]
    elif programs is None:
        programs = 1 if interp else FALLBACK_PROGRAMS_PER_SM * device_props(device).multi_processor_count
    # Split each (channel block, t) over enough programs to fill the device.
    want = max(1, triton.cdiv(programs, c_blocks * T))
    s_splits = min(s_blocks, want)
    n_splits = min(n_blocks, triton.cdiv(want, s_splits))
    s_per_prog = triton.cdiv(s_blocks, s_splits) * BLOCK_S
    n_per_prog = triton.cdiv(n_blocks, n_splits) * BLOCK_N
    s_splits = triton.cdiv(S, s_per_prog)  # no empty program
    n_splits = triton.cdiv(N, n_per_prog)
    elems = BLOCK_N * BLOCK_C * BLOCK_S
    if num_warps is None:
        num_warps = 8 if elems >= 2048 else 4
    return Geometry(
        BLOCK_N, BLOCK_C, BLOCK_S, n_per_prog, s_per_prog, n_splits, s_splits, c_blocks,
        (c_blocks, T * n_splits, s_splits), T * n_splits * s_splits, num_warps,
    )


def resident_programs_per_sm(
    n_regs: int, num_warps: int, shared_bytes: int, *, regs_per_sm: int = 65536, threads_per_sm: int = 2048,
    shared_per_sm: int = 228 * 1024, max_blocks_per_sm: int = 32, warp_size: int = 32,
) -> int:
    """How many programs of a compiled kernel an SM holds at once (its occupancy).

    Limited by threads, by registers (allocated per warp in units of 256) and by shared
    memory; the defaults are sm_80/sm_90's limits. Programs beyond this wait for a slot,
    so a grid of occupancy × SMs programs, each looping over its slice, fills the GPU in
    one wave.
    """
    by_threads = threads_per_sm // (num_warps * warp_size)
    regs_per_warp = triton.cdiv(n_regs * warp_size, 256) * 256
    by_regs = regs_per_sm // (regs_per_warp * num_warps) if n_regs > 0 else by_threads
    by_shared = shared_per_sm // shared_bytes if shared_bytes > 0 else max_blocks_per_sm
    return max(1, min(by_threads, by_regs, by_shared, max_blocks_per_sm))


#: Occupancy per (kernel, device, input dtype, constexprs); None when it could not be read.
PROGRAMS_PER_SM: dict = {}


def programs_per_sm(kernel, args_for, constexprs: dict, device: torch.device, dtype: torch.dtype) -> Optional[int]:
    """Occupancy of ``kernel`` compiled for these constexprs (cached), or None if unknown.

    On a cache miss, compiles without launching (``JITFunction.warmup`` on the arguments
    ``args_for()``) and reads the register count and shared memory of the compiled
    kernel. The key is the input dtype and the constexprs; it leaves out the other
    pointers' dtypes, which barely change the register count.
    """
    key = (kernel.fn.__name__, device, dtype, tuple(sorted((k, str(v)) for k, v in constexprs.items())))
    if key not in PROGRAMS_PER_SM:
        try:
            compiled = kernel.warmup(*args_for(), grid=(1,), **constexprs)
            compiled._init_handles()  # loads the binary: fills n_regs
            n_regs, shared = int(compiled.n_regs), int(compiled.metadata.shared)
        except Exception as err:  # a triton without these attributes: keep the fixed default
            warnings.warn(
                f"snnorm triton: cannot read the register count of {kernel.fn.__name__} ({err!r}); "
                f"sizing its grid at {FALLBACK_PROGRAMS_PER_SM} programs per SM",
                RuntimeWarning,
                stacklevel=3,
            )
            PROGRAMS_PER_SM[key] = None
        else:
            props = device_props(device)
            PROGRAMS_PER_SM[key] = resident_programs_per_sm(
                n_regs, constexprs["num_warps"], shared,
                regs_per_sm=getattr(props, "regs_per_multiprocessor", 65536),
                threads_per_sm=getattr(props, "max_threads_per_multi_processor", 2048),
                shared_per_sm=getattr(props, "shared_memory_per_multiprocessor", 228 * 1024),
                warp_size=getattr(props, "warp_size", 32),
            )
    return PROGRAMS_PER_SM[key]


def tile_constexprs(geo: Geometry) -> dict:
    """The tile constexprs and num_warps of a launch."""
    return dict(BLOCK_N=geo.BLOCK_N, BLOCK_C=geo.BLOCK_C, BLOCK_S=geo.BLOCK_S, num_warps=geo.num_warps)


def slice_args(geo: Geometry) -> tuple:
    """The kernels' (N_PER_PROG, S_PER_PROG, N_SPLITS) arguments."""
    return geo.n_per_prog, geo.s_per_prog, geo.n_splits


def fitted_geometry(
    kernel, T: int, N: int, C: int, S: int, device: torch.device, dtype: torch.dtype,
    args_for: Callable[[Geometry], tuple], constexprs: dict, num_warps: Optional[int] = None,
) -> Geometry:
    """The geometry for launching ``kernel``: as many programs as the GPU holds at once.

    ``args_for(geo)`` gives the kernel's arguments for a geometry (used to compile it once).
    Under the interpreter, or with ``TUNING["programs"]`` set, the plain geometry.
    """
    geo = geometry(T, N, C, S, device, num_warps=num_warps)
    if device.type != "cuda" or TUNING["programs"] is not None:
        return geo
    per_sm = programs_per_sm(kernel, lambda: args_for(geo), {**constexprs, **tile_constexprs(geo)}, device, dtype)
    if per_sm is None:
        return geo
    return geometry(T, N, C, S, device, programs=per_sm * device_props(device).multi_processor_count,
                    num_warps=num_warps)


def combine_tiles(P: int, C: int, interp: bool) -> tuple[int, int]:
    """(BLOCK_P, BLOCK_C) of a partials combine over P partials: a [BLOCK_P, BLOCK_C] tile per step."""
    block_c = min(next_pow2(C), 1 << 16 if interp else 16)
    block_p = min(next_pow2(P), max(2, tile_elems(interp) // block_c))
    return block_p, block_c


# ----------------------------------------------------------------------------------------
# Host helpers
# ----------------------------------------------------------------------------------------


def contiguous_or_none(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """``t.contiguous()``, or None for an absent tensor (a kernel's None pointer)."""
    return t.contiguous() if t is not None else None


def as_tncs(x: torch.Tensor) -> tuple[torch.Tensor, int, int, int, int]:
    """Contiguous [T, N, C, S] view of a [T, N, C, *spatial] tensor, and T, N, C, S."""
    T, N, C = x.shape[:3]
    S = math.prod(x.shape[3:])
    return x.contiguous().view(T, N, C, S), T, N, C, S


#: stats_partial_kernel's warps: on 8 warps a few sm_80 tiles ([1, 32, 64], [8, 4, 64]) spill
#: 8 B a thread; on 4 none of the compile check's configurations do
STATS_WARPS = 4


def launch_partial_stats(x4: torch.Tensor, T: int, N: int, C: int, S: int, acc: torch.dtype):
    """Per-(program slice, channel) partial statistics of ``x4`` [T, N, C, S]: (count, mean, M2)
    rows for every part of every step, combined afterwards in a fixed order. TEBN and TAB
    share it. Returns (part_mean [parts, C], part_m2 [parts, C], part_count [parts], geometry)."""

    def partials(geo):
        part_mean = torch.empty(geo.parts, C, dtype=acc, device=x4.device)
        part_m2 = torch.empty(geo.parts, C, dtype=acc, device=x4.device)
        part_count = torch.empty(geo.parts, dtype=acc, device=x4.device)
        return (x4, part_mean, part_m2, part_count, N, C, S, *slice_args(geo))

    flags = dict(ACC_DTYPE=acc_dtype(acc))
    geo = fitted_geometry(stats_partial_kernel, T, N, C, S, x4.device, x4.dtype, partials, flags, num_warps=STATS_WARPS)
    args = partials(geo)
    stats_partial_kernel[geo.grid](*args, **flags, **tile_constexprs(geo))
    return (*args[1:4], geo)
