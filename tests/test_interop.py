"""A whole network built with spikingjelly 2.0.0 and with snnorm: checkpoints load both
ways and the two compute the same thing (multi-step, train and eval).

One builder, two module namespaces: porting is the import line. spikingjelly is the
oracle; outputs, parameter gradients, running statistics and BNTT/MPBN state must agree.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from tolerances import INTEROP_GRAD_VS_SJ, INTEROP_VS_SJ

sj_layer = pytest.importorskip("spikingjelly.activation_based.layer", reason="spikingjelly 2.0.0 is the oracle")
from spikingjelly.activation_based import functional as sj_functional  # noqa: E402
from spikingjelly.activation_based import neuron as sj_neuron  # noqa: E402

from snnorm import functional, layer, neuron  # noqa: E402

T = 3


def build(L, N, seed: int) -> nn.Sequential:
    """Conv → BN → LIF → Conv → tdBN → LIF → NeuNorm → Conv → TEBN → MPBN-LIF → Conv →
    BNTT → LIF → Conv → GroupNorm → LIF → MaxPool → Flatten → Linear → BN1d → MPBN-LIF → Linear."""
    torch.manual_seed(seed)
    net = nn.Sequential(
        L.Conv2d(2, 4, 3, padding=1, step_mode="m"),
        L.BatchNorm2d(4, step_mode="m"),
        N.LIFNode(step_mode="m"),
        L.Conv2d(4, 4, 3, padding=1, step_mode="m"),
        L.ThresholdDependentBatchNorm2d(alpha=1.0, v_th=0.5, num_features=4),
        N.LIFNode(tau=3.0, v_threshold=0.5, step_mode="m"),
        L.NeuNorm(4, 6, 6, step_mode="m"),
        L.Conv2d(4, 4, 3, padding=1, step_mode="m"),
        L.TemporalEffectiveBatchNorm2d(T, num_features=4),
        N.MPBNLIFNode(out_channels=4, step_mode="m"),
        L.Conv2d(4, 4, 3, padding=1, step_mode="m"),
        L.BatchNormThroughTime2d(T, 4, step_mode="m"),
        N.LIFNode(v_reset=None, step_mode="m"),
        L.Conv2d(4, 4, 3, padding=1, step_mode="m"),
        L.GroupNorm(2, 4, step_mode="m"),
        N.LIFNode(decay_input=False, step_mode="m"),
        L.MaxPool2d(2, step_mode="m"),
        L.Flatten(step_mode="m"),
        L.Linear(36, 8, step_mode="m"),
        L.BatchNorm1d(8, step_mode="m"),
        N.MPBNLIFNode(out_features=8, v_threshold=0.5, step_mode="m"),
        L.Linear(8, 3, step_mode="m"),
    )
    with torch.no_grad():  # parameters away from their initial values (γ, β, p[t], θ)
        for m in net.modules():
            if isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.GroupNorm)) and m.weight is not None:
                m.weight.uniform_(0.5, 1.5)
                if m.bias is not None:
                    m.bias.uniform_(-0.3, 0.3)
        net[8].scale.uniform_(0.5, 1.5)
    return net


def _input(seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(T, 5, 2, 6, 6, generator=g) * 1.5


def _step(net: nn.Module, reset, x: torch.Tensor, train: bool):
    reset(net)
    net.train(train)
    net.zero_grad()
    x = x.detach().requires_grad_()
    y = net(x)
    if train:
        (y * torch.linspace(-1, 1, y.numel()).view(y.shape)).sum().backward()
    return y.detach(), x.grad


def _assert_same(sj: nn.Module, ours: nn.Module, x: torch.Tensor, train: bool) -> float:
    y_sj, gx_sj = _step(sj, sj_functional.reset_net, x, train)
    y, gx = _step(ours, functional.reset_net, x, train)
    assert y_sj.abs().sum() > 0
    torch.testing.assert_close(y, y_sj, **INTEROP_VS_SJ)
    worst = (y - y_sj).abs().max().item()
    if train:
        torch.testing.assert_close(gx, gx_sj, **INTEROP_GRAD_VS_SJ)
        for (name, p), q in zip(ours.named_parameters(), sj.parameters()):
            torch.testing.assert_close(p.grad, q.grad, **INTEROP_GRAD_VS_SJ, msg=name)
            worst = max(worst, (p.grad - q.grad).abs().max().item())
    sd, sd_sj = ours.state_dict(), sj.state_dict()
    assert sd.keys() == sd_sj.keys()
    for k in sd:
        torch.testing.assert_close(sd[k], sd_sj[k], **INTEROP_VS_SJ, msg=k)
    # memories after the sequence: BNTT's timestep counter, the neurons' membranes
    assert ours[11].t == sj[11].t == T - 1
    for i in (2, 9, 12, 20):
        torch.testing.assert_close(ours[i].v, sj[i].v, **INTEROP_VS_SJ)
    return worst


def _nets_with_shared_state(direction: str):
    sj, ours = build(sj_layer, sj_neuron, seed=1), build(layer, neuron, seed=2)
    if direction == "sj->snnorm":
        ours.load_state_dict(sj.state_dict(), strict=True)
    else:
        sj.load_state_dict(ours.state_dict(), strict=True)
    return sj, ours


@pytest.mark.parametrize("direction", ["sj->snnorm", "snnorm->sj"])
def test_state_dicts_load_both_ways_and_networks_agree(direction):
    sj, ours = _nets_with_shared_state(direction)
    assert sj.state_dict().keys() == ours.state_dict().keys()
    # training: batch statistics, running statistics updated, two steps (state evolves)
    for seed in (10, 11):
        _assert_same(sj, ours, _input(seed), train=True)
    # eval: running statistics
    _assert_same(sj, ours, _input(12), train=False)


def test_checkpoint_after_training_round_trips():
    """Train snnorm's net, save, load into spikingjelly's, and both evaluate alike (and back)."""
    ours = build(layer, neuron, seed=3)
    opt = torch.optim.SGD(ours.parameters(), lr=0.1)
    for seed in (20, 21):
        _step(ours, functional.reset_net, _input(seed), train=True)
        opt.step()
    sj = build(sj_layer, sj_neuron, seed=4)
    sj.load_state_dict(ours.state_dict())
    _assert_same(sj, ours, _input(22), train=False)
    back = build(layer, neuron, seed=5)
    back.load_state_dict(sj.state_dict())
    _assert_same(sj, back, _input(23), train=False)
