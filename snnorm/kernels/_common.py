"""Host-side helpers shared by the Triton kernel files: device checks, canonical views, sizes,
the one warp rule (:class:`WarpRule` and its per-kernel settings) and the grids.

Kernels address ``[T, N, C, *spatial]`` tensors through a ``[T, N, C, S]`` view with the
spatial dims merged (:func:`as_ncs`) and pass every stride, so non-contiguous,
channels-last and expanded (stride-0) inputs are read in place without a copy; only
spatial dims that cannot merge (e.g. a transposed H, W) are copied. The statistics
pipeline and the fused norm → LIF kernels read the same strided ``[T, N, C, S]`` view
(:func:`as_tncs`, strides by :func:`tncs_strides`) and write their outputs in the input's
memory format (:func:`empty_tncs_like`).

Devices. Every launcher wears :func:`launcher`: its tensors on one device (ValueError
otherwise) and the launches, the occupancy probe and the current stream on that device
(``torch.cuda.device``), whichever device is current.

Grids stay within CUDA's limits (axis 0 < 2³¹, axes 1 and 2 ≤ 65,535) at any shape: LIF and
MPBN-LIF run P tiles × C channels as ``(P, C)``, or flat on axis 0 past 65,535 channels
(:func:`tiles_grid`, ``_device.tile_and_channel``), the fused
norm → LIF ``(C, B1, B2)`` (:func:`block_grid`). LIF and MPBN-LIF tile a channel's ``[N, S]``
per step (:func:`channel_tiling`, one channel per program). The statistics pipeline runs on a grid of ``[BLOCK_N, BLOCK_C,
BLOCK_S]`` tiles (:func:`geometry`): program axis 0 is a block of channels, axis 1 a
(timestep, slice of N) pair, axis 2 a slice of S; a program loops over its slice in tiles,
so the partials of timestep t are rows ``t·P/T .. (t+1)·P/T − 1`` of the ``[P, C]`` partial
tensors. On a GPU the slices are sized so that the grid is one wave: as many programs as
the SMs hold at once, read from the compiled kernel's register count and shared memory
(:func:`fitted_geometry`, :func:`resident_programs_per_sm`). Under the interpreter, one
program per (channel block, timestep). :data:`TUNING` is a test hook that forces small
tiles or many programs. The device side of the tiles is :mod:`snnorm.kernels._device`.
"""

from __future__ import annotations

import contextlib
import functools
import math
import warnings
from typing import Callable, NamedTuple, Optional, Union

import torch
import triton
import triton.language as tl

from ..params import op_schema_fields

__all__ = [
    "interpreter_active", "device_error", "check_device", "common_device", "device_guard", "launcher",
    "check_channel_args", "next_pow2", "acc_dtype", "acc_torch_dtype", "as_ncs", "needs_int64", "store_dtype",
    "LIF_WARPS", "PIPELINED_WARPS", "TILE_WARPS", "STATS_WARPS", "REDUCE_WARPS", "COEF_WARPS", "NORM_LIF_WARPS",
    "launch_options", "Tiling", "channel_tiling", "OpSignature", "op_signature", "WarpRule", "TUNING",
    "Geometry", "geometry", "fitted_geometry", "resident_programs_per_sm", "tile_constexprs", "slice_args",
    "combine_tiles", "as_tncs", "tncs_strides", "ncs_strides", "empty_tncs_like", "same_strides",
    "contiguous_or_none", "device_vector", "GRID_AXIS_MAX", "block_grid", "tiles_grid",
]


@triton.jit
def _probe_kernel(x_ptr):  # never launched: tells whether @triton.jit built interpreted kernels
    pass


def interpreter_active() -> bool:
    """True when this module's kernels were built by the Triton interpreter.

    The interpreter is chosen when ``triton`` decorates the kernels (import time), so
    setting ``TRITON_INTERPRET=1`` afterwards has no effect: this asks the kernels.
    """
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(_probe_kernel, InterpretedFunction)


def device_error(device_type: str, interpreting: bool) -> str | None:
    """Why a tensor on ``device_type`` cannot run the kernels, or None if it can."""
    if device_type == "cuda":
        return None
    if device_type == "cpu":
        if interpreting:
            return None
        return (
            "got a CPU tensor but the Triton interpreter is off: set TRITON_INTERPRET=1 "
            "before triton is first imported to run the kernels on CPU, or use a CUDA tensor"
        )
    return f"got a tensor on device {device_type!r}; the Triton kernels run on 'cuda' (or 'cpu' under TRITON_INTERPRET=1)"


def _tensors(values):
    """The tensors among ``values``, looking one level into lists and tuples (BNTT's per-step buffers)."""
    for v in values:
        if isinstance(v, torch.Tensor):
            yield v
        elif isinstance(v, (list, tuple)):
            yield from (t for t in v if isinstance(t, torch.Tensor))


def common_device(op: str, *values) -> Optional[torch.device]:
    """The one device of the tensors among ``values`` (None without tensors).

    Raises ValueError naming the devices when they differ: a kernel launched on one device
    with a pointer into another reads garbage (or, with peer access, races across streams)."""
    devices = {t.device for t in _tensors(values)}
    if len(devices) > 1:
        raise ValueError(
            f"snnorm triton op {op}: expected every tensor on one device, got tensors on "
            f"{', '.join(sorted(str(d) for d in devices))}; move them to the input's device"
        )
    return next(iter(devices), None)


def check_device(op: str, *tensors) -> None:
    """Refuse tensors the kernels cannot run on: RuntimeError for a device type without
    kernels (a CPU tensor with the interpreter off, ``mps``, ...), ValueError for tensors on
    different devices (:func:`common_device`). None and non-tensor values are skipped."""
    interpreting = interpreter_active()
    for t in _tensors(tensors):
        reason = device_error(t.device.type, interpreting)
        if reason is not None:
            raise RuntimeError(f"snnorm triton op {op}: {reason}")
    common_device(op, *tensors)


def device_guard(device: Optional[torch.device]):
    """``torch.cuda.device(device)`` for a CUDA device, else a no-op context.

    Triton launches on the *current* CUDA device and its current stream, so a launch for
    tensors on ``cuda:1`` while ``cuda:0`` is current (a ``torchrun`` script that never calls
    ``torch.cuda.set_device``) must enter their device first."""
    if device is not None and device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def launcher(fn: Callable) -> Callable:
    """Decorate a launcher: every tensor argument on one device (ValueError otherwise, see
    :func:`common_device`), and the launcher runs under that device (:func:`device_guard`),
    so its launches, its occupancy probe and the current stream are the tensors' own. The one
    place the kernels enter a device: every ``launch_*`` function of ``kernels/`` wears it."""

    @functools.wraps(fn)
    def run(*args, **kwargs):
        with device_guard(common_device(fn.__name__, *args, *kwargs.values())):
            return fn(*args, **kwargs)

    run.enters_device = True
    return run


#: a per-channel argument for :func:`check_channel_args`: (tensor or None, expected shape) or
#: (tensor or None, expected shape, required)
ChannelArg = tuple


def check_channel_args(op: str, device: torch.device, **args: ChannelArg) -> None:
    """Check a launcher's per-channel arguments before it allocates or writes anything.

    Each keyword is an argument's name and ``(tensor, shape)`` or ``(tensor, shape, required)``:
    a tensor must have exactly ``shape`` (``[C]``, ``[T, C]`` or ``[T]`` as the op expects), live
    on ``device`` (the input's) and be floating point; None is an absent argument, refused
    only when ``required``. Raises ValueError naming the argument, the expected and the
    received shape (or device, or dtype): a kernel would otherwise read past a short vector
    or silently use the first C values of a long one.
    """
    for name, spec in args.items():
        t, shape = spec[0], tuple(int(s) for s in spec[1])
        required = len(spec) > 2 and spec[2]
        if t is None:
            if required:
                raise ValueError(f"{op}: {name} is required, expected a tensor of shape {list(shape)}")
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a tensor of shape {list(shape)}, got {type(t).__name__}")
        if tuple(t.shape) != shape:
            raise ValueError(f"{op}: {name} must have shape {list(shape)}, got {list(t.shape)}")
        if t.device != device:
            raise ValueError(f"{op}: {name} is on {t.device}, expected the input's device {device}")
        if not t.dtype.is_floating_point:
            raise ValueError(f"{op}: {name} must be floating point, got {t.dtype}")


def next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def acc_dtype(dtype: torch.dtype):
    """The compute dtype inside kernels: fp64 for fp64 tensors, fp32 otherwise."""
    return tl.float64 if dtype == torch.float64 else tl.float32


#: what synchronised launchers hand the cross-rank collectives (and keep between launches):
#: float64, so counts are exact and fp32 statistics and sums convert without rounding
SYNC_DTYPE = torch.float64


def acc_torch_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def as_ncs(t: torch.Tensor, lead: int) -> torch.Tensor:
    """``[*lead dims, N, C, *spatial]`` as ``[*lead, N, C, S]`` with the spatial dims merged into S.

    A view whenever the spatial dims merge (contiguous, channels-last, sliced or expanded
    inputs all do), so the kernels read it in place and a unit stride along S vectorises;
    a copy only for layouts whose spatial dims cannot merge (e.g. a transposed H, W).
    """
    shape = (*t.shape[: lead + 2], math.prod(t.shape[lead + 2 :]))
    try:
        return t.view(shape)
    except RuntimeError:
        return t.reshape(shape)


def needs_int64(*tensors) -> bool:
    """True when some element offset of a tensor reaches 2**31 (int32 offsets would overflow)."""
    for t in tensors:
        if t is not None and t.numel():
            if sum((size - 1) * abs(stride) for size, stride in zip(t.shape, t.stride())) >= 2**31 - 1:
                return True
    return False


def store_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype kernels write outputs in. Under the Triton interpreter bf16 stores are
    emulated with truncation (and bool → bf16 casts fail), so there the kernels write
    fp32 and torch rounds to bf16 (round-to-nearest-even, as a GPU store does)."""
    if dtype == torch.bfloat16 and interpreter_active():
        return torch.float32
    return dtype


class WarpRule(NamedTuple):
    """The one warp rule: ``num_warps = clamp(block // (32·per_thread), lo, hi)`` for a tile of
    ``block`` elements. Each kernel family names its setting below (and why), so every
    launch takes its warps from this table."""

    per_thread: int  # elements a thread holds
    lo: int  # fewest warps
    hi: int  # most warps

    def __call__(self, block: int) -> int:
        return max(self.lo, min(self.hi, int(block) // (32 * self.per_thread)))


#: LIF and resident MPBN-LIF tiles: 8 fp32 elements a thread, 1 to 8 warps
LIF_WARPS = WarpRule(8, 1, 8)
#: pipelined MPBN-LIF tiles: 4 elements a thread, 1 to 16 warps. At 8 a thread ptxas spilled
#: 4–8 B on sm_80/sm_90: the backward at tile 512 on 2 warps with fp16/bf16 ∂x, both kernels
#: at tile 2048 as [128, 16] on 8 warps (``perf/compile_check.py``); the tile stays the same
PIPELINED_WARPS = WarpRule(4, 1, 16)
#: the statistics pipeline's elementwise and reducing tiles: 8 warps from 2048 elements (8 a
#: thread), else 4. At 4096 elements (16 a thread) the forward kernels spilled on sm_90 with
#: bf16 inputs (triton 3.6) and 16 warps did not cure it; on 4 warps the backward reduction
#: spilled up to 32 B
TILE_WARPS = WarpRule(8, 4, 8)
#: the pipeline's partial-statistics kernel: 4 warps. On 8 a few sm_80 tiles ([1, 32, 64],
#: [8, 4, 64]) spill 8 B a thread; on 4 none of the compile check's configurations do
STATS_WARPS = WarpRule(1, 4, 4)
#: the pipeline's statistics reduce (one program per channel block): 4 warps
REDUCE_WARPS = WarpRule(1, 4, 4)
#: the pipeline's backward coefficient kernel: its work is O(T·C·partials), so one warp costs
#: nothing, and at 2–8 warps ptxas of triton 3.6 spilled 8–12 B in the PREFIX configurations
COEF_WARPS = WarpRule(1, 1, 1)
#: the fused norm → LIF kernels: 2 warps for their GPU block of 128 elements (2 a thread, so
#: with SEG = 16 the two [SEG, BLOCK_M] register tiles hold 32 values a thread each; ptxas
#: spilled 8–24 B at 1 a thread on 4 and 8 warps and at 4 a thread on 8 warps)
NORM_LIF_WARPS = WarpRule(1, 2, 2)


#: an SM's register file (sm_80, sm_90): 64 K 32-bit registers
REGISTERS_PER_SM = 65536


def launch_options(num_warps: int, acc: torch.dtype, budget: bool = False) -> dict:
    """The compile options of a launch: its warps, fp-fusion off (the forward and the
    backward's recompute round alike on every triton; fusion was on by default in 3.6/3.9),
    and, for fp64 (``acc``, the compute dtype) or with ``budget``, one program's register
    budget: ``maxnreg`` = the SM's register file over the program's threads (at most 255).

    Left to itself ptxas aims at an occupancy of its own choosing, and triton 3.6's (CUDA
    12.8) spilled 4–28 B a thread in some kernels doing so: around the subroutine calls of
    fp64 division and square root, and in a few fp32 ones. Told a budget, it did not spill
    (even at the register count it had picked), but it then takes up to the whole budget,
    which costs programs per SM. So the budget goes to fp64 launches (the reference precision,
    two registers a value) and to the launches whose launcher says why (``budget``)."""
    options = dict(num_warps=num_warps, enable_fp_fusion=False)
    if budget or acc == torch.float64:
        options["maxnreg"] = min(255, REGISTERS_PER_SM // (32 * num_warps))
    return options


class Tiling(NamedTuple):
    """How a channel's ``[N, S]`` elements split into ``[BLOCK_N, BLOCK_S]`` tiles (one per program)."""

    BLOCK_N: int
    BLOCK_S: int
    S_TILES: int  # tiles along S
    P: int  # tiles (programs) per channel

    @property
    def block(self) -> int:
        return self.BLOCK_N * self.BLOCK_S


def _block_s(S: int, block: int) -> int:
    """The widest power-of-two tile width ≤ ``block`` that pads S by at most 1/8."""
    bs = min(next_pow2(S), block)
    while bs > 16 and triton.cdiv(S, bs) * bs - S > S // 8:
        bs //= 2
    return bs


def channel_tiling(N: int, S: int, block: int) -> Tiling:
    """Tiles of at most ``block`` elements (a power of two) over a channel's ``[N, S]``."""
    bs = _block_s(S, block)
    bn = min(next_pow2(N), max(1, block // bs))
    s_tiles = triton.cdiv(S, bs)
    return Tiling(bn, bs, s_tiles, triton.cdiv(N, bn) * s_tiles)


class OpSignature(NamedTuple):
    """A custom op's argument list, written once: its schema and its argument count."""

    schema: str
    n_args: int

    def grads(self, *grads) -> tuple:
        """An autograd backward's return: ``grads`` for the leading (tensor) arguments, then None
        for every argument after them (the count comes from the schema, not from the caller)."""
        if len(grads) > self.n_args:
            raise ValueError(f"{len(grads)} gradients for an op of {self.n_args} arguments ({self.schema})")
        return tuple(grads) + (None,) * (self.n_args - len(grads))


def op_signature(*parts: Union[str, type], returns: str) -> OpSignature:
    """Join ``parts`` — schema fragments (``"Tensor x, Tensor? mu"``) and plain-value bundles of
    :mod:`snnorm.params` (their fields, in order) — into a custom op's schema."""
    fragments = [op_schema_fields(p) if isinstance(p, type) else p for p in parts]
    args = [a for fragment in fragments for a in fragment.split(",") if a.strip()]
    return OpSignature(f"({', '.join(a.strip() for a in args)}) -> {returns}", len(args))


# ----------------------------------------------------------------------------------------
# The statistics pipeline's grid: one wave of programs over [BLOCK_N, BLOCK_C, BLOCK_S] tiles
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
    warps: WarpRule = TILE_WARPS,
) -> Geometry:
    """Tile sizes and the split of each (channel block, timestep) over about ``programs`` programs.

    ``programs`` is what fits on the device at once (:func:`fitted_geometry`); without it,
    one program under the interpreter (which pays per program) and
    FALLBACK_PROGRAMS_PER_SM per SM on a GPU. ``TUNING["programs"]`` overrides both.
    ``warps``: the kernel's warp setting (:data:`TILE_WARPS` unless it spills with it).
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
    num_warps = warps(BLOCK_N * BLOCK_C * BLOCK_S)
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


def tile_constexprs(geo: Geometry, acc: torch.dtype, budget: bool = False) -> dict:
    """The tile constexprs and the launch options (:func:`launch_options`) of a launch."""
    return dict(BLOCK_N=geo.BLOCK_N, BLOCK_C=geo.BLOCK_C, BLOCK_S=geo.BLOCK_S, **launch_options(geo.num_warps, acc, budget))


def slice_args(geo: Geometry) -> tuple:
    """The kernels' (N_PER_PROG, S_PER_PROG, N_SPLITS) arguments."""
    return geo.n_per_prog, geo.s_per_prog, geo.n_splits


def fitted_geometry(
    kernel, T: int, N: int, C: int, S: int, device: torch.device, dtype: torch.dtype,
    args_for: Callable[[Geometry], tuple], constexprs: dict, warps: WarpRule = TILE_WARPS, budget: bool = False,
) -> Geometry:
    """The geometry for launching ``kernel``: as many programs as the GPU holds at once.

    ``args_for(geo)`` gives the kernel's arguments for a geometry (used to compile it once).
    Under the interpreter, or with ``TUNING["programs"]`` set, the plain geometry. ``budget``: the
    launch declares its register budget (:func:`launch_options`).
    """
    geo = geometry(T, N, C, S, device, warps=warps)
    if device.type != "cuda" or TUNING["programs"] is not None:
        return geo
    options = tile_constexprs(geo, acc_torch_dtype(dtype), budget)
    per_sm = programs_per_sm(kernel, lambda: args_for(geo), {**constexprs, **options}, device, dtype)
    if per_sm is None:
        return geo
    return geometry(T, N, C, S, device, programs=per_sm * device_props(device).multi_processor_count,
                    warps=warps)


#: the most programs CUDA launches along grid axes 1 and 2 (axis 0: 2³¹ − 1)
GRID_AXIS_MAX = 65535


def tiles_grid(P: int, C: int) -> tuple[tuple[int, ...], bool]:
    """(grid, FLAT_GRID) of P tiles × C channels (``_device.tile_and_channel``): ``(P, C)``
    while C fits axis 1, else ``(P·C,)`` on axis 0 (the flattened decode costs registers,
    so the common case keeps the 2-D grid)."""
    flat = C > GRID_AXIS_MAX
    return ((P * C,) if flat else (P, C)), flat


def block_grid(C: int, blocks: int) -> tuple[int, int, int]:
    """Grid ``(C, B1, B2)`` for C channels × ``blocks`` blocks, every axis within CUDA's limits:
    B2 = ⌈blocks / 65,535⌉, B1 = ⌈blocks / B2⌉ (B1·B2 ≥ blocks; a kernel masks the rest,
    ``_device.block_index``). One block axis (B2 = 1) up to 65,535 blocks."""
    b2 = triton.cdiv(blocks, GRID_AXIS_MAX)
    return (C, triton.cdiv(blocks, b2), b2)


def combine_tiles(P: int, C: int, interp: bool) -> tuple[int, int]:
    """(BLOCK_P, BLOCK_C) of a partials combine over P partials: a [BLOCK_P, BLOCK_C] tile per step."""
    block_c = min(next_pow2(C), 1 << 16 if interp else 16)
    block_p = min(next_pow2(P), max(2, tile_elems(interp) // block_c))
    return block_p, block_c


def device_vector(values, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``torch.tensor(values, dtype, device)`` without a host-to-device copy: one fill with the
    most common value, then one fill per element that differs (per-step momenta: usually one
    value, at most T). A fill takes its value as a kernel argument, so this is safe inside a
    CUDA-graph capture, where ``torch.tensor(list, device="cuda")`` is a synchronous copy."""
    values = [float(v) for v in values]
    common = max(set(values), key=values.count) if values else 0.0
    out = torch.full((len(values),), common, dtype=dtype, device=device)
    for i, v in enumerate(values):
        if v != common:
            out[i].fill_(v)
    return out


def contiguous_or_none(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """``t.contiguous()``, or None for an absent tensor (a kernel's None pointer)."""
    return t.contiguous() if t is not None else None


def as_tncs(x: torch.Tensor) -> tuple[torch.Tensor, int, int, int, int]:
    """``[T, N, C, S]`` view of a ``[T, N, C, *spatial]`` tensor (:func:`as_ncs`), and T, N, C, S.

    Strided: contiguous, channels-last (a ``[T·N, C, H, W]`` NHWC conv output viewed
    ``[T, N, C, H, W]``) and token-major transposed views (``[T, B, L, D]`` seen as
    ``[T, B, D, L]``: C innermost) are read in place through their strides (:func:`tncs_strides`);
    only spatial dims that cannot merge are copied (into a contiguous tensor)."""
    T, N, C = x.shape[:3]
    x4 = as_ncs(x, 1)
    return x4, T, N, C, x4.shape[3]


@contextlib.contextmanager
def poisoned_allocations():
    """Debug only: every buffer a launcher allocates starts poisoned, so an element that no
    kernel writes shows up (on a GPU, ``torch.empty`` hands back recycled memory that may
    look plausible; under the interpreter it is often zeros).

    While the context is open, ``torch.empty``, ``torch.empty_like``, ``torch.empty_strided``
    and ``Tensor.new_empty`` are patched, process-wide, and fill what they return with NaN
    (floating and complex dtypes), the dtype's minimum (signed integers), its maximum
    (unsigned) or True (bool) — but only inside a launcher's call (its :func:`launcher`
    wrapper, entered through :func:`device_guard`, which is swapped for a counting one), so
    the op layer's and torch's own allocations are untouched. Re-entrant; the patches go when
    the outermost context exits. A fill is one extra write of every buffer: never in
    production code. ``snnorm.kernels.api`` exports it and opens it for the whole process
    when ``SNNORM_POISON=1`` is set at import.
    """
    import threading

    # ``state["fills"]`` counts the buffers poisoned so far (a test reads that the switch engaged)
    state = poisoned_allocations.__dict__.setdefault(
        "state", {"users": 0, "saved": None, "local": threading.local(), "fills": 0})

    def fill(t: torch.Tensor) -> torch.Tensor:
        if not getattr(state["local"], "depth", 0) or t.numel() == 0 or t.device.type == "meta":
            return t
        state["fills"] += 1
        if t.dtype.is_floating_point or t.dtype.is_complex:
            value = float("nan")
        elif t.dtype == torch.bool:
            value = True
        else:
            info = torch.iinfo(t.dtype)
            value = info.min if info.min < 0 else info.max
        with torch.no_grad():
            t.fill_(value)
        return t

    def poisoning(alloc):
        @functools.wraps(alloc)
        def poisoned(*args, **kwargs):
            return fill(alloc(*args, **kwargs))

        return poisoned

    @contextlib.contextmanager
    def counting_guard(device):
        local = state["local"]
        local.depth = getattr(local, "depth", 0) + 1
        try:
            with state["saved"]["device_guard"](device):
                yield
        finally:
            local.depth -= 1

    if state["users"] == 0:
        state["saved"] = {"empty": torch.empty, "empty_like": torch.empty_like, "empty_strided": torch.empty_strided,
                          "new_empty": torch.Tensor.new_empty, "device_guard": globals()["device_guard"]}
        for name in ("empty", "empty_like", "empty_strided"):
            setattr(torch, name, poisoning(state["saved"][name]))
        torch.Tensor.new_empty = poisoning(state["saved"]["new_empty"])
        globals()["device_guard"] = counting_guard
    state["users"] += 1
    try:
        yield
    finally:
        state["users"] -= 1
        if state["users"] == 0:
            saved = state["saved"]
            for name in ("empty", "empty_like", "empty_strided"):
                setattr(torch, name, saved[name])
            torch.Tensor.new_empty = saved["new_empty"]
            globals()["device_guard"] = saved["device_guard"]


def tncs_strides(t4: Optional[torch.Tensor]) -> tuple[int, int, int, int]:
    """The (step, n, c, s) strides of a ``[T, N, C, S]`` view in elements; (0, 0, 0, 0) for None
    (an absent tensor's unused stride arguments)."""
    return tuple(t4.stride()) if t4 is not None else (0, 0, 0, 0)


def ncs_strides(t3: Optional[torch.Tensor]) -> tuple[int, int, int]:
    """The (n, c, s) strides of a ``[N, C, S]`` membrane view; (0, 0, 0) for None."""
    return tuple(t3.stride()) if t3 is not None else (0, 0, 0)


def empty_tncs_like(x: torch.Tensor, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """An output for the ``[T, N, C, *spatial]`` input ``x`` in x's memory format, as torch's
    BatchNorm allocates one: ``torch.empty_like(x)`` (x's own strides when x is dense and
    non-overlapping: channels-last and transposed views stay so), or contiguous when those
    strides' spatial dims would not merge into one S (the input was copied too, :func:`as_tncs`).

    A pure function of x's shape and strides, so a fake (meta) kernel that calls it gives the
    real output's strides."""
    out = torch.empty_like(x, dtype=dtype if dtype is not None else x.dtype)
    if x.dim() > 3:
        try:
            out.view(*x.shape[:3], math.prod(x.shape[3:]))
        except RuntimeError:
            out = torch.empty(x.shape, dtype=out.dtype, device=x.device)
    return out


def same_strides(*views: Optional[torch.Tensor]) -> bool:
    """True when every given view has the first one's strides: the kernels then compute one
    set of offsets for all of them (their SAME_LAYOUT constexpr), as for contiguous tensors."""
    present = [v for v in views if v is not None]
    return all(v.stride() == present[0].stride() for v in present[1:])
