"""Synchronised batch statistics on the Triton statistics pipeline (DESIGN.md §8,
snnorm/backends/sync.py, snnorm/kernels/bn_pipeline.py).

The triton ops gather every rank's per-step partials (count, mean, M2) between the
partials and the reduce kernel, and all-reduce the per-step gradient sums (with the count)
between the backward's reduce and coefficient kernels. Here, in one process:

* a gloo group of world size 1 forces the synchronised code path of every op (each rule,
  the TAB continuation, the fused norm → LIF op): the triton backend with ``sync`` must equal
  the torch backend with ``sync`` (the reference, run in float64 on the same rounded inputs)
  and the unsynchronised triton result; exactly one collective per stage, of O(T·C) bytes
  (the same for two batch sizes), and the kernels really ran (perf.tools.meter);
* the launchers with hand-made collectives simulate two ranks of uneven (or empty)
  batches: the synchronised statistics, running statistics and ∂x equal the local
  pipeline's on the concatenated batch, while ∂γ, ∂β, ∂p stay the rank's own.
"""

from __future__ import annotations

import functools
import math
import os

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
import torch
from devices import DEVICE, SLOW_ON_CPU, property_examples
from helpers import norm_case
from tolerances import (
    BN_PIPELINE_LOWP_ATOL,
    BN_PIPELINE_RTOL,
    EXACT,
    NORM_NEURON_FUSED,
    REORDERED_FP64,
    SYNCED_VS_LOCAL_FP32,
    assert_close_to_reference,
)

pytest.importorskip("triton")
import torch.distributed as dist  # noqa: E402

from perf.tools import meter  # noqa: E402
from snnorm.backends import torch_backend  # noqa: E402
from snnorm.backends import triton_backend  # noqa: E402
from snnorm.backends.sync import count_collectives  # noqa: E402
from snnorm.kernels import bn_pipeline as bnp  # noqa: E402
from snnorm.params import LIFParameters  # noqa: E402
from snnorm.surrogate import Sigmoid  # noqa: E402

if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no CUDA and TRITON_INTERPRET is off", allow_module_level=True)
if not dist.is_available():
    pytest.skip("torch.distributed is not available", allow_module_level=True)

F32, F64 = torch.float32, torch.float64
EPS = 1e-5
RULES = ("batch_norm", "tebn", "bntt", "tab")
#: wire bytes of the forward gather (count [T], mean and M2 [T, C], float64) and of the
#: backward all-reduce (Σg and Σg·x̂ [T, C] and the count)


def GATHER_BYTES(T: int, C: int) -> int:
    return 8 * (T + 2 * T * C)


def REDUCE_BYTES(T: int, C: int) -> int:
    return 8 * (2 * T * C + 1)



# ------------------------------------------------------------------------- cases


#: one training call's inputs (x, ∂L/∂y, γ, β, p, running statistics, momentum): helpers.norm_case
#: on [T, N, C, *spatial] = [3, 3, 5, 4] unless a test says otherwise, x's mean away from 0
SHAPE = (3, 3, 5, 4)
case_of = functools.partial(norm_case, mean_shift=0.5)


def _leaf(t, dtype):
    return None if t is None else t.detach().to(DEVICE, dtype).clone().requires_grad_()


def run_norm(backend, rule: str, case: dict, sync, dtype, steps: bool = False) -> dict:
    """One training forward and backward of ``rule`` on ``backend``: y, ∂x, ∂γ, ∂β, ∂p and the
    running statistics after it. ``steps``: TAB one step at a time (the continuation)."""
    x, w, b, p = (_leaf(case[k], dtype) for k in ("x", "w", "b", "p"))
    rm, rv = (case[k].to(DEVICE, dtype).clone() for k in ("rm", "rv"))
    momentum, T = case["momentum"], x.shape[0]
    common = dict(training=True, eps=EPS, sync=sync)
    if rule == "batch_norm":
        y = backend.batch_norm_seq(x, w, b, rm, rv, momentum=momentum[0], **common)
    elif rule == "tebn":
        y = backend.tebn(x, w, b, rm, rv, p, momentum=momentum[0], **common)
    elif rule == "bntt":
        y = backend.bntt(x, list(w.unbind(0)), list(rm.unbind(0)), list(rv.unbind(0)), momentum=momentum,
                         eps=[EPS] * T, training=True, sync=sync)
    elif not steps:
        y, state = backend.tab(x, w, b, rm, rv, p, momentum=momentum, **common)
        assert state is None, "tab without prefix returned a prefix state"
    else:
        state, ys = (0, None, None), []
        for t in range(T):
            y_t, state = backend.tab(x[t:t + 1], w[t:t + 1], b[t:t + 1], rm[t:t + 1], rv[t:t + 1], p[t:t + 1],
                                     momentum=momentum[t:t + 1], prefix=state, **common)
            ys.append(y_t)
        y = torch.cat(ys)
    (y * case["grad"].to(DEVICE, y.dtype)).sum().backward()
    out = dict(y=y, dx=x.grad, dw=w.grad, db=b.grad if b is not None else None, dp=p.grad if p is not None else None,
               running_mean=rm, running_var=rv)
    return {k: v.detach().cpu() for k, v in out.items() if v is not None}


def compare(what: str, got: dict, want: dict, tol=None, rtol=None) -> None:
    """Every quantity of ``got`` against ``want``: elementwise ``tol`` or, with ``rtol``, against
    a float64 reference (tolerances.assert_close_to_reference)."""
    assert got.keys() == want.keys(), f"{what}: quantities {sorted(got)} vs {sorted(want)}"
    for k in got:
        if rtol is not None:
            assert_close_to_reference(f"{what}: {k}", got[k], want[k].double(), rtol=rtol)
        else:
            torch.testing.assert_close(got[k], want[k], **tol, msg=lambda m, k=k: f"{what}: {k}: {m}")


def local_tol(dtype):
    return REORDERED_FP64 if dtype == F64 else SYNCED_VS_LOCAL_FP32


# ------------------------------------------------------------- world size 1, real group


@pytest.mark.parametrize("dtype", [F64, pytest.param(F32, marks=SLOW_ON_CPU)])
@pytest.mark.parametrize("rule", RULES)
def test_synced_op_equals_torch_synced_and_local(sync, rule, dtype):
    case = case_of(rule, SHAPE, 0, dtype=dtype)
    with meter() as m, count_collectives() as log:
        got = run_norm(triton_backend, rule, case, sync, dtype)
    ref64 = run_norm(torch_backend, rule, case, sync, F64)  # the same (rounded) inputs, in float64
    compare(f"{rule} {dtype} triton+sync vs torch+sync", got, ref64, rtol=BN_PIPELINE_RTOL[dtype])
    local = run_norm(triton_backend, rule, case, None, dtype)
    compare(f"{rule} {dtype} triton+sync vs triton", got, local, tol=local_tol(dtype))
    for k in ("dw", "db", "dp"):  # W = 1: the rank's own sums, the same kernel on the same partials
        if k in got:
            torch.testing.assert_close(got[k], local[k], **EXACT)
    T, C = case["x"].shape[0], case["x"].shape[2]
    assert log == [("all_gather", GATHER_BYTES(T, C)), ("all_reduce", REDUCE_BYTES(T, C))], log
    launches = {name: k.launches for name, k in m.kernels.items()}
    # the per-step reduce before the gather, the grouping reduce after; coefficients on local and global sums
    assert launches == {"stats_partial_kernel": 1, "_stats_reduce_kernel": 2, "_apply_kernel": 1,
                        "_bwd_reduce_kernel": 1, "_bwd_coef_kernel": 2, "_bwd_dx_kernel": 1}, launches


@pytest.mark.parametrize("rule", ["batch_norm", "tebn", "bntt", "tab"])
@settings(max_examples=property_examples(4))  # every rule every run, a few shapes each
@given(dtype=st.sampled_from([F64, F32]), T=st.integers(1, 5), N=st.integers(1, 4), C=st.sampled_from([1, 2, 3, 5, 7]),
       spatial=st.lists(st.sampled_from([1, 2, 3, 5]), max_size=2), seed=st.integers(0, 2**16))
def test_synced_op_matches_torch_synced_on_any_shape(sync, rule, dtype, T, N, C, spatial, seed):
    """Property: on drawn shapes (odd C, T = 1, no spatial dims, one sample) the triton op
    with ``sync`` equals the float64 torch reference with ``sync``."""
    per_step = N * math.prod(spatial)
    assume(per_step >= 2 if rule in ("bntt", "tab") else T * per_step >= 2)  # batch statistics need 2 values
    case = case_of(rule, (T, N, C, *spatial), seed, dtype=dtype)
    got = run_norm(triton_backend, rule, case, sync, dtype)
    ref64 = run_norm(torch_backend, rule, case, sync, F64)
    compare(f"{rule} {dtype} T{T} N{N} C{C} {spatial}", got, ref64, rtol=BN_PIPELINE_RTOL[dtype])


@pytest.mark.parametrize("rule", ["batch_norm", "tebn", "bntt", "tab"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_synced_op_in_low_precision(sync, rule, dtype):
    """fp16/bf16 tensors (computed in fp32 inside): triton with ``sync`` against the float64
    torch reference with ``sync``, by the 2×-torch-in-the-same-precision rule."""
    case = case_of(rule, SHAPE, 0, dtype=dtype)
    got = run_norm(triton_backend, rule, case, sync, dtype)
    lowp = run_norm(torch_backend, rule, case, sync, dtype)
    ref64 = run_norm(torch_backend, rule, case, sync, F64)
    assert got.keys() == ref64.keys()
    for k in got:
        assert got[k].dtype == dtype, f"{rule} {k}: {got[k].dtype}"
        assert_close_to_reference(f"{rule} {dtype} synced {k}", got[k], ref64[k], lowp=lowp[k],
                                  lowp_atol=BN_PIPELINE_LOWP_ATOL[dtype])


@pytest.mark.parametrize("dtype", [F64, F32])
def test_synced_tab_continuation(sync, dtype):
    """TAB one step at a time with ``sync``: the reference's differentiable gather gives the
    statistics, the kernel applies; equal to the whole synced sequence and to the torch one."""
    case = case_of("tab", SHAPE, 0, dtype=dtype)
    with count_collectives() as log:
        got = run_norm(triton_backend, "tab", case, sync, dtype, steps=True)
    T, C = case["x"].shape[0], case["x"].shape[2]
    # one gather per step forward, O(C), and its reduce-scatter (W = 1: the same size) backward
    assert log == [("all_gather", GATHER_BYTES(1, C))] * T + [("reduce_scatter", GATHER_BYTES(1, C))] * T, log
    ref64 = run_norm(torch_backend, "tab", case, sync, F64, steps=True)
    compare(f"tab steps {dtype} triton+sync vs torch+sync", got, ref64, rtol=BN_PIPELINE_RTOL[dtype])
    whole = run_norm(triton_backend, "tab", case, sync, dtype)
    compare(f"tab steps {dtype} vs the whole sequence", got, whole, tol=local_tol(dtype))


def test_collective_bytes_do_not_depend_on_the_batch(sync):
    """O(T·C) per stage: the same collectives, byte for byte, for N·S = 6 and 40."""
    logs = []
    for N, spatial in ((2, (3,)), (5, (2, 4))):
        case = case_of("tebn", (3, N, 5, *spatial), 0, dtype=F32)
        with count_collectives() as log:
            run_norm(triton_backend, "tebn", case, sync, F32)
        logs.append(log)
    assert logs[0] == logs[1] == [("all_gather", GATHER_BYTES(3, 5)), ("all_reduce", REDUCE_BYTES(3, 5))], logs


#: every c10d entry point a collective of snnorm could take (StatsSync's and any direct one)
_C10D = ("all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_single", "reduce_scatter",
         "reduce_scatter_tensor", "broadcast", "barrier")
_FUNCOL = ("all_gather_tensor", "all_gather_tensor_autograd", "all_gather_single_autograd", "all_reduce",
           "reduce_scatter_tensor")


def record_c10d(monkeypatch) -> list:
    """Every call into torch.distributed's collectives (and the functional ones), recorded by
    name and passed on: below the hook's own count, so a collective issued without it shows."""
    import torch.distributed._functional_collectives as funcol

    calls: list = []

    def recording(name, fn):
        def wrapper(*args, **kwargs):
            calls.append(name)
            return fn(*args, **kwargs)
        return wrapper

    for module, names in ((dist, _C10D), (funcol, _FUNCOL)):
        for name in names:
            if hasattr(module, name):
                monkeypatch.setattr(module, name, recording(f"{module.__name__}.{name}", getattr(module, name)))
    return calls


def test_eval_and_no_sync_issue_no_collective(sync, monkeypatch):
    calls = record_c10d(monkeypatch)
    # the recorder sees a synchronised call's collectives (else an empty list below proves nothing)
    run_norm(triton_backend, "batch_norm", case_of("batch_norm", SHAPE, 0, dtype=F32), sync, F32)
    assert calls, "the c10d recorder saw no collective of a synchronised training call"
    calls.clear()

    # eval with a sync: the running statistics, one launch, nothing exchanged
    case = case_of("batch_norm", SHAPE, 0, dtype=F32)
    x = case["x"].to(DEVICE)
    with count_collectives() as log, meter() as m:
        triton_backend.batch_norm_seq(x, None, None, case["rm"].to(DEVICE), case["rv"].to(DEVICE), training=False,
                                      momentum=0.1, eps=EPS, sync=sync)
    assert log == [] and calls == [] and m.launches == 1, (log, calls, m.breakdown())

    # training without a sync, forward and backward, every rule on both backends and the fused norm → LIF
    neuron = LIFParameters(Sigmoid(), tau=2.0, decay_input=True, v_reset=0.0)
    with count_collectives() as log:
        for rule in RULES:
            for backend in (torch_backend, triton_backend):
                run_norm(backend, rule, case_of(rule, SHAPE, 0, dtype=F32), None, F32)
        run_norm_lif(None, "batch_norm", case, None, F32, neuron)
    assert log == [] and calls == [], (log, calls)


def run_norm_lif(backend_norm, rule: str, case: dict, sync, dtype, neuron) -> dict:
    """Fused (``backend_norm`` None: triton's norm_lif) or the torch pair lif(norm(x)):
    spikes, final membrane, ∂x, ∂γ, ∂β, ∂p, running statistics (loss Σ ∂s·s + Σ v_T)."""
    x, w, b, p = (_leaf(case[k], dtype) for k in ("x", "w", "b", "p"))
    rm, rv = (case[k].to(DEVICE, dtype).clone() for k in ("rm", "rv"))
    momentum = case["momentum"]
    if backend_norm is None:
        s, v = triton_backend.norm_lif(rule, x, 0.0, w, b, p, rm, rv, momentum=momentum, eps=EPS, batch_stats=True,
                                       threshold=1.0, neuron=neuron, sync=sync)
    else:
        if rule == "batch_norm":
            y = torch_backend.batch_norm_seq(x, w, b, rm, rv, training=True, momentum=momentum[0], eps=EPS, sync=sync)
        else:  # tab
            y, _ = torch_backend.tab(x, w, b, rm, rv, p, training=True, momentum=momentum, eps=EPS, sync=sync)
        s, v = torch_backend.lif(y, torch.zeros_like(y[0]), 1.0, neuron)
    (s * case["grad"].to(DEVICE, s.dtype)).sum().add(v.sum()).backward()
    out = dict(s=s, v=v, dx=x.grad, dw=w.grad, db=b.grad, dp=p.grad if p is not None else None,
               running_mean=rm, running_var=rv)
    return {k: t.detach().cpu() for k, t in out.items() if t is not None}


@pytest.mark.parametrize("dtype", [F64, pytest.param(F32, marks=SLOW_ON_CPU)])
@pytest.mark.parametrize("rule", ["batch_norm", "tab"])
def test_synced_norm_lif_equals_torch_pair_and_local(sync, rule, dtype):
    neuron = LIFParameters(Sigmoid(), tau=2.0, decay_input=True, v_reset=0.0)
    case = case_of(rule, SHAPE, 0, dtype=dtype)
    with meter() as m, count_collectives() as log:
        got = run_norm_lif(None, rule, case, sync, dtype, neuron)
    T, C = case["x"].shape[0], case["x"].shape[2]
    assert log == [("all_gather", GATHER_BYTES(T, C)), ("all_reduce", REDUCE_BYTES(T, C))], log
    launches = {name: k.launches for name, k in m.kernels.items()}
    assert launches == {"stats_partial_kernel": 1, "_stats_reduce_kernel": 2, "_norm_lif_fwd_kernel": 1,
                        "_norm_lif_bwd_kernel": 1, "_bwd_coef_kernel": 2, "_bwd_dx_kernel": 1}, launches
    ref = run_norm_lif(torch_backend, rule, case, sync, F64, neuron)
    local = run_norm_lif(None, rule, case, None, dtype, neuron)
    # a spike within rounding of the threshold may flip between implementations: none on this draw
    assert torch.equal(got["s"], ref["s"].to(dtype)) and torch.equal(got["s"], local["s"]), "a spike flipped"
    compare(f"norm_lif {rule} {dtype} vs torch pair", got, {k: t.to(dtype) for k, t in ref.items()},
            tol=NORM_NEURON_FUSED[dtype])
    compare(f"norm_lif {rule} {dtype} vs local", got, local, tol=local_tol(dtype))


# ------------------------------------------------- two ranks simulated at the launchers


def _rank_gather(r, x_other):
    """A ``gather`` for rank 0 of two: rank 1's partials come from the same launcher on its
    batch (its gather captures what it would send)."""

    def gather(count, mean, m2):
        sent = []
        bnp.launch_stats(r, x_other, None, None, [], gather=lambda *t: sent.append(t) or tuple(u[None] for u in t))
        return tuple(torch.stack((a.to(b.dtype), b)) for a, b in zip((count, mean, m2), sent[0]))

    return gather


def _rank_all_reduce(r, g_other, x_other, launch_args):
    """An ``all_reduce`` for rank 0 of two: adds what rank 1's backward would send."""

    def all_reduce(packed):
        sent = []
        bnp.launch_backward(r, g_other, x_other, *launch_args, all_reduce=lambda t: sent.append(t) or t)
        return packed + sent[0]

    return all_reduce


@pytest.mark.parametrize("n_local", [pytest.param(2, marks=SLOW_ON_CPU), 0])  # 0: the empty rank, by default
@pytest.mark.parametrize("rule", RULES)
def test_two_simulated_ranks_equal_the_concatenated_batch(rule, n_local):
    """Rank 0 holds ``n_local`` samples, rank 1 three: statistics, running statistics and ∂x
    are those of the concatenated batch (under the sum of both ranks' losses); ∂γ, ∂β, ∂p
    are rank 0's own (∂ of its loss alone), as DistributedDataParallel expects."""
    r = bnp.rule(rule)
    case0, case1 = case_of(rule, (3, n_local, 5, 4), 1, dtype=F64), case_of(rule, SHAPE, 2, dtype=F64)
    x0, x1 = case0["x"].to(DEVICE), case1["x"].to(DEVICE)
    g0, g1 = case0["grad"].to(DEVICE), case1["grad"].to(DEVICE)
    w, b, p = (case0[k].to(DEVICE) if case0[k] is not None else None for k in ("w", "b", "p"))
    rm, rv, momentum = case0["rm"].to(DEVICE).clone(), case0["rv"].to(DEVICE).clone(), case0["momentum"]
    rm_ref, rv_ref = rm.clone(), rv.clone()

    mean, var = bnp.launch_stats(r, x0, rm, rv, momentum, gather=_rank_gather(r, x1))
    y0 = bnp.launch_apply(r, x0, w, b, mean, var, p, EPS)
    args = (w, b, mean, var, p, EPS, True, True, True)
    dx0, dw0, db0, dp0, _, _ = bnp.launch_backward(r, g0, x0, *args, all_reduce=_rank_all_reduce(r, g1, x1, args))

    # the local pipeline on the concatenated batch, and autograd through it for rank 0's own parameter gradients
    x_all = torch.cat((x0, x1), dim=1)
    mean_all, var_all = bnp.launch_stats(r, x_all, rm_ref, rv_ref, momentum)
    for what, got, want in (("mean", mean, mean_all), ("var", var, var_all), ("running mean", rm, rm_ref),
                            ("running var", rv, rv_ref), ("y", y0, bnp.launch_apply(r, x_all, w, b, mean_all,
                                                                                     var_all, p, EPS)[:, :n_local])):
        torch.testing.assert_close(got, want, **REORDERED_FP64, msg=lambda m, what=what: f"{rule}: {what}: {m}")
    g_all = torch.cat((g0, g1), dim=1)
    dx_all = bnp.launch_backward(r, g_all, x_all, *args[:2], mean_all, var_all, *args[4:])[0]
    torch.testing.assert_close(dx0, dx_all[:, :n_local], **REORDERED_FP64)
    own = bnp.launch_backward(r, torch.cat((g0, torch.zeros_like(g1)), dim=1), x_all, *args[:2], mean_all, var_all,
                              *args[4:])
    for what, got, want in (("dw", dw0, own[1]), ("db", db0, own[2]), ("dp", dp0, own[3])):
        torch.testing.assert_close(got, want, **REORDERED_FP64, msg=lambda m, what=what: f"{rule}: {what}: {m}")


def test_synced_ops_pass_opcheck(sync):
    """The ops with a group name: schema, fake kernels and autograd registration hold."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 5, 4, dtype=F64, generator=g).to(DEVICE)
    w, b = (1 + torch.rand(5, dtype=F64, generator=g)).to(DEVICE), torch.rand(5, dtype=F64, generator=g).to(DEVICE)
    rm, rv = torch.zeros(5, dtype=F64, device=DEVICE), torch.ones(5, dtype=F64, device=DEVICE)
    group = sync.group_name
    torch.library.opcheck(torch.ops.snnorm.bn_stats.default, (x, rm, rv, [0.1], "batch_norm", group))
    mean, var = torch.ops.snnorm.bn_stats(x, None, None, [0.1], "batch_norm", group)
    xg, wg, bg = (t.clone().requires_grad_() for t in (x, w, b))
    torch.library.opcheck(torch.ops.snnorm.bn_apply.default, (xg, wg, bg, mean, var, None, EPS, "batch_norm", True,
                                                               group))
