"""TAB (temporal accumulated BN, Jiang et al., ICLR 2024): the layer and the torch op.

The oracle is the O(T²) restatement of the official code (perf/tools/tab_baseline.py: one
BatchNorm3d per step over the growing block x[0..t]); snnorm's O(T) op, built on prefix
statistics, must give the same outputs, gradients (∂x, ∂γ_t, ∂β_t, ∂p) and per-step
running statistics, over several training steps and in eval: float64 to ~1e-12, float32
loosely (the two sum in different orders). The largest differences are printed.
"""

from __future__ import annotations

import math

import pytest
import torch
from tolerances import (
    AUTOCAST_TAB, AUTOCAST_TAB_BUFFERS, BENCH_TAB_SMOKE_MAX_ABS_ERR, AUTOCAST_TAB_PARAM_GRAD, TAB_EVAL_VS_TRAIN_FP64, TAB_GRAD_REACHES_STEP0,
    TAB_NOT_PER_STEP_GAP, TAB_PREFIX_MEAN_FP64, TAB_PREFIX_VAR_FP64, TAB_REORDERED_FP64, TAB_VS_OFFICIAL_REL,
)

from perf.tools import QuadraticTAB, run_on_tncs
from snnorm import functional, layer
from snnorm.backends import torch_backend

T, N, C = 3, 4, 5
LAYOUTS = {  # layer class, sample shape [N, C, *spatial]
    "1d": (layer.TemporalAccumulatedBatchNorm1d, (N, C)),
    "1d_L": (layer.TemporalAccumulatedBatchNorm1d, (N, C, 7)),
    "2d": (layer.TemporalAccumulatedBatchNorm2d, (N, C, 3, 5)),
    "3d": (layer.TemporalAccumulatedBatchNorm3d, (2, C, 2, 3, 3)),
}
MAX_DIFF: dict = {}


@pytest.fixture(scope="module", autouse=True)
def _report_diffs():
    yield
    if MAX_DIFF:
        lines = [f"  {d:>8} {what:<14} {v:.3g}" for (d, what), v in sorted(MAX_DIFF.items())]
        print("\nlargest |O(T) - O(T^2) baseline| / (1 + max|baseline|):\n" + "\n".join(lines))


def _close(ours, theirs, dtype, what):
    ours, theirs = ours.detach().double(), theirs.detach().double()
    err = ((ours - theirs).abs().max() / (1 + theirs.abs().max())).item()
    key = (str(dtype).replace("torch.", ""), what)
    MAX_DIFF[key] = max(MAX_DIFF.get(key, 0.0), err)
    assert err <= TAB_VS_OFFICIAL_REL[dtype], f"{what}: relative difference {err:.3g} > {TAB_VS_OFFICIAL_REL[dtype]}"


def _pair(cls, momentum=0.1, affine=True, track=True, dtype=torch.float64, seed=0):
    """(snnorm TAB, official-algorithm baseline) with the same random parameters."""
    torch.manual_seed(seed)
    ours = cls(T, C, momentum=momentum, affine=affine, track_running_stats=track).to(dtype)
    with torch.no_grad():
        if affine:
            ours.weight.uniform_(0.5, 1.5)
            ours.bias.uniform_(-0.5, 0.5)
        ours.p.uniform_(0.6, 1.4)
    base = QuadraticTAB(C, T, momentum=momentum, affine=affine, track_running_stats=track).to(dtype)
    base.load_state_dict(ours.state_dict())
    return ours, base


def _sequence(sample, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    # a drifting mean over t, so the accumulated statistics differ from per-step ones
    x = torch.randn(T, *sample, generator=g, dtype=torch.float64) * 1.7 + 0.4
    x = x + torch.arange(T, dtype=torch.float64).view(T, *[1] * len(sample))
    return x.to(dtype)


def _compare(ours, base, x, dtype, tag=""):
    xa = x.clone().requires_grad_()
    xb = x.clone().requires_grad_()
    ya, yb = ours(xa), run_on_tncs(base, xb)
    _close(ya, yb, dtype, "output" + tag)
    if not torch.is_grad_enabled() or not ours.training:
        return
    g = torch.randn(ya.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64).to(dtype)
    ya.backward(g)
    yb.backward(g)
    _close(xa.grad, xb.grad, dtype, "grad_x" + tag)
    _close(ours.p.grad, base.p.grad.flatten(), dtype, "grad_p")
    if ours.affine:
        _close(ours.weight.grad, torch.stack([bn.weight.grad for bn in base.bn_list]), dtype, "grad_weight")
        _close(ours.bias.grad, torch.stack([bn.bias.grad for bn in base.bn_list]), dtype, "grad_bias")
    if ours.track_running_stats:
        _close(ours.running_mean, torch.stack([bn.running_mean for bn in base.bn_list]), dtype, "running_mean")
        _close(ours.running_var, torch.stack([bn.running_var for bn in base.bn_list]), dtype, "running_var")
        assert ours.num_batches_tracked.tolist() == [bn.num_batches_tracked.item() for bn in base.bn_list]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("momentum", [0.1, None], ids=["m0.1", "cumulative"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_matches_quadratic_baseline(layout, momentum, dtype):
    cls, sample = LAYOUTS[layout]
    ours, base = _pair(cls, momentum=momentum, dtype=dtype)
    for step in range(2):
        for m in (ours, base):
            m.zero_grad()
        _compare(ours, base, _sequence(sample, dtype, step), dtype)
    ours.eval(), base.eval()
    _compare(ours, base, _sequence(sample, dtype, 5), dtype, "_eval")


@pytest.mark.parametrize("affine", [True, False])
def test_without_running_stats_eval_uses_accumulated_batch_stats(affine):
    ours, base = _pair(layer.TemporalAccumulatedBatchNorm2d, affine=affine, track=False)
    assert ours.running_mean is None and "bn_list.0.running_mean" not in ours.state_dict()
    x = _sequence(LAYOUTS["2d"][1], torch.float64, 1)
    _compare(ours, base, x, torch.float64)
    y_train = ours(x)
    ours.eval(), base.eval()
    _compare(ours, base, x, torch.float64, "_eval")
    torch.testing.assert_close(ours(x), y_train, **TAB_EVAL_VS_TRAIN_FP64)


def test_accumulated_statistics_are_not_per_step():
    """Step 0 uses its own statistics; step t > 0 those of x[0..t] (not of x[t] alone)."""
    ours, _ = _pair(layer.TemporalAccumulatedBatchNorm1d)
    with torch.no_grad():
        ours.weight.fill_(1), ours.bias.zero_(), ours.p.fill_(1)
    x = _sequence((N, C, 7), torch.float64, 3)
    y = ours(x)
    block = x[:2].movedim(2, 0).flatten(1)  # [C, 2·N·L]
    expected = (x[1] - block.mean(1).view(1, C, 1)) / torch.sqrt(block.var(1, unbiased=False).view(1, C, 1) + ours.eps)
    torch.testing.assert_close(y[1], expected, **TAB_REORDERED_FP64)
    assert not torch.allclose(y[1], torch.nn.functional.batch_norm(x[1], None, None, training=True), **TAB_NOT_PER_STEP_GAP)


def test_gradient_reaches_earlier_steps_through_statistics():
    ours, _ = _pair(layer.TemporalAccumulatedBatchNorm2d)
    x = _sequence(LAYOUTS["2d"][1], torch.float64, 2).requires_grad_()
    ours(x)[T - 1].sum().backward()  # only the last step's output
    assert x.grad[0].abs().max() > TAB_GRAD_REACHES_STEP0  # reaches step 0 through μ_{T−1}, σ²_{T−1}


def test_chan_prefix_equals_direct_statistics():
    x = _sequence((N, C, 3, 4), torch.float64, 4) * 100 + 1e3
    n, mean, m2 = torch_backend.tab_step_stats(x)
    count, pmean, pm2 = torch_backend.chan_prefix(n, mean, m2)
    for t in range(T):
        block = x[: t + 1].movedim(2, 0).flatten(1)
        assert count[t] == block.shape[1]
        torch.testing.assert_close(pmean[t], block.mean(1), **TAB_PREFIX_MEAN_FP64)
        torch.testing.assert_close(pm2[t] / count[t], block.var(1, unbiased=False), **TAB_PREFIX_VAR_FP64)


# -- state_dict -----------------------------------------------------------------------------


@pytest.mark.parametrize("p_shape", [(T, 1, 1, 1, 1), (T,)])
def test_loads_official_checkpoint(p_shape):
    _, base = _pair(layer.TemporalAccumulatedBatchNorm2d, seed=3)
    base(torch.randn(N, T, C, 3, 3, dtype=torch.float64))  # non-trivial running statistics
    sd = base.state_dict()
    sd["p"] = sd["p"].reshape(p_shape)
    ours = layer.TemporalAccumulatedBatchNorm2d(T, C).double()
    ours.load_state_dict(sd)
    for t, bn in enumerate(base.bn_list):
        assert torch.equal(ours.weight[t], bn.weight) and torch.equal(ours.bias[t], bn.bias)
        assert torch.equal(ours.running_mean[t], bn.running_mean) and torch.equal(ours.running_var[t], bn.running_var)
        assert ours.num_batches_tracked[t] == bn.num_batches_tracked
    assert torch.equal(ours.p, base.p.flatten())


def test_state_dict_round_trips_and_keys():
    ours, _ = _pair(layer.TemporalAccumulatedBatchNorm3d, seed=4)
    ours(_sequence(LAYOUTS["3d"][1], torch.float64, 0))
    sd = ours.state_dict()
    assert set(sd) == {f"bn_list.{t}.{k}" for t in range(T) for k in
                       ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")} | {"p"}
    other = layer.TemporalAccumulatedBatchNorm3d(T, C).double()
    other.load_state_dict(sd)
    for a, b in zip(ours.state_dict().values(), other.state_dict().values()):
        assert torch.equal(a, b)
    wrapped = torch.nn.Sequential(other)  # nested prefix
    wrapped.load_state_dict({f"0.{k}": v for k, v in sd.items()})


def test_load_state_dict_reports_missing_unexpected_and_shape():
    m = layer.TemporalAccumulatedBatchNorm2d(T, C)
    sd = m.state_dict()
    with pytest.raises(RuntimeError, match="Missing key.*bn_list.1.bias"):
        m.load_state_dict({k: v for k, v in sd.items() if k != "bn_list.1.bias"})
    with pytest.raises(RuntimeError, match="Unexpected key.*bn_list.9.weight"):
        m.load_state_dict({**sd, "bn_list.9.weight": torch.ones(C)})
    with pytest.raises(RuntimeError, match="size mismatch for p"):
        m.load_state_dict({**sd, "p": torch.ones(T + 1)})
    result = m.load_state_dict({k: v for k, v in sd.items() if k != "p"}, strict=False)
    assert result.missing_keys == ["p"]


# -- single-step mode -------------------------------------------------------------------------


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("track", [True, False])
def test_single_step_equals_multi_step(training, track):
    multi, _ = _pair(layer.TemporalAccumulatedBatchNorm2d, track=track, momentum=None)
    single = layer.TemporalAccumulatedBatchNorm2d(T, C, momentum=None, track_running_stats=track, step_mode="s")
    single = single.double()
    single.load_state_dict(multi.state_dict())
    if track:  # the same non-trivial running statistics in both
        mean, var = torch.rand(T, C, dtype=torch.float64) - 0.5, torch.rand(T, C, dtype=torch.float64) + 0.5
        with torch.no_grad():
            for m in (multi, single):
                m.running_mean.copy_(mean), m.running_var.copy_(var)
    multi.train(training), single.train(training)
    x = _sequence(LAYOUTS["2d"][1], torch.float64, 6)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya = multi(xa)
    yb = torch.stack([single(xb[t]) for t in range(T)])
    assert single.t == T - 1
    torch.testing.assert_close(ya, yb, **TAB_REORDERED_FP64)
    g = torch.randn_like(ya)
    ya.backward(g), yb.backward(g)
    torch.testing.assert_close(xa.grad, xb.grad, **TAB_REORDERED_FP64)
    for name in ("weight", "bias", "p"):
        torch.testing.assert_close(getattr(multi, name).grad, getattr(single, name).grad, **TAB_REORDERED_FP64, msg=name)
    for a, b in zip(multi.buffers(), single.buffers()):
        torch.testing.assert_close(a.double(), b.double(), **TAB_REORDERED_FP64)


def test_single_step_over_T_raises_and_reset_net_clears():
    m = layer.TemporalAccumulatedBatchNorm1d(T, C, step_mode="s")
    x = torch.randn(N, C)
    for _ in range(T):
        m(x)
    assert m.stat_count == T * N and m.stat_mean.shape == (C,)
    tracked = m.num_batches_tracked.clone()
    with pytest.raises(ValueError, match=r"T=3 timesteps.*reset_net"):
        m(x)
    assert torch.equal(m.num_batches_tracked, tracked)  # the rejected call counted nothing
    functional.reset_net(m)
    assert m.t == -1 and m.stat_count == 0 and m.stat_mean is None and m.stat_m2 is None
    first = m(x)
    functional.reset_net(m)
    assert torch.allclose(m(x), first)


def test_multi_step_leaves_memories_alone():
    m = layer.TemporalAccumulatedBatchNorm1d(T, C)
    m(torch.randn(T, N, C))
    m(torch.randn(T, N, C))  # no reset needed between sequences
    assert m.t == -1 and m.stat_mean is None


# -- bad input -----------------------------------------------------------------------------


def _snapshot(m):
    return {k: v.clone() for k, v in m.state_dict().items()}, m.t, m.stat_count


def _rejects(m, x, exc, *fragments):
    before = _snapshot(m)
    with pytest.raises(exc) as info:
        m(x)
    after = _snapshot(m)
    assert before[1:] == after[1:] and all(torch.equal(before[0][k], after[0][k]) for k in before[0])
    for f in fragments:
        assert f in str(info.value), (f, str(info.value))
    assert str(info.value).startswith(type(m).__name__)


@pytest.mark.parametrize("step_mode", ["m", "s"])
def test_bad_input_rejected_without_state_change(step_mode):
    m = layer.TemporalAccumulatedBatchNorm2d(T, C, step_mode=step_mode)
    lead = (T,) if step_mode == "m" else ()
    _rejects(m, torch.randn(*lead, N, C, 4), ValueError, "expected x with shape [", "but got x with shape")
    _rejects(m, torch.randn(*lead, N, C + 1, 4, 4), ValueError, f"expects {C} channels", str(C + 1))
    _rejects(m, torch.ones(*lead, N, C, 4, 4, dtype=torch.long), TypeError, "floating-point", "torch.int64")
    _rejects(m, torch.randn(*lead, N, C, 4, 4, device="meta"), ValueError, "input is on meta", "cpu")
    _rejects(m, [1.0], TypeError, "torch.Tensor", "list")
    _rejects(m, torch.randn(*lead, 1, C, 1, 1), ValueError, "more than one value per channel", "1 value(s)")
    _rejects(m, torch.randn(*lead, 0, C, 2, 2), ValueError, "more than one value per channel", "0 value(s)")
    if step_mode == "m":
        for wrong in (1, T + 1):
            _rejects(m, torch.randn(wrong, N, C, 4, 4), ValueError, f"T={T}", f"T={wrong}")


def test_constructor_rejects_bad_arguments():
    with pytest.raises(ValueError, match="T must be"):
        layer.TemporalAccumulatedBatchNorm2d(0, C)
    for bad_T in (2.0, True):
        with pytest.raises(TypeError, match="T must be"):
            layer.TemporalAccumulatedBatchNorm2d(bad_T, C)
    for name, kwargs in (("eps", dict(eps=-1e-5)), ("momentum", dict(momentum=1.5))):
        with pytest.raises(ValueError, match=f"{name} must"):
            layer.TemporalAccumulatedBatchNorm2d(T, C, **kwargs)
    with pytest.raises(ValueError, match="num_features"):
        layer.TemporalAccumulatedBatchNorm2d(T, 0)
    with pytest.raises(ValueError, match="step_mode"):
        layer.TemporalAccumulatedBatchNorm2d(T, C, step_mode="x")


def test_reset_parameters_and_repr():
    m = layer.TemporalAccumulatedBatchNorm2d(T, C)
    m(torch.randn(T, N, C, 2, 2))
    with torch.no_grad():
        m.p.mul_(3), m.weight.mul_(2)
    m.reset_parameters()
    assert torch.equal(m.p, torch.ones(T)) and torch.equal(m.weight, torch.ones(T, C))
    assert m.num_batches_tracked.tolist() == [0] * T
    assert "T=3" in repr(m) and "backend=torch" in repr(m)


# -- autocast and checkpointing ------------------------------------------------------------


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("training", [True, False])
def test_autocast_bf16_keeps_fp32_statistics(backend, training):
    """bf16 activations under CPU autocast: statistics and parameters stay fp32, the output
    is fp32 (p² promotes, as TEBN), and everything is close to the fp32 run."""
    if backend == "triton" and torch.cuda.is_available():
        pytest.skip("CPU autocast: the triton backend runs CPU tensors only under the interpreter (no CUDA)")
    torch.manual_seed(0)
    ref = layer.TemporalAccumulatedBatchNorm2d(T, C).train(training)
    with torch.no_grad():
        ref.running_var.uniform_(0.5, 2), ref.p.uniform_(0.7, 1.3)
    m = layer.TemporalAccumulatedBatchNorm2d(T, C).train(training)
    m.load_state_dict(ref.state_dict())
    functional.set_backend(m, backend)
    x = _sequence((N, C, 3, 3), torch.float32, 0)
    xr, xb = x.clone().requires_grad_(), x.to(torch.bfloat16).requires_grad_()
    y_ref = ref(xr)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = m(xb)
    assert y.dtype == torch.float32
    g = torch.linspace(-1, 1, y.numel()).view(y.shape)
    (y_ref * g).sum().backward(), (y * g).sum().backward()
    assert xb.grad.dtype == torch.bfloat16
    torch.testing.assert_close(y, y_ref, **AUTOCAST_TAB)
    torch.testing.assert_close(xb.grad.float(), xr.grad, **AUTOCAST_TAB)
    for name in ("weight", "bias", "p"):
        assert getattr(m, name).grad.dtype == torch.float32
        torch.testing.assert_close(getattr(m, name).grad, getattr(ref, name).grad, **AUTOCAST_TAB_PARAM_GRAD)
    for a, b in zip(m.buffers(), ref.buffers()):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a.float(), b.float(), **AUTOCAST_TAB_BUFFERS)


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_plain_checkpoint_updates_running_stats_once(use_reentrant):
    from torch.utils.checkpoint import checkpoint as torch_checkpoint

    ref, _ = _pair(layer.TemporalAccumulatedBatchNorm2d)
    m, _ = _pair(layer.TemporalAccumulatedBatchNorm2d)
    x = _sequence(LAYOUTS["2d"][1], torch.float64, 0)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya = ref(xa)
    yb = torch_checkpoint(m, xb, use_reentrant=use_reentrant)
    ya.square().sum().backward(), yb.square().sum().backward()
    assert m.num_batches_tracked.tolist() == [1] * T
    assert torch.equal(m.running_mean, ref.running_mean) and torch.equal(m.running_var, ref.running_var)
    torch.testing.assert_close(xb.grad, xa.grad, **TAB_REORDERED_FP64)
    torch.testing.assert_close(m.p.grad, ref.p.grad, **TAB_REORDERED_FP64)


def test_memopt_checkpoint_of_single_steps_equals_eager():
    """Single-step TAB checkpointed step by step: memories restored for each recompute."""
    from snnorm import memopt

    ref, _ = _pair(layer.TemporalAccumulatedBatchNorm2d)
    m, _ = _pair(layer.TemporalAccumulatedBatchNorm2d)
    functional.set_step_mode(ref, "s"), functional.set_step_mode(m, "s")
    x = _sequence(LAYOUTS["2d"][1], torch.float64, 1)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya = torch.stack([ref(xa[t]) for t in range(T)])
    yb = torch.stack([memopt.checkpoint(m, xb[t]) for t in range(T)])
    ya.square().sum().backward(), yb.square().sum().backward()
    torch.testing.assert_close(yb, ya, **TAB_REORDERED_FP64)
    torch.testing.assert_close(xb.grad, xa.grad, **TAB_REORDERED_FP64)
    for name in ("weight", "bias", "p"):
        torch.testing.assert_close(getattr(m, name).grad, getattr(ref, name).grad, **TAB_REORDERED_FP64, msg=name)
    assert m.num_batches_tracked.tolist() == [1] * T
    assert torch.equal(m.running_var, ref.running_var)
    assert m.t == T - 1 and torch.equal(m.stat_m2, ref.stat_m2)


def test_demo_model_with_tab_norm():
    from snnorm import demo

    assert demo.parse_args(["--norm", "tab"]).norm == "tab"
    model = demo.DigitsSNN(T=2, norm="tab", channels=(4, 8))
    tabs = [m for m in model.modules() if isinstance(m, layer.TemporalAccumulatedBatchNorm2d)]
    assert len(tabs) == 2
    logits = model(torch.rand(6, 1, 8, 8))
    logits.sum().backward()
    assert logits.shape == (6, 10) and all(m.p.grad is not None for m in tabs)


def test_bench_smoke(tmp_path):
    """perf/bench_tab.py on its smoke grid: every provider agreed (to fp32 rounding) before
    being timed, the timings are consistent quantiles, and the reported speedup over the
    O(T²) baseline is the ratio of the two medians at every point."""
    from perf import bench_tab

    rows = bench_tab.main(["--smoke", "--no-compile", "--quiet", "--threads", "0", "--out", str(tmp_path)])
    assert not [r for r in rows if r["metric"] == "error"]
    agree = [r for r in rows if r["metric"] == "agree"]
    assert bench_tab.QUADRATIC in {r["provider"] for r in agree}  # checked against snnorm-torch
    assert all(r["value"] == 1.0 for r in agree)
    # the two implementations agreed to fp32 rounding, not just "within the bench's own check"
    errors = [r["value"] for r in rows if r["metric"] == "max_abs_err"]
    assert errors and all(0 <= e <= BENCH_TAB_SMOKE_MAX_ABS_ERR for e in errors), errors
    # every timing is a real quantile summary of positive times: p20 <= median <= p80
    ms = {(r["provider"], r["mode"], r["shape"], r["metric"]): r["value"] for r in rows if r["metric"].startswith("ms_")}
    medians = {k[:3]: v for k, v in ms.items() if k[3] == "ms_median"}
    assert medians
    for key, median in medians.items():
        assert 0 < ms[(*key, "ms_p20")] <= median <= ms[(*key, "ms_p80")] < math.inf, (key, median)
    # a speedup for every mode at every smoke point, each the ratio of the two medians
    speedups = [r for r in rows if r["metric"] == "speedup_vs_quadratic"]
    points = {(r["mode"], r["shape"]) for r in speedups}
    shapes = {bench_tab.tools.shape_str(shape) for _, shape, _ in bench_tab.grid("smoke")}
    assert points == {(mode, shape) for mode in bench_tab.MODES for shape in shapes}, points
    assert len(speedups) == len(points)  # one provider (snnorm-torch) against the baseline here
    for r in speedups:
        want = medians[(bench_tab.QUADRATIC, r["mode"], r["shape"])] / medians[(r["provider"], r["mode"], r["shape"])]
        assert r["value"] == pytest.approx(want, rel=1e-12), r
    assert (tmp_path / "tab.csv").exists()
    # perf.report renders the sweep: a TAB table with the speedup over the O(T²) baseline
    import shutil

    from perf import report

    results = tmp_path / "results"
    (results / "cpu-smoke").mkdir(parents=True)
    shutil.copy(tmp_path / "tab.csv", results / "cpu-smoke")
    text = report.main(["--results", str(results), "--out", str(tmp_path / "RESULTS.md")]).read_text()
    tab_section = text.split("### TAB")[1].split("\n### ")[0]
    assert "official-quadratic ms" in tab_section and "torch vs O(T²)" in tab_section
