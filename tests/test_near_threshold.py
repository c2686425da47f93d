r"""Membranes within a few ulps of θ, in fp32: the Triton forward, the backward's recompute and
the torch backend decide the same spikes.

tests/test_exact_threshold.py puts membranes on θ with no rounding on the way (γ = 0). Here
they come out of the charge itself, with τ drawn so that its division rounds (3, 7, 10/3, …)::

    h = v + (x − (v − v_r))/τ   (decay_input)   |   h = v − (v − v_r)/τ + x

For each step a target h* = θ + k·ulp(θ) is drawn per element (k ∈ [−4, 4]), x is found by
inverting the charge in float64 from the membrane the torch backend reached, and rounded to
float32, so the fp32 h lands within a few ulps of θ (the test checks that it does). The
kernels must compute the torch backend's fp32 h bit for bit (a correctly rounded division,
``_device.div_rn``, and no fp contraction), hence the same spikes and final membrane; the
gradients go through the backward's recomputed spike (a hard reset passes ∂v only where no
spike fired, so a recompute on the other side of θ changes ∂x by about |∂v|).

The reference is the torch backend on the CPU: on CUDA, ATen divides a tensor by a Python
scalar as a multiplication by its rounded reciprocal (``div_true_kernel_cuda``), up to an ulp
off a division when 1/τ is inexact (τ = 3), so torch on a GPU does not give the correctly
rounded h the kernels compute everywhere.

MPBN-LIF and a fused norm → LIF run in eval with statistics that make the norm exactly the
identity (μ = 0, σ² + ε = 1 with ε = 2⁻¹⁰, γ = 1, β = 0: ĥ = h, y = x with no rounding), so
the membrane that fires is the charged one. (With batch statistics the kernels' reduction
order differs from torch's: those flips are placed within rounding of θ by
tests/test_triton_mpbn_lif.py.)
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
from devices import DEVICE
from hypothesis import given, note, settings
from hypothesis import strategies as st
from tolerances import EXACT, TRITON_VS_TORCH_GRAD_FP32

pytest.importorskip("triton")

from snnorm import functional, layer, neuron  # noqa: E402
from snnorm import surrogate as sg  # noqa: E402
from snnorm.backends import torch_backend as ref  # noqa: E402
from snnorm.fusion import fused_block  # noqa: E402
from snnorm.params import LIFParameters  # noqa: E402

T, N, C = 3, 4, 3
F32 = torch.float32
#: ε whose σ² + ε is exactly 1 for σ² = 1 − ε (both powers of two apart: no rounding)
EPS = 2.0**-10
#: |h − θ| of a constructed membrane, in ulps of θ: |k| ≤ 4 plus the rounding of x (≤ ½ ulp
#: of x, divided by τ ≥ 1.5, and the charge's own roundings)
NEAR_ULPS = 8

#: half the profile's examples (each runs a Triton forward and backward under the interpreter)
FEWER = settings(max_examples=max(3, settings.default.max_examples // 2))

CONFIGS = st.fixed_dictionaries(
    {
        # fp32-exact θ (θ is a Python float in the module; the kernels read it as fp32)
        "theta": st.sampled_from([1.0, 0.3, 0.7, 1.7]).map(lambda t: float(torch.tensor(t, dtype=F32))),
        "tau": st.sampled_from([1.5, 2.0, 3.0, 7.0, 10.0 / 3.0]),
        "decay_input": st.booleans(),
        "v_reset": st.sampled_from([0.0, -0.25, None]),  # None: soft reset
        "seed": st.integers(0, 2**16),
    }
)


def _ulp(theta: float) -> float:
    t = torch.tensor(theta, dtype=F32)
    return float(torch.nextafter(t, t + 1) - t)


def near_threshold_input(cfg) -> tuple[torch.Tensor, torch.Tensor]:
    """(x ``[T, N, C]`` fp32, the fp32 membranes h the torch backend charges from it).

    Step by step: h* = θ + k·ulp(θ) in float64, x = the charge inverted at h* from the
    current membrane (float64, then rounded to float32); then the torch backend's charge,
    fire and reset in float32 give the next membrane."""
    gen = torch.Generator().manual_seed(cfg["seed"])
    lif = LIFParameters(sg.Sigmoid(), tau=cfg["tau"], decay_input=cfg["decay_input"], v_reset=cfg["v_reset"],
                        detach_reset=False)
    theta, tau, v_r = cfg["theta"], cfg["tau"], lif.v_rest
    ks = torch.randint(-4, 5, (T, N, C), generator=gen).to(torch.float64)
    v = torch.full((N, C), 0.0 if cfg["v_reset"] is None else cfg["v_reset"], dtype=F32)
    xs, hs = [], []
    for t in range(T):
        target = theta + ks[t] * _ulp(theta)
        vd = v.double()
        if cfg["decay_input"]:  # h = v + (x − (v − v_r))/τ
            x = (target - vd) * tau + (vd - v_r)
        else:  # h = v − (v − v_r)/τ + x
            x = target - vd + (vd - v_r) / tau
        x = x.to(F32)
        h = ref.lif_charge(x, v, lif)
        spike = (h - theta >= 0).to(F32)
        v = ref.lif_reset(h, spike, theta, lif)
        xs.append(x)
        hs.append(h)
    return torch.stack(xs), torch.stack(hs)


def run(module: nn.Module, x: torch.Tensor, device):
    """(spikes, final membrane, {name: grad}) of ``module`` on ``device``, returned on the CPU;
    the loss reaches every step's spikes and the final membrane, so each step's reset (and
    its recomputed spike) carries a gradient."""
    module = module.to(device)
    functional.reset_net(module)
    x = x.clone().to(device).requires_grad_()
    s = module(x)
    node = module[-1] if isinstance(module, nn.Sequential) else module
    v = node.v
    g = torch.linspace(-1.0, 1.0, s.numel(), dtype=s.dtype, device=s.device).view_as(s)
    (s * g).sum().add((v * 0.7).sum()).backward()
    grads = {"x": x.grad.cpu()}
    grads.update({n: p.grad.cpu() for n, p in module.named_parameters() if p.grad is not None})
    return s.detach().cpu(), v.detach().cpu(), grads


def check(module: nn.Module, cfg, what: str) -> None:
    x, h = near_threshold_input(cfg)
    ulps = ((h.double() - cfg["theta"]).abs() / _ulp(cfg["theta"])).max().item()
    note(f"{what}: {cfg}; max |h − θ| = {ulps:.1f} ulp")
    assert ulps <= NEAR_ULPS, f"the construction missed θ by {ulps:.1f} ulps"  # the test means what it says
    want = run(module, x, "cpu")  # the torch backend on the CPU (module docstring)
    assert want[0].any() and not want[0].all(), "no decision on either side of θ was drawn"
    fused = copy.deepcopy(module)
    functional.set_backend(fused, "triton")
    if isinstance(module, nn.Sequential):
        fused = functional.fuse_norm_neurons(fused)
        assert fused_block(fused[0]).fused_kernel_applies(), "the pair does not run the fused kernel"
    s, v, g = run(fused, x, DEVICE)
    flips = (s != want[0]).nonzero().tolist()
    assert not flips, f"{what}: spikes differ from the torch backend at (t, n, c) {flips[:8]} ({cfg})"
    torch.testing.assert_close(v, want[1], **EXACT, msg=lambda m: f"{what}: final membrane: {m}")
    assert g.keys() == want[2].keys(), what
    for name, grad in want[2].items():  # a recompute on the other side of θ moves ∂x by ~|∂v|
        torch.testing.assert_close(g[name], grad, **TRITON_VS_TORCH_GRAD_FP32, msg=lambda m, n=name: f"{what}: ∂{n}: {m}")


def _lif(cfg) -> neuron.LIFNode:
    return neuron.LIFNode(tau=cfg["tau"], decay_input=cfg["decay_input"], v_reset=cfg["v_reset"],
                          v_threshold=cfg["theta"], step_mode="m", surrogate_function=sg.Sigmoid())


def _identity_statistics(bn: nn.Module) -> nn.Module:
    """μ = 0, σ² = 1 − ε, ε = 2⁻¹⁰, γ = 1, β = 0: the norm is exactly the identity in eval."""
    with torch.no_grad():
        bn.eps = EPS
        bn.running_mean.zero_()
        bn.running_var.fill_(1.0 - EPS)
        bn.weight.fill_(1.0)
        bn.bias.zero_()
    return bn


@FEWER
@given(cfg=CONFIGS)
def test_lif_decides_near_threshold_spikes_as_torch(cfg):
    check(_lif(cfg), cfg, "LIF")


@FEWER
@given(cfg=CONFIGS, carry=st.sampled_from(["normalized", "raw"]))
def test_mpbn_lif_decides_near_threshold_spikes_as_torch(cfg, carry):
    node = neuron.MPBNLIFNode(out_features=C, tau=cfg["tau"], decay_input=cfg["decay_input"], v_reset=cfg["v_reset"],
                              v_threshold=cfg["theta"], carry=carry, step_mode="m", surrogate_function=sg.Sigmoid())
    _identity_statistics(node.vbn)
    check(node.eval(), cfg, f"MPBN-LIF (eval, {carry} carry)")


@FEWER
@given(cfg=CONFIGS)
def test_fused_norm_lif_decides_near_threshold_spikes_as_torch(cfg):
    bn = _identity_statistics(layer.BatchNorm1d(C, step_mode="m"))
    check(nn.Sequential(bn, _lif(cfg)).eval(), cfg, "fused BN → LIF (eval)")
