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

What it measures for snnorm's op table (every op and mode, forward and backward, on shapes that
reach every launcher path) is :mod:`perf.tools.traffic`; ``python -m perf.traffic`` prints it.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Callable, Iterator

import torch

if not torch.cuda.is_available():  # before anything imports triton
    import os

    os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np  # noqa: E402
import triton  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402


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
               "aten::new_empty_strided", "aten::detach", "aten::detach_", "aten::lift_fresh", "aten::alias", "aten::resize_"}
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
            "perf.tools.meter counts kernels run by the Triton interpreter, but triton compiles "
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
