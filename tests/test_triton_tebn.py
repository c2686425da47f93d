"""The fused Triton TEBN op against the torch backend's ``tebn`` (the specification).

Oracle: :func:`snnorm.backends.torch_backend.tebn` on float64 copies of the inputs (ref64).
fp32/fp64 are compared to ref64 with tight tolerances; fp16/bf16 with flash-attention's
rule ``max|kernel − ref64| ≤ 2·max|torch_lowp − ref64| + atol`` where torch_lowp is the
torch backend run in the low precision itself. Outputs, ∂x, ∂γ, ∂β, ∂p and the running
statistics after the call are all checked. Tensors live on tests/devices.py's DEVICE: a
CUDA GPU when present, else the CPU through the Triton interpreter (tests/conftest.py).
"""

import math
import os
import subprocess
import sys

import pytest
import torch
from devices import DEVICE, SLOW_ON_CPU, property_examples, wide_examples
from helpers import LOWP, norm_case, norm_params
from hypothesis import given, settings
from hypothesis import strategies as st
from tolerances import LARGE_MEAN_FP32_OUTPUT, LARGE_MEAN_FP32_VAR_REL, TEBN_LOWP_ATOL, TEBN_RTOL, assert_close_to_reference
from tolerances import assert_rel_close

pytest.importorskip("triton")
from snnorm.backends import torch_backend  # noqa: E402
from snnorm.kernels import _common as bn_tiles  # noqa: E402
from snnorm.backends import triton_backend as tebn_mod  # noqa: E402

if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no CUDA and TRITON_INTERPRET is off", allow_module_level=True)

MOMENTUM, EPS = 0.1, 1e-5

# Largest errors seen by the tests, per (dtype, quantity), printed at the end of the run.
MAX_ERR: dict = {}


@pytest.fixture(scope="module", autouse=True)
def _report_errors():
    yield
    if MAX_ERR:
        lines = [f"  {k[0]:>14} {k[1]:<14} {v:.3g}" for k, v in sorted(MAX_ERR.items(), key=str)]
        print("\nlargest |triton - ref64| / (1 + max|ref64|):\n" + "\n".join(lines))


def _record(dtype, what, err):
    key = (str(dtype).replace("torch.", ""), what)
    MAX_ERR[key] = max(MAX_ERR.get(key, 0.0), err)


# ------------------------------------------------------------------------- helpers


def run_op(op, x, w, b, rm, rv, p, g, training):
    """Output, (∂x, ∂γ, ∂β, ∂p) and the running stats after one call of ``op``."""
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (x, w, b, p)]
    rm_c = rm.clone() if rm is not None else None
    rv_c = rv.clone() if rv is not None else None
    y = op(leaves[0], leaves[1], leaves[2], rm_c, rv_c, leaves[3], training=training, momentum=MOMENTUM, eps=EPS)
    wrt = [t for t in leaves if t is not None]
    grads = iter(torch.autograd.grad(y, wrt, g))
    grads = [next(grads) if t is not None else None for t in leaves]
    return y, grads, rm_c, rv_c


def to64(t):
    return t.double() if t is not None else None


def compare(dtype, what, ours, ref64, lowp=None):
    """Assert ours ≈ ref64 (tight for fp32/fp64, the 2×-torch rule for fp16/bf16)."""
    if ref64 is None:
        assert ours is None, what
        return
    if lowp is None:
        rel, _ = assert_close_to_reference(f"{what} ({dtype})", ours, ref64, rtol=TEBN_RTOL[dtype])
        _record(dtype, what, rel)
    else:
        assert ours.dtype == lowp.dtype, f"{what}: dtype {ours.dtype}, torch gives {lowp.dtype}"
        rel, torch_err = assert_close_to_reference(f"{what} ({dtype})", ours, ref64, lowp=lowp, lowp_atol=TEBN_LOWP_ATOL[dtype])
        _record(dtype, what, rel)
        _record(dtype, f"{what} err/torch_err", rel * (1.0 + ref64.abs().max().item()) / max(torch_err, 1e-30))


def tebn_args(params, seed):
    """(x, γ, β, running mean, running var, p, ∂L/∂y) of :func:`helpers.norm_case` for TEBN; the
    gradient in the output's dtype (x's promoted with the parameters')."""
    grad_dtype = torch.promote_types(params["dtype"], params.get("param_dtype") or params["dtype"])
    case = norm_case("tebn", seed=seed, grad_dtype=grad_dtype, **params)
    return tuple(case[k] for k in ("x", "w", "b", "rm", "rv", "p", "grad"))


def check_case(params, seed):
    """``params``: :func:`helpers.norm_params`' draw (norm_case's arguments and ``training``)."""
    params = dict(params)
    training = params.pop("training")
    x, w, b, rm, rv, p, g = tebn_args(params, seed)
    dtype = x.dtype
    ours = run_op(tebn_mod.tebn, x, w, b, rm, rv, p, g, training)
    ref = run_op(torch_backend.tebn, to64(x), to64(w), to64(b), to64(rm), to64(rv), to64(p), to64(g), training)
    lowp = run_op(torch_backend.tebn, x, w, b, rm, rv, p, g, training) if dtype in LOWP else None
    names = ["y", "dx", "dweight", "dbias", "dscale"]
    ours_l = [ours[0], *ours[1]]
    ref_l = [ref[0], *ref[1]]
    lowp_l = [lowp[0], *lowp[1]] if lowp else [None] * 5
    for name, o, r, lp in zip(names, ours_l, ref_l, lowp_l):
        if o is not None and lp is None:
            # dtypes follow the inputs: y and grads as torch would give them
            expect = {"y": torch.promote_types(x.dtype, p.dtype), "dx": x.dtype}.get(name, p.dtype)
            assert o.dtype == expect, f"{name}: dtype {o.dtype}, expected {expect}"
        compare(dtype, name, o, r, lp)
    compare(dtype, "running_mean", ours[2], ref[2], lowp[2] if lowp else None)
    compare(dtype, "running_var", ours[3], ref[3], lowp[3] if lowp else None)
    if rm is not None and not training:
        assert torch.equal(ours[2], rm) and torch.equal(ours[3], rv), "eval must not touch the running stats"


# ----------------------------------------------------------------------- properties

# The default run draws a few examples of each property (the interpreter spends ~0.5 s on
# one); the wide twin in the slow set draws at least 20, for the corners.
FP32_FP64 = norm_params("tebn", [torch.float32, torch.float64], max_T=8, max_spatial_dims=3)
LOWP_PARAMS = norm_params("tebn", list(LOWP), max_T=8, max_spatial_dims=3)


@settings(max_examples=property_examples(2))
@given(params=FP32_FP64, seed=st.integers(0, 2**16))
def test_matches_torch_fp32_fp64(params, seed):
    check_case(params, seed)


@pytest.mark.slow
@settings(max_examples=wide_examples())
@given(params=FP32_FP64, seed=st.integers(0, 2**16))
def test_matches_torch_fp32_fp64_wide(params, seed):
    check_case(params, seed)


@settings(max_examples=property_examples(2))
@given(params=LOWP_PARAMS, seed=st.integers(0, 2**16))
def test_matches_torch_lowp(params, seed):
    check_case(params, seed)


@pytest.mark.slow
@settings(max_examples=wide_examples())
@given(params=LOWP_PARAMS, seed=st.integers(0, 2**16))
def test_matches_torch_lowp_wide(params, seed):
    check_case(params, seed)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("training", [True, False])
def test_fixed_4d_cases(dtype, training):
    """A fixed [T, N, C, H, W] case per dtype and mode, so every corner runs on every CI run."""
    check_case(dict(shape=(4, 3, 5, 3, 7), dtype=dtype, mean_shift=1.0, training=training), seed=7)


@pytest.mark.parametrize("shape", [(2, 5, 9), pytest.param((2, 2, 3, 6, 3), marks=SLOW_ON_CPU)])
def test_tiling_and_partials(monkeypatch, shape):
    """Tiny tiles, two programs per (channel block, t): tile loops, masks, Chan's merge of partials."""
    T, N, C, S = shape[0], shape[1], shape[2], math.prod(shape[3:])
    monkeypatch.setitem(bn_tiles.TUNING, "tile_elems", 8)
    c_blocks = bn_tiles.geometry(T, N, C, S, torch.device(DEVICE)).c_blocks
    monkeypatch.setitem(bn_tiles.TUNING, "programs", 2 * T * c_blocks)
    geo = bn_tiles.geometry(T, N, C, S, torch.device(DEVICE))
    assert geo.parts == 2 * T and geo.BLOCK_N * geo.BLOCK_C * geo.BLOCK_S <= 8
    tiles_per_prog = (geo.n_per_prog // geo.BLOCK_N) * (geo.s_per_prog // geo.BLOCK_S)
    assert tiles_per_prog > 1
    x, w, b, rm, rv, p, g = tebn_args(dict(shape=shape, dtype=torch.float64, mean_shift=5.0), seed=1)
    first = run_op(tebn_mod.tebn, x, w, b, rm, rv, p, g, True)
    ref = run_op(torch_backend.tebn, x, w, b, rm, rv, p, g, True)
    for name, o, r in zip(("y", "dx", "dweight", "dbias", "dscale"), [first[0], *first[1]], [ref[0], *ref[1]]):
        compare(torch.float64, f"tiled {name}", o, r)
    compare(torch.float64, "tiled running_mean", first[2], ref[2])
    compare(torch.float64, "tiled running_var", first[3], ref[3])
    # deterministic: a second run gives the same bits
    second = run_op(tebn_mod.tebn, x, w, b, rm, rv, p, g, True)
    assert torch.equal(first[0], second[0]) and torch.equal(first[2], second[2]) and torch.equal(first[3], second[3])
    assert all(torch.equal(u, v) for u, v in zip(first[1], second[1]))


def test_statistics_precise_at_large_mean():
    """mean/std = 1e4 in fp32: Chan's formula keeps the variance (raw Σx² would not)."""
    gen = torch.Generator().manual_seed(0)
    x = (1e4 + torch.randn(3, 8, 4, 33, generator=gen)).to(DEVICE)
    rm, rv = torch.zeros(4, device=DEVICE), torch.ones(4, device=DEVICE)
    p = torch.ones(3, device=DEVICE)
    y = tebn_mod.tebn(x, None, None, rm, rv, p, training=True, momentum=1.0, eps=EPS)
    ref_var = x.double().transpose(0, 2).reshape(4, -1).var(dim=1)
    assert_rel_close(rv, ref_var, LARGE_MEAN_FP32_VAR_REL, "running_var")
    y64 = torch_backend.tebn(x.double(), None, None, None, None, p.double(), training=True, momentum=1.0, eps=EPS)
    err = (y.double() - y64).abs().max().item()
    assert err <= LARGE_MEAN_FP32_OUTPUT, f"output: max |y − y64| = {err:.3g}"  # |x| = 1e4 in fp32 has ulp 1e-3


def test_single_value_rejected_and_nothing_changes():
    """Like F.batch_norm: batch statistics of one value per channel raise ValueError."""
    x = torch.randn(1, 1, 3, device=DEVICE)
    rm, rv = torch.zeros(3, device=DEVICE), torch.ones(3, device=DEVICE)
    p = torch.ones(1, device=DEVICE)
    for op in (torch_backend.tebn, tebn_mod.tebn):
        with pytest.raises(ValueError, match="more than 1 value per channel"):
            op(x, None, None, rm, rv, p, training=True, momentum=MOMENTUM, eps=EPS)
    assert torch.equal(rm, torch.zeros(3, device=DEVICE)) and torch.equal(rv, torch.ones(3, device=DEVICE))
    # eval with running stats is fine with one value
    y = tebn_mod.tebn(x, None, None, rm, rv, p, training=False, momentum=MOMENTUM, eps=EPS)
    y_ref = torch_backend.tebn(x, None, None, rm, rv, p, training=False, momentum=MOMENTUM, eps=EPS)
    torch.testing.assert_close(y, y_ref)


def test_integer_input_rejected():
    with pytest.raises(TypeError, match="floating-point"):
        tebn_mod.tebn(
            torch.ones(2, 2, 3, dtype=torch.int64, device=DEVICE), None, None, None, None,
            torch.ones(2, device=DEVICE), training=True, momentum=MOMENTUM, eps=EPS,
        )


@pytest.mark.slow  # a subprocess
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-without-interpreter error")
def test_cpu_without_interpreter_raises_with_fix():
    code = (
        "import torch\n"
        "from snnorm.backends.triton_backend import tebn\n"
        "x = torch.randn(2, 3, 4)\n"
        "try:\n"
        "    tebn(x, None, None, None, None, torch.ones(2), training=True, momentum=0.1, eps=1e-5)\n"
        "except RuntimeError as e:\n"
        "    print('RAISED', e)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True, timeout=120)
    assert "RAISED" in out.stdout, out.stdout + out.stderr
    assert "TRITON_INTERPRET=1" in out.stdout and "CUDA" in out.stdout


# -------------------------------------------------------------- torch.library integration


def _tiny(dtype=torch.float32, shape=(2, 3, 4, 5)):
    gen = torch.Generator().manual_seed(0)
    T, _, C = shape[:3]
    x = torch.randn(shape, generator=gen, dtype=dtype).to(DEVICE)
    w = torch.randn(C, generator=gen, dtype=dtype).to(DEVICE)
    b = torch.randn(C, generator=gen, dtype=dtype).to(DEVICE)
    p = torch.rand(T, generator=gen, dtype=dtype).to(DEVICE) + 0.5
    rm = torch.randn(C, generator=gen, dtype=dtype).to(DEVICE)
    rv = torch.rand(C, generator=gen, dtype=dtype).to(DEVICE) + 0.5
    return x, w, b, p, rm, rv


@pytest.mark.parametrize("affine", [True, pytest.param(False, marks=pytest.mark.slow)])  # ~20 s each
def test_opcheck(affine):
    x, w, b, p, rm, rv = _tiny()
    if not affine:
        w = b = None
    torch.library.opcheck(torch.ops.snnorm.bn_stats.default, (x, rm.clone(), rv.clone(), [0.1], "tebn"))
    torch.library.opcheck(torch.ops.snnorm.bn_stats.default, (x, None, None, [0.1], "tebn"))
    mean, var = torch.ops.snnorm.bn_stats(x, None, None, [0.1], "tebn")
    xg = x.clone().requires_grad_()
    wg = w.clone().requires_grad_() if affine else None
    bg = b.clone().requires_grad_() if affine else None
    pg = p.clone().requires_grad_()
    for batch_stats, (m, v) in ((True, (mean, var)), (False, (rm, rv))):
        torch.library.opcheck(torch.ops.snnorm.bn_apply.default, (xg, wg, bg, m, v, pg, EPS, "tebn", batch_stats))
        gy = torch.randn_like(x)
        torch.library.opcheck(
            torch.ops.snnorm.bn_apply_backward.default, (gy, x, w, b, m, v, p, EPS, "tebn", batch_stats, True, True)
        )


def test_torch_compile_fullgraph():
    """The ops trace into one graph; running stats are updated exactly once per call."""
    x, w, b, p, rm, rv = _tiny()
    rm_ref, rv_ref = rm.clone(), rv.clone()

    def step(x, w, b, p, rm, rv):
        return tebn_mod.tebn(x, w, b, rm, rv, p, training=True, momentum=MOMENTUM, eps=EPS).square().sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    leaves = [t.clone().requires_grad_() for t in (x, w, b, p)]
    loss = compiled(leaves[0], leaves[1], leaves[2], leaves[3], rm, rv)
    loss.backward()
    ref_leaves = [t.double().requires_grad_() for t in (x, w, b, p)]
    rm64, rv64 = rm_ref.double(), rv_ref.double()
    loss_ref = torch_backend.tebn(
        ref_leaves[0], ref_leaves[1], ref_leaves[2], rm64, rv64, ref_leaves[3],
        training=True, momentum=MOMENTUM, eps=EPS,
    ).square().sum()
    loss_ref.backward()
    compare(torch.float32, "compiled loss", loss.detach(), loss_ref.detach())
    for name, a, r in zip(("dx", "dweight", "dbias", "dscale"), leaves, ref_leaves):
        compare(torch.float32, f"compiled {name}", a.grad, r.grad)
    compare(torch.float32, "compiled running_mean", rm, rm64)
    compare(torch.float32, "compiled running_var", rv, rv64)


def saved_bytes(fn):
    """Bytes of the tensors autograd saves for backward while running ``fn``."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total


@pytest.mark.parametrize("training", [True, False])
def test_saved_for_backward_bytes(training):
    """The fused op saves x plus O(C + T) per-channel values; the torch reference ≈ 2× x."""
    x, w, b, p, rm, rv = _tiny(shape=(4, 8, 16, 6, 6))
    leaves = [t.clone().requires_grad_() for t in (x, w, b, p)]

    def call(op):
        return lambda: op(leaves[0], leaves[1], leaves[2], rm.clone(), rv.clone(), leaves[3],
                          training=training, momentum=MOMENTUM, eps=EPS)

    ours = saved_bytes(call(tebn_mod.tebn))
    ref = saved_bytes(call(torch_backend.tebn))
    x_bytes = x.numel() * x.element_size()
    print(f"\nsaved for backward (training={training}): triton {ours} B, torch {ref} B, x {x_bytes} B")
    assert ours <= x_bytes + 64 * (x.shape[2] + x.shape[0])
    assert ours < ref


def test_param_grads_without_input_grad_and_strided_running_stats():
    """x not requiring grad (the ∂x pass is skipped); running stats given as strided views."""
    x, w, b, p, rm, rv = _tiny(torch.float64, shape=(3, 4, 5, 7))
    stats = torch.stack([rm, rv], dim=1)  # [C, 2]: column views have stride 2
    stats_ref = stats.clone()
    leaves = [t.clone().requires_grad_() for t in (w, b, p)]
    ref_leaves = [t.clone().requires_grad_() for t in (w, b, p)]
    y = tebn_mod.tebn(x, leaves[0], leaves[1], stats[:, 0], stats[:, 1], leaves[2],
                      training=True, momentum=MOMENTUM, eps=EPS)
    y_ref = torch_backend.tebn(x, ref_leaves[0], ref_leaves[1], stats_ref[:, 0], stats_ref[:, 1], ref_leaves[2],
                               training=True, momentum=MOMENTUM, eps=EPS)
    g = torch.randn_like(y)
    grads = torch.autograd.grad(y, leaves, g)
    grads_ref = torch.autograd.grad(y_ref, ref_leaves, g)
    compare(torch.float64, "y", y, y_ref)
    for name, a, r in zip(("dweight", "dbias", "dscale"), grads, grads_ref):
        compare(torch.float64, name, a, r)
    compare(torch.float64, "running stats (strided)", stats, stats_ref)
    assert not torch.equal(stats, torch.stack([rm, rv], dim=1)), "running stats were not updated"
    torch.library.opcheck(
        torch.ops.snnorm.bn_apply_backward.default,
        (g, x, w, b, *torch.ops.snnorm.bn_stats(x, None, None, [0.1], "tebn"), p, EPS, "tebn", True, False, True),
    )


@pytest.mark.parametrize("shape", [(2, 0, 3, 4), (3, 2, 3, 0)])
def test_empty_batch_like_torch(shape):
    """An empty batch gives an empty output, zero parameter gradients and no stats update."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen).to(DEVICE)
    C, T = shape[2], shape[0]
    w, b = torch.randn(C, generator=gen).to(DEVICE), torch.randn(C, generator=gen).to(DEVICE)
    p = torch.rand(T, generator=gen).to(DEVICE)
    rm, rv = torch.randn(C, generator=gen).to(DEVICE), torch.rand(C, generator=gen).to(DEVICE)
    for training in (True, False):
        ours = run_op(tebn_mod.tebn, x, w, b, rm, rv, p, torch.zeros_like(x), training)
        ref = run_op(torch_backend.tebn, x, w, b, rm, rv, p, torch.zeros_like(x), training)
        for o, r in zip([ours[0], *ours[1], ours[2], ours[3]], [ref[0], *ref[1], ref[2], ref[3]]):
            assert o.shape == r.shape and torch.equal(o, r)
