"""Drop-in points where code written against spikingjelly 2.0.0 must run unchanged on snnorm.

Written as spikingjelly's own tests are (plain functions, the spikingjelly API spelled as
users spell it), with spikingjelly itself as the oracle where it has the same feature:

* ``eps = 0`` is accepted as torch accepts it (running statistics in eval, weight
  standardisation; GroupNorm refuses it, tests/test_careless_users.py) on the torch and the triton backend; eps < 0, NaN and inf are
  refused; batch statistics (training) refuse eps = 0 before any state moves;
* ``base.to_functional_forward`` of an ``nn.Sequential``: keyword arguments reach the
  first module only, a tuple output is spread into the next module's arguments;
* ``functional.fuse_conv_bn_eval_modules`` fuses a conv → BN pair called twice, and leaves
  a conv alone whose output goes elsewhere too;
* the errors for a wrong T and for tuple members with different leading dims carry
  spikingjelly's phrases ("temporal length", "[T, batch_size] leading dimensions").
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from snnorm import base, functional, layer, memopt, neuron

from devices import SLOW_ON_CPU
from helpers import EPS_CONSTRUCTORS, NORM_CASES, assert_unchanged, snapshot, with_backends
from tolerances import REORDERED_FP64, TEBN_MODULE_REL

sj_layer = pytest.importorskip("spikingjelly.activation_based.layer", reason="spikingjelly 2.0.0 is the oracle")
from spikingjelly.activation_based import base as sj_base  # noqa: E402
from spikingjelly.activation_based import functional as sj_functional  # noqa: E402
from spikingjelly.activation_based import neuron as sj_neuron  # noqa: E402
from spikingjelly.activation_based.functional import conv_bn_fusion as sj_fusion  # noqa: E402

T, N, C, H, W = 4, 3, 5, 6, 6
F64 = torch.float64


def _randomise_running_stats(module: nn.Module) -> None:
    """Running statistics far from the (0, 1) start, so eps = 0 changes the output."""
    torch.manual_seed(7)
    for name, buf in module.named_buffers():
        if name.endswith("running_mean"):
            buf.uniform_(-1.0, 1.0)
        elif name.endswith("running_var"):
            buf.uniform_(0.05, 0.5)


# -- eps = 0 ------------------------------------------------------------------------------------

EPS_LAYERS = [
    # (name, snnorm layer, spikingjelly layer, input shape), eps = 0 given to both constructors
    ("BatchNorm2d", lambda: layer.BatchNorm2d(C, eps=0.0, step_mode="m"),
     lambda: sj_layer.BatchNorm2d(C, eps=0.0, step_mode="m"), (T, N, C, H, W)),
    ("tdBN1d", lambda: layer.ThresholdDependentBatchNorm1d(1.0, 0.5, C, eps=0.0),
     lambda: sj_layer.ThresholdDependentBatchNorm1d(1.0, 0.5, C, eps=0.0), (T, N, C, 7)),
    ("TEBN2d", lambda: layer.TemporalEffectiveBatchNorm2d(T, C, eps=0.0),
     lambda: sj_layer.TemporalEffectiveBatchNorm2d(T, C, eps=0.0), (T, N, C, H, W)),
    ("BNTT2d", lambda: layer.BatchNormThroughTime2d(T, C, eps=0.0, step_mode="m"),
     lambda: sj_layer.BatchNormThroughTime2d(T, C, eps=0.0, step_mode="m"), (T, N, C, H, W)),
    # GroupNorm refuses eps = 0 (its statistics come from the input): tests/test_careless_users.py
    ("WSConv2d", lambda: layer.WSConv2d(C, 4, 3, eps=0.0, step_mode="m"),
     lambda: sj_layer.WSConv2d(C, 4, 3, eps=0.0, step_mode="m"), (T, N, C, H, W)),
]


@pytest.mark.parametrize("make, make_sj, shape", [p[1:] for p in EPS_LAYERS], ids=[p[0] for p in EPS_LAYERS])
def test_eps_zero_eval_equals_spikingjelly(make, make_sj, shape):
    """spikingjelly's BNTT test evaluates with eps = 0: the same numbers as spikingjelly."""
    theirs = make_sj().to(F64)
    _randomise_running_stats(theirs)
    ours = make().to(F64)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    ours.eval(), theirs.eval()
    x = torch.randn(shape, dtype=F64)
    assert all(m.eps == 0.0 for m in _eps_modules(ours))
    torch.testing.assert_close(ours(x), theirs(x), **REORDERED_FP64)


def test_bntt_eps_zero_single_step_sequence_equals_spikingjelly():
    ours, theirs = layer.BatchNormThroughTime1d(T, C, eps=0), sj_layer.BatchNormThroughTime1d(T, C, eps=0)
    theirs.to(F64), ours.to(F64)
    _randomise_running_stats(theirs)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    ours.eval(), theirs.eval()
    for x in torch.randn(T, N, C, dtype=F64):  # step t uses the statistics of BN t
        torch.testing.assert_close(ours(x), theirs(x), **REORDERED_FP64)
    assert ours.t == theirs.t == T - 1


def test_eps_zero_eval_uses_the_exact_formula():
    """y = γ (x − μ)/√σ² + β with nothing added under the root (eps = 0 really is 0)."""
    bn = layer.BatchNorm1d(C, eps=0.0, dtype=F64)
    _randomise_running_stats(bn)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2.0), bn.bias.uniform_(-1.0, 1.0)
    bn.eval()
    x = torch.randn(N, C, dtype=F64)
    expected = bn.weight * (x - bn.running_mean) / bn.running_var.sqrt() + bn.bias
    torch.testing.assert_close(bn(x), expected, **REORDERED_FP64)
    bn.eps = 1e-3  # and a non-zero eps gives something else
    assert not torch.allclose(bn(x), expected, **REORDERED_FP64)


def _eps_modules(module: nn.Module):
    """Every submodule with an eps of its own (a BNTT's per-step BNs, an MPBN neuron's vbn)."""
    return [m for m in module.modules() if isinstance(getattr(m, "eps", None), float)]


TRITON_CASES = [case for case in NORM_CASES if "triton" in case.backends and _eps_modules(case.make())
                and not isinstance(case.make(), (layer.LayerNorm, layer.RMSNorm))]  # no running statistics: eps > 0


@pytest.mark.parametrize("case", TRITON_CASES, ids=lambda c: c.name)
def test_eps_zero_eval_triton_equals_torch(case):
    """TEBN, TAB and the MPBN neuron (folded too): eps = 0 in eval on both backends, no
    special case for eps > 0 in the kernels (√(σ² + 0) = σ)."""
    outputs = {}
    for backend in ("torch", "triton"):
        module = case.build(backend).to(F64)
        module(case.input(F64))  # training with the default eps: non-trivial running statistics
        functional.reset_net(module)
        for m in _eps_modules(module):
            m.eps = 0.0
        module.eval()
        y = module(case.input(F64))
        outputs[backend] = y[0] if isinstance(y, tuple) else y
        assert torch.isfinite(outputs[backend]).all()
    if isinstance(case.build(), neuron.BaseNode):
        assert torch.equal(outputs["triton"], outputs["torch"])  # spikes: no flip in fp64 here
    else:
        ref = outputs["torch"]
        assert (outputs["triton"] - ref).abs().max() <= TEBN_MODULE_REL[F64] * ref.abs().max()


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=SLOW_ON_CPU)])
def test_mpbn_fold_with_eps_zero_keeps_the_spikes(backend):
    node = neuron.MPBNLIFNode(out_channels=C, step_mode="m", backend=backend).to(F64)
    torch.manual_seed(3)
    node(torch.randn(T, N, C, H, W, dtype=F64) + 0.5)
    functional.reset_net(node)
    node.vbn.eps = 0.0
    node.eval()
    x = torch.randn(T, N, C, H, W, dtype=F64) + 0.5
    unfolded = node(x)
    functional.reset_net(node)
    node.re_parameterize_v_threshold(running_stats=True)
    assert node.eps == 0.0 and torch.isfinite(node.folded_v_threshold).all()
    assert torch.equal(node(x), unfolded)


# the folded MPBN neuron copies vbn.eps at folding time; a later reassignment is not re-checked
@pytest.mark.parametrize(
    "case, backend", with_backends([c for c in NORM_CASES if _eps_modules(c.make()) and "folded" not in c.name])
)
@pytest.mark.parametrize("bad", [-1e-5, math.nan, math.inf])
def test_negative_nan_inf_eps_refused_before_any_state_moves(case, backend, bad):
    module = case.build(backend)
    module(case.input())
    before = snapshot(module)
    for m in _eps_modules(module):
        m.eps = bad
    with pytest.raises(ValueError) as info:
        module(case.input())
    message = str(info.value)
    assert message.startswith(type(module).__name__) and "eps" in message and str(bad) in message, message
    for m in _eps_modules(module):
        m.eps = 1e-5
    assert_unchanged(module, before)


BN_TRAINING = [
    lambda: layer.BatchNorm2d(C, step_mode="m"),
    lambda: layer.TemporalEffectiveBatchNorm2d(T, C),
    lambda: layer.TemporalAccumulatedBatchNorm2d(T, C),
    lambda: layer.BatchNormThroughTime2d(T, C, step_mode="m"),
    lambda: layer.BatchNormTT2d(C, T, step_mode="m"),
    lambda: neuron.MPBNLIFNode(out_channels=C, step_mode="m"),
]


@pytest.mark.parametrize("make", BN_TRAINING)
def test_eps_zero_in_training_is_refused_before_counting(make):
    """torch refuses eps = 0 with batch statistics only after counting the batch; the
    constructor takes it (for eval), a training forward refuses it and changes nothing."""
    bn = nn.BatchNorm2d(C, eps=0.0)
    with pytest.raises(ValueError, match="eps must be positive during training"):
        bn(torch.randn(N, C, H, W))
    assert int(bn.num_batches_tracked) == 1  # the torch defect

    module = make()
    for m in _eps_modules(module):
        m.eps = 0.0
    before = snapshot(module)
    with pytest.raises(ValueError, match=r"eps must be > 0 when normalising with batch statistics.*got 0\.0"):
        module(torch.randn(T, N, C, H, W))
    assert_unchanged(module, before)
    module.eval()
    assert torch.isfinite(module(torch.randn(T, N, C, H, W))[0]).all()


@pytest.mark.parametrize("make", EPS_CONSTRUCTORS.values(), ids=EPS_CONSTRUCTORS.keys())
def test_constructors_take_eps_zero(make):
    """eps = 0 as torch takes it (helpers.EPS_CONSTRUCTORS; the refused values, helpers.BAD_EPS,
    are rows of helpers.BAD_CONSTRUCTORS, run by tests/test_validation.py)."""
    for zero in (0.0, 0):
        eps = [m.eps for m in make(zero).modules() if hasattr(m, "eps")]
        assert eps and all(e == 0 for e in eps), eps


def test_ws_trains_with_eps_zero():
    """No batch statistics to refuse there: spikingjelly's WS takes eps = 0 (GroupNorm, whose
    statistics come from the input, refuses it: tests/test_careless_users.py)."""
    x = torch.randn(T, N, C, H, W, dtype=F64)
    ws, sj_ws = layer.WSLinear(W, 4, eps=0.0).to(F64), sj_layer.WSLinear(W, 4, eps=0.0).to(F64)
    ws.load_state_dict(sj_ws.state_dict(), strict=True)
    torch.testing.assert_close(ws(x), sj_ws(x), **REORDERED_FP64)


# -- to_functional_forward ------------------------------------------------------------------


class Scale(nn.Module):
    def forward(self, x, scale=1.0):
        return x * scale


class Split(nn.Module):
    def forward(self, x):
        return x, x + 1.0


class Join(nn.Module):
    def forward(self, a, b):
        return a * b


def test_functional_forward_sequential_kwargs_first_and_tuples_spread():
    net = nn.Sequential(Scale(), Split(), Join())
    x = torch.randn(N, C)
    ours = base.to_functional_forward(net)((x,), (), scale=2.0)
    theirs = sj_base.to_functional_forward(net)((x,), (), scale=2.0)
    assert ours[1] == theirs[1] == ()
    assert torch.equal(ours[0][0], (2 * x) * (2 * x + 1))
    assert len(ours[0]) == 1 and torch.equal(ours[0][0], theirs[0][0])
    # a tuple at the end stays a tuple of outputs
    (a, b), _ = base.to_functional_forward(nn.Sequential(Scale(), Split()))((x,), (), scale=3.0)
    assert torch.equal(a, 3 * x) and torch.equal(b, 3 * x + 1)


def test_functional_forward_sequential_with_neuron_equals_spikingjelly():
    x = torch.rand(T, N, C, dtype=F64) * 2
    ours = nn.Sequential(Scale(), neuron.LIFNode(tau=2.0, step_mode="m"), Split(), Join())
    theirs = nn.Sequential(Scale(), sj_neuron.LIFNode(tau=2.0, step_mode="m"), Split(), Join())
    f, sj_f = base.to_functional_forward(ours), sj_base.to_functional_forward(theirs)
    (y,), (v,) = f((x,), (0.0,), scale=1.5)
    (sj_y,), (sj_v,) = sj_f((x,), (0.0,), scale=1.5)
    assert torch.equal(y, sj_y)
    torch.testing.assert_close(v, sj_v, **REORDERED_FP64)
    assert ours[1].v == 0.0  # the module's own memory is left alone
    (y2,), _ = f((x,), (v,), scale=1.5)  # the returned state continues the sequence
    (sj_y2,), _ = sj_f((x,), (sj_v,), scale=1.5)
    assert torch.equal(y2, sj_y2)


def test_functional_forward_nested_sequential_loads_the_states():
    """A memory below a direct child: the chain still gives kwargs to the first child only."""
    lif = neuron.IFNode(step_mode="m")
    net = nn.Sequential(Scale(), nn.Sequential(lif, Split()), Join())
    x = torch.rand(T, N, C)
    (y,), (v,) = base.to_functional_forward(net)((x,), (0.0,), scale=2.0)
    assert lif.v == 0.0
    spikes = lif(2 * x)
    assert torch.equal(y, spikes * (spikes + 1)) and torch.equal(v, lif.v)
    with pytest.raises(ValueError, match="expected 1 states, but got 2"):
        base.to_functional_forward(net)((x,), (0.0, 0.0))


class TwoOutputs(nn.Module):
    def forward(self, x, shift=0.0):
        return [x + shift, x - shift]


def test_functional_forward_other_modules_call_forward_as_spikingjelly():
    """Not a plain Sequential: ``module.forward(*inputs, **kwargs)``; a list output becomes a
    tuple; forward hooks are not run (spikingjelly calls ``module.forward``)."""
    net = TwoOutputs()
    calls = []
    net.register_forward_hook(lambda *_: calls.append(1))
    x = torch.randn(N, C)
    for to_functional in (base.to_functional_forward, sj_base.to_functional_forward):
        outputs, states = to_functional(net)((x,), (), shift=0.5)
        assert isinstance(outputs, tuple) and states == ()
        assert torch.equal(outputs[0], x + 0.5) and torch.equal(outputs[1], x - 0.5)
    assert calls == []

    class Doubled(nn.Sequential):  # forward overridden: its own forward takes the kwargs
        def forward(self, x, scale=1.0):
            return super().forward(x * scale) * 2

    net = Doubled(nn.Identity(), nn.Identity())  # nn.Identity takes no keyword arguments
    (y,), _ = base.to_functional_forward(net)((x,), (), scale=3.0)
    (sj_y,), _ = sj_base.to_functional_forward(net)((x,), (), scale=3.0)
    assert torch.equal(y, sj_y) and torch.equal(y, 2 * (3 * x))


def test_functional_forward_of_a_memory_module_and_a_custom_fn():
    lif = neuron.LIFNode(step_mode="m")
    x = torch.rand(T, N, C) * 3
    (y,), (v,) = base.to_functional_forward(lif)((x,), (0.0,))
    assert lif.v == 0.0 and torch.equal(y, lif(x)) and torch.equal(v, lif.v)
    functional.reset_net(lif)
    (y,), (v,) = base.to_functional_forward(lif, fn=lambda x, k: lif(x * k))((x,), (0.0,), k=0.5)
    assert torch.equal(y, lif(0.5 * x)) and torch.equal(v, lif.v)


# -- conv-BN fusion ---------------------------------------------------------------------------


def _eval_bn(bn: nn.Module) -> nn.Module:
    _randomise_running_stats(bn)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5), bn.bias.uniform_(-0.5, 0.5)
    return bn


class SharedPair(nn.Module):
    """The same conv → BN pair applied twice (a weight-tied block)."""

    def __init__(self, conv_bn_cls=(nn.Conv2d, nn.BatchNorm2d)):
        super().__init__()
        self.conv = conv_bn_cls[0](C, C, 3, padding=1)
        self.bn = _eval_bn(conv_bn_cls[1](C))

    def forward(self, x):
        return self.bn(self.conv(torch.relu(self.bn(self.conv(x)))))


def _bns(module: nn.Module):
    return [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def _conv_calls(graph_module) -> list:
    return [n.target for n in graph_module.graph.nodes if n.op == "call_module"]


@pytest.mark.parametrize("classes", [(nn.Conv2d, nn.BatchNorm2d), (layer.Conv2d, layer.BatchNorm2d)])
def test_fuse_a_conv_bn_pair_used_twice(classes):
    net = SharedPair(classes).to(F64).eval()
    fused = functional.fuse_conv_bn_eval_modules(net)
    assert _bns(fused) == [] and _conv_calls(fused) == ["conv", "conv"]
    x = torch.randn(N, C, H, W, dtype=F64)
    torch.testing.assert_close(fused(x), net(x), **REORDERED_FP64)
    assert _bns(net) == [net.bn]  # the network itself keeps its BN
    if classes[0] is nn.Conv2d:  # spikingjelly fuses it the same way
        theirs = sj_fusion.fuse_conv_bn_eval_modules(net)
        assert _bns(theirs) == []
        torch.testing.assert_close(fused(x), theirs(x), **REORDERED_FP64)


class ConvTwoBNs(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(C, C, 3, padding=1)
        self.bn1, self.bn2 = _eval_bn(nn.BatchNorm2d(C)), _eval_bn(nn.BatchNorm2d(C))
        with torch.no_grad():
            self.bn2.running_mean.add_(1.0)

    def forward(self, x):
        return self.bn1(self.conv(x)) + self.bn2(self.conv(x))


class ConvOutputReused(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(C, C, 3, padding=1)
        self.bn = _eval_bn(nn.BatchNorm2d(C))

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y


class ConvOnceWithoutBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(C, C, 3, padding=1)
        self.bn = _eval_bn(nn.BatchNorm2d(C))

    def forward(self, x):
        return self.bn(self.conv(x)) * self.conv(x)


@pytest.mark.parametrize("make", [ConvTwoBNs, ConvOutputReused, ConvOnceWithoutBN])
def test_a_conv_used_otherwise_is_not_fused(make):
    net = make().to(F64).eval()
    fused = functional.fuse_conv_bn_eval_modules(net)
    assert len(_bns(fused)) == len(_bns(net))
    x = torch.randn(N, C, H, W, dtype=F64)
    torch.testing.assert_close(fused(x), net(x), **REORDERED_FP64)


class TwoConvsOneBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(C, C, 3, padding=1), nn.Conv2d(C, C, 1)
        self.bn = _eval_bn(nn.BatchNorm2d(C))

    def forward(self, x):
        return self.bn(self.conv1(x)) - self.bn(self.conv2(x)) + self.bn(x)


def test_a_bn_after_two_convs_and_on_its_own_is_fused_into_each_conv_and_kept():
    net = TwoConvsOneBN().to(F64).eval()
    fused = functional.fuse_conv_bn_eval_modules(net)
    assert _conv_calls(fused) == ["conv1", "conv2", "bn"]  # the bn(x) call keeps the module
    x = torch.randn(N, C, H, W, dtype=F64)
    torch.testing.assert_close(fused(x), net(x), **REORDERED_FP64)


def test_pack_a_conv_bn_pair_used_twice_trains_like_the_network():
    net = SharedPair((layer.Conv2d, layer.BatchNorm2d)).to(F64).train()
    functional.set_step_mode(net, "m")
    twin = SharedPair((layer.Conv2d, layer.BatchNorm2d)).to(F64).train()
    twin.load_state_dict(net.state_dict())
    functional.set_step_mode(twin, "m")
    packed = functional.pack_conv_bn_train_modules(twin)
    assert _conv_calls(packed) == ["conv", "conv"]
    x = torch.randn(T, N, C, H, W, dtype=F64)
    torch.testing.assert_close(packed(x), net(x), **REORDERED_FP64)
    for (name, a), b in zip(net.state_dict().items(), twin.state_dict().values()):
        torch.testing.assert_close(a, b, **REORDERED_FP64, msg=name)


# -- spikingjelly's key phrases in the errors ---------------------------------------------------


@pytest.mark.parametrize("make", [
    lambda: layer.TemporalEffectiveBatchNorm2d(T, C),
    lambda: layer.BatchNormThroughTime2d(T, C, step_mode="m"),
    lambda: layer.BatchNormTT2d(C, T, step_mode="m"),
    lambda: layer.TemporalAccumulatedBatchNorm2d(T, C),
])
def test_wrong_T_says_temporal_length(make):
    module = make()
    with pytest.raises(ValueError, match="temporal length") as info:
        module(torch.randn(T + 1, N, C, H, W))
    assert f"T={T}" in str(info.value) and f"T={T + 1}" in str(info.value)  # and snnorm's own detail


def test_tuple_members_with_other_leading_dims_say_it_as_spikingjelly():
    a, b = torch.randn(T, N, C), torch.randn(T, N + 1, C)
    phrase = r"\[T, batch_size\] leading dimensions"
    with pytest.raises(ValueError, match=phrase):
        sj_functional.seq_to_ann_forward((a, b), torch.add)
    with pytest.raises(ValueError, match=phrase):
        functional.seq_to_ann_forward((a, b), torch.add)
    with pytest.raises(ValueError, match="temporal length"):
        functional.multi_step_forward((a, torch.randn(T + 1, N, C)), torch.add)


def test_checkpoint_chunks_say_temporal_length():
    wrapped = memopt.CheckpointModule(Join(), chunks=2, chunked_args=(0, 1))
    with pytest.raises(ValueError, match="same temporal length"):
        wrapped(torch.randn(T, N, C), torch.randn(T + 1, N, C))
    with pytest.raises(ValueError, match=r"temporal length T >= chunks"):
        memopt.CheckpointModule(Join(), chunks=T + 1)(torch.randn(T, N, C), torch.randn(T, N, C))
