r"""Device functions shared by every LIF / MPBN-LIF kernel (``lif.py``, ``mpbn_lif_train.py``).

The neuron, per channel c and step t (v_r = v_reset, or 0 for soft reset)::

    charge     h = v + (x − (v − v_r))/τ   (decay_input)  |  h = v − (v − v_r)/τ + x
    normalise  ĥ = γ (h − μ)·rstd + β,  rstd = 1/√(σ² + ε)
    fire       s = Θ(z),  z = h − θ (FIRE_RAW) | ĥ − θ (FIRE_NORMALISED) | sign(γ)(h − θ') (FIRE_FOLDED)
    reset      v = s·v_r + (1 − s)·u (hard) | u − s·θ (soft),  u = ĥ (CARRY_NORM) | h

Addressing: a channel's elements of one step are an ``[N, S]`` grid (S = the spatial dims
merged into one, see :func:`snnorm.kernels._common.as_ncs`). A program owns a
``[BLOCK_N, BLOCK_S]`` tile of it (:func:`channel_tile`); the element at (n, s) of
channel c sits at ``c·stride_c + n·stride_n + s·stride_s``, so there is no per-element
division, and a unit ``stride_s`` (specialised by the JIT) lets loads vectorise.
``INDEX_64`` (chosen by the launcher when a tensor spans 2³¹ elements) makes the offsets
int64; otherwise they stay int32.
"""

from __future__ import annotations

import triton
import triton.language as tl

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


def lif_kernel_args(lif, backward: bool = False) -> tuple[tuple, dict]:
    """A :class:`snnorm.params.LIFKernelParameters` as a kernel's arguments, unpacked in one place:
    the runtime scalars ``(tau, v_reset)`` (+ ``alpha`` backward), in the order every LIF kernel
    declares them, and the constexpr flags ``DECAY_INPUT``, ``SOFT_RESET`` (+ ``DETACH_RESET``,
    ``SURROGATE`` backward)."""
    scalars = (float(lif.tau), float(lif.v_reset))
    flags = dict(DECAY_INPUT=bool(lif.decay_input), SOFT_RESET=bool(lif.soft_reset))
    if backward:
        scalars += (float(lif.alpha),)
        flags.update(DETACH_RESET=bool(lif.detach_reset), SURROGATE=SURROGATES[lif.surrogate])
    return scalars, flags


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
    V0_SCALAR: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr, ACC: tl.constexpr,
):
    """The initial membrane of a tile; a state broadcast from one value (all strides 0, the
    neurons' default v = v_reset) is one scalar load, not a load per element."""
    if V0_SCALAR:
        v = tl.zeros([BLOCK_N, BLOCK_S], dtype=ACC) + tl.load(v0_ptr).to(ACC)
    else:
        v = tl.load(v0_ptr + c * stride_c + n * stride_n + s * stride_s, mask=mask, other=0.0).to(ACC)
    return v


# --- per-channel parameters --------------------------------------------------------------


@triton.jit
def load_affine(w_ptr, b_ptr, c, HAS_AFFINE: tl.constexpr, ACC: tl.constexpr):
    """γ, β of channel c (1, 0 without affine parameters)."""
    if HAS_AFFINE:
        gamma = tl.load(w_ptr + c).to(ACC)
        beta = tl.load(b_ptr + c).to(ACC)
    else:
        gamma = tl.full([], 1.0, ACC)
        beta = tl.full([], 0.0, ACC)
    return gamma, beta


@triton.jit
def load_channel(ptr, c, HAS: tl.constexpr, ACC: tl.constexpr):
    """``ptr[c]`` in the compute dtype, or 0 when the tensor is absent (a None pointer)."""
    if HAS:
        value = tl.load(ptr + c).to(ACC)
    else:
        value = tl.full([], 0.0, ACC)
    return value


@triton.jit
def load_fire_params(th_ptr, mu_ptr, r_ptr, beta_ptr, thf_ptr, sgn_ptr, c, NORM: tl.constexpr,
                     FOLDED: tl.constexpr, ACC: tl.constexpr):
    """Channel c's (θ, μ, r, β, θ′, sign) of the elementwise kernels; absent ones are 0."""
    th = tl.load(th_ptr + c).to(ACC)
    mu = load_channel(mu_ptr, c, NORM, ACC)
    r = load_channel(r_ptr, c, NORM, ACC)
    beta = load_channel(beta_ptr, c, NORM, ACC)
    thf = load_channel(thf_ptr, c, FOLDED, ACC)
    sgn = load_channel(sgn_ptr, c, FOLDED, ACC)
    return th, mu, r, beta, thf, sgn


# --- the neuron --------------------------------------------------------------------------


@triton.jit
def charge(v, x, tau, v_r, DECAY_INPUT: tl.constexpr):
    # same operation order as torch_backend.lif_charge (bit-equal in fp32)
    if DECAY_INPUT:
        h = v + (x - (v - v_r)) / tau
    else:
        h = v - (v - v_r) / tau + x
    return h


@triton.jit
def charge_grads(tau, DECAY_INPUT: tl.constexpr):
    """(∂h/∂x, ∂h/∂v) of :func:`charge`: (1/τ or 1, 1 − 1/τ)."""
    dh_dx = 1.0
    if DECAY_INPUT:
        dh_dx = 1.0 / tau
    return dh_dx, 1.0 - 1.0 / tau


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


@triton.jit
def sqrt_rn(x, ACC: tl.constexpr):
    # correctly rounded square root (tl.sqrt may lower to an approximation for fp32)
    if ACC == tl.float64:
        r = tl.sqrt(x)
    else:
        r = tl.sqrt_rn(x)
    return r


# --- batch statistics ----------------------------------------------------------------------


@triton.jit
def combine_partials(
    pmean_ptr, pm2_ptr, c, C, P, N, S, S_TILES,
    BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_P: tl.constexpr, ACC: tl.constexpr,
):
    """(mean, M2) of a channel from its P tiles' partial (mean, M2) rows ``[P, C]``.

    Chunks of BLOCK_P partials combine with the multi-way Chan formula
    M2 = Σ M2_p + Σ n_p (μ_p − μ)², chunks one after another with the pairwise one, in
    one fixed order: every program of the channel gets bit-identical statistics
    (deterministic), and BLOCK_P bounds the registers however large P grows."""
    count = tl.full([], 0.0, ACC)
    mean = tl.full([], 0.0, ACC)
    m2 = tl.full([], 0.0, ACC)
    for p0 in range(0, P, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        pmask = p < P
        counts = tl.where(pmask, tile_count(p, N, S, S_TILES, BLOCK_N, BLOCK_S), 0).to(ACC)
        pmean = tl.load(pmean_ptr + p * C + c, mask=pmask, other=0.0).to(ACC)
        pm2 = tl.load(pm2_ptr + p * C + c, mask=pmask, other=0.0).to(ACC)
        n_chunk = tl.sum(counts, axis=0)
        mean_chunk = tl.sum(counts * pmean, axis=0) / n_chunk
        dm = tl.where(pmask, pmean - mean_chunk, 0.0)
        m2_chunk = tl.sum(pm2, axis=0) + tl.sum(counts * dm * dm, axis=0)
        n_new = count + n_chunk
        delta = mean_chunk - mean
        mean = mean + delta * (n_chunk / n_new)
        m2 = m2 + m2_chunk + delta * delta * (count * n_chunk / n_new)
        count = n_new
    return mean, m2


@triton.jit
def sum_partials(part_ptr, c, C, P, BLOCK_P: tl.constexpr, ACC: tl.constexpr):
    """Σ_p part[p, c] over the P rows ``[P, C]``, in chunks of BLOCK_P, in one fixed order."""
    total = tl.full([], 0.0, ACC)
    for p0 in range(0, P, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        total += tl.sum(tl.load(part_ptr + p * C + c, mask=p < P, other=0.0).to(ACC), axis=0)
    return total


@triton.jit
def tile_moments(h, mask, count):
    """Mean and M2 (Σ (h − mean)²) of the masked tile ``h`` of ``count`` elements (exact two-pass)."""
    mean = tl.sum(tl.sum(h, axis=1), axis=0) / count
    d = tl.where(mask, h - mean, 0.0)
    return mean, tl.sum(tl.sum(d * d, axis=1), axis=0)


@triton.jit
def normalise_step(
    h, mean, m2, M, gamma, beta, th, eps, mu, s2, mt,
    STATS: tl.constexpr, CARRY_NORM: tl.constexpr, ACC: tl.constexpr,
):
    """From a step's statistics (mean, M2 over M elements) of h: the firing variable z, the
    carried u, rstd (training) and the adapted (μ, σ²) (folded modes)."""
    if STATS == STATS_TRAIN:
        rstd = 1.0 / sqrt_rn(m2 / M + eps, ACC)
        h_hat = (h - mean) * rstd * gamma + beta
        z = h_hat - th
        if CARRY_NORM:
            u = h_hat
        else:
            u = h
    else:
        var_u = m2 / (M - 1)
        if STATS == STATS_FOLD_BATCH:
            mu = mean
            s2 = var_u
        else:
            mu = mu * (1.0 - mt) + mean * mt
            s2 = s2 * (1.0 - mt) + var_u * mt
        std = sqrt_rn(s2 + eps, ACC)
        th_fold = (th - beta) * std / gamma + mu
        sgn = tl.where(gamma > 0, 1.0, tl.where(gamma < 0, -1.0, 0.0))
        z = sgn * (h - th_fold)
        if CARRY_NORM:
            u = (h - mu) / std * gamma + beta
        else:
            u = h
        rstd = 1.0 / std
    return z, u, rstd, mu, s2


@triton.jit
def running_update(rm, rv, mean, m2, M, t, momentum, batches_tracked, USE_MOMENTUM: tl.constexpr):
    """torch's running-statistics update for step t (unbiased variance; cumulative without momentum)."""
    if USE_MOMENTUM:
        f = momentum
    else:
        f = 1.0 / (batches_tracked + t + 1.0)
    rm = (1.0 - f) * rm + f * mean
    rv = (1.0 - f) * rv + f * (m2 / (M - 1))
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
