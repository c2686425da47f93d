"""Temporal Accumulated Batch Normalization (TAB) on the shared Triton statistics pipeline.

TAB (Jiang et al., "TAB: Temporal Accumulated Batch Normalization in Spiking Neural
Networks", ICLR 2024) normalises step t with the statistics of steps 0..t::

    μ_t, σ²_t = mean and biased variance of x[0..t] per channel, over n_t = (t+1)·M
                values (M = N·S per step)
    x̂_t = (x_t − μ_t)·r_t,   r_t = 1/√(σ²_t + ε)
    y_t = p_t²·(γ_t x̂_t + β_t)                       (γ_t, β_t ∈ R^C per step)

Forward, O(T) passes instead of the official code's O(T²):

1. per-(t, c) partial statistics: each program keeps a (count, mean, M2) triple of its
   slice of step t (the partial-statistics kernel shared with TEBN);
2. an in-order prefix combine (the pipeline's reduce kernel, grouping PREFIX, one program per channel block):
   step t's partials are combined at once in vectorised chunks (TEBN's parallel combine)
   and Chan's formula merges them into the prefix triple of steps 0..t−1, writing μ_t,
   σ²_t after each step and updating the per-step running statistics
   (r_μ[t] ← (1 − m_t)·r_μ[t] + m_t·μ_t, r_σ²[t] likewise with M2_t/(n_t − 1));
3. one fused normalise·affine·p² pass (the pipeline's apply kernel). Eval (running statistics)
   is this pass alone.

Backward, with g = ∂L/∂y, k_t = p_t²·γ_t and per-(t, c) sums over step t's M values
A_t = Σ g, B_t = Σ g·x̂_t (the pipeline's backward reduce kernel)::

    ∂L/∂β_t = p_t²·A_t,   ∂L/∂γ_t = p_t²·B_t,   ∂L/∂p_t = 2 p_t Σ_c (γ_t B_t + β_t A_t)
    ∂L/∂μ_t = −k_t r_t A_t,   ∂L/∂σ²_t = −½ k_t r_t² B_t

and, since μ_t, σ²_t depend on every x_s with s ≤ t (∂μ_t/∂x_s = 1/n_t,
∂σ²_t/∂x_s = 2(x_s − μ_t)/n_t), for an element of step s::

    ∂L/∂x_s = k_s r_s g + U_s + V_s·(x_s − μ_s)
    V_s = Σ_{t≥s} v_t,  v_t = −k_t r_t² B_t / n_t
    U_s = Σ_{t≥s} (−k_t r_t A_t / n_t + v_t (μ_s − μ_t))

reverse sums over steps, run by the pipeline's backward coefficient kernel (one program per block of
channels, steps backwards; it also gives ∂γ, ∂β, ∂p and ∂μ, ∂σ²), then one elementwise
pass (its ∂x kernel). Centring on μ_s keeps the precision when |μ| ≫ σ. Traffic
as TEBN: forward reads x twice and writes y; backward reads g and x twice, writes ∂x.

These are the TAB instance of the shared statistics pipeline
(:mod:`snnorm.kernels.bn_pipeline`): grouping PREFIX (step t's partials merged into the
prefix of steps 0..t with Chan's formula), scale SQUARE (s_t = p_t²); γ, β, running
statistics ``[T, C]``. The ops and their autograd are ``snnorm::bn_*`` with rule
``"tab"`` (:mod:`snnorm.backends.triton_backend`).
"""

from __future__ import annotations

from .bn_pipeline import RULES

__all__ = ["RULE"]

#: TAB's grouping and coefficient rule
RULE = RULES["tab"]
