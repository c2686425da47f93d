"""Careless users: each mistake is a clear error, and the module's state is what it was.

* ``GroupNorm(eps=0)``: its statistics come from the input (a group of equal values has
  variance 0), so ε = 0 is refused like the BN family's in training, in the constructor
  and again in the forward (``eps`` is a plain attribute).
* ``v_threshold <= 0`` (or not finite) in the LIF/IF/MPBN constructors and setters: a
  neuron with V_th <= 0 fires on every step from rest; ValueError naming v_threshold.
* A forward whose op fails (a kernel that cannot launch: here the backend's op is
  replaced by one that raises) changes nothing: ``num_batches_tracked``, running
  statistics, timestep counters and membranes stay as they were.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from snnorm import backends, layer, neuron

C = 3


def state_of(module: torch.nn.Module) -> dict:
    """Every buffer, parameter and memory of ``module`` (and its submodules), copied."""
    state = {f"buffer {k}": v.detach().clone() for k, v in module.named_buffers()}
    state.update({f"param {k}": v.detach().clone() for k, v in module.named_parameters()})
    for name, m in module.named_modules():
        for key, value in getattr(m, "_memories", {}).items():
            state[f"memory {name}.{key}"] = value.detach().clone() if isinstance(value, torch.Tensor) else value
        for key in ("v_seq",):
            value = getattr(m, key, None)
            state[f"attr {name}.{key}"] = value.detach().clone() if isinstance(value, torch.Tensor) else value
    return state


def assert_same_state(before: dict, after: dict) -> None:
    assert before.keys() == after.keys()
    for key in before:
        a, b = before[key], after[key]
        if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
            assert isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor), key
            assert a.shape == b.shape and torch.equal(a, b), key
        else:
            assert a == b, key


class KernelFailure(RuntimeError):
    pass


def _raise(*args, **kwargs):
    raise KernelFailure("the kernel could not launch")


def break_op(monkeypatch, backend: str, op: str, after: int = 0) -> None:
    """Make ``op`` of ``backend`` raise (after ``after`` successful calls)."""
    table = backends.get_ops(backend)
    original = table._ops[op]
    calls = [0]

    def failing(*args, **kwargs):
        calls[0] += 1
        if calls[0] > after:
            _raise()
        return original(*args, **kwargs)

    monkeypatch.setitem(table._ops, op, failing)


# -- a) GroupNorm(eps=0) ------------------------------------------------------------------


def test_group_norm_refuses_eps_zero_in_the_constructor():
    with pytest.raises(ValueError, match=r"GroupNorm: eps must be > 0, got 0.0; .*variance 0"):
        layer.GroupNorm(1, C, eps=0)
    with pytest.raises(ValueError, match=r"GroupNorm: eps must be a finite number >= 0"):
        layer.GroupNorm(1, C, eps=-1e-5)


@pytest.mark.parametrize("step_mode", ["s", "m"])
def test_group_norm_refuses_eps_set_to_zero_before_computing(step_mode):
    gn = layer.GroupNorm(1, C, step_mode=step_mode)
    gn.eps = 0.0
    before = state_of(gn)
    x = torch.zeros(2, 2, C, 4) if step_mode == "m" else torch.zeros(2, C, 4)  # a silent group: variance 0
    with pytest.raises(ValueError, match=r"GroupNorm: eps must be > 0, got 0.0"):
        gn(x)
    assert_same_state(before, state_of(gn))


# -- b) v_threshold <= 0 ------------------------------------------------------------------

NEURONS = {
    "IFNode": lambda **kw: neuron.IFNode(**kw),
    "LIFNode": lambda **kw: neuron.LIFNode(**kw),
    "MPBNLIFNode": lambda **kw: neuron.MPBNLIFNode(out_features=C, **kw),
    "MPBNBaseNode": lambda **kw: neuron.MPBNBaseNode(out_channels=C, **kw),
}


@pytest.mark.parametrize("name", NEURONS)
@pytest.mark.parametrize("value", [0, 0.0, -1.0, -1e-30])
def test_non_positive_threshold_is_refused_by_the_constructor(name, value):
    with pytest.raises(ValueError, match=rf"^{name}: v_threshold must be > 0, got .*fires on every step"):
        NEURONS[name](v_threshold=value)


@pytest.mark.parametrize("name", NEURONS)
@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_non_finite_threshold_is_refused_by_the_constructor(name, value):
    with pytest.raises(ValueError, match=rf"^{name}: v_threshold must be finite"):
        NEURONS[name](v_threshold=value)


@pytest.mark.parametrize("name", NEURONS)
def test_threshold_setter_refuses_and_keeps_the_old_value(name):
    node = NEURONS[name](v_threshold=0.5)
    for value in (0.0, -2.0, math.nan):
        with pytest.raises(ValueError, match=rf"^{name}: v_threshold must be"):
            node.v_threshold = value
        assert node.v_threshold == 0.5
    with pytest.raises(TypeError, match=rf"^{name}: v_threshold must be a real number"):
        node.v_threshold = "1.0"
    node.v_threshold = 2  # an int is a threshold too
    assert node.v_threshold == 2.0 and isinstance(node.v_threshold, float)


# -- c) a forward whose op fails changes nothing -------------------------------------------


def _warm(module, x):
    """One successful forward, so the state to keep is not the initial one."""
    module(x)
    if hasattr(module, "reset") and getattr(module, "t", None) is not None and module.step_mode == "m":
        module.reset()  # BNTT runs a whole sequence per call from t = -1


def _seq(*shape):
    return torch.randn(*shape)


def _mpbn(momentum, **kwargs):
    node = neuron.MPBNLIFNode(**kwargs)
    node.vbn.momentum = momentum
    return node


CASES = {
    # name: (make, input, op, step-by-step calls before the failing one)
    "BatchNorm2d m": (lambda m: layer.BatchNorm2d(C, momentum=m, step_mode="m"), (4, 2, C, 3, 3), "batch_norm_seq"),
    "tdBN m": (lambda m: layer.ThresholdDependentBatchNorm2d(1.0, 1.0, C, momentum=m), (4, 2, C, 3, 3), "batch_norm_seq"),
    "TEBN": (lambda m: layer.TemporalEffectiveBatchNorm2d(4, C, momentum=m), (4, 2, C, 3, 3), "tebn"),
    "BNTT m": (lambda m: layer.BatchNormThroughTime2d(4, C, momentum=m, step_mode="m"), (4, 2, C, 3, 3), "bntt"),
    "BatchNormTT m": (lambda m: layer.BatchNormTT1d(C, 4, momentum=m, step_mode="m"), (4, 2, C), "bntt"),
    "TAB m": (lambda m: layer.TemporalAccumulatedBatchNorm2d(4, C, momentum=m), (4, 2, C, 3, 3), "tab"),
    "TAB s": (lambda m: layer.TemporalAccumulatedBatchNorm1d(4, C, momentum=m, step_mode="s"), (2, C), "tab"),
    "MPBN m": (lambda m: _mpbn(m, out_features=C, step_mode="m"), (4, 2, C), "mpbn_lif"),
    "MPBN s": (lambda m: _mpbn(m, out_channels=C), (2, C, 3, 3), "mpbn_lif"),
    "LIF m": (lambda m: neuron.LIFNode(step_mode="m"), (4, 2, C), "lif"),
}


@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum", "cumulative"])
@pytest.mark.parametrize("case", CASES)
def test_a_failing_op_changes_nothing(monkeypatch, case, momentum):
    make, shape, op = CASES[case]
    module = make(momentum)
    _warm(module, _seq(*shape))
    before = state_of(module)
    break_op(monkeypatch, "torch", op)
    with pytest.raises(KernelFailure):
        module(_seq(*shape))
    assert_same_state(before, state_of(module))
    monkeypatch.undo()
    module(_seq(*shape))  # and it still works afterwards
    assert not all(torch.equal(before[k], v) for k, v in state_of(module).items() if isinstance(v, torch.Tensor))


@pytest.mark.parametrize(
    "make, shape",
    [
        (lambda: layer.BatchNorm2d(C), (2, C, 3, 3)),
        (lambda: layer.BatchNormThroughTime2d(4, C), (2, C, 3, 3)),
        (lambda: layer.BatchNormTT2d(C, 4), (2, C, 3, 3)),
    ],
    ids=["BatchNorm2d s", "BNTT s", "BatchNormTT s"],
)
def test_a_failing_single_step_batch_norm_changes_nothing(monkeypatch, make, shape):
    module = make()
    module(torch.randn(*shape))
    before = state_of(module)
    monkeypatch.setattr(F, "batch_norm", _raise)
    with pytest.raises(KernelFailure):
        module(torch.randn(*shape))
    assert_same_state(before, state_of(module))


def test_mpbn_store_v_seq_failing_at_a_later_step_undoes_the_earlier_steps(monkeypatch):
    # store_v_seq runs the op once per step: steps 0 and 1 succeed, step 2 fails
    node = neuron.MPBNLIFNode(out_features=C, step_mode="m", store_v_seq=True)
    node(torch.randn(4, 2, C))
    before = state_of(node)
    break_op(monkeypatch, "torch", "mpbn_lif", after=2)
    with pytest.raises(KernelFailure):
        node(torch.randn(4, 2, C))
    assert_same_state(before, state_of(node))


@pytest.mark.parametrize("running_stats", [False, True])
def test_a_failing_folded_mpbn_op_changes_nothing(monkeypatch, running_stats):
    node = neuron.MPBNLIFNode(out_features=C, step_mode="m")
    node(torch.randn(4, 2, C))
    node.reset()
    node.re_parameterize_v_threshold(running_stats=running_stats)
    node(torch.randn(4, 2, C))  # training mode after the fold: test-time adaptation moves mu, sigma2
    before = state_of(node)
    break_op(monkeypatch, "torch", "mpbn_lif_folded")
    with pytest.raises(KernelFailure):
        node(torch.randn(4, 2, C))
    assert_same_state(before, state_of(node))


def test_a_failing_triton_mpbn_op_changes_nothing(monkeypatch):
    """The reported case: the MPBN neuron on the triton backend counted the batch before its
    kernel failed (e.g. the Triton interpreter switched off after triton was imported)."""
    try:
        backends.get_ops("triton")
    except backends.BackendUnavailableError as err:
        pytest.skip(str(err))
    node = neuron.MPBNLIFNode(out_features=C, step_mode="m", backend="triton")
    before = state_of(node)
    break_op(monkeypatch, "triton", "mpbn_lif")
    with pytest.raises(KernelFailure):
        node(torch.randn(4, 2, C))
    assert_same_state(before, state_of(node))
    assert int(node.vbn.num_batches_tracked) == 0
