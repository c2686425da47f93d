r"""The batch-statistics norms (BN/tdBN, TEBN, BNTT, TAB) over ``kernels/bn_pipeline.py``.

``kernels/bn_pipeline.py`` launches the stages (partials → reduce over the rule's grouping
→ per-(t, c) coefficients → apply, and the mirrored backward). One op set serves every
rule (``rule`` names it):

* ``snnorm::bn_stats``: batch statistics in the rule's layout ([C] or [T, C]); mutates the
  running statistics; not differentiable (it receives a detached input);
* ``snnorm::bn_apply``: y = s_t·(γ (x − μ)/√(σ² + ε) + β), differentiable; with
  ``batch_stats`` its backward includes the path through x's own statistics, otherwise it
  returns ∂L/∂μ, ∂L/∂σ² for the caller's autograd (TAB's single-step continuation);
* ``snnorm::bn_apply_backward``.

Synchronised statistics (backends/sync.py): ``group`` names the process group ("" = local),
resolved inside the real kernels. bn_stats gathers every rank's per-step partials before the
reduce; bn_apply_backward all-reduces the per-step gradient sums: one collective of O(T·C)
values per stage, never O(elements).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ...kernels import bn_pipeline as _bnp
from ...kernels.api import acc_torch_dtype, check_device, op_signature
from .. import torch_backend
from ..sync import StatsSync
from ._adaptors import (
    all_reduce, check_sequence_arg, gather, group_name, refuse_double_backward, single_value_error,
    values_per_channel, warn_once,
)

#: the synchronising process group's name; "" (this rank alone) may be left out
_GROUP = 'str group=""'

#: ``snnorm::bn_stats(x, running_mean!, running_var!, momentum, rule, group) -> (μ, σ²)``
BN_STATS = op_signature(
    "Tensor x, Tensor(a1!)? running_mean, Tensor(a2!)? running_var, float[] momentum, str rule", _GROUP,
    returns="(Tensor, Tensor)",
)
#: ``snnorm::bn_apply(x, γ, β, μ, σ², p, eps, rule, batch_stats, group) -> y``
BN_APPLY = op_signature(
    "Tensor x, Tensor? weight, Tensor? bias, Tensor mean, Tensor var, Tensor? p, float eps, str rule, "
    "bool batch_stats", _GROUP, returns="Tensor",
)
#: ``snnorm::bn_apply_backward(∂y, x, γ, β, μ, σ², p, eps, rule, batch_stats, need_dx, need_sums, group)
#: -> (∂x, ∂γ, ∂β, ∂p, ∂μ, ∂σ²)``
BN_APPLY_BWD = op_signature(
    "Tensor grad_y, Tensor x, Tensor? weight, Tensor? bias, Tensor mean, Tensor var, Tensor? p, float eps, str rule, "
    "bool batch_stats, bool need_dx, bool need_sums", _GROUP,
    returns="(Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
)


@torch.library.custom_op("snnorm::bn_stats", mutates_args=("running_mean", "running_var"), schema=BN_STATS.schema)
def bn_stats_op(x, running_mean, running_var, momentum, rule, group=""):
    """(μ, biased σ²) of the rule's grouping; running statistics updated (one factor per row).
    With ``group`` the statistics pool every rank's batch (one all-gather)."""
    check_device(rule, x)
    return _bnp.launch_stats(_bnp.rule(rule), x, running_mean, running_var, momentum, gather(group))


@bn_stats_op.register_fake
def _(x, running_mean, running_var, momentum, rule, group=""):
    shape = _bnp.stats_shape(_bnp.rule(rule), x.shape[0], x.shape[2])
    acc = acc_torch_dtype(x.dtype)
    return x.new_empty(shape, dtype=acc), x.new_empty(shape, dtype=acc)


@torch.library.custom_op("snnorm::bn_apply", mutates_args=(), schema=BN_APPLY.schema)
def bn_apply_op(x, weight, bias, mean, var, p, eps, rule, batch_stats, group=""):
    """y = s_t·(γ (x − μ)/√(σ² + ε) + β) with the given statistics (the rule's layout).
    ``group`` (synchronised statistics) reaches only the backward."""
    check_device(rule, x)
    return _bnp.launch_apply(_bnp.rule(rule), x, weight, bias, mean, var, p, eps)


@bn_apply_op.register_fake
def _(x, weight, bias, mean, var, p, eps, rule, batch_stats, group=""):
    return _bnp.output_like(x, _bnp.out_dtype(x, p))  # x's memory format, as the real kernel writes


@torch.library.custom_op("snnorm::bn_apply_backward", mutates_args=(), schema=BN_APPLY_BWD.schema)
def bn_apply_backward_op(grad_y, x, weight, bias, mean, var, p, eps, rule, batch_stats, need_dx, need_sums, group=""):
    """(∂x, ∂γ, ∂β, ∂p, ∂μ, ∂σ²); ∂x empty unless ``need_dx`` (custom ops cannot return None).
    With ``group`` ∂x's statistics terms (and ∂μ, ∂σ²) use every rank's sums (one all-reduce);
    ∂γ, ∂β, ∂p stay this rank's."""
    check_device(rule, x)
    return _bnp.launch_backward(
        _bnp.rule(rule), grad_y, x, weight, bias, mean, var, p, eps, batch_stats, need_dx, need_sums,
        all_reduce(group),
    )


@bn_apply_backward_op.register_fake
def _(grad_y, x, weight, bias, mean, var, p, eps, rule, batch_stats, need_dx, need_sums, group=""):
    acc = acc_torch_dtype(x.dtype)
    shape = _bnp.stats_shape(_bnp.rule(rule), x.shape[0], x.shape[2])
    dx = _bnp.output_like(x) if need_dx else x.new_empty(0)
    tc = [x.new_empty(shape, dtype=acc) for _ in range(4)]
    return dx, tc[0], tc[1], x.new_empty(x.shape[0], dtype=acc), tc[2], tc[3]


def _bn_apply_setup_context(ctx, inputs, output):
    x, weight, bias, mean, var, p, eps, rule, batch_stats, group = inputs
    ctx.save_for_backward(x, weight, bias, mean, var, p)
    ctx.eps, ctx.rule, ctx.batch_stats, ctx.group = eps, rule, batch_stats, group


def _bn_apply_backward(ctx, grad_y):
    x, weight, bias, mean, var, p = ctx.saved_tensors
    need = ctx.needs_input_grad
    dx, dw, db, dp, dmean, dvar = bn_apply_backward_op(
        grad_y, x, weight, bias, mean, var, p, ctx.eps, ctx.rule, ctx.batch_stats, need[0], any(need[1:6]), ctx.group
    )
    return BN_APPLY.grads(
        dx if need[0] else None,
        dw.to(weight.dtype) if need[1] else None,
        db.to(bias.dtype) if need[2] else None,
        dmean.to(mean.dtype) if need[3] else None,  # only when (mean, var) carry their own graph
        dvar.to(var.dtype) if need[4] else None,
        dp.to(p.dtype) if need[5] else None,
    )


bn_apply_op.register_autograd(_bn_apply_backward, setup_context=_bn_apply_setup_context)
refuse_double_backward(bn_apply_backward_op, "bn_apply", rule_arg=8)


# ----------------------------------------------------------------------------------
# the op-table functions (signatures and math: torch_backend)
# ----------------------------------------------------------------------------------


def _shared_statistics_norm(rule: str, x_seq, weight, bias, running_mean, running_var, p, training, momentum, eps,
                            sync: StatsSync | None):
    """Grouping ALL (multi-step BN, tdBN, TEBN): one μ, σ² per channel over T·N·spatial.

    With ``sync`` the batch statistics pool every rank's batch (a rank's own batch may
    then hold one value, or none, as the torch reference allows)."""
    use_batch_stats = training or running_mean is None
    group = group_name(sync) if use_batch_stats else ""
    if use_batch_stats:
        if not group and values_per_channel(x_seq, x_seq.shape[0]) == 1:  # raised before any update
            raise single_value_error(x_seq)
        track = training and running_mean is not None
        mean, var = bn_stats_op(
            x_seq.detach(), running_mean if track else None, running_var if track else None, [float(momentum)], rule,
            group,
        )
    else:
        mean, var = running_mean, running_var
    return bn_apply_op(x_seq, weight, bias, mean, var, p, float(eps), rule, use_batch_stats, group)


def tebn(
    x_seq: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    scale: Tensor,
    *,
    training: bool,
    momentum: float,
    eps: float,
    sync: StatsSync | None = None,
) -> Tensor:
    """TEBN (see :func:`snnorm.backends.torch_backend.tebn`): y[t] = p[t]·(γ x̂[t] + β), rule ``tebn``."""
    check_sequence_arg("tebn", x_seq)
    check_device("tebn", x_seq, weight, bias, running_mean, running_var, scale)
    return _shared_statistics_norm("tebn", x_seq, weight, bias, running_mean, running_var, scale, training, momentum,
                                   eps, sync)


def batch_norm_seq(
    x_seq: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    *,
    training: bool,
    momentum: float,
    eps: float,
    sync: StatsSync | None = None,
) -> Tensor:
    """Multi-step BN / tdBN (see :func:`snnorm.backends.torch_backend.batch_norm_seq`), rule ``batch_norm``."""
    check_sequence_arg("batch_norm_seq", x_seq)
    check_device("batch_norm_seq", x_seq, weight, bias, running_mean, running_var)
    return _shared_statistics_norm("batch_norm", x_seq, weight, bias, running_mean, running_var, None, training,
                                   momentum, eps, sync)


def tab(
    x_seq: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    p: Tensor,
    *,
    training: bool,
    momentum,
    eps: float,
    prefix: tuple | None = None,
    sync: StatsSync | None = None,
) -> tuple[Tensor, tuple | None]:
    """TAB (see :func:`snnorm.backends.torch_backend.tab`), rule ``tab``.

    A whole sequence (``prefix=None``) runs on the pipeline. A continuation (single-step
    mode, ``prefix`` given) gets its statistics from the torch reference's differentiable
    helpers (a step's worth of data; the returned prefix must carry the gradient to the
    earlier steps) and the fused apply, whose backward hands ∂L/∂μ, ∂L/∂σ² to them; with
    ``sync`` those helpers are the reference's synchronised ones (a differentiable gather).
    """
    check_sequence_arg("tab", x_seq)
    check_device("tab", x_seq, weight, bias, running_mean, running_var, p, *(prefix[1:] if prefix else ()))
    use_batch_stats = training or running_mean is None
    if not use_batch_stats:
        y = bn_apply_op(x_seq, weight, bias, running_mean, running_var, p, float(eps), "tab", False)
        return y, prefix
    if prefix is not None:
        if sync is not None:
            n_steps, step_mean, step_m2 = torch_backend.synced_statistics(sync, x_seq)
            n = n_steps[0]  # a device scalar (every rank's count): never read on the host
        else:
            n, step_mean, step_m2 = torch_backend.tab_step_stats(x_seq)
        count, mean, m2 = torch_backend.chan_prefix(n, step_mean, step_m2, prefix)
        if training and running_mean is not None:
            torch_backend.update_accumulated_running_stats(running_mean, running_var, count, mean, m2, momentum)
        var = m2 / count.to(m2.dtype).unsqueeze(1)
        y = bn_apply_op(x_seq, weight, bias, mean, var, p, float(eps), "tab", False)
        # the count after the chunk from the host's numbers (a device scalar when synchronised)
        total = (prefix[0] if prefix is not None else 0) + n * x_seq.shape[0]
        return y, (total if isinstance(total, Tensor) else float(total), mean[-1], m2[-1])
    group = group_name(sync)
    if not group and values_per_channel(x_seq, 1) < 2:
        # F.batch_norm's rule (and exception type) at step 0, raised before any update; an
        # empty batch has no statistics either
        raise single_value_error(x_seq)
    track = training and running_mean is not None
    mean, var = bn_stats_op(
        x_seq.detach(), running_mean if track else None, running_var if track else None,
        [float(m) for m in momentum], "tab", group,
    )
    y = bn_apply_op(x_seq, weight, bias, mean, var, p, float(eps), "tab", True, group)
    return y, None


def bntt(
    x_seq: Tensor,
    weights,
    running_means,
    running_vars,
    *,
    training: bool,
    momentum,
    eps,
    sync: StatsSync | None = None,
) -> Tensor:
    """BNTT (see :func:`snnorm.backends.torch_backend.bntt`): y[t] = γ_t x̂_t, rule ``bntt``.

    The per-step γ_t and running statistics are stacked into ``[T, C]`` (the stacked
    running statistics are copied back into the per-step buffers after the update). A
    sequence whose steps have different ε runs on the torch backend (warned once).
    """
    check_sequence_arg("bntt", x_seq)
    T = x_seq.shape[0]
    if not (len(weights) == len(running_means) == len(running_vars) == len(momentum) == len(eps) == T):
        raise ValueError(
            f"bntt expects one weight, running mean, running variance, momentum and eps per step (T={T}), got "
            f"{len(weights)}, {len(running_means)}, {len(running_vars)}, {len(momentum)}, {len(eps)}"
        )
    if len({float(e) for e in eps}) > 1:
        warn_once(
            ("bntt", "eps"),
            "snnorm triton bntt: the steps have different eps; this op runs on the torch backend (warned once)",
            stacklevel=2,
        )
        return torch_backend.bntt(x_seq, weights, running_means, running_vars, training=training, momentum=momentum,
                                  eps=eps, sync=sync)
    tracked = all(r is not None for r in running_means) and all(r is not None for r in running_vars)
    weight = torch_backend.stack_steps(weights)
    check_device("bntt", x_seq, weight, *(running_means if tracked else ()), *(running_vars if tracked else ()))
    use_batch_stats = training or not tracked
    group = group_name(sync) if use_batch_stats else ""
    if not use_batch_stats:
        mean, var = torch_backend.stack_steps(running_means), torch_backend.stack_steps(running_vars)
    else:
        if not group and values_per_channel(x_seq, 1) == 1:  # raised before any update
            raise single_value_error(x_seq[0])
        track = training and tracked
        r_mean = torch_backend.stack_steps(running_means) if track else None
        r_var = torch_backend.stack_steps(running_vars) if track else None
        mean, var = bn_stats_op(x_seq.detach(), r_mean, r_var, [float(m) for m in momentum], "bntt", group)
        if track:  # the op updated the stacked copies: move them into the per-step buffers
            torch_backend.unstack_steps(r_mean, running_means)
            torch_backend.unstack_steps(r_var, running_vars)
    return bn_apply_op(x_seq, weight, None, mean, var, None, float(eps[0]), "bntt", use_batch_stats, group)


#: the op-table entries of this file
STATISTICS_OPS = {"tebn": tebn, "tab": tab, "batch_norm_seq": batch_norm_seq, "bntt": bntt}
