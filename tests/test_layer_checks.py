"""Bad input to snnorm.layer: clear ValueError/TypeError, and a rejected call changes nothing.

Also the peer defects snnorm must not copy (DESIGN.md §3): TEBN / BNTT accepting a
sequence whose T differs from theirs (silent broadcast or IndexError), BNTT running past
its T steps (IndexError), bare ``assert`` for user errors. Where spikingjelly is
installed, each defect is first shown on spikingjelly, then the fix on snnorm.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from snnorm import functional, layer

from helpers import assert_unchanged, rejects, snapshot  # noqa: F401

T, N, C = 4, 3, 5


def _sj_layer():
    return pytest.importorskip(
        "spikingjelly.activation_based.layer", reason="spikingjelly 2.0.0 shows the peer defect being fixed"
    )


def trained(module, x):
    """One training call so running statistics and counters are non-trivial."""
    module.train()
    module(x)
    functional.reset_net(module)
    return module


# -- wrong number of dims -----------------------------------------------------------

BN_LIKE = [
    (lambda: layer.BatchNorm1d(C), (N, C, 7), "s"),
    (lambda: layer.BatchNorm1d(C, step_mode="m"), (T, N, C, 7), "m"),
    (lambda: layer.BatchNorm2d(C), (N, C, 5, 6), "s"),
    (lambda: layer.BatchNorm2d(C, step_mode="m"), (T, N, C, 5, 6), "m"),
    (lambda: layer.BatchNorm3d(C), (N, C, 3, 4, 5), "s"),
    (lambda: layer.BatchNorm3d(C, step_mode="m"), (T, N, C, 3, 4, 5), "m"),
    (lambda: layer.ThresholdDependentBatchNorm1d(1.0, 0.5, C), (T, N, C), "m"),
    (lambda: layer.ThresholdDependentBatchNorm2d(1.0, 0.5, C), (T, N, C, 5, 6), "m"),
    (lambda: layer.ThresholdDependentBatchNorm3d(1.0, 0.5, C), (T, N, C, 3, 4, 5), "m"),
    (lambda: layer.TemporalEffectiveBatchNorm1d(T, C), (T, N, C, 7), "m"),
    (lambda: layer.TemporalEffectiveBatchNorm2d(T, C), (T, N, C, 5, 6), "m"),
    (lambda: layer.TemporalEffectiveBatchNorm3d(T, C), (T, N, C, 3, 4, 5), "m"),
    (lambda: layer.BatchNormThroughTime1d(T, C), (N, C), "s"),
    (lambda: layer.BatchNormThroughTime2d(T, C), (N, C, 5, 6), "s"),
    (lambda: layer.BatchNormThroughTime2d(T, C, step_mode="m"), (T, N, C, 5, 6), "m"),
    (lambda: layer.BatchNormThroughTime3d(T, C, step_mode="m"), (T, N, C, 3, 4, 5), "m"),
    (lambda: layer.BatchNormTT1d(C, T), (N, C, 7), "s"),
    (lambda: layer.BatchNormTT2d(C, T, step_mode="m"), (T, N, C, 5, 6), "m"),
    (lambda: layer.GroupNorm(1, C, step_mode="m"), (T, N, C, 5, 6), "m"),
    (lambda: layer.NeuNorm(C, 5, 6), (N, C, 5, 6), "s"),
    (lambda: layer.NeuNorm(C, 5, 6, step_mode="m"), (T, N, C, 5, 6), "m"),
]
BN_IDS = [f"{f().__class__.__name__}-{mode}-{len(shape)}d" for f, shape, mode in BN_LIKE]


@pytest.mark.parametrize("make, shape, step_mode", BN_LIKE, ids=BN_IDS)
def test_wrong_ndim(make, shape, step_mode):
    module = trained(make(), torch.randn(shape))
    bad_inputs = [torch.randn(shape[:1])]  # too few dims
    if not isinstance(module, layer.GroupNorm):  # GroupNorm takes any spatial rank
        bad_inputs.append(torch.randn(*shape, 2, 2))  # too many dims for every layout
    for bad in bad_inputs:
        msg = rejects(module, bad, ValueError, f"step_mode={step_mode!r}", str(tuple(bad.shape)))
        assert "expected x with shape [" in msg  # spikingjelly's wording, matched by user code


@pytest.mark.parametrize("make, shape, step_mode", BN_LIKE, ids=BN_IDS)
def test_wrong_channels(make, shape, step_mode):
    module = trained(make(), torch.randn(shape))
    channel_dim = 1 + (step_mode == "m")
    bad_shape = list(shape)
    bad_shape[channel_dim] = C + 1
    rejects(module, torch.randn(bad_shape), ValueError, f"expects {C} channels", f"with {C + 1}")


@pytest.mark.parametrize("make, shape, step_mode", BN_LIKE, ids=BN_IDS)
@pytest.mark.parametrize("bad", ["int", "bool", "list"])
def test_non_floating_input(make, shape, step_mode, bad):
    module = trained(make(), torch.randn(shape))
    if bad == "list":
        rejects(module, torch.randn(shape).tolist(), TypeError, "expects a torch.Tensor", "got list")
    else:
        dtype = torch.int64 if bad == "int" else torch.bool
        rejects(module, torch.zeros(shape, dtype=dtype), TypeError, "floating-point", str(dtype))


@pytest.mark.parametrize("make, shape, step_mode", BN_LIKE[:4] + BN_LIKE[9:10], ids=BN_IDS[:4] + BN_IDS[9:10])
def test_device_mismatch(make, shape, step_mode):
    module = make()
    rejects(module, torch.randn(shape, device="meta"), ValueError, "input is on meta", "cpu")


def test_single_value_per_channel_rejected_before_counting():
    # torch counts the batch in num_batches_tracked and then raises: a peer defect
    plain = nn.BatchNorm2d(C)
    with pytest.raises(ValueError):
        plain(torch.randn(1, C, 1, 1))
    assert plain.num_batches_tracked.item() == 1
    for module, x in [
        (layer.BatchNorm2d(C), torch.randn(1, C, 1, 1)),
        (layer.BatchNorm1d(C, step_mode="m"), torch.randn(1, 1, C)),
        (layer.ThresholdDependentBatchNorm2d(1.0, 0.5, C), torch.randn(1, 1, C, 1, 1)),
        (layer.TemporalEffectiveBatchNorm1d(1, C), torch.randn(1, 1, C)),
        (layer.BatchNormThroughTime1d(T, C), torch.randn(1, C)),
        (layer.BatchNormThroughTime1d(T, C, step_mode="m"), torch.randn(T, 1, C)),
    ]:
        msg = rejects(module, x, ValueError, "more than one value per channel")
        assert msg.startswith(type(module).__name__)
        assert all(b.item() == 0 for k, b in module.state_dict().items() if k.endswith("num_batches_tracked"))


# -- T of the sequence ------------------------------------------------------------------


@pytest.mark.parametrize("dim", [1, 2, 3])
@pytest.mark.parametrize("wrong_T", [1, T - 1, T + 2])
def test_tebn_rejects_wrong_T(dim, wrong_T):
    spatial = {1: (7,), 2: (5, 6), 3: (3, 4, 5)}[dim]
    module = getattr(layer, f"TemporalEffectiveBatchNorm{dim}d")(T, C)
    trained(module, torch.randn(T, N, C, *spatial))
    x = torch.randn(wrong_T, N, C, *spatial)
    rejects(module, x, ValueError, f"T={T}", f"(T={wrong_T})", str(tuple(x.shape)))


def test_tebn_wrong_T_peer_defect():
    sj = _sj_layer()
    theirs = sj.TemporalEffectiveBatchNorm2d(T, C)
    y = theirs(torch.randn(1, N, C, 5, 6))  # T=1: silently broadcast against p[0..T-1]
    assert y.shape[0] == T  # the output even has T timesteps for a one-step input
    with pytest.raises(RuntimeError):  # another T: a broadcasting error, not a message about T
        theirs(torch.randn(T - 1, N, C, 5, 6))
    with pytest.raises(ValueError, match=f"T={T}"):
        layer.TemporalEffectiveBatchNorm2d(T, C)(torch.randn(1, N, C, 5, 6))


@pytest.mark.parametrize("wrong_T", [1, T - 1, T + 1])
def test_bntt_multi_step_rejects_wrong_T(wrong_T):
    module = layer.BatchNormThroughTime2d(T, C, step_mode="m")
    trained(module, torch.randn(T, N, C, 5, 6))
    x = torch.randn(wrong_T, N, C, 5, 6)
    rejects(module, x, ValueError, f"T={T}", f"(T={wrong_T})")
    assert module.t == -1


def test_bntt_wrong_T_peer_defect():
    sj = _sj_layer()
    theirs = sj.BatchNormThroughTime2d(T, C, step_mode="m")
    theirs(torch.randn(T - 1, N, C, 5, 6))  # silently accepted: a sequence that is too short
    sj_reset = pytest.importorskip("spikingjelly.activation_based.functional").reset_net
    sj_reset(theirs)
    with pytest.raises(IndexError):  # too long: an IndexError from inside the ModuleList
        theirs(torch.randn(T + 1, N, C, 5, 6))


@pytest.mark.parametrize("step_mode", ["s", "m"])
def test_bntt_over_run(step_mode):
    module = layer.BatchNormThroughTime2d(T, C, step_mode=step_mode)
    if step_mode == "s":
        for _ in range(T):
            module(torch.randn(N, C, 5, 6))
        x = torch.randn(N, C, 5, 6)
        rejects(module, x, ValueError, f"T={T}", "already processed all", "reset()")
    else:
        module(torch.randn(T, N, C, 5, 6))
        rejects(module, torch.randn(T, N, C, 5, 6), ValueError, "whole sequence", "reset()")
    assert module.t == T - 1
    functional.reset_net(module)  # after a reset the module runs again
    module(torch.randn(*(((T,) if step_mode == "m" else ()) + (N, C, 5, 6))))
    assert module.t == (T - 1 if step_mode == "m" else 0)


def test_bntt_multi_step_after_partial_single_steps():
    module = layer.BatchNormThroughTime2d(T, C)
    module(torch.randn(N, C, 5, 6))
    module.step_mode = "m"
    msg = rejects(module, torch.randn(T, N, C, 5, 6), ValueError, "1 timestep(s) have been processed")
    assert "reset()" in msg


def test_bntt_over_run_peer_defect():
    sj = _sj_layer()
    theirs = sj.BatchNormThroughTime2d(T, C)
    for _ in range(T):
        theirs(torch.randn(N, C, 5, 6))
    with pytest.raises(IndexError):
        theirs(torch.randn(N, C, 5, 6))


def test_batch_norm_tt_over_run():
    module = layer.BatchNormTT2d(C, T)
    for _ in range(T):
        module(torch.randn(N, C, 5, 6))
    rejects(module, torch.randn(N, C, 5, 6), ValueError, "already processed all")
    msg = rejects(module, torch.randn(T, N, C, 5, 6), ValueError, "step_mode='s'", "(5-D)")
    assert "[N, C, H, W] (4-D)" in msg


# -- constructor arguments: ValueError, never a bare assert --------------------------------


# Constructor arguments (ValueError, never a bare assert): helpers.BAD_CONSTRUCTORS, run by
# tests/test_validation.py::test_constructor_rejects_bad_argument_naming_it.


def test_bare_assert_peer_defects():
    sj = _sj_layer()
    with pytest.raises(AssertionError):
        sj.ThresholdDependentBatchNorm2d(1.0, 0.5, C, affine=False)
    with pytest.raises(AssertionError):
        sj.Dropout(1.0)
    with pytest.raises(ValueError, match="affine=True"):
        layer.ThresholdDependentBatchNorm2d(1.0, 0.5, C, affine=False)


# -- wrappers, containers, stateful layers ------------------------------------------------


@pytest.mark.parametrize(
    "module, x, patterns",
    [
        (layer.Conv2d(C, 4, 3), torch.randn(T, N, C, 5, 6), ["step_mode='s'", "(5-D)"]),
        (layer.Conv2d(C, 4, 3, step_mode="m"), torch.randn(N, C, 5, 6), ["[T, N, C, H, W] (5-D)", "(4-D)"]),
        (layer.Conv2d(C, 4, 3), torch.randn(N, C + 2, 5, 6), [f"expects {C} input channels", f"with {C + 2}"]),
        (layer.Conv1d(C, 4, 3, step_mode="m"), torch.randn(T, N, 2, 7), [f"expects {C} input channels"]),
        (layer.Conv3d(C, 4, 2), torch.zeros(N, C, 3, 3, 3, dtype=torch.long), ["floating-point", "torch.int64"]),
        (layer.Linear(C, 3), torch.randn(N, C + 1), [f"expects {C} input features"]),
        (layer.Linear(C, 3, step_mode="m"), torch.randn(C), ["(2-D)", "(1-D)"]),
        (layer.WSLinear(C, 3), torch.randn(N, 2), [f"expects {C} input features"]),
        (layer.WSConv2d(C, 4, 3, step_mode="m"), torch.randn(N, C, 5, 6), ["(5-D)", "(4-D)"]),
        (layer.MaxPool2d(2, step_mode="m"), torch.randn(N, C, 4, 4), ["[T, N, C, H, W]"]),
        (layer.AvgPool3d(2), torch.randn(C, 4, 4), ["[N, C, D, H, W]"]),
        (layer.AdaptiveAvgPool1d(2, step_mode="m"), torch.randn(N, C, 4), ["[T, N, C, L]"]),
        (layer.Flatten(step_mode="m"), torch.randn(3), ["(2-D)"]),
        (layer.SeqToANNContainer(layer.Conv2d(C, 4, 3)), torch.randn(3), ["(2-D)", "(1-D)"]),
        (layer.GroupNorm(1, C), torch.randn(C), ["(1-D)"]),
        (layer.NeuNorm(C, 5, 6), torch.randn(N, C, 5, 7), ["expects 6 columns (width)"]),
        (layer.NeuNorm(C, 5, 6), torch.randn(N, C, 4, 6), ["expects 5 rows (height)"]),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, nn.Module) else None,
)
def test_wrapper_input_errors(module, x, patterns):
    exc = TypeError if not x.is_floating_point() else ValueError
    msg = rejects(module, x, exc, *patterns)
    assert str(tuple(x.shape)) in msg or "dtype" in msg


def test_container_child_switched_to_multi_step():
    conv = layer.Conv2d(C, 4, 3)
    container = layer.SeqToANNContainer(conv)
    conv.step_mode = "m"  # e.g. by a set_step_mode that walks into containers
    with pytest.raises(ValueError, match="child '0' \\(Conv2d\\) has step_mode='m'"):
        container(torch.randn(T, N, C, 5, 6))


def test_dropout_mask_shape_mismatch():
    drop = layer.Dropout(0.5)
    drop(torch.randn(N, C))
    rejects(drop, torch.randn(N + 1, C), ValueError, "mask", str((N, C)), str((N + 1, C)), "reset()")
    functional.reset_net(drop)
    assert drop(torch.randn(N + 1, C)).shape == (N + 1, C)


def test_neunorm_batch_change_without_reset():
    neunorm = layer.NeuNorm(C, 5, 6)
    neunorm(torch.randn(N, C, 5, 6))
    rejects(neunorm, torch.randn(N + 1, C, 5, 6), ValueError, str((N, 1, 5, 6)), str((N + 1, 1, 5, 6)), "reset()")


def test_set_step_mode_leaves_bntt_children_alone():
    """BNTT's per-timestep BNs are not step modules: switching the net to 'm' keeps them working."""
    net = nn.Sequential(layer.Conv2d(C, C, 1), layer.BatchNormThroughTime2d(T, C))
    functional.set_step_mode(net, "m")
    assert net(torch.randn(T, N, C, 5, 6)).shape == (T, N, C, 5, 6)
    assert net[1].t == T - 1


def test_tebn_unknown_backend():
    module = layer.TemporalEffectiveBatchNorm2d(T, C)
    with pytest.raises(ValueError, match="backend"):
        module.backend = "cuda"
    gn = layer.GroupNorm(1, C)  # no kernel (a BN runs on triton since issue 15)
    with pytest.raises(ValueError, match="backend must be one of \\('torch',\\)"):
        gn.backend = "triton"
