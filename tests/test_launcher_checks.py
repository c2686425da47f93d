"""Every Triton launcher checks its per-channel arguments (θ, γ, β, p, running and batch
statistics: ``[C]`` or ``[T, C]`` as the op expects, on the input's device, floating point)
before it allocates or writes anything, and names the argument, the expected and the
received shape in a ValueError (snnorm/kernels/_common.check_channel_args)."""

from __future__ import annotations

import re

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

pytest.importorskip("triton")

from snnorm.kernels import bn_pipeline as bnp  # noqa: E402
from snnorm.kernels import lif as lif_kernels  # noqa: E402
from snnorm.kernels import mpbn_lif_train as train_kernels  # noqa: E402
from snnorm.kernels import norm_lif as norm_lif_kernels  # noqa: E402
from snnorm.kernels._common import check_channel_args  # noqa: E402
from snnorm.params import BNKernelParameters, LIFKernelParameters  # noqa: E402

T, N, C, H, W = 3, 2, 4, 3, 2
LIF_K = LIFKernelParameters(2.0, True, 0.0, False, False, "sigmoid", 4.0)
BN_K = BNKernelParameters(1e-5, 0.1, 0)


def _x():
    return torch.randn(T, N, C, H, W)


def _shape_error(name, expected, got):
    """The message names the argument, the expected and the received shape."""
    return re.escape(f"{name} must have shape {list(expected)}") + ".*" + re.escape(f"got {list(got)}")


# --- the helper ------------------------------------------------------------------------------


def test_helper_names_argument_expected_and_received_shape():
    with pytest.raises(ValueError, match=_shape_error("weight", (C,), (C + 1,))):
        check_channel_args("op", torch.device("cpu"), weight=(torch.ones(C + 1), (C,)))


def test_helper_rejects_a_missing_required_argument_another_device_and_an_integer_dtype():
    cpu = torch.device("cpu")
    with pytest.raises(ValueError, match=r"op: th is required.*\[4\]"):
        check_channel_args("op", cpu, th=(None, (C,), True))
    with pytest.raises(ValueError, match=r"op: th is on meta.*cpu"):
        check_channel_args("op", cpu, th=(torch.ones(C, device="meta"), (C,)))
    with pytest.raises(ValueError, match=r"op: th must be floating point.*torch.int64"):
        check_channel_args("op", cpu, th=(torch.ones(C, dtype=torch.long), (C,)))
    check_channel_args("op", cpu, th=(torch.ones(C), (C,), True), weight=(None, (C,)))  # None: absent, fine


# --- LIF ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", ["th", "mu", "r", "beta", "thf", "sgn"])
def test_lif_launchers_check_per_channel_arguments(bad):
    x = _x()
    per_channel = {k: torch.ones(C) for k in ("th", "mu", "r", "beta", "thf", "sgn")}
    per_channel[bad] = torch.ones(C + 1)
    args = [per_channel[k] for k in ("th", "mu", "r", "beta", "thf", "sgn")]
    with pytest.raises(ValueError, match=_shape_error(bad, (C,), (C + 1,))):
        lif_kernels.launch_lif_fwd(x, torch.zeros(x.shape[1:]), *args, torch.float32, LIF_K, 2, True, True)
    with pytest.raises(ValueError, match=_shape_error(bad, (C,), (C + 1,))):
        lif_kernels.launch_lif_bwd(x, None, x, torch.float32, *args, LIF_K, 2, True, True)


# --- MPBN-LIF ------------------------------------------------------------------------------------


def _mpbn_fwd(x, **over):
    args = dict(weight=torch.ones(C), bias=torch.zeros(C), running_mean=torch.zeros(C), running_var=torch.ones(C),
                th=torch.ones(C), mu=None, s2=None, mom=None)
    args.update(over)
    return train_kernels.launch_batch_stats_fwd(
        x, torch.zeros(x.shape[1:]), args["weight"], args["bias"], args["running_mean"], args["running_var"],
        args["th"], args["mu"], args["s2"], args["mom"], torch.float32, lif=LIF_K, bn=BN_K, stats=0,
        carry_norm=True, save=True,
    )


@pytest.mark.parametrize("bad", ["weight", "bias", "running_mean", "running_var", "th"])
def test_mpbn_forward_checks_before_the_running_statistics_are_written(bad):
    x = _x()
    rm, rv = torch.full((C,), 0.5), torch.full((C,), 2.0)
    over = dict(running_mean=rm, running_var=rv)
    over[bad] = torch.ones(T, C)  # a wrong running statistic replaces its buffer: the other must stay as it was
    with pytest.raises(ValueError, match=_shape_error(bad, (C,), (T, C))):
        _mpbn_fwd(x, **over)
    assert torch.equal(rm, torch.full((C,), 0.5)) and torch.equal(rv, torch.full((C,), 2.0))


def test_mpbn_forward_checks_the_adaptation_state():
    x = _x()
    with pytest.raises(ValueError, match=_shape_error("mu", (C,), (C + 1,))):
        train_kernels.launch_batch_stats_fwd(
            x, torch.zeros(x.shape[1:]), None, None, None, None, torch.ones(C), torch.zeros(C + 1), torch.ones(C),
            torch.full((T,), 0.1), torch.float32, lif=LIF_K, bn=BN_K, stats=2, carry_norm=True, save=False,
        )
    with pytest.raises(ValueError, match=_shape_error("mom", (T,), (T + 1,))):
        train_kernels.launch_batch_stats_fwd(
            x, torch.zeros(x.shape[1:]), None, None, None, None, torch.ones(C), torch.zeros(C), torch.ones(C),
            torch.full((T + 1,), 0.1), torch.float32, lif=LIF_K, bn=BN_K, stats=2, carry_norm=True, save=False,
        )


@pytest.mark.parametrize("bad, expected", [("mean", (T, C)), ("rstd", (T, C)), ("weight", (C,)), ("th", (C,))])
def test_mpbn_backward_checks_saved_statistics_and_parameters(bad, expected):
    h = _x()
    args = dict(mean=torch.zeros(T, C), rstd=torch.ones(T, C), weight=torch.ones(C), bias=torch.zeros(C),
                th=torch.ones(C))
    args[bad] = torch.ones(C + 1)
    with pytest.raises(ValueError, match=_shape_error(bad, expected, (C + 1,))):
        train_kernels.launch_train_bwd(
            h, None, h, torch.float32, args["mean"], args["rstd"], args["weight"], args["bias"], args["th"],
            lif=LIF_K, carry_norm=True,
        )


# --- the statistics pipeline ---------------------------------------------------------------------


@pytest.mark.parametrize("rule", ["batch_norm", "bntt", "tebn", "tab"])
def test_pipeline_stats_checks_running_statistics_before_writing(rule):
    r = bnp.rule(rule)
    x = _x()
    shape = bnp.stats_shape(r, T, C)
    rm = torch.zeros(shape)
    rv_bad = torch.ones(C + 1)
    momentum = [0.1] * (T if r.per_step else 1)
    with pytest.raises(ValueError, match=_shape_error("running_var", shape, (C + 1,))):
        bnp.launch_stats(r, x, rm, rv_bad, momentum)
    assert torch.equal(rm, torch.zeros(shape))  # the valid running mean was not updated


@pytest.mark.parametrize("rule", ["batch_norm", "bntt", "tebn", "tab"])
@pytest.mark.parametrize("bad", ["weight", "bias", "mean", "var", "p"])
def test_pipeline_apply_and_backward_check_per_channel_arguments(rule, bad):
    r = bnp.rule(rule)
    x = _x()
    shape = bnp.stats_shape(r, T, C)
    args = dict(weight=torch.ones(shape), bias=torch.zeros(shape), mean=torch.zeros(shape), var=torch.ones(shape),
                p=torch.ones(T) if r.scale != bnp.NONE else None)
    if bad == "p" and args["p"] is None:
        return  # a rule without a scale takes no p
    expected = (T,) if bad == "p" else shape
    args[bad] = torch.ones(T + 1, C + 1)
    pattern = _shape_error(bad, expected, (T + 1, C + 1))
    with pytest.raises(ValueError, match=pattern):
        bnp.launch_apply(r, x, args["weight"], args["bias"], args["mean"], args["var"], args["p"], 1e-5)
    with pytest.raises(ValueError, match=pattern):
        bnp.launch_backward(r, torch.ones_like(x), x, args["weight"], args["bias"], args["mean"], args["var"],
                            args["p"], 1e-5, True, True, True)


def test_pipeline_requires_p_for_a_scaled_rule_and_grad_y_of_x_shape():
    r = bnp.rule("tebn")
    x = _x()
    with pytest.raises(ValueError, match=r"p is required"):
        bnp.launch_apply(r, x, None, None, torch.zeros(C), torch.ones(C), None, 1e-5)
    with pytest.raises(ValueError, match=_shape_error("grad_y", x.shape, (T, N, C))):
        bnp.launch_backward(r, torch.ones(T, N, C), x, None, None, torch.zeros(C), torch.ones(C), torch.ones(T),
                            1e-5, True, True, True)


# --- fused norm → LIF ----------------------------------------------------------------------------


@pytest.mark.parametrize("rule", ["batch_norm", "tab"])
@pytest.mark.parametrize("bad", ["weight", "mean", "v0"])
def test_norm_lif_launchers_check_per_channel_arguments_and_the_membrane(rule, bad):
    r = bnp.rule(rule)
    x = _x()
    shape = bnp.stats_shape(r, T, C)
    args = dict(v0=torch.zeros(x.shape[1:]), weight=torch.ones(shape), bias=torch.zeros(shape),
                p=torch.ones(T) if r.scale != bnp.NONE else None, mean=torch.zeros(shape), var=torch.ones(shape))
    args[bad] = torch.ones(C + 1)
    expected = tuple(x.shape[1:]) if bad == "v0" else shape
    pattern = _shape_error(bad, expected, (C + 1,))
    with pytest.raises(ValueError, match=pattern):
        norm_lif_kernels.launch_norm_lif_forward(
            r, x, args["v0"], args["weight"], args["bias"], args["p"], args["mean"], args["var"], 1e-5, 1.0, 0.0,
            LIF_K, True,
        )
    with pytest.raises(ValueError, match=pattern):
        norm_lif_kernels.launch_norm_lif_backward(
            r, torch.ones_like(x), None, x, args["v0"], torch.empty(0), args["weight"], args["bias"], args["p"],
            args["mean"], args["var"], 1e-5, True, 1.0, 0.0, LIF_K, True, True,
        )


# --- no double copy ----------------------------------------------------------------------------


class _CountCopies(TorchDispatchMode):
    """Counts the copies a call makes of full-size tensors (``contiguous()`` of a strided view is
    ``aten.clone``; a ``copy_`` into a new buffer counts too)."""

    def __init__(self, numel):
        super().__init__()
        self.numel, self.copies = numel, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in (torch.ops.aten.clone.default, torch.ops.aten.copy_.default) and args[0].numel() == self.numel:
            self.copies += 1
        return out


@pytest.mark.parametrize("rule", ["batch_norm", "tab"])
def test_pipeline_backward_copies_a_strided_input_and_gradient_once_each(rule):
    r = bnp.rule(rule)
    x = torch.randn(T, N, C, W, H).transpose(3, 4)  # [T, N, C, H, W] whose H, W cannot merge: a copy
    grad_y = torch.randn(T, N, C, W, H).transpose(3, 4)
    shape = bnp.stats_shape(r, T, C)
    p = torch.ones(T) if r.scale != bnp.NONE else None
    mean, var = torch.zeros(shape), torch.ones(shape)
    with _CountCopies(x.numel()) as counter:
        dx = bnp.launch_backward(r, grad_y, x, torch.ones(shape), torch.zeros(shape), mean, var, p, 1e-5, True, True,
                                 True)[0]
    assert dx.shape == x.shape
    assert counter.copies == 2, f"{counter.copies} full-size copies of x and ∂y (one each expected)"
