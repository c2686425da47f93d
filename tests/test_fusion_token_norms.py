"""LayerNorm/RMSNorm → IF/LIF fusion (snnorm.fusion, the ``_RowNorm`` kind): found and paired
as the BN family is (torch.fx and a run of an example input, the report, names, state_dict,
reset_net, set_step_mode, deepcopy mid-sequence, torch.compile), the composition on the torch
backend exactly ``neuron(norm(x))``, and on the triton backend one op (``row_norm_lif``)
against the unfused torch pair.

A row norm fuses in either step mode: its statistics are each row's own, so 's' on the
neuron's ``[T, N, ..., D]`` sequence computes what 'm' does (SpikeGPT's LayerNorm is a
plain, single-step one before multi-step neurons).
"""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
import torch.nn as nn
from devices import DEVICE
from helpers import RecordingSurrogate, assert_flips_placed
from hypothesis import assume, given
from hypothesis import strategies as st
from test_fusion import NEURON_OPTIONS, make_neuron, run
from tolerances import MODULE_MAX_FLIP_SHARE, NORM_NEURON_FUSED

from perf.tools import saved_tensor_bytes
from snnorm import functional, layer, neuron, surrogate
from snnorm.fusion import FusedBlock, fusable_norm, fused_block

F32, F64 = torch.float32, torch.float64
BACKENDS = ("torch", "triton")
ROW_KINDS = ("layer_norm", "rms_norm")


def make_row_norm(kind: str, normalized_shape, step_mode: str = "m", seed: int = 0) -> nn.Module:
    """A LayerNorm or RMSNorm with γ (and β) away from their initial values."""
    norm = (layer.LayerNorm if kind == "layer_norm" else layer.RMSNorm)(normalized_shape, step_mode=step_mode)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in norm.named_parameters():
            r = torch.randn(p.shape, generator=g, dtype=F64).to(p.dtype)
            p.copy_(0.3 * r if name == "bias" else 1.0 + 0.3 * r)
    return norm


def pair(kind: str, normalized_shape=6, step_mode: str = "m", **neuron_kw) -> nn.Sequential:
    return nn.Sequential(make_row_norm(kind, normalized_shape, step_mode),
                         neuron.LIFNode(step_mode="m", **neuron_kw)).to(DEVICE)


def on(net: nn.Module, backend: str) -> nn.Module:
    functional.set_backend(net, backend)
    return net


def tokens(shape, seed: int = 0, dtype=F32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=F64) * 1.5 + 0.5).to(DEVICE, dtype)


# -------------------------------------------------------------------------------- what fuses


def test_snnorms_row_norms_are_fusable_and_torchs_are_not():
    for step_mode in ("s", "m"):
        assert fusable_norm(layer.LayerNorm(4, step_mode=step_mode))
        assert fusable_norm(layer.RMSNorm(4, step_mode=step_mode))
    assert not fusable_norm(nn.LayerNorm(4)) and not fusable_norm(nn.RMSNorm(4))  # no backend to fuse on


@pytest.mark.parametrize("kind", ROW_KINDS)
@pytest.mark.parametrize("step_mode", ["s", "m"])
def test_fusing_keeps_every_name_object_and_type(kind, step_mode):
    net = nn.Sequential(layer.Linear(4, 6, step_mode="m"), make_row_norm(kind, 6, step_mode),
                        neuron.LIFNode(step_mode="m")).to(DEVICE)
    before = [list(net.named_parameters()), list(net.named_buffers()), list(net.named_modules()),
              list(net.state_dict(keep_vars=True).items())]
    printed = repr(net)
    assert functional.fusion_report(net).fused == [("1", "2")]
    assert functional.fuse_norm_neurons(net) is net
    block = fused_block(net[1])
    assert isinstance(block, FusedBlock) and block is fused_block(net[2]) and block.norm is net[1]
    after = [list(net.named_parameters()), list(net.named_buffers()), list(net.named_modules()),
             list(net.state_dict(keep_vars=True).items())]
    for a, b in zip(before, after, strict=True):
        assert [e[0] for e in a] == [e[0] for e in b] and all(x[1] is y[1] for x, y in zip(a, b))
    assert repr(net) == printed
    assert functional.fuse_norm_neurons(net) is net and fused_block(net[1]) is block  # twice: no change


@pytest.mark.parametrize("kind", ROW_KINDS)
def test_checkpoints_load_both_ways(kind):
    plain = pair(kind, (2, 3))
    fused = functional.fuse_norm_neurons(copy.deepcopy(plain))
    other = pair(kind, (2, 3))
    other.load_state_dict(fused.state_dict())  # fused → unfused, strict
    refused = functional.fuse_norm_neurons(pair(kind, (2, 3)))
    refused.load_state_dict(plain.state_dict())  # unfused → fused, strict
    for net in (other, refused):
        for (k, a), (k2, b) in zip(plain.state_dict().items(), net.state_dict().items(), strict=True):
            assert k == k2 and torch.equal(a, b), k


class _Block(nn.Module):
    """A transformer MLP half: Linear → norm → LIF, and optionally the norm's output added back
    (a second user: the pair stays apart), or a branch on the input's rank (fx cannot trace it)."""

    def __init__(self, kind: str, share: bool = False, branch: bool = False):
        super().__init__()
        self.fc = layer.Linear(4, 6, step_mode="m")
        self.norm = make_row_norm(kind, 6, "s")
        self.sn = neuron.LIFNode(step_mode="m")
        self.share, self.branch = share, branch

    def forward(self, x):
        if self.branch and x.dim() == 4:  # [T, B, L, D] tokens: fine; fx sees a Proxy here and gives up
            x = x.flatten(1, 2)
        y = self.norm(self.fc(x))
        s = self.sn(y)
        return s + y if self.share else s


@pytest.mark.parametrize("kind", ROW_KINDS)
@pytest.mark.parametrize("by_run", [False, True], ids=["fx", "run"])
def test_graph_and_run_found_pairs_and_the_report(kind, by_run):
    x = tokens((3, 2, 5, 4))
    example = x if by_run else None
    net = _Block(kind, branch=by_run).to(DEVICE)
    if by_run:
        unread = functional.fusion_report(net).unread
        assert [name for name, _ in unread] == ["(the network)"] and "example_input" in unread[0][1]
    report = functional.fusion_report(net, example)
    assert report.fused == [("norm", "sn")] and report.apart == [] and report.unread == []
    functional.fuse_norm_neurons(net, example)
    assert fused_block(net.norm) is fused_block(net.sn) is not None
    shared = _Block(kind, share=True, branch=by_run).to(DEVICE)
    with pytest.warns(UserWarning, match="other users"):
        functional.fuse_norm_neurons(shared, example)
    assert functional.fusion_report(shared, example).apart == [("norm", "sn", "the norm's output has other users")]
    assert fused_block(shared.norm) is None


# ------------------------------------------------------------ the composition on the torch backend


def _sequence_outputs(net: nn.Sequential, x: torch.Tensor):
    """(spikes, membrane, ∂x, parameter gradients) of two calls in a row (the second starts from
    the first's membrane), from a fresh state."""
    functional.reset_net(net)
    xr = x.clone().requires_grad_()
    s1 = net(xr)
    s2 = net(xr * 0.5)
    loss = (s1 * torch.linspace(-1, 1, s1.numel(), device=DEVICE).view(s1.shape)).sum() + (s2 + net[1].v).sum()
    grads = torch.autograd.grad(loss, [xr, *net.parameters()])
    return [s1.detach(), s2.detach(), net[1].v.detach(), *grads]


@pytest.mark.parametrize("kind", ROW_KINDS)
@pytest.mark.parametrize("step_mode", ["s", "m"])
@pytest.mark.parametrize("normalized_shape, shape", [(6, (3, 2, 4, 6)), ((2, 3), (2, 3, 2, 3)), (1, (3, 2, 1))])
@pytest.mark.parametrize("node", ["lif", "if-soft"])
def test_the_torch_backend_runs_exactly_the_composition(kind, step_mode, normalized_shape, shape, node):
    """On the torch backend a fused block is ``neuron(norm(x))``: the same spikes, membrane and
    gradients bit for bit, over two calls of a sequence."""
    norm = make_row_norm(kind, normalized_shape, step_mode)
    sn = neuron.LIFNode(step_mode="m") if node == "lif" else neuron.IFNode(step_mode="m", v_reset=None)
    ref = nn.Sequential(norm, sn).to(DEVICE)
    net = functional.fuse_norm_neurons(copy.deepcopy(ref))
    assert not fused_block(net[0]).fused_kernel_applies()
    x = tokens(shape)
    for a, b in zip(_sequence_outputs(ref, x), _sequence_outputs(net, x), strict=True):
        assert torch.equal(a, b)


# -------------------------------------------------------------- where the fused kernel applies


def test_where_the_fused_kernel_applies():
    net = functional.fuse_norm_neurons(pair("layer_norm", step_mode="s"))
    block = fused_block(net[0])
    assert not block.fused_kernel_applies()  # torch backend
    on(net, "triton")
    assert block.fused_kernel_applies()  # a single-step row norm before a multi-step neuron: the same math
    net[0].step_mode = "m"
    assert block.fused_kernel_applies()
    net[0].backend = "torch"
    assert not block.fused_kernel_applies()
    net[0].backend = "triton"
    functional.set_step_mode(net, "s")  # the neuron steps one at a time: the composition
    assert not block.fused_kernel_applies()


# ------------------------------------------------------------- the fused triton op vs the torch pair


@given(
    kind=st.sampled_from(ROW_KINDS),
    option=NEURON_OPTIONS,
    T=st.sampled_from([1, 2, 5, 17]),
    rows=st.sampled_from([(1,), (3,), (2, 3)]),
    D=st.sampled_from([1, 5, 16, 1030]),
    step_mode=st.sampled_from(["s", "m"]),
    dtype=st.sampled_from([F64, F32]),
    seed=st.integers(0, 2**16),
)
def test_fused_triton_block_matches_the_unfused_torch_pair(kind, option, T, rows, D, step_mode, dtype, seed):
    if D > 1000:
        rows, T = (1,), min(T, 2)  # a wide row through the interpreter: one token, few steps
    ref = nn.Sequential(make_row_norm(kind, D, step_mode, seed), make_neuron(option)).to(DEVICE, dtype)
    fused = on(functional.fuse_norm_neurons(copy.deepcopy(ref)), "triton")
    assert fused_block(fused[0]).fused_kernel_applies()
    shape = (T, *rows, D)
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g, dtype=F64) * 1.5 + 0.5).to(DEVICE, dtype)
    g_s = torch.randn(shape, generator=g, dtype=F64).to(DEVICE, dtype)
    g_v = torch.randn(shape[1:], generator=g, dtype=F64).to(DEVICE, dtype)
    what = f"{kind} ({step_mode}) → {option}, shape {shape}, {dtype}"
    ref[1].surrogate_function = RecordingSurrogate(ref[1].surrogate_function)  # the pair's firing variable
    ref_out = run(ref, x, g_s, g_v, True)
    z = ref[1].surrogate_function.firing_variable(ref_out[0])
    assert_rows_match(ref_out, run(fused, x, g_s, g_v, True), z, dtype, what)


def assert_rows_match(ref_out, fused_out, z, dtype, what: str) -> None:
    """The fused row norm → LIF against the torch pair: every flipped spike at the threshold
    (helpers.assert_flips_placed), the membrane on the elements no flip reached; a flip
    reaches its whole row (a token's statistics) at its step and, through the membrane, every
    later step, so ∂x is compared on the rows that never flipped and ∂γ, ∂β (sums over every
    row) only when nothing flipped."""
    s_ref, v_ref, gx_ref, gp_ref, _ = ref_out
    s, v, gx, gp, _ = fused_out
    tol = NORM_NEURON_FUSED[dtype]
    assert s.dtype == s_ref.dtype and s.shape == s_ref.shape, what
    clean = assert_flips_placed(what, s, s_ref, z, dtype, channel_coupled=False)  # [rows..., D]
    clean_rows = clean.all(dim=-1, keepdim=True).expand_as(clean)
    assume(bool(clean_rows.any()))  # every token flipped somewhere: nothing comparable left

    def close(got, want, mask, name):
        torch.testing.assert_close(got[mask], want[mask], **tol, msg=lambda m: f"{what}: {name}: {m}")

    close(v, v_ref, clean, "membrane")
    close(gx, gx_ref, clean_rows.expand_as(gx_ref), "∂x")
    assert gp.keys() == gp_ref.keys(), what
    if bool(clean.all()):
        for name in gp_ref:
            close(gp[name], gp_ref[name], torch.ones_like(gp_ref[name], dtype=torch.bool), name)


@pytest.mark.parametrize("kind", ROW_KINDS)
def test_fused_triton_block_of_several_normalised_dims_and_a_strided_input(kind):
    """normalized_shape (2, 3) (the op sees rows of 6) and a transposed token view ([T, B, D, L]
    seen as [T, B, L, D], as Spikformer's code makes): the torch pair's spikes and membrane."""
    option = {"kind": "lif", "v_threshold": 1.0, "v_reset": 0.0, "detach_reset": False,
              "surrogate_function": surrogate.ATan(), "tau": 2.0, "decay_input": True}
    for normalized_shape, x in [((2, 3), tokens((3, 2, 4, 2, 3), dtype=F64)),
                                (5, tokens((3, 2, 5, 4), dtype=F64).transpose(-1, -2))]:
        ref = nn.Sequential(make_row_norm(kind, normalized_shape), make_neuron(option)).to(DEVICE, F64)
        fused = on(functional.fuse_norm_neurons(copy.deepcopy(ref)), "triton")
        spikes, want = fused(x), ref(x)
        assert torch.equal(spikes, want)
        torch.testing.assert_close(fused[1].v, ref[1].v, **NORM_NEURON_FUSED[F64])


@pytest.mark.parametrize("T", [4, 32])
def test_fused_triton_block_saves_x_and_per_row_values_only(T):
    """Saved for backward: x (4 B per fp32 element-step), the membrane checkpoints of a long
    sequence (one per 16 steps) and O(T·rows) statistics, never h."""
    rows, D = 2 * 3, 8
    net = on(functional.fuse_norm_neurons(pair("layer_norm", D)), "triton")
    x = tokens((T, 2, 3, D)).requires_grad_()
    saved = saved_tensor_bytes(lambda: net(x), exclude=[*net.parameters(), *net.buffers()])["new"]
    elems = x.numel()
    checkpoints = (math.ceil(T / 16) - 1) * elems // T * 4
    assert saved <= 4 * elems + checkpoints + 4 * 8 * T * rows, saved  # up to 4 fp64 values per row and step


# ----------------------------------------------------- state functions, copies, compile: both backends


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ROW_KINDS)
def test_reset_step_mode_and_deepcopy_mid_sequence(backend, kind):
    net = on(functional.fuse_norm_neurons(pair(kind)), backend)
    assert net[0].backend == backend and net[1].backend == backend
    x = tokens((4, 2, 3, 6))
    net(x[:2])
    clone = copy.deepcopy(net)  # mid-sequence
    block = fused_block(clone[0])
    assert block is fused_block(clone[1]) and block is not fused_block(net[0])
    assert block.norm is clone[0] and block.neuron is clone[1] and torch.equal(clone[1].v, net[1].v)
    assert torch.equal(clone(x[2:]), net(x[2:]))  # the copy continues the sequence as the original
    assert torch.equal(clone[1].v, net[1].v)
    functional.reset_net(net)
    assert net[1].v == 0.0
    whole = net(x)
    functional.set_step_mode(net, "s")  # single-step: the composition, step by step
    assert net[0].step_mode == "s" and not fused_block(net[0]).fused_kernel_applies()
    functional.reset_net(net)
    steps = torch.stack([net(x[t]) for t in range(4)])
    if backend == "torch":
        assert torch.equal(steps, whole)
    else:  # the torch composition step by step against the fused op: spikes within rounding of V_th
        assert (steps != whole).float().mean().item() <= MODULE_MAX_FLIP_SHARE


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_saved_whole_model_runs_fused_on_its_own_modules(backend):
    net = on(functional.fuse_norm_neurons(pair("rms_norm")), backend)
    buffer = io.BytesIO()
    torch.save(net, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    block = fused_block(loaded[0])
    assert block.norm is loaded[0] and block.neuron is loaded[1]
    assert block.fused_kernel_applies() == (backend == "triton")
    x = tokens((3, 2, 6))
    assert torch.equal(loaded(x), net(x)) and torch.equal(loaded[1].v, net[1].v)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ROW_KINDS)
def test_bad_input_is_refused_before_the_membrane_moves(backend, kind):
    net = on(functional.fuse_norm_neurons(pair(kind)), backend)
    net(tokens((2, 2, 6)))
    v = net[1].v.clone()
    with pytest.raises(ValueError, match=r"normalized_shape \(6,\).*ending in \(5,\)"):
        net(tokens((2, 2, 5)))
    with pytest.raises(ValueError, match="membrane state has shape"):
        net(tokens((2, 3, 6)))  # another batch mid-sequence
    assert torch.equal(net[1].v, v)


@pytest.mark.slow  # ~13 s a backend on 2 CPU cores; the slow set (.ci/run) runs it
@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_fullgraph(backend):
    net = on(functional.fuse_norm_neurons(pair("layer_norm", step_mode="s")), backend)
    x = tokens((4, 2, 6))
    eager = net(x)
    functional.reset_net(net)
    compiled = torch.compile(net, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(x), eager)
