"""Synchronised batch statistics with an empty rank, an all-empty step and a later change of T.

A 2-process gloo run on the CPU (one spawn serves every case of a test). The oracle for a
rank holding 0 samples is one process running the unconverted layer (same backend) on the
other rank's samples with the same loss: the synchronised statistics must be the other
rank's alone, so

* the non-empty rank's output, ∂x and parameter gradients equal the oracle's;
* the empty rank's output and ∂x are empty and its parameter gradients exactly 0 (finite:
  under DistributedDataParallel they are averaged into every rank's);
* the running statistics (and ``num_batches_tracked``) of *both* ranks equal the oracle's.

Every synchronised norm, on both backends: multi-step BN, tdBN, TEBN, BNTT, TAB,
MPBN-LIF and a fused tdBN → LIF block (triton), float64. A step on which every rank's
batch is empty raises the same ValueError on every rank, and a rank that changes T at a
later step raises SyncShapeError on every rank (the per-call header,
:meth:`snnorm.backends.sync.StatsSync.check_call`), both without a hang: the group is
still usable afterwards.
"""

from __future__ import annotations

import datetime
import os
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
from tolerances import DISTRIBUTED_FP64

from perf.tools import run_ranks

T, C, N = 3, 4, 3
TIMEOUT_S = 120
KINDS = ("bn", "tdbn", "tebn", "bntt", "tab", "mpbn", "fused")


def build(kind: str, backend: str) -> nn.Module:
    from snnorm import functional, layer, neuron

    torch.manual_seed(0)
    make = {
        "bn": lambda: layer.BatchNorm2d(C, step_mode="m"),
        "tdbn": lambda: layer.ThresholdDependentBatchNorm2d(1.0, 0.5, C),
        "tebn": lambda: layer.TemporalEffectiveBatchNorm2d(T, C),
        "bntt": lambda: layer.BatchNormThroughTime2d(T, C, step_mode="m"),
        "tab": lambda: layer.TemporalAccumulatedBatchNorm2d(T, C),
        "mpbn": lambda: neuron.MPBNLIFNode(out_channels=C, step_mode="m", v_threshold=0.3),
        "fused": lambda: nn.Sequential(layer.ThresholdDependentBatchNorm2d(1.0, 0.5, C),
                                       neuron.LIFNode(step_mode="m", v_threshold=0.3)),
    }
    net = make[kind]()
    with torch.no_grad():  # non-trivial affine parameters, TEBN's p[t], TAB's p
        for p in net.parameters():
            p.uniform_(0.6, 1.4)
    net = net.double()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        functional.set_backend(net, backend)
        if kind == "fused" and backend == "triton":
            functional.fuse_norm_neurons(net)
    return net


def samples(n: int, t: int = T) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return (torch.randn(t, N, C, 3, 3, generator=g, dtype=torch.float64) * 1.3 + 0.5)[:, :n]


def train_step(net: nn.Module, x: torch.Tensor) -> dict:
    """One training call and backward of a fixed weighted sum (an empty output adds 0)."""
    from snnorm import functional

    functional.reset_net(net)
    x = x.clone().requires_grad_()
    out = net(x)
    g = torch.Generator().manual_seed(5)
    weights = torch.randn(out.shape, generator=g, dtype=out.dtype)
    (out * weights).sum().backward()
    return {
        "out": out.detach(), "dx": x.grad,
        "grads": {k: p.grad.clone() for k, p in net.named_parameters() if p.grad is not None},
        "params": sorted(k for k, _ in net.named_parameters()),
        "state": {k: v.clone() for k, v in net.state_dict().items()},
    }


def _init(rank: int, world: int, port: int) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    torch.set_num_threads(1)


def _outcome(fn) -> str:
    try:
        fn()
        return "ran"
    except ValueError as err:
        return f"{type(err).__name__}: {err}"


def _empty_cases(rank: int, cases: list) -> dict:
    """Per case (kind, backend, empty rank): one synchronised training call; the empty rank has 0 samples."""
    from snnorm.distributed import convert_sync_batchnorm

    record = {}
    for kind, backend, empty in cases:
        net = convert_sync_batchnorm(build(kind, backend))
        record[(kind, backend, empty)] = train_step(net, samples(0 if rank == empty else N))
    return record


def _error_cases(rank: int, backend: str) -> dict:
    """An all-empty step, a later change of T on one rank, one value per channel over the group;
    then the group still works."""
    from snnorm import functional, layer
    from snnorm.distributed import convert_sync_batchnorm

    record = {}
    bn = convert_sync_batchnorm(build("bn", backend))
    record["all_empty"] = _outcome(lambda: bn(samples(0)))
    record["tracked_after_empty"] = int(bn.num_batches_tracked)
    tab = convert_sync_batchnorm(build("tab", backend))
    record["tab_all_empty"] = _outcome(lambda: tab(samples(0)))
    # step 1 agrees, step 2 rank 1 feeds T + 1 steps (MPBN: rank 0 does)
    bn2 = convert_sync_batchnorm(layer.BatchNorm2d(C, step_mode="m").double())
    record["step1"] = _outcome(lambda: bn2(samples(N)))
    record["step2"] = _outcome(lambda: bn2(samples(N, T + rank).contiguous()))
    record["tracked"] = int(bn2.num_batches_tracked)
    mp = convert_sync_batchnorm(build("mpbn", backend))
    record["mpbn_step1"] = _outcome(lambda: mp(samples(N)).sum().backward())
    record["mpbn_step2"] = _outcome(lambda: mp(samples(N, T + 1 - rank)).sum().backward())
    # one value per channel and step over the group (rank 0: 1 sample, rank 1: none): an error on
    # both; one value on rank 0 but three over the group: it runs (the group's count decides)
    bntt = convert_sync_batchnorm(layer.BatchNormThroughTime1d(T, C, step_mode="m").double())
    functional.set_backend(bntt, backend)
    g = torch.Generator().manual_seed(9)
    record["one_value"] = _outcome(lambda: bntt(torch.randn(T, 1 - rank, C, generator=g, dtype=torch.float64)))
    record["one_local"] = _outcome(lambda: bntt(torch.randn(T, 1 + rank, C, generator=g, dtype=torch.float64)))
    # no collective is left pending on either rank: the group still sums
    one = torch.ones(1)
    dist.all_reduce(one)
    record["after"] = one.item()
    return record


def _worker(rank: int, world: int, port: int, out_dir: str, cases: list, error_backends: list) -> None:
    _init(rank, world, port)
    try:
        record = {"empty": _empty_cases(rank, cases), "errors": {b: _error_cases(rank, b) for b in error_backends}}
        torch.save(record, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _two_ranks(worker, *args) -> list:
    try:
        return run_ranks(worker, *args, world=2, timeout_s=TIMEOUT_S)
    except TimeoutError as err:
        pytest.fail(str(err))


def _close(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    if not want.is_floating_point():
        assert torch.equal(got, want), f"{what}: {got} != {want}"
        return
    assert torch.isfinite(got).all(), f"{what}: not finite: {got}"
    assert torch.allclose(got, want, **DISTRIBUTED_FP64), f"{what}: max error {(got - want).abs().max().item():.3e}"


def check_empty_rank(results: list, kind: str, backend: str, empty: int) -> None:
    ref = train_step(build(kind, backend), samples(N))
    assert ref["out"].abs().sum() > 0 and ref["grads"]
    for rank, res in enumerate(results):
        got = res[(kind, backend, empty)]
        where = f"{kind} {backend} (rank {empty} empty) rank {rank}"
        if rank == empty:
            assert got["out"].numel() == 0 and got["dx"].numel() == 0, where
            for name in ref["grads"]:  # its own loss is empty: exactly 0 (not recycled memory)
                grad = got["grads"].get(name)
                assert grad is None or torch.equal(grad, torch.zeros_like(grad)), f"{where} grad {name}: {grad}"
        else:
            _close(got["out"], ref["out"], f"{where} output")
            _close(got["dx"], ref["dx"], f"{where} ∂x")
            assert got["grads"].keys() == ref["grads"].keys(), where
            for name, want in ref["grads"].items():
                _close(got["grads"][name], want, f"{where} grad {name}")
        assert got["state"].keys() == ref["state"].keys(), where
        for name, want in ref["state"].items():
            _close(got["state"][name], want, f"{where} state {name}")


#: the default run: every layer on the torch backend and the triton layers with their own
#: empty-rank paths (TAB's first-step check, MPBN-LIF's pipelined kernels, the fused block),
#: rank 0 empty, and the errors on the torch backend; the slow run: the rest, rank 1 empty,
#: and the errors on the triton backend
QUICK = [(k, "torch", 0) for k in KINDS] + [(k, "triton", 0) for k in ("tab", "mpbn", "fused")]
FULL = [(k, b, e) for b in ("torch", "triton") for e in (0, 1) for k in KINDS if (k, b, e) not in QUICK]


def _has_triton() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


_RUNS: dict = {}


def two_rank_run(slow: bool) -> tuple[list, list, list]:
    """(cases, error backends, the two ranks' records): one spawn per configuration (cached)."""
    if slow not in _RUNS:
        cases = [c for c in (FULL if slow else QUICK) if c[1] == "torch" or _has_triton()]
        errors = (["triton"] if _has_triton() else []) if slow else ["torch"]
        _RUNS[slow] = (cases, errors, _two_ranks(_worker, cases, errors))
    return _RUNS[slow]


@pytest.mark.slow  # a two-process spawn (~25 s): the default run stays under its 5 minutes
def test_an_empty_rank_equals_one_process_on_the_other_ranks_samples():
    cases, _, results = two_rank_run(slow=False)
    for kind, backend, empty in cases:
        check_empty_rank([r["empty"] for r in results], kind, backend, empty)


@pytest.mark.slow  # two processes, 21 more layer calls interpreted
def test_an_empty_rank_equals_one_process_every_layer_both_ranks():
    cases, _, results = two_rank_run(slow=True)
    for kind, backend, empty in cases:
        check_empty_rank([r["empty"] for r in results], kind, backend, empty)


def test_the_comparison_can_fail():
    """check_empty_rank rejects a result whose statistics were the empty rank's alone (NaN-free
    but wrong: the oracle on a different batch)."""
    ref = train_step(build("bn", "torch"), samples(N))
    other = train_step(build("bn", "torch"), samples(N) * 2.0 + 1.0)
    results = [{("bn", "torch", 0): {**ref, "out": ref["out"][:, :0], "dx": ref["dx"][:, :0], "grads": {}}},
               {("bn", "torch", 0): other}]
    with pytest.raises(AssertionError):
        check_empty_rank(results, "bn", "torch", 0)


def check_errors(results: list) -> None:
    for rank, res in enumerate(results):
        for key in ("all_empty", "tab_all_empty"):
            assert res[key].startswith("ValueError: ") and "every rank of its process group has an empty batch" in \
                res[key], (rank, key, res[key])
        assert res["all_empty"] == results[0]["all_empty"]  # the same message on every rank
        assert res["tracked_after_empty"] == 0  # refused before the batch was counted
        assert res["step1"] == "ran" and res["mpbn_step1"] == "ran", res
        for key, ts in (("step2", "rank 0: T=3, C=4; rank 1: T=4, C=4"),
                        ("mpbn_step2", "rank 0: T=4, C=4; rank 1: T=3")):
            assert res[key].startswith("SyncShapeError: ") and ts in res[key], (rank, key, res[key])
        assert res["tracked"] == 1  # step 2 was refused before it was counted
        assert res["one_value"].startswith("ValueError: ") and "more than one value per channel, got 1 over the " \
            "whole process group" in res["one_value"], (rank, res["one_value"])
        assert res["one_local"] == "ran", (rank, res["one_local"])
        assert res["after"] == 2.0


@pytest.mark.slow  # the spawn above
def test_all_empty_step_and_later_change_of_T_raise_on_every_rank():
    _, errors, results = two_rank_run(slow=False)
    check_errors([r["errors"]["torch"] for r in results])


@pytest.mark.slow  # the slow run above
def test_all_empty_step_and_later_change_of_T_raise_on_every_rank_triton():
    if not _has_triton():
        pytest.skip("triton is not installed")
    _, errors, results = two_rank_run(slow=True)
    check_errors([r["errors"]["triton"] for r in results])
