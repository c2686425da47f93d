"""TEBN modules on the triton backend against the same modules on the torch backend.

Module level: the module resolves the momentum factor, counts ``num_batches_tracked``,
checks the input and calls ``self.ops.tebn``; both backends must then agree on outputs,
every gradient (input, γ, β, p) and the running statistics, in training and in eval.
Runs on tests/devices.py's DEVICE (CPU through the Triton interpreter when there is no GPU).
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from devices import DEVICE, SLOW_ON_CPU
from tolerances import TEBN_MODULE_REL, rel_err

import snnorm
from snnorm import backends, functional, layer, memopt

KERNEL = Path(snnorm.__file__).parent / "kernels" / "bn_pipeline"
pytestmark = pytest.mark.skipif(
    not KERNEL.exists(), reason="snnorm/kernels/bn_pipeline (the Triton TEBN kernels) is not in this checkout"
)

T, N, C = 3, 2, 3
SPATIAL = {1: (), 2: (4, 5), 3: (2, 3, 4)}
# dtype, relative tolerance (max-norm): the kernel computes statistics with Chan's formula,
# torch with its own reduction order
TOLERANCES = [(torch.float32, TEBN_MODULE_REL[torch.float32]), (torch.float64, TEBN_MODULE_REL[torch.float64])]


@pytest.fixture(scope="module", autouse=True)
def _triton_backend():
    try:
        backends.get_ops("triton")
    except (backends.BackendUnavailableError, ImportError) as err:
        pytest.skip(f"triton backend cannot run here: {err}")


def twins(dim, dtype, **kwargs):
    torch.manual_seed(0)
    reference = getattr(layer, f"TemporalEffectiveBatchNorm{dim}d")(T, C, **kwargs).to(DEVICE, dtype)
    with torch.no_grad():
        for p in reference.parameters():
            p.uniform_(0.5, 1.5)
    fused = copy.deepcopy(reference)
    fused.backend = "triton"
    assert reference.backend == "torch" and fused.backend == "triton"
    return reference, fused


def run_both(reference, fused, x, tol, what):
    errors = []
    x_ref = x.clone().requires_grad_()
    x_fused = x.clone().requires_grad_()
    y_ref, y_fused = reference(x_ref), fused(x_fused)
    g = torch.randn_like(y_ref)
    (y_ref * g).sum().backward()
    (y_fused * g).sum().backward()
    pairs = [("output", y_fused, y_ref), ("grad x", x_fused.grad, x_ref.grad)]
    for (name, p_ref), p_fused in zip(reference.named_parameters(), fused.parameters()):
        pairs.append((f"grad {name}", p_fused.grad, p_ref.grad))
    for (name, b_ref), b_fused in zip(reference.named_buffers(), fused.buffers()):
        pairs.append((name, b_fused, b_ref))
    for name, a, b in pairs:
        if not b.is_floating_point():
            assert torch.equal(a, b), f"{what} {name}: {a} != {b}"
            continue
        assert a.dtype == b.dtype and a.shape == b.shape, f"{what} {name}"
        err = rel_err(a, b)
        errors.append(err)
        assert err <= tol, f"{what} {name}: relative error {err:.2e} > {tol:.0e}"
    reference.zero_grad()
    fused.zero_grad()
    return max(errors)


@pytest.mark.parametrize("dtype, tol", TOLERANCES, ids=["fp32", "fp64"])
@pytest.mark.parametrize("dim", [1, pytest.param(2, marks=SLOW_ON_CPU), pytest.param(3, marks=SLOW_ON_CPU)])
@pytest.mark.parametrize("kwargs", [dict(), dict(affine=False), dict(momentum=None)], ids=["default", "no-affine", "cma"])
def test_tebn_triton_matches_torch_backend(dtype, tol, dim, kwargs):
    reference, fused = twins(dim, dtype, **kwargs)
    shape = (T, N, C, *SPATIAL[dim])
    worst = 0.0
    for step in range(2):  # two training steps: running statistics accumulate
        x = (torch.randn(shape) * 2 + 0.7).to(DEVICE, dtype)
        worst = max(worst, run_both(reference, fused, x, tol, f"train step {step}"))
    assert fused.num_batches_tracked.item() == 2
    reference.eval()
    fused.eval()
    worst = max(worst, run_both(reference, fused, (torch.randn(shape) + 0.5).to(DEVICE, dtype), tol, "eval"))
    print(f"TEBN{dim}d {dtype} {kwargs}: largest relative error triton vs torch {worst:.2e}")


def test_set_backend_switches_tebn_and_keeps_checks():
    net = torch.nn.Sequential(layer.Conv2d(C, C, 1, step_mode="m"), layer.TemporalEffectiveBatchNorm2d(T, C)).to(DEVICE)
    with pytest.warns(UserWarning, match="Conv2d"):  # the conv has no triton backend
        functional.set_backend(net, "triton")
    tebn = net[1]
    assert tebn.backend == "triton"
    before = {k: v.clone() for k, v in tebn.state_dict().items()}
    with pytest.raises(ValueError, match=f"T={T}"):
        tebn(torch.randn(T + 1, N, C, 4, 5, device=DEVICE))
    with pytest.raises(ValueError, match="channels"):
        tebn(torch.randn(T, N, C + 1, 4, 5, device=DEVICE))
    for key, value in tebn.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_tebn_triton_no_update_inside_gc_1st_forward():
    reference, fused = twins(2, torch.float32)
    x = torch.randn(T, N, C, 4, 5, device=DEVICE)
    with memopt.gc_1st_forward():
        y = fused(x)
    assert fused.num_batches_tracked.item() == 0
    assert torch.equal(fused.running_mean.cpu(), torch.zeros(C)) and torch.equal(fused.running_var.cpu(), torch.ones(C))
    assert rel_err(y, reference(x)) <= TEBN_MODULE_REL[torch.float32]
