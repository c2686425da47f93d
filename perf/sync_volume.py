"""Bytes a synchronised layer sends across ranks per training step: a 2-process CPU run.

Two processes (gloo on CPU) train each synchronised layer alone — multi-step BN, tdBN,
TEBN, BNTT, TAB, MPBN-LIF and a fused TEBN → LIF block — for two steps, on the torch
backend and (interpreted on a machine without CUDA) the triton backend, and count every
collective of the second step (the first adds the layer's one-off T/C check) with
:func:`snnorm.backends.sync.count_collectives`: how many all-gathers (forward partials)
and backward reductions (triton: an all-reduce of the gradient sums; torch: the
reduce-scatter that is the autograd of its gather), and their bytes, per layer per step. The
sizes are counted, not timed, so they do not depend on the machine. Two shapes with
different N·spatial show that the bytes depend on T and C only.

Rows go to ``perf/results/sync_volume.csv``; ``bytes_per_TC`` divides a step's bytes by
T·C. Run: ``python -m perf.sync_volume [--smoke]``.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import warnings
from pathlib import Path

import torch

if not torch.cuda.is_available():  # before anything imports triton
    os.environ.setdefault("TRITON_INTERPRET", "1")

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from perf import harness as H  # noqa: E402

NAME = "sync_volume"
#: per-rank [T, N, C, H, W]: the second shape has 4× the elements per (t, c) of the first
SHAPES = {"smoke": [(2, 2, 4, 4, 4)], "quick": [(4, 4, 16, 8, 8), (4, 8, 16, 16, 16)]}
LAYERS = ("batch_norm", "tdbn", "tebn", "bntt", "tab", "mpbn_lif", "tebn+lif fused")


def build(kind: str, T: int, C: int, backend: str) -> torch.nn.Module:
    from snnorm import convert_sync_batchnorm, functional, layer, neuron

    make = {
        "batch_norm": lambda: layer.BatchNorm2d(C, step_mode="m"),
        "tdbn": lambda: layer.ThresholdDependentBatchNorm2d(1.0, 0.5, C),
        "tebn": lambda: layer.TemporalEffectiveBatchNorm2d(T, C),
        "bntt": lambda: layer.BatchNormThroughTime2d(T, C, step_mode="m"),
        "tab": lambda: layer.TemporalAccumulatedBatchNorm2d(T, C),
        "mpbn_lif": lambda: neuron.MPBNLIFNode(out_channels=C, step_mode="m"),
        "tebn+lif fused": lambda: torch.nn.Sequential(layer.TemporalEffectiveBatchNorm2d(T, C),
                                                      neuron.LIFNode(step_mode="m", v_threshold=0.2)),
    }
    net = make[kind]()
    functional.set_backend(net, backend)
    if kind.endswith("fused"):
        functional.fuse_norm_neurons(net)
    return convert_sync_batchnorm(net)


def _worker(rank: int, world: int, port: int, out_dir: str, grid: str, backends: list) -> None:
    """One rank: every layer of the grid, two training steps each; its (backend, shape,
    layer, collective log of the second step) tuples saved for the parent."""
    import torch.distributed as dist

    from snnorm import functional
    from snnorm.backends.sync import count_collectives

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    torch.set_num_threads(1)
    warnings.simplefilter("ignore", UserWarning)
    rows = []
    try:
        for backend in backends:
            for shape in SHAPES[grid]:
                T, N, C, Hh, W = shape
                for kind in LAYERS:
                    net = build(kind, T, C, backend)
                    for step in range(2):
                        functional.reset_net(net)
                        x = torch.randn(T, N + rank, C, Hh, W, requires_grad=True)  # uneven ranks
                        with count_collectives() as log:
                            net(x).square().sum().backward()
                    rows.append((backend, shape, kind, log))
        torch.save(rows, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="one tiny shape")
    parser.add_argument("--out", type=Path, default=None, help="folder for sync_volume.csv (default perf/results)")
    args = parser.parse_args(argv)
    grid = "smoke" if args.smoke else "quick"
    backends = ["torch"]
    try:
        import triton  # noqa: F401

        backends.append("triton")
    except ImportError:
        pass
    env = H.environment("cpu")
    rec = H.Recorder(env)
    ranks = H.run_ranks(_worker, grid, backends)
    if ranks[0] != ranks[1]:  # N differs between the ranks; the collectives must not
        raise RuntimeError("the two ranks issued different collectives")
    rec.log(f"[{NAME}] 2 gloo ranks (N and N+1 samples), {env.device_name}; bytes per layer per training step")
    rec.log(f"{'backend':8} {'shape':14} {'layer':16} {'gathers':>7} {'reduces':>7} {'bytes':>7} {'B/(T·C)':>8}")
    for backend, shape, kind, log in ranks[0]:
        T, C = shape[0], shape[2]
        provider = f"snnorm-{backend}"
        gathers = [b for k, b in log if k == "all_gather"]
        reduces = [b for k, b in log if k in ("all_reduce", "reduce_scatter")]
        total = sum(gathers) + sum(reduces)
        shape_s = H.shape_str(shape)
        for metric, value in (("all_gathers", len(gathers)), ("all_gather_bytes", sum(gathers)),
                              ("backward_reduces", len(reduces)), ("backward_reduce_bytes", sum(reduces)),
                              ("bytes", total), ("bytes_per_TC", total / (T * C))):
            rec.add(kind, provider, "train_step", shape_s, "fp32", metric, value,
                    "per rank per step; counted, not timed")
        rec.log(f"{backend:8} {shape_s:14} {kind:16} {len(gathers):7d} {len(reduces):7d} {total:7d} {total / (T * C):8.1f}")
    path = (args.out or H.RESULTS_DIR) / f"{NAME}{'.smoke' if args.smoke else ''}.csv"
    rec.write_csv(path)
    rec.log(f"[{NAME}] {len(rec.rows)} rows -> {path}")
    return rec.rows


if __name__ == "__main__":
    main()
