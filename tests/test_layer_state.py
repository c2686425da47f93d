"""snnorm.layer state: state_dict round trips, torch/snntorch interchange, counters and masks,
re-initialisation, and running statistics under activation checkpointing."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.utils.checkpoint as torch_checkpoint
from tolerances import EXACT, RECOMPUTED_GRAD_FP32, RUNNING_MEAN_BY_HAND_FP32, WS_CONV_VS_TORCH_FP32, WS_WEIGHT_MEAN, WS_WEIGHT_VAR

from snnorm import functional, layer, memopt

T, N, C = 4, 3, 5


def seq(*spatial, t=T):
    return torch.randn(t, N, C, *spatial) * 1.5 + 0.3


# (factory, input) for every layer: the input a call in the module's step mode takes
LAYERS = [
    (lambda: layer.Conv1d(C, 4, 3, step_mode="m"), lambda: seq(7)),
    (lambda: layer.Conv2d(C, 4, 3), lambda: seq(5, 6)[0]),
    (lambda: layer.Conv3d(C, 4, 2, step_mode="m"), lambda: seq(3, 4, 5)),
    (lambda: layer.Linear(C, 4, step_mode="m"), lambda: seq()),
    (lambda: layer.BatchNorm1d(C, step_mode="m"), lambda: seq(7)),
    (lambda: layer.BatchNorm2d(C), lambda: seq(5, 6)[0]),
    (lambda: layer.BatchNorm3d(C, momentum=None, step_mode="m"), lambda: seq(3, 4, 5)),
    (lambda: layer.ThresholdDependentBatchNorm2d(1.0, 0.5, C), lambda: seq(5, 6)),
    (lambda: layer.TemporalEffectiveBatchNorm1d(T, C), lambda: seq()),
    (lambda: layer.TemporalEffectiveBatchNorm2d(T, C), lambda: seq(5, 6)),
    (lambda: layer.BatchNormThroughTime2d(T, C, step_mode="m"), lambda: seq(5, 6)),
    (lambda: layer.BatchNormThroughTime3d(T, C, affine=False, step_mode="m"), lambda: seq(3, 4, 5)),
    (lambda: layer.BatchNormTT1d(C, T, step_mode="m"), lambda: seq(7)),
    (lambda: layer.GroupNorm(5, C, step_mode="m"), lambda: seq(5, 6)),
    (lambda: layer.NeuNorm(C, 5, 6, step_mode="m"), lambda: (seq(5, 6) > 0.5).float()),
    (lambda: layer.WSConv2d(C, 4, 3, step_mode="m"), lambda: seq(5, 6)),
    (lambda: layer.WSLinear(C, 4), lambda: seq()[0]),
]
IDS = [f().__class__.__name__ for f, _ in LAYERS]


@pytest.mark.parametrize("make, make_input", LAYERS, ids=IDS)
def test_state_dict_round_trip(make, make_input):
    torch.manual_seed(0)
    trained = make()
    with torch.no_grad():  # non-default parameters
        for p in trained.parameters():
            p.add_(torch.rand_like(p))
    trained.train()
    trained(make_input())  # non-default running statistics
    functional.reset_net(trained)
    fresh = make()
    result = fresh.load_state_dict(trained.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    for key, value in trained.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key
    x = make_input()
    for mode in (True, False):
        trained.train(mode)
        fresh.train(mode)
        functional.reset_net(trained)
        functional.reset_net(fresh)
        assert torch.equal(trained(x), fresh(x))


@pytest.mark.parametrize(
    "ours, theirs, x",
    [
        (layer.BatchNorm2d(C, step_mode="m"), nn.BatchNorm2d(C), seq(5, 6)),
        (layer.BatchNorm1d(C), nn.BatchNorm1d(C), seq(7)[0]),
        (layer.Conv2d(C, 4, 3, step_mode="m"), nn.Conv2d(C, 4, 3), seq(5, 6)),
        (layer.Linear(C, 4), nn.Linear(C, 4), seq()[0]),
        (layer.GroupNorm(1, C, step_mode="m"), nn.GroupNorm(1, C), seq(5, 6)),
    ],
    ids=["BatchNorm2d", "BatchNorm1d", "Conv2d", "Linear", "GroupNorm"],
)
def test_torch_state_dict_interchange(ours, theirs, x):
    """A wrapper's state_dict is its torch layer's; 'm' mode equals torch on T folded into N."""
    assert isinstance(ours, type(theirs))
    with torch.no_grad():
        for p in theirs.parameters():
            p.add_(torch.rand_like(p))
    ours.load_state_dict(theirs.state_dict(), strict=True)
    expected = theirs(x.flatten(0, 1)).view(x.shape[0], x.shape[1], -1) if ours.step_mode == "m" else theirs(x)
    actual = ours(x)
    assert torch.equal(actual.reshape(expected.shape), expected)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    for key, value in ours.state_dict().items():
        assert torch.equal(theirs.state_dict()[key], value)


def test_max_pool_return_indices_multi_step():
    pool = layer.MaxPool2d(2, return_indices=True, step_mode="m")
    x = seq(4, 6)
    y, idx = pool(x)
    y_ref, idx_ref = nn.MaxPool2d(2, return_indices=True)(x.flatten(0, 1))
    assert torch.equal(y, y_ref.view(T, N, C, 2, 3)) and torch.equal(idx, idx_ref.view(T, N, C, 2, 3))


def test_threshold_dependent_bn_keeps_alpha_vth_on_reset_parameters():
    bn = layer.ThresholdDependentBatchNorm2d(0.5, 2.0, C)
    assert torch.equal(bn.weight, torch.full((C,), 1.0))
    with torch.no_grad():
        bn.weight.uniform_()
        bn.bias.uniform_()
    bn(seq(5, 6))
    bn.reset_parameters()
    assert torch.equal(bn.weight, torch.full((C,), 1.0))
    assert torch.equal(bn.bias, torch.zeros(C))
    assert torch.equal(bn.running_mean, torch.zeros(C)) and bn.num_batches_tracked.item() == 0


def test_tebn_scale_and_reset_parameters():
    tebn = layer.TemporalEffectiveBatchNorm2d(T, C)
    assert tebn.T == T and tebn.scale.shape == (T,) and torch.equal(tebn.scale, torch.ones(T))
    with torch.no_grad():
        tebn.scale.mul_(3.0)
    tebn(seq(5, 6))
    assert tebn.num_batches_tracked.item() == 1
    tebn.reset_parameters()
    assert torch.equal(tebn.scale, torch.ones(T)) and tebn.num_batches_tracked.item() == 0


def test_tebn_scale_gradient_is_per_timestep():
    """p[t] only scales timestep t: a loss on timestep 1 gives a gradient to p[1] alone."""
    tebn = layer.TemporalEffectiveBatchNorm2d(T, C)
    y = tebn(seq(5, 6))
    (y[1] ** 2).sum().backward()
    grad = tebn.scale.grad
    assert grad[1] != 0 and torch.count_nonzero(grad) == 1


def test_bntt_counter_and_statistics_per_timestep():
    bntt = layer.BatchNormThroughTime2d(T, C)
    assert bntt.t == -1 and bntt.T == T
    x_seq = seq(5, 6) * torch.arange(1, T + 1).view(T, 1, 1, 1, 1)  # different statistics per t
    for t in range(T):
        bntt(x_seq[t])
        assert bntt.t == t
    counts = [bn.num_batches_tracked.item() for bn in bntt.bn_list]
    assert counts == [1] * T
    means = torch.stack([bn.running_mean for bn in bntt.bn_list])
    torch.testing.assert_close(means, 0.1 * x_seq.mean(dim=(1, 3, 4)), **RUNNING_MEAN_BY_HAND_FP32)
    assert all(bn.bias is None for bn in bntt.bn_list)
    functional.reset_net(bntt)
    assert bntt.t == -1


def test_batch_norm_tt_matches_snntorch():
    snntorch = pytest.importorskip("snntorch", reason="snntorch 1.0.0 is the oracle for BatchNormTT")
    for dim, shape in [(1, (N, C)), (1, (N, C, 7)), (2, (N, C, 5, 6))]:
        theirs = getattr(snntorch, f"BatchNormTT{dim}d")(C, T, eps=1e-4, momentum=0.2)
        for bn in theirs:
            nn.init.uniform_(bn.weight, 0.5, 1.5)
        for step_mode in ("s", "m"):
            ours = getattr(layer, f"BatchNormTT{dim}d")(C, T, eps=1e-4, momentum=0.2, step_mode=step_mode)
            assert isinstance(ours, nn.ModuleList) and len(ours) == T
            twin = copy.deepcopy(theirs)
            ours.load_state_dict(twin.state_dict(), strict=True)  # snntorch's checkpoint loads
            for phase in (True, False):
                ours.train(phase)
                twin.train(phase)
                functional.reset_net(ours)
                x_seq = torch.randn(T, *shape, requires_grad=True)
                x_twin = x_seq.detach().clone().requires_grad_()
                y_twin = torch.stack([twin[t](x_twin[t]) for t in range(T)])  # snntorch usage
                if step_mode == "s":
                    y_ours = torch.stack([ours(x_seq[t]) for t in range(T)])
                else:
                    y_ours = ours(x_seq)
                assert torch.equal(y_ours, y_twin)
                g = torch.randn_like(y_twin)
                (y_ours * g).sum().backward()
                (y_twin * g).sum().backward()
                assert torch.equal(x_seq.grad, x_twin.grad)
                for a, b in zip(ours, twin):
                    assert torch.equal(a.weight.grad, b.weight.grad)
                    assert torch.equal(a.running_mean, b.running_mean)
                    assert torch.equal(a.running_var, b.running_var)
                    assert torch.equal(a.num_batches_tracked, b.num_batches_tracked)
                ours.zero_grad()
                twin.zero_grad()
            back = getattr(snntorch, f"BatchNormTT{dim}d")(C, T)
            back.load_state_dict(ours.state_dict(), strict=True)  # and snntorch loads ours
            assert ours[0](torch.randn(shape)).shape == shape  # indexing works as in snntorch


def test_batch_norm_tt_affine_false():
    bntt = layer.BatchNormTT2d(C, T, affine=False)
    assert all(bn.weight is None and bn.bias is None for bn in bntt)
    assert bntt(torch.randn(N, C, 5, 6)).shape == (N, C, 5, 6)


@pytest.mark.parametrize("cls, p", [(layer.Dropout, 0.5), (layer.Dropout2d, 0.4)])
def test_dropout_mask_fixed_across_time(cls, p):
    torch.manual_seed(3)
    x_seq = torch.rand(T, 8, 6, 4, 4) + 0.5
    single = cls(p)
    y_single = torch.stack([single(x) for x in x_seq])
    mask = single.mask
    assert mask is not None and mask.shape == x_seq.shape[1:]
    values = mask.unique()
    assert values.numel() == 2 and values[0] == 0 and torch.isclose(values[1], torch.tensor(1.0 / (1.0 - p)))
    assert torch.equal(y_single, x_seq * mask)  # the same mask at every timestep
    if cls is layer.Dropout2d:  # whole channels dropped
        assert torch.equal(mask.amax(dim=(2, 3)), mask.amin(dim=(2, 3)))
    multi = cls(p, step_mode="m")
    multi.mask = mask.clone()
    assert torch.equal(multi(x_seq), y_single)
    functional.reset_net(single)
    assert single.mask is None
    single(x_seq[0])
    assert not torch.equal(single.mask, mask)  # a new sequence draws a new mask
    single.eval()
    functional.reset_net(single)
    assert torch.equal(single(x_seq[0]), x_seq[0]) and single.mask is None


def test_ws_conv2d_honours_padding_mode():
    """spikingjelly's WSConv2d ignores padding_mode; snnorm's matches torch's conv on Ŵ."""
    ws = layer.WSConv2d(C, 4, 3, padding=1, padding_mode="reflect")
    reference = nn.Conv2d(C, 4, 3, padding=1, padding_mode="reflect")
    with torch.no_grad():
        reference.weight.copy_(ws.get_weight())
        reference.bias.copy_(ws.bias)
    x = torch.randn(N, C, 5, 6)
    torch.testing.assert_close(ws(x), reference(x), **WS_CONV_VS_TORCH_FP32)


def test_ws_weight_is_standardised():
    ws = layer.WSLinear(20, 6, gain=False, eps=1e-12)  # tiny eps: the standardisation is near exact
    w = ws.get_weight()
    torch.testing.assert_close(w.mean(dim=1), torch.zeros(6), **WS_WEIGHT_MEAN)
    torch.testing.assert_close(w.var(dim=1) * 20, torch.ones(6), **WS_WEIGHT_VAR)  # Var(Ŵ)·fan_in = 1


# -- running statistics under checkpointing ---------------------------------------------

BN_LIKE = [
    (lambda: layer.BatchNorm2d(C), lambda: seq(5, 6)[0]),
    (lambda: layer.BatchNorm2d(C, momentum=None, step_mode="m"), lambda: seq(5, 6)),
    (lambda: layer.ThresholdDependentBatchNorm1d(1.0, 1.0, C), lambda: seq(7)),
    (lambda: layer.TemporalEffectiveBatchNorm2d(T, C), lambda: seq(5, 6)),
    (lambda: layer.TemporalEffectiveBatchNorm3d(T, C, momentum=None), lambda: seq(3, 4, 5)),
    (lambda: layer.BatchNormThroughTime2d(T, C, step_mode="m"), lambda: seq(5, 6)),
    (lambda: layer.BatchNormTT2d(C, T, step_mode="m"), lambda: seq(5, 6)),
]
BN_IDS = [f().__class__.__name__ for f, _ in BN_LIKE]


def buffers(module):
    return {k: v.clone() for k, v in module.named_buffers()}


@pytest.mark.parametrize("make, make_input", BN_LIKE, ids=BN_IDS)
def test_no_update_inside_gc_1st_forward(make, make_input):
    module, twin = make(), make()
    x = make_input()
    twin.train()
    before = buffers(module)
    with memopt.gc_1st_forward():
        y = module(x)
    for key, value in buffers(module).items():
        assert torch.equal(value, before[key]), f"{key} updated inside gc_1st_forward"
    # it still normalises with the batch statistics, exactly as an ordinary training call
    assert torch.equal(y, twin(x))


@pytest.mark.parametrize("make, make_input", BN_LIKE, ids=BN_IDS)
@pytest.mark.parametrize("use_reentrant", [True, False])
def test_torch_checkpoint_updates_running_stats_once(make, make_input, use_reentrant):
    module, twin = make(), make()
    stateful = isinstance(module, (layer.BatchNormThroughTime2d, layer.BatchNormTT2d))
    x = make_input().requires_grad_()
    x_twin = x.detach().clone().requires_grad_()
    y_twin = twin(x_twin)
    g = torch.randn_like(y_twin)
    (y_twin * g).sum().backward()
    if stateful:
        # plain torch.utils.checkpoint would recompute BNTT from its advanced counter: refused
        with pytest.raises(RuntimeError, match="snnorm.memopt.checkpoint"):
            y = torch_checkpoint.checkpoint(module, x, use_reentrant=use_reentrant)
            (y * g).sum().backward()
        module, x = make(), x.detach().clone().requires_grad_()
        y = memopt.checkpoint(module, x)
    else:
        y = torch_checkpoint.checkpoint(module, x, use_reentrant=use_reentrant)
    (y * g).sum().backward()
    assert torch.equal(y, y_twin)
    torch.testing.assert_close(x.grad, x_twin.grad, **RECOMPUTED_GRAD_FP32)
    for key, value in buffers(twin).items():
        assert torch.equal(buffers(module)[key], value), f"{key}: updated {'twice' if 'num' in key else 'wrongly'}"
    for (name, p), p_twin in zip(module.named_parameters(), twin.parameters()):
        torch.testing.assert_close(p.grad, p_twin.grad, **RECOMPUTED_GRAD_FP32, msg=name)


# ------------------------------------------- memories (docs/porting.md: what snnorm does differently)


def test_register_memory_raises_value_error_naming_the_memory_and_keeps_the_old_one():
    """docs/porting.md: ``register_memory`` raises ValueError naming the memory (spikingjelly asserts)."""
    from snnorm import neuron

    node = neuron.LIFNode()
    node.v = torch.full((2, 3), 0.25)
    before = node.v
    with pytest.raises(ValueError, match="'v'"):  # registered already
        node.register_memory("v", 0.0)
    assert node.v is before and node.get_reset_value("v") == 0.0
    with pytest.raises(ValueError, match="'tau'"):  # an attribute of that name
        node.register_memory("tau", 1.0)
    assert node.tau == 2.0 and "tau" not in dict(node.named_memories())


@pytest.mark.parametrize("call", ["reset", "detach"])
def test_reset_and_detach_replace_the_state_instead_of_writing_it(call):
    """docs/porting.md: ``reset()``/``detach()`` replace the state tensors: the old tensor is
    neither written (its version counter and values stay) nor the new one, and a backward
    through a membrane saved before the call still runs and gives the uninterrupted gradient."""
    from snnorm import neuron

    def two_steps(interrupt: bool):
        node = neuron.LIFNode(step_mode="s")
        x = torch.linspace(-1.0, 3.0, 12).view(3, 4).requires_grad_()
        s1 = node(x)
        old = node.v
        old_version, old_values = old._version, old.detach().clone()
        if interrupt:
            getattr(node, call)()
            assert node.v is not old, f"{call}() kept the state tensor object"
            assert old._version == old_version and torch.equal(old, old_values), f"{call}() wrote the old state"
            if call == "detach":
                assert node.v.grad_fn is None and old.grad_fn is not None
                assert torch.equal(node.v, old_values)
            else:
                assert node.v == node.get_reset_value("v")
        (s1.sum() + old.sum()).backward()  # through the membrane saved before the call
        return x.grad

    torch.testing.assert_close(two_steps(True), two_steps(False), **EXACT)
