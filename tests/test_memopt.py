"""snnorm.memopt: checkpointing SNN blocks (running statistics once, state restored).

Oracle: the same block without checkpointing. A block is Conv -> BN-like layer ->
stateful neuron in multi-step mode over T=4 (sometimes in chunks, the neuron's state
carried from one chunk to the next). After one training step with checkpointing, the
outputs, every gradient, every running statistic and every memory must equal those of
the un-checkpointed step.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint as torch_checkpoint
from tolerances import CHUNKED_FP32, EXACT, RECOMPUTED_GRAD_FP32

from snnorm import base, functional, layer, memopt, neuron

T, N, C_IN, C, H, W = 4, 2, 3, 4, 5, 5


class _StandInBN(nn.BatchNorm2d):
    """Multi-step BN that consults should_update_running_stats; when it must not update
    in training it hands F.batch_norm throw-away copies of the running statistics (not
    None), so the recompute saves the same tensors as the forward."""

    def forward(self, x_seq):
        update = memopt.should_update_running_stats(self)
        mean, var = self.running_mean, self.running_var
        if self.training and not update:
            mean, var = mean.clone(), var.clone()
        elif update:
            self.num_batches_tracked.add_(1)
        y = nn.functional.batch_norm(
            x_seq.flatten(0, 1), mean, var, self.weight, self.bias, self.training, self.momentum, self.eps
        )
        return y.view(x_seq.shape)


def _make_bn(kind: str) -> nn.Module:
    if kind == "standin":
        return _StandInBN(C)
    if kind == "snnorm":
        return layer.BatchNorm2d(C, step_mode="m")
    if kind == "tdbn":
        return layer.ThresholdDependentBatchNorm2d(1.0, 1.0, C)
    if kind == "torch":  # plain torch BN: does not consult should_update_running_stats
        return layer.SeqToANNContainer(nn.BatchNorm2d(C))
    raise ValueError(kind)


def _make_neuron(kind: str) -> nn.Module:
    if kind == "lif":
        return neuron.LIFNode(tau=2.0, step_mode="m")
    if kind == "mpbn":
        return neuron.MPBNLIFNode(out_channels=C, step_mode="m")
    raise ValueError(kind)


class Block(nn.Module):
    def __init__(self, bn_kind: str = "snnorm", neuron_kind: str = "lif"):
        super().__init__()
        self.conv = layer.Conv2d(C_IN, C, 3, padding=1, bias=False, step_mode="m")
        self.bn = _make_bn(bn_kind)
        self.sn = _make_neuron(neuron_kind)

    def forward(self, x_seq):
        return self.sn(self.bn(self.conv(x_seq)) * 2.0 + 0.5)


def _input(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(T, N, C_IN, H, W, generator=g)


def _train_step(block: nn.Module, x: torch.Tensor, call, chunks: int = 1):
    """One forward over T in ``chunks`` calls of ``call(block, x_chunk)`` and a backward."""
    x = x.clone().requires_grad_(True)
    out = torch.cat([call(block, xc) for xc in torch.tensor_split(x, chunks)])
    weights = torch.linspace(-1.0, 2.0, out.numel()).view_as(out)
    (out * weights).sum().backward()
    return out.detach(), x.grad


def _eager(block, x):
    return block(x)


def _memopt(block, x):
    return memopt.checkpoint(block, x)


def _plain(block, x):
    return torch_checkpoint(block, x, use_reentrant=False)


def _memories(block: nn.Module) -> dict:
    return {
        f"{name}.{k}": v for name, m in block.named_modules() if isinstance(m, base.MemoryModule)
        for k, v in m.named_memories()
    }


def _assert_same_step(ref_block, ref_result, block, result, check_memories=True):
    out_ref, gx_ref = ref_result
    out, gx = result
    assert torch.equal(out, out_ref)
    assert out.sum() > 0, "the block should spike, else the test is vacuous"
    torch.testing.assert_close(gx, gx_ref, **RECOMPUTED_GRAD_FP32)
    for (name, p_ref), (_, p) in zip(ref_block.named_parameters(), block.named_parameters()):
        assert p.grad is not None, name
        torch.testing.assert_close(p.grad, p_ref.grad, **RECOMPUTED_GRAD_FP32, msg=name)
    for (name, b_ref), (_, b) in zip(ref_block.named_buffers(), block.named_buffers()):
        torch.testing.assert_close(b, b_ref, **EXACT, msg=name)
    if check_memories:
        mem_ref, mem = _memories(ref_block), _memories(block)
        assert mem.keys() == mem_ref.keys()
        for k in mem:
            assert isinstance(mem[k], torch.Tensor), k
            torch.testing.assert_close(mem[k], mem_ref[k], **EXACT, msg=k)


# -- memopt.checkpoint ---------------------------------------------------------------------


@pytest.mark.parametrize("bn_kind", ["snnorm", "tdbn", "torch", "standin"])
@pytest.mark.parametrize("neuron_kind", ["lif", "mpbn"])
@pytest.mark.parametrize("chunks", [1, 2])
def test_checkpoint_equals_eager(bn_kind, neuron_kind, chunks):
    torch.manual_seed(0)
    ref = Block(bn_kind, neuron_kind)
    blk = copy.deepcopy(ref)
    x = _input(1)
    r_ref = _train_step(ref, x, _eager, chunks)
    r = _train_step(blk, x, _memopt, chunks)
    _assert_same_step(ref, r_ref, blk, r)
    # running statistics moved exactly once per chunk
    for b in (ref, blk):
        bn = b.bn[0] if bn_kind == "torch" else b.bn
        assert int(bn.num_batches_tracked) == chunks


def test_checkpoint_per_timestep_from_a_carried_state():
    """Checkpoint every timestep of a second sequence that starts from a non-reset state."""
    torch.manual_seed(1)
    ref = Block("snnorm", "mpbn")
    with torch.no_grad():
        ref(_input(2))  # leaves a non-reset membrane
    blk = copy.deepcopy(ref)
    x = _input(3)
    r_ref = _train_step(ref, x, _eager, chunks=T)
    r = _train_step(blk, x, _memopt, chunks=T)
    _assert_same_step(ref, r_ref, blk, r)


def test_checkpoint_recompute_restores_state_and_leaves_it_alone():
    """Checkpointed chunk, then an eager chunk, then backward: the recompute of the first
    chunk starts from its own starting state and leaves the state after the eager chunk."""
    torch.manual_seed(2)
    ref = Block("snnorm", "lif")
    blk = copy.deepcopy(ref)
    x = _input(4)
    calls = iter([_memopt, _eager])
    r = _train_step(blk, x, lambda b, xc: next(calls)(b, xc), chunks=2)
    r_ref = _train_step(ref, x, _eager, chunks=2)
    _assert_same_step(ref, r_ref, blk, r)


def test_checkpoint_discovers_modules_through_closures_and_calls():
    torch.manual_seed(3)
    ref = Block("torch", "mpbn")
    via_dict, via_lambda = copy.deepcopy(ref), copy.deepcopy(ref)
    x = _input(5)
    r_ref = _train_step(ref, x, _eager, chunks=2)

    # reachable only through a dict: found by the forward pre-hook on its first call
    holder = {"block": via_dict}

    def through_dict(x_chunk):
        return holder["block"](x_chunk)

    r = _train_step(via_dict, x, lambda b, xc: memopt.checkpoint(through_dict, xc), chunks=2)
    _assert_same_step(ref, r_ref, via_dict, r)
    # a closure over the block
    r = _train_step(via_lambda, x, lambda b, xc: memopt.checkpoint(lambda y: b(y), xc), chunks=2)
    _assert_same_step(ref, r_ref, via_lambda, r)


def test_checkpoint_passes_kwargs_and_runs_once_without_grad():
    torch.manual_seed(4)
    blk = Block("snnorm", "lif")

    def fn(x_seq, scale=1.0):
        return blk(x_seq * scale)

    x = _input(6)
    with torch.no_grad():
        y = memopt.checkpoint(fn, x, scale=3.0)
    assert int(blk.bn.num_batches_tracked) == 1
    functional.reset_net(blk)
    with torch.no_grad():
        assert torch.equal(y, blk(x * 3.0))


def test_checkpoint_rejects_unsupported_options():
    blk = Block()
    x = _input(7)
    with pytest.raises(ValueError, match="use_reentrant=True"):
        memopt.checkpoint(blk, x, use_reentrant=True)
    with pytest.raises(ValueError, match="context_fn"):
        memopt.checkpoint(blk, x, context_fn=None)
    with pytest.raises(TypeError, match="callable"):
        memopt.checkpoint(3, x)
    assert int(blk.bn.num_batches_tracked) == 0  # nothing ran


def test_checkpoint_refuses_memories_mutated_in_place():
    class Accumulator(base.MemoryModule):
        def __init__(self):
            super().__init__()
            self.register_memory("acc", 0.0)

        def single_step_forward(self, x):
            out = x * (1.0 + self.acc)
            self.acc = self.acc + x.detach()
            return out

    m = Accumulator()
    m(torch.randn(3))  # acc is now a tensor
    start_acc = m.acc
    x = torch.randn(3, requires_grad=True)
    y = memopt.checkpoint(m, x)
    assert m.acc is not start_acc
    with torch.no_grad():
        start_acc.add_(1.0)  # the state the checkpointed forward started from, changed in place
    with pytest.raises(RuntimeError, match="modified in place"):
        y.sum().backward()


# -- gc flags ----------------------------------------------------------------------------


class _FlagRecorder(nn.Module):
    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, x):
        self.seen.append((memopt.in_gc_1st_forward(), memopt.in_recomputation()))
        return x.sin()


def test_flags_in_first_forward_and_recompute():
    assert not memopt.in_gc_1st_forward() and not memopt.in_recomputation()
    rec = _FlagRecorder()
    x = torch.randn(3, requires_grad=True)
    memopt.checkpoint(rec, x).sum().backward()
    # snnorm's scheme: the first forward commits (no flag), the recompute is flagged
    assert rec.seen == [(False, False), (False, True)]
    rec.seen.clear()
    torch_checkpoint(rec, x, use_reentrant=False).sum().backward()
    assert rec.seen == [(False, False), (False, True)]
    rec.seen.clear()
    torch_checkpoint(rec, x, use_reentrant=True).sum().backward()
    assert rec.seen == [(False, False), (False, True)]


def test_gc_1st_forward_context_stops_running_stat_updates():
    bn = layer.BatchNorm2d(C, step_mode="m")
    x = torch.randn(T, N, C, H, W)
    with memopt.gc_1st_forward():
        assert memopt.in_gc_1st_forward()
        with memopt.gc_1st_forward():
            assert memopt.in_gc_1st_forward()
        assert memopt.in_gc_1st_forward()  # nested exit restores, not clears
        assert not memopt.should_update_running_stats(bn)
        bn(x)
    assert not memopt.in_gc_1st_forward()
    assert int(bn.num_batches_tracked) == 0 and torch.equal(bn.running_mean, torch.zeros(C))
    assert memopt.should_update_running_stats(bn)
    bn.eval()
    assert not memopt.should_update_running_stats(bn)


# -- plain torch.utils.checkpoint ------------------------------------------------------------


@pytest.mark.parametrize(
    "bn_kind, neuron_kind, use_reentrant",
    [
        ("standin", "lif", False),
        ("standin", "lif", True),
        ("snnorm", "mpbn", True),
        ("snnorm", "lif", False),
        ("tdbn", "lif", False),
        ("standin", "mpbn", False),
        ("snnorm", "mpbn", False),
    ],
)
def test_plain_torch_checkpoint_updates_statistics_once(bn_kind, neuron_kind, use_reentrant):
    """BN-like layers that consult should_update_running_stats update once under plain
    torch.utils.checkpoint; with the state reset before backward the recompute starts
    where the forward did, so the gradients are right too."""
    torch.manual_seed(5)
    ref = Block(bn_kind, neuron_kind)
    blk = copy.deepcopy(ref)
    x = _input(8)
    r_ref = _train_step(ref, x, _eager)
    x_req = x.clone().requires_grad_(True)
    out = torch_checkpoint(blk, x_req, use_reentrant=use_reentrant)
    functional.reset_net(blk)  # the pattern that makes a plain checkpoint of a stateful block exact
    weights = torch.linspace(-1.0, 2.0, out.numel()).view_as(out)
    (out * weights).sum().backward()
    _assert_same_step(ref, r_ref, blk, (out.detach(), x_req.grad), check_memories=False)
    assert int(blk.bn.num_batches_tracked) == 1
    if neuron_kind == "mpbn":
        assert int(blk.sn.vbn.num_batches_tracked) == T


def test_plain_torch_checkpoint_updates_torch_bn_twice_memopt_once():
    torch.manual_seed(6)
    a = Block("torch", "lif")
    b = copy.deepcopy(a)
    with memopt.allow_stateful_recompute():  # the stateful guard would stop plain checkpointing first
        _train_step(a, _input(9), _plain)
    _train_step(b, _input(9), _memopt)
    assert int(a.bn[0].num_batches_tracked) == 2  # torch's BN, recomputed: the peer defect
    assert int(b.bn[0].num_batches_tracked) == 1


def _guarded_block():
    return Block("snnorm", "lif")  # MemoryModule.forward calls the stateful-recompute guard


def test_guard_raises_for_plain_checkpoint_of_a_stateful_block():
    torch.manual_seed(7)
    blk = _guarded_block()
    x = _input(10).requires_grad_(True)
    out = torch_checkpoint(blk, x, use_reentrant=False)
    with pytest.raises(RuntimeError, match=r"LIFNode is stateful.*memopt\.checkpoint"):
        out.sum().backward()


def test_guard_passes_memopt_checkpoint_and_allowed_recompute():
    torch.manual_seed(8)
    ref = _guarded_block()
    blk = copy.deepcopy(ref)
    x = _input(11)
    r_ref = _train_step(ref, x, _eager, chunks=2)
    r = _train_step(blk, x, _memopt, chunks=2)
    _assert_same_step(ref, r_ref, blk, r)
    other = _guarded_block()
    out = torch_checkpoint(other, x.clone().requires_grad_(True), use_reentrant=True)
    with memopt.allow_stateful_recompute():
        out.sum().backward()  # no error (the caller takes responsibility)
    assert other.conv.weight.grad is not None


# -- checkpoint_module -------------------------------------------------------------------


@pytest.mark.parametrize("chunks", [1, 2, 4])
def test_checkpoint_module_equals_eager(chunks):
    torch.manual_seed(9)
    ref = Block("torch", "mpbn")
    wrapped = memopt.checkpoint_module(copy.deepcopy(ref), chunks=chunks)
    x = _input(12)
    # the eager reference runs the same chunks (a BN over a chunk sees only its steps)
    r_ref = _train_step(ref, x, _eager, chunks=chunks)
    r = _train_step(wrapped, x, lambda m, xc: m(xc))
    _assert_same_step(ref, r_ref, wrapped.module, r)
    assert int(wrapped.module.bn[0].num_batches_tracked) == chunks


def test_checkpoint_module_keeps_state_dict_keys_and_parameter_names():
    ref = Block("snnorm", "mpbn")
    wrapped = memopt.checkpoint_module(copy.deepcopy(ref))
    assert list(wrapped.state_dict().keys()) == list(ref.state_dict().keys())
    assert [n for n, _ in wrapped.named_parameters()] == [n for n, _ in ref.named_parameters()]
    with torch.no_grad():
        ref.conv.weight.add_(1.0)
    wrapped.load_state_dict(ref.state_dict())  # a plain checkpoint loads into the wrapper
    assert torch.equal(wrapped.module.conv.weight, ref.conv.weight)
    fresh = Block("snnorm", "mpbn")
    fresh.load_state_dict(wrapped.state_dict())  # and the other way round
    assert torch.equal(fresh.conv.weight, ref.conv.weight)
    outer = nn.Sequential(wrapped)
    assert list(outer.state_dict().keys()) == ["0." + k for k in ref.state_dict().keys()]
    outer.load_state_dict(outer.state_dict())


def test_checkpoint_module_errors():
    blk = Block()
    with pytest.raises(ValueError, match="chunks"):
        memopt.checkpoint_module(blk, chunks=0)
    with pytest.raises(TypeError, match="nn.Module"):
        memopt.checkpoint_module(lambda x: x)
    wrapped = memopt.checkpoint_module(blk, chunks=5)
    with pytest.raises(ValueError, match="chunks=5.*got 4"):
        wrapped(_input(13))
    wrapped = memopt.checkpoint_module(blk, chunks=2, chunked_args=(1,))
    with pytest.raises(ValueError, match="chunked argument 1"):
        wrapped(_input(13))


def test_checkpoint_of_folded_mpbn_in_training_equals_eager():
    torch.manual_seed(10)
    ref = Block("snnorm", "mpbn")
    with torch.no_grad():
        ref(_input(14))
    functional.reset_net(ref)
    ref.sn.re_parameterize_v_threshold(running_stats=False)
    blk = copy.deepcopy(ref)
    x = _input(15)
    r_ref = _train_step(ref, x, _eager)
    r = _train_step(blk, x, _memopt)
    _assert_same_step(ref, r_ref, blk, r)


class _StructuredOutput(nn.Module):
    """A stateful block returning a dict / tuple with tensor and non-tensor members."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind
        self.conv = layer.Conv2d(C_IN, C, 3, padding=1, step_mode="m")
        self.sn = neuron.LIFNode(step_mode="m")

    def forward(self, x_seq):
        spikes = self.sn(self.conv(x_seq))
        rate = spikes.mean(dim=(2, 3, 4))  # [T, N]
        if self.kind == "dict":
            return {"spikes": spikes, "rate": rate, "step_mode": "m", "extra": None}
        if self.kind == "tuple":
            return spikes, (rate, C)
        if self.kind == "chunk-dependent":
            return spikes, x_seq.shape[0]  # an int that differs between uneven chunks
        return spikes, rate.sum()  # a 0-dim tensor cannot be concatenated over chunks


@pytest.mark.parametrize("kind", ["dict", "tuple"])
def test_checkpoint_module_chunks_merge_structured_outputs(kind):
    torch.manual_seed(11)
    ref = _StructuredOutput(kind)
    wrapped = memopt.checkpoint_module(copy.deepcopy(ref), chunks=2)
    x = _input(16)
    out, out_ref = wrapped(x.clone().requires_grad_(True)), ref(x)
    if kind == "dict":
        assert out.keys() == out_ref.keys() and out["step_mode"] == "m" and out["extra"] is None
        tensors = [(out["spikes"], out_ref["spikes"]), (out["rate"], out_ref["rate"])]
    else:
        assert isinstance(out, tuple) and out[1][1] == C
        tensors = [(out[0], out_ref[0]), (out[1][0], out_ref[1][0])]
    for got, expected in tensors:
        assert got.shape == expected.shape  # concatenated back to T along dim 0
        torch.testing.assert_close(got, expected, **CHUNKED_FP32)
    tensors[0][0].sum().backward()
    assert wrapped.module.conv.weight.grad is not None


@pytest.mark.parametrize("kind, message", [
    ("chunk-dependent", r"not a tensor and differs between pieces \(2 vs 1\)"),
    ("scalar", "0-dim tensor"),
])
def test_checkpoint_module_chunks_reject_what_cannot_be_merged(kind, message):
    wrapped = memopt.checkpoint_module(_StructuredOutput(kind), chunks=2)
    with pytest.raises(ValueError, match=message):
        wrapped(torch.randn(3, N, C_IN, H, W))  # T=3 in chunks of 2 and 1
