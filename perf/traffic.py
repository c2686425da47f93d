"""Bytes every Triton kernel moves, and its launches, per op call: counted, not timed.

All of snnorm's kernels are memory-bound, so on a GPU their time is bytes moved over HBM
bandwidth. Without a GPU the bytes can still be counted: :func:`meter` instruments the
Triton interpreter (``TRITON_INTERPRET=1``) and, for every kernel launched inside a
``with meter() as m:`` block, adds up

* launches (one per ``kernel[grid](...)``) and programs (the grid's size);
* bytes loaded and stored: for every ``tl.load`` / ``tl.store`` (scalar, block, masked,
  tensor-descriptor and atomic accesses alike) the masked-in lanes × the element size.

It is generic: nothing here knows snnorm's kernels. Bytes are attributed to the name of
the kernel that moved them, so the meter follows any refactor of ``snnorm/kernels``.
Caches are not modelled: a value that every program loads (a per-channel constant, a
stride-0 broadcast state) counts once per lane that loads it, as if it came from HBM
every time.

Apart from the kernels, the meter counts the torch operations of the call (a
``TorchDispatchMode``, which also runs the bodies of ``torch.library`` custom ops): the
launchers' glue (a ``.contiguous()`` copy, the ``torch.sum`` of partials, a buffer's
``copy_``) and the zero gradients autograd materialises for unused outputs. On a GPU each
is a launch of its own; their bytes count every input read and every output written once.

The CLI measures every op and mode of the triton backend's op table at fp32 on shapes
that reach every path (MPBN-LIF training: the one-program-per-channel path for
M = N·H·W ≤ 8192 and the split path above), one call each, forward and backward apart,
and prints bytes per element-step — bytes / (T·N·C·H·W) — and launches next to the floor
of DESIGN.md §4 (the bytes a kernel must move: read its inputs once, write its outputs
once, save what backward needs)::

    python -m perf.traffic            # markdown table; writes perf/results/traffic.csv

``tests/test_traffic.py`` holds the budgets (a regression fails CI).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import math
import sys
from pathlib import Path
from typing import Callable, Iterator

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

if not torch.cuda.is_available():  # before anything imports triton
    import os

    os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np  # noqa: E402
import triton  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

# ------------------------------------------------------------------------------- the meter


@dataclasses.dataclass
class KernelTraffic:
    """What one kernel (all its launches inside a meter) moved."""

    launches: int = 0
    programs: int = 0
    load_bytes: int = 0
    store_bytes: int = 0

    @property
    def bytes(self) -> int:
        return self.load_bytes + self.store_bytes


@dataclasses.dataclass
class TorchOpTraffic:
    """What one torch operator (all its calls outside kernels inside a meter) moved."""

    calls: int = 0
    bytes: int = 0


class Traffic:
    """Counts of a ``with meter():`` block: per kernel name and per torch operator, and totals."""

    def __init__(self) -> None:
        self.kernels: dict[str, KernelTraffic] = {}
        self.torch_ops: dict[str, TorchOpTraffic] = {}

    @property
    def torch_calls(self) -> int:
        """Torch operations that move data (on a GPU each is a launch of its own)."""
        return sum(o.calls for o in self.torch_ops.values())

    @property
    def torch_bytes(self) -> int:
        return sum(o.bytes for o in self.torch_ops.values())

    def _kernel(self, name: str) -> KernelTraffic:
        return self.kernels.setdefault(name, KernelTraffic())

    @property
    def launches(self) -> int:
        return sum(k.launches for k in self.kernels.values())

    @property
    def load_bytes(self) -> int:
        return sum(k.load_bytes for k in self.kernels.values())

    @property
    def store_bytes(self) -> int:
        return sum(k.store_bytes for k in self.kernels.values())

    @property
    def bytes(self) -> int:
        return self.load_bytes + self.store_bytes

    def breakdown(self, elem_steps: int | None = None) -> str:
        """``kernel×launches`` for every kernel that ran, in order of first launch, and
        with ``elem_steps`` each kernel's bytes per element-step."""
        return ", ".join(
            f"{name}×{k.launches}" + (f" {k.bytes / elem_steps:.2f}" if elem_steps else "")
            for name, k in self.kernels.items()
        )

    def torch_breakdown(self) -> str:
        """``operator×calls`` for every torch operation counted, in order of first call."""
        return ", ".join(f"{name}×{o.calls}" for name, o in self.torch_ops.items())

    def __repr__(self) -> str:
        return (f"Traffic(launches={self.launches}, load={self.load_bytes} B, store={self.store_bytes} B: "
                f"{self.breakdown()}; torch ops={self.torch_calls}, {self.torch_bytes} B)")


# Meters open now (nested blocks all count), and the kernel whose programs run now.
_OPEN: list[Traffic] = []
_RUNNING: list[str] = []
_ORIGINALS: dict[tuple[type, str], Callable] = {}
OUTSIDE_LAUNCH = "<outside a launch>"  # a device function called from Python directly


@triton.jit
def _probe_kernel(x_ptr):  # never launched: tells whether @triton.jit builds interpreted kernels
    pass


def interpreting() -> bool:
    """True when kernels decorated in this process run in the Triton interpreter."""
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(_probe_kernel, InterpretedFunction)


def _element_bytes(ptrs) -> int:
    return (ptrs.get_element_ty().primitive_bitwidth + 7) // 8


def _lanes(ptrs, mask) -> int:
    if mask is None:
        return int(np.size(ptrs.data))
    return int(np.count_nonzero(np.broadcast_to(mask.data, np.shape(ptrs.data))))


def _add(kind: str, ptrs, mask) -> None:
    n = _lanes(ptrs, mask) * _element_bytes(ptrs)
    name = _RUNNING[-1] if _RUNNING else OUTSIDE_LAUNCH
    for t in _OPEN:
        k = t._kernel(name)
        if kind == "load":
            k.load_bytes += n
        else:
            k.store_bytes += n


def _install() -> None:
    """Wrap the interpreter's memory ops and launch entry (undone by :func:`_uninstall`)."""
    from triton.runtime.interpreter import GridExecutor, InterpreterBuilder

    def wrap(cls, name, make):
        _ORIGINALS[(cls, name)] = getattr(cls, name)
        setattr(cls, name, make(_ORIGINALS[(cls, name)]))

    # create_load / create_store / atomic_load / atomic_store / descriptor load and store
    # all end in these two, each with a mask of the pointers' shape.
    def load(f):
        def counted(self, ptrs, mask, *a, **k):
            _add("load", ptrs, mask)
            return f(self, ptrs, mask, *a, **k)

        return counted

    def store(f):
        def counted(self, ptrs, value, mask, *a, **k):
            _add("store", ptrs, mask)
            return f(self, ptrs, value, mask, *a, **k)

        return counted

    wrap(InterpreterBuilder, "create_masked_load", load)
    wrap(InterpreterBuilder, "create_masked_store", store)

    # read-modify-write atomics read and write every masked-in lane
    def rmw(f):
        def counted(self, op, ptr, val, mask, *a, **k):
            _add("load", ptr, mask)
            _add("store", ptr, mask)
            return f(self, op, ptr, val, mask, *a, **k)

        return counted

    def cas(f):
        def counted(self, ptr, *a, **k):
            _add("load", ptr, None)
            _add("store", ptr, None)
            return f(self, ptr, *a, **k)

        return counted

    wrap(InterpreterBuilder, "create_atomic_rmw", rmw)
    wrap(InterpreterBuilder, "create_atomic_cas", cas)

    def grid_dim(f):
        def counted(self, nx, ny, nz):
            name = _RUNNING[-1] if _RUNNING else OUTSIDE_LAUNCH
            for t in _OPEN:
                t._kernel(name).programs += nx * ny * nz
            return f(self, nx, ny, nz)

        return counted

    wrap(InterpreterBuilder, "set_grid_dim", grid_dim)

    def launch(f):
        def counted(self, *args, **kwargs):
            name = self.fn.__name__
            for t in _OPEN:
                t._kernel(name).launches += 1
            _RUNNING.append(name)
            try:
                return f(self, *args, **kwargs)
            finally:
                _RUNNING.pop()

        return counted

    wrap(GridExecutor, "__call__", launch)


def _uninstall() -> None:
    for (cls, name), f in _ORIGINALS.items():
        setattr(cls, name, f)
    _ORIGINALS.clear()


# Operators that allocate or re-view memory without moving data.
_NO_TRAFFIC = {"aten::empty", "aten::empty_strided", "aten::empty_like", "aten::new_empty",
               "aten::new_empty_strided", "aten::detach", "aten::lift_fresh", "aten::alias", "aten::resize_"}
_TORCH_NAMESPACES = {"aten", "prims", "prim"}


def _tensors(tree) -> list:
    from torch.utils._pytree import tree_leaves

    return [t for t in tree_leaves(tree) if isinstance(t, torch.Tensor)]


def _key(t: torch.Tensor) -> tuple:
    return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)


def _custom_op_body(func, args, kwargs) -> Callable | None:
    """The Python function a ``torch.library.custom_op`` runs for these arguments, if it is one."""
    from torch._library import custom_ops

    opdef = getattr(custom_ops, "OPDEFS", {}).get(func._schema.name)
    if opdef is None:
        return None
    kernels = getattr(opdef, "_backend_fns", {})  # per device type, from register_kernel
    for device in {t.device.type for t in _tensors((args, kwargs))}:
        if device in kernels:
            return kernels[device]
    return getattr(opdef, "_init_fn", None)


class _TorchOpCounter(TorchDispatchMode):
    """Counts the torch operations of an op call outside its kernels.

    Bytes of an operation: every input tensor read once and every output written once
    (numel × element size; an input that is also the output, as ``copy_``'s destination,
    counts as written only). Views and allocations move nothing. The Python body of a
    custom op (``torch.library.custom_op``) runs under this mode, so the torch operations
    inside it count too; the interpreter's own copies around a launch do not.
    """

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _RUNNING:  # the interpreter moving a launch's arguments: not the op's traffic
            return func(*args, **kwargs)
        if func.namespace not in _TORCH_NAMESPACES:
            body = _custom_op_body(func, args, kwargs)
            if body is not None:
                with self:  # run the op's body under this mode: its torch operations count
                    return body(*args, **kwargs)
            return func(*args, **kwargs)  # another library's op: its insides go uncounted
        out = func(*args, **kwargs)
        name = func._schema.name
        outs = _tensors(out)
        if outs and not func.is_view and name not in _NO_TRAFFIC:  # (promote_types & co. return no tensor)
            written = {_key(t) for t in outs}
            read = [t for t in _tensors((args, kwargs)) if _key(t) not in written]
            n = sum(t.numel() * t.element_size() for t in read + outs)
            short = name.split("::", 1)[-1]
            for traffic in _OPEN:
                op = traffic.torch_ops.setdefault(short, TorchOpTraffic())
                op.calls += 1
                op.bytes += n
        return out


@contextlib.contextmanager
def meter() -> Iterator[Traffic]:
    """Count the launches and bytes of every Triton kernel run inside the block.

    Needs the Triton interpreter (``TRITON_INTERPRET=1`` before triton is first
    imported); compiled kernels cannot be counted this way, so it raises otherwise.
    Meters nest: an inner block's counts are also an outer block's.
    """
    if not interpreting():
        raise RuntimeError(
            "perf.traffic.meter counts kernels run by the Triton interpreter, but triton compiles "
            "them here: set TRITON_INTERPRET=1 before triton is first imported"
        )
    traffic = Traffic()
    outermost = not _OPEN
    if outermost:
        _install()
    _OPEN.append(traffic)
    try:
        with _TorchOpCounter() if outermost else contextlib.nullcontext():
            yield traffic
    finally:
        _OPEN.remove(traffic)
        if not _OPEN:
            _uninstall()


# ------------------------------------------------------------------ what the CLI measures

#: [T, N, C, H, W]: M = N·H·W = 256 takes MPBN-LIF's one-program-per-channel path,
#: M = 8450 > 8192 its split path. T = 3 as in DESIGN.md §4's table.
SMALL_M = (3, 4, 3, 8, 8)
LARGE_M = (3, 2, 2, 65, 65)
#: C ≥ 132 channels of at most 2048 (padded) elements: the one-program-per-channel path
RESIDENT_M = (3, 2, 132, 4, 4)

#: fp32 floors, bytes per element-step (DESIGN.md §4; LIF and adapt derived the same way:
#: read x, write s, and in training save h; backward reads ∂s and h and writes ∂x).
FLOOR = {
    ("lif", "fwd"): 12,
    ("lif", "bwd"): 12,
    ("mpbn_lif train", "fwd"): 12,
    ("mpbn_lif train", "bwd"): 12,
    ("mpbn_lif eval", "fwd"): 8,
    ("mpbn_lif_folded", "fwd"): 8,
    ("mpbn_lif_folded adapt", "fwd"): 8,
    ("tebn train", "fwd"): 12,
    ("tebn train", "bwd"): 20,
    ("tebn eval", "fwd"): 8,
    ("tab train", "fwd"): 12,
    ("tab train", "bwd"): 20,
    ("tab eval", "fwd"): 8,
    ("batch_norm_seq train", "fwd"): 12,
    ("batch_norm_seq train", "bwd"): 20,
    ("batch_norm_seq eval", "fwd"): 8,
    ("bntt train", "fwd"): 12,
    ("bntt train", "bwd"): 20,
    ("bntt eval", "fwd"): 8,
    # a norm and a LIF fused (DESIGN.md §8): partials and apply read x, spikes written; backward
    # reads x, ∂s, writes ∂y, then reads ∂y, x and writes ∂x (the neuron recomputed, not saved)
    ("norm_lif train", "fwd"): 12,
    ("norm_lif train", "bwd"): 24,
    ("norm_lif eval", "fwd"): 8,
}


@dataclasses.dataclass(frozen=True)
class Case:
    """One op call: ``build(shape, dtype)`` makes fresh inputs and returns ``call``, and
    ``call()`` runs the op and returns (its first output, the leaves to differentiate).

    The forward runs inside one meter; when ``backward`` the gradient of the first output
    w.r.t. the leaves runs inside another (the ``∂s`` / ``∂y`` a loss would send).
    """

    name: str  # short id (tests key their budgets on it)
    op: str  # the op table slot and its mode, as in FLOOR
    path: str  # which path of the launcher the shape reaches (for the reader)
    shape: tuple
    build: Callable
    backward: bool


def _inputs(shape, dtype, grad: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    T, N, C = shape[:3]
    x = (torch.randn(shape, generator=g) * 1.5 + 0.5).to(dtype).requires_grad_(grad)
    v0 = torch.zeros((), dtype=dtype)  # the neurons' default initial state
    w = (1.0 + 0.2 * torch.randn(C, generator=g)).to(dtype).requires_grad_(grad)
    b = (0.1 * torch.randn(C, generator=g)).to(dtype).requires_grad_(grad)
    rm = (0.1 * torch.randn(C, generator=g)).to(dtype)
    rv = (1.0 + 0.1 * torch.rand(C, generator=g)).to(dtype)
    return x, v0, w, b, rm, rv


def _ops():
    from snnorm import backends

    return backends.get_ops("triton")


# Each builder makes its inputs and returns the op call alone, so that the meter sees
# the op's own work and not the making of its inputs.


def _lif(shape, dtype):
    from snnorm.params import LIFParameters
    from snnorm.surrogate import Sigmoid

    x, v0, *_ = _inputs(shape, dtype, grad=True)
    lif, ops = LIFParameters(Sigmoid(), tau=2.0, decay_input=True, v_reset=0.0, detach_reset=False), _ops()

    def call():
        s, _ = ops.lif(x, v0, 1.0, lif)
        return s, [x]

    return call


def _mpbn(training: bool):
    def build(shape, dtype):
        from snnorm.params import BNStatistics, LIFParameters, MPBNParameters
        from snnorm.surrogate import Sigmoid

        x, v0, w, b, rm, rv = _inputs(shape, dtype, grad=training)
        ops = _ops()
        lif = LIFParameters(Sigmoid(), tau=2.0, decay_input=False, v_reset=0.0, detach_reset=False)
        norm, stats = MPBNParameters(eps=1e-5, carry="normalized"), BNStatistics(training, momentum=0.1, batches_tracked=0)

        def call():
            s, _ = ops.mpbn_lif(x, v0, w, b, rm, rv, 1.0, lif, norm, stats)
            return s, [x, w, b]

        return call

    return build


def _folded(adapt: str):
    def build(shape, dtype):
        from snnorm.params import AdaptParameters, LIFParameters, MPBNParameters
        from snnorm.surrogate import Sigmoid

        x, v0, w, b, rm, rv = _inputs(shape, dtype, grad=False)
        ops = _ops()
        lif = LIFParameters(Sigmoid(), tau=2.0, decay_input=False, v_reset=0.0, detach_reset=False)
        norm = MPBNParameters(eps=1e-5, carry="normalized")
        adapting = AdaptParameters(mode=adapt, momentum=0.1, decay=0.9, min_momentum=0.01)

        def call():
            s, *_ = ops.mpbn_lif_folded(x, v0, rm, rv, w, b, 1.0, lif, norm, adapting)
            return s, []

        return call

    return build


def _tebn(training: bool):
    def build(shape, dtype):
        x, _, w, b, rm, rv = _inputs(shape, dtype, grad=training)
        p = torch.linspace(0.5, 1.5, shape[0], dtype=dtype).requires_grad_(training)
        ops = _ops()

        def call():
            return ops.tebn(x, w, b, rm, rv, p, training=training, momentum=0.1, eps=1e-5), [x, w, b, p]

        return call

    return build


def _tab(training: bool):
    def build(shape, dtype):
        T, C = shape[0], shape[2]
        x, *_ = _inputs(shape, dtype, grad=training)
        g = torch.Generator().manual_seed(1)  # per-step parameters and running statistics: [T, C]
        w = (1.0 + 0.2 * torch.randn(T, C, generator=g)).to(dtype).requires_grad_(training)
        b = (0.1 * torch.randn(T, C, generator=g)).to(dtype).requires_grad_(training)
        rm = (0.1 * torch.randn(T, C, generator=g)).to(dtype)
        rv = (1.0 + 0.1 * torch.rand(T, C, generator=g)).to(dtype)
        p = torch.linspace(0.5, 1.5, T, dtype=dtype).requires_grad_(training)
        ops = _ops()

        def call():
            y, _ = ops.tab(x, w, b, rm, rv, p, training=training, momentum=[0.1] * T, eps=1e-5)
            return y, [x, w, b, p]

        return call

    return build


def _batch_norm_seq(training: bool):
    def build(shape, dtype):
        x, _, w, b, rm, rv = _inputs(shape, dtype, grad=training)
        ops = _ops()

        def call():
            return ops.batch_norm_seq(x, w, b, rm, rv, training=training, momentum=0.1, eps=1e-5), [x, w, b]

        return call

    return build


def _bntt(training: bool):
    def build(shape, dtype):
        T, C = shape[0], shape[2]
        x, *_ = _inputs(shape, dtype, grad=training)
        g = torch.Generator().manual_seed(1)  # per-step γ_t and running statistics
        ws = [(1.0 + 0.2 * torch.randn(C, generator=g)).to(dtype).requires_grad_(training) for _ in range(T)]
        rms = [(0.1 * torch.randn(C, generator=g)).to(dtype) for _ in range(T)]
        rvs = [(1.0 + 0.1 * torch.rand(C, generator=g)).to(dtype) for _ in range(T)]
        ops = _ops()

        def call():
            y = ops.bntt(x, ws, rms, rvs, training=training, momentum=[0.1] * T, eps=[1e-5] * T)
            return y, [x, *ws]

        return call

    return build


def _norm_lif(rule: str, training: bool):
    """The fused norm → LIF op (snnorm/kernels/norm_lif.py) for pipeline rule ``rule``:
    ``[C]`` parameters (``batch_norm``, ``tebn``) or per step ``[T, C]`` (``bntt``, ``tab``)."""

    def build(shape, dtype):
        from snnorm.params import LIFParameters
        from snnorm.surrogate import Sigmoid

        T, C = shape[0], shape[2]
        x, *_ = _inputs(shape, dtype, grad=training)
        g = torch.Generator().manual_seed(1)
        per_step = rule in ("bntt", "tab")
        rows = (T, C) if per_step else (C,)
        w = (1.0 + 0.2 * torch.randn(rows, generator=g)).to(dtype).requires_grad_(training)
        b = None if rule == "bntt" else (0.1 * torch.randn(rows, generator=g)).to(dtype).requires_grad_(training)
        rm = (0.1 * torch.randn(rows, generator=g)).to(dtype)
        rv = (1.0 + 0.1 * torch.rand(rows, generator=g)).to(dtype)
        p = torch.linspace(0.5, 1.5, T, dtype=dtype).requires_grad_(training) if rule in ("tebn", "tab") else None
        momentum = [0.1] * (T if per_step else 1)
        neuron = LIFParameters(Sigmoid(), tau=2.0, decay_input=True, v_reset=0.0)
        ops = _ops()

        def call():
            s, _ = ops.norm_lif(rule, x, 0.0, w, b, p, rm, rv, momentum=momentum, eps=1e-5, batch_stats=training,
                                threshold=1.0, neuron=neuron)
            return s, [t for t in (x, w, b, p) if t is not None]

        return call

    return build


# Paths by the shape that reaches them (what ran: the kernels column).
RESIDENT = "resident: one program per channel (C ≥ 132, channel ≤ 2048)"
PIPELINED, PIPELINED_SMALL = "pipelined, M > 8192", "pipelined, small M and C < 132"
ELEMENTWISE = "elementwise"

CASES: tuple[Case, ...] = (
    Case("lif", "lif", ELEMENTWISE, SMALL_M, _lif, True),
    Case("mpbn-train-resident", "mpbn_lif train", RESIDENT, RESIDENT_M, _mpbn(True), True),
    Case("mpbn-train-pipelined", "mpbn_lif train", PIPELINED, LARGE_M, _mpbn(True), True),
    Case("mpbn-train-pipelined-small", "mpbn_lif train", PIPELINED_SMALL, SMALL_M, _mpbn(True), True),
    Case("mpbn-eval", "mpbn_lif eval", ELEMENTWISE, SMALL_M, _mpbn(False), False),
    Case("folded", "mpbn_lif_folded", ELEMENTWISE, SMALL_M, _folded("none"), False),
    Case("adapt-resident", "mpbn_lif_folded adapt", RESIDENT + ", adapt=batch", RESIDENT_M, _folded("batch"), False),
    Case("adapt-pipelined", "mpbn_lif_folded adapt", PIPELINED + ", adapt=running", LARGE_M, _folded("running"),
         False),
    Case("tebn-train", "tebn train", "batch statistics", SMALL_M, _tebn(True), True),
    Case("tebn-eval", "tebn eval", "running statistics", SMALL_M, _tebn(False), False),
    Case("tab-train", "tab train", "prefix statistics", SMALL_M, _tab(True), True),
    Case("tab-eval", "tab eval", "running statistics", SMALL_M, _tab(False), False),
    Case("bn-train", "batch_norm_seq train", "batch statistics", SMALL_M, _batch_norm_seq(True), True),
    Case("bn-eval", "batch_norm_seq eval", "running statistics", SMALL_M, _batch_norm_seq(False), False),
    Case("bntt-train", "bntt train", "per-step statistics", SMALL_M, _bntt(True), True),
    Case("bntt-eval", "bntt eval", "running statistics", SMALL_M, _bntt(False), False),
    Case("norm-lif-bn-train", "norm_lif train", "BN → LIF fused, batch statistics", SMALL_M,
         _norm_lif("batch_norm", True), True),
    Case("norm-lif-tab-train", "norm_lif train", "TAB → LIF fused, prefix statistics", SMALL_M,
         _norm_lif("tab", True), True),
    Case("norm-lif-bntt-train", "norm_lif train", "BNTT → LIF fused, per-step statistics", SMALL_M,
         _norm_lif("bntt", True), True),
    Case("norm-lif-tebn-eval", "norm_lif eval", "TEBN → LIF fused, running statistics", SMALL_M,
         _norm_lif("tebn", False), False),
)


@dataclasses.dataclass
class Row:
    case: str
    op: str
    path: str
    direction: str  # "fwd" | "bwd"
    shape: tuple
    dtype: str
    launches: int
    load_bytes: int
    store_bytes: int
    kernels: str  # kernel×launches and its B/elem-step, in launch order
    torch_calls: int  # torch operations outside the kernels (each a launch on a GPU)
    torch_bytes: int
    torch_ops: str  # operator×calls, in call order

    @property
    def elem_steps(self) -> int:
        return math.prod(self.shape)

    @property
    def bytes_per_elem_step(self) -> float:
        return (self.load_bytes + self.store_bytes) / self.elem_steps

    @property
    def torch_bytes_per_elem_step(self) -> float:
        return self.torch_bytes / self.elem_steps

    @property
    def floor(self) -> float | None:
        f = FLOOR.get((self.op, self.direction))
        return None if f is None or self.dtype != "fp32" else float(f)


def measure(case: Case, dtype: torch.dtype = torch.float32) -> list[Row]:
    """One call of ``case``: a row for its forward and, if it has one, its backward."""
    dt = str(dtype).replace("torch.", "").replace("float", "fp")

    def row(direction: str, t: Traffic) -> Row:
        return Row(case.name, case.op, case.path, direction, case.shape, dt, t.launches, t.load_bytes,
                   t.store_bytes, t.breakdown(math.prod(case.shape)), t.torch_calls, t.torch_bytes,
                   t.torch_breakdown())

    with torch.enable_grad() if case.backward else torch.no_grad():
        call = case.build(case.shape, dtype)
        with meter() as fwd:
            out, leaves = call()
    rows = [row("fwd", fwd)]
    if case.backward:
        grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.dtype)
        with meter() as bwd:
            torch.autograd.grad(out, leaves, grad_out)
        rows.append(row("bwd", bwd))
    return rows


CSV_COLUMNS = ("case", "op", "path", "direction", "shape", "dtype", "elem_steps", "launches", "load_bytes", "store_bytes",
               "bytes_per_elem_step", "floor", "kernels", "torch_calls", "torch_bytes", "torch_bytes_per_elem_step",
               "torch_ops")


def _shape_str(shape) -> str:
    return "x".join(str(d) for d in shape)


def write_csv(rows: list[Row], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(CSV_COLUMNS)
        for r in rows:
            w.writerow([r.case, r.op, r.path, r.direction, _shape_str(r.shape), r.dtype, r.elem_steps, r.launches,
                        r.load_bytes, r.store_bytes, f"{r.bytes_per_elem_step:.4f}",
                        "" if r.floor is None else f"{r.floor:g}", r.kernels, r.torch_calls, r.torch_bytes,
                        f"{r.torch_bytes_per_elem_step:.4f}", r.torch_ops])


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def markdown(rows: list[dict]) -> list[str]:
    """The traffic table (from CSV rows, so perf.report can render it too)."""
    lines = [
        "| op | path | dir | shape [T,N,C,H,W] | B/elem-step | floor | ×floor | launches | kernel×launches B/elem-step "
        "| torch ops | torch B/elem-step |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        b = float(r["bytes_per_elem_step"])
        floor = float(r["floor"]) if r["floor"] else None
        ratio = f"{b / floor:.2f}" if floor else "–"
        lines.append(
            f"| {r['op']} | {r['path']} | {r['direction']} | {r['shape']} | {b:.2f} | "
            f"{'–' if floor is None else f'{floor:g}'} | {ratio} | {r['launches']} | {r['kernels']} | "
            f"{r['torch_calls']} | {float(r['torch_bytes_per_elem_step']):.2f} |"
        )
    return lines


def section(results_dir: Path) -> list[str]:
    """The RESULTS.md section for ``results_dir/traffic.csv`` (empty if there is none)."""
    path = Path(results_dir) / "traffic.csv"
    if not path.exists():
        return []
    rows = read_csv(path)
    return [
        "## Memory traffic per op call (counted under the Triton interpreter)",
        "",
        "Generated by `python -m perf.traffic` (how it counts: its docstring). Bytes every kernel loads "
        "and stores (masked-in lanes × element size) per element-step, bytes / (T·N·C·H·W), and kernel "
        f"launches, one call of each op at {rows[0]['dtype'] if rows else 'fp32'}; floor: DESIGN.md §4. "
        "Per-channel constants and the initial state v0 count once per lane that loads them. "
        "*torch ops*: torch operations of the op call outside its kernels (launcher glue, zero "
        "gradients that autograd materialises), each a launch of its own on a GPU, and their bytes "
        "(inputs read and outputs written once). `tests/test_traffic.py` holds the budgets.",
        "",
        *markdown(rows),
        "",
    ]


def main(argv=None) -> list[Row]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "traffic.csv"))
    args = p.parse_args(argv)
    rows = [r for case in CASES for r in measure(case)]
    out = Path(args.out)
    write_csv(rows, out)
    print("\n".join(markdown(read_csv(out))))
    print(f"\nwrote {out}")
    return rows


if __name__ == "__main__":
    main()
