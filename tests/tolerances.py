"""Every tolerance of the backend tests, and the one rule for comparing spiking outputs.

A tolerance defined in a test file is a convention nobody can audit; they all live here.

Spikes are discontinuous. Two implementations that round differently may disagree on a
spike whose firing variable z lies within rounding of 0, and after such a flip everything
that depends on it legitimately differs. :func:`comparable_mask` says what can still be
compared: a *unit* is what one spike's change can reach — one element (n, c, spatial) for
the elementwise ops (LIF, MPBN eval, folded threshold), a whole channel when batch
statistics couple the elements of a channel (MPBN training, test-time adaptation).
Spikes are compared up to and including each unit's first flip; every other quantity only
on units with no flip at all. So a draw with a flip still checks its other units instead
of returning early.
"""

from __future__ import annotations

import torch

F16, BF16, F32, F64 = torch.float16, torch.bfloat16, torch.float32, torch.float64

# --- Triton op against the torch backend run in float64 on the same (rounded) inputs -----
#: dtype -> (atol, rtol, spike margin on z, max share of flipped spikes); atol scales with max|ref|
OP_VS_FP64 = {
    F64: (1e-6, 1e-6, 1e-5, 0.0),
    F32: (1e-4, 1e-4, 1e-3, 0.01),
    F16: (4e-3, 4e-3, 1e-2, 0.02),
    BF16: (2e-2, 2e-2, 5e-2, 0.02),
}
#: TEBN (no spikes): |triton − ref64| ≤ rtol·(1 + max|ref64|)
TEBN_RTOL = {F64: 1e-10, F32: 2e-5}
#: fp16/bf16 TEBN: |triton − ref64| ≤ 2·|torch_lowp − ref64| + atol·(1 + max|ref64|) (≈ 1 and 2 ulp)
TEBN_LOWP_ATOL = {F16: 1e-3, BF16: 8e-3}
#: two orders of summation of the same fp64 values (split vs resident path, tiled vs untiled)
REORDERED_FP64 = dict(rtol=1e-12, atol=1e-12)
#: fp32 statistics at mean/std = 1e4 (ulp of 1e4 is 1e-3): running (mean, var)
LARGE_MEAN_FP32 = dict(mean=dict(rtol=1e-6, atol=1e-3), var=dict(rtol=1e-3, atol=1e-3))

# --- whole modules: triton backend against torch backend, same dtype ----------------------
#: neurons (fp32): membrane and gradients, and the buffers (running statistics)
MODULE_FP32 = dict(rtol=1e-4, atol=1e-4)
MODULE_BUFFERS_FP32 = dict(rtol=1e-5, atol=1e-6)
#: share of spikes two fp32 backends may disagree on (all within rounding of the threshold)
MODULE_MAX_FLIP_SHARE = 0.01
#: TEBN modules: relative max-norm error
TEBN_MODULE_REL = {F32: 5e-6, F64: 1e-12}

# --- torch.compile against eager, same backend ---------------------------------------------
COMPILED_FP32 = dict(rtol=1e-5, atol=1e-5)
COMPILED_BUFFERS_FP32 = dict(rtol=1e-6, atol=1e-6)

# --- autocast bfloat16 against float32 ---------------------------------------------------------
#: bfloat16 keeps 8 mantissa bits (relative step 2^-8 ≈ 0.4%); a conv sums 36 rounded products
AUTOCAST_BF16 = dict(atol=3e-2, rtol=3e-2)
AUTOCAST_BF16_GRAD = dict(atol=12e-2, rtol=12e-2)  # gradients: 4× (the surrogate amplifies)
AUTOCAST_BUFFERS = dict(atol=1e-2, rtol=1e-2)
AUTOCAST_MAX_SPIKE_FLIPS = 0.03
AUTOCAST_GRAD_REL = 5e-2  # ‖g_bf16 − g_fp32‖ ≤ GRAD_REL·‖g_fp32‖ + 1e-3

# --- data-parallel (fp64) against one process on the concatenated batch -----------------------
DISTRIBUTED_FP64 = dict(atol=1e-10, rtol=1e-9)


def op_tolerance(dtype: torch.dtype):
    """(atol, rtol, spike margin, max flipped share) for a Triton op in ``dtype``."""
    return OP_VS_FP64[dtype]


def comparable_mask(got_s: torch.Tensor, want_s: torch.Tensor, channel_coupled: bool):
    """What can be compared after spikes flipped (see the module docstring).

    ``got_s``, ``want_s``: spikes ``[T, N, C, *spatial]``. Returns ``(flipped, spike_mask,
    clean)``: the flipped spikes, the spikes to compare (each unit up to its first flip) and
    the clean units as a ``[N, C, *spatial]`` bool mask (all False in a channel with a flip
    when ``channel_coupled``).
    """
    flipped = got_s.to(torch.float64) != want_s.to(torch.float64)
    T = flipped.shape[0]
    if channel_coupled:  # a flip anywhere in channel c at step t reaches all of c after t
        dims = [d for d in range(1, flipped.dim()) if d != 2]
        per_step = flipped.any(dim=dims, keepdim=True) if dims else flipped
        unit_flips = per_step.expand_as(flipped)
    else:
        unit_flips = flipped
    steps = torch.arange(T, device=flipped.device).view(T, *([1] * (flipped.dim() - 1)))
    first = torch.where(unit_flips, steps, T).amin(dim=0)  # T when the unit never flips
    spike_mask = steps <= first
    clean = first == T
    return flipped, spike_mask, clean


def mask_for(value: torch.Tensor, clean: torch.Tensor):
    """The part of ``clean`` (``[N, C, *spatial]``) that reaches each entry of ``value``, or
    None when ``value`` has a layout the rule does not know (compare it only if all is clean).

    ``[T, N, C, ...]`` and ``[N, C, ...]`` are per element, ``[1, C, ...]`` (a broadcast
    state's gradient) sums over N, ``[C]`` sums over the channel, a scalar over everything.
    """
    shape = tuple(value.shape)
    N, C = clean.shape[:2]
    if shape == tuple(clean.shape):
        return clean
    if len(shape) == clean.dim() + 1 and shape[1:] == tuple(clean.shape):
        return clean.unsqueeze(0).expand(shape)
    if shape == (1, *clean.shape[1:]):
        return clean.all(dim=0, keepdim=True)
    if shape == (C,):
        return clean.transpose(0, 1).reshape(C, -1).all(dim=1)
    if value.dim() == 0 or value.numel() == 1:
        return clean.all().reshape(shape)
    return None

# --- the statistics pipeline's multi-step BN/tdBN and BNTT ops against the torch backend -------
#: |triton − ref64| ≤ rtol·(1 + max|ref64|) (the TEBN rule: the same kernels)
BN_PIPELINE_RTOL = {F64: 1e-10, F32: 2e-5}
#: bf16/fp16: |triton − ref64| ≤ 2·|torch_lowp − ref64| + atol·(1 + max|ref64|)
BN_PIPELINE_LOWP_ATOL = {F16: 1e-3, BF16: 8e-3}
#: BN/tdBN/BNTT modules, triton against torch backend in the same dtype (fp32): relative max-norm
BN_MODULE_REL = {F32: 1e-5, F64: 1e-12}
