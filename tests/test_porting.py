"""Taking over a network built from spikingjelly 2.0.0's modules.

``snnorm.convert_spikingjelly`` keeps the tensors, names and keys and computes what the
spikingjelly network computes (float64: outputs, gradients, running statistics), warns
once for what stays and does nothing twice. Then ``fuse_norm_neurons`` pairs every norm
with its neuron, torch BNs inside ``SeqToANNContainer`` included, says what stays apart,
and on the triton backend the fused network still equals spikingjelly's."""

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
from devices import DEVICE  # noqa: E402
from snnorm import functional, layer, neuron, surrogate  # noqa: E402
from snnorm.fusion import fused_block  # noqa: E402

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


def converted_pair(build, fuse_with=None, stays=None):
    """(spikingjelly's network, a converted copy); with ``fuse_with`` (an example input) the copy
    is also fused, every pair, and runs on the triton backend. ``stays``: the warning that names
    what conversion leaves (else every module must be taken over)."""
    original = build().to(DEVICE)
    twin = copy.deepcopy(original)
    if stays is None:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert snnorm.convert_spikingjelly(twin) is twin
    else:
        with pytest.warns(UserWarning, match=stays):
            assert snnorm.convert_spikingjelly(twin) is twin
    if fuse_with is not None:
        report = functional.fusion_report(twin, fuse_with)
        assert not report.apart and report.fused, str(report)
        functional.fuse_norm_neurons(twin, fuse_with)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # convs and pools keep torch: said, and known
            functional.set_backend(twin, "triton")
        blocks = [fused_block(twin.get_submodule(norm)) for norm, _ in report.fused]
        assert all(b is not None and b.fused_kernel_applies() for b in blocks)
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


# -- fusing the converted network ------------------------------------------------------------


class SpikformerStyleBlock(nn.Module):
    """Spikformer's idioms: Conv1d(k=1) + BatchNorm1d in a SeqToANNContainer on [T, N, D, L]
    before each LIF, an attention that branches on ``x.ndim`` (fx cannot trace it), an MLP."""

    def __init__(self, dim=4, hidden=8):
        super().__init__()
        L, N = sj_layer, sj_neuron

        def conv_bn(i, o):
            return L.SeqToANNContainer(nn.Conv1d(i, o, 1, bias=False), nn.BatchNorm1d(o))

        self.q, self.q_lif = conv_bn(dim, dim), N.LIFNode(step_mode="m", detach_reset=True)
        self.k, self.k_lif = conv_bn(dim, dim), N.LIFNode(step_mode="m", detach_reset=True)
        self.proj, self.proj_lif = conv_bn(dim, dim), N.LIFNode(step_mode="m", v_threshold=0.5)
        self.fc1, self.fc1_lif = conv_bn(dim, hidden), N.LIFNode(step_mode="m")
        self.fc2, self.fc2_lif = conv_bn(hidden, dim), N.LIFNode(step_mode="m")

    def forward(self, x):
        if x.ndim != 4:
            raise ValueError(f"expected [T, N, D, L], got {tuple(x.shape)}")
        q, k = self.q_lif(self.q(x)), self.k_lif(self.k(x))
        x = x + self.proj_lif(self.proj(q * k.mean(dim=3, keepdim=True)))
        return x + self.fc2_lif(self.fc2(self.fc1_lif(self.fc1(x))))


class ResidualBlock(nn.Module):
    """spikingjelly's convnet idiom: SeqToANNContainer(Conv2d, BatchNorm2d) → LIF, twice, plus a shortcut."""

    def __init__(self, c=4):
        super().__init__()
        L, N = sj_layer, sj_neuron
        self.conv1 = L.SeqToANNContainer(nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c))
        self.sn1 = N.LIFNode(step_mode="m", surrogate_function=sj_surrogate.ATan())
        self.conv2 = nn.Sequential(L.Conv2d(c, c, 3, padding=1, bias=False, step_mode="m"),
                                   L.BatchNorm2d(c, step_mode="m"))
        self.sn2 = N.IFNode(step_mode="m", v_reset=None)

    def forward(self, x):
        return self.sn2(self.conv2(self.sn1(self.conv1(x)))) + x


def test_a_torch_bn_in_a_container_fuses_and_equals_spikingjelly_on_triton():
    torch.manual_seed(5)
    x = (torch.randn(T, 2, 4, 5, 5, dtype=torch.float64) + 0.3).to(DEVICE)
    original, twin = converted_pair(lambda: ResidualBlock().double(), fuse_with=x)
    assert [(n, m) for n, m in functional.fusion_report(twin).fused] == [("conv1", "sn1"), ("conv2.1", "sn2")]
    assert type(twin.conv1[1]) is nn.BatchNorm2d  # torch's BN stays torch's, keys and all
    run_and_compare(original, twin, x)


@pytest.mark.slow  # ~12 s through the interpreter; its torch twin stays in the default run
def test_a_spikformer_style_block_fuses_by_a_run_and_equals_spikingjelly_on_triton():
    torch.manual_seed(6)
    x = (torch.randn(2, 2, 4, 5, dtype=torch.float64) + 0.5).to(DEVICE)
    build = lambda: SpikformerStyleBlock().double()  # noqa: E731
    net = build()
    snnorm.convert_spikingjelly(net)
    report = functional.fusion_report(net)  # fx cannot trace it: said, and nothing fused
    assert report.fused == [] and [name for name, _ in report.unread] == ["(the network)"]
    assert "pass example_input=" in report.unread[0][1]
    original, twin = converted_pair(build, fuse_with=x)
    assert len(functional.fusion_report(twin, x).fused) == 5
    run_and_compare(original, twin, x)


class _Shared(nn.Module):
    """A norm whose output is also added, a norm → neuron called twice, and a kept v_seq."""

    def __init__(self):
        super().__init__()
        self.bn_a, self.sn_a = layer.BatchNorm1d(3, step_mode="m"), neuron.LIFNode(step_mode="m")
        self.bn_b, self.sn_b = layer.BatchNorm1d(3, step_mode="m"), neuron.LIFNode(step_mode="m")
        self.bn_c, self.sn_c = layer.BatchNorm1d(3, step_mode="m"), neuron.LIFNode(step_mode="m", store_v_seq=True)
        self.bn_d, self.sn_d = layer.BatchNorm1d(3, step_mode="m"), neuron.LIFNode(step_mode="m")

    def forward(self, x):
        y = self.bn_a(x)
        x = self.sn_a(y) + y
        x = self.sn_b(self.bn_b(self.sn_b(self.bn_b(x))))
        return self.sn_d(self.bn_d(self.sn_c(self.bn_c(x))))


@pytest.mark.parametrize("by_run", [False, True], ids=["fx", "run"])
def test_the_report_says_what_fused_and_why_the_rest_stayed_apart(by_run):
    net = _Shared()
    example = torch.randn(T, 2, 3) if by_run else None
    report = functional.fusion_report(net, example)
    assert report.fused == [("bn_d", "sn_d")] and report.unread == []
    apart = {norm: why for norm, _, why in report.apart}
    assert apart == {
        "bn_a": "the norm's output has other users",
        "bn_b": "a module of the pair is called at several places",
        "bn_c": "store_v_seq=True keeps every step's membrane, which the fused kernel does not write",
    }
    with pytest.warns(UserWarning) as record:
        functional.fuse_norm_neurons(net, example)
    message = str(record[0].message)
    assert "1 norm → neuron pair(s) fused" in message and "left apart: bn_a → sn_a" in message
    assert fused_block(net.bn_d) is not None and fused_block(net.bn_a) is None
    assert functional.fusion_report(net, example).fused == [("bn_d", "sn_d")]  # fused already: still listed


class _Aliased(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn, self.sn = layer.BatchNorm1d(3, step_mode="m"), neuron.LIFNode(step_mode="m")
        self.alias = self.bn  # the same module at a second path (its forward never calls it)

    def forward(self, x):
        return self.sn(self.bn(x))


def test_a_module_registered_twice_stays_apart():
    report = functional.fusion_report(_Aliased())
    assert report.fused == [] and "registered at several places" in report.apart[0][2]


def test_a_container_bn_checks_its_input_before_any_state_moves():
    net = nn.Sequential(layer.SeqToANNContainer(nn.Linear(4, 3), nn.BatchNorm1d(3)), neuron.LIFNode(step_mode="m"))
    functional.fuse_norm_neurons(net)
    functional.set_backend(net, "triton")
    assert fused_block(net[0]).fused_kernel_applies()
    with pytest.raises(ValueError, match="more than one value per channel"):
        net(torch.randn(1, 1, 4))  # one value per channel: batch statistics are undefined
    with pytest.raises(ValueError, match=r"expected x with shape \[T, N, C\] \(3-D\) or \[T, N, C, L\] \(4-D\), "
                                         r"but got x with shape \(4, 2, 2, 2, 3\)"):
        net(torch.randn(4, 2, 2, 2, 4))  # [T, N, 2, 2, 3] after the Linear: no BatchNorm1d layout
    net[0][1].eps = 0.0  # the checks of a multi-step BN: ε = 0 with batch statistics
    with pytest.raises(ValueError, match="eps must be > 0"):
        net(torch.randn(4, 2, 4))
    net[0][1].eps = 1e-5
    assert int(net[0][1].num_batches_tracked) == 0 and isinstance(net[1].v, float)


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


@pytest.mark.slow  # float64 ResNet-18: 20 fused pairs, about a minute under the interpreter
def test_sew_resnet18_from_the_zoo_converted_and_fused(zoo):
    """The whole zoo network: every pair fuses, keys stay, and on triton (eval: the fused
    kernels on running statistics) it equals spikingjelly's. Training through the same
    zoo blocks on triton: the next test, at a width the interpreter affords."""

    def build():
        torch.manual_seed(0)
        net = zoo.sew_resnet.sew_resnet18(spiking_neuron=sj_neuron.LIFNode, cnf="ADD", num_classes=10).double()
        sj_functional.set_step_mode(net, "m")
        for m in net.modules():  # running statistics away from their initial values
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2), m.running_var.uniform_(0.5, 2.0)
        return net.eval()

    torch.manual_seed(3)
    x = torch.randn(2, 2, 3, 8, 8, dtype=torch.float64).to(DEVICE)
    keys = list(build().state_dict())
    original, twin = converted_pair(build, fuse_with=x)
    assert len(functional.fusion_report(twin).fused) == 20  # every conv → BN → LIF of the network
    assert sum(isinstance(m, layer.BatchNorm2d) for m in twin.modules()) == 20
    assert list(twin.state_dict()) == keys
    with torch.no_grad():
        torch.testing.assert_close(twin(x), original(x), rtol=1e-12, atol=1e-12)


@pytest.mark.slow  # ~11 s: the default run trains the residual and Spikformer-style blocks above
def test_sew_resnet_blocks_from_the_zoo_train_fused_on_triton(zoo):
    """The zoo's own SEW BasicBlocks (an identity one and a downsampling one) at width 4/8."""

    def build():
        torch.manual_seed(0)
        L, N = sj_layer, sj_neuron
        neuron_kw = dict(spiking_neuron=N.LIFNode, cnf="ADD")
        down = nn.Sequential(L.Conv2d(4, 8, 1, stride=2, bias=False), L.BatchNorm2d(8), N.LIFNode())
        net = nn.Sequential(
            L.Conv2d(3, 4, 3, padding=1, bias=False), L.BatchNorm2d(4), N.LIFNode(),
            zoo.sew_resnet.BasicBlock(4, 4, **neuron_kw),
            zoo.sew_resnet.BasicBlock(4, 8, stride=2, downsample=down, **neuron_kw),
        ).double()
        sj_functional.set_step_mode(net, "m")
        return net

    torch.manual_seed(7)
    x = (torch.randn(T, 2, 3, 6, 6, dtype=torch.float64) + 0.4).to(DEVICE)
    original, twin = converted_pair(build, fuse_with=x)
    assert len(functional.fusion_report(twin).fused) == 6
    run_and_compare(original, twin, x)


@pytest.mark.slow  # ~20 s: the default run has the Spikformer-style block above
def test_spikformer_block_from_the_zoo_converted_and_fused(zoo):
    def build():
        torch.manual_seed(0)
        block = zoo.spikformer.SpikformerBlock(dim=16, num_heads=2).double()
        sj_functional.set_step_mode(block, "m")
        return block

    torch.manual_seed(4)
    x = torch.randn(2, 2, 16, 3, 3, dtype=torch.float64).to(DEVICE)
    keys = list(build().state_dict())
    original, twin = converted_pair(build, fuse_with=x, stays="SpikingSelfAttention: snnorm has no counterpart")
    assert sum(isinstance(m, neuron.LIFNode) for m in twin.modules()) == 5
    # qkv, proj, fc1, fc2: each SeqToANNContainer(Conv1d, BatchNorm1d) with the LIF after it
    assert [p for p, _ in functional.fusion_report(twin, x).fused] == [
        "attn.qkv_conv_bn", "attn.proj_conv_bn", "mlp.fc1", "mlp.fc2"]
    assert list(twin.state_dict()) == keys
    run_and_compare(original, twin, x)
