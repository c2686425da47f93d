"""Neurons against spikingjelly 2.0.0 (the oracle), threshold folding, and bad input."""

import copy
import itertools

import pytest
import torch
from tolerances import (
    FOLDED_MEMBRANE_FP32, MEMBRANE_BY_HAND_FP32, NEURON_BUFFERS_VS_SJ, NEURON_VS_SJ_REL, NEURON_VS_SJ_REL_FLOOR,
    SJ_LEARNABLE_VTH_DEFECT_GAP, assert_rel_close,
)

from snnorm import functional, neuron, surrogate

from helpers import assert_unchanged, snapshot  # noqa: I001

sj = pytest.importorskip("spikingjelly.activation_based", reason="spikingjelly 2.0.0 is the numerical oracle")
from spikingjelly.activation_based import neuron as sj_neuron  # noqa: E402
from spikingjelly.activation_based import surrogate as sj_surrogate  # noqa: E402

SURROGATES = {"sigmoid": (surrogate.Sigmoid, sj_surrogate.Sigmoid), "atan": (surrogate.ATan, sj_surrogate.ATan)}


def assert_close(ours, theirs, what):
    """fp32 agreement with the oracle, relative to its largest magnitude."""
    return assert_rel_close(ours, theirs, NEURON_VS_SJ_REL, what, floor=NEURON_VS_SJ_REL_FLOOR)


def run_pair(ours, theirs, x, step_mode, steps_grad=True):
    """Feed x to both, return outputs and input grads."""
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    if step_mode == "m":
        sa, sb = ours(xa), theirs(xb)
    else:
        sa = torch.stack([ours(xt) for xt in xa])
        sb = torch.stack([theirs(xt) for xt in xb])
    g = torch.randn_like(sa)
    (sa * g).sum().backward()
    (sb * g).sum().backward()
    return sa, sb, xa.grad, xb.grad


# ---------------------------------------------------------------- LIF / IF vs spikingjelly
@pytest.mark.parametrize(
    "step_mode,decay_input,v_reset,detach_reset,surr",
    [
        ("m", True, 0.0, False, "sigmoid"),
        ("s", False, 0.0, True, "atan"),
        ("m", False, None, False, "atan"),
        ("m", True, -0.3, False, "sigmoid"),
        ("s", True, None, True, "sigmoid"),
    ],
)
def test_lif_matches_spikingjelly(step_mode, decay_input, v_reset, detach_reset, surr):
    torch.manual_seed(0)
    ours_s, theirs_s = SURROGATES[surr]
    kw = dict(tau=2.5, decay_input=decay_input, v_reset=v_reset, detach_reset=detach_reset, step_mode=step_mode)
    a = neuron.LIFNode(surrogate_function=ours_s(), **kw)
    b = sj_neuron.LIFNode(surrogate_function=theirs_s(), **kw)
    x = torch.randn(6, 4, 3, 5) * 1.5
    sa, sb, ga, gb = run_pair(a, b, x, step_mode)
    assert torch.equal(sa, sb)
    assert_close(a.v, b.v, "membrane")
    assert_close(ga, gb, "grad x")


def test_if_matches_spikingjelly():
    torch.manual_seed(1)
    a = neuron.IFNode(step_mode="m", v_reset=None)
    b = sj_neuron.IFNode(step_mode="m", v_reset=None)
    sa, sb, ga, gb = run_pair(a, b, torch.randn(5, 3, 7), "m")
    assert torch.equal(sa, sb)
    assert_close(a.v, b.v, "membrane")
    assert_close(ga, gb, "grad x")


# ---------------------------------------------------------------- MPBN-LIF vs spikingjelly
def mpbn_pair(shape_kind, **kw):
    features = {"conv": dict(out_channels=3), "linear": dict(out_features=3), "seq": dict(out_features=3)}[shape_kind]
    surr = kw.pop("surr", "sigmoid")
    ours_s, theirs_s = SURROGATES[surr]
    a = neuron.MPBNLIFNode(surrogate_function=ours_s(), **features, **kw)
    b = sj_neuron.MPBNLIFNode(surrogate_function=theirs_s(), **features, **kw)
    with torch.no_grad():  # non-trivial BN parameters and statistics, copied through state_dict
        a.vbn.weight.uniform_(0.5, 1.5)
        a.vbn.bias.uniform_(-0.3, 0.3)
        a.vbn.running_mean.uniform_(-0.5, 0.5)
        a.vbn.running_var.uniform_(0.5, 2.0)
    b.load_state_dict(a.state_dict())
    return a, b


STEP_SHAPES = {"conv": (8, 3, 4, 5), "linear": (16, 3), "seq": (8, 3, 7)}


@pytest.mark.parametrize(
    "shape_kind,step_mode,training,v_reset,decay_input,detach_reset,surr",
    [
        ("conv", "m", True, 0.0, False, False, "sigmoid"),
        ("conv", "s", True, None, True, False, "atan"),
        ("linear", "m", True, 0.0, False, True, "atan"),
        ("seq", "m", True, -0.2, True, False, "sigmoid"),
        ("conv", "m", False, 0.0, False, False, "sigmoid"),
        ("linear", "s", False, None, False, True, "sigmoid"),
        ("seq", "m", False, 0.0, True, False, "atan"),
    ],
)
def test_mpbn_lif_matches_spikingjelly(shape_kind, step_mode, training, v_reset, decay_input, detach_reset, surr):
    torch.manual_seed(2)
    a, b = mpbn_pair(shape_kind, step_mode=step_mode, v_reset=v_reset, decay_input=decay_input,
                     detach_reset=detach_reset, surr=surr, tau=2.0)
    a.train(training)
    b.train(training)
    x = torch.randn(5, *STEP_SHAPES[shape_kind]) * 2
    sa, sb, ga, gb = run_pair(a, b, x, step_mode)
    assert torch.equal(sa, sb)
    assert_close(a.v, b.v, "membrane")
    assert_close(ga, gb, "grad x")
    for name in ("weight", "bias"):
        assert_close(getattr(a.vbn, name).grad, getattr(b.vbn, name).grad, f"grad {name}")
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(a.vbn, name).double(), getattr(b.vbn, name).double(), **NEURON_BUFFERS_VS_SJ, msg=name)


def test_mpbn_learnable_vth_hard_reset_matches_spikingjelly():
    torch.manual_seed(3)
    a, b = mpbn_pair("conv", step_mode="m", learnable_vth=True)
    with torch.no_grad():
        a.a.uniform_(-0.5, 0.5)
    b.load_state_dict(a.state_dict())
    sa, sb, ga, gb = run_pair(a, b, torch.randn(4, *STEP_SHAPES["conv"]) * 2, "m")
    assert torch.equal(sa, sb)
    assert_close(ga, gb, "grad x")
    assert_close(a.a.grad, b.a.grad, "grad a")


def test_mpbn_learnable_vth_soft_reset_subtracts_the_learned_threshold():
    """spikingjelly fires on exp(a) but subtracts v_threshold in a soft reset; snnorm subtracts exp(a)."""
    torch.manual_seed(4)
    a, b = mpbn_pair("linear", step_mode="m", learnable_vth=True, v_reset=None)
    with torch.no_grad():
        a.a.fill_(0.7)
    b.load_state_dict(a.state_dict())
    a.eval(), b.eval()
    x = torch.randn(1, *STEP_SHAPES["linear"]) * 3
    sa, sb = a(x), b(x)
    assert torch.equal(sa, sb)
    h_hat = a.vbn(x[0] - 0.0)  # v starts at 0: h = x, no decay input term (v_reset None → v_r = 0)
    expected = h_hat - sa[0] * torch.exp(a.a)
    torch.testing.assert_close(a.v, expected, **MEMBRANE_BY_HAND_FP32)
    assert not torch.allclose(b.v, expected, **SJ_LEARNABLE_VTH_DEFECT_GAP), "spikingjelly defect no longer present?"


def test_mpbn_raw_carry_keeps_the_pre_bn_membrane():
    torch.manual_seed(5)
    node = neuron.MPBNLIFNode(out_features=4, step_mode="s", carry="raw")
    node.eval()
    x0, x1 = torch.randn(2, 6, 4)
    s0 = node(x0)
    assert torch.allclose(node.v, (1 - s0) * x0)  # hard reset to 0 of the raw h = x0
    s1 = node(x1)
    expected_h1 = (1 - s0) * x0 * 0.5 + x1
    torch.testing.assert_close(node.v, (1 - s1) * expected_h1, **MEMBRANE_BY_HAND_FP32)


# ---------------------------------------------------------------- folding
FOLD_CASES = list(itertools.product(["normalized", "raw"], [0.0, None, 0.4], [False, True], [False, True]))


def trained_mpbn(carry, v_reset, learnable, negative_gamma, seed=6, **kw):
    torch.manual_seed(seed)
    node = neuron.MPBNLIFNode(out_channels=5, step_mode="m", carry=carry, v_reset=v_reset,
                              learnable_vth=learnable, **kw)
    with torch.no_grad():
        node.vbn.weight.uniform_(0.4, 1.6)
        if negative_gamma:
            node.vbn.weight[::2].neg_()
        node.vbn.bias.uniform_(-0.4, 0.4)
        if learnable:
            node.a.uniform_(-0.4, 0.4)
    node.train()
    for _ in range(3):  # meaningful running statistics
        node(torch.randn(4, 6, 5, 3, 3) * 2 + 0.5)
        functional.reset_net(node)
    return node.eval()


@pytest.mark.parametrize("carry,v_reset,learnable,negative_gamma", FOLD_CASES)
def test_fold_changes_nothing_in_eval(carry, v_reset, learnable, negative_gamma):
    node = trained_mpbn(carry, v_reset, learnable, negative_gamma)
    folded = copy.deepcopy(node)
    folded.re_parameterize_v_threshold()
    x = torch.randn(6, 6, 5, 3, 3) * 2 + 0.5
    with torch.no_grad():
        s_ref, s_fold = node(x), folded(x)
    assert torch.equal(s_ref, s_fold), f"{(s_ref != s_fold).sum().item()} spikes changed"
    torch.testing.assert_close(node.v, folded.v, **FOLDED_MEMBRANE_FP32)


def _plain(value):
    """A comparable copy of a plain attribute: an object as its type and its own plain attributes."""
    if isinstance(value, (torch.Tensor, torch.nn.Module)):
        return None
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v) for v in value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if hasattr(value, "__dict__") and not isinstance(value, type):
        return type(value).__qualname__, {k: _plain(v) for k, v in vars(value).items()}
    return copy.deepcopy(value)


def _plain_attributes(module: torch.nn.Module) -> dict:
    """Every attribute of every submodule that is not a tensor, parameter, buffer or submodule
    (flags such as fold_bn, carry, step_mode, the backend, the membrane-norm strategy), by
    dotted name."""
    out = {}
    for name, m in module.named_modules():
        for key, value in vars(m).items():
            if key.startswith("_") or isinstance(value, (torch.Tensor, torch.nn.Module)):
                continue
            out[f"{name}.{key}"] = _plain(value)
    return out


def assert_refused_and_unchanged(node, call, exc, match) -> None:
    """``call(node)`` raises ``exc`` matching ``match`` and changes nothing: the same
    parameters, buffers and submodules (names, values, requires_grad), memories, plain
    attributes and training flag, and the same spikes and membrane on a fresh sequence."""
    before = copy.deepcopy(node)
    snap = snapshot(node)
    with pytest.raises(exc, match=match):
        call(node)
    assert_unchanged(node, snap)
    for what in ("named_parameters", "named_buffers"):
        now, then = dict(getattr(node, what)()), dict(getattr(before, what)())
        assert now.keys() == then.keys(), f"{what} changed: {sorted(then)} -> {sorted(now)}"
        for key in then:
            assert torch.equal(now[key], then[key]) and now[key].requires_grad == then[key].requires_grad, key
    assert [n for n, _ in node.named_modules()] == [n for n, _ in before.named_modules()]
    assert _plain_attributes(node) == _plain_attributes(before)
    assert node.training == before.training
    x = torch.randn(4, 6, 5, 3, 3, generator=torch.Generator().manual_seed(3)) * 2 + 0.5  # trained_mpbn's shape
    for m in (node, before):
        functional.reset_net(m)
    assert torch.equal(node(x), before(x)) and torch.equal(node.v, before.v)


def test_fold_twice_and_impossible_folds_raise():
    node = trained_mpbn("normalized", 0.0, False, False)
    assert_refused_and_unchanged(node, lambda n: n.re_parameterize_v_threshold(normalize_residual=False), ValueError,
                                 "normalize_residual=False")
    node.re_parameterize_v_threshold(normalize_residual=True)
    assert_refused_and_unchanged(node, lambda n: n.re_parameterize_v_threshold(), RuntimeError, "already")
    raw = trained_mpbn("raw", 0.0, False, False)
    assert_refused_and_unchanged(raw, lambda n: n.re_parameterize_v_threshold(normalize_residual=True), ValueError,
                                 "normalize_residual=True")
    zero = trained_mpbn("normalized", 0.0, False, False)
    with torch.no_grad():
        zero.vbn.weight[2] = 0.0
    assert_refused_and_unchanged(zero, lambda n: n.re_parameterize_v_threshold(), ValueError, r"channels \[2\]")
    with pytest.raises(ValueError, match="mpbn=False"):
        neuron.MPBNLIFNode(out_features=3, mpbn=False).re_parameterize_v_threshold()


def test_folded_state_dict_saves_and_loads():
    node = trained_mpbn("normalized", None, True, True)
    node.re_parameterize_v_threshold()
    state = node.state_dict()
    assert {"mu", "sigma2", "gamma", "beta", "folded_v_threshold"} <= set(state)
    fresh = neuron.MPBNLIFNode(out_channels=5, step_mode="m", v_reset=None, learnable_vth=True)
    fresh.re_parameterize_v_threshold()
    fresh.load_state_dict(state)
    fresh.eval()
    x = torch.randn(3, 6, 5, 3, 3)
    assert torch.equal(node(x), fresh(x))
    assert torch.equal(node.v, fresh.v)


# spikingjelly's fold changes the network in these configurations; snnorm's does not.
@pytest.mark.parametrize(
    "case,kw,fold_kw",
    [
        ("soft reset", dict(v_reset=None), dict(normalize_residual=True)),
        ("normalize_residual=False, T>1", dict(), dict(normalize_residual=False)),
        ("gamma < 0", dict(), dict(normalize_residual=True)),
        ("learnable_vth with soft reset", dict(v_reset=None, learnable_vth=True), dict(normalize_residual=True)),
    ],
)
def test_spikingjelly_fold_defects_are_not_copied(case, kw, fold_kw):
    torch.manual_seed(7)
    ours = neuron.MPBNLIFNode(out_channels=4, step_mode="m", **kw)
    with torch.no_grad():
        ours.vbn.weight.uniform_(0.5, 1.5)
        if case == "gamma < 0":
            ours.vbn.weight.neg_()
        ours.vbn.bias.uniform_(-0.3, 0.3)
        ours.vbn.running_mean.uniform_(-0.5, 0.5)
        ours.vbn.running_var.uniform_(0.5, 2.0)
        if kw.get("learnable_vth"):
            ours.a.uniform_(-0.5, 0.5)
    theirs = sj_neuron.MPBNLIFNode(out_channels=4, step_mode="m", **kw)
    theirs.load_state_dict(ours.state_dict())
    ours.eval(), theirs.eval()
    x = torch.randn(6, 8, 4, 3, 3) * 2
    with torch.no_grad():
        reference = theirs(x)
        theirs.reset()
        theirs.re_parameterize_v_threshold(**fold_kw)
        try:
            theirs_folded = theirs(x)
        except RuntimeError:  # folded learnable_vth + soft reset: [C] threshold broadcast on W
            theirs_folded = None
        ours_ref = ours(x)
        ours.reset()
        ours.re_parameterize_v_threshold()
        ours_folded = ours(x)
    if case != "learnable_vth with soft reset":  # there snnorm's soft reset differs by design
        assert torch.equal(reference, ours_ref)
    assert theirs_folded is None or not torch.equal(reference, theirs_folded), f"spikingjelly's fold defect ({case}) no longer present?"
    assert torch.equal(ours_ref, ours_folded)


def test_threshold_modulation_matches_spikingjelly_and_decays_momentum():
    """Test-time adaptation after folding (arXiv 2505.05375), hard reset, gamma > 0."""
    torch.manual_seed(8)
    ours, theirs = mpbn_pair("conv", step_mode="m")
    ours.re_parameterize_v_threshold(running_stats=True)
    theirs.re_parameterize_v_threshold(normalize_residual=True, running_stats=True)
    ours.train(), theirs.train()
    x = torch.randn(5, *STEP_SHAPES["conv"]) * 2 + 1
    with torch.no_grad():
        sa, sb = ours(x), theirs(x)
    assert torch.equal(sa, sb)
    assert_close(ours.mu, theirs.mu, "mu")
    assert_close(ours.sigma2, theirs.sigma2, "sigma2")
    assert ours.bn_momentum == pytest.approx(0.1 * 0.94**5)
    for _ in range(120):
        functional.reset_net(ours)
        with torch.no_grad():
            ours(x)
    assert ours.bn_momentum == pytest.approx(0.005)


# ---------------------------------------------------------------- bad input and state
def test_bad_input_raises_and_changes_nothing():
    node = neuron.MPBNLIFNode(out_channels=3, step_mode="m")
    node(torch.randn(2, 4, 3, 5, 5))
    before = {k: v.clone() for k, v in node.state_dict().items()}
    v_before = node.v.clone()
    with pytest.raises(ValueError, match="expected 3 channels"):
        node(torch.randn(2, 4, 5, 5, 5))
    with pytest.raises(ValueError, match="per-step shape"):
        node(torch.randn(2, 4, 3, 5, 5, 5))
    with pytest.raises(TypeError, match="floating-point"):
        node(torch.ones(2, 4, 3, 5, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="changed in the middle of a sequence"):
        node(torch.randn(2, 7, 3, 5, 5))
    for k, v in node.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert torch.equal(node.v, v_before)
    functional.reset_net(node)
    node(torch.randn(2, 7, 3, 5, 5))  # after a reset a new batch size is fine


def test_constructor_checks():
    with pytest.raises(ValueError, match="tau must be > 1"):
        neuron.LIFNode(tau=1.0)
    with pytest.raises(TypeError, match="tau must be a real number"):
        neuron.MPBNLIFNode(tau="2", out_features=3)
    assert neuron.LIFNode(tau=3).tau == 3.0  # an int tau is fine
    with pytest.raises(ValueError, match="step_mode must be one of"):
        neuron.LIFNode(step_mode="x")
    with pytest.raises(ValueError, match="backend must be one of"):
        neuron.LIFNode(backend="cuda")
    with pytest.raises(ValueError, match="exactly one of out_features or out_channels"):
        neuron.MPBNLIFNode()
    with pytest.raises(ValueError, match="carry must be one of"):
        neuron.MPBNLIFNode(out_features=2, carry="pre")


def test_default_surrogates_are_not_shared():
    a, b = neuron.LIFNode(), neuron.LIFNode()
    assert a.surrogate_function is not b.surrogate_function
    a.surrogate_function.alpha = 10.0
    assert b.surrogate_function.alpha == 4.0


def test_state_dict_round_trip_and_spikingjelly_load():
    theirs = sj_neuron.MPBNLIFNode(out_features=6, learnable_vth=True)
    ours = neuron.MPBNLIFNode(out_features=6, learnable_vth=True)
    ours.load_state_dict(theirs.state_dict())
    theirs.load_state_dict(ours.state_dict())
    assert set(ours.state_dict()) == set(theirs.state_dict())


def test_store_v_seq_and_reset():
    node = neuron.MPBNLIFNode(out_features=3, step_mode="m", store_v_seq=True)
    plain = neuron.MPBNLIFNode(out_features=3, step_mode="m")
    x = torch.randn(4, 5, 3)
    assert torch.equal(node(x), plain(x))
    assert node.v_seq.shape == (4, 5, 3)
    assert torch.equal(node.v_seq[-1], node.v)
    functional.reset_net(node)
    assert node.v == 0.0 and node.v_seq is None


# ---------------------------------------------------------------- one neuron, a membrane-norm strategy
def test_mpbn_base_node_stands_alone_and_equals_mpbn_lif():
    # MPBNBaseNode has its own charge (tau, decay_input; MPBNLIFNode's defaults)
    torch.manual_seed(11)
    base = neuron.MPBNBaseNode(out_channels=3, step_mode="m", tau=3.0, decay_input=True)
    lif = neuron.MPBNLIFNode(tau=3.0, decay_input=True, out_channels=3, step_mode="m")
    lif.load_state_dict(base.state_dict())
    x = torch.randn(4, 5, 3, 2, 2) * 2
    assert torch.equal(base(x), lif(x))
    assert torch.equal(base.v, lif.v)
    assert torch.equal(base.vbn.running_mean, lif.vbn.running_mean)
    base.eval()
    base.re_parameterize_v_threshold()
    assert base(x).shape == x.shape
    infinite = neuron.MPBNBaseNode(out_features=2, step_mode="m", mpbn=False, tau=float("inf"))
    s = infinite(torch.tensor([[[0.6, 0.3]], [[0.6, 0.3]]]))  # IF charge: 0.6 + 0.6 fires, 0.3 + 0.3 does not
    assert torch.equal(s, torch.tensor([[[0.0, 0.0]], [[1.0, 0.0]]]))


@pytest.mark.parametrize("mpbn, learnable", [(True, False), (True, True), (False, False), (False, True)])
def test_fold_swaps_the_membrane_norm_and_keeps_checkpoint_keys(mpbn, learnable):
    node = neuron.MPBNLIFNode(out_channels=3, mpbn=mpbn, learnable_vth=learnable)
    before = set(node.state_dict())
    expected = ({"vbn.weight", "vbn.bias", "vbn.running_mean", "vbn.running_var", "vbn.num_batches_tracked"}
                if mpbn else set()) | ({"a"} if learnable else set())
    assert before == expected
    assert isinstance(node.membrane_norm, neuron.BatchStatsNorm if mpbn else neuron.NoMembraneNorm)
    assert (node.mpbn, node.fold_bn, node.learnable_vth, node.eps, node.running_stats) == (mpbn, False, learnable, None, False)
    if not mpbn:
        return
    node.re_parameterize_v_threshold(running_stats=True)
    assert isinstance(node.membrane_norm, neuron.FoldedThresholdNorm)
    assert set(node.state_dict()) == {
        "mu", "sigma2", "gamma", "beta", "normalized_v_threshold", "folded_v_threshold", "adapt_momentum",
    }
    assert (node.mpbn, node.fold_bn, node.learnable_vth, node.eps, node.running_stats) == (True, True, False, 1e-5, True)
    node.running_stats = False
    assert not node.membrane_norm.running_stats


def test_running_stats_before_folding_is_an_error():
    node = neuron.MPBNLIFNode(out_features=3)
    with pytest.raises(RuntimeError, match="fold first"):
        node.running_stats = True
    assert not node.running_stats


def test_lif_parameters_bundle_what_the_module_holds():
    sur = surrogate.ATan()
    node = neuron.LIFNode(tau=3.0, decay_input=False, v_reset=None, surrogate_function=sur, detach_reset=True)
    p = node.lif_parameters
    assert p == (sur, 3.0, False, None, True) and p.soft_reset and p.v_rest == 0.0
    assert neuron.IFNode().lif_parameters.tau == float("inf")
    k = p.for_kernel("atan", 2.0)
    assert k.to_op_args() == (3.0, False, 0.0, True, True, "atan", 2.0)
    assert type(k).from_op_args(k.to_op_args() + (1, "x")) == (k, (1, "x"))
