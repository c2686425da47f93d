"""The NaN-poison debug switch (:func:`snnorm.kernels.api.poisoned_allocations`): every buffer a
launcher allocates starts as NaN (integers: a sentinel), so an element no kernel writes
shows up.

Every triton op, forward and backward where it has one, at a small odd shape: LIF and IF
(``lif``), MPBN-LIF in training, eval, folded and with test-time adaptation (batch and
running), multi-step BN, TEBN, BNTT, TAB (multi- and single-step), in training and eval,
the fused norm → LIF blocks (``norm_lif``), LayerNorm and RMSNorm (``row_norm``) and LayerNorm → LIF
(``row_norm_lif``): under the switch the outputs, ∂x,
parameter gradients and buffers are bit-identical to a run without it, and the switch
really poisoned that op's buffers (it counts its fills). A launcher that leaves part of
its output unwritten is caught.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn

pytest.importorskip("triton")

from snnorm import functional, layer, neuron  # noqa: E402
from snnorm.kernels import api  # noqa: E402
from snnorm.kernels._common import launcher  # noqa: E402

T, N, C, H, W = 3, 3, 5, 3, 3  # odd everywhere: partial tiles on every axis


def _folded(running: bool, train: bool) -> nn.Module:
    node = neuron.MPBNLIFNode(out_channels=C, step_mode="m", v_threshold=0.4)
    node(torch.randn(T, N, C, H, W, generator=torch.Generator().manual_seed(3)))
    functional.reset_net(node)
    node.eval()
    node.re_parameterize_v_threshold(running_stats=running)
    return node.train(train)


def _trained(make) -> nn.Module:
    """A layer after one training call (running statistics that differ from their init), in eval."""
    module = make()
    module(torch.randn(T, N, C, H, W, generator=torch.Generator().manual_seed(4)) + 0.3)
    functional.reset_net(module)
    return module.eval()


#: name → (build, input shape, backward?)
CASES = {
    "lif": (lambda: neuron.LIFNode(step_mode="m", v_threshold=0.4), (T, N, C, H, W), True),
    "if": (lambda: neuron.IFNode(step_mode="m", v_reset=None, v_threshold=0.4), (T, N, C), True),
    "mpbn_lif train": (lambda: neuron.MPBNLIFNode(out_channels=C, step_mode="m", v_threshold=0.4),
                       (T, N, C, H, W), True),
    "mpbn_lif train N=0": (lambda: neuron.MPBNLIFNode(out_channels=C, step_mode="m"), (T, 0, C, H, W), True),
    "mpbn_lif eval": (lambda: _trained(lambda: neuron.MPBNLIFNode(out_channels=C, step_mode="m", v_threshold=0.4)),
                      (T, N, C, H, W), True),
    "mpbn_lif folded": (lambda: _folded(running=False, train=False), (T, N, C, H, W), True),
    "mpbn_lif adapt batch": (lambda: _folded(running=False, train=True), (T, N, C, H, W), False),
    "mpbn_lif adapt running": (lambda: _folded(running=True, train=True), (T, N, C, H, W), False),
    "batch_norm_seq": (lambda: layer.BatchNorm2d(C, step_mode="m"), (T, N, C, H, W), True),
    "batch_norm_seq eval": (lambda: _trained(lambda: layer.BatchNorm2d(C, step_mode="m")), (T, N, C, H, W), True),
    "tebn": (lambda: layer.TemporalEffectiveBatchNorm2d(T, C), (T, N, C, H, W), True),
    "bntt": (lambda: layer.BatchNormThroughTime2d(T, C, step_mode="m"), (T, N, C, H, W), True),
    "bntt eval": (lambda: _trained(lambda: layer.BatchNormThroughTime2d(T, C, step_mode="m")), (T, N, C, H, W), True),
    "tab": (lambda: layer.TemporalAccumulatedBatchNorm2d(T, C), (T, N, C, H, W), True),
    "tab single-step": (lambda: layer.TemporalAccumulatedBatchNorm2d(T, C, step_mode="s"), (N, C, H, W), True),
    "norm_lif tdbn": (lambda: nn.Sequential(layer.ThresholdDependentBatchNorm2d(1.0, 0.5, C),
                                            neuron.LIFNode(step_mode="m", v_threshold=0.4)), (T, N, C, H, W), True),
    "norm_lif tebn": (lambda: nn.Sequential(layer.TemporalEffectiveBatchNorm2d(T, C),
                                            neuron.LIFNode(step_mode="m", v_threshold=0.4)), (T, N, C, H, W), True),
    "norm_lif bntt": (lambda: nn.Sequential(layer.BatchNormThroughTime2d(T, C, step_mode="m"),
                                            neuron.LIFNode(step_mode="m", v_threshold=0.4)), (T, N, C, H, W), True),
    # the per-token norms (rows of D = W features) and their fused LIF
    "row_norm layer": (lambda: layer.LayerNorm(W, step_mode="m"), (T, N, C, W), True),
    "row_norm rms": (lambda: layer.RMSNorm(W, step_mode="m"), (T, N, C, W), True),
    "row_norm_lif": (lambda: nn.Sequential(layer.LayerNorm(W, step_mode="m"),
                                           neuron.LIFNode(step_mode="m", v_threshold=0.4)), (T, N, C, W), True),
    # MPBN-LIF's resident kernels (one program per channel; the test lowers the channel count they need)
    "mpbn_lif train resident": (lambda: neuron.MPBNLIFNode(out_channels=C, step_mode="m", v_threshold=0.4),
                                (T, N, C, H, W), True),
}
#: in the default run: one op of each kernel file (the rest in the slow run)
DEFAULT = {"lif", "mpbn_lif train", "mpbn_lif train N=0", "batch_norm_seq", "tab", "norm_lif tdbn", "row_norm_lif"}
SLOW = set(CASES) - DEFAULT


def run_case(name: str) -> dict:
    build, shape, backward = CASES[name]
    torch.manual_seed(0)
    module = build()
    with torch.no_grad():  # non-trivial affine parameters
        for p in module.parameters():
            p.uniform_(0.6, 1.4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        functional.set_backend(module, "triton")
        if name.startswith("norm_lif"):
            functional.fuse_norm_neurons(module)
    functional.reset_net(module)
    x = (torch.randn(shape, generator=torch.Generator().manual_seed(1)) * 1.5 + 0.3).requires_grad_(backward)
    out = module(x)
    if backward:
        weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(2))
        (out * weights).sum().backward()
    return {
        "out": out.detach(),
        "dx": x.grad,
        **{f"grad {k}": p.grad for k, p in module.named_parameters()},
        **{f"state {k}": v for k, v in module.state_dict().items()},
    }


def _same(a, b) -> bool:
    if a is None or b is None:
        return a is b
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)  # NaN is never equal


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in CASES])
def test_every_op_writes_every_element_it_allocates(name, monkeypatch):
    if name.endswith("resident"):
        from snnorm.kernels import mpbn_lif_train

        monkeypatch.setattr(mpbn_lif_train, "MIN_PROGRAMS", 1)
        assert mpbn_lif_train.uses_resident_path(N, C, H * W)
    plain = run_case(name)
    for key, value in plain.items():
        nan = value is not None and value.is_floating_point() and value.isnan().any()
        assert not nan, f"{name} {key}: NaN without poison"
    fills = api.poisoned_allocations.__dict__.get("state", {}).get("fills", 0)
    with api.poisoned_allocations():
        poisoned = run_case(name)
    assert api.poisoned_allocations.state["fills"] > fills, f"{name}: no launcher allocation was poisoned"
    assert plain.keys() == poisoned.keys()
    for key in plain:
        assert _same(poisoned[key], plain[key]), f"{name} {key}: differs under poisoned allocations:\n{poisoned[key]}"


@launcher
def _half_written(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A broken launcher: its outputs' second halves are never written."""
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    idx = x.new_empty((4,), dtype=torch.int32)
    like = torch.empty_like(x)
    out[: x.shape[0] // 2] = x[: x.shape[0] // 2]
    idx[:2] = 7
    like[:1] = 0
    return out, idx, like


def test_an_unwritten_element_is_caught_and_the_switch_closes():
    saved = torch.empty, torch.empty_like, torch.Tensor.new_empty
    x = torch.arange(6, dtype=torch.float32)
    with api.poisoned_allocations():
        out, idx, like = _half_written(x)
        outside = torch.zeros(3)  # not a launcher's allocation: untouched
    assert torch.equal(out[:3], x[:3]) and out[3:].isnan().all()
    assert idx[:2].tolist() == [7, 7] and idx[2:].tolist() == [torch.iinfo(torch.int32).min] * 2
    assert like[1:].isnan().all()
    assert torch.equal(outside, torch.zeros(3))
    # closed: the allocators are torch's own again, and a launcher's buffers are not filled
    assert (torch.empty, torch.empty_like, torch.Tensor.new_empty) == saved
