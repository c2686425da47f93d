"""torch.autocast("cpu", dtype=torch.bfloat16) through every layer and neuron.

What each layer returns under autocast (documented here and asserted below):

* ``Conv1d/2d/3d``, ``Linear``, ``WSConv2d``, ``WSLinear``: bfloat16 (autocast runs
  convolutions and matmuls in bfloat16 whatever the input dtype).
* every other layer follows its input: float32 in → float32 out, bfloat16 in → bfloat16
  out (BN layers compute their statistics in float32 internally), except
* ``TemporalEffectiveBatchNorm*`` and ``NeuNorm`` on a bfloat16 input: float32, because
  their float32 parameter (TEBN's p[t], NeuNorm's w) multiplies the result (type
  promotion, exactly as spikingjelly; both backends agree).
* neurons return spikes (and keep ``v``) in their input's dtype, except with a tensor
  threshold (``learnable_vth``: exp(a), float32), which promotes them to float32.

Running statistics and parameters stay float32, and so do the gradients of parameters.
Values are compared with the float32 layer (the oracle) at a bfloat16 tolerance; spikes,
being discontinuous, by the share that flips.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from devices import DEVICE
from tolerances import AUTOCAST_BF16, AUTOCAST_BF16_GRAD, AUTOCAST_BUFFERS, AUTOCAST_GRAD_FLOOR, AUTOCAST_GRAD_REL, AUTOCAST_MAX_SPIKE_FLIPS
from tolerances import AUTOCAST_READOUT_WITHIN_SHARE

from snnorm import functional, layer, neuron

T = 2
BF16 = torch.bfloat16
F32 = torch.float32

# name: (constructor, input shape, output dtype for a float32 input, for a bfloat16 input)
LAYERS = {
    "Conv2d": (lambda: layer.Conv2d(4, 4, 3, padding=1, step_mode="m"), (T, 3, 4, 6, 6), BF16, BF16),
    "Conv1d": (lambda: layer.Conv1d(4, 4, 3, padding=1, step_mode="m"), (T, 3, 4, 7), BF16, BF16),
    "Linear": (lambda: layer.Linear(6, 5, step_mode="m"), (T, 3, 6), BF16, BF16),
    "WSConv2d": (lambda: layer.WSConv2d(4, 4, 3, padding=1, step_mode="m"), (T, 3, 4, 6, 6), BF16, BF16),
    "WSLinear": (lambda: layer.WSLinear(6, 5, step_mode="m"), (T, 3, 6), BF16, BF16),
    "BatchNorm1d": (lambda: layer.BatchNorm1d(4, step_mode="m"), (T, 3, 4), F32, BF16),
    "BatchNorm2d": (lambda: layer.BatchNorm2d(4, step_mode="m"), (T, 3, 4, 6, 6), F32, BF16),
    "BatchNorm3d": (lambda: layer.BatchNorm3d(4, step_mode="m"), (T, 3, 4, 3, 3, 3), F32, BF16),
    "BatchNorm2d_s": (lambda: layer.BatchNorm2d(4), (5, 4, 6, 6), F32, BF16),
    "tdBN": (lambda: layer.ThresholdDependentBatchNorm2d(1.0, 0.5, 4), (T, 3, 4, 6, 6), F32, BF16),
    "TEBN": (lambda: layer.TemporalEffectiveBatchNorm2d(T, 4), (T, 3, 4, 6, 6), F32, F32),
    "TEBN1d": (lambda: layer.TemporalEffectiveBatchNorm1d(T, 4), (T, 3, 4, 5), F32, F32),
    "BNTT": (lambda: layer.BatchNormThroughTime2d(T, 4, step_mode="m"), (T, 3, 4, 6, 6), F32, BF16),
    "BatchNormTT2d": (lambda: layer.BatchNormTT2d(4, T, step_mode="m"), (T, 3, 4, 6, 6), F32, BF16),
    "GroupNorm": (lambda: layer.GroupNorm(2, 4, step_mode="m"), (T, 3, 4, 6, 6), F32, BF16),
    "NeuNorm": (lambda: layer.NeuNorm(4, 6, 6, step_mode="m"), (T, 3, 4, 6, 6), F32, F32),
    "MaxPool2d": (lambda: layer.MaxPool2d(2, step_mode="m"), (T, 3, 4, 6, 6), F32, BF16),
    "AvgPool2d": (lambda: layer.AvgPool2d(2, step_mode="m"), (T, 3, 4, 6, 6), F32, BF16),
    "AdaptiveAvgPool2d": (lambda: layer.AdaptiveAvgPool2d(1, step_mode="m"), (T, 3, 4, 6, 6), F32, BF16),
    "Flatten": (lambda: layer.Flatten(step_mode="m"), (T, 3, 4, 6, 6), F32, BF16),
    "Dropout_eval": (lambda: layer.Dropout(0.5, step_mode="m").eval(), (T, 3, 4, 6, 6), F32, BF16),
}
NEURONS = {
    "LIFNode": (lambda b: neuron.LIFNode(step_mode="m", backend=b), (T, 3, 4, 6, 6)),
    "LIFNode_soft": (lambda b: neuron.LIFNode(step_mode="m", backend=b, v_reset=None, decay_input=False), (T, 3, 4, 6, 6)),
    "IFNode": (lambda b: neuron.IFNode(step_mode="m", backend=b), (T, 3, 4, 6, 6)),
    "MPBNLIFNode": (lambda b: neuron.MPBNLIFNode(out_channels=4, step_mode="m", backend=b), (T, 3, 4, 6, 6)),
    "MPBNLIFNode_1d": (lambda b: neuron.MPBNLIFNode(out_features=4, step_mode="m", backend=b), (T, 8, 4)),
    "MPBNLIFNode_raw": (
        lambda b: neuron.MPBNLIFNode(out_channels=4, step_mode="m", backend=b, carry="raw", learnable_vth=True),
        (T, 3, 4, 6, 6),
    ),
}
PROMOTES_TO_F32 = {"MPBNLIFNode_raw"}  # float32 threshold exp(a) enters the comparison

MAX_SPIKE_FLIPS = AUTOCAST_MAX_SPIKE_FLIPS
GRAD_REL = AUTOCAST_GRAD_REL


def _make(ctor, seed=0):
    torch.manual_seed(seed)
    return ctor()


def _input(shape, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g) * 1.5 + 0.2


def _run(module, x, autocast: bool):
    x = x.detach().requires_grad_()
    functional.reset_net(module)
    with torch.autocast(x.device.type, dtype=BF16, enabled=autocast):
        y = module(x)
    (y.float() * torch.linspace(-1, 1, y.numel(), device=y.device).view(y.shape)).sum().backward()
    return y, x.grad


def _check_grads(m_lp: nn.Module, m_ref: nn.Module) -> None:
    for (name, p), q in zip(m_lp.named_parameters(), m_ref.parameters()):
        assert p.dtype == F32 and p.grad is not None and p.grad.dtype == F32, name
        err = (p.grad - q.grad).norm().item()
        assert err <= GRAD_REL * q.grad.norm().item() + AUTOCAST_GRAD_FLOOR, f"{name}: grad error {err:.3e} vs norm {q.grad.norm():.3e}"


def _check_buffers(m_lp: nn.Module, m_ref: nn.Module) -> None:
    for (name, b), r in zip(m_lp.named_buffers(), m_ref.buffers()):
        assert b.dtype == r.dtype, name  # running statistics stay float32 (counters int64)
        if b.is_floating_point():
            torch.testing.assert_close(b, r, **AUTOCAST_BUFFERS, msg=name)
        else:
            assert torch.equal(b, r), name


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("name", list(LAYERS))
def test_layer_under_autocast(name, mode):
    ctor, shape, dtype_f32_in, dtype_bf16_in = LAYERS[name]
    x = _input(shape)
    ref = _make(ctor)
    getattr(ref, mode)() if name != "Dropout_eval" else None
    y_ref, gx_ref = _run(ref, x, autocast=False)
    for in_dtype, expected in ((F32, dtype_f32_in), (BF16, dtype_bf16_in)):
        m = _make(ctor)
        getattr(m, mode)() if name != "Dropout_eval" else None
        y, gx = _run(m, x.to(in_dtype), autocast=True)
        assert y.dtype == expected, f"{name} ({in_dtype} in): returned {y.dtype}, expected {expected}"
        assert gx.dtype == in_dtype
        torch.testing.assert_close(y.float(), y_ref, **AUTOCAST_BF16)
        torch.testing.assert_close(gx.float(), gx_ref, **AUTOCAST_BF16)
        _check_grads(m, ref) if in_dtype == BF16 else None
        _check_buffers(m, ref)


def _spike_flips(a: torch.Tensor, b: torch.Tensor) -> float:
    assert set(a.unique().tolist()) <= {0.0, 1.0} and set(b.unique().tolist()) <= {0.0, 1.0}
    return (a.float() != b.float()).float().mean().item()


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("name", list(NEURONS))
def test_neuron_under_autocast_torch_backend(name, mode):
    ctor, shape = NEURONS[name]
    x = _input(shape)
    ref = _make(lambda: ctor("torch"))
    getattr(ref, mode)()
    y_ref, _ = _run(ref, x, autocast=False)
    assert 0 < y_ref.mean() < 1
    for in_dtype in (F32, BF16):
        m = _make(lambda: ctor("torch"))
        getattr(m, mode)()
        y, gx = _run(m, x.to(in_dtype), autocast=True)
        expected = F32 if name in PROMOTES_TO_F32 else in_dtype
        assert y.dtype == expected and m.v.dtype == expected and gx.dtype == in_dtype
        assert _spike_flips(y, y_ref) <= MAX_SPIKE_FLIPS
        _check_buffers(m, ref)
        for p in m.parameters():
            assert p.dtype == F32 and p.grad.dtype == F32


TRITON_CASES = {
    "LIFNode": NEURONS["LIFNode"],
    "MPBNLIFNode": NEURONS["MPBNLIFNode"],
    "TEBN": (lambda b: _with_backend(layer.TemporalEffectiveBatchNorm2d(T, 4), b), (T, 3, 4, 5, 5)),
}


def _with_backend(module, backend):
    module.backend = backend
    return module


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("name", list(TRITON_CASES))
def test_triton_backend_under_autocast(name, mode):
    """bfloat16 input under autocast on the fused kernels (interpreter on CPU): same dtype
    as the torch backend, values within bfloat16 tolerance of it and of float32. On DEVICE:
    CUDA autocast on a GPU, CPU autocast through the interpreter otherwise."""
    ctor, shape = TRITON_CASES[name]
    x = _input(shape, seed=3).to(DEVICE)
    results = {}
    for backend in ("torch", "triton"):
        m = _make(lambda: ctor(backend)).to(DEVICE)
        getattr(m, mode)()
        y, gx = _run(m, x.to(BF16), autocast=True)
        results[backend] = (m, y, gx)
    ref = _make(lambda: ctor("torch")).to(DEVICE)
    getattr(ref, mode)()
    y_ref, gx_ref = _run(ref, x, autocast=False)
    (m_t, y_t, gx_t), (m_k, y_k, gx_k) = results["torch"], results["triton"]
    assert y_k.dtype == y_t.dtype and gx_k.dtype == BF16
    if name == "TEBN":
        torch.testing.assert_close(y_k.float(), y_ref, **AUTOCAST_BF16)
        torch.testing.assert_close(y_k.float(), y_t.float(), **AUTOCAST_BF16)
    else:
        assert _spike_flips(y_k, y_t) <= MAX_SPIKE_FLIPS and _spike_flips(y_k, y_ref) <= MAX_SPIKE_FLIPS
    torch.testing.assert_close(gx_k.float(), gx_ref, **AUTOCAST_BF16_GRAD)
    _check_buffers(m_k, ref)
    _check_grads(m_k, ref)


def test_network_under_autocast():
    def build():
        torch.manual_seed(7)
        return nn.Sequential(
            layer.Conv2d(2, 4, 3, padding=1, step_mode="m"),
            layer.TemporalEffectiveBatchNorm2d(T, 4),
            neuron.MPBNLIFNode(out_channels=4, step_mode="m"),
            layer.Conv2d(4, 4, 3, padding=1, step_mode="m"),
            layer.BatchNormThroughTime2d(T, 4, step_mode="m"),
            neuron.LIFNode(step_mode="m"),
            layer.Flatten(step_mode="m"),
            layer.Linear(4 * 36, 3, step_mode="m"),
        )

    def record_spikes(net):
        spikes = []
        for m in net:
            if isinstance(m, neuron.BaseNode):
                m.register_forward_hook(lambda mod, inp, out: spikes.append(out.detach()))
        return spikes

    x = _input((T, 4, 2, 6, 6), seed=9)
    ref, net = build(), build()
    spikes_ref, spikes = record_spikes(ref), record_spikes(net)
    y_ref, _ = _run(ref, x, autocast=False)
    y, _ = _run(net, x, autocast=True)
    assert y.dtype == BF16
    # MPBN sees TEBN's float32 (p[t] promotes), LIF sees BNTT's bfloat16 (conv → BN keeps it)
    assert [s.dtype for s in spikes] == [F32, BF16]
    assert all(b.dtype in (F32, torch.int64) for b in net.buffers())
    assert all(p.grad.dtype == F32 for p in net.parameters())
    for a, b in zip(spikes, spikes_ref):
        assert _spike_flips(a, b) <= MAX_SPIKE_FLIPS
    # a flipped spike moves a readout row; most of the readout stays within bfloat16 error
    assert ((y.float() - y_ref).abs() <= AUTOCAST_BF16["atol"]).float().mean() >= AUTOCAST_READOUT_WITHIN_SHARE
