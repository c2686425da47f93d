"""snnorm beside spikingjelly 2.0.0, block by block, in one run: bytes, launches, saved bytes.

The blocks SNNs are built of, each in training, multi-step ``[T, N, C, H, W]``, fp32:
LIF, MPBN-LIF, TEBN, and norm → LIF for BatchNorm, tdBN, TEBN, BNTT and TAB. Each block
runs once per library on the same input:

* **snnorm**: its modules, each norm → LIF pair fused (``functional.fuse_norm_neurons``), with
  ``set_backend(net, "triton")`` (a layer with no kernel stays on the torch backend; the
  row's note names it);
* **spikingjelly**: its ``activation_based.layer`` norms (torch) and its own Triton LIF
  kernels (``spikingjelly._ops.lif.triton``), which spikingjelly runs only on CUDA: on a
  CPU they run here under the Triton interpreter through :func:`spikingjelly_triton_lif`,
  which lifts that device check and nothing else. Its MPBN neuron has no kernel (torch).
  spikingjelly has no TAB.

Measured per block (bytes and launches per element-step use T·N·C·H·W elements):

* ``fwd`` / ``bwd``: bytes every kernel loads and stores (:func:`perf.tools.meter`, the interpreter
  meter) plus the bytes of every eager torch operation (its dispatch-mode meter: each
  input read and each output written once; views and allocations free); ``launches``:
  kernel launches plus torch operations (each is a launch on a GPU). Backward is
  ``autograd.grad(y, ..., ones)``: the gradients of the input and every parameter (none
  accumulated into a ``.grad``).
* ``saved``: distinct storages autograd keeps for backward other than parameters and
  buffers (the block's input counts: a fused block must keep it).

On a CPU nothing is timed: the interpreter's time says nothing about a GPU. On a GPU the
CLI times instead (ms per training step, ``--time``; the meter needs the interpreter) and
writes ``compare_time.csv``: the bytes are the same on every device.

Run: ``python -m perf.compare [--shape T N C H W] [--out CSV]``; ``perf.report`` puts the
table in ``perf/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import statistics
import sys
import time
import types
import warnings
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

if not torch.cuda.is_available():  # before anything imports triton
    import os

    os.environ.setdefault("TRITON_INTERPRET", "1")

from perf import tools  # noqa: E402


#: DESIGN.md §4's side-by-side shape: T=4, N=8, C=32, 16×16
DEFAULT_SHAPE = (4, 8, 32, 16, 16)
BLOCKS = ("lif", "mpbn_lif", "tebn", "bn_lif", "tdbn_lif", "tebn_lif", "bntt_lif", "tab_lif")
LIBRARIES = ("snnorm", "spikingjelly")
METRICS = ("fwd_bytes", "bwd_bytes", "fwd_launches", "bwd_launches", "saved_bytes")
COLUMNS = ("block", "library", "shape", "metric", "value", "note")
CSV_NAME = "compare.csv"

# ------------------------------------------------------------ spikingjelly's Triton LIF on CPU


@contextlib.contextmanager
def _cuda_check_lifted(module):
    """Within the block, ``module`` sees a torch whose ``_check`` and ``cuda.device`` do
    nothing: spikingjelly's launchers refuse non-CUDA tensors before launching, and the
    interpreter runs their kernels on CPU tensors unchanged."""

    class _Torch(types.ModuleType):
        def __getattr__(self, name):
            return getattr(torch, name)

    lifted = _Torch("torch")
    lifted._check = lambda cond, message=None: None
    lifted.cuda = types.SimpleNamespace(device=lambda device: contextlib.nullcontext())
    module.torch = lifted
    try:
        yield
    finally:
        module.torch = torch


class _SpikingjellyTritonLIFFunction(torch.autograd.Function):
    """spikingjelly's Triton LIF forward and backward kernels, as its registered autograd
    uses them: forward returns spikes, the final membrane and the charged membrane h
    (fp32, saved); backward gets ∂s and a zero ∂v."""

    @staticmethod
    def forward(ctx, x, v, params):
        from spikingjelly._ops.lif import triton as sj_triton

        with _cuda_check_lifted(sj_triton):
            s, v_out, h = sj_triton._forward_impl(x, v, *params, False, 0)
        ctx.save_for_backward(h)
        ctx.params, ctx.x_dtype = params, x.dtype
        return s, v_out

    @staticmethod
    def backward(ctx, gs, gv):
        from spikingjelly._ops.lif import triton as sj_triton

        (h,) = ctx.saved_tensors
        gs = torch.zeros_like(h, dtype=ctx.x_dtype) if gs is None else gs
        gv = torch.zeros_like(h[0]) if gv is None else gv
        with _cuda_check_lifted(sj_triton):
            gx, gv0 = sj_triton._backward_impl(gs, gv, h, *ctx.params, False, 0)
        return gx, gv0, None


class SpikingjellyTritonLIF(nn.Module):
    """A multi-step LIF (spikingjelly's defaults: τ = 2, decay_input, V_th = 1, hard reset
    to 0, Sigmoid α = 4) that runs spikingjelly's own Triton kernels."""

    def __init__(self, tau: float = 2.0, v_threshold: float = 1.0, v_reset: float = 0.0, alpha: float = 4.0):
        super().__init__()
        self.params = (tau, True, v_threshold, v_reset, False, alpha)  # τ, decay_input, θ, v_r, detach, α

    def forward(self, x_seq: torch.Tensor) -> torch.Tensor:
        v = torch.zeros_like(x_seq[0])
        s, _ = _SpikingjellyTritonLIFFunction.apply(x_seq, v, self.params)
        return s


# ---------------------------------------------------------------------------- the blocks


def _norm(library: str, block: str, T: int, C: int) -> nn.Module | None:
    if library == "snnorm":
        from snnorm import layer
    else:
        from spikingjelly.activation_based import layer
    kind = block.split("_")[0]
    if kind == "bn":
        return layer.BatchNorm2d(C, step_mode="m")
    if kind == "tdbn":
        return layer.ThresholdDependentBatchNorm2d(alpha=1.0, v_th=1.0, num_features=C)  # multi-step only
    if kind == "tebn":
        return layer.TemporalEffectiveBatchNorm2d(T=T, num_features=C)  # multi-step only
    if kind == "bntt":
        return layer.BatchNormThroughTime2d(T=T, num_features=C, step_mode="m")
    if kind == "tab":
        return layer.TemporalAccumulatedBatchNorm2d(T=T, num_features=C) if library == "snnorm" else None
    return None


def _neuron(library: str, block: str, C: int) -> nn.Module | None:
    if block == "tebn":
        return None
    if library == "snnorm":
        from snnorm import neuron

        if block == "mpbn_lif":
            return neuron.MPBNLIFNode(out_channels=C, step_mode="m")
        return neuron.LIFNode(step_mode="m")
    if block == "mpbn_lif":
        from spikingjelly.activation_based import neuron

        return neuron.MPBNLIFNode(out_channels=C, step_mode="m")
    return SpikingjellyTritonLIF()


def build(block: str, library: str, shape) -> tuple[nn.Module | None, str]:
    """The block as ``library`` runs it (None where the library has no such layer), in
    training, with the note for its row."""
    T, _, C = shape[:3]
    norm = None if block in ("lif", "mpbn_lif") else _norm(library, block, T, C)
    if norm is None and block not in ("lif", "mpbn_lif"):
        return None, f"{library} has no {block.split('_')[0].upper()} layer"
    modules = [m for m in (norm, _neuron(library, block, C)) if m is not None]
    net = nn.Sequential(*modules).train()
    if library != "snnorm":
        return net, "torch layers + spikingjelly's Triton LIF" if block != "mpbn_lif" else "torch (no kernel)"
    from snnorm import functional
    from snnorm.fusion import fused_block

    functional.fuse_norm_neurons(net)
    with warnings.catch_warnings():  # set_backend warns naming the layers that keep torch: the note says it
        warnings.simplefilter("ignore")
        functional.set_backend(net, "triton")
    if fused_block(net[0]) is not None:
        return net, "triton, norm → LIF fused" if fused_block(net[0]).fused_kernel_applies() else "fused, composition"
    on_torch = [type(m).__name__ for m in net if getattr(m, "backend", "torch") != "triton"]
    return net, "triton" if not on_torch else f"triton; on torch: {', '.join(on_torch)}"


def _reset(net: nn.Module) -> None:
    """Clear every memory (either library's ``reset_net`` does exactly this)."""
    for m in net.modules():
        if m is not net and callable(getattr(m, "reset", None)):
            m.reset()


def measure(net: nn.Module, x: torch.Tensor) -> dict[str, float]:
    """Bytes and launches of one training forward and backward, and the bytes saved for
    backward (module docstring), per element-step of ``x``."""
    elems = x.numel()
    leaves = [x, *net.parameters()]
    kept = [*net.parameters(), *net.buffers()]
    _reset(net)
    with tools.meter() as fwd:
        y = net(x)
    grad = torch.ones_like(y)
    with tools.meter() as bwd:  # grad(), not backward(): no accumulation into .grad counted
        torch.autograd.grad(y, [t for t in leaves if t.requires_grad], grad, allow_unused=True)
    _reset(net)
    # distinct storages saved, x's included (a fused block must keep it), parameters' and buffers' not
    saved = tools.saved_tensor_bytes(lambda: net(x), exclude=kept)["new"]
    _reset(net)
    return {
        "fwd_bytes": (fwd.bytes + fwd.torch_bytes) / elems,
        "bwd_bytes": (bwd.bytes + bwd.torch_bytes) / elems,
        "fwd_launches": fwd.launches + fwd.torch_calls,
        "bwd_launches": bwd.launches + bwd.torch_calls,
        "saved_bytes": saved / elems,
    }


def time_step(net: nn.Module, x: torch.Tensor, reps: int = 20) -> float:
    """Median wall time (ms) of one training step of ``net`` (forward, then ∂ of the input and
    parameters), after 3 warm-up steps; CUDA is synchronised around each step."""
    leaves = [t for t in (x, *net.parameters()) if t.requires_grad]
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)

    def step():
        _reset(net)
        y = net(x)
        torch.autograd.grad(y, leaves, torch.ones_like(y), allow_unused=True)

    for _ in range(3):
        step()
    times = []
    for _ in range(reps):
        sync()
        start = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def run(shape=DEFAULT_SHAPE, blocks=BLOCKS, log: Callable[[str], None] = print, timing: bool | None = None,
        device: str | None = None, reps: int = 20) -> list[dict]:
    """Rows (``COLUMNS``) for every block and library on one input of ``shape``.

    Under the Triton interpreter (a CPU): bytes, launches and saved bytes (:func:`measure`).
    With ``timing`` (the default on CUDA, where nothing can be counted): ms per training step
    (:func:`time_step`), metric ``ms_step``.
    """
    return measure_blocks(build, blocks, shape, tool="perf.compare", log=log, timing=timing, device=device, reps=reps)


def measure_blocks(build_block: Callable, blocks, shape, tool: str, log: Callable[[str], None] = print,
                   timing: bool | None = None, device: str | None = None, reps: int = 20) -> list[dict]:
    """Rows (``COLUMNS``) for every block and library of ``build_block(block, library, shape)``
    -> (net or None when the library has no such block, note) on one input of ``shape``
    (:func:`run`; ``perf.transformer`` measures its blocks the same way)."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    timing = device.type == "cuda" if timing is None else timing
    if not timing and not tools.interpreting():
        raise RuntimeError(
            f"{tool} counts bytes with the Triton interpreter's meter: run it on a CPU "
            "(TRITON_INTERPRET=1 is set here when no CUDA device is visible), or time with --time"
        )
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(shape, generator=g) * 1.5 + 0.5).to(device).requires_grad_()
    width = max(len(block) for block in blocks)
    rows = []
    for block in blocks:
        for library in LIBRARIES:
            torch.manual_seed(0)
            net, note = build_block(block, library, shape)
            row = dict(block=block, library=library, shape=tools.shape_str(shape), note=note)
            if net is None:
                rows.append(dict(row, metric="absent", value=""))
                continue
            net = net.to(device)
            if timing:
                ms = time_step(net, x, reps)
                rows.append(dict(row, metric="ms_step", value=f"{ms:.4g}"))
                log(f"{block:{width}s} {library:12s} {ms:8.3f} ms per training step  [{note}]")
                continue
            values = measure(net, x)
            rows += [dict(row, metric=metric, value=f"{values[metric]:.4g}") for metric in METRICS]
            log(f"{block:{width}s} {library:12s} fwd {values['fwd_bytes']:6.2f} B ({values['fwd_launches']:4.0f}) "
                f"bwd {values['bwd_bytes']:6.2f} B ({values['bwd_launches']:4.0f}) "
                f"saved {values['saved_bytes']:5.2f} B  [{note}]")
    return rows


def write_csv(rows: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows(rows)


def read_rows(path: Path) -> dict[tuple[str, str], dict[str, str]]:
    table: dict[tuple[str, str], dict[str, str]] = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            entry = table.setdefault((row["block"], row["library"]), {"note": row["note"], "shape": row["shape"]})
            entry[row["metric"]] = row["value"]
    return table


def markdown(path: Path, blocks=BLOCKS) -> list[str]:
    """The side-by-side table: per block of ``blocks``, each library's fwd + bwd bytes (launches)
    and saved bytes, and spikingjelly's bytes over snnorm's."""
    table = read_rows(path)
    lines = [
        "| block | snnorm fwd + bwd B (launches) | saved | spikingjelly fwd + bwd B (launches) | saved "
        "| spikingjelly / snnorm bytes | snnorm runs on |",
        "|---|---|---|---|---|---|---|",
    ]

    def cell(e):
        if e is None or "absent" in e:
            return "—", "—", None
        fb, bb = float(e["fwd_bytes"]), float(e["bwd_bytes"])
        fl, bl = float(e["fwd_launches"]), float(e["bwd_launches"])
        return f"{fb:.1f} + {bb:.1f} = **{fb + bb:.1f}** ({fl:.0f} + {bl:.0f})", f"{float(e['saved_bytes']):.1f}", fb + bb

    for block in blocks:
        ours, theirs = table.get((block, "snnorm")), table.get((block, "spikingjelly"))
        if ours is None:
            continue
        (o, os_, ob), (t, ts, tb) = cell(ours), cell(theirs)
        ratio = f"{tb / ob:.2f}×" if ob and tb else "—"
        lines.append(f"| {block} | {o} | {os_} | {t} | {ts} | {ratio} | {ours['note']} |")
    return lines


def section(results_dir: Path) -> list[str]:
    """The RESULTS.md section for ``results_dir/compare.csv`` (empty if there is none)."""
    path = Path(results_dir) / CSV_NAME
    if not path.exists():
        return []
    shape = next(iter(read_rows(path).values()))["shape"]
    return [
        "## Side by side with spikingjelly 2.0.0 (counted under the Triton interpreter)",
        "",
        f"Generated by `python -m perf.compare` (how it counts: its docstring): training, fp32, "
        f"[T, N, C, H, W] = {shape.replace('x', ', ')}, bytes per element-step (kernels' loads and "
        "stores plus eager torch operations), launches (kernels plus torch operations), and bytes "
        "saved for backward (distinct storages other than parameters and buffers, the block's input "
        "included). spikingjelly's side is its torch layers and its own Triton LIF kernels.",
        "",
        *markdown(path),
        "",
    ]


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", type=int, nargs=5, default=list(DEFAULT_SHAPE), metavar=("T", "N", "C", "H", "W"))
    p.add_argument("--blocks", nargs="*", default=list(BLOCKS), choices=BLOCKS)
    p.add_argument("--out", default=None, help="CSV (default: perf/results/compare.csv, or compare_time.csv timing)")
    p.add_argument("--time", action="store_true", help="time training steps instead of counting (default on CUDA)")
    args = p.parse_args(argv)
    timing = args.time or torch.cuda.is_available()
    rows = run(tuple(args.shape), args.blocks, timing=timing)
    # bytes are device-independent (perf/results/); times belong to the device (perf/results/<device>/)
    out = Path(args.out) if args.out else (tools.results_path(tools.environment(), "compare_time") if timing
                                           else tools.RESULTS_DIR / CSV_NAME)
    write_csv(rows, out)
    if not timing:
        print("\n".join(markdown(out)))
    print(f"\nwrote {out}")
    return rows


if __name__ == "__main__":
    main()
