"""Bytes saved for backward by MPBN-LIF (training) and TEBN (training), per provider.

Measured with ``torch.autograd.graph.saved_tensors_hooks`` around one training forward
(see :func:`perf.harness.saved_tensor_bytes`): ``saved_total`` sums every saved tensor,
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

from perf import harness as H  # noqa: E402
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
    base = H.SNNORM_TORCH if provider == H.SNNORM_COMPILE else provider
    if kernel == "mpbn_lif":
        m, reset = make_mpbn(base, C, mpbn_state(C, 0), device, dtype)
    else:
        m, reset = make_tebn(base, T, C, tebn_state(T, C, 0), device, dtype), None
    m.train()
    call = H.compile_module(m) if provider == H.SNNORM_COMPILE else m
    return m, call, reset


def measure(rec, env, kernel, provider, shape, dtype):
    dt = H.dtype_name(dtype)
    add = lambda metric, value, note="": rec.add(kernel, provider, "train_fwd", H.shape_str(shape), dt, metric, value, note)  # noqa: E731
    try:
        m, call, reset = _build(kernel, provider, shape, dtype, env.device)
        x = torch.randn(shape, device=env.device).to(dtype).requires_grad_()

        def fwd():
            if reset is not None:
                reset(m)
            return call(x)

        if provider == H.SNNORM_COMPILE:
            H.reset_compiler()
            fwd().sum().backward()  # compile outside the hooks
        res = H.saved_tensor_bytes(fwd, exclude=[x, *m.parameters(), *m.buffers()])
    except Exception as err:
        add("error", None, f"saved-bytes measurement failed: {H._short(err)}")
        rec.log(f"  {kernel} {provider} {H.shape_str(shape)} {dt}: ERROR {H._short(err)}")
        return
    numel = x.numel()
    note = "Triton interpreter on CPU (bytes do not depend on the device)" if (
        provider == H.SNNORM_TRITON and not env.is_cuda) else ""
    if provider == H.SNNORM_COMPILE and res["count"] == 0:
        note = "compiled graph: the hooks saw no saved tensor (AOTAutograd saves inside the graph)"
    add("saved_total_bytes", res["total"], note)
    add("saved_unique_bytes", res["unique"], note)
    add("saved_new_bytes", res["new"], note)
    add("saved_count", res["count"], note)
    add("saved_new_per_elem", res["new"] / numel, note)
    add("input_bytes", numel * x.element_size())
    rec.log(f"  {kernel} {provider} {H.shape_str(shape)} {dt}: new {res['new'] / numel:.2f} B/elem-step, "
            f"total {res['total'] / numel:.2f}, {int(res['count'])} tensors {note}")


def providers(env, args) -> dict:
    out = {H.SNNORM_TORCH: True, H.SPIKINGJELLY: True}
    if not args.no_compile:
        out[H.SNNORM_COMPILE] = True
    from snnorm.backends import BackendUnavailableError, get_ops

    try:
        get_ops("triton")
        out[H.SNNORM_TRITON] = True
    except (BackendUnavailableError, ImportError) as err:
        out[H.SNNORM_TRITON] = f"triton backend unavailable: {H._short(err)}"
    return out


def main(argv=None) -> list[dict]:
    args = H.common_argparser(__doc__.splitlines()[0]).parse_args(argv)
    H.apply_threads(args)
    env = H.environment(args.device)
    name = H.grid_name(args)
    rec = H.Recorder(env, verbose=not args.quiet)
    rec.log(f"[{NAME}] {env.device_name}, grid {name}")
    provs = providers(env, args)
    for dt in DTYPES[name]:
        for shape in SHAPES[name]:
            if not H.selected(args, f"- {H.shape_str(shape)} {dt}"):
                continue
            for kernel in ("mpbn_lif", "tebn"):
                for provider, avail in provs.items():
                    if isinstance(avail, str):
                        rec.add(kernel, provider, "train_fwd", H.shape_str(shape), dt, "skipped", None, avail)
                        continue
                    if provider == H.SNNORM_COMPILE and name == "quick" and (shape != SHAPES[name][1] or dt != "fp32"):
                        continue  # one compiled measurement is enough on CPU (it answers whether hooks see it)
                    measure(rec, env, kernel, provider, shape, H.DTYPES[dt])
    path = H.results_path(env, H.csv_name(args, NAME), args.out)
    rec.write_csv(path)
    rec.log(f"[{NAME}] {len(rec.rows)} rows -> {path}")
    return rec.rows


if __name__ == "__main__":
    main()
