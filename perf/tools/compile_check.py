"""Ahead-of-time compile check of every Triton kernel configuration snnorm launches (no GPU).

1. **Capture.** The public ops of the triton backend (``snnorm.backends.get_ops("triton")``:
   lif, mpbn_lif, mpbn_lif_folded, tebn, tab, batch_norm_seq, bntt, norm_lif — forward and backward through
   autograd) run on a grid of realistic shapes, dtypes and mode flags, on *meta* tensors that report device
   ``cuda`` (so every launcher takes its GPU path: GPU tiling, bf16 stores, SM count of an
   H100). ``JITFunction.run`` — the JIT's launch/compile step — is replaced by a recorder:
   the JIT's own binder gives the real signature, constexprs, divisibility specialisation,
   num_warps and grid of each launch. Nothing here names a kernel: whatever the launchers
   launch is checked, so the check follows every launcher change by itself.
2. **Compile** each distinct configuration with ``triton.compile(ASTSource(...),
   target=GPUTarget("cuda", cc, 32))`` for sm_90 and sm_80 and run the bundled ``ptxas -v``
   on the PTX: registers, spill stores/loads (bytes), shared memory. A configuration that
   fails to compile is a failure. Results are cached per (kernel source hash, configuration,
   target, triton version) in ``$SNNORM_COMPILE_CACHE`` (default ~/.cache/snnorm-compile-check).
3. **Scan** the PTX for approximate arithmetic (:func:`approximate_ops`: ``div.approx``,
   ``div.full``, ``rcp.approx``, ``sqrt.approx``, ``rsqrt.approx``; the ``approx_ops`` column,
   every kernel). In a kernel that decides or recomputes spikes (:data:`SPIKE_MODULES`: LIF,
   MPBN-LIF, fused norm → LIF, forward and backward; and :data:`STATISTICS_KERNELS`, the
   statistics pipeline's partials, reduce and apply, whose μ, σ², rstd decide the spikes of
   a norm in front of a LIF) any of them is a failure: a membrane
   within an ulp of θ would fire on the GPU and not in torch, or in the forward and not in
   the backward's recompute. The rule is the whole kernel, not only the compare: a division's
   result reaches the compare through h, the statistics, rstd or θ′. One exception: the
   sigmoid and atan surrogate gradients divide with a plain ``/`` (no spike depends on a
   gradient; a correctly rounded one made the fused backward spill). So a backward kernel
   launched with such a surrogate is compiled a second time (sm_90) with the division-free
   piecewise-quadratic one (:data:`DIVISION_FREE_SURROGATE`), and that PTX must hold none:
   everything but the surrogate is proven rounded correctly. ``ex2.approx`` / ``lg2.approx``
   (tl.exp in the surrogates) are allowed: no spike depends on them.

Usage::

    python -m perf.compile_check [--grid ci|wide|full] [--out perf/results/compile] [--jobs 2] [--summary-md FILE]

The default grid is small (CI); ``--grid wide`` adds a tiny and a large resident shape;
``--full`` (``--grid full``) is the issue's grid (T ∈ {1, 4, 8}, N ∈ {1, 32,
128}, C ∈ {3, 64, 256, 512}, spatial none/1×1/7×7/8×8/32×32/56×56, fp32/fp16/bf16, every
mode). The Triton interpreter must be off (``TRITON_INTERPRET`` unset) — the CLI re-runs
itself without it. :func:`spilling` lists the configurations that spill (for a "no spills" test).

Limits: the launchers are told they run on an H100 (132 SMs) for both targets, so an A100's
grid sizes (and any tile choice a launcher derives from the SM count) are not reproduced; an
``@triton.autotune`` kernel would need its configs enumerated here (the autotuner times
candidates on a GPU) — snnorm has none today.
"""

from __future__ import annotations

import argparse
import concurrent.futures as futures
import contextlib
import csv
import hashlib
import itertools
import json
import os
import re
import subprocess
import sys
import types
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TARGETS = (90, 80)
#: SMs of the GPU the launchers are told they run on (H100/H200; the GPU machines)
SM_COUNT = 132
CSV_COLUMNS = ("kernel", "target", "config", "num_warps", "registers", "spill_stores", "spill_loads",
               "shared_bytes", "programs", "approx_ops", "status", "error")
#: launch options besides num_warps / num_stages that change the compiled code (the launchers
#: pin fp-fusion off and the register budget, ``kernels._common.launch_options``: compiled as
#: launched, the PTX scanned and the registers counted are those that run)
COMPILE_OPTIONS = ("enable_fp_fusion", "maxnreg")
#: the kernels' SURROGATE constant of a surrogate with no division (piecewise quadratic,
#: snnorm.kernels._device.SURROGATE_PIECEWISE_QUADRATIC), and those that divide (sigmoid, atan)
DIVISION_FREE_SURROGATE = 2
DIVIDING_SURROGATES = (0, 1)
#: modules whose kernels decide or recompute spikes: no approximate division or square root
SPIKE_MODULES = ("snnorm.kernels.lif", "snnorm.kernels.mpbn_lif_train", "snnorm.kernels.norm_lif",
                 "snnorm.kernels.row_norm_lif")
#: the statistics pipeline's kernels on the path to μ, σ², rstd and the normalised value
#: (partials, reduce with the running statistics, apply): a BN/TEBN/TAB in front of a LIF
#: decides its spikes with them, so the same rule. Its backward kernels are gradient only.
STATISTICS_KERNELS = tuple(f"snnorm.kernels.bn_pipeline._kernels:{name}"
                           for name in ("stats_partial_kernel", "_stats_reduce_kernel", "_apply_kernel"))
#: PTX instructions that are not correctly rounded (any type suffix: .f32, .ftz.f32, .f64, ...).
#: ``div.full.f32`` is what an fp32 ``/`` lowers to on NVIDIA (≤ 2 ulp); ``div.rn`` / ``sqrt.rn``
#: (tl.div_rn, tl.sqrt_rn, fp64 ``/`` and tl.sqrt) are IEEE round-to-nearest
_APPROX_RE = re.compile(r"(?<![\w.])((?:div\.approx|div\.full|rcp\.approx|sqrt\.approx|rsqrt\.approx)(?:\.\w+)*)")


# ------------------------------------------------------------------------------------------
# capture
# ------------------------------------------------------------------------------------------


@dataclass
class Launch:
    """One kernel launch as the JIT's binder saw it."""

    kernel: str  # module:qualname
    source_hash: str  # the JITFunction's cache key (its source and every callee's)
    signature: dict  # parameter -> type string ("*fp32", "i32", "constexpr", ...)
    constexprs: dict  # parameter -> value (constexpr parameters and value-specialised ints)
    attrs: dict  # parameter -> specialisation string ("D": divisible by 16)
    num_warps: int
    num_stages: int
    programs: int
    scenarios: list = field(default_factory=list)  # the first few grid scenarios that launched it
    options: dict = field(default_factory=dict)  # other compile options the launch passed (enable_fp_fusion)

    def config_key(self) -> str:
        payload = json.dumps([self.kernel, self.source_hash, self.signature, self.constexprs, self.attrs,
                              self.num_warps, self.num_stages] + ([self.options] if self.options else []),
                             sort_keys=True, default=str)
        return hashlib.sha1(payload.encode()).hexdigest()[:16]

    def describe(self) -> str:
        consts = ",".join(f"{k}={v}" for k, v in sorted(self.constexprs.items()) if k[:1].isupper())
        ptrs = ",".join(f"{k}:{t[1:]}" for k, t in self.signature.items() if t.startswith("*"))
        aligned = ",".join(k for k, a in self.attrs.items() if a)
        return f"{consts} | {ptrs} | aligned:{aligned}"


class _PointerArg:
    """What the binder needs of a tensor: dtype and an address (a 256-byte-aligned base,
    as the caching allocator gives, plus the view's offset — so views are specialised as on a GPU)."""

    def __init__(self, t):
        self.dtype = t.dtype
        self._ptr = (1 << 20) + t.storage_offset() * t.element_size()

    def data_ptr(self):
        return self._ptr


_POSING_CLASSES: dict = {}


def _posing_class(index: int):
    """The meta-tensor subclass that reports ``cuda:<index>`` as its device (one per index)."""
    import torch

    if not _POSING_CLASSES:
        class PosingMeta(torch.Tensor):
            index = 0

            @property
            def device(self):
                return torch.device("cuda", self.index)

        _POSING_CLASSES[None] = PosingMeta
    if index not in _POSING_CLASSES:
        _POSING_CLASSES[index] = type(f"CudaMeta{index}", (_POSING_CLASSES[None],), {"index": index})
    return _POSING_CLASSES[index]


def posing_as_cuda(index: int = 0):
    """``(make, enter)`` for meta tensors that say they live on ``cuda:<index>``.

    ``make(shape, dtype, requires_grad=False, strides=None, index=None)`` builds one (``index``
    overrides the device index); ``enter()`` is a context in which factories asked for cuda
    make such tensors and snnorm's custom ops run their real implementation (the launchers)
    on them, while every other op's meta kernel sees plain meta tensors. No GPU, no memory."""
    import torch
    from torch._library.custom_ops import OPDEFS
    from torch.overrides import TorchFunctionMode
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_map

    base = _posing_class(None)

    def wrap(t, at=None):
        if type(t) is torch.Tensor and t.device.type == "meta":
            return t.as_subclass(_posing_class(index if at is None else at))
        return t

    def unwrap(t):
        return t.as_subclass(torch.Tensor) if isinstance(t, base) else t

    def to_meta_device(kwargs):
        dev = kwargs.get("device")
        if dev is not None and torch.device(dev).type == "cuda":
            kwargs["device"] = torch.device("meta")
        return kwargs

    class Factories(TorchFunctionMode):
        def __torch_function__(self, func, types_, args=(), kwargs=None):
            return tree_map(wrap, func(*args, **to_meta_device(dict(kwargs or {}))))

    class Dispatch(TorchDispatchMode):
        def __torch_dispatch__(self, func, types_, args=(), kwargs=None):
            kwargs = to_meta_device(dict(kwargs or {}))
            opdef = OPDEFS.get(func._schema.name) if func.namespace == "snnorm" else None
            if opdef is not None:  # a snnorm custom op: run its real implementation (the launcher)
                with Factories(), Dispatch():
                    out = opdef._init_fn(*tree_map(wrap, args), **tree_map(wrap, kwargs))
            else:  # meta kernels must see the true device
                out = func(*tree_map(unwrap, args), **tree_map(unwrap, kwargs))
            return tree_map(wrap, out)

    @contextlib.contextmanager
    def enter():
        with Factories(), Dispatch():
            yield

    def make(shape, dtype, requires_grad=False, strides=None, index=None):
        if strides is None:
            t = torch.empty(shape, dtype=dtype, device="meta")
        else:
            t = torch.empty_strided(shape, strides, dtype=dtype, device="meta")
        return wrap(t, index).requires_grad_(requires_grad)

    return make, enter


@contextlib.contextmanager
def _device_lie(sm_count: int):
    """Meta tensors that say they live on ``cuda``, a CUDA device with ``sm_count`` SMs, and no
    device to enter (the launchers' guard): yields ``posing_as_cuda``'s ``make``."""
    import torch

    make, enter = posing_as_cuda(0)
    props = types.SimpleNamespace(multi_processor_count=sm_count, major=9, minor=0, name="compile-check",
                                  total_memory=80 << 30, max_shared_memory_per_block_optin=227 << 10)
    saved = (torch.cuda.get_device_properties, getattr(torch.cuda._tls, "is_initializing", None), torch.cuda.device)
    torch.cuda.get_device_properties = lambda device=None: props
    torch.cuda.device = lambda device: contextlib.nullcontext()  # the launchers' device guard: no GPU to enter
    torch.cuda._tls.is_initializing = True  # a factory asked for cuda must not initialise CUDA
    try:
        with enter():
            yield make
    finally:
        torch.cuda.get_device_properties = saved[0]
        torch.cuda.device = saved[2]
        if saved[1] is None:
            del torch.cuda._tls.is_initializing


@contextlib.contextmanager
def _recording(launches: dict, scenario: list):
    """Replace ``JITFunction.run`` with a recorder (the JIT's binder, no compile, no launch)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime import jit

    backend = make_backend(GPUTarget("cuda", 90, 32))
    binders = {}
    original = jit.JITFunction.run

    def record(self, *args, grid, warmup, **kwargs):
        binder = binders.get(id(self))
        if binder is None:
            binder = binders[id(self)] = jit.create_function_from_signature(self.signature, self.params, backend)
        args = [_PointerArg(a) if hasattr(a, "data_ptr") and hasattr(a, "storage_offset") else a for a in args]
        bound_args, specialization, options = binder(*args, **kwargs)
        names = [p.name for p in self.params]
        signature, constexprs, attrs = {}, {}, {}
        for name, spec, value in zip(names, specialization, bound_args.values()):
            kind = spec[0]
            signature[name] = kind
            if kind == "constexpr":
                constexprs[name] = value
            else:
                attrs[name] = spec[1] if len(spec) > 1 and isinstance(spec[1], str) else ""
        if callable(grid):
            grid = grid(bound_args)
        programs = 1
        for g in tuple(grid):
            programs *= int(g)
        launch = Launch(
            kernel=f"{self.fn.__module__}:{self.fn.__qualname__}", source_hash=self.cache_key,
            signature=signature, constexprs={k: _plain(v) for k, v in constexprs.items()}, attrs=attrs,
            num_warps=int(kwargs.get("num_warps", 4)), num_stages=int(kwargs.get("num_stages", 3)), programs=programs,
            options={k: kwargs[k] for k in COMPILE_OPTIONS if k in kwargs},
        )
        key = launch.config_key()
        if key in launches:
            launches[key].programs = max(launches[key].programs, programs)
            launch = launches[key]
        else:
            launches[key] = launch
        if len(launch.scenarios) < 3:
            launch.scenarios.append(scenario[0])
        return None

    jit.JITFunction.run = record
    try:
        yield
    finally:
        jit.JITFunction.run = original


def _plain(v):
    """A constexpr value as JSON-able text/number (tl.float32 -> "fp32")."""
    if isinstance(v, (bool, int, float, str)) or v is None:
        return v
    return str(v)


#: a shape past 2³¹ elements (3.3e9): meta tensors, so the capture costs nothing
HUGE = (8, 128, 64, (224, 224))


def scenarios(grid: str):
    """(name, T, N, C, spatial, dtype, mode) over the grid ("ci", "wide" or "full"); modes cover every flag."""
    modes = [
        "lif", "lif-soft-decay", "mpbn-train", "mpbn-train-soft-raw", "mpbn-train-noaffine",
        "mpbn-eval", "mpbn-folded", "mpbn-adapt-batch", "mpbn-adapt-running", "tebn-train", "tebn-eval",
        "tebn-noaffine", "tab-train", "tab-eval", "bn-train", "bn-eval", "bntt-train", "bntt-eval",
        "norm-lif-train", "norm-lif-train-soft", "norm-lif-eval",
        # synchronised across ranks (a stand-in hook of one rank: the SYNCED / STORE_M2 /
        # COUNT_FROM_PTR kernel variants and the extra reduce and coefficient launches)
        "bn-train-sync", "tab-train-sync", "mpbn-train-sync", "norm-lif-train-sync",
    ]
    if grid == "full":
        Ts, Ns, Cs = (1, 4, 8), (1, 32, 128), (3, 64, 256, 512)
        spatials = [(), (1, 1), (7, 7), (8, 8), (32, 32), (56, 56)]
        dtypes = ("float32", "float16", "bfloat16")
        points = itertools.product(Ts, Ns, Cs, spatials, dtypes, modes)
    elif grid == "wide":
        # CI's two shapes plus a tiny 1-d input and a large resident one (N=128, C=512, 7×7: the
        # biggest resident block, 8192), every mode in fp32, the core modes in fp16/bf16
        shapes = [(4, 32, 64, (8, 8)), (4, 32, 64, (32, 32)), (1, 1, 3, ()), (8, 128, 512, (7, 7)),
                  (4, 32, 256, (8, 8))]
        points = [(T, N, C, sp, "float32", m) for (T, N, C, sp) in shapes for m in modes]
        points += [(4, 32, 64, sp, dt, m) for sp in ((8, 8), (32, 32)) for dt in ("float16", "bfloat16")
                   for m in ("lif", "mpbn-train", "mpbn-eval", "tebn-train", "tab-train")]
    elif grid == "ci":
        # CI: every mode in fp32 at a small shape (M = 2048, C = 64: MPBN training takes the
        # pipelined path with small tiles); the per-step statistics modes (MPBN training/
        # adaptation, TEBN/TAB training) also at a large-M shape (M = 32768) and at a resident
        # shape (C = 256 ≥ 132 channels of 2048 elements: one program per channel); the core
        # modes in bf16 and fp16
        resident, split, wide_c = (4, 32, 64, (8, 8)), (4, 32, 64, (32, 32)), (4, 32, 256, (8, 8))
        per_step = [m for m in modes if m.startswith(("mpbn-train", "mpbn-adapt"))] + ["tebn-train", "tab-train",
                                                                                      "bn-train", "bntt-train"]
        points = [(*resident, "float32", m) for m in modes] + [(*split, "float32", m) for m in per_step]
        points += [(*wide_c, "float32", m) for m in per_step]
        # the statistics tiles that once spilled on sm_80 at 8 warps ([8, 4, 64] and [1, 32, 64])
        points += [(4, 128, 3, (8, 8), "float32", "tebn-train"), (4, 1, 512, (8, 8), "float32", "tab-train")]
        points += [(*resident, "bfloat16", m) for m in ("lif", "mpbn-train", "tebn-train", "tab-train", "bn-train",
                                                         "bntt-train")]
        points += [(*split, "bfloat16", "mpbn-train"), (*resident, "float16", "mpbn-train")]
        # the fused norm → LIF backward keeps [SEG, BLOCK] tiles: its longest segment (T ≥ 16,
        # checkpoints between segments) and a short one
        points += [(T, 8, 16, (8, 8), dt, "norm-lif-train") for T in (3, 32) for dt in ("float32", "bfloat16")]
        # synchronised: MPBN-LIF always pipelined (also where it would be resident), the pipeline's
        # synced reduce and coefficient variants
        points += [(*shape, "float32", "mpbn-train-sync") for shape in (split, wide_c)]
        points += [(*resident, "bfloat16", m) for m in ("bn-train-sync", "mpbn-train-sync")]
        # fp64 (ACC_DTYPE fp64, full-precision scalars): every kernel family, MPBN training on both paths
        fp64_modes = ["lif", "lif-soft-decay", "mpbn-train", "mpbn-train-soft-raw", "mpbn-eval", "mpbn-folded",
                      "mpbn-adapt-batch", "mpbn-adapt-running", "tebn-train", "tebn-eval", "tab-train", "tab-eval",
                      "bn-train", "bn-eval", "bntt-train", "bntt-eval", "norm-lif-train", "norm-lif-train-soft",
                      "norm-lif-eval", "bn-train-sync", "mpbn-train-sync"]
        points += [(*resident, "float64", m) for m in fp64_modes]
        points += [(*shape, "float64", "mpbn-train") for shape in (split, wide_c)]
        points += [(32, 8, 16, (8, 8), "float64", "norm-lif-train")]
        # past 2³¹ elements (the T=8, N=128, C=64, 224×224 in fp16): the INDEX_64 variants
        # of the LIF / MPBN-LIF kernels (needs_int64) and every other family at that size
        points += [(*HUGE, dt, m) for dt in ("float16", "float64") for m in modes]
        points += row_norm_points()
    else:
        raise ValueError(f"grid must be 'ci', 'wide' or 'full', got {grid!r}")
    for T, N, C, sp, dtype, mode in points:
        batch_stats = ("mpbn-train", "mpbn-adapt", "tebn-train", "tebn-noaffine", "tab-train", "bn-train", "bntt-train",
                       "norm-lif-train")
        if mode.startswith(batch_stats) and N * max(1, _prod(sp)) < 2:
            continue  # batch statistics need two values per channel
        yield (f"{mode} T{T} N{N} C{C} {'x'.join(map(str, sp)) or '-'} {dtype}", T, N, C, sp, dtype, mode)


#: LayerNorm / RMSNorm alone and fused with a LIF (soft reset, ATan, for the other flags)
ROW_MODES = ("layer-norm", "rms-norm", "layer-norm-lif", "rms-norm-lif-soft")


def row_norm_points() -> list[tuple]:
    """The row norms over rows of D = C features ([T, N, D]): every one-pass tile of the GPU table
    up to the widest (D = 16384 takes the looped wide path; the fused op a second pass), fp32 and
    the low-precision dtypes, fp64 where its tiles differ, and T = 32 (membrane checkpoints)."""
    widths = (64, 256, 1024, 2048, 4096, 8192, 16384)
    points = [(4, 8, d, (), dt, m) for d in widths for dt in ("float32", "bfloat16", "float16") for m in ROW_MODES]
    points += [(4, 8, d, (), "float64", m) for d in (256, 1024, 2048, 4096) for m in ROW_MODES]
    points += [(32, 8, d, (), dt, m) for d in (256, 2048) for dt in ("float32", "bfloat16")
               for m in ("layer-norm-lif", "rms-norm-lif-soft")]
    return points


def _prod(xs):
    p = 1
    for x in xs:
        p *= x
    return p


class CaptureSync:
    """A stand-in cross-rank hook of one rank (:class:`snnorm.backends.sync.StatsSync`'s
    interface) that works on meta tensors: the capture needs the synchronised launches, not
    a process group."""

    world, rank, group_name = 1, 0, "compile-check"

    def gather(self, values):
        return values.reshape(1, -1)

    def all_reduce(self, values):
        return values.clone()


def run_scenario(ops, sg, make, T, N, C, sp, dtype_name, mode):
    import torch

    sync = CaptureSync() if mode.endswith("-sync") else None
    mode = mode.removesuffix("-sync")

    dtype = getattr(torch, dtype_name)
    pdt = torch.float64 if dtype == torch.float64 else torch.float32  # an fp64 module's parameters are fp64
    shape = (T, N, C, *sp)
    grad = not mode.startswith(("mpbn-adapt",)) and mode not in ("tebn-eval", "tab-eval", "bn-eval", "bntt-eval",
                                                                  "norm-lif-eval")
    x = make(shape, dtype, requires_grad=grad)
    v = make(shape[1:], dtype)
    th = make((C,), pdt, requires_grad=grad)
    w, b = make((C,), pdt, requires_grad=grad), make((C,), pdt, requires_grad=grad)
    rm, rv = make((C,), pdt), make((C,), pdt)
    from snnorm.params import AdaptParameters, BNStatistics, LIFParameters, MPBNParameters

    lif = LIFParameters(sg.Sigmoid(), tau=2.0, decay_input=False, v_reset=0.0, detach_reset=False)
    if mode in ("lif-soft-decay", "mpbn-train-soft-raw", "norm-lif-train-soft", "rms-norm-lif-soft"):
        lif = LIFParameters(sg.ATan(), tau=2.0, decay_input=True, v_reset=None, detach_reset=True)
    outs = []
    if mode.startswith("lif"):
        outs = ops.lif(x, v, th, lif)
    elif mode.startswith("mpbn-train") or mode == "mpbn-eval":
        norm = MPBNParameters(eps=1e-5, carry="raw" if mode.endswith("raw") else "normalized")
        stats = BNStatistics(training=mode != "mpbn-eval", momentum=0.1, batches_tracked=0)
        affine = mode != "mpbn-train-noaffine"
        outs = ops.mpbn_lif(x, v, w if affine else None, b if affine else None, rm, rv, th, lif, norm, stats,
                            sync=sync)
    elif mode.startswith(("mpbn-folded", "mpbn-adapt")):
        adapt = {"mpbn-folded": "none", "mpbn-adapt-batch": "batch", "mpbn-adapt-running": "running"}[mode]
        adapt = AdaptParameters(mode=adapt, momentum=0.1, decay=0.9, min_momentum=0.01)
        outs = ops.mpbn_lif_folded(x, v, rm, rv, w, b, th, lif, MPBNParameters(eps=1e-5, carry="normalized"), adapt)[:2]
    elif mode.startswith("tab"):  # per-step γ, β and running statistics [T, C]
        tw, tb = make((T, C), pdt, requires_grad=grad), make((T, C), pdt, requires_grad=grad)
        trm, trv, p = make((T, C), pdt), make((T, C), pdt), make((T,), pdt, requires_grad=grad)
        outs = (ops.tab(x, tw, tb, trm, trv, p, training=mode == "tab-train", momentum=[0.1] * T, eps=1e-5,
                        sync=sync)[0],)
    elif mode.startswith("bntt"):  # per-step γ_t (no β) and running statistics
        ws = [make((C,), pdt, requires_grad=grad) for _ in range(T)]
        rms, rvs = [make((C,), pdt) for _ in range(T)], [make((C,), pdt) for _ in range(T)]
        outs = (ops.bntt(x, ws, rms, rvs, training=mode == "bntt-train", momentum=[0.1] * T, eps=[1e-5] * T),)
    elif mode.startswith("norm-lif"):  # a norm and a LIF fused: TAB (per step, p², v0) or BN (soft) or TEBN (eval)
        rule = {"norm-lif-train": "tab", "norm-lif-train-soft": "batch_norm", "norm-lif-eval": "tebn"}[mode]
        rows = (T, C) if rule == "tab" else (C,)
        nw, nb = make(rows, pdt, requires_grad=grad), make(rows, pdt, requires_grad=grad)
        nrm, nrv = make(rows, pdt), make(rows, pdt)
        p = make((T,), pdt, requires_grad=grad) if rule != "batch_norm" else None
        v0 = make(shape[1:], dtype, requires_grad=grad) if rule == "tab" else 0.0
        outs = ops.norm_lif(rule, x, v0, nw, nb, p, nrm, nrv, momentum=[0.1] * (T if rule == "tab" else 1), eps=1e-5,
                            batch_stats=grad, threshold=1.0, neuron=lif, sync=sync)
    elif mode.startswith(("layer-norm", "rms-norm")):  # rows of D = C features, alone or fused with a LIF
        rms = mode.startswith("rms")
        rw, rb = make((C,), pdt, requires_grad=True), None if rms else make((C,), pdt, requires_grad=True)
        if "-lif" in mode:
            outs = ops.row_norm_lif(x, 0.0, rw, rb, eps=1e-5, rms=rms, threshold=1.0, neuron=lif)
        else:
            outs = (ops.row_norm(x, rw, rb, eps=1e-5, rms=rms),)
    elif mode.startswith("bn-"):  # multi-step BatchNorm / tdBN
        outs = (ops.batch_norm_seq(x, w, b, rm, rv, training=mode == "bn-train", momentum=0.1, eps=1e-5, sync=sync),)
    else:
        p = make((T,), pdt, requires_grad=grad)
        affine = mode != "tebn-noaffine"
        outs = (ops.tebn(x, w if affine else None, b if affine else None, rm, rv, p, training=mode != "tebn-eval",
                         momentum=0.1, eps=1e-5),)
    if grad:
        loss = sum(o.float().sum() for o in outs)
        loss.backward()


def capture(grid: str = "ci", only: str | None = None) -> dict:
    """Every distinct launch of the grid, keyed by :meth:`Launch.config_key`."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("the compile check needs the Triton interpreter off: unset TRITON_INTERPRET")
    import torch

    from snnorm import backends
    from snnorm import surrogate as sg

    available = torch.cuda.is_available
    torch.cuda.is_available = lambda: True  # the backend loader asks; the launches never reach a GPU
    try:
        ops = backends.get_ops("triton")
    finally:
        torch.cuda.is_available = available
    from snnorm.backends.sync import StatsSync

    launches: dict = {}
    current = [""]
    failures = []
    from_name = StatsSync.from_name  # the ops resolve their group by name: give them the stand-in
    StatsSync.from_name = staticmethod(lambda name: CaptureSync() if name == CaptureSync.group_name else None)
    with contextlib.ExitStack() as restore, _device_lie(SM_COUNT) as make, _recording(launches, current):
        restore.callback(setattr, StatsSync, "from_name", staticmethod(from_name))
        for name, T, N, C, sp, dtype, mode in scenarios(grid):
            if only and not any(part in name for part in only.split(",")):
                continue
            current[0] = name
            try:
                run_scenario(ops, sg, make, T, N, C, sp, dtype, mode)
            except Exception as err:  # a launcher that cannot even be traced is a failure
                failures.append((name, f"{type(err).__name__}: {err}"))
    if failures:
        raise RuntimeError("launchers failed on meta tensors:\n" + "\n".join(f"  {n}: {e}" for n, e in failures))
    return launches


# ------------------------------------------------------------------------------------------
# compile
# ------------------------------------------------------------------------------------------


def _cache_dir() -> Path:
    d = Path(os.environ.get("SNNORM_COMPILE_CACHE", Path.home() / ".cache" / "snnorm-compile-check"))
    d.mkdir(parents=True, exist_ok=True)
    return d


_PTXAS_RE = {
    "registers": re.compile(r"Used (\d+) registers"),
    "spill_stores": re.compile(r"(\d+) bytes spill stores"),
    "spill_loads": re.compile(r"(\d+) bytes spill loads"),
    "shared_bytes": re.compile(r"(\d+) bytes smem"),
}


def ptxas_usage(ptx: str) -> dict:
    """Registers, spill stores/loads and shared memory from the bundled ``ptxas -v``."""
    import tempfile

    from triton.backends.nvidia import compiler as nv

    arch = re.search(r"^\.target\s+(sm_\w+)", ptx, re.M).group(1)
    tool = nv.get_ptxas(int(re.sub(r"\D", "", arch)[:2] or 90)) if "get_ptxas" in dir(nv) else None
    ptxas = tool.path if tool is not None else str(Path(nv.__file__).parent / "bin" / "ptxas")
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        out = subprocess.run([ptxas, "-v", f"--gpu-name={arch}", str(src), "-o", str(Path(tmp) / "k.o")],
                             capture_output=True, text=True, check=True)
    log = out.stderr + out.stdout
    usage = {}
    for key, rx in _PTXAS_RE.items():
        m = rx.search(log)
        usage[key] = int(m.group(1)) if m else 0
    return usage


def _compile_one(job):
    """Compile one launch for one target (in a worker process); returns a result row."""
    launch, target = job
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend

    row = dict(kernel=launch["kernel"], target=f"sm_{target}", config=launch["describe"], num_warps=launch["num_warps"],
               programs=launch["programs"], registers="", spill_stores="", spill_loads="", shared_bytes="",
               approx_ops="", status="ok", error="")
    try:
        module, qualname = launch["kernel"].split(":")
        fn = __import__(module, fromlist=["_"])
        for part in qualname.split("."):
            fn = getattr(fn, part)
        gpu = GPUTarget("cuda", target, 32)
        backend = make_backend(gpu)
        constexprs = {}
        for name, value in launch["constexprs"].items():
            if isinstance(value, str) and value.startswith(("fp", "bf", "int", "uint")):
                value = getattr(triton.language, {"fp32": "float32", "fp64": "float64", "fp16": "float16",
                                                  "bf16": "bfloat16"}.get(value, value))
            constexprs[(fn.arg_names.index(name),)] = value
        attrs = {}
        for name, spec in launch["attrs"].items():
            parsed = backend.parse_attr(spec) if spec else []
            if parsed:
                attrs[(fn.arg_names.index(name),)] = parsed
        src = ASTSource(fn=fn, signature=launch["signature"], constexprs=constexprs, attrs=attrs)
        kernel = triton.compile(src, target=gpu, options={"num_warps": launch["num_warps"], "num_stages": launch["num_stages"],
                                                          **launch.get("options", {})})
        ptx = kernel.asm["ptx"]
        row.update(ptxas_usage(ptx))
        row["approx_ops"] = format_ops(approximate_ops(ptx))
        scanned = row["approx_ops"]
        if launch["constexprs"].get("SURROGATE") in DIVIDING_SURROGATES and module in SPIKE_MODULES:
            # the surrogate's plain division is allowed: scan the kernel without it (one target:
            # the lowering of a division does not depend on it; sm_80 rows report and pass)
            scanned = ""
            if target == TARGETS[0]:
                probe = dict(constexprs)
                probe[(fn.arg_names.index("SURROGATE"),)] = DIVISION_FREE_SURROGATE
                src = ASTSource(fn=fn, signature=launch["signature"], constexprs=probe, attrs=attrs)
                options = {"num_warps": launch["num_warps"], "num_stages": launch["num_stages"], **launch.get("options", {})}
                scanned = format_ops(approximate_ops(triton.compile(src, target=gpu, options=options).asm["ptx"]))
        problem = approximation_problem(launch["kernel"], scanned)
        if problem:
            row.update(status="FAILED", error=problem)
    except Exception as err:  # a configuration that does not compile is the finding
        row.update(status="FAILED", error=f"{type(err).__name__}: {str(err).strip().splitlines()[-1] if str(err).strip() else ''}"[:300])
    return row


def approximate_ops(ptx: str) -> dict[str, int]:
    """Occurrences of each approximate division / reciprocal / square-root instruction in ``ptx``
    (comments and ``// ...`` lines ignored), e.g. ``{"div.full.f32": 2}``."""
    found: dict[str, int] = {}
    for line in ptx.splitlines():
        code = line.split("//", 1)[0]
        for op in _APPROX_RE.findall(code):
            found[op] = found.get(op, 0) + 1
    return found


def format_ops(ops: dict[str, int]) -> str:
    return " ".join(f"{op}x{n}" for op, n in sorted(ops.items()))


def approximation_problem(kernel: str, approx_ops: str) -> str:
    """The failure message for a spike-deciding kernel (:data:`SPIKE_MODULES`, or one of
    :data:`STATISTICS_KERNELS`) whose PTX holds approximate arithmetic (``approx_ops`` as
    :func:`format_ops` writes it), else ""."""
    if approx_ops and (kernel.split(":")[0] in SPIKE_MODULES or kernel in STATISTICS_KERNELS):
        return (f"approximate arithmetic in a spike-deciding kernel: {approx_ops} (use _device.div_rn / "
                f"sqrt_rn / rstd_of: correctly rounded, so GPU, torch and the recompute fire alike)")
    return ""


def compile_all(launches: dict, jobs: int = 2, targets=TARGETS) -> list[dict]:
    """Compile every launch for every target (cached); one row per (launch, target)."""
    import triton

    cache = _cache_dir()
    rows, todo = [], []
    for key, launch in sorted(launches.items(), key=lambda kv: (kv[1].kernel, kv[1].describe())):
        payload = dict(kernel=launch.kernel, describe=launch.describe(), signature=launch.signature,
                       constexprs=launch.constexprs, attrs=launch.attrs, num_warps=launch.num_warps,
                       num_stages=launch.num_stages, programs=launch.programs, options=launch.options)
        for target in targets:
            path = cache / f"{key}-sm{target}-triton{triton.__version__}.json"
            row = json.loads(path.read_text()) if path.exists() else None
            if row is not None and "approx_ops" in row:  # (rows cached before the PTX scan: compile again)
                row["programs"] = launch.programs
                rows.append(row)
            else:
                todo.append((payload, target, path))
    if todo:
        with futures.ProcessPoolExecutor(max_workers=max(1, jobs)) as pool:
            for (payload, target, path), row in zip(todo, pool.map(_compile_one, [(p, t) for p, t, _ in todo])):
                if row["status"] == "ok":
                    path.write_text(json.dumps(row))
                rows.append(row)
    rows.sort(key=lambda r: (r["kernel"], r["config"], r["target"]))
    return rows


# ------------------------------------------------------------------------------------------
# reporting
# ------------------------------------------------------------------------------------------


def spilling(rows: list[dict]) -> list[dict]:
    """The rows (configuration × target) whose kernel spills registers to local memory."""
    return [r for r in rows if r["status"] == "ok" and (int(r["spill_stores"] or 0) or int(r["spill_loads"] or 0))]


def summary(rows: list[dict]) -> list[dict]:
    """Per kernel: configurations, failures, max registers, max spill stores/loads, spilling configs."""
    out = {}
    for r in rows:
        k = out.setdefault(r["kernel"].split(":")[-1], dict(kernel=r["kernel"].split(":")[-1], configurations=0,
                                                           failures=0, max_registers=0, max_spill_stores=0,
                                                           max_spill_loads=0, spilling=0, max_shared=0,
                                                           approx_ops=set()))
        k["configurations"] += 1
        if r["status"] != "ok":
            k["failures"] += 1
            continue
        k["max_registers"] = max(k["max_registers"], int(r["registers"]))
        k["max_spill_stores"] = max(k["max_spill_stores"], int(r["spill_stores"]))
        k["max_spill_loads"] = max(k["max_spill_loads"], int(r["spill_loads"]))
        k["max_shared"] = max(k["max_shared"], int(r["shared_bytes"]))
        k["spilling"] += int(bool(int(r["spill_stores"]) or int(r["spill_loads"])))
    for r in rows:  # failed ones too: the scan fails a spike kernel that holds them
        k = out[r["kernel"].split(":")[-1]]
        k["approx_ops"].update(op.rsplit("x", 1)[0] for op in (r.get("approx_ops") or "").split())
    return list(out.values())


def summary_markdown(rows: list[dict], title: str, version: str | None = None) -> str:
    if version is None:
        import triton

        version = triton.__version__
    lines = [f"{title} (triton {version}; configurations = distinct launches × {{sm_90, sm_80}})", "",
             "| kernel | configurations | failures | max registers | max spill stores / loads (B) | spilling configs | max smem (B) | approximate ops |",
             "|---|---|---|---|---|---|---|---|"]
    for k in summary(rows):
        lines.append(f"| {k['kernel']} | {k['configurations']} | {k['failures']} | {k['max_registers']} | "
                     f"{k['max_spill_stores']} / {k['max_spill_loads']} | {k['spilling']} | {k['max_shared']} | "
                     f"{', '.join(sorted(k['approx_ops'])) or '-'} |")
    return "\n".join(lines) + "\n"


def write_csv(rows: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)


def run(grid: str = "ci", jobs: int = 2, only: str | None = None, targets=TARGETS) -> list[dict]:
    return compile_all(capture(grid, only), jobs=jobs, targets=targets)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--grid", choices=("ci", "wide", "full"), default="ci",
                   help="ci: ~75 launches (default); wide: ~145; full: the issue's grid (thousands of compiles)")
    p.add_argument("--full", action="store_true", help="same as --grid full")
    p.add_argument("--jobs", type=int, default=2, help="parallel compiles")
    p.add_argument("--only", default=None, help="only scenarios whose name contains one of these (comma-separated)")
    p.add_argument("--out", default=str(ROOT / "perf" / "results" / "compile"), help="folder for the CSV")
    p.add_argument("--summary-md", default=None, help="also write the markdown summary here")
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":  # triton picks the interpreter at import: start over without it
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        return subprocess.call([sys.executable, "-m", "perf.compile_check", *(argv or sys.argv[1:])], env=env, cwd=ROOT)
    import triton

    grid = "full" if args.full else args.grid
    rows = run(grid, args.jobs, args.only)
    name = f"compile_{grid}_triton{triton.__version__}.csv"
    write_csv(rows, Path(args.out) / name)
    md = summary_markdown(rows, f"Compile check, {grid} grid")
    if args.summary_md:
        Path(args.summary_md).write_text(md)
    print(md)
    for r in spilling(rows):
        print(f"spills: {r['kernel']} {r['target']} warps={r['num_warps']} {r['spill_stores']}/{r['spill_loads']} B  {r['config']}")
    failed = [r for r in rows if r["status"] != "ok"]
    for r in failed:
        print(f"FAILED: {r['kernel']} {r['target']} {r['config']}: {r['error']}")
    print(f"{len(rows)} compiled configurations, {len(failed)} failures -> {Path(args.out) / name}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
