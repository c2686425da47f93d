"""snnorm.convert_sync_batchnorm: synchronised batch statistics across processes.

The oracle for a 2-process DistributedDataParallel run (gloo on CPU), on the torch and on
the triton backend (interpreted, fused norm → LIF blocks included), is one process running
the unconverted network (same backend) on the concatenated batch with the loss averaged
over the per-rank losses (what DDP's gradient averaging computes). Float64 keeps spikes
away from rounding ties, so the spiking network's outputs, gradients and running
statistics must agree to ~1e-10; a float32 network of norms to 1e-5. The per-rank batches
differ (3 and 5 samples), so the counts must travel with the partials.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
from tolerances import (
    DISTRIBUTED_FP32,
    DISTRIBUTED_FP64,
    DISTRIBUTED_LARGE_MEAN_FP32_MEAN,
    DISTRIBUTED_LARGE_MEAN_FP32_VAR_REL,
)

import snnorm
from perf.tools import free_port, run_ranks
from snnorm import functional, layer, neuron
from snnorm.distributed import convert_sync_batchnorm, is_synchronized, revert_sync_batchnorm

T = 3
SHARDS = (3, 5)  # unequal per-rank batches: the global count must weight them
STEPS = 2
LR = 0.5
TIMEOUT_S = 280  # under pytest-timeout's 300 s: the triton DDP spawn took 220 s on a loaded 2-core machine (90 s timed out)


def build_net(seed: int = 0) -> nn.Module:
    """Conv → TEBN → MPBN-LIF → Conv → BNTT → LIF → Conv → tdBN → LIF → Conv → TAB → BN2d → pool → Linear →
    TAB (single-step) → BN1d → MPBN-LIF → Linear."""
    torch.manual_seed(seed)
    net = nn.Sequential(
        layer.Conv2d(2, 4, 3, padding=1, step_mode="m"),
        layer.TemporalEffectiveBatchNorm2d(T, 4),
        neuron.MPBNLIFNode(out_channels=4, step_mode="m"),
        layer.Conv2d(4, 4, 3, padding=1, step_mode="m"),
        layer.BatchNormThroughTime2d(T, 4, step_mode="m"),
        neuron.LIFNode(step_mode="m", v_threshold=0.5),
        layer.Conv2d(4, 4, 3, padding=1, step_mode="m"),
        layer.ThresholdDependentBatchNorm2d(1.0, 0.5, 4),
        neuron.LIFNode(step_mode="m", v_threshold=0.5),
        layer.Conv2d(4, 4, 3, padding=1, step_mode="m"),
        layer.TemporalAccumulatedBatchNorm2d(T, 4, momentum=None),  # TAB: statistics of steps 0..t
        layer.BatchNorm2d(4, step_mode="m"),
        layer.AvgPool2d(2, step_mode="m"),
        layer.Flatten(step_mode="m"),
        layer.Linear(36, 6, step_mode="m"),
        layer.MultiStepContainer(layer.TemporalAccumulatedBatchNorm1d(T, 6, step_mode="s")),  # TAB memories
        layer.BatchNorm1d(6, momentum=None, step_mode="m"),  # cumulative average: 1/num_batches_tracked
        neuron.MPBNLIFNode(out_features=6, step_mode="m", v_threshold=0.5),
        layer.Linear(6, 3, step_mode="m"),
    )
    with torch.no_grad():  # non-trivial affine parameters and TEBN scale p[t]
        for m in net.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.weight is not None:
                m.weight.uniform_(0.5, 1.5)
                if m.bias is not None:
                    m.bias.uniform_(-0.3, 0.3)
        net[1].scale.copy_(torch.tensor([0.8, 1.0, 1.3]))
        for m in net.modules():
            if isinstance(m, layer.batch_norm._TemporalAccumulatedBatchNormBase):
                m.weight.uniform_(0.5, 1.5), m.bias.uniform_(-0.3, 0.3), m.p.uniform_(0.7, 1.3)
    return net.double()


def make_batch(step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(T, sum(SHARDS), 2, 6, 6, generator=g, dtype=torch.float64) * 1.5 + 0.3


def shard_loss(out: torch.Tensor, step: int, lo: int, hi: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(200 + step)
    target = torch.randn(sum(SHARDS), out.shape[2], generator=g, dtype=torch.float64)[lo:hi]
    return ((out.mean(0) - target) ** 2).mean() + out.sum() * 1e-3 / (hi - lo)


def _bounds(rank: int) -> tuple[int, int]:
    return sum(SHARDS[:rank]), sum(SHARDS[: rank + 1])


def _state(net: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def _grads(net: nn.Module) -> dict[str, torch.Tensor]:
    return {k: p.grad.detach().clone() for k, p in net.named_parameters()}


def build_norm_net(seed: int = 0) -> nn.Module:
    """Every synchronised norm in float32, without spikes (nothing to flip at a rounding tie):
    Conv → BN2d → tdBN → TEBN → BNTT → TAB → pool → Linear."""
    torch.manual_seed(seed)
    net = nn.Sequential(
        layer.Conv2d(2, 5, 3, padding=1, step_mode="m"),
        layer.BatchNorm2d(5, step_mode="m"),
        layer.ThresholdDependentBatchNorm2d(1.0, 0.5, 5),
        layer.TemporalEffectiveBatchNorm2d(T, 5),
        layer.BatchNormThroughTime2d(T, 5, step_mode="m"),
        layer.TemporalAccumulatedBatchNorm2d(T, 5),
        layer.AvgPool2d(2, step_mode="m"),
        layer.Flatten(step_mode="m"),
        layer.Linear(45, 3, step_mode="m"),
    )
    with torch.no_grad():
        for m in net.modules():
            for name in ("weight", "bias", "scale", "p"):
                t = getattr(m, name, None)
                if isinstance(t, nn.Parameter) and not isinstance(m, (nn.Conv2d, nn.Linear)):
                    t.uniform_(0.6, 1.4) if name != "bias" else t.uniform_(-0.3, 0.3)
    return net


#: what a worker changes in the hook to show that the comparison can fail: nothing, the
#: forward's gather (each rank sees only its own partials), or the backward's all-reduce
SABOTAGE = ("none", "gather", "all_reduce")


def _sabotage(kind: str) -> None:
    from snnorm.backends.sync import StatsSync

    if kind == "gather":
        StatsSync.gather = lambda self, values: values.reshape(1, -1).expand(self.world, -1)
    elif kind == "all_reduce":
        StatsSync.all_reduce = lambda self, values: values.clone()


def _prepare(net: nn.Module, backend: str) -> nn.Module:
    with warnings.catch_warnings():  # conv/pool/linear keep torch, MPBN pairs stay unfused: said, and known
        warnings.simplefilter("ignore", UserWarning)
        functional.set_backend(net, backend)
        if backend == "triton":
            functional.fuse_norm_neurons(net)  # the BNTT → LIF and tdBN → LIF pairs run fused
    return net


def _train(net: nn.Module, module: nn.Module, lo: int, hi: int, dtype, meter_first: bool = False) -> dict:
    """STEPS SGD steps of ``module`` (``net`` itself or its DDP wrapper) on rows lo..hi of
    each batch, then one eval call; per step the output, gradients and state."""
    from perf.tools import meter as traffic_meter
    from snnorm.backends.sync import count_collectives

    opt = torch.optim.SGD(module.parameters(), lr=LR)
    record = {"steps": [], "collectives": [], "launches": {}}
    for step in range(STEPS):
        functional.reset_net(net)
        opt.zero_grad()
        meter = traffic_meter() if meter_first and step == 0 else contextlib.nullcontext()
        with count_collectives() as log, meter as traffic:
            out = module(make_batch(step).to(dtype)[:, lo:hi])
            shard_loss(out.double(), step, lo, hi).backward()
        if traffic is not None:
            record["launches"] = {name: k.launches for name, k in traffic.kernels.items()}
        record["collectives"].append(log)
        record["steps"].append({"out": out.detach().clone(), "grads": _grads(net), "state": _state(net)})
        opt.step()
    net.eval()
    functional.reset_net(net)
    with torch.no_grad():
        record["eval_out"] = module(make_batch(STEPS).to(dtype)[:, lo:hi])
    return record


def _init(rank: int, world: int, port: int) -> None:
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
        timeout=datetime.timedelta(seconds=60),
    )
    torch.set_num_threads(1)


def _worker(rank: int, world: int, port: int, out_dir: str, backend: str, sabotage: str) -> None:
    _init(rank, world, port)
    try:
        _sabotage(sabotage)
        lo, hi = _bounds(rank)
        record = {}
        for name, build, dtype in (("spiking", build_net, torch.float64), ("norms", build_norm_net, torch.float32)):
            net = convert_sync_batchnorm(_prepare(build(), backend))
            ddp = nn.parallel.DistributedDataParallel(net)
            record[name] = _train(net, ddp, lo, hi, dtype, meter_first=backend == "triton" and name == "spiking")
        if sabotage == "none":
            # stability: mean/std = 1e4 in float32; global statistics vs float64 over the whole batch
            from snnorm.backends.sync import StatsSync
            from snnorm.backends.torch_backend import synced_statistics

            g = torch.Generator().manual_seed(7)
            big = (torch.randn(sum(SHARDS), 3, 17, generator=g, dtype=torch.float64) + 1e4).float()
            count, mean, m2 = synced_statistics(StatsSync(dist.group.WORLD), big[lo:hi].unsqueeze(0))
            record["big"] = (mean[0], m2[0] / count[0], count[0])
        torch.save(record, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _mismatch_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    """Rank 1 feeds a longer sequence (T + 1) than rank 0 to a synchronised BN."""
    _init(rank, world, port)
    try:
        bn = convert_sync_batchnorm(layer.BatchNorm2d(4, step_mode="m"))
        x = torch.randn(T + rank, 2, 4, 3, 3)
        try:
            bn(x)
            outcome = "ran"
        except ValueError as err:
            outcome = f"{type(err).__name__}: {err}"
        torch.save({"outcome": outcome, "tracked": int(bn.num_batches_tracked)}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _compile_worker(rank: int, world: int, port: int, out_dir: str, backend: str) -> None:
    """torch.compile of a synchronised TEBN → BN network: graph breaks, and the compiled
    result against eager."""
    _init(rank, world, port)
    try:
        net = convert_sync_batchnorm(_prepare(
            nn.Sequential(layer.TemporalEffectiveBatchNorm2d(T, 4), layer.BatchNorm2d(4, step_mode="m")), backend))
        x = torch.randn(T, 2 + rank, 4, 5, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(rank))
        eager = net.double()(x)  # eager calls check T, C and the counts (the compiled trace skips the header)
        torch._dynamo.reset()
        explained = torch._dynamo.explain(net)(x)
        compiled = torch.compile(net, backend="aot_eager", fullgraph=True)(x.requires_grad_())
        compiled.sum().backward()
        torch.save({"breaks": explained.graph_break_count, "reasons": [str(r.reason) for r in explained.break_reasons],
                    "error": (compiled.detach() - eager).abs().max().item(), "grad": x.grad.abs().sum().item()},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _run_two_ranks(worker, *args) -> list:
    try:
        return run_ranks(worker, *args, world=2, timeout_s=TIMEOUT_S)
    except TimeoutError as err:
        pytest.fail(str(err))


def _reference(name: str, backend: str) -> dict:
    """One process, the unconverted network (same backend and fusion) on the concatenated
    batch, the loss the mean of the per-rank losses (what DDP's gradient averaging computes)."""
    build, dtype = {"spiking": (build_net, torch.float64), "norms": (build_norm_net, torch.float32)}[name]
    net = _prepare(build(), backend)
    opt = torch.optim.SGD(net.parameters(), lr=LR)
    steps = []
    for step in range(STEPS):
        functional.reset_net(net)
        opt.zero_grad()
        out = net(make_batch(step).to(dtype))
        loss = sum(shard_loss(out[:, lo:hi].double(), step, lo, hi) for lo, hi in map(_bounds, range(len(SHARDS))))
        (loss / len(SHARDS)).backward()
        steps.append({"out": out.detach().clone(), "grads": _grads(net), "state": _state(net)})
        opt.step()
    net.eval()
    functional.reset_net(net)
    with torch.no_grad():
        eval_out = net(make_batch(STEPS).to(dtype))
    return {"steps": steps, "eval_out": eval_out}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # tiny tensors: intra-op threads only add synchronisation (and stall on a busy CI machine)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


_RUNS: dict = {}


def two_rank_results(backend: str, sabotage: str = "none") -> list:
    """The two ranks' records (cached: each configuration spawns its processes once)."""
    key = (backend, sabotage)
    if key not in _RUNS:
        _RUNS[key] = _run_two_ranks(_worker, backend, sabotage)
    return _RUNS[key]


def _close(a: torch.Tensor, b: torch.Tensor, what: str, tol: dict) -> None:
    if not a.is_floating_point():
        assert torch.equal(a, b), f"{what}: {a} != {b}"
        return
    err = (a - b).abs().max().item() if a.numel() else 0.0
    assert torch.allclose(a, b, **tol), f"{what}: max abs error {err:.3e}"


def _assert_matches_reference(results: list, backend: str) -> None:
    for name, tol in (("spiking", DISTRIBUTED_FP64), ("norms", DISTRIBUTED_FP32)):
        ref = _reference(name, backend)
        for step in range(STEPS):
            want = ref["steps"][step]
            assert want["out"].abs().sum() > 0
            for rank, res in enumerate(results):
                lo, hi = _bounds(rank)
                got = res[name]["steps"][step]
                where = f"{backend} {name} step {step} rank {rank}"
                _close(got["out"], want["out"][:, lo:hi], f"{where} output", tol)
                assert got["grads"].keys() == want["grads"].keys()
                for key, g in want["grads"].items():
                    _close(got["grads"][key], g, f"{where} grad {key}", tol)
                assert got["state"].keys() == want["state"].keys()
                for key, s in want["state"].items():
                    _close(got["state"][key], s, f"{where} state {key}", tol)
        for rank, res in enumerate(results):
            lo, hi = _bounds(rank)
            _close(res[name]["eval_out"], ref["eval_out"][:, lo:hi], f"{backend} {name} eval rank {rank}", tol)


@pytest.mark.slow  # two processes (gloo)
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_ddp_two_ranks_match_one_process_on_concatenated_batch(backend):
    if backend == "triton":
        pytest.importorskip("triton")
    _assert_matches_reference(two_rank_results(backend), backend)


@pytest.mark.slow  # two processes (gloo)
@pytest.mark.parametrize("backend, sabotage", [("torch", "gather"), ("triton", "all_reduce")])
def test_without_the_collective_the_comparison_fails(backend, sabotage):
    """The comparison above can fail: with the forward's gather (torch) or the backward's
    all-reduce (triton: the forward still synchronises) made rank-local, it does."""
    if backend == "triton":
        pytest.importorskip("triton")
    with pytest.raises(AssertionError):
        _assert_matches_reference(two_rank_results(backend, sabotage), backend)


@pytest.mark.slow  # the triton run above
def test_synchronised_triton_network_runs_the_kernels():
    pytest.importorskip("triton")
    launches = two_rank_results("triton")[0]["spiking"]["launches"]
    kernels = set(launches)
    # the statistics pipeline's reduce (BN, TEBN, TAB, fused blocks), the fused norm → LIF
    # forward and backward, and MPBN-LIF's pipelined kernels (synchronised: one launch per step)
    for expected in ("_stats_reduce_kernel", "_bwd_coef_kernel", "_mpbn_lif_pipelined_fwd_kernel",
                     "_mpbn_lif_pipelined_bwd_kernel"):
        assert expected in kernels, f"{expected} did not launch; launched: {sorted(kernels)}"
    assert any("norm_lif" in k for k in kernels), f"no fused norm → LIF kernel launched: {sorted(kernels)}"
    assert not any("resident" in k for k in kernels), "a synchronised MPBN-LIF took the resident path"


@pytest.mark.slow  # the runs above
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_collectives_carry_O_T_C_values_per_layer(backend):
    """Every collective carries per-(t, c) values: the ranks' batches differ (3 and 5 samples)
    but their collectives are the same list of the same sizes, each at most
    T + 2·T·C float64 values (the packed count, mean, M2 of T steps, C ≤ 6 channels) per
    rank (the torch backward's reduce-scatter carries the gradient of both ranks' rows)."""
    if backend == "triton":
        pytest.importorskip("triton")
    results = two_rank_results(backend)
    bound = 2 * 8 * (T + 2 * T * 6)
    for name in ("spiking", "norms"):
        logs = [res[name]["collectives"] for res in results]
        assert logs[0] == logs[1]
        for step_log in logs[0]:
            assert step_log and all(nbytes <= bound for _, nbytes in step_log), step_log
    # the float32 norm network at every step: one header (4 int64: layer, T, C, n) and one
    # gather per layer forward (BN, tdBN, TEBN, BNTT, TAB), and one reduction per layer
    # backward: the triton ops all-reduce their gradient sums, torch's gather reduce-scatters
    for step_log in results[0]["norms"]["collectives"]:
        kinds = [kind for kind, _ in step_log]
        assert kinds.count("header") == 5 and all(b == 4 * 8 for k, b in step_log if k == "header"), step_log
        assert kinds.count("all_gather") == 5
        assert kinds.count("all_reduce" if backend == "triton" else "reduce_scatter") == 5
        assert len(kinds) == 15
        assert kinds.index("header") < kinds.index("all_gather")  # the header travels first


@pytest.mark.slow  # the torch run above
def test_global_statistics_are_stable_at_large_mean():
    g = torch.Generator().manual_seed(7)
    big = torch.randn(sum(SHARDS), 3, 17, generator=g, dtype=torch.float64) + 1e4
    x = big.float().double()  # what the ranks saw, exactly
    ref_mean = x.mean(dim=(0, 2))
    ref_var = x.var(dim=(0, 2), unbiased=False)
    for mean, var, count in (res["big"] for res in two_rank_results("torch")):
        assert count.item() == sum(SHARDS) * 17
        assert (mean.double() - ref_mean).abs().max() < DISTRIBUTED_LARGE_MEAN_FP32_MEAN  # float32 resolution at 1e4 is ~1e-3
        # the variance (≈1) survives a mean of 1e4: raw Σx² in float32 would lose it entirely
        assert ((var.double() - ref_var).abs() / ref_var).max() < DISTRIBUTED_LARGE_MEAN_FP32_VAR_REL


@pytest.mark.slow  # two processes (gloo) and dynamo
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_torch_compile_traces_a_synchronised_network_without_graph_breaks(backend):
    """The collectives trace (functional collectives on torch, inside the custom ops on
    triton): no graph break, fullgraph compiles, and the compiled network computes eager's
    result on every rank (backward included)."""
    if backend == "triton":
        pytest.importorskip("triton")
    for res in _run_two_ranks(_compile_worker, backend):
        assert res["breaks"] == 0, res["reasons"]
        assert res["error"] <= DISTRIBUTED_FP64["atol"] and res["grad"] > 0


@pytest.mark.slow  # two processes (gloo)
def test_mismatched_T_across_ranks_is_a_clear_error_on_every_rank():
    results = _run_two_ranks(_mismatch_worker)
    for rank, res in enumerate(results):
        assert res["outcome"].startswith("SyncShapeError"), res["outcome"]
        assert "rank 0: T=3" in res["outcome"] and "rank 1: T=4" in res["outcome"]
        assert res["tracked"] == 0  # refused before the batch was counted


# -- single process ------------------------------------------------------------------


def _run_train_step(net: nn.Module, x: torch.Tensor):
    functional.reset_net(net)
    out = net(x)
    out.square().sum().backward()
    return out.detach(), _grads(net), _state(net)


def test_without_process_group_synced_modules_are_exactly_the_originals():
    assert not dist.is_initialized()
    x = make_batch(0)
    ref_net, sync_net = build_net(), convert_sync_batchnorm(build_net())
    assert sum(is_synchronized(m) for m in sync_net.modules()) == 9  # TEBN, 2 MPBN, BNTT, tdBN, 2 TAB, BN2d, BN1d
    for _ in range(2):
        a, b = _run_train_step(ref_net, x), _run_train_step(sync_net, x)
        assert torch.equal(a[0], b[0])
        for da, db in zip(a[1:], b[1:]):
            assert da.keys() == db.keys()
            assert all(torch.equal(da[k], db[k]) for k in da)
    ref_net.eval(), sync_net.eval()
    functional.reset_net(ref_net), functional.reset_net(sync_net)
    assert torch.equal(ref_net(x), sync_net(x))


def test_world_size_one_group_computes_like_the_originals():
    assert not dist.is_initialized()
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1,
        timeout=datetime.timedelta(seconds=30),
    )
    try:
        x = make_batch(1)
        a = _run_train_step(build_net(), x)
        b = _run_train_step(convert_sync_batchnorm(build_net(), dist.group.WORLD), x)
        assert torch.equal(a[0], b[0])
        assert all(torch.equal(a[1][k], b[1][k]) for k in a[1])
        assert all(torch.equal(a[2][k], b[2][k]) for k in a[2])
    finally:
        dist.destroy_process_group()


def test_conversion_is_in_place_and_keeps_state_dict_both_ways():
    net = build_net()
    before = _state(net)
    modules = list(net.modules())
    assert convert_sync_batchnorm(net) is net
    assert list(net.modules()) == modules  # same objects
    after = net.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)
    # a checkpoint of either loads into the other
    plain = build_net(seed=1)
    plain.load_state_dict(net.state_dict())
    net.load_state_dict(build_net(seed=2).state_dict())
    assert torch.equal(net[1].scale, build_net(seed=2)[1].scale)
    tebn = net[1]
    assert type(tebn) is layer.TemporalEffectiveBatchNorm2d and is_synchronized(tebn)
    assert type(net[2]) is neuron.MPBNLIFNode and is_synchronized(net[2])
    assert not any(is_synchronized(bn) for bn in net[4]._bns())  # BNTT synchronises its step BNs itself
    # converting again is harmless; reverting removes every mark
    convert_sync_batchnorm(net)
    revert_sync_batchnorm(net)
    assert not any(is_synchronized(m) for m in net.modules())
    assert net.state_dict().keys() == before.keys()


def test_converted_network_pickles():
    import pickle

    net = convert_sync_batchnorm(build_net())
    clone = pickle.loads(pickle.dumps(net))
    assert type(clone[1]) is type(net[1]) and is_synchronized(clone[1])
    import copy

    assert is_synchronized(copy.deepcopy(net)[2])


def test_a_synchronised_layer_keeps_its_backend():
    net = build_net()
    functional.set_backend(net, "triton")
    convert_sync_batchnorm(net)
    assert net[1].backend == "triton" and is_synchronized(net[1])


def test_bad_input_is_rejected():
    with pytest.raises(TypeError, match="nn.Module"):
        convert_sync_batchnorm("net")
    with pytest.raises(TypeError, match="ProcessGroup"):
        convert_sync_batchnorm(build_net(), process_group="world")
    with pytest.warns(UserWarning, match="torch.nn batch-norm layers"):
        convert_sync_batchnorm(nn.Sequential(nn.BatchNorm2d(3)))


def test_launcher_without_init_process_group_raises_and_changes_nothing(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    net = convert_sync_batchnorm(build_net())
    before = _state(net)
    x = make_batch(0)
    h = net[0](x).detach()
    for idx in (1, 2, 4):  # TEBN, MPBN, BNTT: each refuses before touching anything
        with pytest.raises(RuntimeError, match="init_process_group"):
            net[idx](h)
    assert net[4].t == -1
    with pytest.raises(RuntimeError, match="init_process_group"):
        net(x)
    after = _state(net)
    assert all(torch.equal(before[k], after[k]) for k in before)
    # eval never communicates, so it runs
    net.eval()
    functional.reset_net(net)
    assert net(x).shape == (T, x.shape[1], 3)


def test_torch_converter_destroys_tebn_snnorm_keeps_it():
    x = torch.randn(T, 4, 4, 5, 5)
    wrong_T = torch.randn(T + 1, 4, 4, 5, 5)

    torch_net = nn.Sequential(layer.TemporalEffectiveBatchNorm2d(T, 4), layer.ThresholdDependentBatchNorm2d(1.0, 0.5, 4))
    torch_net = nn.SyncBatchNorm.convert_sync_batchnorm(torch_net)
    # both layers became plain SyncBatchNorm: p[t] is gone from the parameters and the
    # checkpoint, tdBN lost its step mode and alpha/v_th, and nothing checks T any more
    assert all(type(m) is nn.SyncBatchNorm for m in torch_net)
    assert "0.scale" not in torch_net.state_dict()
    assert not hasattr(torch_net[0], "T") and not hasattr(torch_net[1], "alpha")
    torch_net[0](wrong_T.flatten(0, 1))  # no T check (not distributed: runs as plain BN)

    ours = convert_sync_batchnorm(
        nn.Sequential(layer.TemporalEffectiveBatchNorm2d(T, 4), layer.ThresholdDependentBatchNorm2d(1.0, 0.5, 4))
    )
    with torch.no_grad():
        ours[0].scale.copy_(torch.tensor([0.5, 1.0, 2.0]))
    assert "0.scale" in ours.state_dict() and ours[0].T == T
    assert ours[1].alpha == 1.0 and ours[1].v_th == 0.5 and torch.all(ours[1].weight == 0.5)
    with pytest.raises(ValueError, match="T=3"):
        ours[0](wrong_T)
    y = ours[0](x)
    ref = layer.TemporalEffectiveBatchNorm2d(T, 4)
    with torch.no_grad():
        ref.scale.copy_(torch.tensor([0.5, 1.0, 2.0]))
    assert torch.equal(y, ref(x))  # p[t] still scales each timestep


def test_the_docs_document_multi_process_training():
    root = os.path.join(os.path.dirname(__file__), "..")
    with open(os.path.join(root, "docs", "distributed.md"), encoding="utf-8") as f:
        text = f.read()
    assert text.startswith("# Multi-process training") and "torchrun" in text and "convert_sync_batchnorm" in text
    with open(os.path.join(root, "README.md"), encoding="utf-8") as f:
        assert "docs/distributed.md" in f.read()  # and the README points there
    assert snnorm.convert_sync_batchnorm is convert_sync_batchnorm
