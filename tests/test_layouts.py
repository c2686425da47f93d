"""Strided layouts on the statistics pipeline and the fused norm → LIF kernels (issue 23
"Layouts", issue 24 item 3): channels-last convnet activations and transposed token-major
views are read and written in place, forward and backward.

* channels-last: a conv's ``[T·N, C, H, W]`` NHWC output viewed ``[T, N, C, H, W]``;
* transposed: Spikformer's Linear gives ``[T, B, L, D]``, a multi-step BatchNorm1d sees
  ``x.transpose(-1, -2)`` ``[T, B, D, L]``: the channel dim innermost (stride 1).

Each op runs on the strided input and on a contiguous copy of it: values equal exactly
(the kernels visit the same (n, c, s) elements in the same order, only the addresses
differ), outputs, gradients and membranes keep the input's memory format, and the traffic
meter (kernel bytes plus torch operations outside the kernels, where a copy would show)
counts the contiguous input's bytes per element-step ±0.5 B, forward and backward.
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn as nn
from tolerances import EXACT, NORM_NEURON_FUSED

pytest.importorskip("triton")

from perf.tools import interpreting, meter  # noqa: E402
from snnorm import backends, functional, layer, neuron  # noqa: E402
from snnorm.params import LIFParameters  # noqa: E402
from snnorm.surrogate import Sigmoid  # noqa: E402

if not interpreting():
    pytest.skip("the traffic meter counts kernels run by the Triton interpreter (TRITON_INTERPRET=1)",
                allow_module_level=True)

#: [T, N, C, H, W] of the channels-last cases (M = N·H·W = 256 values per (t, c))
CL_SHAPE = (4, 4, 8, 8, 8)
#: [T, B, L, D] of the token-major cases; the norm sees [T, B, D, L] (C = D = 8, S = L = 64)
TOKEN_SHAPE = (4, 4, 64, 8)
#: the issue's bound: a layout moves the contiguous input's bytes per element-step ±0.5
BYTES_SLACK = 0.5
LAYOUTS = ("channels_last", "transposed")
OPS = ("bn", "tebn", "tab", "bntt", "tdbn_lif", "tebn_lif")


def _strided_input(layout: str, seed: int) -> torch.Tensor:
    """A [T, N, C, *spatial] input in ``layout`` (a view with that layout's strides)."""
    g = torch.Generator().manual_seed(seed)
    if layout == "channels_last":
        T, N, C, H, W = CL_SHAPE
        x = torch.randn(T * N, C, H, W, generator=g) * 1.5 + 0.5
        x = x.contiguous(memory_format=torch.channels_last).view(T, N, C, H, W)
        assert x.stride(2) == 1
        return x
    T, B, L, D = TOKEN_SHAPE
    x = (torch.randn(T, B, L, D, generator=g) * 1.5 + 0.5).transpose(-1, -2)  # [T, B, D, L], D innermost
    assert x.stride(2) == 1 and not x.is_contiguous()
    return x


def _call(op: str, x: torch.Tensor):
    """A function running ``op`` on ``x`` (a fresh leaf): (its output(s), the leaves)."""
    ops = backends.get_ops("triton")
    T, C = x.shape[0], x.shape[2]
    g = torch.Generator().manual_seed(7)
    x = x.detach().requires_grad_(True)
    w = (1.0 + 0.2 * torch.randn(C, generator=g)).requires_grad_(True)
    b = (0.1 * torch.randn(C, generator=g)).requires_grad_(True)
    p = torch.linspace(0.5, 1.5, T).requires_grad_(True)
    wt = (1.0 + 0.2 * torch.randn(T, C, generator=g)).requires_grad_(True)
    bt = (0.1 * torch.randn(T, C, generator=g)).requires_grad_(True)
    rm, rv = torch.zeros(C), torch.ones(C)
    rmt, rvt = torch.zeros(T, C), torch.ones(T, C)
    lif = LIFParameters(Sigmoid(), tau=2.0, decay_input=True, v_reset=0.0)
    v0 = torch.full(x.shape[1:], 0.1)  # a contiguous membrane: read through its own strides

    def run():
        if op == "bn":
            return (ops.batch_norm_seq(x, w, b, rm, rv, training=True, momentum=0.1, eps=1e-5),), [x, w, b]
        if op == "tebn":
            return (ops.tebn(x, w, b, rm, rv, p, training=True, momentum=0.1, eps=1e-5),), [x, w, b, p]
        if op == "tab":
            y, _ = ops.tab(x, wt, bt, rmt, rvt, p, training=True, momentum=[0.1] * T, eps=1e-5)
            return (y,), [x, wt, bt, p]
        if op == "bntt":
            ws = list(wt.unbind(0))
            y = ops.bntt(x, ws, list(rmt.clone().unbind(0)), list(rvt.clone().unbind(0)), training=True,
                         momentum=[0.1] * T, eps=[1e-5] * T)
            return (y,), [x, wt]
        rule, pp = ("batch_norm", None) if op == "tdbn_lif" else ("tebn", p)
        s, v = ops.norm_lif(rule, x, v0, w, b, pp, rm, rv, momentum=[0.1], eps=1e-5, batch_stats=True,
                            threshold=1.0, neuron=lif)
        return (s, v), [t for t in (x, w, b, pp) if t is not None]

    return run


def _grads_like(outs):
    """The gradient a loss would send to each output, in that output's memory format (what a
    conv's or a Linear's backward hands back to a layer whose output had that format)."""
    g = torch.Generator().manual_seed(3)
    return [torch.empty_like(o).copy_(torch.randn(o.shape, generator=g)) for o in outs]


def _bytes_per_elem_step(traffic, x) -> float:
    return (traffic.load_bytes + traffic.store_bytes + traffic.torch_bytes) / x.numel()


@functools.lru_cache(maxsize=None)
def _measure(op: str, layout: str, contiguous: bool):
    """Forward and backward of ``op`` on the layout's input (or a contiguous copy), metered:
    (outputs, gradients, strides, fwd B/elem-step, bwd B/elem-step, torch ops)."""
    x = _strided_input(layout, seed=1)
    if contiguous:
        x = x.contiguous()
    run = _call(op, x)
    with torch.enable_grad():
        with meter() as fwd:
            outs, leaves = run()
        grads = _grads_like(outs)
        with meter() as bwd:
            got = torch.autograd.grad(outs, leaves, grads)
    return dict(
        x_strides=leaves[0].stride(), outs=[o.detach() for o in outs], grads=list(got),
        fwd=_bytes_per_elem_step(fwd, x), bwd=_bytes_per_elem_step(bwd, x),
        torch_ops=(fwd.torch_breakdown(), bwd.torch_breakdown()),
    )


#: the default run's cases (a convnet BN and the Spikformer-style fused pair, ~5 s each through
#: the interpreter); the others are in the slow set, which CI runs too (.ci/run)
DEFAULT_CASES = {("bn", "channels_last"), ("tdbn_lif", "transposed")}


def _params():
    for op in OPS:
        for layout in LAYOUTS:
            marks = [] if (op, layout) in DEFAULT_CASES else [pytest.mark.slow]
            yield pytest.param(op, layout, id=f"{op}-{layout}", marks=marks)


@pytest.mark.parametrize("op, layout", list(_params()))
def test_strided_input_equals_contiguous_keeps_its_format_and_moves_the_same_bytes(op, layout):
    got, want = _measure(op, layout, False), _measure(op, layout, True)
    # values: exact (the same elements in the same order; only their addresses differ)
    for a, b in zip(got["outs"], want["outs"]):
        torch.testing.assert_close(a, b, **EXACT)
    for a, b in zip(got["grads"], want["grads"]):
        torch.testing.assert_close(a, b, **EXACT)
    # memory format: outputs and ∂x as the input (membranes as one step of it), as torch's BN
    xs = got["x_strides"]
    assert got["outs"][0].stride() == xs, f"{op} output strides {got['outs'][0].stride()}, input {xs}"
    assert got["grads"][0].stride() == xs, f"{op} ∂x strides {got['grads'][0].stride()}, input {xs}"
    if len(got["outs"]) > 1:
        assert got["outs"][1].stride() == xs[1:], f"{op} membrane strides {got['outs'][1].stride()}"
    # traffic: no copy of the activation in either direction
    for direction in ("fwd", "bwd"):
        assert abs(got[direction] - want[direction]) <= BYTES_SLACK, (
            f"{op} {layout} {direction}: {got[direction]:.2f} B/elem-step, contiguous {want[direction]:.2f} "
            f"(torch ops: {got['torch_ops']})"
        )


def test_a_layout_whose_spatial_dims_cannot_merge_is_copied_and_still_right():
    """A transposed H, W cannot be one strided S: the input is copied (the one layout that
    still is), and the result equals the contiguous input's."""
    ops = backends.get_ops("triton")
    g = torch.Generator().manual_seed(4)
    x = (torch.randn(2, 2, 3, 5, 4, generator=g) + 0.3).transpose(3, 4)
    w, b = torch.ones(3), torch.zeros(3)
    y = ops.batch_norm_seq(x, w, b, None, None, training=True, momentum=0.1, eps=1e-5)
    ref = ops.batch_norm_seq(x.contiguous(), w, b, None, None, training=True, momentum=0.1, eps=1e-5)
    torch.testing.assert_close(y, ref, **EXACT)


@pytest.mark.slow  # ~5 s
def test_fused_kernels_with_64_bit_offsets_equal_32_bit_ones(monkeypatch):
    """The fused norm → LIF kernels take int32 offsets unless one passes 2³¹ (INDEX_64):
    forcing INDEX_64 on a small strided input gives the same spikes, membrane and gradients."""
    import snnorm.kernels.norm_lif as nl

    x = _strided_input("channels_last", seed=5)[:2, :2]  # strided, not dense along N: its own offsets
    run32 = _call("tdbn_lif", x)
    outs32, leaves32 = run32()
    grads32 = torch.autograd.grad(outs32, leaves32, _grads_like(outs32))
    monkeypatch.setattr(nl, "needs_int64", lambda *tensors: True)
    run64 = _call("tdbn_lif", x)
    outs64, leaves64 = run64()
    grads64 = torch.autograd.grad(outs64, leaves64, _grads_like(outs64))
    for a, b in zip([*outs64, *grads64], [*outs32, *grads32]):
        torch.testing.assert_close(a, b, **EXACT)


@pytest.mark.parametrize("layout", ["channels_last", pytest.param("transposed", marks=pytest.mark.slow)])
def test_fake_kernels_give_the_real_strides(layout):
    """torch.compile traces the ops' fake kernels: their outputs must have the strides the
    real kernels write (x's memory format), or compiled code reads them wrongly."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    x = _strided_input(layout, seed=2)
    T, N, C = x.shape[:3]
    w, b, mean, var = torch.ones(C), torch.zeros(C), torch.zeros(C), torch.ones(C)
    v0 = torch.zeros(x.shape[1:])
    lif = LIFParameters(Sigmoid(), tau=2.0, decay_input=True, v_reset=0.0)
    lif_args = backends.get_ops("triton").norm_lif_kernel(lif).to_op_args()
    snn = torch.ops.snnorm

    def calls(x, w, b, mean, var, v0):
        y = snn.bn_apply(x, w, b, mean, var, None, 1e-5, "batch_norm", True)
        dx = snn.bn_apply_backward(y, x, w, b, mean, var, None, 1e-5, "batch_norm", True, True, True)[0]
        s, v, ckpt = snn.norm_lif(x, v0, w, b, None, mean, var, "batch_norm", 1e-5, True, 1.0, 0.0, *lif_args, True,
                                  "")
        bwd = snn.norm_lif_backward(s, v, x, v0, ckpt, w, b, None, mean, var, "batch_norm", 1e-5, True, 1.0, 0.0,
                                    *lif_args, True, True, "")
        return [y, dx, s, v, ckpt, bwd[0], bwd[1]]

    real = calls(x, w, b, mean, var, v0)
    with FakeTensorMode() as mode:
        fake = calls(*(mode.from_tensor(t) for t in (x, w, b, mean, var, v0)))
    for i, (r, f) in enumerate(zip(real, fake)):
        assert (tuple(f.shape), f.stride()) == (tuple(r.shape), r.stride()), f"output {i}"
    assert real[0].stride() == x.stride() and real[3].stride() == x.stride()[1:]


# -- the Spikformer idiom: BatchNorm1d on the transposed tokens, then a LIF --------------------------


class _TokenBlock(nn.Module):
    """Linear on ``[T, B, L, D]``, a multi-step BatchNorm1d over D on the transposed view
    ``[T, B, D, L]``, then a LIF: on that view (``after_transpose`` False) or on the tokens
    again (``after_transpose`` True: the neuron follows the transpose back)."""

    def __init__(self, D: int, after_transpose: bool):
        super().__init__()
        self.fc = nn.Linear(D, D)
        self.bn = layer.BatchNorm1d(D, step_mode="m")
        self.sn = neuron.LIFNode(step_mode="m")
        self.after_transpose = after_transpose

    def forward(self, x):
        y = self.bn(self.fc(x).transpose(-1, -2))
        return self.sn(y.transpose(-1, -2)) if self.after_transpose else self.sn(y).transpose(-1, -2)


def _token_nets(after_transpose: bool):
    torch.manual_seed(11)
    ref = _TokenBlock(TOKEN_SHAPE[-1], after_transpose)
    fused = _TokenBlock(TOKEN_SHAPE[-1], after_transpose)
    fused.load_state_dict(ref.state_dict())
    for net in (ref, fused):
        functional.set_backend(net, "triton")
    return ref, fused


@pytest.mark.slow  # ~9 s: the unfused pair runs as the reference
def test_bn1d_on_transposed_tokens_fuses_with_its_lif_and_copies_nothing():
    ref, net = _token_nets(after_transpose=False)
    functional.fuse_norm_neurons(net)
    assert functional.fusion_report(net).fused == [("bn", "sn")]
    x = torch.randn(TOKEN_SHAPE, generator=torch.Generator().manual_seed(5)) + 0.5
    want = ref(x)
    with meter() as fwd:
        got = net(x)
    torch.testing.assert_close(got, want, **EXACT)
    g = torch.randn(got.shape, generator=torch.Generator().manual_seed(6))
    want_grads = torch.autograd.grad(want, [ref.fc.weight, ref.bn.weight], g)
    with meter() as bwd:
        got_grads = torch.autograd.grad(got, [net.fc.weight, net.bn.weight], g)
    for a, b in zip(got_grads, want_grads):  # the fused backward sums ∂y in another order
        torch.testing.assert_close(a, b, **NORM_NEURON_FUSED[torch.float32])
    # the fused op reads the transposed view in place: the only torch ops besides the kernels
    # are the Linear (an addmm and its backward's mm) and the bias's sum, none a layout copy
    for t in (fwd, bwd):
        assert not any(name.startswith(("aten::clone", "aten::contiguous", "aten::copy_"))
                       for name in t.torch_ops), t.torch_breakdown()


def _token_input(seed: int) -> torch.Tensor:
    return (torch.randn(TOKEN_SHAPE, generator=torch.Generator().manual_seed(seed)) + 0.5).requires_grad_(True)


def _token_run(net, x, g):
    """Spikes, the final membrane and ∂x, ∂γ, ∂β of one call (metered: forward, backward); the
    sequence goes on from the membrane's value (backward stops at the call)."""
    if isinstance(net.sn.v, torch.Tensor):
        net.sn.v = net.sn.v.detach()
    with meter() as fwd:
        s = net(x)
    with meter() as bwd:
        grads = torch.autograd.grad(s, [x, net.bn.weight, net.bn.bias], g)
    return [s.detach(), net.sn.v.detach(), *grads], fwd, bwd


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.slow)])  # triton: ~20 s
def test_bn1d_on_transposed_tokens_fuses_with_a_lif_after_the_transpose_back(backend):
    """``sn(bn(x.mT).mT)``: the pair fuses through the transpose (fx and run finders), computes
    what the unfused torch pair computes (torch backend: exactly, the composition; triton: the
    fused kernel, to the fused tolerance) over two calls of one sequence, keeps the neuron's
    membrane ``[B, L, D]`` into single-step calls, and on triton moves the bytes of the
    LIF-on-the-view block (±0.5 B/elem-step), with no layout copy."""
    ref, net = _token_nets(after_transpose=True)
    functional.set_backend(ref, "torch")
    functional.set_backend(net, backend)
    functional.fuse_norm_neurons(net)
    x1, x2 = _token_input(5), _token_input(6)
    for report in (functional.fusion_report(net), functional.fusion_report(ref, example_input=x1.detach())):
        assert report.fused == [("bn", "sn")] and str(report.relayouts[("bn", "sn")]) == "transpose(-1, -2)"
    assert "through transpose(-1, -2): bn → sn" in str(functional.fusion_report(net))
    state_shape = TOKEN_SHAPE[1:]
    g = torch.randn(TOKEN_SHAPE, generator=torch.Generator().manual_seed(7))
    tol = EXACT if backend == "torch" else NORM_NEURON_FUSED[torch.float32]
    for x in (x1, x2):  # the second call goes on from the first's membrane
        want = _token_run(ref, x, g)[0]
        got, fwd, bwd = _token_run(net, x, g)
        assert net.sn.v.shape == state_shape  # the neuron's own shape, not the norm's [B, D, L]
        if backend == "triton":  # the membrane is read through the inverse transpose in place, too
            for t in (fwd, bwd):
                assert not any(name.startswith(("aten::clone", "aten::contiguous", "aten::copy_"))
                               for name in t.torch_ops), t.torch_breakdown()
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, **tol)
        first = (fwd, bwd) if x is x1 else first

    if backend == "triton":  # the first calls (v0 a float in both) of the two fused blocks
        on_view = _token_nets(after_transpose=False)[1]
        functional.fuse_norm_neurons(on_view)
        _, fwd_view, bwd_view = _token_run(on_view, x1, g)
        for t, t_view in zip(first, (fwd_view, bwd_view)):
            assert set(t.kernels) == set(t_view.kernels)  # the fused ops, nothing else
            bytes_, bytes_view = _bytes_per_elem_step(t, x1), _bytes_per_elem_step(t_view, x1)
            assert abs(bytes_ - bytes_view) <= BYTES_SLACK, (bytes_, bytes_view)

    # single-step after the sequence: the composition goes on from the neuron's own state
    functional.set_step_mode(net, "s")
    functional.set_step_mode(ref, "s")
    for module in (net, ref):
        module(x1[0].detach())
    torch.testing.assert_close(net.sn.v, ref.sn.v, **tol)
    assert net.sn.v.shape == state_shape
    functional.reset_net(net)
    assert not isinstance(net.sn.v, torch.Tensor)


def test_bn1d_through_a_transpose_runs_the_fused_kernel_in_the_neurons_shape():
    """The default run's triton check (forward only): two fused calls of one sequence equal the
    torch composition, the membrane read and written in the neuron's ``[B, L, D]``."""
    ref, net = _token_nets(after_transpose=True)
    functional.fuse_norm_neurons(net)
    functional.set_backend(ref, "torch")
    with torch.no_grad():
        for seed in (5, 6):
            x = _token_input(seed).detach()
            with meter() as t:
                got = net(x)
            assert any("lif" in name for name in t.kernels), t.kernels  # the fused kernel ran
            torch.testing.assert_close(got, ref(x), **NORM_NEURON_FUSED[torch.float32])
            assert net.sn.v.shape == TOKEN_SHAPE[1:]
            torch.testing.assert_close(net.sn.v, ref.sn.v, **NORM_NEURON_FUSED[torch.float32])


def test_a_fused_block_through_a_transpose_refuses_other_tensors():
    _, net = _token_nets(after_transpose=True)
    functional.fuse_norm_neurons(net)
    functional.set_backend(net, "torch")
    y = net.bn(torch.randn(TOKEN_SHAPE).transpose(-1, -2))
    with pytest.raises(RuntimeError, match="did not just produce .or its transpose"):
        net.sn(y.transpose(-1, -2).clone())
