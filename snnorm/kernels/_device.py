r"""Every device function of the Triton kernels, and their named compile-time modes.

One module for the LIF / MPBN-LIF kernels (``lif.py``, ``mpbn_lif_train.py``), the
statistics pipeline (``bn_pipeline.py``) and the fused norm → LIF kernels (``norm_lif.py``):
one Chan combine (:func:`chan_chunk` within a chunk of partials, :func:`chan_merge` between
chunks, both with the empty guard, the chunk centred on its first partial's mean), one rstd
rule (:func:`rstd_of`), one accumulation-dtype name (``ACC_DTYPE``), one affine convention
(``HAS_WEIGHT`` / ``HAS_BIAS``, an absent γ is 1 and an absent β is 0), and every mode a named
``tl.constexpr`` (launchers pass ``NAME.value``; kernels compare with the name, never a literal).

The neuron, per channel c and step t (v_r = v_reset, or 0 for soft reset)::

    charge     h = v + (x − (v − v_r))/τ   (decay_input)  |  h = v − (v − v_r)/τ + x
    normalise  ĥ = γ (h − μ)·rstd + β,  rstd = 1/√(σ² + ε)
    fire       s = Θ(z),  z = h − θ (FIRE_RAW) | ĥ − θ (FIRE_NORMALISED) | sign(γ)(h − θ') (FIRE_FOLDED)
    reset      v = s·v_r + (1 − s)·u (hard) | u − s·θ (soft),  u = ĥ (CARRY_NORM) | h

Statistics are (count, mean, M2) triples, never Σx, Σx² (see :mod:`snnorm._welford`, the same
formulas on the host)::

    merge      n = n_a + n_b,  δ = μ_b − μ_a,  μ = μ_a + δ·n_b/n,  M2 = M2_a + M2_b + δ²·n_a·n_b/n
    chunk      n = Σ n_p,  μ = μ_0 + Σ n_p (μ_p − μ_0)/n,  M2 = Σ M2_p + Σ n_p (μ_p − μ)²

Tiles. All kernels address ``[T, N, C, S]`` tensors (S = the spatial dims merged, see
:func:`snnorm.kernels._common.as_ncs`) with a channel's elements of one step as an ``[N, S]``
grid, in one scheme with three tile shapes, the host-side sizes in :mod:`snnorm.kernels._common`:

* :func:`channel_tile` — a ``[BLOCK_N, BLOCK_S]`` tile of one channel (LIF, MPBN-LIF: one
  channel per program, the membrane in registers across steps); strided, so views are read in
  place, offsets int32 unless ``INDEX_64``;
* :func:`tile_offsets` — ``[BLOCK_N, BLOCK_C, BLOCK_S]`` tiles of a block of channels over a
  program's slice (:func:`program_slice`) of a strided tensor (the statistics pipeline,
  whose reductions run over channels' vectors);
* :func:`element_block` — BLOCK_M of one channel's N·S elements as a flat vector (the fused
  norm → LIF kernels, which keep ``[SEG, BLOCK_M]`` register tiles of a segment of steps),
  addressed in each tensor through its strides (:func:`element_offsets`, :func:`step_offset`).

Every tile and block is addressed through its tensor's strides with int64 offsets, so
channels-last inputs and transposed token-major views are read and written in place.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import device_vector

# --- named modes (compile-time constants; launchers pass ``NAME.value``) ---------------
#: firing variable of the elementwise kernel
FIRE_RAW = tl.constexpr(0)  # z = h − θ (plain LIF)
FIRE_NORMALISED = tl.constexpr(1)  # z = ĥ − θ (MPBN with running statistics)
FIRE_FOLDED = tl.constexpr(2)  # z = sign(γ)(h − θ') (BN folded into the threshold)

#: statistics of the batch-statistics kernels
STATS_TRAIN = tl.constexpr(0)  # batch norm with this step's batch statistics
STATS_FOLD_BATCH = tl.constexpr(1)  # folded threshold from this step's batch statistics
STATS_FOLD_RUNNING = tl.constexpr(2)  # folded threshold from running-adapted statistics

#: surrogate gradients (snnorm.surrogate)
SURROGATE_SIGMOID = tl.constexpr(0)
SURROGATE_ATAN = tl.constexpr(1)
SURROGATE_PIECEWISE_QUADRATIC = tl.constexpr(2)
SURROGATE_PIECEWISE_EXP = tl.constexpr(3)

#: ``SurrogateFunctionBase.kernel_name`` -> the kernels' constant
SURROGATES = {
    "sigmoid": SURROGATE_SIGMOID.value,
    "atan": SURROGATE_ATAN.value,
    "piecewise_quadratic": SURROGATE_PIECEWISE_QUADRATIC.value,
    "piecewise_exp": SURROGATE_PIECEWISE_EXP.value,
}


def lif_kernel_args(lif, backward: bool = False, acc=None, device=None) -> tuple[tuple, dict]:
    """A :class:`snnorm.params.LIFKernelParameters` as a kernel's arguments, unpacked in one place:
    the runtime scalars ``(tau, v_reset)`` (+ ``alpha`` backward), in the order every LIF kernel
    declares them, and the constexpr flags ``DECAY_INPUT``, ``SOFT_RESET`` (+ ``DETACH_RESET``,
    ``SURROGATE`` backward).

    With ``acc`` (the kernel's torch compute dtype) and ``device`` the scalars come as
    :func:`kernel_scalars` makes them (fp64 launches: one-element tensors a kernel reads with
    :func:`scalar_arg`); without, as Python floats (fp32 kernel arguments)."""
    scalars = (float(lif.tau), float(lif.v_reset))
    flags = dict(DECAY_INPUT=bool(lif.decay_input), SOFT_RESET=bool(lif.soft_reset))
    if backward:
        scalars += (float(lif.alpha),)
        flags.update(DETACH_RESET=bool(lif.detach_reset), SURROGATE=SURROGATES[lif.surrogate])
    if acc is not None:
        scalars = kernel_scalars(scalars, acc, device)
    return scalars, flags


def kernel_scalars(values, acc, device) -> tuple:
    """Runtime scalars (τ, v_reset, ε, momentum, α, …) as kernel arguments in the compute dtype.

    Triton passes a Python float as an fp32 argument: exact for fp32 kernels (torch rounds a
    Python scalar to an fp32 tensor's dtype too), but ~1e-8 off for fp64 ones (ε = 1e-5, τ = 3).
    So for ``acc`` = torch.float64 each value is a one-element float64 view of one vector
    built on ``device`` by fills (:func:`snnorm.kernels._common.device_vector`: no host-to-device
    copy, capturable in a CUDA graph), which the kernel reads with :func:`scalar_arg`."""
    values = tuple(float(v) for v in values)
    if acc != torch.float64:
        return values
    vec = device_vector(values, torch.float64, device)
    return tuple(vec[i : i + 1] for i in range(len(values)))


# --- IEEE-rounded arithmetic (every spike-deciding path) --------------------------------
#
# NVIDIA lowers an fp32 ``/`` to the approximate ``div.full.f32`` (≤ 2 ulp) and tl.sqrt to
# ``sqrt.approx.f32``; torch (CPU, and CUDA builds without fast math) rounds both correctly.
# A membrane within an ulp of θ would then fire on one and not the other, so every division
# and square root that a spike depends on goes through these (all but the surrogate
# gradient's; perf/tools/compile_check.py scans the kernels' PTX for approximate instructions). fp64 ``/`` and
# tl.sqrt already lower to ``div.rn.f64`` / ``sqrt.rn.f64`` (tl.div_rn / tl.sqrt_rn are fp32 only).


@triton.jit
def scalar_arg(value, ACC_DTYPE: tl.constexpr):
    """A runtime scalar argument in the compute dtype: a one-element tensor read here for fp64
    kernels (full precision, :func:`kernel_scalars`), a Python float (an fp32 argument) else."""
    if ACC_DTYPE == tl.float64:
        r = tl.load(value)
    else:
        r = tl.cast(value, ACC_DTYPE)
    return r


@triton.jit
def div_rn(num, den, DTYPE: tl.constexpr):
    """num / den correctly rounded, in DTYPE (fp32 or fp64: the operands' common type; an
    integer operand, a count, is converted to it)."""
    if DTYPE == tl.float64:
        q = num / den
    else:  # tl.div_rn takes fp32 tensors only
        q = tl.div_rn(tl.cast(num, tl.float32), tl.cast(den, tl.float32))
    return q


@triton.jit
def sqrt_rn(x, ACC_DTYPE: tl.constexpr):
    """Correctly rounded √x (fp32 tl.sqrt may lower to an approximation on a GPU)."""
    if ACC_DTYPE == tl.float64:
        r = tl.sqrt(x)  # fp64 sqrt is IEEE-rounded
    else:
        r = tl.sqrt_rn(x)
    return r


@triton.jit
def rstd_of(var, eps, ACC_DTYPE: tl.constexpr):
    """The one rstd rule of every kernel: rstd = 1/√(σ² + ε), correctly rounded (fp32 ``/``
    and tl.sqrt are approximate on GPUs; per channel, so the exact forms cost nothing)."""
    return div_rn(tl.full(var.shape, 1.0, ACC_DTYPE), sqrt_rn(var + eps, ACC_DTYPE), ACC_DTYPE)


# --- addressing --------------------------------------------------------------------------


@triton.jit
def channel_tile(pid, N, S, S_TILES, BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr, INDEX_64: tl.constexpr):
    """Rows ``n`` [BLOCK_N, 1], columns ``s`` [1, BLOCK_S] and mask of tile ``pid`` of a channel's [N, S]."""
    n = (pid // S_TILES) * BLOCK_N + tl.arange(0, BLOCK_N)
    s = (pid % S_TILES) * BLOCK_S + tl.arange(0, BLOCK_S)
    mask = (n < N)[:, None] & (s < S)[None, :]
    if INDEX_64:
        n = n.to(tl.int64)
        s = s.to(tl.int64)
    return n[:, None], s[None, :], mask


@triton.jit
def tile_and_channel(P, FLAT_GRID: tl.constexpr, INDEX_64: tl.constexpr):
    """(tile, channel) of this program on a grid of P tiles per channel × C channels.

    A ``(P, C)`` grid while C fits axis 1 (≤ 65,535: the common case, and the code the
    compile check has always seen); else FLAT_GRID, everything on axis 0 (≤ 2³¹ − 1
    programs; a flattened feature map passes 65,535 channels): program ``c·P + tile``,
    the same order. :func:`snnorm.kernels._common.tiles_grid` picks."""
    pid = tl.program_id(0)
    c = tl.program_id(1)
    if FLAT_GRID:
        c = pid // P
        pid = pid - c * P
    return pid, index(c, INDEX_64)


@triton.jit
def index(i, INDEX_64: tl.constexpr):
    """A scalar index (channel, step, program) in the offset type."""
    if INDEX_64:
        i = tl.cast(i, tl.int64)
    return i


@triton.jit
def tile_count(p, N, S, S_TILES, BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr):
    """Number of elements in tile(s) ``p`` (the Chan weights of their partial statistics)."""
    rows = tl.minimum(N - (p // S_TILES) * BLOCK_N, BLOCK_N)
    cols = tl.minimum(S - (p % S_TILES) * BLOCK_S, BLOCK_S)
    return rows * cols


@triton.jit
def load_membrane(
    v0_ptr, c, n, s, mask, stride_n, stride_c, stride_s,
    V0_SCALAR: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr, ACC_DTYPE: tl.constexpr,
):
    """The initial membrane of a tile; a state broadcast from one value (all strides 0, the
    neurons' default v = v_reset) is one scalar load, not a load per element."""
    if V0_SCALAR:
        v = tl.zeros([BLOCK_N, BLOCK_S], dtype=ACC_DTYPE) + tl.load(v0_ptr).to(ACC_DTYPE)
    else:
        v = tl.load(v0_ptr + c * stride_c + n * stride_n + s * stride_s, mask=mask, other=0.0).to(ACC_DTYPE)
    return v


# --- per-channel parameters --------------------------------------------------------------


@triton.jit
def load_affine(w_ptr, b_ptr, c, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, ACC_DTYPE: tl.constexpr):
    """γ, β of channel c (1 without a weight, 0 without a bias)."""
    if HAS_WEIGHT:
        gamma = tl.load(w_ptr + c).to(ACC_DTYPE)
    else:
        gamma = tl.full([], 1.0, ACC_DTYPE)
    if HAS_BIAS:
        beta = tl.load(b_ptr + c).to(ACC_DTYPE)
    else:
        beta = tl.full([], 0.0, ACC_DTYPE)
    return gamma, beta


@triton.jit
def load_channel(ptr, c, HAS: tl.constexpr, ACC_DTYPE: tl.constexpr):
    """``ptr[c]`` in the compute dtype, or 0 when the tensor is absent (a None pointer)."""
    if HAS:
        value = tl.load(ptr + c).to(ACC_DTYPE)
    else:
        value = tl.full([], 0.0, ACC_DTYPE)
    return value


@triton.jit
def load_fire_params(th_ptr, mu_ptr, r_ptr, beta_ptr, thf_ptr, sgn_ptr, c, NORM: tl.constexpr,
                     FOLDED: tl.constexpr, ACC_DTYPE: tl.constexpr):
    """Channel c's (θ, μ, r, β, θ′, sign) of the elementwise kernels; absent ones are 0."""
    th = tl.load(th_ptr + c).to(ACC_DTYPE)
    mu = load_channel(mu_ptr, c, NORM, ACC_DTYPE)
    r = load_channel(r_ptr, c, NORM, ACC_DTYPE)
    beta = load_channel(beta_ptr, c, NORM, ACC_DTYPE)
    thf = load_channel(thf_ptr, c, FOLDED, ACC_DTYPE)
    sgn = load_channel(sgn_ptr, c, FOLDED, ACC_DTYPE)
    return th, mu, r, beta, thf, sgn


# --- the neuron --------------------------------------------------------------------------


@triton.jit
def charge(v, x, tau, v_r, DECAY_INPUT: tl.constexpr):
    """h of one step, in v's dtype: the operation order of torch_backend.lif_charge and a
    correctly rounded division, so h is bit-equal to torch's in fp32 (on a GPU too)."""
    if DECAY_INPUT:
        h = v + div_rn(x - (v - v_r), tau, v.dtype)
    else:
        h = v - div_rn(v - v_r, tau, v.dtype) + x
    return h


@triton.jit
def charge_grads(tau, DECAY_INPUT: tl.constexpr):
    """(∂h/∂x, ∂h/∂v) of :func:`charge`: (1/τ or 1, 1 − 1/τ); ``tau`` a scalar in the compute dtype."""
    inv_tau = div_rn(tl.full([], 1.0, tau.dtype), tau, tau.dtype)
    dh_dx = tl.full([], 1.0, tau.dtype)
    if DECAY_INPUT:
        dh_dx = inv_tau
    return dh_dx, 1.0 - inv_tau


@triton.jit
def reset(u, spike, th, v_r, SOFT_RESET: tl.constexpr):
    if SOFT_RESET:
        v = tl.where(spike, u - th, u)
    else:
        v = tl.where(spike, v_r, u)
    return v


@triton.jit
def reset_bwd(gv, spike, u, th, v_r, SOFT_RESET: tl.constexpr, DETACH_RESET: tl.constexpr):
    """Gradients of v = reset(u, s) w.r.t. u and s (s's part is 0 with detach_reset), and −∂v/∂θ·gv."""
    if SOFT_RESET:
        gu = gv
        gs = -gv * th
        gth = tl.where(spike, -gv, 0.0)
    else:
        gu = tl.where(spike, 0.0, gv)
        gs = gv * (v_r - u)
        gth = gv * 0.0
    if DETACH_RESET:
        gs = gs * 0.0
    return gu, gs, gth


@triton.jit
def surrogate_grad(z, alpha, SURROGATE: tl.constexpr):
    """dΘ/dz of the surrogate (the formulas of snnorm.surrogate)."""
    # the one place a plain (on NVIDIA approximate) division is right: no spike depends on a
    # gradient, and div_rn here made the fused norm → LIF backward spill (4–8 B, SEG = 16,
    # sm_80); the compile check proves every other division of a spike kernel is rounded
    # correctly by compiling it with a division-free surrogate (perf/tools/compile_check.py)
    if SURROGATE == SURROGATE_SIGMOID:  # α·σ(αz)(1 − σ(αz))
        sg = 1.0 / (1.0 + tl.exp(-(z * alpha)))
        g = (1.0 - sg) * sg * alpha
    elif SURROGATE == SURROGATE_ATAN:  # (α/2)/(1 + (π/2·αz)²)
        w = 1.5707963267948966 * alpha * z
        g = (alpha * 0.5) / (1.0 + w * w)
    elif SURROGATE == SURROGATE_PIECEWISE_QUADRATIC:  # max(0, α − α²|z|)
        g = tl.maximum(alpha - alpha * alpha * tl.abs(z), 0.0)
    else:  # PIECEWISE_EXP: (α/2)·exp(−α|z|)
        g = alpha * 0.5 * tl.exp(-alpha * tl.abs(z))
    return g


# --- batch statistics ----------------------------------------------------------------------


@triton.jit
def combine_tile_partials(
    pmean_ptr, pm2_ptr, c, C, P, N, S, S_TILES,
    BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_P: tl.constexpr, ACC_DTYPE: tl.constexpr,
):
    """(mean, M2) of channel c from its P tiles' partial (mean, M2) rows ``[P, C]`` (the
    counts are the tiles' sizes, :func:`tile_count`): :func:`chan_chunk` on BLOCK_P partials
    at a time, :func:`chan_merge` between chunks, in one fixed order, so every program of
    the channel gets bit-identical statistics (deterministic), and BLOCK_P bounds the
    registers however large P grows."""
    count = tl.full([], 0.0, ACC_DTYPE)
    mean = tl.full([], 0.0, ACC_DTYPE)
    m2 = tl.full([], 0.0, ACC_DTYPE)
    for p0 in range(0, P, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        pmask = p < P
        counts = tl.where(pmask, tile_count(p, N, S, S_TILES, BLOCK_N, BLOCK_S), 0).to(ACC_DTYPE)
        pmean = tl.load(pmean_ptr + p * C + c, mask=pmask, other=0.0).to(ACC_DTYPE)
        pm2 = tl.load(pm2_ptr + p * C + c, mask=pmask, other=0.0).to(ACC_DTYPE)
        ref = tl.sum(tl.where(p == p0, pmean, 0.0), axis=0)  # the chunk's first mean, from registers
        count_b = tl.sum(counts, axis=0)
        mean_b, m2_b = chan_chunk(counts, count_b, pmean, pm2, ref, pmask)
        count, mean, m2 = chan_merge(count, mean, m2, count_b, mean_b, m2_b)
    return mean, m2


@triton.jit
def sum_partials(part_ptr, c, C, P, BLOCK_P: tl.constexpr, ACC_DTYPE: tl.constexpr):
    """Σ_p part[p, c] over the P rows ``[P, C]``, in chunks of BLOCK_P, in one fixed order."""
    total = tl.full([], 0.0, ACC_DTYPE)
    for p0 in range(0, P, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        total += tl.sum(tl.load(part_ptr + p * C + c, mask=p < P, other=0.0).to(ACC_DTYPE), axis=0)
    return total


@triton.jit
def tile_moments(h, mask, count):
    """Mean and M2 (Σ (h − mean)²) of the masked tile ``h`` of ``count`` elements (exact two-pass)."""
    mean = div_rn(tl.sum(tl.sum(h, axis=1), axis=0), count, h.dtype)
    d = tl.where(mask, h - mean, 0.0)
    return mean, tl.sum(tl.sum(d * d, axis=1), axis=0)


@triton.jit
def normalise_step(
    h, mean, m2, M, gamma, beta, th, eps, mu, s2, mt,
    STATS: tl.constexpr, CARRY_NORM: tl.constexpr, ACC_DTYPE: tl.constexpr,
):
    """From a step's statistics (mean, M2 over M elements) of h: the firing variable z, the
    carried u, rstd (training) and the adapted (μ, σ²) (folded modes)."""
    if STATS == STATS_TRAIN:
        rstd = rstd_of(div_rn(m2, M, ACC_DTYPE), eps, ACC_DTYPE)
        h_hat = (h - mean) * rstd * gamma + beta
        z = h_hat - th
        if CARRY_NORM:
            u = h_hat
        else:
            u = h
    else:
        var_u = div_rn(m2, M - 1, ACC_DTYPE)
        if STATS == STATS_FOLD_BATCH:
            mu = mean
            s2 = var_u
        else:
            mu = mu * (1.0 - mt) + mean * mt
            s2 = s2 * (1.0 - mt) + var_u * mt
        std = sqrt_rn(s2 + eps, ACC_DTYPE)
        th_fold = div_rn((th - beta) * std, gamma, ACC_DTYPE) + mu  # torch_backend.folded_threshold's order
        sgn = tl.where(gamma > 0, 1.0, tl.where(gamma < 0, -1.0, 0.0))
        z = sgn * (h - th_fold)
        if CARRY_NORM:
            u = div_rn(h - mu, std, ACC_DTYPE) * gamma + beta
        else:
            u = h
        rstd = div_rn(tl.full([], 1.0, ACC_DTYPE), std, ACC_DTYPE)
    return z, u, rstd, mu, s2


@triton.jit
def running_update(rm, rv, mean, m2, M, t, momentum, batches_tracked, USE_MOMENTUM: tl.constexpr):
    """torch's running-statistics update for step t (unbiased variance; cumulative without
    momentum), in rm's dtype (the counts too: exact in fp64 past 2²⁴ batches)."""
    one = tl.full([], 1.0, rm.dtype)
    if USE_MOMENTUM:
        f = momentum
    else:
        f = div_rn(one, (batches_tracked + t) + one, rm.dtype)
    rm = (1.0 - f) * rm + f * mean
    rv = (1.0 - f) * rv + f * div_rn(m2, M - one, rm.dtype)
    return rm, rv


@triton.jit
def bn_bwd_step(
    h, gs, gv, mask, mean, rstd, gamma, beta, th, v_r, alpha,
    SOFT_RESET: tl.constexpr, DETACH_RESET: tl.constexpr, CARRY_NORM: tl.constexpr, SURROGATE: tl.constexpr,
):
    """A training step's backward up to the BN reduction: x̂, ∂L/∂ĥ (gŷ), the raw-carry
    gradient ∂L/∂h that bypasses the BN, and −∂θ.

    The spike is recomputed from the saved h, μ_t, rstd_t with the forward's expression
    (bit-identical, so spikes need not be saved)."""
    xhat = (h - mean) * rstd
    h_hat = xhat * gamma + beta
    z = h_hat - th
    spike = z >= 0
    xhat = tl.where(mask, xhat, 0.0)
    if CARRY_NORM:
        u = h_hat
    else:
        u = h
    gu, gs_reset, gth = reset_bwd(gv, spike, u, th, v_r, SOFT_RESET, DETACH_RESET)
    gz = (gs + gs_reset) * surrogate_grad(z, alpha, SURROGATE)
    if CARRY_NORM:
        g_hat = gz + gu
        g_direct = gz * 0.0
    else:
        g_hat = gz
        g_direct = gu
    g_hat = tl.where(mask, g_hat, 0.0)
    gth = tl.where(mask, gth - gz, 0.0)
    return xhat, g_hat, g_direct, gth


@triton.jit
def tile_sum(a):
    """Σ over a 2-d tile (a scalar)."""
    return tl.sum(tl.sum(a, axis=1), axis=0)


# --- the statistics pipeline (bn_pipeline.py, norm_lif.py) -------------------------------

#: groupings: which steps' values a statistics row pools
GROUPING_ALL = tl.constexpr(0)  # one row over all T steps (BN multi-step, tdBN, TEBN)
GROUPING_EACH = tl.constexpr(1)  # a row per step (BNTT)
GROUPING_PREFIX = tl.constexpr(2)  # row t over steps 0..t (TAB)

#: per-step output scale s_t
SCALE_NONE = tl.constexpr(0)  # s_t = 1
SCALE_LINEAR = tl.constexpr(1)  # s_t = p_t (TEBN)
SCALE_SQUARE = tl.constexpr(2)  # s_t = p_t² (TAB)


@triton.jit
def program_slice(N, S, N_PER_PROG, S_PER_PROG, N_SPLITS):
    """The timestep and the (n, s) ranges of this program, and its partial index."""
    pid_tn = tl.program_id(1)
    pid_s = tl.program_id(2)
    t = pid_tn // N_SPLITS
    n_lo = (pid_tn % N_SPLITS) * N_PER_PROG
    n_hi = tl.minimum(n_lo + N_PER_PROG, N)
    s_lo = pid_s * S_PER_PROG
    s_hi = tl.minimum(s_lo + S_PER_PROG, S)
    part = pid_tn * tl.num_programs(2) + pid_s
    return t, n_lo, n_hi, s_lo, s_hi, part


@triton.jit
def tile_offsets(t, n0, s0, n_hi, s_hi, c, c_mask, st, sn, sc, ss, BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr):
    """int64 offsets and mask of the [BLOCK_N, BLOCK_C, BLOCK_S] tile at (t, n0, :, s0) of a
    ``[T, N, C, S]`` tensor with element strides (st, sn, sc, ss): contiguous, channels-last
    (sc = 1) and transposed token-major views (C innermost) alike, read and written in place.
    A stride of 1 is specialised by triton, so the unit-stride axis still vectorises."""
    n = n0 + tl.arange(0, BLOCK_N)
    s = s0 + tl.arange(0, BLOCK_S)
    base = t.to(tl.int64) * st
    offs = (
        base
        + (n.to(tl.int64) * sn)[:, None, None]
        + (c.to(tl.int64) * sc)[None, :, None]
        + (s.to(tl.int64) * ss)[None, None, :]
    )
    mask = (n < n_hi)[:, None, None] & c_mask[None, :, None] & (s < s_hi)[None, None, :]
    return offs, mask


@triton.jit
def element_block(N, S, BLOCK_M: tl.constexpr, INDEX_64: tl.constexpr):
    """Program (c, block)'s channel (as a one-element block), its elements' (n, s) indices
    (int64 with INDEX_64, else int32) and their mask; :func:`element_offsets` turns them into
    a tensor's offsets.

    Grid ``(C, B1, B2)`` (:func:`snnorm.kernels._common.block_grid`): the channel on axis 0
    (≤ 2³¹ − 1), the block of N·S split over axes 1 and 2 (each ≤ 65,535), block =
    ``pid1 + pid2·B1`` (:func:`block_index`); blocks past N·S (B1·B2 may overshoot) are masked."""
    c = tl.program_id(0)
    m = block_index() * BLOCK_M + tl.arange(0, BLOCK_M)
    mask = m < N * S
    n = m // S
    s = m - n * S
    cc = c + tl.arange(0, 1)
    if INDEX_64:
        n = n.to(tl.int64)
        s = s.to(tl.int64)
        cc = cc.to(tl.int64)
    return cc, n, s, mask


@triton.jit
def element_offsets(n, cc, s, sn, sc, ss):
    """Offsets of elements (n, c, s) in a ``[N, C, S]`` tensor (or one step of a ``[T, N, C, S]``
    one) with element strides (sn, sc, ss), in the type of n, s (:func:`element_block`: int64
    with INDEX_64, where some offset passes 2³¹); the step t adds ``t·st`` (:func:`step_offset`).
    Any layout whose spatial dims merge: contiguous, channels-last, transposed token-major
    views, expanded (stride-0) membranes and gradients."""
    return n * sn + cc * sc + s * ss


@triton.jit
def step_offset(t, st, INDEX_64: tl.constexpr):
    """Step t's offset ``t·st`` in a tensor whose step stride is ``st`` (int64 with INDEX_64)."""
    return index(t, INDEX_64) * st


@triton.jit
def block_index():
    """The block of a ``(C, B1, B2)`` grid's program: ``pid1 + pid2·B1``."""
    return tl.program_id(1) + tl.program_id(2) * tl.num_programs(1)


@triton.jit
def channel_consts(
    mean_ptr, var_ptr, w_ptr, b_ptr, offs, mask, eps,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, ACC_DTYPE: tl.constexpr,
):
    """μ, rstd = 1/√(σ² + ε) (:func:`rstd_of`), γ, β of a block of channels, in ACC_DTYPE.

    ``offs`` addresses the channels in all four tensors: ``c`` for ``[C]`` vectors,
    ``t·C + c`` for row t of ``[T, C]`` ones. ``w_ptr``/``b_ptr`` may be None without
    HAS_WEIGHT/HAS_BIAS (γ = 1, β = 0).
    """
    mean = tl.load(mean_ptr + offs, mask=mask, other=0.0).to(ACC_DTYPE)
    var = tl.load(var_ptr + offs, mask=mask, other=1.0).to(ACC_DTYPE)
    rstd = rstd_of(var, eps, ACC_DTYPE)
    if HAS_WEIGHT:
        gamma = tl.load(w_ptr + offs, mask=mask, other=0.0).to(ACC_DTYPE)
    else:
        gamma = tl.full(offs.shape, 1.0, ACC_DTYPE)
    if HAS_BIAS:
        beta = tl.load(b_ptr + offs, mask=mask, other=0.0).to(ACC_DTYPE)
    else:
        beta = tl.zeros(offs.shape, ACC_DTYPE)
    return mean, rstd, gamma, beta


@triton.jit
def step_scale(p_ptr, t, SCALE: tl.constexpr, ACC_DTYPE: tl.constexpr):
    """(s_t, ∂s_t/∂p_t) of step t: (1, 0), (p_t, 1) or (p_t², 2 p_t)."""
    if SCALE == SCALE_NONE:
        s = tl.full((), 1.0, ACC_DTYPE)
        ds = tl.zeros((), ACC_DTYPE)
    else:
        p_t = tl.load(p_ptr + t).to(ACC_DTYPE)
        if SCALE == SCALE_LINEAR:
            s = p_t
            ds = tl.full((), 1.0, ACC_DTYPE)
        else:
            s = p_t * p_t
            ds = 2.0 * p_t
    return s, ds


@triton.jit
def step_coefficients(
    t, c, c_mask, C, mean_ptr, var_ptr, w_ptr, b_ptr, p_ptr, eps,
    PER_STEP: tl.constexpr, SCALE: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
):
    """The pipeline's stage 3 for step t and a block of channels: (μ, r, a = s_t γ r, b = s_t β).

    μ, σ², γ, β are read at row t of ``[T, C]`` tensors when PER_STEP, else from ``[C]``.
    """
    if PER_STEP:
        offs = t * C + c
    else:
        offs = c
    mean, rstd, gamma, beta = channel_consts(
        mean_ptr, var_ptr, w_ptr, b_ptr, offs, c_mask, eps, HAS_WEIGHT, HAS_BIAS, ACC_DTYPE
    )
    s, ds = step_scale(p_ptr, t, SCALE, ACC_DTYPE)
    return mean, rstd, s * gamma * rstd, s * beta


@triton.jit
def chan_merge(count, mean, m2, count_b, mean_b, m2_b):
    """Chan et al.'s pairwise formula: the (count, mean, M2) of the union of two sets."""
    total = count + count_b
    delta = mean_b - mean
    # counts are whole numbers: max(total, 1) is total unless both sets are empty (a rank
    # with no batch in a synchronised reduce), where the union stays empty instead of 0/0
    frac = div_rn(count_b, tl.maximum(total, 1.0), mean.dtype)
    return total, mean + delta * frac, m2 + (m2_b + delta * delta * count * frac)


@triton.jit
def chan_chunk(n_p, count_b, mean_p, m2_p, ref, mask):
    """(mean, M2) of a chunk of partials (axis 0) with the multi-way formula, centred on ``ref``.

    ``n_p`` broadcasts against ``mean_p`` (``[BLOCK_P]`` for one channel's ``[BLOCK_P]``
    partials, ``[BLOCK_P, 1]`` for a block of channels' ``[BLOCK_P, BLOCK_C]``), 0 on masked
    lanes and for empty partials; ``count_b`` = Σ n_p; ``ref`` (a partial mean of the chunk,
    one per channel) is the reference shift: a plain Σ n_p μ_p would lose the digits of a
    small spread around a large mean. A chunk of empty partials gives (ref, 0).
    """
    dev = tl.where(mask, mean_p - ref, 0.0)
    shift = div_rn(tl.sum(n_p * dev, axis=0), tl.maximum(count_b, 1.0), mean_p.dtype)
    d = tl.where(mask, dev - shift, 0.0)  # μ_p − μ_b
    m2_b = tl.sum(m2_p, axis=0) + tl.sum(n_p * d * d, axis=0)
    return ref + shift, m2_b


@triton.jit
def combine_partials(
    part_mean_ptr,  # [P, C]
    part_m2_ptr,  # [P, C]
    part_count_ptr,  # [P]
    p_lo, p_hi, c, c_mask, C,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, ACC_DTYPE: tl.constexpr,
):
    """(count, mean, M2) of partials p_lo..p_hi − 1 of a block of channels, BLOCK_P at a time:
    :func:`chan_chunk` on a ``[BLOCK_P, BLOCK_C]`` tile, :func:`chan_merge` between chunks.
    Every sum has a fixed shape and order: deterministic. A partial may hold 0 elements (a
    rank with an empty batch, gathered by a synchronised reduce): it adds nothing.
    """
    count = tl.zeros((), ACC_DTYPE)
    mean = tl.zeros((BLOCK_C,), ACC_DTYPE)
    m2 = tl.zeros((BLOCK_C,), ACC_DTYPE)
    for p0 in range(p_lo, p_hi, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        p_mask = p < p_hi
        mask = p_mask[:, None] & c_mask[None, :]
        offs = p[:, None] * C + c[None, :]
        n_p = tl.load(part_count_ptr + p, mask=p_mask, other=0.0).to(ACC_DTYPE)
        mean_p = tl.load(part_mean_ptr + offs, mask=mask, other=0.0).to(ACC_DTYPE)
        m2_p = tl.load(part_m2_ptr + offs, mask=mask, other=0.0).to(ACC_DTYPE)
        count_b = tl.sum(n_p, axis=0)
        ref = tl.load(part_mean_ptr + p0 * C + c, mask=c_mask, other=0.0).to(ACC_DTYPE)
        mean_b, m2_b = chan_chunk(n_p[:, None], count_b, mean_p, m2_p, ref, mask)
        count, mean, m2 = chan_merge(count, mean, m2, count_b, mean_b, m2_b)
    return count, mean, m2
