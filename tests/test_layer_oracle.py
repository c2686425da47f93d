"""snnorm.layer against spikingjelly 2.0.0, the numerical oracle.

For every layer spikingjelly also has, in the same configuration (both step modes where
supported, train and eval, 1d/2d/3d, affine on/off): outputs, input gradients, parameter
gradients and running statistics must equal spikingjelly's to 1e-6 relative (fp32) over
several timesteps / sequences. Parameters travel by ``load_state_dict`` from the
spikingjelly layer to snnorm's (strict) and back again, which proves that the
``state_dict`` s are interchangeable. The largest relative error seen per layer is
printed at the end of the module (``pytest -s``) and, if ``SNNORM_LAYER_ERRORS`` names a
file, written there as JSON.
"""

from __future__ import annotations

import copy
import json
import os
from collections import defaultdict

import pytest
import torch
import torch.nn as nn
from tolerances import LAYER_VS_SJ_REL, rel_err

sj_layer = pytest.importorskip(
    "spikingjelly.activation_based.layer", reason="spikingjelly 2.0.0 is the numerical oracle for snnorm.layer"
)
from spikingjelly.activation_based import functional as sj_functional  # noqa: E402

from snnorm import functional, layer  # noqa: E402

MAX_ERRORS: dict[str, float] = defaultdict(float)


@pytest.fixture(scope="module", autouse=True)
def _error_table():
    yield
    rows = sorted(MAX_ERRORS.items())
    print("\n\nlargest relative error vs spikingjelly 2.0.0 (fp32; outputs, grads, running stats)")
    for name, err in rows:
        print(f"  {name:34s} {err:.3e}")
    path = os.environ.get("SNNORM_LAYER_ERRORS")
    if path:
        with open(path, "w") as f:
            json.dump(dict(rows), f, indent=1)


def check(name: str, what: str, ours: torch.Tensor, theirs: torch.Tensor) -> None:
    assert ours.shape == theirs.shape, f"{name} {what}: shape {tuple(ours.shape)} != {tuple(theirs.shape)}"
    assert ours.dtype == theirs.dtype, f"{name} {what}: dtype {ours.dtype} != {theirs.dtype}"
    err = rel_err(ours, theirs)
    MAX_ERRORS[name] = max(MAX_ERRORS[name], err)
    assert err <= LAYER_VS_SJ_REL, f"{name} {what}: relative error {err:.3e} > {LAYER_VS_SJ_REL}"


def run(module: nn.Module, inputs, grads, reset_between: bool, seed: int):
    """Feed ``inputs`` (one call each), backprop Σ y·g once; return outputs and input grads."""
    torch.manual_seed(seed)  # Dropout draws its mask from the global generator
    xs = [x.clone().requires_grad_() for x in inputs]
    ys = []
    for x in xs:
        if reset_between:
            functional.reset_net(module) if _is_snnorm(module) else sj_functional.reset_net(module)
        ys.append(module(x))
    loss = sum((y * g).sum() for y, g in zip(ys, grads))
    if loss.requires_grad:
        loss.backward()
    return [y.detach() for y in ys], [x.grad for x in xs]


def _is_snnorm(module: nn.Module) -> bool:
    return type(module).__module__.startswith("snnorm")


def compare(name, ours, theirs, make_input, calls, reset_between, phases=("train", "eval")):
    """Copy theirs → ours, run both in each phase, compare everything, copy ours → theirs."""
    missing = ours.load_state_dict(theirs.state_dict(), strict=True)
    assert not missing.missing_keys and not missing.unexpected_keys
    for phase in phases:
        ours.train(phase == "train")
        theirs.train(phase == "train")
        functional.reset_net(ours)
        sj_functional.reset_net(theirs)
        inputs = [make_input() for _ in range(calls)]
        # the output shapes are known only after a call: probe a copy of spikingjelly's layer
        grads = [torch.randn(s) for s in _output_shapes(theirs, inputs, reset_between)]
        y_ours, gx_ours = run(ours, inputs, grads, reset_between, seed=1)
        y_theirs, gx_theirs = run(theirs, inputs, grads, reset_between, seed=1)
        for i, (a, b) in enumerate(zip(y_ours, y_theirs)):
            check(name, f"{phase} output {i}", a, b)
        for i, (a, b) in enumerate(zip(gx_ours, gx_theirs)):
            if b is None:
                assert a is None
            else:
                check(name, f"{phase} grad input {i}", a, b)
        p_ours, p_theirs = dict(ours.named_parameters()), dict(theirs.named_parameters())
        assert p_ours.keys() == p_theirs.keys()
        for key, p in p_theirs.items():
            if p.grad is None:
                assert p_ours[key].grad is None, f"{name}: {key} has a grad only in snnorm"
            else:
                check(name, f"{phase} grad {key}", p_ours[key].grad, p.grad)
        s_ours, s_theirs = ours.state_dict(), theirs.state_dict()
        assert s_ours.keys() == s_theirs.keys()
        for key, value in s_theirs.items():
            if value.is_floating_point():
                check(name, f"{phase} state {key}", s_ours[key], value)
            else:
                assert torch.equal(s_ours[key], value), f"{name} {phase} {key}: {s_ours[key]} != {value}"
        ours.zero_grad(set_to_none=True)
        theirs.zero_grad(set_to_none=True)
    # and back: spikingjelly loads snnorm's state_dict
    theirs.load_state_dict(ours.state_dict(), strict=True)
    for key, value in ours.state_dict().items():
        assert torch.equal(theirs.state_dict()[key], value)


def _output_shapes(module, inputs, reset_between):
    clone = copy.deepcopy(module)
    shapes = []
    with torch.no_grad():
        torch.manual_seed(1)
        for x in inputs:
            if reset_between:
                sj_functional.reset_net(clone)
            shapes.append(clone(x.clone()).shape)
    return shapes


def randn(*shape):
    return lambda: torch.randn(*shape) * 1.7 + 0.4


def spikes(*shape):
    return lambda: (torch.rand(*shape) < 0.3).float()


T, N, C = 4, 3, 5
SPATIAL = {1: (7,), 2: (5, 6), 3: (3, 4, 5)}


def bn_shape(dim: int, step_mode: str, flat_1d: bool = False):
    spatial = () if (dim == 1 and flat_1d) else SPATIAL[dim]
    return ((T,) if step_mode == "m" else ()) + (N, C) + spatial


def setup_function(_):
    torch.manual_seed(1234)


def test_compare_detects_a_difference():
    """The harness can fail: eps is not in the state_dict, so a different eps must be caught."""
    ours, theirs = layer.BatchNorm2d(C, eps=1e-2), sj_layer.BatchNorm2d(C, eps=1e-5)
    with pytest.raises(AssertionError, match="relative error"):
        compare("(harness self-test)", ours, theirs, randn(*bn_shape(2, "s")), 2, reset_between=False)
    MAX_ERRORS.pop("(harness self-test)", None)


# -- BatchNorm with step modes ----------------------------------------------------


@pytest.mark.parametrize("dim", [1, 2, 3])
@pytest.mark.parametrize("step_mode", ["s", "m"])
@pytest.mark.parametrize("affine", [True, False])
def test_batch_norm(dim, step_mode, affine):
    ours = getattr(layer, f"BatchNorm{dim}d")(C, affine=affine, step_mode=step_mode)
    theirs = getattr(sj_layer, f"BatchNorm{dim}d")(C, affine=affine, step_mode=step_mode)
    if affine:  # non-trivial affine parameters, copied by load_state_dict
        nn.init.uniform_(theirs.weight, 0.5, 1.5)
        nn.init.uniform_(theirs.bias, -0.5, 0.5)
    # 's': T single-step calls (one per timestep); 'm': two sequences
    calls = T if step_mode == "s" else 2
    compare(f"BatchNorm{dim}d", ours, theirs, randn(*bn_shape(dim, step_mode)), calls, reset_between=False)


@pytest.mark.parametrize("step_mode", ["s", "m"])
def test_batch_norm_1d_without_length(step_mode):
    ours, theirs = layer.BatchNorm1d(C, step_mode=step_mode), sj_layer.BatchNorm1d(C, step_mode=step_mode)
    compare("BatchNorm1d", ours, theirs, randn(*bn_shape(1, step_mode, flat_1d=True)), 3, reset_between=False)


@pytest.mark.parametrize("kwargs", [dict(momentum=None), dict(track_running_stats=False), dict(eps=1e-3, momentum=0.3)])
def test_batch_norm_options(kwargs):
    ours, theirs = layer.BatchNorm2d(C, step_mode="m", **kwargs), sj_layer.BatchNorm2d(C, step_mode="m", **kwargs)
    compare("BatchNorm2d", ours, theirs, randn(*bn_shape(2, "m")), 3, reset_between=False)


# -- tdBN -----------------------------------------------------------------------


@pytest.mark.parametrize("dim", [1, 2, 3])
@pytest.mark.parametrize("alpha, v_th", [(1.0, 0.5), (2**-0.5, 1.0)])
def test_threshold_dependent_batch_norm(dim, alpha, v_th):
    ours = getattr(layer, f"ThresholdDependentBatchNorm{dim}d")(alpha, v_th, C)
    theirs = getattr(sj_layer, f"ThresholdDependentBatchNorm{dim}d")(alpha, v_th, C)
    assert torch.equal(ours.weight, theirs.weight)  # γ₀ = α·V_th in both
    nn.init.uniform_(theirs.bias, -0.5, 0.5)
    compare(f"ThresholdDependentBatchNorm{dim}d", ours, theirs, randn(*bn_shape(dim, "m")), 2, reset_between=False)


def test_threshold_dependent_batch_norm_momentum_none():
    ours = layer.ThresholdDependentBatchNorm2d(1.0, 0.5, C, momentum=None)
    theirs = sj_layer.ThresholdDependentBatchNorm2d(1.0, 0.5, C, momentum=None)
    compare("ThresholdDependentBatchNorm2d", ours, theirs, randn(*bn_shape(2, "m")), 3, reset_between=False)


# -- TEBN -----------------------------------------------------------------------


@pytest.mark.parametrize("dim", [1, 2, 3])
@pytest.mark.parametrize("affine", [True, False])
def test_temporal_effective_batch_norm(dim, affine):
    ours = getattr(layer, f"TemporalEffectiveBatchNorm{dim}d")(T, C, affine=affine)
    theirs = getattr(sj_layer, f"TemporalEffectiveBatchNorm{dim}d")(T, C, affine=affine)
    nn.init.uniform_(theirs.scale, 0.5, 1.5)
    if affine:
        nn.init.uniform_(theirs.weight, 0.5, 1.5)
        nn.init.uniform_(theirs.bias, -0.5, 0.5)
    compare(f"TemporalEffectiveBatchNorm{dim}d", ours, theirs, randn(*bn_shape(dim, "m")), 2, reset_between=False)


def test_temporal_effective_batch_norm_1d_without_length_and_momentum_none():
    ours = layer.TemporalEffectiveBatchNorm1d(T, C, momentum=None)
    theirs = sj_layer.TemporalEffectiveBatchNorm1d(T, C, momentum=None)
    nn.init.uniform_(theirs.scale, 0.5, 1.5)
    compare("TemporalEffectiveBatchNorm1d", ours, theirs, randn(*bn_shape(1, "m", flat_1d=True)), 3, reset_between=False)


# -- BNTT -----------------------------------------------------------------------


@pytest.mark.parametrize("dim", [1, 2, 3])
@pytest.mark.parametrize("step_mode", ["s", "m"])
@pytest.mark.parametrize("affine", [True, False])
def test_batch_norm_through_time(dim, step_mode, affine):
    ours = getattr(layer, f"BatchNormThroughTime{dim}d")(T, C, affine=affine, step_mode=step_mode)
    theirs = getattr(sj_layer, f"BatchNormThroughTime{dim}d")(T, C, affine=affine, step_mode=step_mode)
    if affine:
        for bn in theirs.bn_list:
            nn.init.uniform_(bn.weight, 0.5, 1.5)
    if step_mode == "s":  # one sequence of T single-step calls
        compare(f"BatchNormThroughTime{dim}d", ours, theirs, randn(*bn_shape(dim, "s")), T, reset_between=False)
        assert ours.t == theirs.t == T - 1
    else:  # two sequences, reset in between
        compare(f"BatchNormThroughTime{dim}d", ours, theirs, randn(*bn_shape(dim, "m")), 2, reset_between=True)


def test_batch_norm_through_time_momentum_none():
    ours = layer.BatchNormThroughTime2d(T, C, momentum=None, step_mode="m")
    theirs = sj_layer.BatchNormThroughTime2d(T, C, momentum=None, step_mode="m")
    compare("BatchNormThroughTime2d", ours, theirs, randn(*bn_shape(2, "m")), 3, reset_between=True)


# -- GroupNorm, NeuNorm -----------------------------------------------------------


@pytest.mark.parametrize("step_mode", ["s", "m"])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("dim", [1, 2])
def test_group_norm(step_mode, affine, dim):
    ours = layer.GroupNorm(3, 6, affine=affine, step_mode=step_mode)
    theirs = sj_layer.GroupNorm(3, 6, affine=affine, step_mode=step_mode)
    if affine:
        nn.init.uniform_(theirs.weight, 0.5, 1.5)
        nn.init.uniform_(theirs.bias, -0.5, 0.5)
    shape = ((T,) if step_mode == "m" else ()) + (N, 6) + SPATIAL[dim]
    compare("GroupNorm", ours, theirs, randn(*shape), 2, reset_between=False)


@pytest.mark.parametrize("step_mode", ["s", "m"])
@pytest.mark.parametrize("shared", [False, True])
def test_neunorm(step_mode, shared):
    H, W = 4, 5
    ours = layer.NeuNorm(C, H, W, k=0.8, shared_across_channels=shared, step_mode=step_mode)
    theirs = sj_layer.NeuNorm(C, H, W, k=0.8, shared_across_channels=shared, step_mode=step_mode)
    assert ours.k1 == theirs.k1
    shape = ((T,) if step_mode == "m" else ()) + (N, C, H, W)
    # 's': T steps of one sequence (the state carries the gradient across steps); 'm': two sequences
    calls, reset_between = (T, False) if step_mode == "s" else (2, True)
    compare("NeuNorm", ours, theirs, spikes(*shape), calls, reset_between=reset_between)
    assert torch.equal(ours.x, theirs.x)


# -- weight standardization ---------------------------------------------------------


@pytest.mark.parametrize("step_mode", ["s", "m"])
@pytest.mark.parametrize("gain", [True, False])
def test_ws_conv2d(step_mode, gain):
    kwargs = dict(stride=1, padding=1, groups=1, bias=True, step_mode=step_mode, gain=gain, eps=1e-4)
    ours, theirs = layer.WSConv2d(C, 4, 3, **kwargs), sj_layer.WSConv2d(C, 4, 3, **kwargs)
    if gain:
        nn.init.uniform_(theirs.gain, 0.5, 1.5)
    compare("WSConv2d", ours, theirs, randn(*bn_shape(2, step_mode)), 2, reset_between=False)


def test_ws_conv2d_groups():
    ours, theirs = layer.WSConv2d(6, 4, (3, 2), groups=2, bias=False), sj_layer.WSConv2d(6, 4, (3, 2), groups=2, bias=False)
    compare("WSConv2d", ours, theirs, randn(N, 6, 5, 6), 2, reset_between=False)


@pytest.mark.parametrize("step_mode", ["s", "m"])
@pytest.mark.parametrize("gain", [True, False])
def test_ws_linear(step_mode, gain):
    ours, theirs = layer.WSLinear(C, 7, step_mode=step_mode, gain=gain), sj_layer.WSLinear(C, 7, step_mode=step_mode, gain=gain)
    if gain:
        nn.init.uniform_(theirs.gain, 0.5, 1.5)
    shape = ((T,) if step_mode == "m" else ()) + (N, C)
    compare("WSLinear", ours, theirs, randn(*shape), 2, reset_between=False)


# -- stateless wrappers ---------------------------------------------------------------

WRAPPERS = [
    ("Conv1d", (C, 4, 3), dict(padding=1), 1),
    ("Conv2d", (C, 4, 3), dict(stride=2, padding=1, bias=False), 2),
    ("Conv3d", (C, 4, 2), dict(), 3),
    ("MaxPool1d", (2,), dict(), 1),
    ("MaxPool2d", (2,), dict(stride=1), 2),
    ("MaxPool3d", (2,), dict(), 3),
    ("AvgPool1d", (3,), dict(padding=1), 1),
    ("AvgPool2d", (2,), dict(ceil_mode=True), 2),
    ("AvgPool3d", (2,), dict(), 3),
    ("AdaptiveAvgPool1d", (3,), dict(), 1),
    ("AdaptiveAvgPool2d", ((2, 3),), dict(), 2),
    ("AdaptiveAvgPool3d", (1,), dict(), 3),
    ("Flatten", (), dict(), 2),
]


@pytest.mark.parametrize("name, args, kwargs, dim", WRAPPERS, ids=[w[0] for w in WRAPPERS])
@pytest.mark.parametrize("step_mode", ["s", "m"])
def test_wrapper(name, args, kwargs, dim, step_mode):
    ours = getattr(layer, name)(*args, **kwargs, step_mode=step_mode)
    theirs = getattr(sj_layer, name)(*args, **kwargs, step_mode=step_mode)
    assert isinstance(ours, type(theirs).__mro__[1])  # subclasses the same torch layer
    compare(name, ours, theirs, randn(*bn_shape(dim, step_mode)), 2, reset_between=False)


@pytest.mark.parametrize("step_mode", ["s", "m"])
def test_linear(step_mode):
    ours, theirs = layer.Linear(C, 7, step_mode=step_mode), sj_layer.Linear(C, 7, step_mode=step_mode)
    shape = ((T,) if step_mode == "m" else ()) + (N, C)
    compare("Linear", ours, theirs, randn(*shape), 2, reset_between=False)


@pytest.mark.parametrize("step_mode", ["s", "m"])
@pytest.mark.parametrize("cls", ["Dropout", "Dropout2d"])
def test_dropout(step_mode, cls):
    ours, theirs = getattr(layer, cls)(0.4, step_mode=step_mode), getattr(sj_layer, cls)(0.4, step_mode=step_mode)
    # same seed, same mask: the mask is drawn once per sequence ('s': T calls of one sequence)
    calls = T if step_mode == "s" else 1
    compare(cls, ours, theirs, randn(*bn_shape(2, step_mode)), calls, reset_between=False)


# -- containers -------------------------------------------------------------------------


def test_seq_to_ann_container():
    ours = layer.SeqToANNContainer(layer.Conv2d(C, 4, 3, padding=1), layer.BatchNorm2d(4), layer.MaxPool2d(2))
    theirs = sj_layer.SeqToANNContainer(nn.Conv2d(C, 4, 3, padding=1), nn.BatchNorm2d(4), nn.MaxPool2d(2))
    compare("SeqToANNContainer", ours, theirs, randn(*bn_shape(2, "m")), 2, reset_between=False)


def test_multi_step_container():
    ours = layer.MultiStepContainer(layer.Conv2d(C, C, 1), layer.NeuNorm(C, 5, 6))
    theirs = sj_layer.MultiStepContainer(nn.Conv2d(C, C, 1), sj_layer.NeuNorm(C, 5, 6))
    compare("MultiStepContainer", ours, theirs, spikes(*bn_shape(2, "m")), 2, reset_between=True)
