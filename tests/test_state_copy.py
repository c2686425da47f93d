"""State you can copy and save.

* ``copy.deepcopy(model)`` and ``torch.save(model)`` in the middle of a sequence (EMA /
  best-model copies), for every module class: memories are copied detached (same
  values, no autograd history), and the copy continues the sequence exactly as the
  original does.
* The folded MPBN neuron's test-time momentum is the buffer ``adapt_momentum``: saved,
  loaded, untouched by ``reset_net``, restored for a memopt checkpoint recompute.
* The folded threshold θ′ per channel is in ``state_dict`` (``folded_v_threshold``), is the
  threshold the neuron fires at, follows adaptation and training of γ, β, and a loaded θ′
  that disagrees with the loaded μ, σ², γ, β is an error.
"""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn as nn
from tolerances import EXACT, FOLDED_INPUT_MARGIN_FP32, FOLDED_THRESHOLD_FP32

from snnorm import functional, layer, memopt, neuron
from snnorm.backends.torch_backend import folded_threshold

from helpers import NORM_CASES, C, H, N, T, W, with_backends


def _call_or_error(module, x):
    try:
        return module(x)
    except ValueError as err:  # e.g. BNTT after a whole sequence: both must refuse alike
        return str(err)


@pytest.mark.parametrize("case, backend", with_backends(NORM_CASES))
def test_deepcopy_mid_sequence(case, backend):
    module = case.build(backend)
    x = case.input().requires_grad_()
    y = module(x)  # memories now carry autograd history
    clone = copy.deepcopy(module)
    for (name, mine), (_, theirs) in zip(module.named_buffers(), clone.named_buffers()):
        assert torch.equal(mine, theirs), name
    for m_orig, m_copy in zip(module.modules(), clone.modules()):
        for (name, value), (_, copied) in zip(getattr(m_orig, "named_memories", lambda: [])(),
                                              getattr(m_copy, "named_memories", lambda: [])()):
            if isinstance(value, torch.Tensor):
                assert copied is not value and torch.equal(copied.detach(), value.detach()), name
                assert copied.grad_fn is None, f"memory {name} of the copy keeps the original's graph"
    if not (backend == "triton" and "adapting" in case.name):  # triton: adaptation is inference-only
        y.sum().backward()  # the original's graph is intact
        assert x.grad is not None
    # the copy continues the sequence exactly as the original
    x2 = case.input() * 0.5
    a, b = _call_or_error(module, x2), _call_or_error(clone, x2)
    assert type(a) is type(b)
    assert a == b if isinstance(a, str) else torch.equal(a, b)


@pytest.mark.parametrize("case", NORM_CASES, ids=lambda c: c.name)
def test_whole_model_save_and_load_mid_sequence(case):
    """``torch.save(model)`` pickles the same state deepcopy copies: memories detached."""
    module = case.build()
    module(case.input().requires_grad_())
    buffer = io.BytesIO()
    torch.save(module, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    for m in loaded.modules():
        for name, value in getattr(m, "named_memories", lambda: [])():
            if isinstance(value, torch.Tensor):
                assert value.is_leaf and not value.requires_grad, name
    x2 = case.input() * 0.5
    a, b = _call_or_error(module, x2), _call_or_error(loaded, x2)
    assert a == b if isinstance(a, str) else torch.equal(a, b)


def test_deepcopy_keeps_v_seq_detached():
    node = neuron.LIFNode(step_mode="m", store_v_seq=True)
    node(torch.randn(T, N, C, requires_grad=True))
    clone = copy.deepcopy(node)
    assert clone.v_seq.grad_fn is None and torch.equal(clone.v_seq, node.v_seq.detach())


def test_spikingjelly_deepcopy_mid_sequence_fails():
    """The peer defect (spikingjelly 2.0.0 and torch modules holding non-leaf state)."""
    sj_neuron = pytest.importorskip("spikingjelly.activation_based.neuron")
    theirs = sj_neuron.LIFNode(step_mode="m")
    theirs(torch.randn(T, N, C, requires_grad=True))
    with pytest.raises(RuntimeError, match="deepcopy"):
        copy.deepcopy(theirs)


# -- the folded MPBN neuron's state --------------------------------------------------------


def folded_node(running_stats=True, seed=0, **kw) -> neuron.MPBNLIFNode:
    torch.manual_seed(seed)
    node = neuron.MPBNLIFNode(out_channels=C, step_mode="m", **kw)
    with torch.no_grad():
        node.vbn.weight.uniform_(0.5, 1.5)
        node.vbn.weight[::2].neg_()  # γ < 0 flips the comparison
        node.vbn.bias.uniform_(-0.3, 0.3)
    for _ in range(2):
        node(torch.randn(T, N, C, H, W) * 2 + 0.5)
        functional.reset_net(node)
    node.eval()
    node.re_parameterize_v_threshold(running_stats=running_stats)
    return node


def _round_trip(node):
    buffer = io.BytesIO()
    torch.save(node.state_dict(), buffer)
    buffer.seek(0)
    return torch.load(buffer)


def test_adaptation_momentum_is_a_saved_buffer_that_reset_net_keeps():
    node = folded_node().train()
    assert "adapt_momentum" in node.state_dict()
    x = torch.randn(3, N, C, H, W)
    with torch.no_grad():
        node(x)
    assert node.bn_momentum == pytest.approx(0.1 * 0.94**3)
    mu, sigma2 = node.mu.clone(), node.sigma2.clone()
    functional.reset_net(node)  # between sequences: the test stream's state stays
    assert node.bn_momentum == pytest.approx(0.1 * 0.94**3)
    assert torch.equal(node.mu, mu) and torch.equal(node.sigma2, sigma2)
    fresh = folded_node(seed=1)
    fresh.load_state_dict(_round_trip(node))
    assert fresh.bn_momentum == pytest.approx(0.1 * 0.94**3)
    fresh.train()
    with torch.no_grad():
        functional.reset_net(node)
        assert torch.equal(node(x), fresh(x))  # the loaded neuron adapts on from the same state
    assert torch.equal(node.mu, fresh.mu) and fresh.bn_momentum == pytest.approx(node.bn_momentum)
    node.bn_momentum = 0.1  # restarting the decay is explicit
    assert float(node.adapt_momentum) == pytest.approx(0.1)


@pytest.mark.parametrize("running_stats", [True, False])
def test_checkpoint_recompute_of_adapting_folded_mpbn_equals_eager(running_stats):
    """memopt restores μ, σ² and the momentum for the recompute, so gradients match eager."""

    def build():
        torch.manual_seed(3)
        conv = layer.Conv2d(2, C, 3, padding=1, step_mode="m")
        return nn.Sequential(conv, folded_node(running_stats=running_stats).train())

    eager, ckpt = build(), build()
    ckpt.load_state_dict(eager.state_dict())
    x = torch.randn(4, N, 2, H, W)
    outputs = {}
    for name, net, run in [("eager", eager, lambda n, x: n(x)), ("memopt", ckpt, memopt.checkpoint)]:
        xi = x.clone().requires_grad_()
        s = run(net, xi)
        (s * torch.linspace(-1, 1, s.numel()).view_as(s)).sum().backward()
        outputs[name] = (s.detach(), xi.grad, {n: p.grad.clone() for n, p in net.named_parameters()})
    s_e, gx_e, gp_e = outputs["eager"]
    s_c, gx_c, gp_c = outputs["memopt"]
    assert torch.equal(s_e, s_c)
    torch.testing.assert_close(gx_c, gx_e, **EXACT)
    for name in gp_e:
        torch.testing.assert_close(gp_c[name], gp_e[name], **EXACT, msg=name)
    for (name, a), (_, b) in zip(eager.state_dict().items(), ckpt.state_dict().items()):
        assert torch.equal(a, b), f"{name} differs after the checkpointed step"


def _formula(node) -> torch.Tensor:
    """θ′ from the neuron's own μ, σ², γ, β and V_th, computed independently in float64."""
    d = {k: getattr(node, k).detach().double() for k in ("mu", "sigma2", "gamma", "beta", "normalized_v_threshold")}
    return d["mu"] + (d["normalized_v_threshold"] - d["beta"]) * torch.sqrt(d["sigma2"] + node.eps) / d["gamma"]


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("learnable", [False, True])
def test_folded_threshold_in_state_dict_is_theta_prime_and_fires(backend, learnable):
    node = folded_node(running_stats=False, learnable_vth=learnable, v_reset=0.0)
    functional.set_backend(node, backend)
    theta = node.state_dict()["folded_v_threshold"]
    assert theta.shape == (C,)
    torch.testing.assert_close(theta.double(), _formula(node), **FOLDED_THRESHOLD_FP32)
    assert not torch.allclose(theta, node.normalized_v_threshold)  # θ′ is not V_th
    # one step from v = 0 with decay_input=False: H = X, so the neuron fires where sign(γ)(X − θ′) ≥ 0
    x = theta.view(1, C, 1, 1) + torch.randn(N, C, H, W)
    x = torch.where((x - theta.view(1, C, 1, 1)).abs() < FOLDED_INPUT_MARGIN_FP32, x + 1e-2, x)  # away from rounding
    expected = (torch.sign(node.gamma).view(1, C, 1, 1) * (x - theta.view(1, C, 1, 1)) >= 0).float()
    with torch.no_grad():
        s = node(x.unsqueeze(0))[0]
    assert torch.equal(s, expected)


def test_folded_threshold_follows_adaptation_and_training():
    node = folded_node(running_stats=True).train()
    before = node.folded_v_threshold.clone()
    with torch.no_grad():
        node(torch.randn(2, N, C, H, W) + 3.0)  # shifted inputs: μ adapts, so does θ′
    assert not torch.equal(node.folded_v_threshold, before)
    torch.testing.assert_close(node.folded_v_threshold.double(), _formula(node), **FOLDED_THRESHOLD_FP32)
    with torch.no_grad():
        node.gamma.mul_(2.0)  # e.g. an optimizer step on γ after folding
    torch.testing.assert_close(node.state_dict()["folded_v_threshold"].double(), _formula(node), **FOLDED_THRESHOLD_FP32)


def test_loading_a_theta_prime_that_disagrees_is_an_error():
    node = folded_node()
    state = node.state_dict()
    fresh = folded_node(seed=2)
    fresh.load_state_dict(state)  # consistent: loads
    assert torch.equal(fresh.folded_v_threshold, node.folded_v_threshold)
    other = folded_node(seed=3)  # its own statistics: a failed load's effect shows
    bad = dict(state, folded_v_threshold=state["folded_v_threshold"] + 0.5)
    with pytest.raises(RuntimeError, match="folded_v_threshold"):
        other.load_state_dict(bad)
    # after the failed load: the other tensors are loaded (torch's load_state_dict is not
    # atomic), and the module is consistent with them, never with the rejected θ′: its saved
    # θ′ is the one derived from them, and it fires exactly as the module they came from
    after = other.state_dict()
    assert after.keys() == state.keys()
    for key, value in state.items():
        assert torch.equal(after[key], value), f"{key} after the failed load"
    x = torch.randn(T, N, C, H, W, generator=torch.Generator().manual_seed(5)) * 2 + 0.5
    functional.reset_net(other)
    functional.reset_net(node)
    assert torch.equal(other(x), node(x)) and torch.equal(other.v, node.v)


def test_theta_prime_formula_is_the_backend_spec():
    node = folded_node()
    std = torch.sqrt(node.sigma2 + node.eps)
    spec = folded_threshold(node.normalized_v_threshold, node.mu, std, node.gamma, node.beta)
    assert torch.equal(node.folded_v_threshold, spec.detach())
