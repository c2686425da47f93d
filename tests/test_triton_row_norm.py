"""LayerNorm / RMSNorm over the last dimension on the triton backend, plain and fused with an
IF/LIF neuron (snnorm/kernels/row_norm.py, row_norm_lif.py), against the torch composition.

The reference is ``torch_backend.lif(torch_backend.row_norm(x), v, θ, neuron)`` (torch's own
``F.layer_norm`` / ``F.rms_norm`` and the torch LIF op) run in float64 on the same (rounded)
inputs. fp64 agrees to 1e-12; fp32 and fp16/bf16 by tests/tolerances.py's rules: spikes may
differ only where the reference's firing variable is within the dtype's margin of θ (a
flipped spike is an element's unit: the row norm's statistics are x's, not the spikes'), the
final membrane is compared on elements without a flip, and the gradients (which a flip
reaches through a row's ∂x sums and ∂γ) on draws without one. The plain op in fp16/bf16
follows the 2×-torch rule. Byte budgets (issue 24) are pinned with the traffic meter.
"""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
from hypothesis import given, note, settings
from hypothesis.control import currently_in_test_context
from hypothesis import strategies as st

from devices import DEVICE
from tolerances import (
    ROW_NORM_FP64, ROW_NORM_LOWP_ATOL, ROW_NORM_RTOL, assert_close_to_reference, assert_op_close, comparable_mask,
    op_tolerance,
)

from snnorm import surrogate as sg
from snnorm.backends import torch_backend as ref
from snnorm.params import LIFParameters

pytest.importorskip("triton")
from snnorm.backends import triton_backend as K  # noqa: E402
from snnorm.kernels import row_norm as rn  # noqa: E402
from snnorm.kernels import row_norm_lif as rl  # noqa: E402

F16, BF16, F32, F64 = torch.float16, torch.bfloat16, torch.float32, torch.float64
LIF = LIFParameters(sg.Sigmoid(4.0), tau=2.0, decay_input=True, v_reset=0.0)


class _Recording:
    """Wraps a surrogate for the reference op and records its input z per call."""

    def __init__(self, surrogate):
        self.inner = surrogate
        self.zs = []

    def __call__(self, z):
        self.zs.append(z.detach())
        return self.inner(z)


@contextlib.contextmanager
def _limits(max_segment=None, max_d=None, wide_chunk=None):
    """Lower the kernels' segment or one-pass limits (module constants) for one call."""
    saved = rl.MAX_SEGMENT, rn.MAX_D, rn.WIDE_CHUNK
    rl.MAX_SEGMENT = max_segment or saved[0]
    rn.MAX_D = max_d or saved[1]
    rn.WIDE_CHUNK = wide_chunk or saved[2]
    try:
        yield
    finally:
        rl.MAX_SEGMENT, rn.MAX_D, rn.WIDE_CHUNK = saved


@st.composite
def configs(draw, lowp=True):
    dtypes = [F32, F32, F64, F16, BF16] if lowp else [F32, F64]
    return dict(
        dtype=draw(st.sampled_from(dtypes)),
        T=draw(st.sampled_from([1, 2, 3, 5])),
        rows=draw(st.sampled_from([(1,), (3,), (2, 3), (5,)])),
        D=draw(st.sampled_from([1, 2, 7, 16, 33, 1030])),
        layout=draw(st.sampled_from(["contiguous", "sliced", "transposed"])),
        rms=draw(st.booleans()),
        affine=draw(st.booleans()),
        v_kind=draw(st.sampled_from(["float", "tensor", "broadcast"])),
        v_reset=draw(st.sampled_from([None, 0.0, -0.3])),
        detach_reset=draw(st.booleans()),
        decay_input=draw(st.booleans()),
        tau=draw(st.sampled_from([2.0, 4.0 / 3.0, math.inf])),
        surrogate=draw(st.sampled_from(["sigmoid", "atan"])),
        threshold=draw(st.sampled_from([0.5, 1.0 / 3.0])),
        grad_kind=draw(st.sampled_from(["random", "sum", "spikes only"])),
        max_segment=draw(st.sampled_from([None, 2])),  # 2: T > SEG, the checkpoints
        seed=draw(st.integers(0, 2**16)),
    )


def _inputs(cfg):
    """fp64 master copies, rounded through the test dtype (parameters through fp32 for fp16/bf16)."""
    g = torch.Generator().manual_seed(cfg["seed"])
    dtype, T, rows, D = cfg["dtype"], cfg["T"], cfg["rows"], cfg["D"]
    pdtype = F64 if dtype == F64 else F32

    def rnd(t, dt=dtype):
        return t.to(dt).to(F64)

    shape = (T, *rows, D)
    x = rnd(torch.randn(shape, generator=g, dtype=F64) * 1.5 + 0.3)
    w = rnd(1.0 + 0.5 * torch.randn(D, generator=g, dtype=F64), pdtype)
    b = rnd(0.3 * torch.randn(D, generator=g, dtype=F64), pdtype)
    v_shape = {"float": (), "tensor": shape[1:], "broadcast": (1,) * len(rows) + (D,)}[cfg["v_kind"]]
    v = rnd(0.3 * torch.randn(v_shape, generator=g, dtype=F64))
    gs = rnd(torch.randn(shape, generator=g, dtype=F64))
    gv = rnd(torch.randn(shape[1:], generator=g, dtype=F64))
    return dict(x=x, w=w, b=b, v=v, gs=gs, gv=gv)


def _layout(x64: torch.Tensor, dtype, layout: str) -> torch.Tensor:
    """x in ``dtype`` on DEVICE as a contiguous tensor, a strided slice or with its row dims transposed."""
    if layout == "sliced":  # every other column of a wider tensor: read through strides
        base = torch.zeros((*x64.shape[:-1], 2 * x64.shape[-1]), dtype=dtype, device=DEVICE)
        base[..., ::2] = x64
        return base[..., ::2]
    if layout == "transposed" and x64.dim() >= 4:  # rows that do not merge: one copy
        return x64.transpose(1, 2).to(DEVICE, dtype).contiguous().transpose(1, 2)
    return x64.to(DEVICE, dtype)


def _neuron(cfg, surrogate):
    return LIFParameters(surrogate, tau=cfg["tau"], decay_input=cfg["decay_input"], v_reset=cfg["v_reset"],
                         detach_reset=cfg["detach_reset"])


def _surrogate(cfg):
    return sg.Sigmoid(4.0) if cfg["surrogate"] == "sigmoid" else sg.ATan(2.0)


def _run_fused(ops, cfg, inp, dtype, surrogate, grad=True):
    """(outputs, gradients) of ``ops``' row_norm → LIF, inputs in ``dtype`` (parameters fp32 for fp16/bf16)."""
    pdtype = F64 if dtype == F64 else F32
    x = _layout(inp["x"], dtype, cfg["layout"]).requires_grad_(True)
    leaves = {"x": x}
    w = b = None
    if cfg["affine"]:
        w = inp["w"].to(DEVICE, pdtype).requires_grad_(True)
        leaves["w"] = w
        if not cfg["rms"]:
            b = inp["b"].to(DEVICE, pdtype).requires_grad_(True)
            leaves["b"] = b
    if cfg["v_kind"] == "float":
        v = float(inp["v"])
    else:
        v = inp["v"].to(DEVICE, dtype).requires_grad_(True)
        leaves["v"] = v
    neuron = _neuron(cfg, surrogate)
    if ops is ref:
        s, v_out = ref.lif(ref.row_norm(x, w, b, eps=1e-5, rms=cfg["rms"]), v, cfg["threshold"], neuron)
    else:
        s, v_out = ops.row_norm_lif(x, v, w, b, eps=1e-5, rms=cfg["rms"], threshold=cfg["threshold"], neuron=neuron)
    if not grad:
        return dict(s=s, v_out=v_out), {}
    if cfg["grad_kind"] == "sum":
        loss = s.sum() + v_out.sum()  # expanded (stride-0) incoming gradients
    elif cfg["grad_kind"] == "spikes only":
        loss = (s * inp["gs"].to(DEVICE, s.dtype)).sum()
    else:
        loss = (s * inp["gs"].to(DEVICE, s.dtype)).sum() + (v_out * inp["gv"].to(DEVICE, v_out.dtype)).sum()
    names = list(leaves)
    grads = torch.autograd.grad(loss, [leaves[k] for k in names])
    return dict(s=s, v_out=v_out), {"grad_" + k: gr for k, gr in zip(names, grads)}


def _check_fused(cfg):
    dtype = cfg["dtype"]
    inp = _inputs(cfg)
    rec = _Recording(_surrogate(cfg))
    want, want_g = _run_fused(ref, cfg, inp, F64, rec)
    with _limits(max_segment=cfg["max_segment"]):
        got, got_g = _run_fused(K, cfg, inp, dtype, _surrogate(cfg))
    with torch.no_grad():  # dtypes as the torch composition gives them in the test dtype
        low, _ = _run_fused(ref, cfg, inp, dtype, _surrogate(cfg), grad=False)
    assert got["s"].dtype == low["s"].dtype and got["v_out"].dtype == low["v_out"].dtype
    T, D = cfg["T"], cfg["D"]
    as3 = lambda t: t.reshape(T, -1, D)  # noqa: E731  [T, R, D]: an element is a unit
    z = torch.stack(rec.zs).reshape(want["s"].shape)
    margin, max_flip = op_tolerance(dtype)[2:]
    flipped, spike_mask, clean = comparable_mask(as3(got["s"]), as3(want["s"]), channel_coupled=False)
    compared = flipped & spike_mask
    flips = f"{int(compared.sum())} of {int(spike_mask.sum())} comparable spikes flipped"
    if currently_in_test_context():
        note(flips)
    assert not torch.any(compared & (as3(z).abs() > margin)), f"spikes differ away from the threshold ({flips})"
    assert compared.double().sum().item() <= max_flip * spike_mask.sum().item(), flips
    if dtype == F64:
        assert not flipped.any(), flips
        for key in ("v_out", *want_g):
            torch.testing.assert_close((got | got_g)[key].double(), (want | want_g)[key], **ROW_NORM_FP64, msg=key)
        return
    assert_op_close("v_out", got["v_out"].reshape(-1, D), want["v_out"].reshape(-1, D), dtype, clean)
    if not flipped.any():  # a flip reaches its row's ∂x and every ∂γ, ∂β
        for key in want_g:
            assert_op_close(key, got_g[key], want_g[key], dtype)


#: each draw runs a forward and a backward through the interpreter (~1 s) and the torch
#: reference twice: half the profile's draws keep the file near 20 s (the fixed fp64 corners
#: and checkpoint cases below cover what a short run may not draw)
@settings(max_examples=max(4, settings.default.max_examples // 2))
@given(configs())
def test_row_norm_lif_matches_torch_composition(cfg):
    _check_fused(cfg)


#: fixed fp64 corners: D = 1 (x̂ = 0), odd D past 1024, an IF neuron (τ = ∞), detach_reset, soft reset
CORNERS = [
    dict(T=3, rows=(2,), D=1030, rms=False, tau=math.inf, decay_input=False, v_reset=0.0, detach_reset=True),
    dict(T=1, rows=(3,), D=1, rms=False, tau=2.0, decay_input=True, v_reset=None, detach_reset=False),
    dict(T=5, rows=(2, 2), D=33, rms=True, tau=4.0 / 3.0, decay_input=True, v_reset=-0.3, detach_reset=False),
]


@pytest.mark.parametrize("corner", CORNERS, ids=lambda c: f"T{c['T']}-D{c['D']}-{'rms' if c['rms'] else 'ln'}")
def test_fp64_corners(corner):
    cfg = dict(dtype=F64, layout="sliced", affine=True, v_kind="tensor", surrogate="atan", threshold=0.5,
               grad_kind="random", max_segment=None, seed=corner["D"], **corner)
    _check_fused(cfg)


@pytest.mark.parametrize("T, seg", [(7, 2), (5, 4)])
def test_checkpoints_fp64(T, seg):
    """T past SEG: the backward restarts segments from the forward's membrane checkpoints."""
    cfg = dict(dtype=F64, T=T, rows=(2, 3), D=5, layout="contiguous", rms=False, affine=True, v_kind="tensor",
               v_reset=None, detach_reset=False, decay_input=True, tau=2.0, surrogate="sigmoid", threshold=0.5,
               grad_kind="random", max_segment=seg, seed=T)
    _check_fused(cfg)
    x = torch.randn(T, 4, 5, device=DEVICE, requires_grad=True)
    with _limits(max_segment=seg):
        *_, ckpt = K.row_norm_lif_op(x, None, None, None, 1e-5, False, 0.5, 0.0, *LIF.for_kernel("sigmoid", 4.0), True)
    assert ckpt.shape == (math.ceil(T / min(seg, 1 << (T - 1).bit_length())) - 1, 4, 5)


# ------------------------------------------------------------------------------------------
# the plain row norm
# ------------------------------------------------------------------------------------------


def _run_plain(ops, x64, w64, b64, dtype, rms, layout, gy64):
    pdtype = F64 if dtype == F64 else F32
    x = _layout(x64, dtype, layout).requires_grad_(True)
    w = w64.to(DEVICE, pdtype).requires_grad_(True) if w64 is not None else None
    b = b64.to(DEVICE, pdtype).requires_grad_(True) if b64 is not None else None
    y = ops.row_norm(x, w, b, eps=1e-5, rms=rms)
    leaves = [t for t in (x, w, b) if t is not None]
    return [y, *torch.autograd.grad(y, leaves, gy64.to(DEVICE, y.dtype))]


@settings(max_examples=max(4, settings.default.max_examples // 2))
@given(configs(), st.booleans())
def test_row_norm_matches_torch(cfg, wide):
    """y, ∂x, ∂γ, ∂β against F.layer_norm / F.rms_norm in fp64: fp64 to 1e-12, fp32 and fp16/bf16
    against the float64 result (fp16/bf16: within twice torch's own error). ``wide``: the looped
    path for D > MAX_D, reached with the limit lowered to 8."""
    if wide:  # a few chunks of 8 (the interpreter pays per chunk)
        cfg = dict(cfg, D=min(cfg["D"], 33))
    dtype, rms = cfg["dtype"], cfg["rms"]
    inp = _inputs(cfg)
    x64 = inp["x"]
    w64 = inp["w"] if cfg["affine"] else None
    b64 = inp["b"] if cfg["affine"] and not rms else None
    gy = inp["gs"]
    want = _run_plain(ref, x64, w64, b64, F64, rms, "contiguous", gy)
    with _limits(max_d=8 if wide else None, wide_chunk=8 if wide else None):
        got = _run_plain(K, x64, w64, b64, dtype, rms, cfg["layout"], gy)
    assert got[0].dtype == dtype
    names = ["y", "dx", "dw", "db"]
    if dtype in (F16, BF16):
        lowp = _run_plain(ref, x64, w64, b64, dtype, rms, "contiguous", gy)
        for name, g_, w_, l_ in zip(names, got, want, lowp):
            assert_close_to_reference(name, g_, w_, lowp=l_, lowp_atol=ROW_NORM_LOWP_ATOL[dtype])
    else:
        for name, g_, w_ in zip(names, got, want):
            assert_close_to_reference(name, g_, w_, rtol=ROW_NORM_RTOL[dtype])


def test_wide_rows_in_the_fused_op_take_a_second_pass():
    """D > MAX_D: row_norm then the LIF op, equal to the torch composition (limit lowered to 8)."""
    cfg = dict(dtype=F64, T=2, rows=(2,), D=11, layout="contiguous", rms=True, affine=True, v_kind="tensor",
               v_reset=0.0, detach_reset=False, decay_input=False, tau=2.0, surrogate="atan", threshold=0.5,
               grad_kind="random", max_segment=None, seed=3)
    with _limits(max_d=8, wide_chunk=4):
        _check_fused(cfg)


# ------------------------------------------------------------------------------------------
# errors, fallbacks, ops
# ------------------------------------------------------------------------------------------


def test_bad_inputs_raise_clear_errors():
    x = torch.randn(2, 3, 8, device=DEVICE)
    with pytest.raises(ValueError, match=r"weight must have shape \[8\], got \[7\].*|x of shape \[2, 3, 8\]"):
        K.row_norm(x, torch.ones(7, device=DEVICE), None, eps=1e-5, rms=False)
    with pytest.raises(ValueError, match=r"\[2, 3, 8\].*bias must have shape \[8\], got \[4\]"):
        K.row_norm_lif(x, 0.0, None, torch.zeros(4, device=DEVICE), eps=1e-5, rms=False, threshold=1.0, neuron=LIF)
    with pytest.raises(ValueError, match="RMSNorm has no bias"):
        K.row_norm(x, None, torch.zeros(8, device=DEVICE), eps=1e-5, rms=True)
    with pytest.raises(TypeError, match="floating-point"):
        K.row_norm(torch.ones(2, 8, dtype=torch.int64, device=DEVICE), None, None, eps=1e-5, rms=False)
    with pytest.raises(ValueError, match=r"v must have shape \[3, 8\].*got \[2, 8\]"):
        K.row_norm_lif(x, torch.zeros(2, 8, device=DEVICE), None, None, eps=1e-5, rms=False, threshold=1.0, neuron=LIF)
    with pytest.raises(ValueError, match=r"at least 2 dimension.*\[8\]"):
        K.row_norm_lif(x[0, 0], 0.0, None, None, eps=1e-5, rms=False, threshold=1.0, neuron=LIF)


def test_surrogate_without_kernel_falls_back_with_warning():
    K._WARNED.clear()
    neuron = LIF._replace(surrogate=lambda z: sg.Sigmoid(4.0)(z))
    x = torch.randn(3, 2, 6, device=DEVICE)
    with pytest.warns(RuntimeWarning, match="row_norm_lif"):
        s, v = K.row_norm_lif(x, 0.0, None, None, eps=1e-5, rms=False, threshold=0.5, neuron=neuron)
    s_ref, v_ref = ref.lif(ref.row_norm(x, None, None, eps=1e-5, rms=False), 0.0, 0.5, neuron)
    torch.testing.assert_close(s, s_ref)
    torch.testing.assert_close(v, v_ref)


def test_double_backward_is_refused():
    x = torch.randn(3, 2, 6, device=DEVICE, requires_grad=True)
    s, v = K.row_norm_lif(x, 0.0, None, None, eps=1e-5, rms=False, threshold=0.5, neuron=LIF)
    (g,) = torch.autograd.grad((s.sum() + v.sum()), x, create_graph=True)
    with pytest.raises(NotImplementedError, match="row_norm_lif"):
        g.sum().backward()


def _op_args(kind):
    x = torch.randn(3, 2, 5, device=DEVICE, requires_grad=True)
    w = torch.rand(5, device=DEVICE, requires_grad=True)
    b = torch.rand(5, device=DEVICE, requires_grad=True)
    if kind == "row_norm":
        return K.row_norm_op, (x, w, b, 1e-5, False)
    v0 = torch.randn(2, 5, device=DEVICE, requires_grad=True)
    return K.row_norm_lif_op, (x, v0, w, b, 1e-5, False, 0.5, 0.0, *LIF.for_kernel("sigmoid", 4.0), True)


@pytest.mark.parametrize("kind", ["row_norm", "row_norm_lif"])
def test_opcheck(kind):
    op, args = _op_args(kind)
    torch.library.opcheck(op, args, test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


@pytest.mark.slow  # 8 s of dynamo; opcheck's fake-tensor test covers the fake kernels in the default run
def test_compiles_fullgraph():
    x = torch.randn(3, 2, 6, device=DEVICE, requires_grad=True)
    w = torch.rand(6, device=DEVICE, requires_grad=True)

    def f(x):
        y = K.row_norm(x, w, None, eps=1e-5, rms=True)
        s, v = K.row_norm_lif(y, 0.0, w, None, eps=1e-5, rms=False, threshold=0.5, neuron=LIF)
        return s.sum() + v.sum() + y.sum()

    out = torch.compile(f, fullgraph=True, backend="aot_eager")(x)
    (g,) = torch.autograd.grad(out, x)
    eager = f(x)
    (g_eager,) = torch.autograd.grad(eager, x)
    torch.testing.assert_close(out, eager)
    torch.testing.assert_close(g, g_eager)


# ------------------------------------------------------------------------------------------
# bytes (issue 24's budgets, fp32, T = 4, D = 256), counted by the interpreter's traffic meter
# ------------------------------------------------------------------------------------------

BUDGET_T, BUDGET_ROWS, BUDGET_D = 4, (2, 8), 256
#: per element-step: the fused forward ≤ 8 + 8/T + 1, backward ≤ 16 + 8/T + 1 (12 + 8/T + 1
#: here: all T steps fit one segment), saved beyond x ≤ per-row values (μ, rstd: 8/D);
#: the plain row norm 8 and 12, with 0.3 B for the per-row values (μ, rstd: 8/D) and the
#: per-program ones (γ, β and the [2, D] column partials: 12 B per column and program, 0.19 B
#: per element-step over this test's 64 rows; today 8.09 and 12.22)
FUSED_FWD = 8 + 8 / BUDGET_T + 1
FUSED_BWD = 12 + 8 / BUDGET_T + 1
PLAIN_FWD, PLAIN_BWD = 8.3, 12.3


def _metered(fn):
    from perf.tools import interpreting, meter

    if not interpreting():
        pytest.skip("the traffic meter counts kernels run by the Triton interpreter")
    with meter() as m:
        out = fn()
    return m, out


@pytest.mark.parametrize("state", ["float", "tensor"])
def test_fused_bytes_within_budget(state):
    """The neurons' default state (a float): the issue's budgets. A tensor state adds its reads:
    4/T forward, and 4/T backward (the recompute starts from v0)."""
    from perf.tools import saved_tensor_bytes

    g = torch.Generator().manual_seed(0)
    shape = (BUDGET_T, *BUDGET_ROWS, BUDGET_D)
    x = (torch.randn(shape, generator=g) * 1.5 + 0.5).requires_grad_(True)
    w = (1 + 0.2 * torch.randn(BUDGET_D, generator=g)).requires_grad_(True)
    b = (0.1 * torch.randn(BUDGET_D, generator=g)).requires_grad_(True)
    v0 = torch.zeros(shape[1:]).requires_grad_(True) if state == "tensor" else 0.0
    elem_steps = x.numel()

    def fwd():
        return K.row_norm_lif(x, v0, w, b, eps=1e-5, rms=False, threshold=1.0, neuron=LIF)

    m_fwd, (s, v) = _metered(fwd)
    gs, gv = torch.randn(s.shape, generator=g), torch.randn(v.shape, generator=g)
    m_bwd, _ = _metered(lambda: torch.autograd.backward([s, v], [gs, gv]))
    saved = saved_tensor_bytes(fwd, exclude=(x, v0, w, b) if state == "tensor" else (x, w, b))
    fwd_b, bwd_b = m_fwd.bytes / elem_steps, m_bwd.bytes / elem_steps
    note_ = f"fwd {fwd_b:.3f} ({m_fwd.breakdown(elem_steps)}), bwd {bwd_b:.3f} ({m_bwd.breakdown(elem_steps)}), " \
            f"saved beyond inputs {saved['new'] / elem_steps:.3f}"
    print(note_)
    assert m_fwd.launches == 1 and m_bwd.launches == 1, note_
    extra = 4 / BUDGET_T if state == "tensor" else 0.0
    assert fwd_b <= FUSED_FWD and bwd_b <= FUSED_BWD + extra, note_
    # torch ops: the sum of the [2, P, D] column partials and dtype casts (today 0.25 B)
    assert (m_fwd.torch_bytes + m_bwd.torch_bytes) / elem_steps <= 0.3, note_
    assert saved["new"] / elem_steps <= 8 / BUDGET_D + 1e-9, note_  # μ_t, rstd_t per row: no per-element tensor


def test_plain_bytes_within_budget():
    g = torch.Generator().manual_seed(0)
    shape = (*BUDGET_ROWS, 4, BUDGET_D)
    x = torch.randn(shape, generator=g).requires_grad_(True)
    w = (1 + 0.2 * torch.randn(BUDGET_D, generator=g)).requires_grad_(True)
    m_fwd, y = _metered(lambda: K.row_norm(x, w, None, eps=1e-5, rms=True))
    gy = torch.randn(shape, generator=g)
    m_bwd, _ = _metered(lambda: y.backward(gy))
    n = x.numel()
    msg = f"fwd {m_fwd.bytes / n:.3f}, bwd {m_bwd.bytes / n:.3f} ({m_bwd.breakdown(n)})"
    assert m_fwd.bytes / n <= PLAIN_FWD and m_bwd.bytes / n <= PLAIN_BWD, msg
    assert m_fwd.launches == 1 and m_bwd.launches == 1, msg
