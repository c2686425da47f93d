"""A rejected call changes nothing, and constructors validate — across every module class.

* dtype policy (snnorm/_checks.py): input dtype = parameter dtype, or float16/
  bfloat16 into float32; anything else a TypeError before any state moves, the same on
  the torch and the triton backend;
* device, eps and momentum are checked before ``num_batches_tracked`` or a running
  statistic moves (torch counts the batch first, then raises);
* an empty sequence (T = 0) is a ValueError naming T, never an IndexError;
* constructor arguments: ValueError/TypeError naming the argument.
"""

from __future__ import annotations


import pytest
import torch
import torch.nn as nn

from snnorm import functional, neuron

from tolerances import (  # noqa: I001
    DTYPE_POLICY_BF16_MIXED_REL, DTYPE_POLICY_FP64_VS_FP32_REL, MODULE_MAX_FLIP_SHARE, TRITON_FP64,
)

from helpers import BAD_CONSTRUCTORS, NORM_CASES, WRAPPER_CASES, C, Case, assert_unchanged, rejects, snapshot, with_backends  # noqa: F401

PARAM_CASES = [case for case in NORM_CASES if case.has_params]


def trained(case: Case, backend: str = "torch") -> nn.Module:
    """One accepted call first, so state and counters are non-trivial."""
    module = case.build(backend)
    module(case.input())
    return module


# -- dtype policy ----------------------------------------------------------------------------


@pytest.mark.parametrize("case, backend", with_backends(PARAM_CASES))
def test_float64_into_float32_module_is_rejected_before_any_state_moves(case, backend):
    module = trained(case, backend)
    msg = rejects(module, case.input(torch.float64), TypeError, "torch.float64", "torch.float32")
    assert msg.startswith(type(module).__name__)


@pytest.mark.parametrize("case, backend", with_backends(PARAM_CASES))
def test_float32_into_float64_module_is_rejected(case, backend):
    module = trained(case, backend).double()
    rejects(module, case.input(torch.float32), TypeError, "torch.float32", "torch.float64")


def _is_spikes(y: torch.Tensor) -> bool:
    return bool(((y == 0) | (y == 1)).all())


def _assert_same_values(got: torch.Tensor, want: torch.Tensor, rel: float, what: str) -> None:
    """Spikes: at most MODULE_MAX_FLIP_SHARE flipped; values: ‖got − want‖ ≤ rel·‖want‖."""
    assert got.shape == want.shape, what
    got, want = got.detach().double(), want.detach().double()
    if _is_spikes(want):
        flipped = (got != want).double().mean().item()
        assert flipped <= MODULE_MAX_FLIP_SHARE, f"{what}: {flipped:.2%} of spikes differ"
        return
    err = (got - want).norm().item()
    assert err <= rel * want.norm().item(), f"{what}: ‖Δ‖ = {err:.3e}, ‖want‖ = {want.norm().item():.3e}"


@pytest.mark.parametrize("case, backend", with_backends(NORM_CASES))
def test_matching_dtype_runs_on_every_backend(case, backend):
    """float64 module + float64 input is within the policy: both backends compute it — the
    same function as in float32 (to float32's precision), and on the triton backend the
    torch backend's float64 values (to the kernels' fp32 scalars)."""
    x32 = case.input()
    y = case.build(backend).double()(x32.double())
    assert y.dtype == torch.float64
    _assert_same_values(y, case.build("torch")(x32), DTYPE_POLICY_FP64_VS_FP32_REL, "float64 against float32")
    if backend != "torch":
        want = case.build("torch").double()(x32.double())
        if _is_spikes(want):
            assert torch.equal(y, want), "float64 spikes differ between the backends"
        else:
            torch.testing.assert_close(y, want, **TRITON_FP64)


@pytest.mark.parametrize("case", [c for c in PARAM_CASES if "triton" in c.backends], ids=lambda c: c.name)
def test_backends_reject_the_same_dtypes(case):
    messages = {}
    for backend in ("torch", "triton"):
        with pytest.raises(TypeError) as info:
            trained(case, backend)(case.input(torch.float64))
        messages[backend] = str(info.value)
    assert messages["torch"] == messages["triton"]


@pytest.mark.parametrize("case", PARAM_CASES, ids=lambda c: c.name)
def test_bfloat16_into_float32_module_is_mixed_precision(case):
    """bfloat16 input, float32 parameters: computed as the float32 module computes the same
    (bf16-representable) values, up to bfloat16 rounding of the output and intermediates."""
    module = trained(case)
    functional.reset_net(module)  # BNTT: a new sequence
    x = case.input(torch.bfloat16)
    y = module(x)
    assert y.dtype in (torch.bfloat16, torch.float32)
    reference = trained(case)
    functional.reset_net(reference)
    _assert_same_values(y, reference(x.float()), DTYPE_POLICY_BF16_MIXED_REL,
                        "bfloat16 input against its float32 values")


# -- device, eps, momentum -----------------------------------------------------------------


@pytest.mark.parametrize("case, backend", with_backends(PARAM_CASES))
def test_input_on_another_device_is_rejected(case, backend):
    module = trained(case, backend)
    rejects(module, case.input(device="meta"), ValueError, "input is on meta", "cpu")


def _bns(module):
    return [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


BN_CASES = [c for c in NORM_CASES if _bns(c.make())]  # the BN family and the (unfolded) MPBN neuron


@pytest.mark.parametrize("case, backend", with_backends(BN_CASES))
@pytest.mark.parametrize("attr, value, pattern", [("eps", 0.0, "eps"),
                                                  ("momentum", 1.5, "momentum"), ("momentum", -0.1, "momentum")])
def test_reassigned_eps_or_momentum_is_rejected_before_counting(case, backend, attr, value, pattern):
    """torch's BN counts the batch in num_batches_tracked and only then raises on eps <= 0
    in training (eps = 0 is refused here because the module trains: batch statistics). A
    negative, NaN or infinite eps on every module that has one: test_peer_compat.py's
    test_negative_nan_inf_eps_refused_before_any_state_moves."""
    module = trained(case, backend)
    setattr(_bns(module)[-1], attr, value)  # BNTT: the last timestep's BN, checked up front
    rejects(module, case.input(), ValueError, pattern, str(value))


def test_torch_counts_the_batch_before_rejecting_eps():
    """The peer defect the check above fixes."""
    bn = nn.BatchNorm2d(C, eps=0.0, momentum=None)
    with pytest.raises((RuntimeError, ValueError), match="eps"):
        bn(torch.randn(3, C, 2, 2))
    assert int(bn.num_batches_tracked) == 1


# -- empty sequences --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "case, backend", with_backends([c for c in NORM_CASES + WRAPPER_CASES if c.multi_step])
)
def test_empty_sequence_is_a_clear_error(case, backend):
    module = trained(case, backend)
    rejects(module, case.input(T_override=0), ValueError, "T >= 1", "T=0")


# -- constructors ------------------------------------------------------------------------------

def _id(make):
    try:
        make()
    except Exception as err:  # the id is the message's head: class and argument
        return str(err).split(" must")[0].split(" got")[0][:60]
    return "accepted"


@pytest.mark.parametrize("make, exc, text", BAD_CONSTRUCTORS, ids=[_id(m) for m, _, _ in BAD_CONSTRUCTORS])
def test_constructor_rejects_bad_argument_naming_it(make, exc, text):
    """helpers.BAD_CONSTRUCTORS, the one table of bad constructor arguments (eps included)."""
    with pytest.raises(exc) as info:
        make()
    assert type(info.value) is exc
    assert text in str(info.value), str(info.value)


def test_momentum_set_after_folding_is_checked():
    node = neuron.MPBNLIFNode(out_features=C)
    node.eval()
    node.re_parameterize_v_threshold(running_stats=True)
    with pytest.raises(ValueError, match="bn_momentum"):
        node.bn_momentum = 1.5
    assert node.bn_momentum == pytest.approx(0.1)
