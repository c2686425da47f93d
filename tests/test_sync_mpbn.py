"""The triton MPBN-LIF with batch statistics synchronised across ranks (``sync=``).

One process, a process group of world size 1 (gloo; nccl for CUDA tensors on a GPU) and
``StatsSync(dist.group.WORLD)`` built directly: the synchronised code path runs — the
pipelined kernels with SYNCED statistics, one all-gather per step forward and one
all-reduce per step backward — while the answer must be that of one rank alone. So the
triton op with sync is checked against the torch backend with sync (the reference) and
against the triton op without sync: spikes, v_T, ∂x, ∂v0, ∂γ, ∂β, ∂θ and the running
statistics, both carries, fp64 and fp32, on a shape whose unsynchronised run takes the
resident path and on one tiled into uneven pipelined tiles. The collective meter
(:func:`snnorm.backends.sync.count_collectives`) checks one collective per step each way
carrying 1 + 2C float64 values, whatever N and the spatial size.

World size 1 cannot tell the global statistics from the local ones, so the launchers are
also run with the exchange of two identical ranks (gather: this rank's partials twice;
all-reduce: twice the sums): the oracle is one unsynchronised run on the batch
concatenated with itself — same spikes, mean and rstd, running variance with the
unbiased factor of the global count 2M, ∂x the concatenated run's, and ∂γ, ∂β, ∂θ half
of it (each rank keeps its own sums; DistributedDataParallel averages them).
"""

from __future__ import annotations

import helpers
import pytest
import torch
from devices import DEVICE, SLOW_ON_CPU
from tolerances import (
    EXACT, REORDERED_FP64, TRITON_FP64, TRITON_VS_TORCH_FP32, TRITON_VS_TORCH_GRAD_FP32,
    comparable_entries,
)

pytest.importorskip("triton")

from snnorm import surrogate as sg  # noqa: E402
from snnorm.backends import torch_backend as ref  # noqa: E402
from snnorm.backends import triton_backend as K  # noqa: E402
from snnorm.backends.sync import WIRE_DTYPE, combine_rank_partials, count_collectives  # noqa: E402
from snnorm.kernels import mpbn_lif_train as train_kernels  # noqa: E402
from snnorm.params import BNKernelParameters, BNStatistics, LIFParameters, MPBNParameters  # noqa: E402

LIF = LIFParameters(sg.Sigmoid(), tau=2.0, decay_input=False, v_reset=0.0, detach_reset=False)
TRAIN = BNStatistics(training=True, momentum=0.1, batches_tracked=0)
#: 4·2·2 elements a channel: the resident path unsynchronised (C = 3 programs when
#: MIN_PROGRAMS is lowered to 1, as the interpreter affords; H100 is C = 132, as is)
RESIDENT = (3, 4, 3, 2, 2)
H100_RESIDENT = (3, 4, 132, 2, 2)
#: a channel of 8·40 elements over three pipelined tiles of 128, 128 and 64 elements
TILED = (3, 8, 2, 5, 8)
#: the gradients the op returns, by leaf
LEAVES = ("x", "v", "weight", "bias", "th")


def _inputs(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    C = shape[2]
    return dict(
        x=torch.randn(shape, generator=g, dtype=torch.float64) * 1.5 + 0.3,
        v=torch.randn(shape[1:], generator=g, dtype=torch.float64) * 0.2,
        weight=torch.rand(C, generator=g, dtype=torch.float64) + 0.5,
        bias=torch.randn(C, generator=g, dtype=torch.float64) * 0.3,
        th=torch.rand(C, generator=g, dtype=torch.float64) * 0.2 + 0.4,
        gs=torch.randn(shape, generator=g, dtype=torch.float64),
        gv=torch.randn(shape[1:], generator=g, dtype=torch.float64),
    )


def _run(ops, inp, dtype, carry, sync, training=True, record=None):
    """Spikes, v_T, running statistics and the gradients of Σ s·gs + Σ v_T·gv in ``dtype``
    (``record``: True for the torch reference, whose firing variable z is then returned as "z")."""
    rec = helpers.RecordingSurrogate(LIF.surrogate) if record else None
    leaves = {k: inp[k].to(DEVICE, dtype, copy=True).requires_grad_(True) for k in LEAVES}
    C = inp["weight"].numel()
    rm = torch.linspace(-0.2, 0.2, C, dtype=dtype, device=DEVICE)
    rv = torch.linspace(0.8, 1.2, C, dtype=dtype, device=DEVICE)
    norm = MPBNParameters(eps=1e-5, carry=carry)
    lif = LIF._replace(surrogate=rec) if rec else LIF
    s, v_out = ops.mpbn_lif(
        leaves["x"], leaves["v"], leaves["weight"], leaves["bias"], rm, rv, leaves["th"], lif, norm,
        TRAIN._replace(training=training), sync=sync,
    )
    out = dict(s=s.detach(), v_out=v_out.detach(), running_mean=rm, running_var=rv)
    loss = (s * inp["gs"].to(DEVICE, dtype)).sum() + (v_out * inp["gv"].to(DEVICE, dtype)).sum()
    for k, g in zip(LEAVES, torch.autograd.grad(loss, list(leaves.values()))):
        out["grad_" + k] = g
    if rec:
        out["z"] = rec.firing_variable(out["s"])
    return out


def _assert_agree(what, got, want, z, dtype, values, grads):
    """Spikes equal except at the threshold (each flip within tolerances.FLIP_MARGIN_EPS eps of
    the torch reference's firing variable ``z``; a flip masks its channel from then on); every
    other quantity on the channels no flip reached, within ``values`` / ``grads``."""
    clean = helpers.assert_flips_placed(what, got["s"], want["s"], z, dtype, channel_coupled=True)
    for key in want:
        if key in ("s", "z"):
            continue
        mask = comparable_entries(want[key], clean, key)
        tol = grads if key.startswith("grad_") else values
        torch.testing.assert_close(got[key][mask], want[key][mask], **tol, msg=lambda m: f"{what}, {key}: {m}")


class _Counting:
    """Wraps a kernel: records (name, SYNCED) of each launch, then launches it."""

    def __init__(self, name, kernel, log):
        self.name, self.kernel, self.log = name, kernel, log

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def counted(*args, **kwargs):
            self.log.append((self.name, kwargs.get("SYNCED")))
            return launch(*args, **kwargs)

        return counted


def _count_launches(monkeypatch):
    log = []
    for name in dir(train_kernels):
        if name.endswith("_kernel"):
            monkeypatch.setattr(train_kernels, name, _Counting(name, getattr(train_kernels, name), log))
    return log


# the default run: fp64 (fp32 flips are placed, not excluded: slow set)
@pytest.mark.parametrize("dtype", [torch.float64, pytest.param(torch.float32, marks=SLOW_ON_CPU)])
@pytest.mark.parametrize("carry", ["normalized", "raw"])
@pytest.mark.parametrize(
    "shape",
    [RESIDENT, TILED, pytest.param(H100_RESIDENT, marks=SLOW_ON_CPU)],  # 132 programs a launch: ~20 s interpreted
    ids=["resident-shape", "tiled", "h100-resident-shape"],
)
def test_synced_equals_torch_synced_and_unsynced(sync, monkeypatch, shape, carry, dtype):
    T, N, C = shape[:3]
    S = shape[3] * shape[4]
    if shape == RESIDENT:
        monkeypatch.setattr(train_kernels, "MIN_PROGRAMS", 1)
    resident = train_kernels.uses_resident_path(N, C, S)
    assert resident == (shape != TILED)
    inp = _inputs(shape)
    log = _count_launches(monkeypatch)

    with count_collectives() as collectives:
        got = _run(K, inp, dtype, carry, sync)
    # the synchronised op: the pipelined path, T + 1 launches each way, all SYNCED
    fwd = [e for e in log if e[0] == "_mpbn_lif_pipelined_fwd_kernel"]
    bwd = [e for e in log if e[0] == "_mpbn_lif_pipelined_bwd_kernel"]
    assert len(fwd) == T + 1 and len(bwd) == T + 1 and len(log) == 2 * (T + 1), log
    assert all(synced for _, synced in log), log
    # one collective per step each way, 1 + 2C float64 values (count, C means and C M2 / C A and C B)
    per_step = (1 + 2 * C) * torch.finfo(WIRE_DTYPE).bits // 8
    assert collectives == [("all_gather", per_step)] * T + [("all_reduce", per_step)] * T, collectives

    del log[:]
    plain = _run(K, inp, dtype, carry, None)
    path = "resident" if resident else "pipelined"
    assert [name for name, _ in log] == [f"_mpbn_lif_{path}_fwd_kernel"] * (1 if resident else T + 1) + [
        f"_mpbn_lif_{path}_bwd_kernel"] * (1 if resident else T + 1), log
    assert not any(synced for _, synced in log), log  # without sync: SYNCED off (or absent: resident)

    want = _run(ref, inp, dtype, carry, sync, record=True)
    z = want.pop("z")  # the torch reference's firing variable: where a flip may sit
    if dtype == torch.float64:
        _assert_agree("triton synced vs torch synced", got, want, z, dtype, TRITON_FP64,
                      TRITON_FP64)
        _assert_agree("triton synced vs triton alone", got, plain, z, dtype, REORDERED_FP64, REORDERED_FP64)
    else:
        tols = (TRITON_VS_TORCH_FP32, TRITON_VS_TORCH_GRAD_FP32)
        _assert_agree("triton synced vs torch synced", got, want, z, dtype, *tols)
        _assert_agree("triton synced vs triton alone", got, plain, z, dtype, *tols)


@pytest.mark.parametrize("shape", [(2, 3, 3, 7, 3), (2, 9, 3, 4, 17), (2, 2, 3, 1, 1)])
def test_collective_bytes_do_not_grow_with_batch_or_space(sync, shape):
    # C = 3 at every shape: T all-gathers and T all-reduces of 1 + 2·3 float64 values
    inp = _inputs(shape, seed=1)
    with count_collectives() as collectives:
        _run(K, inp, torch.float64, "normalized", sync)
    T, C = shape[0], shape[2]
    per_step = (1 + 2 * C) * torch.finfo(WIRE_DTYPE).bits // 8
    assert collectives == [("all_gather", per_step)] * T + [("all_reduce", per_step)] * T, collectives


def test_eval_with_running_statistics_never_syncs(sync):
    inp = _inputs(TILED, seed=2)
    with count_collectives() as collectives:
        got = _run(K, inp, torch.float64, "normalized", sync, training=False)
    assert collectives == []
    plain = _run(K, inp, torch.float64, "normalized", None, training=False)
    for key in plain:
        torch.testing.assert_close(got[key], plain[key], **EXACT)


@pytest.mark.parametrize("carry_norm", [True, pytest.param(False, marks=SLOW_ON_CPU)], ids=["normalized", "raw"])
@pytest.mark.parametrize("shape", [TILED, RESIDENT], ids=["tiled", "resident-shape"])
def test_two_identical_ranks_equal_the_doubled_batch(shape, carry_norm):
    T, N, C = shape[:3]
    inp = {k: t.to(DEVICE) for k, t in _inputs(shape, seed=4).items()}
    lif, bn = LIF.for_kernel("sigmoid", 4.0), BNKernelParameters(1e-5, 0.1, 0)

    def two_ranks(count, mean, m2):  # rank 1 sent the same partials
        return combine_rank_partials(*(torch.stack([t, t]) for t in (count, mean, m2)))

    def run(x, v, gs, gv, sync_stats=None, sync_sums=None):
        rm = torch.linspace(-0.2, 0.2, C, dtype=torch.float64, device=DEVICE)
        rv = torch.linspace(0.8, 1.2, C, dtype=torch.float64, device=DEVICE)
        s, v_out, h, mean, rstd, _, _ = train_kernels.launch_batch_stats_fwd(
            x, v, inp["weight"], inp["bias"], rm, rv, inp["th"], None, None, None, torch.float64,
            lif=lif, bn=bn, stats=0, carry_norm=carry_norm, save=True, sync_stats=sync_stats,
        )
        gx, gv0, gw, gb, gth = train_kernels.launch_train_bwd(
            gs, gv, h, torch.float64, mean, rstd, inp["weight"], inp["bias"], inp["th"], lif=lif, carry_norm=carry_norm,
            sync_sums=sync_sums,
        )
        return dict(s=s, v_out=v_out, mean=mean, rstd=rstd, running_mean=rm, running_var=rv, gx=gx, gv0=gv0, gw=gw,
                    gb=gb, gth=gth)

    got = run(inp["x"], inp["v"], inp["gs"], inp["gv"], two_ranks, lambda sums: 2 * sums)
    twice = run(*(torch.cat([inp[k], inp[k]], dim=d) for k, d in (("x", 1), ("v", 0), ("gs", 1), ("gv", 0))))
    mine = dict(s=twice["s"][:, :N], v_out=twice["v_out"][:N], gx=twice["gx"][:, :N], gv0=twice["gv0"][:N],
                **{k: twice[k] / 2 for k in ("gw", "gb", "gth")},  # this rank's half of the sums
                **{k: twice[k] for k in ("mean", "rstd", "running_mean", "running_var")})
    for key, want in mine.items():
        torch.testing.assert_close(got[key], want, **REORDERED_FP64, msg=lambda m: f"{key}: {m}")
    alone = run(inp["x"], inp["v"], inp["gs"], inp["gv"])  # the check can fail: one rank's M − 1 differs
    assert not torch.allclose(alone["running_var"], got["running_var"], **REORDERED_FP64)


def test_synced_forward_without_gradient_equals_the_training_forward(sync):
    # no autograd: h is not saved (a two-row ping-pong); the exchange reads only the partials
    inp = _inputs(TILED, seed=5)
    got = _run(K, inp, torch.float64, "raw", sync)
    x, v = inp["x"].to(DEVICE), inp["v"].to(DEVICE)
    rm = torch.linspace(-0.2, 0.2, TILED[2], dtype=torch.float64, device=DEVICE)
    rv = torch.linspace(0.8, 1.2, TILED[2], dtype=torch.float64, device=DEVICE)
    with torch.no_grad(), count_collectives() as collectives:
        s, v_out = K.mpbn_lif(x, v, inp["weight"].to(DEVICE), inp["bias"].to(DEVICE), rm, rv, inp["th"].to(DEVICE), LIF,
                              MPBNParameters(eps=1e-5, carry="raw"), TRAIN, sync=sync)
    assert [kind for kind, _ in collectives] == ["all_gather"] * TILED[0]
    for key, value in dict(s=s, v_out=v_out, running_mean=rm, running_var=rv).items():
        torch.testing.assert_close(value, got[key], **EXACT, msg=lambda m: f"{key}: {m}")
