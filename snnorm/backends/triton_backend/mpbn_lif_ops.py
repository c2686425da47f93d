r"""MPBN-LIF ops over ``kernels/mpbn_lif_train.py`` and the op-table ``mpbn_lif``, ``mpbn_lif_folded``.

* ``snnorm::mpbn_lif_train`` / ``_bwd``: MPBN-LIF with batch statistics, differentiable; the
  running statistics come back as new tensors (the op is functional);
* ``snnorm::mpbn_lif_adapt``: folded MPBN-LIF with test-time threshold modulation (Zhao et
  al., arXiv 2505.05375), per step t μ, σ² = batch statistics of h (adapt="batch") or
  μ ← (1 − m_t)μ + m_t·mean (adapt="running"), s = Θ(sign(γ)(h − θ')),
  θ' = μ + (θ − β)·√(σ² + ε)/γ; forward only.

Running statistics (eval) and the folded threshold without adaptation run on
``snnorm::lif_elementwise`` (:mod:`.lif_ops`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ...kernels import api as modes
from ...kernels import mpbn_lif_train as _mt
from ...kernels.api import acc_torch_dtype, check_device, device_vector, op_signature
from ...params import AdaptParameters, BNKernelParameters, BNStatistics, LIFKernelParameters, LIFParameters, MPBNParameters
from .. import torch_backend
from ..sync import StatsSync
from ._adaptors import (
    all_reduce, check_batch_size, combined_gather, group_name, kernel_lif, membrane, refuse_double_backward,
    register_refusal, result_dtype, threshold_tensor, wants_grad,
)
from .lif_ops import lif_elementwise_op

#: the process group whose ranks pool their batch statistics, by name (a ProcessGroup cannot
#: be an op argument; :meth:`StatsSync.from_name` resolves it inside); "" = this rank alone.
#: Required: the dispatcher would leave out a trailing argument equal to its default.
_SYNC_GROUP = "str group"

#: ``snnorm::mpbn_lif_train(x, v, weight, bias, running_mean, running_var, th, <BNKernelParameters>,
#: <LIFKernelParameters>, carry_norm, save, out_dtype, group)``
TRAIN_FWD = op_signature(
    "Tensor x, Tensor v, Tensor? weight, Tensor? bias, Tensor? running_mean, Tensor? running_var, Tensor th",
    BNKernelParameters, LIFKernelParameters, "bool carry_norm, bool save, ScalarType out_dtype", _SYNC_GROUP,
    returns="(Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
)
#: ``snnorm::mpbn_lif_train_bwd(gs, gv, h, gx_dtype, mean, rstd, weight, bias, th, <LIFKernelParameters>,
#: carry_norm, need_gv0, group)``
TRAIN_BWD = op_signature(
    "Tensor? gs, Tensor? gv, Tensor h, ScalarType gx_dtype, Tensor mean, Tensor rstd, Tensor? weight, Tensor? bias, "
    "Tensor th", LIFKernelParameters, "bool carry_norm, bool need_gv0", _SYNC_GROUP,
    returns="(Tensor, Tensor, Tensor, Tensor, Tensor)",
)
#: ``snnorm::mpbn_lif_adapt(x, v, mu, sigma2, gamma, beta, th, mom, running, eps, <LIFKernelParameters>,
#: carry_norm, out_dtype)``; the LIF bundle's detach_reset, surrogate and α are unused (forward only)
ADAPT_FWD = op_signature(
    "Tensor x, Tensor v, Tensor mu, Tensor sigma2, Tensor gamma, Tensor beta, Tensor th, Tensor mom, bool running, "
    "float eps", LIFKernelParameters, "bool carry_norm, ScalarType out_dtype",
    returns="(Tensor, Tensor, Tensor, Tensor)",
)


@torch.library.custom_op("snnorm::mpbn_lif_train", mutates_args=(), schema=TRAIN_FWD.schema)
def mpbn_lif_train_op(x, v, weight, bias, running_mean, running_var, th, *args):
    """MPBN-LIF with batch statistics: (spikes, v_T, saved h, mean [T, C], rstd [T, C],
    updated running mean, updated running var). Arguments: see ``TRAIN_FWD``.

    Functional (autograd needs that): the running statistics come back as new tensors
    (empty when None) and the op-table adaptor copies them into the buffers. With a
    ``group`` the statistics of every step pool the batches of the group's ranks (one
    all-gather per step between the pipelined launches; mean and rstd are the global ones).
    """
    bn, args = BNKernelParameters.from_op_args(args)
    lif, (carry_norm, save, out_dtype, group) = LIFKernelParameters.from_op_args(args)
    acc = acc_torch_dtype(out_dtype)
    rm_new = running_mean.to(acc, copy=True) if running_mean is not None else None
    rv_new = running_var.to(acc, copy=True) if running_var is not None else None
    sync_stats, steps = combined_gather(group), []
    if sync_stats is not None and x[0, :, 0].numel() == 0:  # an empty rank: no program updates the running
        exchange = sync_stats  # statistics, so the group's statistics of each step are kept for it here
        sync_stats = lambda *partials: steps.append(exchange(*partials)) or steps[-1]  # noqa: E731
    s, v_out, h, mean, rstd, _, _ = _mt.launch_batch_stats_fwd(
        x, v, weight, bias, rm_new, rv_new, th, None, None, None, out_dtype,
        lif=lif, bn=bn, stats=modes.STATS_TRAIN.value, carry_norm=carry_norm, save=save,
        sync_stats=sync_stats,
    )
    for t, (n, mu, m2) in enumerate(steps if rm_new is not None else ()):
        # the kernels' update (_device.running_update), with its factor f and 1 − f in the compute
        # dtype as there (momentum reaches fp64 kernels in fp64: _device.kernel_scalars)
        cumulative = bn.momentum is None  # f = 1/(batches_tracked + t + 1)
        f = torch.full((), bn.batches_tracked + t + 1.0 if cumulative else bn.momentum, dtype=acc, device=x.device)
        f = 1.0 / f if cumulative else f
        keep = 1.0 - f
        rm_new.mul_(keep).add_(f * mu.reshape(-1).to(acc))
        rv_new.mul_(keep).add_(f * (m2.reshape(-1).to(acc) / (n.reshape(()).to(acc) - 1)))
    if rm_new is None:  # distinct empty outputs: custom-op outputs must not alias
        rm_new, rv_new = x.new_empty((0,), dtype=acc), x.new_empty((0,), dtype=acc)
    return s, v_out, h, mean, rstd, rm_new, rv_new


@mpbn_lif_train_op.register_fake
def _(x, v, weight, bias, running_mean, running_var, th, *args):
    _, args = BNKernelParameters.from_op_args(args)
    _, (carry_norm, save, out_dtype, _) = LIFKernelParameters.from_op_args(args)
    acc = acc_torch_dtype(out_dtype)
    T, C = x.shape[0], x.shape[2]
    return (
        x.new_empty(x.shape, dtype=out_dtype), x.new_empty(x.shape[1:], dtype=out_dtype),
        x.new_empty(x.shape if save else (0,), dtype=acc),
        x.new_empty((T, C) if save else (0,), dtype=acc), x.new_empty((T, C) if save else (0,), dtype=acc),
        x.new_empty((0,) if running_mean is None else running_mean.shape, dtype=acc),
        x.new_empty((0,) if running_var is None else running_var.shape, dtype=acc),
    )


@torch.library.custom_op("snnorm::mpbn_lif_train_bwd", mutates_args=(), schema=TRAIN_BWD.schema)
def mpbn_lif_train_bwd_op(gs, gv, h, gx_dtype, mean, rstd, weight, bias, th, *args):
    """(∂x, ∂v0 (empty unless need_gv0), ∂γ, ∂β, ∂θ) of MPBN-LIF training; gs / gv None read as zeros.
    With a ``group``, ∂x and ∂v0 take the per-step sums of every rank (one all-reduce per step);
    ∂γ, ∂β, ∂θ stay this rank's."""
    lif, (carry_norm, need_gv0, group) = LIFKernelParameters.from_op_args(args)
    return _mt.launch_train_bwd(
        gs, gv, h, gx_dtype, mean, rstd, weight, bias, th, lif=lif, carry_norm=carry_norm, need_gv0=need_gv0,
        sync_sums=all_reduce(group),
    )


@mpbn_lif_train_bwd_op.register_fake
def _(gs, gv, h, gx_dtype, mean, rstd, weight, bias, th, *args):
    _, (carry_norm, need_gv0, _) = LIFKernelParameters.from_op_args(args)
    C = h.shape[2]
    return (
        h.new_empty(h.shape, dtype=gx_dtype), h.new_empty(h.shape[1:] if need_gv0 else (0,)),
        h.new_empty((C,)), h.new_empty((C,)), h.new_empty((C,)),
    )


def _train_setup(ctx, inputs, output):
    x, v, weight, bias, rm, rv, th, *args = inputs
    _, args = BNKernelParameters.from_op_args(args)
    lif, (carry_norm, save, _, group) = LIFKernelParameters.from_op_args(args)
    _, _, h, mean, rstd, _, _ = output
    ctx.set_materialize_grads(False)  # an unused output's gradient stays None: no zeros tensor to read
    ctx.missing_h = not save
    if save:
        ctx.save_for_backward(h, mean, rstd, weight, bias, th)
    ctx.cfg = (*lif.to_op_args(), carry_norm)
    ctx.group = group
    ctx.dtypes = (x.dtype, v.dtype)


def _train_backward(ctx, gs, gv, gh, gmean, grstd, grm, grv):
    if ctx.missing_h:
        raise RuntimeError("snnorm::mpbn_lif_train was called with save=False (no gradient was expected) but a backward pass was requested")
    h, mean, rstd, weight, bias, th = ctx.saved_tensors
    need_gv0 = ctx.needs_input_grad[1]  # a broadcast initial state (the default) needs none: not written
    gx, gv0, gw, gb, gth = mpbn_lif_train_bwd_op(
        gs, gv, h, ctx.dtypes[0], mean, rstd, weight, bias, th, *ctx.cfg, need_gv0, ctx.group,
    )
    return TRAIN_FWD.grads(
        gx.to(ctx.dtypes[0]), gv0.to(ctx.dtypes[1]) if need_gv0 else None,
        None if weight is None else gw.to(weight.dtype), None if bias is None else gb.to(bias.dtype),
        None, None, gth.to(th.dtype),
    )


mpbn_lif_train_op.register_autograd(_train_backward, setup_context=_train_setup)
refuse_double_backward(mpbn_lif_train_bwd_op, "mpbn_lif")


@torch.library.custom_op("snnorm::mpbn_lif_adapt", mutates_args=(), schema=ADAPT_FWD.schema)
def mpbn_lif_adapt_op(x, v, mu, sigma2, gamma, beta, th, mom, running, eps, *args):
    """(spikes, v_T, μ_T, σ²_T). Forward only. Arguments: see ``ADAPT_FWD``."""
    lif, (carry_norm, out_dtype) = LIFKernelParameters.from_op_args(args)
    stats = modes.STATS_FOLD_RUNNING if running else modes.STATS_FOLD_BATCH
    s, v_out, _, _, _, mu_out, s2_out = _mt.launch_batch_stats_fwd(
        x, v, gamma, beta, None, None, th, mu, sigma2, mom, out_dtype,
        lif=lif, bn=BNKernelParameters(float(eps), None, 0), stats=stats.value, carry_norm=carry_norm, save=False,
    )
    return s, v_out, mu_out, s2_out


@mpbn_lif_adapt_op.register_fake
def _(x, v, mu, sigma2, gamma, beta, th, mom, running, eps, *args):
    _, (carry_norm, out_dtype) = LIFKernelParameters.from_op_args(args)
    C = x.shape[2]
    acc = acc_torch_dtype(out_dtype)
    return (
        x.new_empty(x.shape, dtype=out_dtype), x.new_empty(x.shape[1:], dtype=out_dtype),
        x.new_empty((C,), dtype=acc), x.new_empty((C,), dtype=acc),
    )


register_refusal(
    mpbn_lif_adapt_op,
    "snnorm triton mpbn_lif_folded: backward through test-time threshold adaptation (adapt='batch'/'running') "
    "is not implemented; use the torch backend, or adapt='none', to differentiate through a folded MPBN-LIF",
)


def mpbn_lif(
    x_seq: Tensor,
    v: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    threshold,
    neuron: LIFParameters,
    norm: MPBNParameters,
    stats: BNStatistics,
    *,
    sync: StatsSync | None = None,
) -> tuple[Tensor, Tensor]:
    """MPBN-LIF (see :func:`snnorm.backends.torch_backend.mpbn_lif`), fused.

    Batch statistics (training, or no running statistics): ``snnorm::mpbn_lif_train``, whose
    updated running statistics are copied back into the buffers here; with ``sync`` the op
    gets its group's name and pools every rank's batch at each step (the pipelined kernels,
    one all-gather per step forward and one all-reduce per step backward). Running
    statistics (eval, never synchronised): the elementwise kernel with
    ĥ = (h − μ)·γ/√(σ² + ε) + β.
    """
    check_device("mpbn_lif", x_seq, v, weight, bias, running_mean, running_var, threshold)
    lif_k = kernel_lif(neuron, "mpbn_lif")
    if lif_k is None:
        return torch_backend.mpbn_lif(
            x_seq, v, weight, bias, running_mean, running_var, threshold, neuron, norm, stats, sync=sync,
        )
    v = membrane(x_seq, v, "mpbn_lif")
    th = threshold_tensor(threshold, x_seq)
    carry_norm = norm.carry == "normalized"
    if stats.training or running_mean is None:
        if sync is None:  # synchronised, the count that matters is every rank's (as the torch backend)
            check_batch_size(x_seq)
        if weight is None and bias is not None:
            weight = torch.ones_like(bias)
        if bias is None and weight is not None:
            bias = torch.zeros_like(weight)
        track = stats.training and running_mean is not None
        momentum = None if stats.momentum is None else float(stats.momentum)
        bn_k = BNKernelParameters(float(norm.eps), momentum, int(stats.batches_tracked))
        s, v_out, _, _, _, rm_new, rv_new = mpbn_lif_train_op(
            x_seq, v, weight, bias, running_mean if track else None, running_var if track else None, th,
            *bn_k.to_op_args(), *lif_k.to_op_args(), carry_norm,
            wants_grad(x_seq, v, weight, bias, th), result_dtype(x_seq, v, threshold), group_name(sync),
        )
        if track:  # the op is functional; the buffers move here, as F.batch_norm moves them in place
            with torch.no_grad():
                running_mean.copy_(rm_new)
                running_var.copy_(rv_new)
        return s, v_out
    # eval with running statistics: per-channel constants (differentiable in γ, β, θ)
    r = 1.0 / torch.sqrt(running_var + norm.eps)
    if weight is not None:
        r = weight * r
    beta = bias if bias is not None else torch.zeros_like(r)
    s, v_out, _ = lif_elementwise_op(
        x_seq, v, th, running_mean, r, beta, None, None, *lif_k.to_op_args(), modes.FIRE_NORMALISED.value,
        carry_norm, wants_grad(x_seq, v, th, r, beta), result_dtype(x_seq, v, threshold),
    )
    return s, v_out


def _adapt_momenta(adapt: AdaptParameters, T: int) -> tuple[list[float], float]:
    """The momentum of each of T steps and the one after them: m ← max(m·decay, min_momentum) per step."""
    moms, m = [], adapt.momentum
    for _ in range(T):
        moms.append(m)
        m = max(m * adapt.decay, adapt.min_momentum)
    return moms, m


def mpbn_lif_folded(
    x_seq: Tensor,
    v: Tensor,
    mu: Tensor,
    sigma2: Tensor,
    gamma: Tensor,
    beta: Tensor,
    threshold,
    neuron: LIFParameters,
    norm: MPBNParameters,
    adapt: AdaptParameters,
) -> tuple[Tensor, Tensor, Tensor, Tensor, float]:
    """Folded MPBN-LIF (see :func:`snnorm.backends.torch_backend.mpbn_lif_folded`), fused.

    adapt.mode == "none": the elementwise kernel (FIRE_FOLDED), differentiable.
    "batch"/"running": ``snnorm::mpbn_lif_adapt``, per-step statistics, forward only
    (backward raises NotImplementedError).
    """
    check_device("mpbn_lif_folded", x_seq, v, mu, sigma2, gamma, beta, threshold)
    lif_k = kernel_lif(neuron, "mpbn_lif_folded")
    if lif_k is None:
        return torch_backend.mpbn_lif_folded(x_seq, v, mu, sigma2, gamma, beta, threshold, neuron, norm, adapt)
    v = membrane(x_seq, v, "mpbn_lif_folded")
    th = threshold_tensor(threshold, x_seq)
    carry_norm = norm.carry == "normalized"
    if adapt.mode != "none" and x_seq[0, :, 0].numel() > 1:
        running = adapt.mode == "running"
        moms, m = _adapt_momenta(adapt, x_seq.shape[0])
        mom = device_vector(moms, torch.float64, x_seq.device)  # fills: no host-to-device copy
        s, v_out, mu_t, s2_t = mpbn_lif_adapt_op(
            x_seq, v, mu, sigma2, gamma, beta, th, mom, running, float(norm.eps), *lif_k.to_op_args(), carry_norm,
            result_dtype(x_seq, v, threshold, mu, sigma2, gamma, beta),
        )
        stat_dtype = torch.promote_types(mu.dtype, x_seq.dtype) if running else x_seq.dtype
        return s, v_out, mu_t.to(stat_dtype), s2_t.to(stat_dtype), (m if running else adapt.momentum)
    std = torch.sqrt(sigma2 + norm.eps)
    thf = torch_backend.folded_threshold(threshold, mu, std, gamma, beta)
    sgn = torch.sign(gamma)
    r = gamma / std if carry_norm else None
    s, v_out, _ = lif_elementwise_op(
        x_seq, v, th, mu if carry_norm else None, r, beta if carry_norm else None, thf, sgn, *lif_k.to_op_args(),
        modes.FIRE_FOLDED.value, carry_norm, wants_grad(x_seq, v, th, thf, r, beta, mu),
        result_dtype(x_seq, v, threshold, thf),
    )
    return s, v_out, mu, sigma2, adapt.momentum
