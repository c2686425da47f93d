r"""A batch-statistics norm fused with an IF/LIF neuron, over ``kernels/norm_lif.py``.

The pipeline's apply stage charges, fires and resets: per step t,
h = charge(v, s_t·(γ (x[t] − μ)/√(σ² + ε) + β)), s = Θ(h − θ), v = reset(h, s).
The statistics come from ``snnorm::bn_stats`` (:mod:`.bn_pipeline`; it mutates the running
statistics, so it cannot carry autograd); ``snnorm::norm_lif`` is functional and
differentiable: with ``batch_stats`` its backward includes the path through x's own statistics.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ...kernels import bn_pipeline as _bnp
from ...kernels import norm_lif as _nl
from ...kernels.api import acc_torch_dtype, check_device, op_signature
from ...params import LIFKernelParameters, LIFParameters
from ..sync import StatsSync
from ._adaptors import all_reduce, check_sequence_arg, group_name, kernel_lif, refuse_double_backward, wants_grad
from .bn_pipeline_ops import bn_stats_op

#: ``snnorm::norm_lif(x, v0, γ, β, p, μ, σ², rule, eps, batch_stats, threshold, v_init,
#: <LIFKernelParameters>, checkpoint, group) -> (s, v_T, checkpoints)``; ``group`` (the
#: synchronising process group's name, "" = local) reaches only the backward
NORM_LIF_FWD = op_signature(
    "Tensor x, Tensor? v0, Tensor? weight, Tensor? bias, Tensor? p, Tensor mean, Tensor var, str rule, "
    "float eps, bool batch_stats, float threshold, float v_init", LIFKernelParameters,
    'bool checkpoint, str group', returns="(Tensor, Tensor, Tensor)",
)
#: ``snnorm::norm_lif_backward(∂s, ∂v_T, x, v0, checkpoints, γ, β, p, μ, σ², rule, eps, batch_stats,
#: threshold, v_init, <LIFKernelParameters>, need_dx, need_dv0, group) -> (∂x, ∂v0, ∂γ, ∂β, ∂p)``;
#: with ``group`` ∂x's statistics terms use every rank's gradient sums (one all-reduce)
NORM_LIF_BWD = op_signature(
    "Tensor? grad_s, Tensor? grad_v, Tensor x, Tensor? v0, Tensor ckpt, Tensor? weight, Tensor? bias, "
    "Tensor? p, Tensor mean, Tensor var, str rule, float eps, bool batch_stats, float threshold, float v_init",
    LIFKernelParameters, 'bool need_dx, bool need_dv0, str group',
    returns="(Tensor, Tensor, Tensor, Tensor, Tensor)",
)


@torch.library.custom_op("snnorm::norm_lif", mutates_args=(), schema=NORM_LIF_FWD.schema)
def norm_lif_op(x, v0, weight, bias, p, mean, var, rule, eps, batch_stats, threshold, v_init, *args):
    """(spikes, v_T, membrane checkpoints for the backward). Arguments: see ``NORM_LIF_FWD``."""
    lif, (checkpoint, _group) = LIFKernelParameters.from_op_args(args)
    check_device("norm_lif", x, v0, weight, bias, p, mean, var)
    return _nl.launch_norm_lif_forward(
        _bnp.rule(rule), x, v0, weight, bias, p, mean, var, eps, threshold, v_init, lif, checkpoint
    )


@norm_lif_op.register_fake
def _(x, v0, weight, bias, p, mean, var, rule, eps, batch_stats, threshold, v_init, *args):
    _, (checkpoint, _group) = LIFKernelParameters.from_op_args(args)
    T = x.shape[0]
    dtype = _bnp.out_dtype(x, p)
    n_ckpt = (-(-T // _nl.segment_length(T)) - 1) if checkpoint else 0
    # the real launcher's allocators: the same strides (x's memory format)
    return (
        _bnp.output_like(x, dtype), _nl.membrane_like(x, dtype),
        _nl.checkpoint_buffer(x, n_ckpt, acc_torch_dtype(x.dtype)),
    )


@torch.library.custom_op("snnorm::norm_lif_backward", mutates_args=(), schema=NORM_LIF_BWD.schema)
def norm_lif_backward_op(grad_s, grad_v, x, v0, ckpt, weight, bias, p, mean, var, rule, eps, batch_stats,
                         threshold, v_init, *args):
    """(∂x, ∂v0, ∂γ, ∂β, ∂p); ∂x, ∂v0 empty unless asked for. Arguments: see ``NORM_LIF_BWD``."""
    lif, (need_dx, need_dv0, group) = LIFKernelParameters.from_op_args(args)
    dx, dv0, dw, db, dp = _nl.launch_norm_lif_backward(
        _bnp.rule(rule), grad_s, grad_v, x, v0, ckpt, weight, bias, p, mean, var, eps, batch_stats, threshold,
        v_init, lif, need_dx, need_dv0, all_reduce(group),
    )
    return dx, dv0 if dv0 is not None else x.new_empty(0), dw, db, dp  # custom ops return no None


@norm_lif_backward_op.register_fake
def _(grad_s, grad_v, x, v0, ckpt, weight, bias, p, mean, var, rule, eps, batch_stats, threshold, v_init, *args):
    _, (need_dx, need_dv0, _group) = LIFKernelParameters.from_op_args(args)
    acc = acc_torch_dtype(x.dtype)
    shape = _bnp.stats_shape(_bnp.rule(rule), x.shape[0], x.shape[2])
    dx = _bnp.output_like(x) if need_dx else x.new_empty(0)
    dv0 = _nl.membrane_like(x, v0.dtype if v0 is not None else x.dtype) if need_dv0 else x.new_empty(0)
    return dx, dv0, x.new_empty(shape, dtype=acc), x.new_empty(shape, dtype=acc), x.new_empty(x.shape[0], dtype=acc)


def _norm_lif_setup_context(ctx, inputs, output):
    x, v0, weight, bias, p, mean, var, rule, eps, batch_stats, threshold, v_init, *args = inputs
    ctx.mark_non_differentiable(output[2])
    ctx.set_materialize_grads(False)  # an unused spike or membrane output sends None, not zeros
    ctx.save_for_backward(x, v0, weight, bias, p, mean, var, output[2])
    ctx.rule, ctx.eps, ctx.batch_stats, ctx.threshold, ctx.v_init = rule, eps, batch_stats, threshold, v_init
    ctx.lif, (_checkpoint, ctx.group) = LIFKernelParameters.from_op_args(args)


def _norm_lif_backward(ctx, grad_s, grad_v, _grad_ckpt):
    x, v0, weight, bias, p, mean, var, ckpt = ctx.saved_tensors
    need = ctx.needs_input_grad
    dx, dv0, dw, db, dp = norm_lif_backward_op(
        grad_s, grad_v, x, v0, ckpt, weight, bias, p, mean, var, ctx.rule, ctx.eps, ctx.batch_stats,
        ctx.threshold, ctx.v_init, *ctx.lif.to_op_args(), need[0], need[1], ctx.group,
    )
    return NORM_LIF_FWD.grads(
        dx if need[0] else None,
        dv0 if need[1] else None,
        dw.to(weight.dtype) if need[2] else None,
        db.to(bias.dtype) if need[3] else None,
        dp.to(p.dtype) if need[4] else None,
    )


norm_lif_op.register_autograd(_norm_lif_backward, setup_context=_norm_lif_setup_context)
refuse_double_backward(norm_lif_backward_op, "norm_lif", rule_arg=10)


def norm_lif_kernel(neuron: LIFParameters) -> LIFKernelParameters | None:
    """The neuron's constants for the fused norm → LIF kernels, or None (warned once) when
    its surrogate has no kernel."""
    return kernel_lif(neuron, "norm_lif")


def norm_lif(
    rule: str,
    x_seq: Tensor,
    v,
    weight: Tensor | None,
    bias: Tensor | None,
    p: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    *,
    momentum: list,
    eps: float,
    batch_stats: bool,
    threshold: float,
    neuron: LIFParameters,
    sync: StatsSync | None = None,
) -> tuple[Tensor, Tensor]:
    """A batch-statistics norm (pipeline rule ``rule``) and an IF/LIF neuron, fused: (spikes,
    final membrane) as ``lif(norm(x_seq), v)`` computes them.

    ``v``: the initial membrane, a float (every element) or a tensor of shape
    ``x_seq.shape[1:]``. With ``batch_stats`` the batch's statistics normalise and the running
    statistics (if given) are updated in place with ``momentum`` (one factor per statistics
    row); else the running statistics normalise. With ``sync`` (and ``batch_stats``) the
    statistics pool every rank's batch: one all-gather forward, one all-reduce backward.
    """
    check_sequence_arg("norm_lif", x_seq)
    check_device("norm_lif", x_seq, v, weight, bias, p, running_mean, running_var)
    lif_k = norm_lif_kernel(neuron)
    if lif_k is None:
        raise ValueError(f"norm_lif: no kernel for the surrogate {type(neuron.surrogate).__name__}")
    group = group_name(sync) if batch_stats else ""
    if batch_stats:
        mean, var = bn_stats_op(x_seq.detach(), running_mean, running_var, [float(m) for m in momentum], rule, group)
    else:
        mean, var = running_mean, running_var
    v0, v_init = (v.expand(x_seq.shape[1:]), 0.0) if isinstance(v, Tensor) else (None, float(v))
    checkpoint = wants_grad(x_seq, v0, weight, bias, p)
    spikes, v_out, _ = norm_lif_op(
        x_seq, v0, weight, bias, p, mean, var, rule, float(eps), bool(batch_stats), float(threshold), v_init,
        *lif_k.to_op_args(), checkpoint, group,
    )
    return spikes, v_out
