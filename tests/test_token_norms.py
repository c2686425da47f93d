"""layer.LayerNorm and layer.RMSNorm: torch's modules with step modes, on both backends.

* the torch backend is the reference: exactly torch's own modules (outputs and every
  gradient), in float32, float64 and mixed precision, normalised over one dim or several;
* the triton backend (``row_norm``) agrees with it: float64 to 1e-12, float32 to the
  triton-vs-torch tolerances, at D = 1, odd D and D > 1024;
* ``state_dict`` loads both ways between these and torch's modules;
* bad input is refused with a message naming what was expected and what came, before
  anything is computed; ``eps`` must be > 0 (a token with no spikes is a row of equal values).

The interpreter runs the triton cases on CPU (slow): they stay small.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
from devices import DEVICE
from tolerances import NORM_NEURON_FUSED, TRITON_VS_TORCH_FP32, TRITON_VS_TORCH_GRAD_FP32

from helpers import rejects
from snnorm import functional, layer

F32, F64, BF16 = torch.float32, torch.float64, torch.bfloat16
BACKENDS = ("torch", "triton")
#: the triton backend against the torch one: float64 by the fused blocks' rule (1e-12), float32
#: by the small fixed cases' tolerances (outputs; gradients are a longer chain)
OUT_TOL = {F64: NORM_NEURON_FUSED[F64], F32: TRITON_VS_TORCH_FP32}
GRAD_TOL = {F64: NORM_NEURON_FUSED[F64], F32: TRITON_VS_TORCH_GRAD_FP32}

# (name, ours, torch's) with the same constructor arguments
KINDS = {
    "LayerNorm": (layer.LayerNorm, nn.LayerNorm),
    "RMSNorm": (layer.RMSNorm, nn.RMSNorm),
}


def build(kind: str, normalized_shape, backend: str = "torch", dtype=F32, seed: int = 0, **kw):
    """(ours on ``backend``, torch's), the same random γ (and β)."""
    ours_cls, torch_cls = KINDS[kind]
    ours = ours_cls(normalized_shape, **kw).to(DEVICE, dtype)
    theirs = torch_cls(normalized_shape, **{k: v for k, v in kw.items() if k != "step_mode"}).to(DEVICE, dtype)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in ours.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=F64).to(p.dtype) * 0.5 + 1.0)
    theirs.load_state_dict(ours.state_dict())
    if backend != "torch":
        functional.set_backend(ours, backend)
    return ours, theirs


def forward_and_grads(module: nn.Module, x: torch.Tensor, g: torch.Tensor):
    """(y, ∂x, [∂p for each parameter]) of ``(module(x)·g).sum()``."""
    xr = x.detach().clone().requires_grad_()
    y = module(xr)
    params = list(module.parameters())
    grads = torch.autograd.grad((y * g).sum(), [xr, *params])
    return y.detach(), grads[0], list(grads[1:])


def assert_torchs_mixed_precision(y: torch.Tensor, y_ref: torch.Tensor) -> None:
    """torch's module's float16/bfloat16 output: bit for bit on the CPU, where torch computes a
    mixed-dtype row in float32 as the torch backend does; on a GPU torch's mixed-dtype kernel
    may order its float32 sums differently, so within the output dtype's rounding there."""
    assert y.dtype == y_ref.dtype
    if DEVICE.type == "cpu":
        assert torch.equal(y, y_ref)
    else:
        torch.testing.assert_close(y, y_ref)  # torch's own per-dtype tolerance (a few ulp)


def inputs(shape, dtype, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g, dtype=F64) * 2 + 0.5).to(DEVICE, dtype)
    return x, torch.randn(shape, generator=g, dtype=F64).to(DEVICE, dtype)


# ------------------------------------------------------------------- the torch backend: torch's modules


def kind_options(*names):
    """pytest params (kind, constructor options) for the options each kind has (RMSNorm: no bias)."""
    options = {"default": {}, "no-affine": {"elementwise_affine": False}, "no-bias": {"bias": False},
               "eps": {"eps": 1e-3}}
    return [pytest.param(kind, options[name], id=f"{kind}-{name}") for kind in KINDS for name in names
            if not (kind == "RMSNorm" and name == "no-bias")]


@pytest.mark.parametrize("kind, options", kind_options("default", "no-affine", "no-bias", "eps"))
@pytest.mark.parametrize("normalized_shape, shape", [(8, (3, 2, 5, 8)), ((3, 4), (2, 5, 3, 4)), (1, (2, 3, 1))])
@pytest.mark.parametrize("dtype", [F32, F64])
def test_torch_backend_is_exactly_torchs_module(kind, options, normalized_shape, shape, dtype):
    """Multi-step (the single-step norm computes the same: test_multi_step_is_the_single_step_norm_of_every_step)."""
    ours, theirs = build(kind, normalized_shape, dtype=dtype, step_mode="m", **options)
    x, g = inputs(shape, dtype)
    y, gx, gp = forward_and_grads(ours, x, g)
    y_ref, gx_ref, gp_ref = forward_and_grads(theirs, x, g)
    assert y.dtype == dtype and torch.equal(y, y_ref)
    assert torch.equal(gx, gx_ref)
    assert len(gp) == len(gp_ref) and all(torch.equal(a, b) for a, b in zip(gp, gp_ref))


@pytest.mark.parametrize("kind", KINDS)
def test_mixed_precision_is_torchs_mixed_precision(kind):
    """bfloat16 tokens into a float32 norm: what torch's module computes (float32 inside, one
    rounding to bfloat16), without torch's rms_norm warning about its fused path."""
    import warnings

    ours, theirs = build(kind, 16, step_mode="m")
    x, _ = inputs((2, 3, 5, 16), BF16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y = ours(x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's RMSNorm warns on mixed dtypes
        y_ref = theirs(x)
    assert y.dtype == BF16
    assert_torchs_mixed_precision(y, y_ref)


@pytest.mark.parametrize("dtype", [F32, F64, BF16])
def test_rmsnorm_default_eps_is_torchs_per_dtype(dtype):
    """eps=None: the machine epsilon of the computation's dtype (float32's for bfloat16), as
    torch; visible on a row of tiny values, where ε dominates the mean square."""
    import warnings

    ours, theirs = build("RMSNorm", 4, step_mode="s")
    ours, theirs = ours.to(F64 if dtype == F64 else F32), theirs.to(F64 if dtype == F64 else F32)
    assert ours.eps is None
    x = torch.full((2, 4), 1e-9, dtype=dtype, device=DEVICE)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        y_ref = theirs(x)
    y = ours(x)
    if dtype == BF16:
        assert_torchs_mixed_precision(y, y_ref)
    else:
        assert torch.equal(y, y_ref)
    # the ε in use: of the dtypes' epsilons, the one that predicts y (each is orders from the others)
    candidates = {d: torch.finfo(d).eps for d in (F64, F32, BF16, torch.float16)}
    ratio = (y.to(F64) / ours.weight.to(F64) / x.to(F64)).mean().item()  # = 1/√(x² + ε)
    nearest = min(candidates, key=lambda d: abs(math.log(ratio * math.sqrt(1e-18 + candidates[d]))))
    assert nearest == torch.promote_types(dtype, F32), (ratio, nearest)


def test_multi_step_is_the_single_step_norm_of_every_step():
    """A row's statistics are its own: 'm' on [T, N, L, D] is 's' on each step, and 's' on the
    whole sequence (it takes any leading dims) — the same values."""
    ln, _ = build("LayerNorm", 6, step_mode="m")
    x, _ = inputs((3, 2, 4, 6), F32)
    y = ln(x)
    functional.set_step_mode(ln, "s")
    assert ln.step_mode == "s" and "step_mode=s" in repr(ln)
    assert torch.equal(torch.stack([ln(x[t]) for t in range(3)]), y)
    assert torch.equal(ln(x), y)


# ------------------------------------------------------------- the triton backend against the torch one


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("normalized_shape, shape, dtype", [
    (1, (2, 3, 1), F64), (7, (2, 3, 7), F64), (7, (2, 3, 7), F32), ((3, 5), (2, 2, 3, 5), F64),
    (1031, (2, 2, 1031), F32),
], ids=["D=1-f64", "D=7-f64", "D=7-f32", "D=3x5-f64", "D=1031-f32"])
def test_backend_agrees_with_the_torch_backend(backend, kind, normalized_shape, shape, dtype):
    ours, _ = build(kind, normalized_shape, backend=backend, dtype=dtype, step_mode="m")
    reference, _ = build(kind, normalized_shape, dtype=dtype, step_mode="m")
    x, g = inputs(shape, dtype)
    y, gx, gp = forward_and_grads(ours, x, g)
    y_ref, gx_ref, gp_ref = forward_and_grads(reference, x, g)
    assert y.dtype == dtype and y.shape == x.shape
    torch.testing.assert_close(y, y_ref, **OUT_TOL[dtype])
    torch.testing.assert_close(gx, gx_ref, **GRAD_TOL[dtype])
    for a, b in zip(gp, gp_ref, strict=True):
        torch.testing.assert_close(a, b, **GRAD_TOL[dtype])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
def test_a_transposed_token_view_is_normalised_in_place(backend, kind):
    """A strided input (a [T, B, D, L] tensor seen as [T, B, L, D], as after a transpose)
    gives what its contiguous copy gives."""
    ours, _ = build(kind, 8, backend=backend, step_mode="m")
    x, _ = inputs((2, 3, 8, 5), F32)
    view = x.transpose(-1, -2)
    torch.testing.assert_close(ours(view), ours(view.contiguous()), **OUT_TOL[F32])


# ---------------------------------------------------------------------------------- state_dict


@pytest.mark.parametrize("kind, options", kind_options("default", "no-affine", "no-bias"))
@pytest.mark.parametrize("normalized_shape", [8, (2, 4)])
def test_state_dict_loads_both_ways(kind, options, normalized_shape):
    ours_cls, torch_cls = KINDS[kind]
    ours, theirs = build(kind, normalized_shape, seed=3, **options)
    fresh = torch_cls(normalized_shape, **options).to(DEVICE)
    fresh.load_state_dict(ours.state_dict())  # ours → torch's, strict
    back = ours_cls(normalized_shape, **options).to(DEVICE)
    back.load_state_dict(theirs.state_dict())  # torch's → ours, strict
    for a, b, c in zip(ours.state_dict().items(), fresh.state_dict().items(), back.state_dict().items(), strict=True):
        assert a[0] == b[0] == c[0] and torch.equal(a[1], b[1]) and torch.equal(a[1], c[1]), a[0]
    expected_keys = {"elementwise_affine": [], "bias": ["weight"]}.get(next(iter(options), None))
    if expected_keys is None:
        expected_keys = ["weight", "bias"] if kind == "LayerNorm" else ["weight"]
    assert list(ours.state_dict()) == expected_keys


# ---------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
def test_a_last_dims_mismatch_names_the_expected_and_received_shape(backend, kind):
    ours, _ = build(kind, (3, 4), backend=backend, step_mode="m")
    rejects(ours, torch.randn(2, 2, 4, 3, device=DEVICE), ValueError,
            "normalized_shape (3, 4)", "(2, 2, 4, 3)", "ending in (4, 3)")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("step_mode, shape, layout", [
    ("m", (3, 8), "[T, N, ..., 8] (at least 3-D)"), ("s", (8,), "[N, ..., 8] (at least 2-D)"),
])
def test_too_few_dims_says_what_the_step_mode_takes(backend, kind, step_mode, shape, layout):
    ours, _ = build(kind, 8, backend=backend, step_mode=step_mode)
    message = rejects(ours, torch.randn(shape, device=DEVICE), ValueError, layout, f"{tuple(shape)}")
    assert message.startswith(f"{kind} (step_mode={step_mode!r})")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
def test_dtype_device_and_empty_sequence_are_refused(backend, kind):
    ours, _ = build(kind, 8, backend=backend, step_mode="m")
    rejects(ours, torch.randn(2, 3, 8, dtype=F64, device=DEVICE), TypeError, "torch.float64", "torch.float32")
    rejects(ours, torch.randn(2, 3, 8, device="meta"), ValueError, "input is on meta")
    rejects(ours, torch.randn(0, 3, 8, device=DEVICE), ValueError, "T >= 1", "T=0")
    rejects(ours, torch.zeros(2, 3, 8, dtype=torch.int64, device=DEVICE), TypeError, "floating-point")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("bad", [0.0, -1e-5, math.nan, math.inf])
def test_eps_must_be_positive_in_the_constructor_and_when_reassigned(kind, bad):
    ours_cls, torch_cls = KINDS[kind]
    with pytest.raises(ValueError, match=f"{kind}: eps must be"):
        ours_cls(8, eps=bad)
    module = ours_cls(8, eps=1e-5, step_mode="m")
    module.eps = bad  # a plain attribute: every forward checks it again
    message = rejects(module, torch.randn(2, 3, 8), ValueError, "eps", str(bad))
    if bad == 0.0:
        assert "no spikes" in message
    # the defect refused: torch's module takes eps = 0 and gives NaN on a token with no spikes
    assert torch.isnan(torch_cls(8, eps=0.0)(torch.zeros(2, 8))).all()


@pytest.mark.parametrize("make, exc, pattern", [
    (lambda: layer.LayerNorm(0), ValueError, "normalized_shape"),
    (lambda: layer.LayerNorm(2.5), TypeError, "normalized_shape"),
    (lambda: layer.LayerNorm([]), ValueError, "normalized_shape"),
    (lambda: layer.RMSNorm((4, -1)), ValueError, "normalized_shape"),
    (lambda: layer.RMSNorm("8"), TypeError, "normalized_shape"),
    (lambda: layer.LayerNorm(8, elementwise_affine=1), TypeError, "elementwise_affine"),
    (lambda: layer.LayerNorm(8, bias=None), TypeError, "bias"),
    (lambda: layer.RMSNorm(8, eps="1e-6"), TypeError, "eps"),
    (lambda: layer.LayerNorm(8, step_mode="x"), ValueError, "step_mode"),
])
def test_bad_constructor_arguments_name_the_argument(make, exc, pattern):
    with pytest.raises(exc, match=pattern):
        make()


def test_backend_choices():
    assert layer.LayerNorm.supported_backends == layer.RMSNorm.supported_backends == ("torch", "triton")
    with pytest.raises(ValueError, match="backend must be one of"):
        layer.LayerNorm(4).backend = "cuda"
