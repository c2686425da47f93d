"""Bytes saved for backward by MPBN-LIF (training) and TEBN (training), per provider.

Measured with ``torch.autograd.graph.saved_tensors_hooks`` around one training forward
(see :func:`perf.tools.saved_tensor_bytes`): ``saved_total`` sums every saved tensor,
``saved_unique`` counts distinct storages, ``saved_new`` leaves out the storages of the
input and the parameters (which the caller keeps anyway): the memory that backward keeps
alive because of this layer. ``saved_new_per_elem`` divides it by T·N·C·H·W.

Saved bytes are a property of the autograd graph, not of the device's speed, so on a
machine without CUDA the ``snnorm-triton`` provider runs under the Triton interpreter
(``TRITON_INTERPRET=1``, set here before triton is imported) and is measured too.
``snnorm-torch-compile`` saves inside compiled graphs, where the hooks may not see the
tensors or may be refused: its row says which.

Run: ``python -m perf.saved_bytes [--full | --smoke]``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():  # before anything imports triton
    os.environ.setdefault("TRITON_INTERPRET", "1")

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from perf import tools  # noqa: E402
from perf.bench_mpbn_lif import make_module as make_mpbn  # noqa: E402
from perf.bench_mpbn_lif import reference_state as mpbn_state  # noqa: E402
from perf.bench_tebn import make_tebn, tebn_state  # noqa: E402

NAME = "saved_bytes"
# [T, N, C, H, W]; small because the CPU run measures the triton provider under the interpreter.
SHAPES = {
    "smoke": [(2, 2, 4, 4, 4)],
    "quick": [(1, 4, 8, 8, 8), (4, 4, 8, 8, 8), (8, 4, 8, 8, 8), (4, 8, 16, 16, 16)],
    "full": [(1, 32, 64, 32, 32), (4, 32, 64, 32, 32), (8, 32, 64, 32, 32), (16, 32, 64, 32, 32)],
}
DTYPES = {"smoke": ("fp32",), "quick": ("fp32", "bf16"), "full": ("fp32", "bf16")}


def _build(kernel, provider, shape, dtype, device):
    T, N, C, Hh, W = shape
    base = tools.SNNORM_TORCH if provider == tools.SNNORM_COMPILE else provider
    if kernel == "mpbn_lif":
        m, reset = make_mpbn(base, C, mpbn_state(C, 0), device, dtype)
    else:
        m, reset = make_tebn(base, T, C, tebn_state(T, C, 0), device, dtype), None
    m.train()
    call = tools.compile_module(m) if provider == tools.SNNORM_COMPILE else m
    return m, call, reset


def measure(rec, env, kernel, provider, shape, dtype):
    dt = tools.dtype_name(dtype)
    add = lambda metric, value, note="": rec.add(kernel, provider, "train_fwd", tools.shape_str(shape), dt, metric, value, note)  # noqa: E731
    try:
        m, call, reset = _build(kernel, provider, shape, dtype, env.device)
        x = torch.randn(shape, device=env.device).to(dtype).requires_grad_()

        def fwd():
            if reset is not None:
                reset(m)
            return call(x)

        if provider == tools.SNNORM_COMPILE:
            tools.reset_compiler()
            fwd().sum().backward()  # compile outside the hooks
        res = tools.saved_tensor_bytes(fwd, exclude=[x, *m.parameters(), *m.buffers()])
    except Exception as err:
        add("error", None, f"saved-bytes measurement failed: {tools.short_error(err)}")
        rec.log(f"  {kernel} {provider} {tools.shape_str(shape)} {dt}: ERROR {tools.short_error(err)}")
        return
    numel = x.numel()
    note = "Triton interpreter on CPU (bytes do not depend on the device)" if (
        provider == tools.SNNORM_TRITON and not env.is_cuda) else ""
    if provider == tools.SNNORM_COMPILE and res["count"] == 0:
        note = "compiled graph: the hooks saw no saved tensor (AOTAutograd saves inside the graph)"
    add("saved_total_bytes", res["total"], note)
    add("saved_unique_bytes", res["unique"], note)
    add("saved_new_bytes", res["new"], note)
    add("saved_count", res["count"], note)
    add("saved_new_per_elem", res["new"] / numel, note)
    add("input_bytes", numel * x.element_size())
    rec.log(f"  {kernel} {provider} {tools.shape_str(shape)} {dt}: new {res['new'] / numel:.2f} B/elem-step, "
            f"total {res['total'] / numel:.2f}, {int(res['count'])} tensors {note}")


def providers(session, shape, dt) -> dict:
    """Every provider, the triton one also on a CPU (under the interpreter); the quick grid
    compiles at one point only (one compiled measurement answers whether the hooks see it)."""
    out = {tools.SNNORM_TORCH: True, tools.SPIKINGJELLY: True}
    grid = SHAPES[session.grid_name]
    if not session.args.no_compile and (session.grid_name != "quick" or (shape == grid[1] and dt == "fp32")):
        out[tools.SNNORM_COMPILE] = True
    out[tools.SNNORM_TRITON] = tools.triton_unavailable() or True
    return out


def grid(name: str):
    for dt in DTYPES[name]:
        for shape in SHAPES[name]:
            yield "-", shape, dt


def run_point(session, shape, dtype, providers):
    for kernel in ("mpbn_lif", "tebn"):
        for provider, avail in providers.items():
            if isinstance(avail, str):
                session.rec.add(kernel, provider, "train_fwd", tools.shape_str(shape), tools.dtype_name(dtype),
                                "skipped", None, avail)
            else:
                measure(session.rec, session.env, kernel, provider, shape, dtype)


def main(argv=None) -> list[dict]:
    return tools.run_sweep(__doc__, NAME, grid, run_point, argv, providers=providers).rec.rows


if __name__ == "__main__":
    main()
