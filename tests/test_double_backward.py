"""A second backward through a triton op is refused with a clear NotImplementedError.

The fused kernels have first derivatives only. Differentiating a gradient taken with
``create_graph=True`` (gradient penalties, meta-learning, Hessian-vector products) must say
so and point at the torch backend, for every op family: LIF, MPBN-LIF (batch and running
statistics), BN/tdBN, TEBN, BNTT, TAB (whole sequence and single-step continuation) and the
fused norm → LIF block. The torch backend, the advised route, does differentiate twice.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from devices import DEVICE

pytest.importorskip("triton")

from snnorm import functional, layer, neuron  # noqa: E402

T, N, C = 2, 3, 2
REFUSAL = r"double backward.*not supported on the triton backend.*torch backend.*set_backend\(net, 'torch'\)"


def _mpbn_eval() -> nn.Module:
    node = neuron.MPBNLIFNode(out_channels=C, step_mode="m")
    return node.eval()  # running statistics: the elementwise kernel (FIRE_NORMALISED)


#: name → (module factory, whether it is called once per step with [N, C])
CASES = {
    "lif": (lambda: neuron.LIFNode(step_mode="m"), False),
    "mpbn_lif-train": (lambda: neuron.MPBNLIFNode(out_channels=C, step_mode="m"), False),
    "mpbn_lif-eval": (_mpbn_eval, False),
    "bn": (lambda: layer.BatchNorm1d(C, step_mode="m"), False),
    "tdbn": (lambda: layer.ThresholdDependentBatchNorm1d(alpha=1.0, v_th=0.5, num_features=C), False),
    "tebn": (lambda: layer.TemporalEffectiveBatchNorm1d(T, C), False),
    "bntt": (lambda: layer.BatchNormThroughTime1d(T, C, step_mode="m"), False),
    "tab": (lambda: layer.TemporalAccumulatedBatchNorm1d(T, C), False),
    "tab-single-step": (lambda: layer.TemporalAccumulatedBatchNorm1d(T, C, step_mode="s"), True),
    "fused-bn-lif": (
        lambda: functional.fuse_norm_neurons(nn.Sequential(layer.BatchNorm1d(C, step_mode="m"),
                                                           neuron.LIFNode(step_mode="m"))),
        False,
    ),
    "fused-tebn-lif": (
        lambda: functional.fuse_norm_neurons(nn.Sequential(layer.TemporalEffectiveBatchNorm1d(T, C),
                                                           neuron.LIFNode(step_mode="m"))),
        False,
    ),
}


def _first_order_grads(name: str, backend: str):
    """The module of case ``name`` on ``backend``, run on a tiny input, and its gradients
    (input and parameters) taken with ``create_graph=True``."""
    make, per_step = CASES[name]
    torch.manual_seed(0)
    module = make().to(DEVICE)
    functional.set_backend(module, backend)
    x = (torch.randn(T, N, C, device=DEVICE) + 0.5).requires_grad_()
    y = torch.stack([module(x[t]) for t in range(T)]) if per_step else module(x)
    weights = torch.randn(y.shape, device=DEVICE)
    inputs = [x, *(p for p in module.parameters() if p.requires_grad)]
    grads = torch.autograd.grad((y * weights).sum(), inputs, create_graph=True, allow_unused=True)
    return [g for g in grads if g is not None]


@pytest.mark.parametrize("name", list(CASES))
def test_second_backward_through_a_triton_op_is_refused(name):
    grads = _first_order_grads(name, "triton")
    penalty = sum(g.square().sum() for g in grads)
    assert penalty.requires_grad, "the first-order gradients should carry a graph under create_graph=True"
    with pytest.raises(NotImplementedError, match=REFUSAL):
        penalty.backward()


@pytest.mark.parametrize("name", ["bn", "tebn", "tab"])
def test_the_torch_backend_differentiates_twice(name):
    """The route the message advises works: the torch backend has the second derivative."""
    grads = _first_order_grads(name, "torch")
    sum(g.square().sum() for g in grads).backward()
