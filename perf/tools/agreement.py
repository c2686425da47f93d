"""Whether a provider agrees with the reference before it is timed: one tolerance table
(:data:`TOLERANCES`) and :func:`compare` (spikes by the share that flipped, real-valued
tensors by the share of elements outside ``atol + atol_rel·max|ref| + rtol·|ref|``)."""

from __future__ import annotations

import dataclasses
import math
from typing import Mapping

import torch


@dataclasses.dataclass(frozen=True)
class Tol:
    """How close a provider must be to the reference.

    ``spike_frac``: largest share of differing spikes (Heaviside outputs flip where the
    membrane sits within rounding of the threshold, and a flip then changes that neuron's
    later steps). ``rtol``/``atol_rel``: an element of a real-valued tensor is *bad* when
    ``|got − ref| > atol + atol_rel·max|ref| + rtol·|ref|``; ``bad_frac`` is the largest
    share of bad elements (a flipped spike moves its own gradient entries by O(1)).
    ``atol`` is a floor for tensors that are zero up to rounding (the gradient of a
    TEBN bias feeding an MPBN neuron: the membrane BN removes any constant shift).
    """

    spike_frac: float
    rtol: float
    atol_rel: float
    bad_frac: float
    atol: float


# One table: eager providers compute the same math in the same dtype; compiled and fused
# providers reorder reductions (fp32) or keep fp32 intermediates where eager rounds each
# op to bf16, so bf16 gets a looser bound. A semantic error (wrong reset, stats, carry)
# flips a large share of spikes and fails both.
TOLERANCES = {
    torch.float32: Tol(spike_frac=2e-3, rtol=1e-3, atol_rel=1e-4, bad_frac=5e-3, atol=1e-6),
    torch.bfloat16: Tol(spike_frac=8e-2, rtol=5e-2, atol_rel=2e-2, bad_frac=1.5e-1, atol=1e-3),
    torch.float16: Tol(spike_frac=5e-2, rtol=1e-2, atol_rel=5e-3, bad_frac=1e-1, atol=1e-4),
}


def compare(ref: Mapping[str, torch.Tensor], got: Mapping[str, torch.Tensor], tol: Tol) -> tuple[bool, str, float]:
    """Compare a provider's check tensors with the reference's.

    Keys starting with ``spikes`` are compared by mismatch share, the rest elementwise.
    Returns (agree, summary, worst max-abs error over the real-valued tensors).
    """
    ok, parts, worst = True, [], 0.0
    for key, r in ref.items():
        if key not in got:
            return False, f"{key}: missing", math.inf
        g = got[key]
        if g is None or r is None:
            if (g is None) != (r is None):
                return False, f"{key}: one side is None", math.inf
            continue
        if g.shape != r.shape:
            return False, f"{key}: shape {tuple(g.shape)} vs reference {tuple(r.shape)}", math.inf
        r64, g64 = r.detach().double().cpu(), g.detach().double().cpu()
        if not torch.isfinite(g64).all():
            ok = False
            parts.append(f"{key}: non-finite values")
            continue
        if key.startswith("spikes"):
            frac = (r64 != g64).double().mean().item() if r64.numel() else 0.0
            if frac > tol.spike_frac:
                ok = False
            parts.append(f"{key}: {frac:.2e} flipped")
        else:
            err = (g64 - r64).abs()
            scale = r64.abs().max().item() if r64.numel() else 0.0
            bad = (err > tol.atol + tol.atol_rel * scale + tol.rtol * r64.abs()).double().mean().item() if r64.numel() else 0.0
            max_err = err.max().item() if r64.numel() else 0.0
            worst = max(worst, max_err)
            if bad > tol.bad_frac:
                ok = False
            parts.append(f"{key}: max|d|={max_err:.2e} bad={bad:.1e}")
    return ok, "; ".join(parts), worst
