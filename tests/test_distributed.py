"""snnorm.convert_sync_batchnorm: synchronised batch statistics across processes.

The oracle for a 2-process DistributedDataParallel run (gloo on CPU) is one process
running the unconverted network on the concatenated batch with the loss averaged over
the per-rank losses (what DDP's gradient averaging computes). Float64 keeps spikes away
from rounding ties, so outputs, gradients and running statistics must agree to ~1e-10.
"""

from __future__ import annotations

import datetime
import os
import socket
import tempfile
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
from tolerances import DISTRIBUTED_FP64, DISTRIBUTED_LARGE_MEAN_FP32_MEAN, DISTRIBUTED_LARGE_MEAN_FP32_VAR_REL

import snnorm
from snnorm import functional, layer, neuron
from snnorm.distributed import (
    convert_sync_batchnorm,
    global_batch_stats,
    is_synchronized,
    revert_sync_batchnorm,
)

T = 3
SHARDS = (3, 5)  # unequal per-rank batches: the global count must weight them
STEPS = 2
LR = 0.5
TIMEOUT_S = 90


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


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        torch.set_num_threads(1)
        net = convert_sync_batchnorm(build_net())
        ddp = nn.parallel.DistributedDataParallel(net)
        opt = torch.optim.SGD(ddp.parameters(), lr=LR)
        lo, hi = _bounds(rank)
        record = {"steps": []}
        for step in range(STEPS):
            functional.reset_net(net)
            opt.zero_grad()
            out = ddp(make_batch(step)[:, lo:hi])
            shard_loss(out, step, lo, hi).backward()
            record["steps"].append({"out": out.detach().clone(), "grads": _grads(net), "state": _state(net)})
            opt.step()
        net.eval()
        functional.reset_net(net)
        with torch.no_grad():
            record["eval_out"] = ddp(make_batch(STEPS)[:, lo:hi])
        # stability: mean/std = 1e4 in float32; global statistics vs float64 over the whole batch
        g = torch.Generator().manual_seed(7)
        big = (torch.randn(sum(SHARDS), 3, 17, generator=g, dtype=torch.float64) + 1e4).float()
        mean, m2, count = global_batch_stats(big[lo:hi], dist.group.WORLD)
        record["big"] = (mean, m2 / count, count)
        torch.save(record, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_two_ranks(out_dir: str) -> None:
    ctx = mp.start_processes(_worker, args=(2, _free_port(), out_dir), nprocs=2, join=False, start_method="spawn")
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while not ctx.join(timeout=max(deadline - time.monotonic(), 0.1)):
            if time.monotonic() > deadline:
                pytest.fail(f"2-process gloo run did not finish within {TIMEOUT_S} s")
    finally:
        for p in ctx.processes:  # only the workers this test started
            if p.is_alive():
                p.kill()


def _reference():
    net = build_net()
    opt = torch.optim.SGD(net.parameters(), lr=LR)
    steps = []
    for step in range(STEPS):
        functional.reset_net(net)
        opt.zero_grad()
        out = net(make_batch(step))
        loss = sum(shard_loss(out[:, lo:hi], step, lo, hi) for lo, hi in map(_bounds, range(len(SHARDS))))
        (loss / len(SHARDS)).backward()
        steps.append({"out": out.detach().clone(), "grads": _grads(net), "state": _state(net)})
        opt.step()
    net.eval()
    functional.reset_net(net)
    with torch.no_grad():
        eval_out = net(make_batch(STEPS))
    return steps, eval_out


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # tiny tensors: intra-op threads only add synchronisation (and stall on a busy CI machine)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def two_rank_results():
    with tempfile.TemporaryDirectory() as out_dir:
        _run_two_ranks(out_dir)
        return [torch.load(os.path.join(out_dir, f"rank{r}.pt")) for r in range(2)]


def _close(a: torch.Tensor, b: torch.Tensor, what: str, atol=DISTRIBUTED_FP64["atol"], rtol=DISTRIBUTED_FP64["rtol"]) -> None:
    if a.dtype in (torch.int64, torch.long):
        assert torch.equal(a, b), f"{what}: {a} != {b}"
        return
    err = (a - b).abs().max().item() if a.numel() else 0.0
    assert torch.allclose(a, b, atol=atol, rtol=rtol), f"{what}: max abs error {err:.3e}"


@pytest.mark.slow  # two processes (gloo)
def test_ddp_two_ranks_match_one_process_on_concatenated_batch(two_rank_results):
    ref_steps, ref_eval = _reference()
    for step in range(STEPS):
        ref = ref_steps[step]
        assert ref["out"].abs().sum() > 0
        for rank, res in enumerate(two_rank_results):
            lo, hi = _bounds(rank)
            got = res["steps"][step]
            _close(got["out"], ref["out"][:, lo:hi], f"step {step} rank {rank} output")
            assert got["grads"].keys() == ref["grads"].keys()
            for name, g in ref["grads"].items():
                _close(got["grads"][name], g, f"step {step} rank {rank} grad {name}")
            assert got["state"].keys() == ref["state"].keys()
            for name, s in ref["state"].items():
                _close(got["state"][name], s, f"step {step} rank {rank} state {name}")
    # the spikes of the MPBN layers really fire somewhere (the comparison is not of zeros)
    assert any(g.abs().sum() > 0 for g in ref_steps[0]["grads"].values())
    for rank, res in enumerate(two_rank_results):
        lo, hi = _bounds(rank)
        _close(res["eval_out"], ref_eval[:, lo:hi], f"eval rank {rank} output")


@pytest.mark.slow  # the same two processes
def test_global_statistics_are_stable_at_large_mean(two_rank_results):
    g = torch.Generator().manual_seed(7)
    big = torch.randn(sum(SHARDS), 3, 17, generator=g, dtype=torch.float64) + 1e4
    x = big.float().double()  # what the ranks saw, exactly
    ref_mean = x.mean(dim=(0, 2))
    ref_var = x.var(dim=(0, 2), unbiased=False)
    for mean, var, count in (res["big"] for res in two_rank_results):
        assert count.item() == sum(SHARDS) * 17
        assert (mean.double() - ref_mean).abs().max() < DISTRIBUTED_LARGE_MEAN_FP32_MEAN  # float32 resolution at 1e4 is ~1e-3
        # the variance (≈1) survives a mean of 1e4: raw Σx² in float32 would lose it entirely
        assert ((var.double() - ref_var).abs() / ref_var).max() < DISTRIBUTED_LARGE_MEAN_FP32_VAR_REL


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
    assert sum(is_synchronized(m) for m in sync_net.modules()) == 11  # TEBN, 2 MPBN, 3 BNTT timestep BNs, tdBN, 2 TAB, BN2d, BN1d
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
        "gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1,
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
    assert isinstance(tebn, layer.TemporalEffectiveBatchNorm2d) and is_synchronized(tebn)
    assert tebn.supported_backends == ("torch",)
    with pytest.raises(ValueError, match="backend"):
        tebn.backend = "triton"
    # converting again is harmless; reverting restores the classes
    convert_sync_batchnorm(net)
    revert_sync_batchnorm(net)
    assert not any(is_synchronized(m) for m in net.modules())
    assert type(net[1]) is layer.TemporalEffectiveBatchNorm2d
    assert type(net[2]) is neuron.MPBNLIFNode


def test_converted_network_pickles():
    import pickle

    net = convert_sync_batchnorm(build_net())
    clone = pickle.loads(pickle.dumps(net))
    assert type(clone[1]) is type(net[1]) and is_synchronized(clone[1])


def test_bad_input_is_rejected():
    with pytest.raises(TypeError, match="nn.Module"):
        convert_sync_batchnorm("net")
    with pytest.raises(TypeError, match="ProcessGroup"):
        convert_sync_batchnorm(build_net(), process_group="world")
    net = build_net().float()
    with pytest.warns(UserWarning, match="do not support"):
        functional.set_backend(net, "triton")
    before = [type(m) for m in net.modules()]
    with pytest.raises(ValueError, match="set_backend"):
        convert_sync_batchnorm(net)
    assert [type(m) for m in net.modules()] == before  # nothing converted


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


def test_readme_documents_multi_process_training():
    readme = os.path.join(os.path.dirname(__file__), "..", "README.md")
    with open(readme, encoding="utf-8") as f:
        text = f.read()
    assert "## Multi-process training" in text and "torchrun" in text and "convert_sync_batchnorm" in text
    assert snnorm.convert_sync_batchnorm is convert_sync_batchnorm
