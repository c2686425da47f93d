"""snnorm.convert_spikingjelly takes over a network built from spikingjelly 2.0.0's modules:
the same tensors, names and keys, the same outputs, gradients and running statistics as the
spikingjelly network (float64), a warning for what stays, and nothing twice."""

from __future__ import annotations

import copy
import subprocess
import sys
import types
import warnings

import pytest
import torch
import torch.nn as nn

sj_layer = pytest.importorskip("spikingjelly.activation_based.layer", reason="spikingjelly 2.0.0 is the oracle")
from spikingjelly.activation_based import functional as sj_functional  # noqa: E402
from spikingjelly.activation_based import neuron as sj_neuron  # noqa: E402
from spikingjelly.activation_based import surrogate as sj_surrogate  # noqa: E402

import snnorm  # noqa: E402
from snnorm import functional, layer, neuron, surrogate  # noqa: E402

T = 3


def every_module_network() -> nn.Sequential:
    """One of each spikingjelly module snnorm takes over, in spikingjelly's idioms."""
    L, N = sj_layer, sj_neuron
    torch.manual_seed(0)
    return nn.Sequential(
        L.Conv2d(2, 4, 3, padding=1, step_mode="m"),
        L.BatchNorm2d(4, step_mode="m"),
        N.LIFNode(step_mode="m", surrogate_function=sj_surrogate.ATan(alpha=3.0), detach_reset=True),
        L.Conv2d(4, 4, 3, padding=1, step_mode="m"),
        L.ThresholdDependentBatchNorm2d(alpha=1.0, v_th=0.5, num_features=4),
        N.LIFNode(tau=3.0, v_threshold=0.5, decay_input=False, step_mode="m"),
        L.NeuNorm(4, 6, 6, k=0.8, step_mode="m"),
        L.Conv2d(4, 4, 3, padding=1, step_mode="m"),
        L.TemporalEffectiveBatchNorm2d(T, num_features=4),
        N.MPBNLIFNode(out_channels=4, step_mode="m"),
        L.Conv2d(4, 4, 3, padding=1, step_mode="m"),
        L.BatchNormThroughTime2d(T, 4, step_mode="m"),
        N.IFNode(v_reset=None, step_mode="m"),
        L.SeqToANNContainer(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)),
        N.LIFNode(step_mode="m"),
        L.GroupNorm(2, 4, step_mode="m"),
        L.WSConv2d(4, 4, 3, padding=1, step_mode="m"),
        L.MaxPool2d(2, step_mode="m"),
        L.Flatten(step_mode="m"),
        L.Linear(36, 8, step_mode="m"),
        L.BatchNorm1d(8, step_mode="m"),
        N.MPBNLIFNode(out_features=8, step_mode="m", v_reset=None),
        L.MultiStepContainer(L.Linear(8, 5)),
    ).double()


def converted_pair(build):
    original = build()
    twin = copy.deepcopy(original)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every module of these networks is taken over
        assert snnorm.convert_spikingjelly(twin) is twin
    return original, twin


def run_and_compare(original, twin, x, steps=2):
    """Two training steps and an eval pass: outputs, ∂x, parameter gradients, state_dict."""
    for step in range(steps):
        outs = []
        for net, fn in ((original, sj_functional), (twin, functional)):
            xi = x.clone().requires_grad_(True)
            y = net(xi)
            (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)).sum().backward()
            outs.append((y.detach(), xi.grad, {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}))
            fn.reset_net(net)
        (ya, ga, pa), (yb, gb, pb) = outs
        torch.testing.assert_close(yb, ya, rtol=1e-12, atol=1e-12, msg=f"output, step {step}")
        torch.testing.assert_close(gb, ga, rtol=1e-10, atol=1e-12, msg=f"input gradient, step {step}")
        assert pa.keys() == pb.keys()
        for name in pa:
            torch.testing.assert_close(pb[name], pa[name], rtol=1e-10, atol=1e-12, msg=f"grad of {name}, step {step}")
        for net in (original, twin):
            net.zero_grad()
    sa, sb = original.state_dict(), twin.state_dict()
    assert list(sa) == list(sb)
    for key in sa:
        torch.testing.assert_close(sb[key], sa[key], rtol=1e-12, atol=1e-12, msg=key)
    original.eval(), twin.eval()
    with torch.no_grad():
        torch.testing.assert_close(twin(x), original(x), rtol=1e-12, atol=1e-12)
    sj_functional.reset_net(original), functional.reset_net(twin)


def test_every_module_is_taken_over_with_its_tensors_and_names():
    net = every_module_network()
    names = [n for n, _ in net.named_parameters()]
    buffers = [n for n, _ in net.named_buffers()]
    keys = list(net.state_dict())
    tensors = [id(t) for t in (*net.parameters(), *net.buffers())]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        snnorm.convert_spikingjelly(net)
    left = [f"{name}: {type(m).__qualname__}" for name, m in net.named_modules() if type(m).__module__.startswith("spikingjelly")]
    assert not left
    assert [n for n, _ in net.named_parameters()] == names
    assert [n for n, _ in net.named_buffers() if not n.endswith(("mu", "sigma2"))] == [b for b in buffers if not b.endswith(("mu", "sigma2"))]
    assert list(net.state_dict()) == keys
    assert [id(t) for t in (*net.parameters(), *net.buffers())][: len(names)] == tensors[: len(names)]
    # options and step mode travel
    assert isinstance(net[2], neuron.LIFNode) and isinstance(net[2].surrogate_function, surrogate.ATan)
    assert net[2].surrogate_function.alpha == 3.0 and net[2].detach_reset
    assert net[5].tau == 3.0 and net[5].v_threshold == 0.5 and not net[5].decay_input
    assert net[12].v_reset is None and net[0].step_mode == "m"
    assert isinstance(net[9], neuron.MPBNLIFNode) and isinstance(net[11], layer.BatchNormThroughTime2d)
    assert isinstance(net[6], layer.NeuNorm) and net[6].k0 == pytest.approx(0.8)
    assert isinstance(net[13], layer.SeqToANNContainer) and type(net[13][1]) is nn.BatchNorm2d


def test_converted_network_computes_what_spikingjelly_computes():
    original, twin = converted_pair(every_module_network)
    torch.manual_seed(2)
    run_and_compare(original, twin, torch.randn(T, 2, 2, 6, 6, dtype=torch.float64) * 2)


def test_an_optimizer_built_before_the_call_still_trains_the_network():
    net = every_module_network()
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    snnorm.convert_spikingjelly(net)
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    net(torch.randn(T, 2, 2, 6, 6, dtype=torch.float64)).sum().backward()
    opt.step()
    moved = [n for n, p in net.named_parameters() if not torch.equal(p, before[n])]
    assert "1.weight" in moved and "19.weight" in moved


def test_what_cannot_be_taken_over_stays_with_one_warning_naming_it():
    net = nn.Sequential(
        sj_layer.Linear(4, 4, step_mode="m"),
        sj_neuron.LIFNode(step_mode="m", surrogate_function=sj_surrogate.Erf()),
        sj_neuron.LIFNode(step_mode="m", surrogate_function=sj_surrogate.Erf()),
        sj_layer.VotingLayer(2, step_mode="m"),
    )
    with pytest.warns(UserWarning) as record:
        snnorm.convert_spikingjelly(net)
    assert len(record) == 1
    message = str(record[0].message)
    assert "LIFNode: its surrogate function Erf has no snnorm counterpart" in message
    assert "VotingLayer: snnorm has no counterpart" in message
    assert isinstance(net[0], layer.Linear)
    assert type(net[1]) is sj_neuron.LIFNode and type(net[3]).__module__.startswith("spikingjelly")


def test_a_folded_or_learnable_threshold_mpbn_stays():
    node = sj_neuron.MPBNLIFNode(out_channels=4, step_mode="m", learnable_vth=True)
    net = nn.Sequential(node)
    with pytest.warns(UserWarning, match="learnable_vth"):
        snnorm.convert_spikingjelly(net)
    assert net[0] is node


def test_calling_it_twice_changes_nothing():
    net = every_module_network()
    snnorm.convert_spikingjelly(net)
    modules = [id(m) for m in net.modules()]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        snnorm.convert_spikingjelly(net)
    assert [id(m) for m in net.modules()] == modules


def test_bad_argument_is_refused():
    with pytest.raises(TypeError, match="expects an nn.Module, got dict"):
        snnorm.convert_spikingjelly({})


def test_snnorm_does_not_import_spikingjelly_unless_asked():
    code = (
        "import sys, torch, snnorm\n"
        "net = snnorm.convert_spikingjelly(torch.nn.Sequential(torch.nn.Linear(2, 2)))\n"
        "assert 'spikingjelly' not in sys.modules, 'imported'\n"
        "print('ok')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "ok", done.stderr


# -- spikingjelly's own model zoo ------------------------------------------------------------


@pytest.fixture(scope="module")
def zoo():
    """spikingjelly.activation_based.model imports torchvision only to download weights."""
    pytest.importorskip("h5py", reason="spikingjelly's model package imports h5py")
    if "torchvision" not in sys.modules:
        stub = types.ModuleType("torchvision._internally_replaced_utils")
        stub.load_state_dict_from_url = None
        sys.modules["torchvision"] = types.ModuleType("torchvision")
        sys.modules["torchvision._internally_replaced_utils"] = stub
    from spikingjelly.activation_based.model import sew_resnet, spikformer

    return types.SimpleNamespace(sew_resnet=sew_resnet, spikformer=spikformer)


@pytest.mark.slow  # ~15 s of float64 ResNet-18 on 2 cores
def test_sew_resnet18_from_the_zoo(zoo):
    def build():
        torch.manual_seed(0)
        net = zoo.sew_resnet.sew_resnet18(spiking_neuron=sj_neuron.LIFNode, cnf="ADD", num_classes=10).double()
        sj_functional.set_step_mode(net, "m")
        return net

    original, twin = converted_pair(build)
    assert sum(isinstance(m, neuron.LIFNode) for m in twin.modules()) == 20
    assert sum(isinstance(m, layer.BatchNorm2d) for m in twin.modules()) == 20
    torch.manual_seed(3)
    run_and_compare(original, twin, torch.randn(2, 2, 3, 16, 16, dtype=torch.float64), steps=1)


def test_spikformer_block_from_the_zoo(zoo):
    def build():
        torch.manual_seed(0)
        block = zoo.spikformer.SpikformerBlock(dim=16, num_heads=2).double()
        sj_functional.set_step_mode(block, "m")
        return block

    original = build()
    twin = copy.deepcopy(original)
    with pytest.warns(UserWarning, match="SpikingSelfAttention: snnorm has no counterpart"):
        snnorm.convert_spikingjelly(twin)
    assert sum(isinstance(m, neuron.LIFNode) for m in twin.modules()) == 5
    assert sum(isinstance(m, layer.SeqToANNContainer) for m in twin.modules()) == 4
    torch.manual_seed(4)
    run_and_compare(original, twin, torch.randn(2, 2, 16, 3, 3, dtype=torch.float64))
