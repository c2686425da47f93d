"""Corners of the Triton LIF / MPBN-LIF ops the property tests do not reach.

- the backward with no gradient for the final membrane (gv None) on 3-d and 4-d inputs;
- LIF / IF with no channel dimension ([T, N] multi-step, [N] single-step);
- double backward (create_graph=True) names its limit.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from snnorm import neuron  # noqa: E402
from snnorm import surrogate as sg  # noqa: E402
from snnorm.backends import get_ops  # noqa: E402
from snnorm.backends import torch_backend as ref  # noqa: E402
from snnorm.functional import set_backend  # noqa: E402
from snnorm.kernels import lif as lif_kernels  # noqa: E402
from snnorm.kernels import mpbn_lif_train as train_kernels  # noqa: E402

LIF_KW = dict(tau=2.0, decay_input=False, v_reset=0.0, surrogate=sg.Sigmoid(), detach_reset=False)
TRAIN_KW = dict(training=True, momentum=0.1, batches_tracked=0, eps=1e-5, carry="normalized", **LIF_KW)


def _triton():
    return get_ops("triton")


@pytest.mark.parametrize("shape", [(3, 4, 2), (3, 4, 2, 5), (2, 3, 2, 3, 3)])
def test_lif_backward_without_final_membrane_gradient(shape):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=g)
    v = torch.zeros(shape[1:])
    th = torch.full((shape[2],), 0.4)
    flags = (2.0, False, 0.0, False, False, "sigmoid", 4.0, 0, False)
    _, _, h = lif_kernels.lif_elementwise_op(x, v, th, None, None, None, None, None, *flags[:7], 0, False, True, torch.float32)
    gs = torch.randn(shape, generator=g)
    without = lif_kernels.lif_elementwise_bwd_op(gs, None, h, torch.float32, th, None, None, None, None, None, *flags)
    zeros = lif_kernels.lif_elementwise_bwd_op(gs, torch.zeros(shape[1:]), h, torch.float32, th, None, None, None, None, None, *flags)
    for a, b in zip(without, zeros):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("shape", [(3, 4, 2), (3, 4, 2, 5)])
def test_mpbn_lif_resident_backward_without_final_membrane_gradient(shape):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(*shape, generator=g)
    v = torch.zeros(shape[1:])
    C = shape[2]
    w, b, th = torch.rand(C, generator=g) + 0.5, torch.randn(C, generator=g), torch.full((C,), 0.4)
    cfg = (2.0, False, 0.0, False, False, "atan", 2.0, True)
    _, _, h, mean, rstd, _, _ = train_kernels.mpbn_lif_train_op(x, v, w, b, None, None, th, 0.1, 0, 1e-5, *cfg[:7], True, True, torch.float32)
    gs = torch.randn(shape, generator=g)
    without = train_kernels.mpbn_lif_train_bwd_op(gs, None, h, torch.float32, mean, rstd, w, b, th, *cfg)
    zeros = train_kernels.mpbn_lif_train_bwd_op(gs, torch.zeros(shape[1:]), h, torch.float32, mean, rstd, w, b, th, *cfg)
    for a, b_ in zip(without, zeros):
        torch.testing.assert_close(a, b_, rtol=0, atol=0)


@pytest.mark.parametrize("op", ["lif", "mpbn_lif"])
def test_autograd_with_unused_final_membrane_matches_torch(op):
    x = torch.randn(3, 4, 2, 5, generator=torch.Generator().manual_seed(2)) * 1.5
    v = torch.zeros(4, 2, 5)
    weights = torch.arange(x.numel(), dtype=torch.float32).view(x.shape) / x.numel()
    grads = []
    for ops in (_triton(), ref):
        xr = x.clone().requires_grad_(True)
        if op == "lif":
            s, _ = ops.lif(xr, v, 0.5, **LIF_KW)
        else:
            s, _ = ops.mpbn_lif(xr, v, None, None, torch.zeros(2), torch.ones(2), 0.5, **TRAIN_KW)
        (s * weights).sum().backward()  # v_T unused: its gradient is None, not zeros
        grads.append(xr.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("cls", [neuron.LIFNode, neuron.IFNode])
@pytest.mark.parametrize("step_mode, shape", [("m", (4, 6)), ("s", (6,))])
def test_neuron_without_channel_dim_matches_torch(cls, step_mode, shape):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(3)) * 2
    results = []
    for backend in ("torch", "triton"):
        node = cls(step_mode=step_mode)
        set_backend(node, backend)
        xr = x.clone().requires_grad_(True)
        s = node(xr)
        s2 = node(xr * 0.5)  # a second call carries the membrane
        (s * 1.5 + s2).sum().backward()
        results.append((s, s2, node.v, xr.grad))
    for got, want in zip(results[1], results[0]):
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("op", ["lif", "mpbn_lif"])
def test_double_backward_names_the_limit(op):
    x = torch.randn(3, 4, 2, generator=torch.Generator().manual_seed(4), requires_grad=True)
    v = torch.zeros(4, 2)
    if op == "lif":
        s, v_out = _triton().lif(x, v, 0.5, **LIF_KW)
        s_ref, v_ref = ref.lif(x, v, 0.5, **LIF_KW)
    else:
        s, v_out = _triton().mpbn_lif(x, v, None, None, None, None, 0.5, **TRAIN_KW)
        s_ref, v_ref = ref.mpbn_lif(x, v, None, None, None, None, 0.5, **TRAIN_KW)
    # first-order gradients with create_graph=True still work and agree
    (g,) = torch.autograd.grad((s * x).sum() + v_out.sum(), x, create_graph=True)
    (g_ref,) = torch.autograd.grad((s_ref * x).sum() + v_ref.sum(), x, create_graph=True)
    torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-5)
    with pytest.raises(NotImplementedError, match="double backward.*create_graph=True.*torch backend"):
        torch.autograd.grad(g.sum(), x)
