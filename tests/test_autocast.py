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
A layer or neuron that never touches bfloat16 (a float32 input it keeps in float32) must
equal the float32 module exactly. Where bfloat16 enters, layers are compared with the
float32 layer at a bfloat16 tolerance; neurons with the float64 neuron on the same
(rounded) input: every flipped spike at the threshold (helpers.assert_flips_placed), and
membrane and ∂x, on the units no flip reached, by the 2×-torch rule
(|got − ref64| ≤ 2·|torch_bf16 − ref64| + atol, tolerances.assert_close_to_reference).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from devices import DEVICE, SLOW_ON_CPU
from helpers import RecordingSurrogate, assert_flips_placed
from tolerances import AUTOCAST_BF16, AUTOCAST_BUFFERS, AUTOCAST_GRAD_FLOOR, AUTOCAST_GRAD_REL, AUTOCAST_MAX_SPIKE_FLIPS
from tolerances import AUTOCAST_NEURON_LOWP_ATOL, AUTOCAST_READOUT_WITHIN_SHARE, EXACT, assert_close_to_reference
from tolerances import comparable_entries

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
        if in_dtype == F32 and expected == F32:  # never touches bfloat16: the float32 layer, exactly
            _check_exact(name, m, ref, (y, gx), (y_ref, gx_ref))
            continue
        torch.testing.assert_close(y.float(), y_ref, **AUTOCAST_BF16)
        torch.testing.assert_close(gx.float(), gx_ref, **AUTOCAST_BF16)
        _check_grads(m, ref) if in_dtype == BF16 else None
        _check_buffers(m, ref)


def _check_exact(what, m, ref, got, want) -> None:
    """Outputs (and the membrane), ∂x, parameter gradients and buffers equal the float32 module's."""
    for i, (a, b) in enumerate(zip(got, want)):
        assert a.dtype == b.dtype, f"{what}: output {i} is {a.dtype}, float32 gives {b.dtype}"
        torch.testing.assert_close(a, b, **EXACT, msg=lambda msg: f"{what}: output {i}: {msg}")
    for (name, p), q in zip(m.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, **EXACT, msg=lambda msg: f"{what}: ∂{name}: {msg}")
    for (name, b), r in zip(m.named_buffers(), ref.buffers()):
        torch.testing.assert_close(b, r, **EXACT, msg=lambda msg: f"{what}: {name}: {msg}")


def _neuron_bf16_vs_fp64(what, ctor, mode, x_bf16, got, lowp) -> None:
    """A neuron on the bfloat16 input ``x_bf16`` (``got`` = (spikes, membrane, ∂x)) against the
    same neuron in float64 on the same values: flips placed at the threshold, then membrane and
    ∂x on the units no flip reached (in ``got`` or in ``lowp``, the torch backend's bfloat16
    run) by the 2×-torch rule."""
    ref = _make(lambda: ctor("torch")).to(x_bf16.device, torch.float64)
    getattr(ref, mode)()
    ref.surrogate_function = RecordingSurrogate(ref.surrogate_function)
    y64, gx64 = _run(ref, x_bf16.double(), autocast=False)
    z = ref.surrogate_function.firing_variable(y64)
    coupled = mode == "train" and "MPBN" in type(ref).__name__  # batch statistics couple a channel
    clean = assert_flips_placed(what, got[0], y64, z, BF16, channel_coupled=coupled)
    clean = clean & assert_flips_placed(f"{what} (torch bf16)", lowp[0], y64, z, BF16, channel_coupled=coupled)
    for i, (label, want) in enumerate((("membrane", ref.v.detach()), ("∂x", gx64))):
        mask = comparable_entries(want, clean, label)
        assert_close_to_reference(f"{what}: {label}", got[i + 1][mask], want[mask], lowp=lowp[i + 1][mask],
                                  lowp_atol=AUTOCAST_NEURON_LOWP_ATOL)


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
    y_ref, gx_ref = _run(ref, x, autocast=False)
    assert 0 < y_ref.mean() < 1
    v_ref = ref.v.detach()
    for in_dtype in (F32, BF16):
        m = _make(lambda: ctor("torch"))
        getattr(m, mode)()
        y, gx = _run(m, x.to(in_dtype), autocast=True)
        expected = F32 if name in PROMOTES_TO_F32 else in_dtype
        assert y.dtype == expected and m.v.dtype == expected and gx.dtype == in_dtype
        for p in m.parameters():
            assert p.dtype == F32 and p.grad.dtype == F32
        if in_dtype == F32:  # never touches bfloat16: the float32 neuron, exactly
            _check_exact(name, m, ref, (y, m.v.detach(), gx), (y_ref, v_ref, gx_ref))
            continue
        _check_buffers(m, ref)
        # the torch bfloat16 reference of the 2×-torch rule: the same neuron without autocast
        plain = _make(lambda: ctor("torch"))
        getattr(plain, mode)()
        y_lp, gx_lp = _run(plain, x.to(BF16), autocast=False)
        _neuron_bf16_vs_fp64(f"{name} {mode}", ctor, mode, x.to(BF16), (y, m.v.detach(), gx),
                             (y_lp, plain.v.detach(), gx_lp))


TRITON_CASES = {
    "LIFNode": NEURONS["LIFNode"],
    "MPBNLIFNode": NEURONS["MPBNLIFNode"],
    "TEBN": (lambda b: _with_backend(layer.TemporalEffectiveBatchNorm2d(T, 4), b), (T, 3, 4, 5, 5)),
}


def _with_backend(module, backend):
    module.backend = backend
    return module


@pytest.mark.parametrize("mode", ["train", pytest.param("eval", marks=SLOW_ON_CPU)])
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
        torch.testing.assert_close(gx_k.float(), gx_ref, **AUTOCAST_BF16)
    else:  # the torch backend under autocast is the bfloat16 reference of the 2×-torch rule
        _neuron_bf16_vs_fp64(f"{name} {mode} triton", ctor, mode, x.to(BF16), (y_k, m_k.v.detach(), gx_k),
                             (y_t, m_t.v.detach(), gx_t))
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
