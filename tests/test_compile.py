"""torch.compile(fullgraph=True): every snnorm layer traces without a graph break.

The oracle is the same network run eagerly (built twice from one seed): outputs,
parameter gradients, running statistics and neuron memories must agree. The big
networks compile with ``backend="aot_eager"`` (dynamo + AOTAutograd, the part that graph
breaks and custom-op tracing concern; inductor's C++ compile of a big CPU graph would
dominate CI time); one small network goes through inductor. On the triton backend the
kernels run under the Triton interpreter on CPU, so there the custom ops are traced by
their fake kernels and executed for real by aot_eager.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from devices import DEVICE, slow_on_cpu
from tolerances import COMPILED_BUFFERS_FP32, COMPILED_FP32

from snnorm import functional, layer, memopt, neuron

T = 2


def build_net(backend: str = "torch") -> nn.Module:
    """Every snnorm layer in step mode 'm' (input [T, 3, 2, 6, 6])."""
    torch.manual_seed(0)
    net = nn.Sequential(
        layer.Conv2d(2, 4, 3, padding=1, step_mode="m"),
        layer.BatchNorm2d(4, step_mode="m"),
        neuron.LIFNode(step_mode="m", backend=backend),
        layer.WSConv2d(4, 4, 3, padding=1, step_mode="m"),
        layer.ThresholdDependentBatchNorm2d(1.0, 1.0, 4),
        neuron.MPBNLIFNode(out_channels=4, step_mode="m", backend=backend),
        layer.Conv2d(4, 4, 3, padding=1, step_mode="m"),
        layer.TemporalEffectiveBatchNorm2d(T, 4, ),
        neuron.LIFNode(step_mode="m", backend=backend, v_reset=None),
        layer.NeuNorm(4, 6, 6, step_mode="m"),
        layer.Conv2d(4, 4, 3, padding=1, step_mode="m"),
        layer.BatchNormThroughTime2d(T, 4, step_mode="m"),
        neuron.LIFNode(step_mode="m", backend=backend),
        layer.MaxPool2d(2, step_mode="m"),
        layer.Conv2d(4, 4, 3, padding=1, step_mode="m"),
        layer.GroupNorm(2, 4, step_mode="m"),
        neuron.MPBNLIFNode(out_channels=4, step_mode="m", backend=backend, carry="raw"),
        layer.AvgPool2d(3, step_mode="m"),
        layer.Flatten(step_mode="m"),
        layer.Dropout(0.5, step_mode="m"),
        layer.WSLinear(4, 6, step_mode="m"),
        layer.BatchNorm1d(6, step_mode="m"),
        neuron.MPBNLIFNode(out_features=6, step_mode="m", backend=backend),
        layer.Linear(6, 5, step_mode="m"),
        layer.TemporalAccumulatedBatchNorm1d(T, 5),
    )
    if backend != "torch":
        kernel_layers = (layer.TemporalEffectiveBatchNorm2d, layer.TemporalAccumulatedBatchNorm1d)
        functional.set_backend(net, backend, instance=(neuron.BaseNode, *kernel_layers))
    with torch.no_grad():
        net[7].scale.copy_(torch.tensor([0.7, 1.4]))
    net[19].eval()  # dropout masks are random: compared in eval only
    return net


def _input(seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(T, 3, 2, 6, 6, generator=g) * 2


def _memories(net: nn.Module) -> list:
    return [v for m in net.modules() if hasattr(m, "named_memories") for _, v in m.named_memories()]


def _compare(eager: nn.Module, compiled_fn, net: nn.Module, x: torch.Tensor, train: bool, steps: int = 2) -> None:
    for _ in range(steps):
        functional.reset_net(eager), functional.reset_net(net)
        ye = eager(x)
        yc = compiled_fn(x)
        assert ye.abs().sum() > 0
        torch.testing.assert_close(yc, ye, **COMPILED_FP32)
        if train:
            ye.square().sum().backward()
            yc.square().sum().backward()
            for (name, a), b in zip(eager.named_parameters(), net.parameters()):
                assert (a.grad is None) == (b.grad is None), name
                if a.grad is not None:
                    torch.testing.assert_close(b.grad, a.grad, **COMPILED_FP32, msg=name)
        for (name, a), b in zip(eager.named_buffers(), net.buffers()):
            torch.testing.assert_close(b, a, **COMPILED_BUFFERS_FP32, msg=name)
        for a, b in zip(_memories(eager), _memories(net)):
            if isinstance(a, torch.Tensor):
                torch.testing.assert_close(b, a, **COMPILED_FP32)
            else:
                assert a == b


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@slow_on_cpu  # the full compile grid: ~35 s per backend on 2 CPU cores
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_every_layer_compiles_fullgraph_train_and_eval(backend):
    # the triton backend runs on tests/devices.py's DEVICE (CUDA when present)
    device = DEVICE if backend == "triton" else torch.device("cpu")
    eager, net = build_net(backend).to(device), build_net(backend).to(device)
    compiled = torch.compile(net, fullgraph=True, backend="aot_eager")
    x = _input().to(device)
    _compare(eager, compiled, net, x, train=True)
    assert int(net[1].num_batches_tracked) == 2  # running statistics moved once per call
    eager.eval(), net.eval()
    _compare(eager, compiled, net, _input(2).to(device), train=False, steps=1)


def test_folded_mpbn_compiles_fullgraph():
    def build():
        torch.manual_seed(3)
        net = nn.Sequential(
            layer.Conv2d(2, 4, 3, padding=1, step_mode="m"),
            neuron.MPBNLIFNode(out_channels=4, step_mode="m", v_reset=None),
            layer.Flatten(step_mode="m"),
            layer.Linear(4 * 36, 3, step_mode="m"),
        )
        functional.reset_net(net)
        net(_input(4))  # training step: non-trivial running statistics
        with torch.no_grad():
            net[1].vbn.weight.uniform_(-1.5, 1.5)  # negative γ flips the comparison
        net.eval()
        net[1].re_parameterize_v_threshold(normalize_residual=True)
        return net

    eager, net = build(), build()
    assert net[1].fold_bn
    compiled = torch.compile(net, fullgraph=True, backend="aot_eager")
    _compare(eager, compiled, net, _input(5), train=False)


@pytest.mark.slow  # inductor generates and builds C++: ~10–30 s
def test_small_network_through_inductor():
    def build():
        torch.manual_seed(5)
        return nn.Sequential(
            layer.Conv2d(2, 4, 3, padding=1, step_mode="m"),
            layer.TemporalEffectiveBatchNorm2d(T, 4),
            neuron.MPBNLIFNode(out_channels=4, step_mode="m"),
            layer.Flatten(step_mode="m"),
            layer.Linear(4 * 36, 3, step_mode="m"),
        )

    eager, net = build(), build()
    compiled = torch.compile(net, fullgraph=True)
    _compare(eager, compiled, net, _input(6), train=True, steps=1)


def test_checkpoint_guards_trace_without_graph_break():
    bn = layer.BatchNorm2d(3)

    def guarded(x):
        # the queries a BN-like layer makes before touching running statistics
        if memopt.should_update_running_stats(bn) and not memopt.in_recomputation():
            return x + 1
        return x - 1

    x = torch.zeros(2)
    compiled = torch.compile(guarded, fullgraph=True, backend="eager")
    assert torch.equal(compiled(x), x + 1)
    bn.eval()
    assert torch.equal(compiled(x), x - 1)  # recompiled on the training flag, still one graph
