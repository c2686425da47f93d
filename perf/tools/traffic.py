"""Bytes and launches of every op and mode of snnorm's triton op table, one call each.

Each :data:`CASES` entry runs one op call at fp32 on a shape that reaches one launcher path
(MPBN-LIF training: the one-program-per-channel path for M = N·H·W ≤ 8192 and the split path
above), forward and backward apart, inside :func:`perf.tools.traffic_meter.meter`, and
:func:`measure` gives bytes per element-step — bytes / (T·N·C·H·W) — and launches next to
the floor of DESIGN.md §4 (the bytes a kernel must move: read its inputs once, write its
outputs once, save what backward needs)::

    python -m perf.traffic            # markdown table; writes perf/results/traffic.csv

``tests/test_traffic.py`` holds the budgets (a regression fails CI); ``perf.report`` renders
:func:`section` into RESULTS.md.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import math
from pathlib import Path
from typing import Callable

import torch

from perf.tools.traffic_meter import Traffic, meter

#: where ``python -m perf.traffic`` writes its rows
TRAFFIC_CSV = Path(__file__).resolve().parents[1] / "results" / "traffic.csv"

#: [T, N, C, H, W]: M = N·H·W = 256 takes MPBN-LIF's one-program-per-channel path,
#: M = 8450 > 8192 its split path. T = 3 as in DESIGN.md §4's table.
SMALL_M = (3, 4, 3, 8, 8)
LARGE_M = (3, 2, 2, 65, 65)
#: C ≥ 132 channels of at most 2048 (padded) elements: the one-program-per-channel path
RESIDENT_M = (3, 2, 132, 4, 4)

#: [T, N, L, D]: rows of D = 256 features (a spiking transformer's tokens) for the row norms
ROWS_D = (3, 2, 8, 256)

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
    # LayerNorm/RMSNorm over rows (per-row statistics in the kernel): read x, write y; backward
    # reads x, ∂y and writes ∂x. Fused with a LIF: read x, write s; backward reads x, ∂s, writes ∂x
    ("row_norm", "fwd"): 8,
    ("row_norm", "bwd"): 12,
    ("row_norm_lif", "fwd"): 8,
    ("row_norm_lif", "bwd"): 12,
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


def _row_norm(rms: bool, lif: bool):
    """LayerNorm (or RMSNorm) over the last dim of ``[T, N, L, D]``, alone or fused with a LIF
    (``row_norm_lif``, the neurons' default float initial state)."""

    def build(shape, dtype):
        from snnorm.params import LIFParameters
        from snnorm.surrogate import Sigmoid

        D = shape[-1]
        g = torch.Generator().manual_seed(0)
        x = (torch.randn(shape, generator=g) * 1.5 + 0.5).to(dtype).requires_grad_()
        w = (1.0 + 0.2 * torch.randn(D, generator=g)).to(dtype).requires_grad_()
        b = None if rms else (0.1 * torch.randn(D, generator=g)).to(dtype).requires_grad_()
        leaves = [t for t in (x, w, b) if t is not None]
        neuron = LIFParameters(Sigmoid(), tau=2.0, decay_input=True, v_reset=0.0)
        ops = _ops()

        def call():
            if lif:
                s, _ = ops.row_norm_lif(x, 0.0, w, b, eps=1e-5, rms=rms, threshold=1.0, neuron=neuron)
                return s, leaves
            return ops.row_norm(x, w, b, eps=1e-5, rms=rms), leaves

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
    Case("layer-norm", "row_norm", "LayerNorm, one row per tile", ROWS_D, _row_norm(rms=False, lif=False), True),
    Case("rms-norm", "row_norm", "RMSNorm, one row per tile", ROWS_D, _row_norm(rms=True, lif=False), True),
    Case("layer-norm-lif", "row_norm_lif", "LayerNorm → LIF fused, all T in one segment", ROWS_D,
         _row_norm(rms=False, lif=True), True),
    Case("rms-norm-lif", "row_norm_lif", "RMSNorm → LIF fused, all T in one segment", ROWS_D,
         _row_norm(rms=True, lif=True), True),
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
    p.add_argument("--out", default=str(TRAFFIC_CSV))
    args = p.parse_args(argv)
    rows = [r for case in CASES for r in measure(case)]
    out = Path(args.out)
    write_csv(rows, out)
    print("\n".join(markdown(read_csv(out))))
    print(f"\nwrote {out}")
    return rows


if __name__ == "__main__":
    main()
