"""Module level: a neuron on the triton backend computes what it computes on the torch backend.

The op-level property tests (test_triton_*.py) pin each kernel; these draw whole-module
configurations — step mode, train/eval/folded/test-time modulation, learnable threshold,
carry, sign of γ — and compare spikes, membrane, gradients and running statistics after
``set_backend``. Every mode runs every run (parametrized); hypothesis draws the rest.
Spikes are discontinuous: every spike that differs must sit at the threshold (the torch
reference's firing variable within tolerances.FLIP_MARGIN_EPS eps of 0,
helpers.assert_flips_placed), and tests/tolerances.py's rule says what is compared after a
flip (spikes up to each unit's first flip, everything else on the units — elements, or
channels under batch statistics — that never flipped). Runs on tests/devices.py's DEVICE
(CUDA when present).
"""

import copy

import pytest
import torch
from devices import DEVICE, SIZES, property_examples
from helpers import RecordingSurrogate, assert_flips_placed
from hypothesis import given, note, settings
from hypothesis import strategies as st
from tolerances import MODULE_BUFFERS_FP32, MODULE_FP32, comparable_entries

from snnorm import backends, functional, neuron, surrogate

pytestmark = pytest.mark.skipif(
    backends.available_backends().get("triton") is not None,
    reason=f"triton backend unavailable: {backends.available_backends().get('triton')}",
)


@st.composite
def neuron_configs(draw):
    # single-step mode launches once per step: T ≤ 5 on the CPU (as before the GPU pools)
    T, N, C, *spatial = draw(SIZES.shapes(min_per_channel=2, t_max=None if SIZES.gpu else 5))
    return dict(
        T=T,
        N=N,
        C=C,
        spatial=tuple(spatial),
        step_mode=draw(st.sampled_from(["s", "m"])),
        v_reset=draw(st.sampled_from([0.0, None, -0.25])),
        decay_input=draw(st.booleans()),
        detach_reset=draw(st.booleans()),
        surrogate=draw(st.sampled_from(["sigmoid", "atan"])),
        negative_gamma=draw(st.booleans()),
        learnable=draw(st.booleans()),
        carry=draw(st.sampled_from(["normalized", "raw"])),
        noncontiguous=draw(st.booleans()),
        seed=draw(st.integers(0, 2**16)),
    )


def build(cfg):
    torch.manual_seed(cfg["seed"])
    surr = surrogate.Sigmoid() if cfg["surrogate"] == "sigmoid" else surrogate.ATan()
    common = dict(v_reset=cfg["v_reset"], detach_reset=cfg["detach_reset"], surrogate_function=surr,
                  step_mode=cfg["step_mode"], decay_input=cfg["decay_input"])
    if cfg["mode"] == "lif":
        return neuron.LIFNode(tau=2.0, **common).to(DEVICE)
    node = neuron.MPBNLIFNode(out_features=cfg["C"], carry=cfg["carry"], learnable_vth=cfg["learnable"], **common)
    with torch.no_grad():
        node.vbn.weight.uniform_(0.5, 1.5)
        if cfg["negative_gamma"]:
            node.vbn.weight[::2].neg_()
        node.vbn.bias.uniform_(-0.3, 0.3)
        node.vbn.running_mean.uniform_(-0.5, 0.5)
        node.vbn.running_var.uniform_(0.5, 2.0)
        if cfg["learnable"]:
            node.a.uniform_(-0.3, 0.3)
    if cfg["mode"] in ("folded", "adapt-batch", "adapt-running"):
        node.re_parameterize_v_threshold(running_stats=cfg["mode"] == "adapt-running")
    node.train(cfg["mode"] in ("train", "adapt-batch", "adapt-running"))
    return node.to(DEVICE)


def make_input(cfg):
    shape = (cfg["T"], cfg["N"], cfg["C"], *cfg["spatial"])
    g = torch.Generator().manual_seed(cfg["seed"] + 1)
    if cfg["noncontiguous"]:  # the same values, laid out with N and C swapped
        x = (torch.randn(cfg["T"], cfg["C"], cfg["N"], *cfg["spatial"], generator=g) * 2 + 0.3).transpose(1, 2)
    else:
        x = torch.randn(shape, generator=g) * 2 + 0.3
    return x.to(DEVICE)  # keeps the transposed strides


def run(node, x, step_mode, grad):
    x = x.detach().clone().requires_grad_(grad)
    if step_mode == "m":
        s = node(x)
    else:
        s = torch.stack([node(xt) for xt in x])
    grads = {}
    if grad:
        g = torch.linspace(-1, 1, s.numel(), device=s.device).view_as(s)
        (s * g).sum().backward()
        grads["x"] = x.grad
        grads.update({n: p.grad for n, p in node.named_parameters() if p.grad is not None})
    return s.detach(), node.v.detach(), grads


#: every neuron mode: MPBN training, eval, folded threshold, test-time adaptation with batch
#: or running statistics, and the plain LIF
MODES = ("train", "eval", "folded", "adapt-batch", "adapt-running", "lif")


@pytest.mark.parametrize("mode", MODES)
@settings(max_examples=property_examples(len(MODES)))
@given(cfg=neuron_configs())
def test_neuron_backends_agree(mode, cfg):
    cfg = dict(cfg, mode=mode)
    ref = build(cfg)
    fused = copy.deepcopy(ref)
    functional.set_backend(fused, "triton")
    assert fused.backend == "triton"
    # the reference records its firing variable z (after the copy: the triton copy keeps its own)
    ref.surrogate_function = RecordingSurrogate(ref.surrogate_function)
    x = make_input(cfg)
    grad = cfg["mode"] not in ("adapt-batch", "adapt-running")  # adaptation is inference-only
    s_ref, v_ref, g_ref = run(ref, x, cfg["step_mode"], grad)
    s_fused, v_fused, g_fused = run(fused, x, cfg["step_mode"], grad)
    # batch statistics couple the elements of a channel; eval, folded and LIF are elementwise
    coupled = cfg["mode"] in ("train", "adapt-batch", "adapt-running")
    clean = assert_flips_placed(f"{mode} spikes", s_fused, s_ref, ref.surrogate_function.firing_variable(s_ref),
                                s_ref.dtype, channel_coupled=coupled)
    note(f"{int((s_fused != s_ref).sum())} spikes flipped; {int(clean.sum())} of {clean.numel()} units without a flip")

    def close(got, want, tol, what):
        mask = comparable_entries(want, clean, what)
        torch.testing.assert_close(got[mask], want[mask], **tol, msg=what)

    close(v_fused, v_ref, MODULE_FP32, "membrane")
    assert g_fused.keys() == g_ref.keys()
    for name in g_ref:
        close(g_fused[name], g_ref[name], MODULE_FP32, f"grad {name}")
    for name, buf in ref.named_buffers():
        got = dict(fused.named_buffers())[name]
        if buf.is_floating_point():
            close(got, buf, MODULE_BUFFERS_FP32, name)
        else:
            assert torch.equal(got, buf), name
    if cfg["mode"] == "adapt-running":
        assert fused.bn_momentum == pytest.approx(ref.bn_momentum)


def test_set_backend_switches_neurons_and_warns_for_the_rest():
    from snnorm import layer

    net = torch.nn.Sequential(layer.Conv2d(2, 3, 3, step_mode="m"), layer.GroupNorm(1, 3, step_mode="m"),
                              neuron.MPBNLIFNode(out_channels=3, step_mode="m"))
    with pytest.warns(UserWarning, match="GroupNorm"):  # (BatchNorm2d switches since issue 15)
        functional.set_backend(net, "triton")
    assert net[2].backend == "triton" and net[1].backend == "torch"
    functional.set_backend(net, "torch")
    assert net[2].backend == "torch"
