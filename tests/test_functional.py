"""snnorm.functional: network helpers and conv-BN fusion.

Oracles: spikingjelly 2.0.0's functional helpers and conv-BN fusion
(``fuse_conv_bn_eval_modules``), torch's ``torch.nn.utils.fusion.fuse_conv_bn_eval``,
and the unfused ``bn(conv(x))`` in eval mode.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn as nn
from spikingjelly.activation_based import functional as sj_functional
from spikingjelly.activation_based import layer as sj_layer
from spikingjelly.activation_based import neuron as sj_neuron
from spikingjelly.activation_based.functional import conv_bn_fusion as sj_fusion
from torch.nn.utils.fusion import fuse_conv_bn_eval as torch_fuse_conv_bn_eval
from tolerances import EXACT, FUSED_BUFFERS_FP32, FUSED_OUTPUT_FP32, FUSED_PARAMS_FP32, RELAYOUT_FP32

from snnorm import backends, base, functional, layer, neuron


def _randomise_bn(bn: nn.Module, seed: int) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        c = bn.num_features
        bn.running_mean.copy_(torch.randn(c, generator=g))
        bn.running_var.copy_(torch.rand(c, generator=g) * 2 + 0.1)
        if bn.weight is not None:
            bn.weight.copy_(torch.randn(c, generator=g))  # negative γ too
            bn.bias.copy_(torch.randn(c, generator=g))
    return bn


# -- reset_net, set_step_mode, set_backend ---------------------------------------------


def test_reset_net_resets_modules_added_after_an_earlier_reset():
    net = nn.Sequential(neuron.LIFNode(step_mode="m"))
    functional.reset_net(net)
    x = torch.rand(3, 2, 5) * 3
    net(x)
    net.append(neuron.LIFNode(step_mode="m"))  # inserted after the first reset
    net(x)
    assert all(isinstance(m.v, torch.Tensor) and m.v.abs().sum() > 0 for m in net)
    functional.reset_net(net)
    for m in net:
        assert m.v == 0.0  # the registered reset value (v_reset)


def test_set_step_mode_rejects_bad_modes():
    net = nn.Sequential(layer.Conv2d(1, 2, 3), neuron.LIFNode())
    with pytest.raises(ValueError, match="'x'"):
        functional.set_step_mode(net, "x")
    assert net[0].step_mode == "s" and net[1].step_mode == "s"  # nothing changed

    multi_only = nn.Sequential(layer.ThresholdDependentBatchNorm2d(1.0, 1.0, 2))
    with pytest.raises(ValueError, match=r"'0'.*ThresholdDependentBatchNorm2d.*'s'"):
        functional.set_step_mode(multi_only, "s")
    functional.set_step_mode(net, "m")
    assert net[0].step_mode == "m" and net[1].step_mode == "m"


class _TorchOnly(nn.Module, base.StepModule):
    supported_backends = ("torch",)


class _Both(nn.Module, base.StepModule):
    supported_backends = ("torch", "_test_fake")


@pytest.fixture
def fake_backends():
    torch_ops = backends.get_ops("torch")._ops

    def unavailable():
        raise backends.BackendUnavailableError("needs a device this test machine does not have")

    backends.register_backend("_test_fake", lambda: torch_ops)
    backends.register_backend("_test_unavailable", unavailable)
    yield
    for name in ("_test_fake", "_test_unavailable"):
        backends._LOADERS.pop(name, None)
        backends._LOADED.pop(name, None)


def test_set_backend_unknown_backend_changes_nothing(fake_backends):
    net = nn.Sequential(_Both(), _TorchOnly())
    with pytest.raises(ValueError, match="unknown backend 'nope'"):
        functional.set_backend(net, "nope")
    assert net[0].backend == "torch"


def test_set_backend_unavailable_backend_says_why(fake_backends):
    class _Wants(nn.Module, base.StepModule):
        supported_backends = ("torch", "_test_unavailable")

    net = nn.Sequential(_Wants())
    with pytest.raises(backends.BackendUnavailableError, match="does not have"):
        functional.set_backend(net, "_test_unavailable")
    assert net[0].backend == "torch"


def test_set_backend_warns_naming_modules_that_do_not_support_it(fake_backends):
    net = nn.Sequential(_Both(), nn.Sequential(_TorchOnly()))
    with pytest.warns(UserWarning, match=r"1\.0 \(_TorchOnly\)"):
        functional.set_backend(net, "_test_fake")
    assert net[0].backend == "_test_fake" and net[1][0].backend == "torch"
    # the instance filter: only _TorchOnly is selected -> nothing switches, it is named
    net2 = nn.Sequential(_Both(), _TorchOnly())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        functional.set_backend(net2, "_test_fake", instance=_Both)  # no warning: _TorchOnly not selected
    assert net2[0].backend == "_test_fake"


# -- forward helpers vs spikingjelly ------------------------------------------------


def test_seq_to_ann_forward_matches_spikingjelly():
    torch.manual_seed(0)
    x_seq = torch.randn(3, 2, 4, 7, 5)
    conv = nn.Conv2d(4, 6, 3, padding=1)
    pool = nn.AvgPool2d(2)
    for mods in (conv, [conv, pool], nn.Sequential(conv, pool)):
        y = functional.seq_to_ann_forward(x_seq, mods)
        y_ref = sj_functional.seq_to_ann_forward(x_seq, mods)
        assert y.shape == y_ref.shape
        torch.testing.assert_close(y, y_ref, **EXACT)
    assert functional.seq_to_ann_forward(x_seq, conv).shape == (3, 2, 6, 7, 5)
    with pytest.raises(ValueError, match=r"\[T, N, \.\.\.\]"):
        functional.seq_to_ann_forward(torch.randn(5), conv)


def test_multi_step_forward_matches_spikingjelly():
    torch.manual_seed(1)
    x_seq = torch.rand(5, 3, 4) * 2
    lin = nn.Linear(4, 4)
    lif = neuron.LIFNode(step_mode="s")
    y = functional.multi_step_forward(x_seq, [lin, lif])
    v = lif.v
    functional.reset_net(lif)
    y_ref = sj_functional.multi_step_forward(x_seq, [lin, lif])
    assert y.shape == (5, 3, 4)
    torch.testing.assert_close(y, y_ref, **EXACT)
    torch.testing.assert_close(v, lif.v, **EXACT)
    # a single module, and equality with the module's own multi-step forward
    functional.reset_net(lif)
    y1 = functional.multi_step_forward(x_seq, lif)
    lif_m = neuron.LIFNode(step_mode="m")
    torch.testing.assert_close(y1, lif_m(x_seq), **EXACT)


def test_chunk_multi_step_forward_matches_spikingjelly_and_the_whole_sequence():
    torch.manual_seed(2)
    x_seq = torch.rand(7, 2, 3) * 2
    lif = neuron.LIFNode(step_mode="m")
    whole = lif(x_seq)
    functional.reset_net(lif)
    for split in (1, 3, 7, 10):
        functional.reset_net(lif)
        y = functional.chunk_multi_step_forward(split, x_seq, lif)
        functional.reset_net(lif)
        y_ref = sj_functional.chunk_multi_step_forward(split, x_seq, lif)
        assert y.shape == x_seq.shape
        torch.testing.assert_close(y, y_ref, **EXACT)
        torch.testing.assert_close(y, whole, **EXACT)
    for bad in (0, -1, 1.5):
        with pytest.raises(ValueError, match="split_size"):
            functional.chunk_multi_step_forward(bad, x_seq, lif)


# -- conv-BN fusion ---------------------------------------------------------------------


def _conv_bn(conv_bias: bool, groups: int, affine: bool, seed: int):
    torch.manual_seed(seed)
    conv = nn.Conv2d(4, 6, 3, padding=1, groups=groups, bias=conv_bias)
    bn = _randomise_bn(nn.BatchNorm2d(6, affine=affine), seed)
    return conv.eval(), bn.eval()


@pytest.mark.parametrize("conv_bias", [False, True])
@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("affine", [True, False])
def test_fused_weight_and_bias_match_torch_fusion(conv_bias, groups, affine):
    conv, bn = _conv_bn(conv_bias, groups, affine, seed=3 + groups)
    ref = torch_fuse_conv_bn_eval(conv, bn)
    w = functional.fused_conv2d_weight_of_convbn2d(conv, bn)
    b = functional.fused_conv2d_bias_of_convbn2d(conv, bn)
    torch.testing.assert_close(w, ref.weight, **FUSED_PARAMS_FP32)
    torch.testing.assert_close(b, ref.bias, **FUSED_PARAMS_FP32)
    fused = functional.fuse_convbn2d(conv, bn)
    assert type(fused) is nn.Conv2d and fused.bias is not None and fused.groups == groups
    x = torch.randn(3, 4, 9, 8)
    torch.testing.assert_close(fused(x), bn(conv(x)), **FUSED_OUTPUT_FP32)


def test_fused_weight_is_differentiable():
    conv, bn = _conv_bn(False, 1, True, seed=7)
    w = functional.fused_conv2d_weight_of_convbn2d(conv, bn)
    w.sum().backward()
    assert conv.weight.grad is not None and bn.weight.grad is not None


def test_fuse_conv_bn_eval_matches_spikingjelly_multi_step_fusion():
    torch.manual_seed(8)
    sj_net = nn.Sequential(
        sj_layer.Conv2d(3, 5, 3, padding=1, bias=False, step_mode="m"),
        sj_layer.BatchNorm2d(5, step_mode="m"),
    )
    _randomise_bn(sj_net[1], 8)
    sj_net.eval()
    sj_fused = sj_fusion.fuse_conv_bn_eval_modules(sj_net)
    sj_conv = [m for m in sj_fused.modules() if isinstance(m, nn.Conv2d)]
    assert len(sj_conv) == 1

    fused = functional.fuse_conv_bn_eval(sj_net[0], sj_net[1])
    assert type(fused) is sj_layer.Conv2d and fused.step_mode == "m"
    torch.testing.assert_close(fused.weight, sj_conv[0].weight, **FUSED_PARAMS_FP32)
    torch.testing.assert_close(fused.bias, sj_conv[0].bias, **FUSED_PARAMS_FP32)
    x_seq = torch.randn(4, 2, 3, 6, 6)
    torch.testing.assert_close(fused(x_seq), sj_fused(x_seq), **FUSED_OUTPUT_FP32)


def _snnorm_multistep_bns():
    return [
        lambda c: layer.BatchNorm2d(c, step_mode="m"),
        lambda c: layer.ThresholdDependentBatchNorm2d(1.0, 0.5, c),
        lambda c: sj_layer.ThresholdDependentBatchNorm2d(1.0, 0.5, c),
        lambda c: sj_layer.BatchNorm2d(c, step_mode="m"),
    ]


@pytest.mark.parametrize("make_bn", _snnorm_multistep_bns())
@pytest.mark.parametrize("conv_bias", [False, True])
def test_fuse_conv_bn_eval_multi_step_equals_conv_then_bn(make_bn, conv_bias):
    torch.manual_seed(9)
    conv = layer.Conv2d(3, 5, 3, stride=2, padding=1, bias=conv_bias, step_mode="m")
    bn = _randomise_bn(make_bn(5), 9).eval()
    w_before = conv.weight.detach().clone()
    fused = functional.fuse_conv_bn_eval(conv, bn)
    assert type(fused) is layer.Conv2d and fused.step_mode == "m"
    assert torch.equal(conv.weight, w_before)  # the inputs are not changed
    assert (conv.bias is None) == (not conv_bias)
    x_seq = torch.randn(4, 2, 3, 9, 7)
    with torch.no_grad():
        torch.testing.assert_close(fused(x_seq), bn(conv(x_seq)), **FUSED_OUTPUT_FP32)


def test_fuse_conv_bn_eval_conv1d_and_conv3d():
    torch.manual_seed(10)
    for conv, bn, x in (
        (nn.Conv1d(3, 4, 3), nn.BatchNorm1d(4), torch.randn(2, 3, 11)),
        (nn.Conv3d(2, 4, 3, padding=1), nn.BatchNorm3d(4), torch.randn(2, 2, 5, 4, 6)),
    ):
        _randomise_bn(bn, 10).eval()
        fused = functional.fuse_conv_bn_eval(conv, bn)
        torch.testing.assert_close(fused(x), bn(conv(x)), **FUSED_OUTPUT_FP32)
        ref = torch_fuse_conv_bn_eval(conv.eval(), bn)
        torch.testing.assert_close(fused.weight, ref.weight, **FUSED_PARAMS_FP32)
        torch.testing.assert_close(fused.bias, ref.bias, **FUSED_PARAMS_FP32)


def test_fuse_conv_bn_eval_errors():
    conv = nn.Conv2d(3, 4, 3)
    bn = nn.BatchNorm2d(4)
    with pytest.raises(ValueError, match="training mode"):
        functional.fuse_conv_bn_eval(conv, bn)  # bn.train() by default
    with pytest.raises(ValueError, match="4 output channels.*num_features=5"):
        functional.fuse_conv_bn_eval(conv, nn.BatchNorm2d(5).eval())
    for not_bn in (nn.LayerNorm(4), nn.Identity(), nn.GroupNorm(2, 4)):
        with pytest.raises(TypeError, match="expected a BatchNorm"):
            functional.fuse_conv_bn_eval(conv, not_bn)
    with pytest.raises(TypeError, match="expected a convolution"):
        functional.fuse_conv_bn_eval(nn.Linear(3, 4), bn.eval())
    with pytest.raises(TypeError, match="expected a convolution"):
        functional.fuse_conv_bn_eval(nn.ConvTranspose2d(3, 4, 3), bn.eval())
    with pytest.raises(ValueError, match="track running statistics"):
        functional.fuse_conv_bn_eval(conv, nn.BatchNorm2d(4, track_running_stats=False).eval())
    with pytest.raises(ValueError, match="spatial dims"):
        functional.fuse_conv_bn_eval(conv, nn.BatchNorm1d(4).eval())
    with pytest.raises(ValueError, match="spatial dims"):
        functional.fuse_conv_bn_eval(conv, layer.ThresholdDependentBatchNorm1d(1.0, 1.0, 4).eval())
    # TEBN scales each timestep: not a per-channel affine map
    for tebn in (layer.TemporalEffectiveBatchNorm2d(4, 4), sj_layer.TemporalEffectiveBatchNorm2d(4, 4)):
        with pytest.raises(TypeError, match="scale"):
            functional.fuse_conv_bn_eval(conv, tebn.eval())
    # weight-standardised convs compute their weight
    for ws in (layer.WSConv2d(3, 4, 3), layer.WSConv2d(3, 4, 3, gain=False)):
        with pytest.raises(TypeError, match="transforms its weight"):
            functional.fuse_conv_bn_eval(ws, bn.eval())
    with pytest.raises(TypeError, match="nn.Conv2d"):
        functional.fuse_convbn2d(nn.Conv1d(3, 4, 3), nn.BatchNorm1d(4))


@pytest.mark.parametrize("k, b", [(2.5, None), (None, 0.3), (-0.5, 0.1)])
def test_scale_fused_weight_and_bias(k, b):
    conv, bn = _conv_bn(True, 1, True, seed=11)
    before = torch_fuse_conv_bn_eval(conv, bn)
    functional.scale_fused_conv2d_weight_of_convbn2d(conv, bn, k=k, b=b)
    functional.scale_fused_conv2d_bias_of_convbn2d(conv, bn, k=k, b=b)
    after = torch_fuse_conv_bn_eval(conv, bn)
    kk = 1.0 if k is None else k
    bb = 0.0 if b is None else b
    torch.testing.assert_close(after.weight, kk * before.weight + bb, **FUSED_OUTPUT_FP32)
    torch.testing.assert_close(after.bias, kk * before.bias + bb, **FUSED_OUTPUT_FP32)


def test_scale_fused_bias_matches_spikingjelly_formula_without_conv_bias():
    # spikingjelly's definition (conv without bias): k scales β and μ, b is added to β
    conv, bn = _conv_bn(False, 1, True, seed=12)
    ref_bn = copy.deepcopy(bn)
    functional.scale_fused_conv2d_bias_of_convbn2d(conv, bn, k=1.7, b=-0.4)
    with torch.no_grad():
        ref_bn.bias.mul_(1.7).add_(-0.4)
        ref_bn.running_mean.mul_(1.7)
    torch.testing.assert_close(bn.bias, ref_bn.bias, **EXACT)
    torch.testing.assert_close(bn.running_mean, ref_bn.running_mean, **EXACT)
    with pytest.raises(ValueError, match="affine=False"):
        conv2, bn2 = _conv_bn(False, 1, False, seed=13)
        functional.scale_fused_conv2d_bias_of_convbn2d(conv2, bn2, b=1.0)


def test_set_step_mode_leaves_container_children_alone():
    from snnorm import layer, neuron

    net = nn.Sequential(
        layer.SeqToANNContainer(nn.Conv2d(1, 2, 3), layer.BatchNorm2d(2)),
        neuron.LIFNode(),
        layer.MultiStepContainer(neuron.LIFNode()),
    )
    functional.set_step_mode(net, "m")
    assert net[1].step_mode == "m"
    assert net[0][1].step_mode == "s" and net[2][0].step_mode == "s"
    y = net(torch.randn(3, 2, 1, 5, 5))
    assert y.shape == (3, 2, 2, 3, 3)


# -- tuple inputs and outputs (spikingjelly 2.0.0's forward helpers) -----------------


def _pool_sequence(seed: int = 11) -> torch.Tensor:
    return torch.randn(3, 2, 4, 6, 6, generator=torch.Generator().manual_seed(seed))


def test_seq_to_ann_forward_tuple_output_and_tuple_input_match_spikingjelly():
    x_seq = _pool_sequence()
    pool = nn.MaxPool2d(2, return_indices=True)
    y, idx = functional.seq_to_ann_forward(x_seq, pool)
    y_ref, idx_ref = sj_functional.seq_to_ann_forward(x_seq, pool)
    assert y.shape == idx.shape == (3, 2, 4, 3, 3)
    assert torch.equal(y, y_ref) and torch.equal(idx, idx_ref)
    # a two-argument module takes the tuple's members as positional arguments
    unpool = nn.MaxUnpool2d(2)
    restored = functional.seq_to_ann_forward((y, idx), unpool)
    assert torch.equal(restored, sj_functional.seq_to_ann_forward((y, idx), unpool))
    assert restored.shape == x_seq.shape
    assert torch.equal(restored.amax(dim=(-1, -2)), x_seq.amax(dim=(-1, -2)))
    # a list: the first module gets the members, later modules the previous output whole
    both = [pool, lambda out: unpool(*out)]
    assert torch.equal(functional.seq_to_ann_forward(x_seq, both), restored)


def test_multi_step_forward_tuple_input_and_output_equal_the_folded_run():
    x_seq = _pool_sequence(12)
    pool = nn.MaxPool2d(2, return_indices=True)
    y, idx = functional.multi_step_forward(x_seq, pool)
    y_ref, idx_ref = functional.seq_to_ann_forward(x_seq, pool)
    assert torch.equal(y, y_ref) and torch.equal(idx, idx_ref)
    restored = functional.multi_step_forward((y, idx), nn.MaxUnpool2d(2))
    assert torch.equal(restored, functional.seq_to_ann_forward((y, idx), nn.MaxUnpool2d(2)))


def test_forward_helpers_pass_non_tensor_output_members():
    x_seq = torch.randn(4, 3, 5)
    tagged = lambda x: (x * 2, "tag", None)  # noqa: E731
    for helper in (functional.seq_to_ann_forward, functional.multi_step_forward):
        y, tag, nothing = helper(x_seq, tagged)
        assert torch.equal(y, x_seq * 2) and tag == "tag" and nothing is None
    steps = iter(range(10))
    with pytest.raises(ValueError, match="not a tensor and differs"):
        functional.multi_step_forward(x_seq, lambda x: (x, next(steps)))
    with pytest.raises(ValueError, match=r"not T\*N = 4\*3"):
        functional.seq_to_ann_forward(x_seq, lambda x: x.sum())


def test_forward_helpers_reject_tuple_members_with_different_leading_dims():
    a = torch.randn(3, 2, 4)
    with pytest.raises(ValueError, match=r"same \[T, batch_size\] leading dimensions.*\(3, 2, 4\), \(3, 5, 4\)"):
        functional.seq_to_ann_forward((a, torch.randn(3, 5, 4)), torch.add)
    with pytest.raises(ValueError, match=r"same T leading dimension \(temporal length\)"):
        functional.multi_step_forward((a, torch.randn(4, 2, 4)), torch.add)
    # per step only T matters: [T, N, ...] with another N is fine step by step
    assert functional.multi_step_forward((a, torch.randn(3, 1, 4)), torch.add).shape == (3, 2, 4)
    with pytest.raises(ValueError, match=r"expected x_seq with shape \[T, N, \.\.\.\]"):
        functional.multi_step_forward((a, torch.randn(3)), torch.add)
    with pytest.raises(TypeError, match="member 1 of x_seq"):
        functional.seq_to_ann_forward((a, 2.0), torch.add)


# -- spikingjelly's graph-level conv-BN API ----------------------------------------------


def _fusable_net(conv_cls, bn_cls, neuron_cls, extra_tail: bool = True):
    torch.manual_seed(13)
    modules = [
        conv_cls(2, 4, 3, padding=1, bias=False),
        bn_cls(4),
        neuron_cls(),
        conv_cls(4, 4, 3, padding=1),
        bn_cls(4),
    ]
    if extra_tail:
        modules += [neuron.IFNode(), layer.Conv2d(4, 4, 1), layer.TemporalEffectiveBatchNorm2d(3, 4)]
    net = nn.Sequential(*modules)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d) and m.running_mean.shape == (4,):
            _randomise_bn(m, 13)
    functional.set_step_mode(net, "m")
    return net


def test_fuse_conv_bn_eval_modules_folds_pairs_in_a_mixed_network():
    net = _fusable_net(layer.Conv2d, layer.BatchNorm2d, sj_neuron.IFNode).eval()
    x = torch.rand(3, 2, 2, 6, 6) * 3
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # reset_net names the spikingjelly neuron
        with torch.no_grad():
            expected = net(x)
            functional.reset_net(net)
            fused = functional.fuse_conv_bn_eval_modules(net)
            got = fused(x)
            functional.reset_net(net)
    assert isinstance(fused, torch.fx.GraphModule)
    kinds = [type(m).__name__ for m in fused.children()]
    assert kinds.count("BatchNorm2d") == 0 and "TemporalEffectiveBatchNorm2d" in kinds  # TEBN stays
    assert fused.get_submodule("0").step_mode == "m"
    torch.testing.assert_close(got, expected, **FUSED_OUTPUT_FP32)
    assert isinstance(net[1], layer.BatchNorm2d)  # net itself unchanged


def test_fuse_conv_bn_eval_modules_matches_spikingjelly():
    net = _fusable_net(sj_layer.Conv2d, sj_layer.BatchNorm2d, sj_neuron.IFNode, extra_tail=False).eval()
    x = torch.rand(3, 2, 2, 6, 6) * 3
    ours = functional.fuse_conv_bn_eval_modules(net)
    theirs = sj_fusion.fuse_conv_bn_eval_modules(net)
    ours_convs = [m for m in ours.modules() if isinstance(m, nn.Conv2d)]
    theirs_convs = [m for m in theirs.modules() if isinstance(m, nn.Conv2d)]
    assert len(ours_convs) == len(theirs_convs) == 2
    for a, b in zip(ours_convs, theirs_convs):
        torch.testing.assert_close(a.weight, b.weight, **FUSED_PARAMS_FP32)
        torch.testing.assert_close(a.bias, b.bias, **FUSED_PARAMS_FP32)
    with torch.no_grad():
        y = ours(x)
        net[2].reset()
        torch.testing.assert_close(y, theirs(x), **FUSED_OUTPUT_FP32)


def test_fuse_conv_bn_eval_modules_errors():
    net = _fusable_net(layer.Conv2d, layer.BatchNorm2d, neuron.IFNode, extra_tail=False)
    with pytest.raises(ValueError, match=r"only supports eval\(\) models"):
        functional.fuse_conv_bn_eval_modules(net)
    no_stats = nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4, track_running_stats=False)).eval()
    with pytest.raises(ValueError, match="Cannot fuse 1: BatchNorm must track running stats"):
        functional.fuse_conv_bn_eval_modules(no_stats)
    with pytest.raises(ValueError, match=r"only supports train\(\) models"):
        functional.pack_conv_bn_train_modules(net.eval())


def test_pack_conv_bn_train_modules_trains_like_the_network():
    net = _fusable_net(layer.Conv2d, layer.BatchNorm2d, neuron.IFNode, extra_tail=False).train()
    net[3].step_mode = "s"  # a pair in different step modes is left alone
    net[3] = layer.SeqToANNContainer(net[3])
    ref = copy.deepcopy(net)
    packed = functional.pack_conv_bn_train_modules(net)
    kinds = [type(m).__name__ for m in packed.children()]
    assert kinds.count("_ConvBNPack") == 1 and "SeqToANNContainer" in kinds
    x = torch.rand(3, 2, 2, 6, 6) * 3
    y, y_ref = packed(x), ref(x)
    torch.testing.assert_close(y, y_ref, **FUSED_OUTPUT_FP32)
    y.sum().backward()
    y_ref.sum().backward()
    torch.testing.assert_close(net[0].weight.grad, ref[0].weight.grad, **FUSED_OUTPUT_FP32)
    torch.testing.assert_close(net[1].running_var, ref[1].running_var, **FUSED_BUFFERS_FP32)
    assert int(net[1].num_batches_tracked) == 1
    assert net[0].step_mode == "m" and net[1].step_mode == "m"  # restored after the packed call


def test_t_last_forward_helpers_match_spikingjelly():
    x = torch.randn(2, 4, 6, 6, 3)  # [N, C, H, W, T]
    conv = nn.Conv2d(4, 5, 3, padding=1)
    y = functional.t_last_seq_to_ann_forward(x, conv)
    torch.testing.assert_close(y, sj_functional.t_last_seq_to_ann_forward(x, conv), **RELAYOUT_FP32)
    assert y.shape == (2, 5, 6, 6, 3)
    lif = neuron.LIFNode()
    y = functional.t_last_multi_step_forward(x, lif)
    functional.reset_net(lif)
    assert torch.equal(y, sj_functional.t_last_multi_step_forward(x, lif))
