r"""Membranes exactly on the threshold: Θ(0) = 1, in the forward and in the backward's recompute.

Each case builds its inputs so that the firing variable z lands exactly on 0 (and one ulp
either side), with no rounding on the way:

- LIF (decay_input=False, v = v_reset = 0): h = x at step 0, so x = θ puts h on θ;
- MPBN-LIF: γ = 0 makes ĥ = (h − μ)·rstd·0 + β = β exactly, so β = θ puts ĥ on θ whatever
  the batch statistics (resident and pipelined training paths);
- a fused norm → LIF block: the norm's γ = 0 gives y = β, charged into v = 0 with
  decay_input=False: h = β, so β = θ.

Channel 0 sits exactly on θ, channel 1 one ulp above, channel 2 one ulp below. The triton
backend must decide the same spikes as the torch backend (the reference: ``>= 0``), and
the gradients — which go through the backward's recomputed spike (the hard reset passes
∂v only where no spike fired) — must agree too. A ``>`` in place of ``>=`` in any forward
or recompute fails here.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
from devices import DEVICE, SLOW_ON_CPU
from tolerances import TRITON_FP64, TRITON_VS_TORCH_GRAD_FP32

pytest.importorskip("triton")

from snnorm import functional, layer, neuron  # noqa: E402
from snnorm import surrogate as sg  # noqa: E402
from snnorm.fusion import fused_block  # noqa: E402
from snnorm.kernels import mpbn_lif_train as train_kernels  # noqa: E402

T, N, C = 3, 4, 3
THETA = 1.0


def on_and_around(theta: float, dtype) -> torch.Tensor:
    """[θ, θ + 1 ulp, θ − 1 ulp] in ``dtype``."""
    t = torch.tensor(theta, dtype=dtype)
    return torch.stack([t, torch.nextafter(t, t + 1), torch.nextafter(t, t - 1)])


def run(module: nn.Module, x: torch.Tensor):
    """(spikes, final membrane, {name: grad}) of one sequence; the loss reaches every step's
    spikes and the final membrane, so the reset of each step carries a gradient."""
    functional.reset_net(module)
    x = x.clone().requires_grad_()
    s = module(x)
    node = module[-1] if isinstance(module, nn.Sequential) else module
    v = node.v
    g = torch.linspace(-1.0, 1.0, s.numel(), dtype=s.dtype, device=s.device).view_as(s)
    (s * g).sum().add((v * 0.7).sum()).backward()
    grads = {"x": x.grad}
    grads.update({n: p.grad for n, p in module.named_parameters() if p.grad is not None})
    return s.detach(), v.detach(), grads


def assert_same(got, want, dtype, what: str) -> None:
    s, v, g = got
    s_ref, v_ref, g_ref = want
    assert torch.equal(s, s_ref), f"{what}: spikes differ at the threshold\n{s[0].flatten()}\n{s_ref[0].flatten()}"
    tol = TRITON_FP64 if dtype == torch.float64 else TRITON_VS_TORCH_GRAD_FP32
    torch.testing.assert_close(v, v_ref, **tol, msg=lambda m: f"{what}: membrane: {m}")
    assert g.keys() == g_ref.keys(), what
    for name in g_ref:
        torch.testing.assert_close(g[name], g_ref[name], **tol, msg=lambda m, n=name: f"{what}: ∂{n}: {m}")


def on_triton(module: nn.Module) -> nn.Module:
    fused = copy.deepcopy(module)
    functional.set_backend(fused, "triton")
    return fused


DTYPES = [torch.float32, torch.float64]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_lif_fires_exactly_at_the_threshold(dtype):
    node = neuron.LIFNode(tau=2.0, decay_input=False, v_reset=0.0, v_threshold=THETA, step_mode="m",
                          surrogate_function=sg.Sigmoid()).to(DEVICE, dtype)
    x = torch.empty(T, N, C, dtype=dtype)
    x[0] = on_and_around(THETA, dtype)  # h_0 = x_0: on θ, one ulp above, one ulp below, per channel
    x[1:] = torch.linspace(-0.5, 1.5, (T - 1) * N * C, dtype=dtype).view(T - 1, N, C)
    x = x.to(DEVICE)
    want = run(node, x)
    assert want[0][0, :, 0].all() and want[0][0, :, 1].all() and not want[0][0, :, 2].any()  # Θ(0) = 1
    assert_same(run(on_triton(node), x), want, dtype, "LIF")


@pytest.fixture(params=["resident", pytest.param("pipelined", marks=SLOW_ON_CPU)])
def path(request, monkeypatch):
    """The MPBN-LIF training path (C is small here: the default would be pipelined)."""
    if request.param == "resident":
        monkeypatch.setattr(train_kernels, "MIN_PROGRAMS", 1)
    else:
        monkeypatch.setattr(train_kernels, "SPLIT_BLOCK", 4)
        monkeypatch.setattr(train_kernels, "SPLIT_MIN_BLOCK", 4)
    return request.param


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_mpbn_lif_fires_exactly_at_the_threshold(path, dtype, training):
    # raw carry with a hard reset: v = 0 where a spike fired, else h, so ∂x_t reads the
    # recomputed spike of step t even though γ = 0 blocks the path through the BN
    node = neuron.MPBNLIFNode(out_features=C, tau=2.0, decay_input=False, v_reset=0.0, v_threshold=THETA,
                              carry="raw", step_mode="m", surrogate_function=sg.Sigmoid())
    node = node.to(DEVICE, dtype).train(training)
    with torch.no_grad():  # in the run's dtype: θ ± 1 ulp of float64 would round to θ in float32
        node.vbn.weight.zero_()
        node.vbn.bias.copy_(on_and_around(THETA, dtype))
    x = torch.linspace(-1.0, 2.0, T * N * C, dtype=dtype).view(T, N, C).to(DEVICE)
    want = run(node, x)
    assert want[0][:, :, 0].all() and want[0][:, :, 1].all() and not want[0][:, :, 2].any()
    assert_same(run(on_triton(node), x), want, dtype, f"MPBN-LIF ({path}, {'train' if training else 'eval'})")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("norm", ["bn", "tebn"])
def test_fused_norm_lif_fires_exactly_at_the_threshold(dtype, norm):
    if norm == "bn":
        bn = layer.BatchNorm1d(C, step_mode="m")
    else:
        bn = layer.TemporalEffectiveBatchNorm1d(T, C)  # y_t = p_t·(γ x̂ + β), p_t = 1
    pair = nn.Sequential(bn, neuron.LIFNode(tau=2.0, decay_input=False, v_reset=0.0, v_threshold=THETA, step_mode="m",
                                            surrogate_function=sg.Sigmoid())).to(DEVICE, dtype)
    with torch.no_grad():  # β per channel, in the run's dtype
        bn.weight.zero_()
        bn.bias.copy_(on_and_around(THETA, dtype).to(DEVICE).expand(bn.bias.shape))
    fused = on_triton(functional.fuse_norm_neurons(copy.deepcopy(pair)))
    assert fused_block(fused[0]).fused_kernel_applies(), "the pair does not run the fused kernel"
    x = torch.linspace(-1.0, 2.0, T * N * C, dtype=dtype).view(T, N, C).to(DEVICE)
    want = run(pair, x)
    # step 0 from v = 0: h = β; later steps charge onto the reset membrane (0 after a spike)
    assert want[0][:, :, 0].all() and want[0][:, :, 1].all() and not want[0][0, :, 2].any()
    assert_same(run(fused, x), want, dtype, f"fused {norm} → LIF")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("norm", ["layer-norm", "rms-norm"])
def test_fused_row_norm_lif_fires_exactly_at_the_threshold(dtype, norm):
    """LayerNorm / RMSNorm → LIF over rows of D = C features, feature 0 on θ, 1 above, 2 below.
    LayerNorm: γ = 0 gives y = β exactly. RMSNorm (no β): rows of ones with ε below half an
    ulp of 1, so mean(x²) + ε rounds to 1, rstd = 1 and y = γ exactly."""
    around = on_and_around(THETA, dtype).to(DEVICE)
    if norm == "layer-norm":
        row_norm = layer.LayerNorm(C, step_mode="m")
        x = torch.linspace(-1.0, 2.0, T * N * C, dtype=dtype).view(T, N, C).to(DEVICE)
    else:
        row_norm = layer.RMSNorm(C, eps=1e-20, step_mode="m")  # 1 + 1e-20 is 1 in fp32 and in fp64
        x = torch.ones(T, N, C, dtype=dtype, device=DEVICE)
    pair = nn.Sequential(row_norm, neuron.LIFNode(tau=2.0, decay_input=False, v_reset=0.0, v_threshold=THETA,
                                                  step_mode="m", surrogate_function=sg.Sigmoid())).to(DEVICE, dtype)
    with torch.no_grad():
        if norm == "layer-norm":
            row_norm.weight.zero_()
            row_norm.bias.copy_(around)
        else:
            row_norm.weight.copy_(around)
    fused = on_triton(functional.fuse_norm_neurons(copy.deepcopy(pair)))
    assert fused_block(fused[0]).fused_kernel_applies(), "the pair does not run the fused kernel"
    want = run(pair, x)
    # step 0 from v = 0: h = y = β (γ); later steps charge onto the reset membrane (0 after a spike)
    assert want[0][:, :, 0].all() and want[0][:, :, 1].all() and not want[0][0, :, 2].any()
    assert_same(run(fused, x), want, dtype, f"fused {norm} → LIF")
