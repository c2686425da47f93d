"""Norm → neuron fusion (snnorm.fusion): what fuses, what stays, checkpoints both ways, and
the fused triton block against the unfused torch pair (the reference).

The fused block's triton path (kernels/norm_lif.py) runs here under the interpreter; the
torch pair is the same two modules, unfused, on the torch backend. Outputs, spikes, the
final membrane, every gradient and the running statistics are compared.
"""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
import torch.nn as nn
from devices import DEVICE, SLOW_ON_CPU, property_examples
from helpers import RecordingSurrogate, assert_flips_placed
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from tolerances import (
    NORM_NEURON_FUSED, NORM_NEURON_FUSED_BF16_FLIPS, NORM_NEURON_FUSED_BF16_REL, comparable_entries, comparable_mask,
)

from perf.tools import saved_tensor_bytes
from snnorm import functional, layer, neuron, surrogate
from snnorm.fusion import FusedBlock, fusable_norm, fused_block

F32, F64 = torch.float32, torch.float64
NORM_KINDS = ("bn", "tdbn", "tebn", "bntt", "bntt_snntorch", "tab")


def make_norm(kind: str, T: int, C: int, spatial: int) -> nn.Module:
    """The norm ``kind`` for [T, N, C] (spatial 0) or [T, N, C, H, W] (spatial 2) inputs, multi-step."""
    two_d = spatial == 2
    if kind == "bn":
        return (layer.BatchNorm2d if two_d else layer.BatchNorm1d)(C, step_mode="m")
    if kind == "tdbn":
        cls = layer.ThresholdDependentBatchNorm2d if two_d else layer.ThresholdDependentBatchNorm1d
        return cls(alpha=1.0, v_th=1.0, num_features=C)
    if kind == "tebn":
        return (layer.TemporalEffectiveBatchNorm2d if two_d else layer.TemporalEffectiveBatchNorm1d)(T, C)
    if kind == "bntt":
        return (layer.BatchNormThroughTime2d if two_d else layer.BatchNormThroughTime1d)(T, C, step_mode="m")
    if kind == "bntt_snntorch":
        return (layer.BatchNormTT2d if two_d else layer.BatchNormTT1d)(C, T, step_mode="m")
    if kind == "tab":
        return (layer.TemporalAccumulatedBatchNorm2d if two_d else layer.TemporalAccumulatedBatchNorm1d)(T, C)
    raise ValueError(kind)


@torch.no_grad()
def randomise(module: nn.Module, seed: int) -> None:
    """Parameters and running statistics away from their initial values (γ, p of both signs' magnitude)."""
    g = torch.Generator().manual_seed(seed)
    for name, t in [*module.named_parameters(), *module.named_buffers()]:
        if not t.is_floating_point():
            continue
        r = torch.randn(t.shape, generator=g, dtype=F64).to(t.dtype)
        if name.endswith("running_var"):
            t.copy_(0.5 + r.abs())
        elif name.endswith(("bias", "running_mean")):
            t.copy_(0.3 * r)
        else:  # γ, p, TEBN's scale
            t.copy_(1.0 + 0.3 * r)


def make_neuron(option: dict) -> nn.Module:
    option = dict(option)
    kind = option.pop("kind")
    if kind == "if":
        return neuron.IFNode(step_mode="m", **option)
    return neuron.LIFNode(step_mode="m", **option)


NEURON_OPTIONS = st.fixed_dictionaries({
    "kind": st.sampled_from(["lif", "if"]),
    "v_threshold": st.sampled_from([0.5, 1.0]),
    "v_reset": st.sampled_from([0.0, None, -0.25]),
    "detach_reset": st.booleans(),
    "surrogate_function": st.sampled_from(
        [surrogate.Sigmoid(), surrogate.ATan(), surrogate.PiecewiseQuadratic(), surrogate.PiecewiseExp()]),
}).flatmap(lambda o: st.just(o) if o["kind"] == "if" else st.fixed_dictionaries({
    **{k: st.just(v) for k, v in o.items()},
    "tau": st.sampled_from([2.0, 3.5]),
    "decay_input": st.booleans(),
}))


def build_pair(kind: str, T: int, C: int, spatial: int, option: dict, dtype, seed: int = 0):
    """(the unfused torch pair, a fused copy on the triton backend), same parameters."""
    norm = make_norm(kind, T, C, spatial)
    randomise(norm, seed)
    ref = nn.Sequential(norm, make_neuron(option)).to(device=DEVICE, dtype=dtype)
    fused = functional.fuse_norm_neurons(copy.deepcopy(ref))
    functional.set_backend(fused, "triton")
    return ref, fused


def run(net: nn.Sequential, x: torch.Tensor, g_s: torch.Tensor, g_v: torch.Tensor, train: bool):
    """(spikes, final membrane, ∂x, {parameter: grad}, {buffer: value}) of one sequence."""
    net.train(train)
    functional.reset_net(net)
    xr = x.clone().requires_grad_()
    spikes = net(xr)
    v = net[1].v
    loss = (spikes * g_s).sum() + (v * g_v).sum() if isinstance(v, torch.Tensor) else (spikes * g_s).sum()
    params = [p for p in net.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, [xr, *params], allow_unused=True)
    names = [n for n, p in net.state_dict(keep_vars=True).items() if isinstance(p, nn.Parameter)]
    buffers = {n: b.detach().clone() for n, b in net.state_dict().items() if n not in names}
    return spikes.detach(), v.detach(), grads[0], dict(zip(names, grads[1:])), buffers


#: parameters with one entry per step for every channel (TEBN's scale, TAB's p): any flip reaches them
PER_STEP_SCALARS = (".scale", ".p")


def _grad_mask(name: str, grad: torch.Tensor, channel_clean: torch.Tensor) -> torch.Tensor:
    """The entries of parameter ``name``'s gradient that no flipped spike reached: per channel
    ([C], or [T, C] per step) where the channel is clean, everything only when all is clean."""
    C = channel_clean.shape[0]
    if not name.endswith(PER_STEP_SCALARS) and grad.dim() >= 1 and grad.shape[-1] == C:
        return channel_clean.expand(grad.shape)
    return channel_clean.all().expand(grad.shape)


def assert_matches(ref_out, fused_out, z, dtype, train: bool, what: str) -> None:
    """The fused block against the torch pair. Spikes that differ must sit at the threshold
    (helpers.assert_flips_placed with the pair's firing variable ``z``); the membrane is
    compared on the elements no flip reached (the neuron is elementwise), the gradients on
    the channels no flip reached in training (batch statistics couple a channel's ∂x) or
    the elements in eval; the running statistics do not depend on spikes: all of them."""
    s_ref, v_ref, gx_ref, gp_ref, buf_ref = ref_out
    s, v, gx, gp, buf = fused_out
    tol = NORM_NEURON_FUSED[dtype]
    assert s.dtype == s_ref.dtype and s.shape == s_ref.shape, what
    clean = assert_flips_placed(what, s, s_ref, z, dtype, channel_coupled=False)
    clean_grad = comparable_mask(s, s_ref, channel_coupled=True)[2] if train else clean
    C = clean.shape[1]
    channel_clean = clean_grad.transpose(0, 1).reshape(C, -1).all(dim=1)
    if not clean.any():  # nothing comparable left: every channel (or element) had a flip
        assume(False)

    def close(got, want, mask, name):
        torch.testing.assert_close(got[mask], want[mask], **tol, msg=lambda m: f"{what}: {name}: {m}")

    close(v, v_ref, comparable_entries(v_ref, clean, "membrane"), "membrane")
    close(gx, gx_ref, comparable_entries(gx_ref, clean_grad, "∂x"), "∂x")
    assert gp.keys() == gp_ref.keys(), what
    for name in gp_ref:
        if gp_ref[name] is None:
            assert gp[name] is None or not gp[name].any(), f"{what}: {name} got a gradient"
            continue
        close(gp[name], gp_ref[name], _grad_mask(name, gp_ref[name], channel_clean), f"∂{name}")
    assert buf.keys() == buf_ref.keys(), what
    for name in buf_ref:
        torch.testing.assert_close(buf[name].to(buf_ref[name].dtype), buf_ref[name], **tol,
                                   msg=lambda m, n=name: f"{what}: {n}: {m}")


# ------------------------------------------------------------------ fused triton vs torch pair


@pytest.mark.parametrize("kind", NORM_KINDS)
@settings(max_examples=property_examples(len(NORM_KINDS)))
@given(
    option=NEURON_OPTIONS,
    T=st.sampled_from([1, 2, 3, 5, 17]),
    N=st.sampled_from([2, 3]),
    C=st.sampled_from([1, 3, 5]),
    spatial=st.sampled_from([0, 2]),
    train=st.booleans(),
    dtype=st.sampled_from([F64, F32]),
    seed=st.integers(0, 2**16),
)
def test_fused_triton_block_matches_the_unfused_torch_pair(kind, option, T, N, C, spatial, train, dtype, seed):
    """Every norm kind every run (parametrized); hypothesis draws the neuron, shape and mode."""
    check_fused_against_pair(kind, option, T, N, C, spatial, train, dtype, seed)


@pytest.mark.parametrize("charge", ["lif-decay-input", "lif", "if"])
def test_fused_triton_block_matches_the_unfused_torch_pair_every_charge(charge):
    """Each charge form every run (the property test draws them, a few draws per norm kind):
    ∂h/∂x = 1/τ with decay_input only, ∂h/∂v = 1 − 1/τ for a LIF, 1 for an IF. tdBN, fp64,
    training, a soft reset and a hard one."""
    option = dict(kind="if" if charge == "if" else "lif", v_threshold=0.5, v_reset=None, detach_reset=False,
                  surrogate_function=surrogate.Sigmoid())
    if charge != "if":
        option.update(tau=2.0, decay_input=charge == "lif-decay-input", v_reset=0.0)
    check_fused_against_pair("tdbn", option, T=5, N=2, C=3, spatial=2, train=True, dtype=F64, seed=3)


def check_fused_against_pair(kind, option, T, N, C, spatial, train, dtype, seed) -> None:
    """The fused triton block against the unfused torch pair on one drawn input (:func:`assert_matches`)."""
    ref, fused = build_pair(kind, T, C, spatial, option, dtype, seed)
    assert fused_block(fused[0]).fused_kernel_applies()
    ref[1].surrogate_function = RecordingSurrogate(ref[1].surrogate_function)  # the pair's firing variable
    g = torch.Generator().manual_seed(seed)
    shape = (T, N, C, 3, 3) if spatial else (T, N, C)
    x = (torch.randn(shape, generator=g, dtype=F64) * 1.5 + 0.5).to(DEVICE, dtype)
    g_s = torch.randn(shape, generator=g, dtype=F64).to(DEVICE, dtype)
    g_v = torch.randn(shape[1:], generator=g, dtype=F64).to(DEVICE, dtype)
    what = f"{kind} → {option}, shape {shape}, {'train' if train else 'eval'}, {dtype}"
    ref_out = run(ref, x, g_s, g_v, train)
    z = ref[1].surrogate_function.firing_variable(ref_out[0])
    assert_matches(ref_out, run(fused, x, g_s, g_v, train), z, dtype, train, what)


# ------------------------------------------------------------------------------ structure


def _block(kind="tebn", T=4, C=3, spatial=2):
    return nn.Sequential(
        layer.Conv2d(2, C, 3, padding=1, bias=False, step_mode="m") if spatial else nn.Identity(),
        make_norm(kind, T, C, spatial),
        neuron.LIFNode(step_mode="m"),
    ).to(DEVICE)


def _names(net: nn.Module):
    """Every name a network shows, each with the object (or the value) at it."""
    return {
        "parameters": [(n, p) for n, p in net.named_parameters()],
        "buffers": [(n, b) for n, b in net.named_buffers()],
        "modules": [(n, m, type(m)) for n, m in net.named_modules()],
        "state_dict": list(net.state_dict(keep_vars=True).items()),
    }


def _assert_same_names(before, after) -> None:
    for what in before:
        assert [e[0] for e in after[what]] == [e[0] for e in before[what]], what
        for a, b in zip(before[what], after[what]):
            if what == "state_dict":  # some norms build entries on the fly (TAB's per-step views)
                assert torch.equal(a[1], b[1]), (what, a[0])
            else:
                assert all(x is y for x, y in zip(a[1:], b[1:])), (what, a[0])


@pytest.mark.parametrize("kind", NORM_KINDS)
def test_fusing_keeps_every_name_object_and_type(kind):
    net = _block(kind)
    before = _names(net)
    norm, sn = net[1], net[2]
    out = functional.fuse_norm_neurons(net)
    assert out is net
    _assert_same_names(before, _names(net))  # parameters, buffers, modules, state_dict: names and objects
    assert type(net[1]) is type(norm) and type(net[2]) is neuron.LIFNode
    block = fused_block(net[1])
    assert isinstance(block, FusedBlock) and block is fused_block(net[2])
    assert block.norm is norm and block.neuron is sn
    assert repr(net) == repr(_block(kind))  # the printed tree is the unfused one
    assert functional.fuse_norm_neurons(net) is net and fused_block(net[1]) is block  # twice: no change
    _assert_same_names(before, _names(net))


def test_unfuse_restores_the_modules_exactly():
    net = _block("bntt")
    dicts = [dict(m.__dict__) for m in net]
    functional.fuse_norm_neurons(net)
    assert "forward" in net[1].__dict__ and "forward" in net[2].__dict__
    assert functional.unfuse_norm_neurons(net) is net
    assert fused_block(net[1]) is None and fused_block(net[2]) is None
    for m, d in zip(net, dicts):
        assert m.__dict__.keys() == d.keys() and all(m.__dict__[k] is v for k, v in d.items())
    functional.unfuse_norm_neurons(net)  # twice: no change


@pytest.mark.parametrize("kind", NORM_KINDS)
def test_checkpoints_load_both_ways(kind):
    torch.manual_seed(0)
    plain = _block(kind)
    randomise(plain, 1)
    fused = functional.fuse_norm_neurons(copy.deepcopy(plain))
    other = _block(kind)
    other.load_state_dict(fused.state_dict())  # fused → unfused, strict
    for (k, a), (k2, b) in zip(plain.state_dict().items(), other.state_dict().items()):
        assert k == k2 and torch.equal(a, b), k
    refused = functional.fuse_norm_neurons(_block(kind))
    refused.load_state_dict(plain.state_dict())  # unfused → fused, strict
    for (k, a), (k2, b) in zip(plain.state_dict().items(), refused.state_dict().items()):
        assert k == k2 and torch.equal(a, b), k


def test_torch_backend_runs_the_exact_composition_and_unfuse_restores_the_modules():
    torch.manual_seed(0)
    net = _block("bntt")
    x = torch.randn(4, 2, 2, 5, 5, device=DEVICE)
    expected = net(x)
    functional.reset_net(net)
    norm, sn = net[1], net[2]
    functional.fuse_norm_neurons(net)
    assert not fused_block(net[1]).fused_kernel_applies()  # torch backend: the composition
    assert torch.equal(net(x), expected)
    functional.unfuse_norm_neurons(net)
    assert net[1] is norm and net[2] is sn
    functional.reset_net(net)
    assert torch.equal(net(x), expected)


def _no_decay_groups(net: nn.Module, norm_names: set[str]):
    """AdamW groups by parameter name: no weight decay on the norms' parameters."""
    named = list(net.named_parameters())
    is_norm = [n.rpartition(".")[0] in norm_names for n, _ in named]
    return [
        {"params": [p for (n, p), k in zip(named, is_norm) if not k], "weight_decay": 0.1},
        {"params": [p for (n, p), k in zip(named, is_norm) if k], "weight_decay": 0.0},
    ], [n for (n, _), k in zip(named, is_norm) if k]


def test_an_optimizer_built_by_name_before_fusing_still_matches_and_trains():
    """Parameter groups selected by name (no weight decay on norms) before fusing: after
    fusing the same names select the same parameters, and training the fused triton net
    gives the parameters and running statistics of the unfused torch net trained alike."""
    torch.manual_seed(0)
    ref = _block("tebn", T=3, C=3).double()
    randomise(ref, 2)
    norm_names = {n for n, m in ref.named_modules() if fusable_norm(m)}
    assert norm_names == {"1"}
    net = copy.deepcopy(ref)
    groups, no_decay = _no_decay_groups(net, norm_names)
    assert no_decay == ["1.weight", "1.bias", "1.scale"]
    opt = torch.optim.AdamW(groups, lr=1e-2)
    functional.fuse_norm_neurons(net)
    with pytest.warns(UserWarning, match="keep their backend"):  # the conv
        functional.set_backend(net, "triton")
    assert fused_block(net[1]).fused_kernel_applies()
    regrouped, no_decay_after = _no_decay_groups(net, norm_names)  # the same selection, by name, after fusing
    assert no_decay_after == no_decay
    for group, again in zip(opt.param_groups, regrouped):
        assert [id(p) for p in group["params"]] == [id(p) for p in again["params"]]
    ref_opt = torch.optim.AdamW(_no_decay_groups(ref, norm_names)[0], lr=1e-2)
    g = torch.Generator().manual_seed(3)
    for _ in range(2):
        x = torch.randn(3, 2, 2, 4, 4, generator=g, dtype=F64).to(DEVICE) * 1.5 + 0.5
        for model, optim in ((ref, ref_opt), (net, opt)):
            functional.reset_net(model)
            optim.zero_grad()
            model(x).sum().backward()
            optim.step()
    tol = NORM_NEURON_FUSED[F64]
    for (n, a), (n2, b) in zip(ref.state_dict().items(), net.state_dict().items()):
        assert n == n2
        torch.testing.assert_close(b, a, **tol, msg=lambda m, n=n: f"{n}: {m}")
    assert int(net[1].num_batches_tracked) == 2


class _Graph(nn.Module):
    """A non-Sequential network: fx finds the pairs."""

    def __init__(self, share_norm_output: bool):
        super().__init__()
        self.bn = layer.BatchNorm1d(3, step_mode="m")
        self.sn = neuron.LIFNode(step_mode="m")
        self.share = share_norm_output

    def forward(self, x):
        y = self.bn(x)
        s = self.sn(y)
        return s + y if self.share else s


def test_graph_pairs_fuse_and_a_norm_with_two_users_stays_with_a_warning():
    net = functional.fuse_norm_neurons(_Graph(False))
    assert fused_block(net.bn) is not None and fused_block(net.bn) is fused_block(net.sn)
    assert [n for n, _ in net.named_parameters()] == ["bn.weight", "bn.bias"]
    with pytest.warns(UserWarning, match="other users"):
        net = functional.fuse_norm_neurons(_Graph(True))
    assert fused_block(net.bn) is None and "forward" not in net.bn.__dict__


def test_a_neuron_option_without_kernel_stays_with_a_warning():
    net = nn.Sequential(layer.BatchNorm1d(3, step_mode="m"), neuron.LIFNode(step_mode="m", store_v_seq=True))
    with pytest.warns(UserWarning, match="store_v_seq"):
        functional.fuse_norm_neurons(net)
    assert fused_block(net[0]) is None and fused_block(net[1]) is None


def test_a_module_with_its_own_instance_forward_stays_with_a_warning():
    net = nn.Sequential(layer.BatchNorm1d(3, step_mode="m"), neuron.LIFNode(step_mode="m"))
    own = net[1].forward
    net[1].forward = own  # a user's patch
    with pytest.warns(UserWarning, match="instance-level forward"):
        functional.fuse_norm_neurons(net)
    assert fused_block(net[0]) is None and net[1].__dict__["forward"] is own


def test_the_neuron_refuses_a_tensor_its_norm_did_not_make():
    net = functional.fuse_norm_neurons(_block("bn", spatial=0))
    with pytest.raises(RuntimeError, match="unfuse_norm_neurons"):
        net[2](torch.zeros(4, 2, 3, device=DEVICE))
    x = torch.randn(4, 2, 3, device=DEVICE)
    s = net[1](x)  # the norm alone returns the block's spikes, which the neuron passes on once
    assert net[2](s) is s
    with pytest.raises(RuntimeError, match="did not just produce"):
        net[2](s)


def test_state_functions_and_deepcopy_act_on_the_pair():
    torch.manual_seed(0)
    net = functional.fuse_norm_neurons(_block("tab"))
    functional.set_backend(net, "triton")
    assert net[1].backend == "triton" and net[2].backend == "triton"
    x = torch.randn(4, 2, 2, 5, 5, device=DEVICE)
    net(x[:2].repeat(2, 1, 1, 1, 1))
    clone = copy.deepcopy(net)  # mid-sequence
    block = fused_block(clone[1])
    assert block is fused_block(clone[2]) and block is not fused_block(net[1])
    assert block.norm is clone[1] and block.neuron is clone[2] and clone[2] is not net[2]
    assert torch.equal(clone[2].v, net[2].v)
    functional.reset_net(net)
    assert net[2].v == 0.0
    functional.set_step_mode(net, "s")  # single-step: the composition, step by step
    assert not fused_block(net[1]).fused_kernel_applies()
    functional.reset_net(net)
    steps = torch.stack([net(x[t]) for t in range(4)])
    ref = _block("tab")
    ref.load_state_dict(net.state_dict())
    functional.set_step_mode(ref, "s")
    assert torch.equal(steps, torch.stack([ref(x[t]) for t in range(4)]))


def test_a_deep_copy_and_a_saved_whole_model_run_fused_on_their_own_modules():
    torch.manual_seed(0)
    net = functional.fuse_norm_neurons(_block("bn", spatial=0))
    functional.set_backend(net, "triton")
    x = torch.randn(4, 2, 3, device=DEVICE)
    buffer = io.BytesIO()
    torch.save(net, buffer)
    buffer.seek(0)
    copies = [copy.deepcopy(net), torch.load(buffer, weights_only=False)]
    expected = net(x)
    for other in copies:
        block = fused_block(other[1])
        assert block.norm is other[1] and block.neuron is other[2] and block.fused_kernel_applies()
        assert torch.equal(other(x), expected)
        assert int(other[1].num_batches_tracked) == 1 and int(net[1].num_batches_tracked) == 1
        assert torch.equal(other[2].v, net[2].v)


def test_running_statistics_update_once_per_call():
    net = functional.fuse_norm_neurons(_block("bn", spatial=0))
    functional.set_backend(net, "triton")
    net(torch.randn(4, 2, 3, device=DEVICE))
    assert int(net[1].num_batches_tracked) == 1


def test_bad_input_is_refused_before_any_state_moves():
    net = functional.fuse_norm_neurons(_block("tebn", T=4, spatial=0))
    functional.set_backend(net, "triton")
    before = copy.deepcopy(net.state_dict())
    with pytest.raises(ValueError, match="temporal length"):
        net(torch.randn(3, 2, 3, device=DEVICE))  # T=3 into a T=4 TEBN
    with pytest.raises(ValueError, match="channels"):
        net(torch.randn(4, 2, 5, device=DEVICE))
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_torch_compile_fullgraph_runs_the_fused_op():
    torch.manual_seed(0)
    net = functional.fuse_norm_neurons(_block("tebn", spatial=0))
    functional.set_backend(net, "triton")
    x = torch.randn(4, 2, 3, device=DEVICE)
    eager = net(x)
    functional.reset_net(net)
    compiled = torch.compile(net, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(x), eager)


@pytest.mark.parametrize("batch_stats", [True, pytest.param(False, marks=SLOW_ON_CPU)])
def test_fused_ops_pass_opcheck(batch_stats):
    from snnorm.backends import triton_backend  # noqa: F401  (registers the ops)
    from snnorm.params import LIFParameters

    lif = LIFParameters(surrogate.Sigmoid()).for_kernel("sigmoid", 4.0)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 2, 4, 5, dtype=F64, generator=g).to(DEVICE).requires_grad_()
    w = (1 + torch.rand(4, dtype=F64, generator=g)).to(DEVICE).requires_grad_()
    b = torch.rand(4, dtype=F64, generator=g).to(DEVICE).requires_grad_()
    mean, var = x.detach().mean((0, 1, 3)), x.detach().var((0, 1, 3), unbiased=False)
    args = (x, None, w, b, None, mean, var, "batch_norm", 1e-5, batch_stats, 0.5, 0.0, *lif.to_op_args(), True, "")
    torch.library.opcheck(torch.ops.snnorm.norm_lif, args)


@pytest.mark.parametrize("T", [4, 32])
def test_fused_block_saves_x_and_per_channel_values_only(T):
    """Saved for backward: x (4 B per fp32 element-step), the checkpoints of a long sequence
    (one membrane per 16 steps) and O(T·C) statistics, never h."""
    C, shape = 3, (T, 2, 3, 4, 4)
    net = functional.fuse_norm_neurons(nn.Sequential(make_norm("tab", T, C, 2), neuron.LIFNode(step_mode="m")).to(DEVICE))
    functional.set_backend(net, "triton")
    x = torch.randn(shape, device=DEVICE).requires_grad_()
    # distinct storages saved, x's included, parameters' and buffers' not
    saved = saved_tensor_bytes(lambda: net(x), exclude=[*net.parameters(), *net.buffers()])["new"]
    elems = x.numel()
    checkpoints = (math.ceil(T / 16) - 1) * elems // T * 4
    assert saved <= 4 * elems + checkpoints + 16 * T * C * 8, saved


# the default run: BN and TAB (a per-channel and a per-step statistics rule); the rest slow
@pytest.mark.parametrize("kind", [k if k in ("bn", "tab") else pytest.param(k, marks=SLOW_ON_CPU) for k in NORM_KINDS])
def test_bf16_input_fused_is_at_least_as_close_to_float64_as_the_torch_pair(kind):
    """Mixed precision (bf16 activations, float32 norm): the fused block computes in fp32, so
    against the float64 pair it must do no worse than twice the bf16 torch pair (flash-attention's
    low-precision rule), spikes and ∂x."""
    option = {"kind": "lif", "v_threshold": 1.0, "v_reset": 0.0, "detach_reset": False,
              "surrogate_function": surrogate.ATan(), "tau": 2.0, "decay_input": True}
    ref, fused = build_pair(kind, 4, 3, 2, option, F32, 0)
    ref64, _ = build_pair(kind, 4, 3, 2, option, F64, 0)
    g = torch.Generator().manual_seed(0)
    shape = (4, 4, 3, 5, 5)
    x, g_s = (torch.randn(shape, generator=g) * 1.5 + 0.5), torch.randn(shape, generator=g)
    g_v = torch.randn(shape[1:], generator=g)
    bf = [t.to(DEVICE, torch.bfloat16) for t in (x, g_s, g_v)]
    lowp, ours = run(ref, *bf, True), run(fused, *bf, True)
    exact = run(ref64, *[t.to(DEVICE, F64) for t in (x, g_s, g_v)], True)
    assert ours[0].dtype == lowp[0].dtype
    assert (ours[0].double() != exact[0]).float().mean().item() <= NORM_NEURON_FUSED_BF16_FLIPS

    def rel(a, b):
        return ((a.double() - b).norm() / b.norm()).item()

    assert rel(ours[2], exact[2]) <= 2 * rel(lowp[2], exact[2]) + NORM_NEURON_FUSED_BF16_REL, kind


def test_memopt_checkpoint_of_a_fused_block_equals_eager_and_counts_once():
    from snnorm import memopt

    torch.manual_seed(0)
    eager = functional.fuse_norm_neurons(_block("tebn", spatial=0))
    functional.set_backend(eager, "triton")
    ckpt = copy.deepcopy(eager)
    x = torch.randn(4, 2, 3, device=DEVICE)
    results = []
    for net, call in ((eager, lambda n, t: n(t)), (ckpt, lambda n, t: memopt.checkpoint(n, t))):
        xr = x.clone().requires_grad_()
        y = call(net, xr)
        y.backward(torch.linspace(-1, 1, y.numel(), device=DEVICE).view(y.shape))
        results.append((y.detach(), xr.grad, [p.grad for p in net.parameters()], net.state_dict()))
    (y0, g0, p0, s0), (y1, g1, p1, s1) = results
    assert torch.equal(y0, y1) and torch.equal(g0, g1)
    assert all(torch.equal(a, b) for a, b in zip(p0, p1))
    assert all(torch.equal(s0[k], s1[k]) for k in s0)
    assert int(ckpt[1].num_batches_tracked) == 1  # the recompute did not count again


def test_a_dropped_fused_network_is_freed():
    """The norm and neuron reach each other only through the block: a cycle the collector frees."""
    import gc
    import weakref

    net = functional.fuse_norm_neurons(_block("bn", spatial=0))
    refs = [weakref.ref(m) for m in (net[1], net[2], fused_block(net[1]))]
    del net
    gc.collect()
    assert all(r() is None for r in refs)


# -- a layout change between the norm and the neuron (Spikformer's transpose back) ----------------


class _Relaid(nn.Module):
    """A multi-step BatchNorm1d over C of ``[T, N, L, C]`` tokens seen as ``[T, N, C, L]``, and a LIF
    after ``change`` of its output (``use_twice``: the changed view also feeds a residual)."""

    def __init__(self, change, use_twice: bool = False):
        super().__init__()
        self.bn = layer.BatchNorm1d(3, step_mode="m")
        self.sn = neuron.LIFNode(step_mode="m")
        self.change, self.use_twice = change, use_twice

    def forward(self, x):
        y = self.change(self.bn(x.transpose(-1, -2)))
        return self.sn(y) + y if self.use_twice else self.sn(y)


_CHANGES = {
    "transpose": (lambda y: y.transpose(-1, -2), "transpose(-1, -2)"),
    "mT": (lambda y: y.mT, "transpose(-2, -1)"),
    "torch.transpose": (lambda y: torch.transpose(y, 3, 2), "transpose(3, 2)"),
    "permute": (lambda y: y.permute(0, 1, 3, 2), "permute(0, 1, 3, 2)"),
    "swapaxes": (lambda y: y.swapaxes(2, 3), "transpose(2, 3)"),
}


@pytest.mark.parametrize("change", sorted(_CHANGES))
def test_a_pair_fuses_through_a_layout_change_that_keeps_time(change):
    fn, written = _CHANGES[change]
    x = torch.randn(3, 2, 4, 3, device=DEVICE)  # [T, N, L, C]
    torch.manual_seed(0)
    ref, net = _Relaid(fn), _Relaid(fn)
    net.load_state_dict(ref.state_dict())
    for report in (functional.fusion_report(net), functional.fusion_report(net, example_input=x)):
        assert report.fused == [("bn", "sn")] and str(report.relayouts["bn", "sn"]) == written
    functional.fuse_norm_neurons(net)
    assert repr(fused_block(net.sn)) == f"FusedBlock(BatchNorm1d → LIFNode through {written})"
    for t in range(2):  # the torch backend: the exact composition, the neuron's state in its own shape
        assert torch.equal(net(x + t), ref(x + t))
        assert net.sn.v.shape == (2, 4, 3) and torch.equal(net.sn.v, ref.sn.v)
    clone = copy.deepcopy(net)  # mid-sequence
    assert fused_block(clone.sn).relayout == fused_block(net.sn).relayout
    assert torch.equal(clone(x), ref(x))
    functional.unfuse_norm_neurons(net)
    assert "forward" not in net.bn.__dict__ and "forward" not in net.sn.__dict__


@pytest.mark.parametrize("example", [False, True])
def test_a_layout_change_that_moves_time_or_has_other_users_stays_apart(example):
    x = torch.randn(3, 2, 4, 3, device=DEVICE)
    read = {"example_input": x} if example else {}
    moved = functional.fusion_report(_Relaid(lambda y: y.transpose(0, 1)), **read)
    assert moved.fused == [] and moved.apart == [("bn", "sn", "the transpose(0, 1) between them moves the time dim")]
    shared = functional.fusion_report(_Relaid(lambda y: y.mT, use_twice=True), **read)
    assert shared.fused == [] and shared.apart == [("bn", "sn", "the norm's output has other users")]


def test_a_block_through_a_transpose_refuses_another_view_and_the_untransposed_spikes():
    net = functional.fuse_norm_neurons(_Relaid(lambda y: y.mT))
    x = torch.randn(3, 2, 4, 3, device=DEVICE)
    for wrong in (lambda s: s, lambda s: s.mT.clone(), lambda s: s.permute(1, 0, 3, 2)):
        y = net.bn(x.mT)
        with pytest.raises(RuntimeError, match=r"did not just produce \(or its transpose\(-2, -1\)\)"):
            net.sn(wrong(y))


def test_torch_compile_fullgraph_runs_a_block_through_a_transpose():
    torch.manual_seed(0)
    net = functional.fuse_norm_neurons(_Relaid(lambda y: y.mT))
    functional.set_backend(net, "triton")
    x = torch.randn(3, 2, 4, 3, device=DEVICE)
    eager, v = net(x), net.sn.v
    functional.reset_net(net)
    compiled = torch.compile(net, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(x), eager) and net.sn.v.shape == (2, 4, 3) and torch.equal(net.sn.v, v)
