"""Every tolerance of the tests, the comparison helpers, and the rule for comparing spiking outputs.

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

The comparisons, each with its tolerance named below:

- elementwise, same dtype: ``torch.testing.assert_close(got, want, **NAME)`` with NAME a
  ``dict(rtol=, atol=)``, i.e. ``|got − want| ≤ atol + rtol·|want|`` (``EXACT``: equality);
- max-norm relative to an oracle: :func:`assert_rel_close`, ``max|got − want| ≤ rel·max|want|``;
- against a float64 reference: :func:`assert_close_to_reference`,
  ``max|got − ref64| ≤ rtol·(1 + max|ref64|)``, or for fp16/bf16 flash-attention's
  ``≤ 2·max|torch_lowp − ref64| + atol·(1 + max|ref64|)``;
- a Triton op against the fp64 torch op: :func:`assert_op_close` (``OP_VS_FP64``), on the
  entries :func:`comparable_mask` / :func:`mask_for` leave comparable
  (:func:`comparable_entries` for a whole quantity);
- shares (flipped spikes, entries within a bound), norms (autocast gradients) and single
  numbers (``pytest.approx``) are compared with their named bound where the test states the rule.
"""

from __future__ import annotations

import torch

F16, BF16, F32, F64 = torch.float16, torch.bfloat16, torch.float32, torch.float64

# --- Triton op against the torch backend run in float64 on the same (rounded) inputs -----
#: dtype -> (atol, rtol, spike margin on z, max share of flipped spikes); atol scales with max|ref|;
#: fp64: the kernels' scalars are fp64 too (kernels/_device.kernel_scalars), so only rounding differs
OP_VS_FP64 = {
    F64: (1e-12, 1e-12, 1e-12, 0.0),
    F32: (1e-4, 1e-4, 1e-3, 0.01),
    F16: (4e-3, 4e-3, 1e-2, 0.02),
    BF16: (2e-2, 2e-2, 5e-2, 0.02),
}
#: where a spike may flip (tests/helpers.py: assert_flips_placed): the reference's firing
#: variable z = h − θ at every flipped spike satisfies |z| ≤ FLIP_MARGIN_EPS[dtype]·eps(dtype)·
#: max(1, max|z|), with dtype the precision of the implementation under test (the reference
#: is the torch backend in fp64, or in the same dtype for whole modules). The margin is the
#: rounding budget of z: a batch mean and variance over up to 2^23 values (a tile's tree sum,
#: then Chan's merge of the tiles) and T ≤ 16 steps of charge give tens of eps in fp32 and
#: fp64; the kernels compute fp16/bf16 inputs in fp32, the torch backend in bf16 itself (its
#: MPBN eval under autocast flips at 6.3 bf16 eps·scale, tests/test_autocast.py). A flip is
#: rare on random draws (none in the default draws of the fp32 tests): helpers.FLIPS_SEEN records the largest |z|/(eps·scale)
#: met, printed by tests/test_triton_mpbn_lif.py with -s. No share of flips is allowed.
FLIP_MARGIN_EPS = {F64: 64, F32: 256, F16: 8, BF16: 8}


def flip_margin(dtype: torch.dtype, z: torch.Tensor) -> tuple[float, float]:
    """(margin, unit): the largest |z| a flipped spike may have in ``dtype`` given the
    reference's firing variables ``z``, and one eps·scale (unit·FLIP_MARGIN_EPS = margin)."""
    scale = max(1.0, z.abs().max().item()) if z.numel() else 1.0
    unit = torch.finfo(dtype).eps * scale
    return FLIP_MARGIN_EPS[dtype] * unit, unit


#: TEBN (no spikes): |triton − ref64| ≤ rtol·(1 + max|ref64|)
TEBN_RTOL = {F64: 1e-12, F32: 2e-5}
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
#: the dtype policy's accepted calls (test_validation.py), as ‖got − want‖/‖want‖: a float64
#: module against the float32 one (float32's rounding), and bfloat16 input into a float32
#: module against that module on the same values in float32 (a few bfloat16 roundings,
#: 2⁻⁸ ≈ 3.9e-3 each; the WS layers also round the standardised weight)
DTYPE_POLICY_FP64_VS_FP32_REL = 1e-5
DTYPE_POLICY_BF16_MIXED_REL = 1e-2
#: TEBN modules: relative max-norm error
TEBN_MODULE_REL = {F32: 5e-6, F64: 1e-12}

# --- torch.compile against eager, same backend ---------------------------------------------
COMPILED_FP32 = dict(rtol=1e-5, atol=1e-5)
COMPILED_BUFFERS_FP32 = dict(rtol=1e-6, atol=1e-6)

# --- autocast bfloat16 against float32 ---------------------------------------------------------
#: bfloat16 keeps 8 mantissa bits (relative step 2^-8 ≈ 0.4%); a conv sums 36 rounded products
AUTOCAST_BF16 = dict(atol=3e-2, rtol=3e-2)
AUTOCAST_BUFFERS = dict(atol=1e-2, rtol=1e-2)
AUTOCAST_MAX_SPIKE_FLIPS = 0.03
AUTOCAST_GRAD_REL = 5e-2  # ‖g_bf16 − g_fp32‖ ≤ GRAD_REL·‖g_fp32‖ + 1e-3

#: neurons on a bfloat16 input under autocast, membrane and ∂x on the units no flip reached, by
#: the 2×-torch rule against the float64 neuron: |got − ref64| ≤ 2·|torch_bf16 − ref64| + this·(1 + max|ref64|)
AUTOCAST_NEURON_LOWP_ATOL = 8e-3

#: a readout row moved by a flipped spike may leave AUTOCAST_BF16; this share of it may not
AUTOCAST_READOUT_WITHIN_SHARE = 0.75
#: absolute floor of the gradient rule above (a parameter whose fp32 gradient is ~0)
AUTOCAST_GRAD_FLOOR = 1e-3
#: TAB under bfloat16 autocast against fp32: output and ∂x, parameter gradients, buffers
AUTOCAST_TAB = dict(atol=3e-2, rtol=3e-2)
AUTOCAST_TAB_PARAM_GRAD = dict(atol=5e-2, rtol=5e-2)
AUTOCAST_TAB_BUFFERS = dict(atol=1e-2, rtol=1e-2)

# --- data-parallel (fp64) against one process on the concatenated batch -----------------------
DISTRIBUTED_FP64 = dict(atol=1e-10, rtol=1e-9)
#: the same for a float32 network of norms (no spikes to flip): the issue's 1e-5
DISTRIBUTED_FP32 = dict(atol=1e-5, rtol=1e-5)
#: global statistics of float32 shards at mean 1e4 (resolution ~1e-3): |Δmean|, max relative |Δvar|
DISTRIBUTED_LARGE_MEAN_FP32_MEAN = 1e-2
DISTRIBUTED_LARGE_MEAN_FP32_VAR_REL = 1e-3

# --- exact equality spelled as a tolerance (same ops in the same order) -----------------------
EXACT = dict(rtol=0.0, atol=0.0)

# --- Triton ops and modules against the torch backend, fp32 (tests outside the property tests) -
#: outputs, membranes, buffers of small fixed cases
TRITON_VS_TORCH_FP32 = dict(rtol=1e-5, atol=1e-6)
#: their gradients (a longer chain of rounded operations)
TRITON_VS_TORCH_GRAD_FP32 = dict(rtol=1e-4, atol=1e-5)
#: fp64 Triton ops and modules against the torch backend in fp64: every fp64 kernel reads
#: τ, v_reset, ε, θ, momentum, α at full precision (kernels/_device.kernel_scalars; as fp32
#: arguments they were ~1e-8 off, and a momentum of 0.1 moved the running statistics by ~1e-9)
TRITON_FP64 = dict(rtol=1e-12, atol=1e-12)
#: fp32 statistics at mean/std = 1e4 (ulp of 1e4 is 1e-3): max relative error of the variance
LARGE_MEAN_FP32_VAR_REL = 1e-4
#: ... and max |y − y64| of a normalised output
LARGE_MEAN_FP32_OUTPUT = 1e-3
#: TAB module, triton (compiled) against torch: loss and buffers, parameter gradients, eval output
TAB_TRITON_VS_TORCH_FP32 = dict(rtol=1e-5, atol=1e-6)
TAB_TRITON_VS_TORCH_GRAD_FP32 = dict(rtol=1e-4, atol=1e-6)
TAB_TRITON_VS_TORCH_OUTPUT_FP32 = dict(rtol=1e-5, atol=1e-5)
#: TAB op against ref64 (as TEBN_RTOL): |triton − ref64| ≤ rtol·(1 + max|ref64|); bf16 by the 2×-torch rule
TAB_RTOL = {F64: 1e-12, F32: 3e-5}
TAB_LOWP_ATOL = {BF16: 8e-3}
#: running statistics under one momentum for all steps, relative to max|torch|
TAB_UNIFORM_MOMENTUM_REL = {F64: 1e-14, F32: 1e-6}
#: chunked combination of partial statistics, relative to max|x| (mean) or max var
CHUNKED_STATS_REL = {F64: 1e-12, F32: 2e-5}

# --- the torch backend against spikingjelly / snntorch / torch (fp32 oracles) -----------------
#: neurons: max|ours − theirs| ≤ rel·max|theirs| (floor: an all-zero oracle)
NEURON_VS_SJ_REL = 1e-5
NEURON_VS_SJ_REL_FLOOR = 1e-12
#: MPBN running statistics against spikingjelly's, elementwise relative
NEURON_BUFFERS_VS_SJ = dict(rtol=1e-6, atol=0.0)
#: layers: max|ours − theirs| ≤ rel·max|theirs| for outputs, gradients and running statistics
LAYER_VS_SJ_REL = 1e-6
#: modules against spikingjelly's (interop): values, and gradients with a floor for the
#: conv biases in front of a BN, whose true gradient is 0 (rounding noise ~1e-6 in both)
INTEROP_VS_SJ = dict(rtol=1e-5, atol=1e-6)
INTEROP_GRAD_VS_SJ = dict(rtol=1e-5, atol=1e-5)
#: a membrane computed by hand from the same fp32 values (a few roundings)
MEMBRANE_BY_HAND_FP32 = dict(rtol=1e-5, atol=1e-6)
#: spikingjelly's learnable-threshold membrane misses exp(a)·s by at least this (a defect check)
SJ_LEARNABLE_VTH_DEFECT_GAP = dict(rtol=1e-5, atol=1e-3)
#: BN running mean computed by hand (fp32)
RUNNING_MEAN_BY_HAND_FP32 = dict(rtol=1e-5, atol=1e-6)
#: standardised weight: mean 0 and Var·fan_in 1 (fp32 reductions over 20 values); WS conv vs torch conv
WS_WEIGHT_MEAN = dict(rtol=1e-5, atol=1e-6)
WS_WEIGHT_VAR = dict(rtol=1e-5, atol=1e-5)
WS_CONV_VS_TORCH_FP32 = dict(rtol=1e-6, atol=1e-6)
#: conv→BN fusion: fused parameters vs torch's / spikingjelly's fusion (fp32, one formula)
FUSED_PARAMS_FP32 = dict(rtol=1e-6, atol=1e-6)
#: outputs of a fused conv vs conv→BN, rescaled fused parameters, packed conv-BN outputs and grads
FUSED_OUTPUT_FP32 = dict(rtol=1e-5, atol=1e-5)
#: running statistics of a packed conv-BN vs the unpacked pair; a re-laid-out (T-last) forward
FUSED_BUFFERS_FP32 = dict(rtol=1e-6, atol=1e-6)
RELAYOUT_FP32 = dict(rtol=1e-6, atol=1e-6)
#: fp32 inputs closer than this to θ′ are moved away before spikes are checked exactly
FOLDED_INPUT_MARGIN_FP32 = 1e-3
#: folding the MPBN threshold: membranes vs unfolded eval; θ′ vs the fp64 formula
FOLDED_MEMBRANE_FP32 = dict(rtol=1e-5, atol=1e-5)
FOLDED_THRESHOLD_FP32 = dict(rtol=1e-6, atol=1e-6)
#: the demo's max |logit change| when folding
#: perf/bench_tab.py --smoke: max |Δ| between the official O(T²) TAB and snnorm-torch in fp32
#: (outputs, gradients, running statistics of O(1); observed ≤ 1e-6)
BENCH_TAB_SMOKE_MAX_ABS_ERR = 1e-4
#: the demo learns (chance is 0.1 on 10 digits): the --quick run's 2 epochs reach 0.22 test
#: accuracy (seed 0), the same configuration given 6 epochs 0.71 (seed 1: 0.76)
DEMO_QUICK_MIN_TEST_ACC = 0.15
DEMO_LEARNED_MIN_TEST_ACC = 0.5
DEMO_FOLD_MAX_LOGIT_DIFF = 1e-5
#: fold exactness: a flip lies within this many eps·scale of θ′ (measured: ≤ 1.1, fp32 and fp64)
FOLD_FLIP_ULPS = 4
#: share of flipped spikes among inputs within ±32 ulps of θ′ (measured: 0.8–2.5%)
FOLD_MAX_FLIPS_NEAR = 0.05
#: ... among inputs spread ~1e-3 relative around θ′, per dtype (measured on both backends and
#: both carries: 1 of 4096 in float32, 0 of 4096 in float64; docs/porting.md states these)
FOLD_MAX_FLIPS_DENSE = {F32: 1 / 4096, F64: 0.0}

# --- the same computation reorganised (checkpointing, single- vs multi-step, chunking) --------
#: recomputed forward under checkpointing (fp32): input and parameter gradients
RECOMPUTED_GRAD_FP32 = dict(rtol=1e-6, atol=1e-7)
#: chunked (split-batch) forward vs the whole batch (fp32)
CHUNKED_FP32 = dict(rtol=1e-6, atol=1e-6)
#: TAB layer (fp64): vs the official O(T²) algorithm, relative to 1 + max|baseline|
TAB_VS_OFFICIAL_REL = {F64: 1e-12, F32: 4e-6}
#: TAB fp64, the same statistics in another order (single vs multi step, eval vs train, checkpoint)
TAB_REORDERED_FP64 = dict(rtol=1e-5, atol=1e-12)
TAB_EVAL_VS_TRAIN_FP64 = dict(rtol=0.0, atol=1e-12)
#: TAB prefix statistics vs a direct mean / variance (fp64)
TAB_PREFIX_MEAN_FP64 = dict(rtol=1e-14, atol=1e-8)
TAB_PREFIX_VAR_FP64 = dict(rtol=1e-12, atol=1e-8)
#: TAB step 1 is not plain per-step BN: it differs from it by more than this
TAB_NOT_PER_STEP_GAP = dict(rtol=1e-5, atol=1e-3)
#: the gradient of step 0 through later steps' statistics is not zero
TAB_GRAD_REACHES_STEP0 = 1e-6

# --- reports ------------------------------------------------------------------------------------
#: a markdown table prints bytes/element/step with 2 decimals
TABLE_2_DECIMALS_ABS = 0.006
#: a custom op's sum of 80 fp32 values vs torch's
CUSTOM_OP_SUM_FP32_REL = 1e-5


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


def comparable_entries(value: torch.Tensor, clean: torch.Tensor, what: str) -> torch.Tensor:
    """:func:`mask_for`, for a quantity that must be compared: a layout the rule does not know
    fails (instead of skipping the quantity on exactly the draws where a spike flipped)."""
    mask = mask_for(value, clean)
    if mask is None:
        raise AssertionError(
            f"{what}: shape {tuple(value.shape)} is none of the layouts mask_for knows for units "
            f"{tuple(clean.shape)} ([T, N, C, ...], [N, C, ...], [1, C, ...], [C], scalar); add it there"
        )
    return mask.to(value.device)


def rel_err(got: torch.Tensor, want: torch.Tensor, floor: float = 0.0) -> float:
    """``max|got − want| / max(max|want|, floor)``; the plain difference when that scale is 0."""
    got, want = got.detach().double(), want.detach().double()
    if want.numel() == 0:
        return 0.0
    scale = max(want.abs().max().item(), floor)
    diff = (got - want).abs().max().item()
    return diff / scale if scale > 0 else diff


def assert_rel_close(got: torch.Tensor, want: torch.Tensor, rel: float, what: str, floor: float = 0.0) -> float:
    """``max|got − want| ≤ rel·max(max|want|, floor)`` (``want`` is the oracle); returns the error."""
    err = rel_err(got, want, floor)
    if not err <= rel:
        raise AssertionError(f"{what}: max-norm relative error {err:.3e} > {rel:.0e}")
    return err


def assert_close_to_reference(what, got, ref64, rtol=None, lowp=None, lowp_atol=None):
    """``got`` against the float64 reference ``ref64``, with ``scale = 1 + max|ref64|``:

    ``max|got − ref64| ≤ rtol·scale``, or, given ``lowp`` (the torch reference run in the low
    precision itself), flash-attention's ``max|got − ref64| ≤ 2·max|lowp − ref64| + lowp_atol·scale``.
    Returns ``(max|got − ref64| / scale, max|lowp − ref64|)`` (the latter None without ``lowp``).
    """
    if tuple(got.shape) != tuple(ref64.shape):
        raise AssertionError(f"{what}: shape {tuple(got.shape)} vs reference {tuple(ref64.shape)}")
    if not bool(torch.isfinite(got).all()):
        raise AssertionError(f"{what}: non-finite values")
    if ref64.numel() == 0:  # an empty batch: nothing to compare
        return 0.0, None
    scale = 1.0 + ref64.abs().max().item()
    err = (got.double() - ref64).abs().max().item()
    if lowp is None:
        if not err <= rtol * scale:
            raise AssertionError(f"{what}: |got − ref64| = {err:.3g} > {rtol:.0e}·(1 + max|ref64|) = {rtol * scale:.3g}")
        return err / scale, None
    torch_err = (lowp.double() - ref64).abs().max().item()
    bound = 2 * torch_err + lowp_atol * scale
    if not err <= bound:
        raise AssertionError(f"{what}: |got − ref64| = {err:.3g} > 2·torch err {torch_err:.3g} + {lowp_atol:.0e}·{scale:.3g}")
    return err / scale, torch_err


def assert_op_close(what: str, got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype, mask=None) -> float | None:
    """A Triton op in ``dtype`` against the fp64 torch op, on the entries where ``mask`` holds
    (None: all): ``|got − want| ≤ atol·max(1, max|want|) + rtol·|want|`` elementwise, atol and
    rtol from :data:`OP_VS_FP64`. Returns ``max |got − want| / (|want| + max(1, max|want|))``
    (None when nothing was compared)."""
    atol, rtol = op_tolerance(dtype)[:2]
    got = got.detach().to(torch.float64)
    want = want.detach().to(torch.float64)
    if got.shape != want.shape:
        raise AssertionError(f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}")
    if mask is not None:
        mask = mask.to(got.device)
        got, want = got[mask], want[mask]
    if not want.numel():
        return None
    scale = max(1.0, want.abs().max().item())
    err = (got - want).abs()
    bound = atol * scale + rtol * want.abs()
    if not bool(torch.all(err <= bound)):
        raise AssertionError(f"{what}: max error {err.max().item():.3e} (bound {bound.min().item():.1e}, dtype {dtype})")
    return (err / (want.abs() + scale)).max().item()


# --- another library's kernel against snnorm's, same math ---------------------------------
#: spikingjelly's Triton LIF against snnorm's LIF, fp32 (perf/compare.py's adapter)
PEER_KERNEL_FP32 = dict(rtol=1e-6, atol=1e-6)


# --- the statistics pipeline's multi-step BN/tdBN and BNTT ops against the torch backend -------
#: |triton − ref64| ≤ rtol·(1 + max|ref64|) (the TEBN rule: the same kernels)
BN_PIPELINE_RTOL = {F64: 1e-12, F32: 2e-5}
#: bf16/fp16: |triton − ref64| ≤ 2·|torch_lowp − ref64| + atol·(1 + max|ref64|)
BN_PIPELINE_LOWP_ATOL = {F16: 1e-3, BF16: 8e-3,
                         # fp32 too (the torch backend in fp32 as lowp): a step of BNTT may hold 2 values
                         # per channel, whose σ from 2 samples amplifies both backends' rounding alike
                         F32: 2e-5}
#: BN/tdBN/BNTT modules, triton against torch backend in the same dtype (fp32): relative max-norm
BN_MODULE_REL = {F32: 1e-5, F64: 1e-12}
#: fp32 synchronised pipeline at world size 1 against the local one: the same values reduced in
#: another order (per step, then over the steps' rank partials; gradient sums through fp64)
SYNCED_VS_LOCAL_FP32 = dict(rtol=1e-5, atol=1e-6)

# --- fused norm → neuron blocks (snnorm.fusion) against the unfused torch pair -----------
#: membranes, gradients and running statistics; spikes are compared exactly (fp64) or by
#: share of flips (fp32, MODULE_MAX_FLIP_SHARE) and the rest only on draws without a flip;
#: fp64 at fp64 precision (the fused kernels' scalars are fp64: kernels/_device.kernel_scalars)
NORM_NEURON_FUSED = {F64: dict(rtol=1e-12, atol=1e-12), F32: dict(rtol=1e-4, atol=1e-4)}
#: bf16 input into float32 norms, fused (fp32 inside) against the float64 pair: share of spikes
#: that differ, and the rule ‖fused − ref64‖ ≤ 2·‖torch_bf16 − ref64‖ + this (norm-wise relative)
NORM_NEURON_FUSED_BF16_FLIPS = 0.03
NORM_NEURON_FUSED_BF16_REL = 1e-2

# --- LayerNorm / RMSNorm over the last dimension (triton row_norm, row_norm_lif) -----------------
#: fused row norm → LIF in fp64 against the float64 torch composition (fp64 scalars: only rounding differs)
ROW_NORM_FP64 = dict(rtol=1e-12, atol=1e-12)
#: the plain row norm against F.layer_norm / F.rms_norm in fp64: |triton − ref64| ≤ rtol·(1 + max|ref64|)
ROW_NORM_RTOL = {F64: 1e-12, F32: 2e-5}
#: fp16/bf16 row norm: |triton − ref64| ≤ 2·|torch_lowp − ref64| + atol·(1 + max|ref64|)
ROW_NORM_LOWP_ATOL = {F16: 1e-3, BF16: 8e-3}
