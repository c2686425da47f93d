"""Temporal Effective Batch Normalization (TEBN) on the shared Triton statistics pipeline.

TEBN (Duan et al., "Temporal Effective Batch Normalization in Spiking Neural Networks",
NeurIPS 2022) normalises a multi-step tensor with statistics shared over time and scales
every timestep by its own learnable factor p[t]::

    μ_c  = mean over (t, n, spatial) of x[t, n, c, ...]
    σ²_c = biased variance over the same M = T·N·S elements
    x̂    = (x − μ_c) / √(σ²_c + ε)
    y[t] = p[t] · (γ_c · x̂[t] + β_c)

Training (or no running statistics): μ, σ² are the batch statistics and, when running
statistics are given, they are updated in place exactly as ``F.batch_norm`` does:
``r_μ ← (1 − m)·r_μ + m·μ`` and ``r_σ² ← (1 − m)·r_σ² + m·σ²·M/(M − 1)``. Eval: μ, σ² are
the running statistics and the whole op is one elementwise pass with a per-(t, c) scale
``p[t]·γ_c·rstd_c`` and shift ``p[t]·β_c``.

Backward, with g = ∂L/∂y, g' = g·p[t] (the gradient w.r.t. γ x̂ + β), sums over (t, n, spatial)::

    ∂L/∂β_c = A_c = Σ g'        ∂L/∂γ_c = B_c = Σ g'·x̂
    ∂L/∂p[t] = Σ over (n, c, spatial) of g·(γ_c x̂ + β_c)
    ∂L/∂x = γ_c·rstd_c·(g' − A_c/M − x̂·B_c/M)     (batch statistics)
    ∂L/∂x = γ_c·rstd_c·g'                           (running statistics)

These are the TEBN instance of the shared statistics pipeline
(:mod:`snnorm.kernels.bn_pipeline`): grouping ALL (one μ, σ² per channel over T·N·S),
scale LINEAR (s_t = p[t]); γ, β, running statistics ``[C]``. The ops and their autograd
are ``snnorm::bn_*`` with rule ``"tebn"`` (:mod:`snnorm.backends.triton_backend`).
"""

from __future__ import annotations

from typing import Optional

import torch

from .bn_pipeline import RULES, launch_stats

__all__ = ["RULE"]

#: TEBN's grouping and coefficient rule
RULE = RULES["tebn"]


def _launch_tebn_stats(
    x: torch.Tensor, running_mean: Optional[torch.Tensor], running_var: Optional[torch.Tensor], momentum: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch mean and biased variance per channel ``[C]``; the running stats updated in place."""
    return launch_stats(RULE, x, running_mean, running_var, [float(momentum)])
