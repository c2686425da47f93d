"""What only a GPU can confirm (issue: "ready for the first real GPU user"), as probes that
:mod:`perf.gpu_check` runs after the tests. Each probe is a row of ``probes.csv``, written as it
finishes (a timeout keeps what ran): ``probe, case, status (ok / FAIL / skipped), detail, seconds``.

* ``graph``: every op's training forward and backward captured with ``torch.cuda.graph`` and
  replayed once equals an eager step on an identical copy (outputs, ∂x, running statistics):
  no host↔device synchronisation and no host-built device tensor inside an op.
* ``grid``: launches at shapes whose grids would pass CUDA's limits (axes 1 and 2 ≤ 65,535)
  if the large dimension sat there: LIF with C > 65,535, fused norm → LIF with N·S > 2²⁴,
  BN-family ops at N = 256, 224×224; each equals the torch backend.
* ``index64``: a LIF and a multi-step BN over more than 2³¹ elements (fp16, a channels-last
  view read in place) equal the same op on a contiguous copy.
* ``device``: an op on ``cuda:1`` while ``cuda:0`` is current (two or more GPUs).
* ``nccl``: synchronised BN and fused BN → LIF on a one-rank nccl group equal the unsynchronised
  modules.

``--dry`` (CI) runs the same code on the CPU through the Triton interpreter at tiny shapes;
what needs CUDA (graph capture, a second device, nccl) is a ``skipped`` row that says so.
"""

from __future__ import annotations

import copy
import csv
import os
import tempfile
import time
import traceback
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

COLUMNS = ("probe", "case", "status", "detail", "seconds")


class ProbeLog:
    """``probes.csv``, a row appended and flushed per finished probe."""

    def __init__(self, path: Path, log: Callable[[str], None] = print) -> None:
        self.path, self.log, self.rows = path, log, []
        with open(path, "w", newline="") as f:
            csv.DictWriter(f, fieldnames=COLUMNS).writeheader()

    def add(self, probe: str, case: str, status: str, detail: str = "", seconds: float = 0.0) -> None:
        row = dict(probe=probe, case=case, status=status, detail=detail[:300], seconds=f"{seconds:.2f}")
        self.rows.append(row)
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, fieldnames=COLUMNS).writerow(row)
        self.log(f"probe {probe} {case}: {detail[:160] if status == 'skipped' else f'{status} {detail[:160]}'}")

    def run(self, probe: str, case: str, fn: Callable[[], str | None]) -> None:
        t = time.monotonic()
        try:
            detail = fn() or ""
            status = "skipped" if detail.startswith("skipped") else "ok"
        except Exception as err:  # a failing probe is a row; the others still run
            status, detail = "FAIL", f"{type(err).__name__}: {err} | {traceback.format_exc(limit=3)[-200:]}"
        self.add(probe, case, status, detail, time.monotonic() - t)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    @property
    def failures(self) -> int:
        return sum(r["status"] == "FAIL" for r in self.rows)


# ----------------------------------------------------------------------------- the blocks


def blocks(T: int, C: int) -> dict[str, Callable[[], nn.Module]]:
    """Every op family as a module (the fused ones through ``fuse_norm_neurons``), multi-step."""
    from snnorm import layer, neuron

    def fused(norm: nn.Module) -> nn.Module:
        from snnorm import functional

        return functional.fuse_norm_neurons(nn.Sequential(norm, neuron.LIFNode(step_mode="m")))

    made = {
        "lif": lambda: neuron.LIFNode(step_mode="m"),
        "mpbn_lif": lambda: neuron.MPBNLIFNode(out_channels=C, step_mode="m"),
        "bn": lambda: layer.BatchNorm2d(C, step_mode="m"),
        "tebn": lambda: layer.TemporalEffectiveBatchNorm2d(T=T, num_features=C),
        "bntt": lambda: layer.BatchNormThroughTime2d(T=T, num_features=C, step_mode="m"),
        "tab": lambda: layer.TemporalAccumulatedBatchNorm2d(T=T, num_features=C),
        "tdbn_lif": lambda: fused(layer.ThresholdDependentBatchNorm2d(alpha=1.0, v_th=1.0, num_features=C)),
    }
    if hasattr(layer, "LayerNorm"):  # over the last dim: the input's W is D
        made["layernorm_lif"] = lambda: fused(layer.LayerNorm(C, step_mode="m"))
    return made


def _on(module: nn.Module, backend: str, device) -> nn.Module:
    import warnings

    from snnorm import functional

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        functional.set_backend(module, backend)
    return module.to(device).train()


def _reset(module: nn.Module) -> None:
    from snnorm import functional

    functional.reset_net(module)


def _input(name: str, shape, device, dtype=torch.float32, seed: int = 0) -> torch.Tensor:
    T, N, C, H, W = shape
    if name == "layernorm_lif":  # rows of D = C features
        shape = (T, N, H, W, C)
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * 1.5 + 0.5).to(device=device, dtype=dtype)


def _close(a: torch.Tensor, b: torch.Tensor, what: str, rtol=1e-4, atol=1e-5) -> None:
    torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


def _train_step(module: nn.Module, x: torch.Tensor, grad: torch.Tensor):
    _reset(module)
    y = module(x)
    (gx,) = torch.autograd.grad(y, x, grad)
    return y, gx


# ----------------------------------------------------------------------------- the probes


def graph_probe(name: str, make, shape, device) -> str:
    if device.type != "cuda":
        return "skipped: torch.cuda.graph needs CUDA"
    torch.manual_seed(0)
    eager = _on(make(), "triton", device)
    graphed = copy.deepcopy(eager)
    x = _input(name, shape, device).requires_grad_()
    grad = torch.randn_like(x)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up (compiles the kernels) on both copies alike
        for module in (eager, graphed):
            for _ in range(2):
                _train_step(module, x, grad)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y_static, gx_static = _train_step(graphed, x, grad)
    graph.replay()
    y, gx = _train_step(eager, x, grad)
    torch.cuda.synchronize()
    _close(y_static, y, f"{name} forward replayed")
    _close(gx_static, gx, f"{name} ∂x replayed")
    for (key, a), b in zip(graphed.state_dict().items(), eager.state_dict().values()):
        _close(a, b, f"{name} {key} after one replay")
    return f"shape {tuple(x.shape)}"


def against_torch(name: str, make, x: torch.Tensor, rtol=1e-4, atol=1e-5) -> None:
    """The triton module's training output and ∂x equal the torch backend's (spikes may flip only
    where the two rounding orders meet θ: at most 1e-4 of them)."""
    torch.manual_seed(0)
    ref = _on(make(), "torch", x.device)
    mod = _on(copy.deepcopy(ref), "triton", x.device)
    xs = [x.detach().clone().requires_grad_() for _ in range(2)]
    grad = torch.ones_like(x)
    (y, gx), (y_ref, gx_ref) = _train_step(mod, xs[0], grad), _train_step(ref, xs[1], grad)
    differ = (y != y_ref).float().mean().item()
    spiking = name.endswith("lif")
    if spiking and differ > 1e-4:
        raise AssertionError(f"{name}: {differ:.2e} of spikes differ from the torch backend")
    if not spiking:
        _close(y, y_ref, f"{name} output", rtol, atol)
        _close(gx, gx_ref, f"{name} ∂x", rtol=max(rtol, 1e-3), atol=max(atol, 1e-4))


def grid_shapes(dry: bool) -> list[tuple[str, tuple]]:
    """(block, [T, N, C, H, W]) whose grids would break CUDA's axis-1/2 limit if laid out naively."""
    if dry:
        return [("lif", (2, 1, 70, 1, 1)), ("tdbn_lif", (2, 3, 1, 4, 4)), ("bn", (2, 4, 3, 4, 4))]
    return [
        ("lif", (2, 1, 70_000, 1, 1)),  # C > 65,535 channels of one element
        ("mpbn_lif", (2, 1, 70_000, 1, 1)),
        ("tdbn_lif", (2, 260, 1, 256, 256)),  # N·S = 17,039,360 > 2²⁴ in one channel
        *((b, (2, 256, 3, 224, 224)) for b in ("bn", "tebn", "bntt", "tab", "tdbn_lif")),
    ]


def index64_probe(name: str, dry: bool, device) -> str:
    """A channels-last fp16 view past 2³¹ elements against a contiguous copy (the same op)."""
    T, N, C, H, W = (2, 2, 3, 4, 4) if dry else (8, 128, 64, 224, 224)
    dense = torch.randn(T * N, C, H, W, device=device, dtype=torch.float16)
    strided = dense.contiguous(memory_format=torch.channels_last).view(T, N, C, H, W)
    torch.manual_seed(0)
    module = _on(blocks(T, C)[name](), "triton", device).to(torch.float16)
    twin = copy.deepcopy(module)
    with torch.no_grad():
        _reset(module)
        y = module(strided)
        _reset(twin)
        y_ref = twin(dense.view(T, N, C, H, W))
    if not torch.equal(y, y_ref):
        raise AssertionError(f"{name}: the channels-last view and its contiguous copy differ "
                             f"({(y != y_ref).float().mean().item():.2e} of elements)")
    return f"{strided.numel():,} elements ({'>' if strided.numel() > 2**31 else '<'} 2^31)"


def device_probe(name: str, make, shape) -> str:
    if torch.cuda.device_count() < 2:
        return "skipped: needs two CUDA devices"
    with torch.cuda.device(0):
        against_torch(name, make, _input(name, shape, torch.device("cuda:1")))
    return "cuda:1 while cuda:0 is current"


def _nccl_worker(init_file: str, dry: bool) -> str:
    import torch.distributed as dist

    from snnorm import distributed

    backend = "gloo" if dry else "nccl"
    device = torch.device("cpu" if dry else "cuda")
    dist.init_process_group(backend, init_method=f"file://{init_file}", rank=0, world_size=1)
    try:
        for name, make in blocks(4, 8).items():
            if name in ("lif", "layernorm_lif"):
                continue  # no batch statistics to synchronise
            x = _input(name, (4, 2, 8, 4, 4), device)
            torch.manual_seed(0)
            plain = _on(make(), "triton", device)
            synced = distributed.convert_sync_batchnorm(copy.deepcopy(plain))
            xs = [x.clone().requires_grad_() for _ in range(2)]
            grad = torch.ones_like(x)
            (y, gx), (y_ref, gx_ref) = _train_step(synced, xs[0], grad), _train_step(plain, xs[1], grad)
            _close(y, y_ref, f"{name} synced on one rank")
            _close(gx, gx_ref, f"{name} ∂x synced on one rank")
    finally:
        dist.destroy_process_group()
    return f"{backend}, one rank"


def run(out: Path, log: Callable[[str], None], dry: bool, deadline_s: float) -> ProbeLog:
    """Every probe, in order of what a first GPU user hits first; stops starting probes past
    ``deadline_s`` seconds (the rest are skipped rows)."""
    device = torch.device("cpu" if dry else "cuda")
    probes = ProbeLog(out / "probes.csv", log)
    t0 = time.monotonic()
    shape = (2, 2, 4, 4, 4) if dry else (4, 16, 32, 16, 16)
    made = blocks(shape[0], shape[2])

    def step(probe: str, case: str, fn) -> None:
        if time.monotonic() - t0 > deadline_s:
            probes.add(probe, case, "skipped", "gpu_check time budget spent")
        else:
            probes.run(probe, case, fn)

    for name, make in made.items():
        step("graph", name, lambda: graph_probe(name, make, shape, device))
    for name, big in grid_shapes(dry):
        mk = blocks(big[0], big[2])[name]
        step("grid", f"{name} {big}", lambda: against_torch(name, mk, _input(name, big, device)) or f"{big}")
    for name in ("lif", "bn"):
        step("index64", name, lambda: index64_probe(name, dry, device))
    step("device", "bn", lambda: device_probe("bn", made["bn"], shape))
    with tempfile.TemporaryDirectory() as tmp:
        step("nccl", "every synchronised norm", lambda: _nccl_worker(os.path.join(tmp, "init"), dry))
    return probes
