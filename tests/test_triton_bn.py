"""The Triton multi-step BatchNorm/tdBN (``batch_norm_seq``) and BNTT (``bntt``) ops against
the torch backend's (the specification), and the layers that run them.

Both ops are instances of the statistics pipeline (snnorm/kernels/bn_pipeline.py):
``batch_norm_seq`` groups all steps (one μ, σ² per channel over T·N·spatial, as tdBN),
``bntt`` each step alone (per-step γ_t, no β, per-step running statistics).

Oracle: the torch backend's op on float64 copies of the inputs (ref64). fp32/fp64 are
compared to ref64 with tight tolerances, bf16/fp16 with the rule
``max|kernel − ref64| ≤ 2·max|torch_lowp − ref64| + atol`` (torch_lowp: the torch backend in
the low precision itself). Outputs, every gradient and the running statistics after the
call are checked. Tensors live on tests/devices.py's DEVICE.
"""

from __future__ import annotations

import math
import os
import warnings

import pytest
import torch
from devices import DEVICE, SLOW_ON_CPU, property_examples, wide_examples
from helpers import LOWP, norm_case, norm_params
from hypothesis import given, settings
from hypothesis import strategies as st
from tolerances import BN_MODULE_REL, BN_PIPELINE_LOWP_ATOL, BN_PIPELINE_RTOL, assert_close_to_reference

pytest.importorskip("triton")
from snnorm import functional, layer  # noqa: E402
from snnorm.backends import torch_backend  # noqa: E402
from snnorm.backends import triton_backend  # noqa: E402
from snnorm.kernels import _common as bn_tiles  # noqa: E402

if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no CUDA and TRITON_INTERPRET is off", allow_module_level=True)

EPS = 1e-5
OPS = ("batch_norm_seq", "bntt")
RULE = {"batch_norm_seq": "batch_norm", "bntt": "bntt"}  # helpers.norm_case's name of each op's rule


# ------------------------------------------------------------------------- helpers


def compare(dtype, what, ours, ref64, lowp=None):
    """ours ≈ ref64 (tolerances.assert_close_to_reference): tight for fp32/fp64, twice torch's
    own error for fp16/bf16; a None reference wants None."""
    if ref64 is None:
        assert ours is None, f"{what}: expected None, got a tensor"
        return
    assert ours is not None, f"{what}: expected a tensor, got None"
    if lowp is not None:
        assert ours.dtype == lowp.dtype, f"{what}: dtype {ours.dtype}, torch gives {lowp.dtype}"
        lowp = lowp.cpu()
    assert_close_to_reference(f"{what} ({dtype})", ours.cpu(), ref64.cpu(), rtol=BN_PIPELINE_RTOL.get(dtype),
                              lowp=lowp, lowp_atol=BN_PIPELINE_LOWP_ATOL.get(dtype))


def _clone(t, dtype=None):
    if t is None:
        return None
    return t.detach().to(dtype or t.dtype).clone()


def run(op_name, backend, case, cast=None):
    """(y, gradients of every differentiable input, running statistics after the call)."""
    x, params, running, g, training, momentum = case
    x = _clone(x, cast).requires_grad_()
    g = g.to(cast or g.dtype)
    params = [_clone(p, cast).requires_grad_() if p is not None else None for p in params]
    running = [_clone(r, cast) for r in running]
    op = getattr(backend, op_name)
    if op_name == "batch_norm_seq":
        w, b = params
        rm, rv = running
        y = op(x, w, b, rm, rv, training=training, momentum=momentum, eps=EPS)
    else:
        T = x.shape[0]
        rms, rvs = running[:T], running[T:]
        y = op(x, params, rms, rvs, training=training, momentum=momentum, eps=[EPS] * T)
    leaves = [x] + [p for p in params if p is not None]
    grads = iter(torch.autograd.grad(y, leaves, g))
    dx = next(grads)
    dparams = [next(grads) if p is not None else None for p in params]
    return [y, dx, *dparams], running


def op_args(op_name, params, seed):
    """(x, parameters, running statistics, ∂L/∂y, training, momentum) of one call of ``op_name``,
    from :func:`helpers.norm_case` (``params``: its arguments and ``training``). BNTT takes
    per-step lists: γ_t (or None each) and the running statistics of every step."""
    params = dict(params)
    training = params.pop("training")
    case = norm_case(RULE[op_name], seed=seed, **params)
    T = case["x"].shape[0]
    if op_name == "batch_norm_seq":
        return case["x"], [case["w"], case["b"]], [case["rm"], case["rv"]], case["grad"], training, case["momentum"][0]
    steps = lambda t: list(t.unbind(0)) if t is not None else [None] * T  # noqa: E731
    return case["x"], steps(case["w"]), steps(case["rm"]) + steps(case["rv"]), case["grad"], training, case["momentum"]


def check_case(op_name, params, seed):
    """The triton op against the fp64 torch op (and, below fp64, the torch op in the same
    dtype); returns the triton op's (outputs and gradients, running statistics)."""
    case = op_args(op_name, params, seed)
    dtype = case[0].dtype
    ours, ours_running = run(op_name, triton_backend, case)
    ref, ref_running = run(op_name, torch_backend, case, cast=torch.float64)
    # below fp64, flash-attention's rule against the torch backend in the same dtype (lowp)
    lowp, lowp_running = run(op_name, torch_backend, case) if dtype != torch.float64 else (None, None)
    names = ["y", "dx"] + [f"dparam{i}" for i in range(len(ours) - 2)]
    for i, (name, o, r) in enumerate(zip(names, ours, ref)):
        if o is not None and dtype not in LOWP:
            expect = dtype if i < 2 else params.get("param_dtype") or dtype  # y, ∂x in x's dtype; parameters' in theirs
            assert o.dtype == expect, f"{name}: dtype {o.dtype}, expected {expect}"
        compare(dtype, name, o, r, lowp[i] if lowp is not None else None)
    for i, (o, r) in enumerate(zip(ours_running, ref_running)):
        compare(dtype, f"running[{i}]", o, r, lowp_running[i] if lowp is not None else None)
    if not params["training"]:
        for o, r0 in zip(ours_running, case[2]):
            assert o is None or torch.equal(o, r0), "eval must not touch the running statistics"
    return ours, ours_running


# ----------------------------------------------------------------------- properties


# The default run draws a few examples of each (op, precision); the wide twins in the slow
# set draw at least 20 each, for the corners.
def _fp32_fp64(op_name, data, seed):
    check_case(op_name, data.draw(norm_params(RULE[op_name], [torch.float32, torch.float64])), seed)


def _bf16(op_name, data, seed):
    check_case(op_name, data.draw(norm_params(RULE[op_name], [torch.bfloat16])), seed)


@pytest.mark.parametrize("op_name", OPS)
@settings(max_examples=property_examples(2))
@given(data=st.data(), seed=st.integers(0, 2**16))
def test_matches_torch_fp32_fp64(op_name, data, seed):
    _fp32_fp64(op_name, data, seed)


@pytest.mark.slow
@pytest.mark.parametrize("op_name", OPS)
@settings(max_examples=wide_examples())
@given(data=st.data(), seed=st.integers(0, 2**16))
def test_matches_torch_fp32_fp64_wide(op_name, data, seed):
    _fp32_fp64(op_name, data, seed)


@pytest.mark.parametrize("op_name", OPS)
@settings(max_examples=property_examples(2))
@given(data=st.data(), seed=st.integers(0, 2**16))
def test_matches_torch_bf16(op_name, data, seed):
    _bf16(op_name, data, seed)


@pytest.mark.slow
@pytest.mark.parametrize("op_name", OPS)
@settings(max_examples=wide_examples())
@given(data=st.data(), seed=st.integers(0, 2**16))
def test_matches_torch_bf16_wide(op_name, data, seed):
    _bf16(op_name, data, seed)


@pytest.mark.parametrize("op_name", OPS)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("shape", [(1, 4, 3), (1, 3, 5, 7, 3), (4, 3, 7), (3, 2, 5, 3, 7)])
def test_fixed_cases(op_name, training, shape):
    """T = 1, [T, N, C] and [T, N, C, H, W] with prime sizes, every mode: on every CI run."""
    params = dict(shape=shape, dtype=torch.float64, affine="both" if op_name == "batch_norm_seq" else "weight",
                  mean_shift=2.0, training=training)
    check_case(op_name, params, seed=3)


@pytest.mark.parametrize("op_name", [OPS[0], *(pytest.param(op, marks=SLOW_ON_CPU) for op in OPS[1:])])
def test_tiling_and_partials(monkeypatch, op_name):
    """Tiny tiles and several programs per (channel block, t): tile loops, masks, Chan's
    merge of partials within a step (BNTT) and across steps (BN); deterministic."""
    T, N, C, spatial = 3, 5, 3, (2, 3)
    monkeypatch.setitem(bn_tiles.TUNING, "tile_elems", 8)
    c_blocks = bn_tiles.geometry(T, N, C, math.prod(spatial), torch.device(DEVICE)).c_blocks
    monkeypatch.setitem(bn_tiles.TUNING, "programs", 3 * T * c_blocks)
    geo = bn_tiles.geometry(T, N, C, math.prod(spatial), torch.device(DEVICE))
    assert geo.parts >= 2 * T, geo
    params = dict(shape=(T, N, C, *spatial), dtype=torch.float64,
                  affine="both" if op_name == "batch_norm_seq" else "weight", mean_shift=5.0, training=True)
    first = check_case(op_name, params, seed=1)
    second = run(op_name, triton_backend, op_args(op_name, params, seed=1))
    for a, b in zip(first[0] + first[1], second[0] + second[1]):
        assert a is None or torch.equal(a, b), "two runs differ: the reductions are not deterministic"


@pytest.mark.parametrize("op_name", OPS)
def test_single_value_rejected_and_nothing_changes(op_name):
    """Like F.batch_norm: batch statistics of one value per channel raise ValueError, before any update."""
    T = 1 if op_name == "batch_norm_seq" else 2
    x = torch.randn(T, 1, 3, device=DEVICE)
    for backend in (torch_backend, triton_backend):
        rm, rv = torch.zeros(3, device=DEVICE), torch.ones(3, device=DEVICE)
        with pytest.raises(ValueError, match="more than 1 value per channel"):
            if op_name == "batch_norm_seq":
                backend.batch_norm_seq(x, None, None, rm, rv, training=True, momentum=0.1, eps=EPS)
            else:
                backend.bntt(x, [None] * T, [rm] * T, [rv] * T, training=True, momentum=[0.1] * T, eps=[EPS] * T)
        assert torch.equal(rm, torch.zeros(3, device=DEVICE)) and torch.equal(rv, torch.ones(3, device=DEVICE))


def test_bntt_different_eps_runs_on_torch_with_a_warning():
    """Steps with different ε (a user reassigned one): the torch op, warned once, same result."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 4, generator=gen, dtype=torch.float64).to(DEVICE)
    eps = [1e-5, 1e-3]
    args = (x, [None, None], [None, None], [None, None])
    kw = dict(training=True, momentum=[0.1, 0.1], eps=eps)
    triton_backend._WARNED.discard(("bntt", "eps"))
    with pytest.warns(RuntimeWarning, match="different eps"):
        y = triton_backend.bntt(*args, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        triton_backend.bntt(*args, **kw)  # warned once
    compare(torch.float64, "y", y, torch_backend.bntt(*args, **kw))


@pytest.mark.parametrize("rule", ["batch_norm", pytest.param("bntt", marks=pytest.mark.slow)])  # ~20 s each
def test_opcheck(rule):
    gen = torch.Generator().manual_seed(0)
    T, C = 2, 3
    x = torch.randn(T, 3, C, 2, generator=gen, dtype=torch.float64).to(DEVICE)
    shape = (C,) if rule == "batch_norm" else (T, C)
    rows = 1 if rule == "batch_norm" else T
    f64 = dict(dtype=torch.float64, device=DEVICE)
    rm, rv = torch.zeros(shape, **f64), torch.ones(shape, **f64)
    torch.library.opcheck(torch.ops.snnorm.bn_stats.default, (x, rm.clone(), rv.clone(), [0.1] * rows, rule))
    m, v = torch.ops.snnorm.bn_stats(x, None, None, [0.1] * rows, rule)
    w = torch.rand(shape, generator=gen, dtype=torch.float64).to(DEVICE).requires_grad_()
    b = torch.rand(shape, generator=gen, dtype=torch.float64).to(DEVICE).requires_grad_()
    b = b if rule == "batch_norm" else None  # BNTT has no shift
    xg = x.clone().requires_grad_()
    for batch_stats, (mean, var) in ((True, (m, v)), (False, (rm, rv))):
        torch.library.opcheck(torch.ops.snnorm.bn_apply.default, (xg, w, b, mean, var, None, EPS, rule, batch_stats))
        gy = torch.randn_like(x)
        torch.library.opcheck(
            torch.ops.snnorm.bn_apply_backward.default,
            (gy, x, w.detach(), None if b is None else b.detach(), mean, var, None, EPS, rule, batch_stats, True, True),
        )


# -------------------------------------------------------------------------- the layers


def _layers():
    return [
        ("BatchNorm2d", lambda: layer.BatchNorm2d(5, step_mode="m"), (3, 4, 5, 3, 3)),
        ("BatchNorm1d", lambda: layer.BatchNorm1d(5, step_mode="m", momentum=None), (3, 4, 5)),
        ("tdBN2d", lambda: layer.ThresholdDependentBatchNorm2d(0.5, 1.0, 5), (3, 4, 5, 3, 3)),
        ("BNTT2d", lambda: layer.BatchNormThroughTime2d(3, 5, step_mode="m"), (3, 4, 5, 3, 3)),
        ("BNTT1d", lambda: layer.BatchNormThroughTime1d(3, 5, step_mode="m", momentum=None), (3, 4, 5)),
        ("BatchNormTT2d", lambda: layer.BatchNormTT2d(5, 3, step_mode="m"), (3, 4, 5, 3, 3)),
    ]


def _rel(a, b):
    return ((a.double() - b.double()).abs().max() / (1.0 + b.double().abs().max())).item()


@pytest.mark.parametrize("name, make, shape", _layers(), ids=[n for n, _, _ in _layers()])
def test_layers_on_both_backends_agree(name, make, shape):
    """Two training calls then eval, both backends: outputs, gradients, every buffer
    (running statistics, num_batches_tracked) agree; set_backend keeps no module on torch."""
    torch.manual_seed(0)
    ref = make().to(DEVICE)
    with torch.no_grad():
        for p in ref.parameters():
            p.uniform_(0.5, 1.5)
    tri = make().to(DEVICE)
    tri.load_state_dict(ref.state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "keep their backend" warning
        functional.set_backend(tri, "triton")
    rel = BN_MODULE_REL[torch.float32]
    for step in range(2):
        x = torch.randn(shape, device=DEVICE) * 2 + 1.0
        functional.reset_net(ref), functional.reset_net(tri)
        y_ref, y_tri = ref(x), tri(x)
        assert _rel(y_tri, y_ref) <= rel, f"{name} step {step}: y differs by {_rel(y_tri, y_ref):.3g}"
        (y_ref * y_ref).mean().backward(), (y_tri * y_tri).mean().backward()
    for (n, a), (_, b) in zip(tri.named_parameters(), ref.named_parameters()):
        assert _rel(a.grad, b.grad) <= rel, f"{name}: grad of {n} differs by {_rel(a.grad, b.grad):.3g}"
    for (n, a), (_, b) in zip(tri.named_buffers(), ref.named_buffers()):
        if a.is_floating_point():
            assert _rel(a, b) <= rel, f"{name}: buffer {n} differs by {_rel(a, b):.3g}"
        else:
            assert torch.equal(a, b), f"{name}: buffer {n} {a} vs {b}"
    ref.eval(), tri.eval()
    functional.reset_net(ref), functional.reset_net(tri)
    x = torch.randn(shape, device=DEVICE)
    assert _rel(tri(x), ref(x)) <= rel, f"{name}: eval output differs"


def test_single_step_mode_on_triton_is_torchs_bn():
    """Single-step BN/BNTT keep torch's BN on the triton backend: the same numbers and buffers."""
    torch.manual_seed(0)
    for make, shape in ((lambda: layer.BatchNorm2d(5), (4, 5, 3, 3)),
                        (lambda: layer.BatchNormThroughTime1d(2, 5), (4, 5))):
        ref, tri = make().to(DEVICE), make().to(DEVICE)
        functional.set_backend(tri, "triton")
        assert tri.backend == "triton"
        for _ in range(2):
            x = torch.randn(shape, device=DEVICE)
            assert torch.equal(tri(x), ref(x)), f"{type(tri).__name__}: single-step output differs"
        for a, b in zip(tri.buffers(), ref.buffers()):
            assert torch.equal(a, b), f"{type(tri).__name__}: buffers differ"
