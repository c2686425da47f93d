"""The Triton backend: fused kernels from :mod:`snnorm.kernels` behind the op table.

Runs on CUDA tensors, or on CPU tensors under the Triton interpreter
(``TRITON_INTERPRET=1`` set before triton is first imported). Each op has the
signature and semantics of its twin in :mod:`snnorm.backends.torch_backend`; this file
reads one-for-one against it. The ops here only adapt arguments (the parameter bundles
of :mod:`snnorm.params` to their plain-value twins — the surrogate resolved to its kernel
name and α —, threshold tensors, output dtype, the running-statistics copy-back) and call
the custom ops (``snnorm::*``), which are registered in this file (schemas, fake kernels,
autograd) around the launchers of ``snnorm/kernels/<module>.py``; ``kernels/`` holds only
the ``@triton.jit`` kernels and their launchers:

===================  ==============================================================
op                   kernels
===================  ==============================================================
``lif``              ``kernels/lif.py`` (FIRE_RAW)
``mpbn_lif``         ``kernels/mpbn_lif_train.py`` (batch statistics) or
                     ``kernels/lif.py`` (FIRE_NORMALISED, running statistics)
``mpbn_lif_folded``  ``kernels/lif.py`` (FIRE_FOLDED) or ``kernels/mpbn_lif_train.py``
                     (``snnorm::mpbn_lif_adapt``: per-step statistics, adapt != "none")
``tebn``, ``tab``,   ``kernels/bn_pipeline.py`` (one statistics pipeline; rules
``batch_norm_seq``,  ``tebn``, ``tab``, ``batch_norm``, ``bntt``)
``bntt``
===================  ==============================================================

What the kernels cannot run (a surrogate with no kernel, e.g. a user-defined one or
``spiking=False``) runs on the torch backend's op, with a RuntimeWarning naming it the
first time: the triton backend never falls back silently.
"""

from __future__ import annotations

import functools
import os
import warnings
from typing import Callable

from . import BackendUnavailableError


def triton_unavailable_reason() -> str | None:
    """Why the triton backend cannot run here, or None if it can."""
    try:
        import triton  # noqa: F401
    except ImportError as err:
        return f"triton is not installed ({err}); pip install 'snnorm[triton]'"
    import torch

    if torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
        return None
    return (
        "no CUDA device and the Triton interpreter is off: set TRITON_INTERPRET=1 "
        "before triton is first imported to run the kernels on CPU tensors"
    )


def load_ops():
    reason = triton_unavailable_reason()
    if reason is not None:
        raise BackendUnavailableError(f"triton backend unavailable: {reason}")
    return {
        "lif": lif, "mpbn_lif": mpbn_lif, "mpbn_lif_folded": mpbn_lif_folded,
        **STATISTICS_OPS,  # the batch-statistics norms: the section near the end of this file
        # beyond the common slots: a norm and an IF/LIF neuron fused (the last section)
        "norm_lif": norm_lif, "norm_lif_kernel": norm_lif_kernel,
    }


# The kernels import triton; a machine without it still imports this module (the registry
# asks load_ops, which says why the backend cannot run).
try:
    import torch
    from torch import Tensor

    from ..kernels import _lif_device as _dev
    from ..kernels._common import acc_torch_dtype, check_device
except ImportError:  # pragma: no cover - exercised only without triton
    pass

from ..params import AdaptParameters, BNKernelParameters, BNStatistics, LIFKernelParameters, LIFParameters, MPBNParameters
from . import torch_backend
from .sync import StatsSync, combine_rank_partials, gather_step_partials


# ----------------------------------------------------------------------------------
# argument adaptors
# ----------------------------------------------------------------------------------

_WARNED: set = set()


# the collectives a synchronised op needs, from its group's name (a ProcessGroup cannot be an
# op argument; "" = this rank alone): each returns None for ""


def _group_name(sync: StatsSync | None) -> str:
    return "" if sync is None else sync.group_name


def _gather(group: str):
    """The pipeline's ``gather``: this rank's per-step partials → every rank's, in rank order."""
    sync = StatsSync.from_name(group)
    return None if sync is None else functools.partial(gather_step_partials, sync)


def _combined_gather(group: str):
    """MPBN-LIF's per-step exchange: this rank's (count [1], mean [1, C], M2 [1, C]) → every
    rank's, gathered and combined in rank order."""
    gather = _gather(group)
    return None if gather is None else (lambda count, mean, m2: combine_rank_partials(*gather(count, mean, m2)))


def _all_reduce(group: str):
    """The backward's all-reduce (Σ over ranks) of its per-step gradient sums."""
    sync = StatsSync.from_name(group)
    return None if sync is None else sync.all_reduce


def _kernel_surrogate(surrogate: Callable, op: str) -> tuple[str, float] | None:
    """(kernel name, α) of ``surrogate``, or None (warned once per op and reason) when no kernel has it."""
    spec = surrogate.kernel_spec() if hasattr(surrogate, "kernel_spec") else None
    if spec is not None and spec[0] in _dev.SURROGATES:
        return spec[0], float(spec[1])
    if getattr(surrogate, "spiking", True) is False:
        reason = f"surrogate {type(surrogate).__name__}(spiking=False) (the kernels emit spikes, not the primitive)"
    else:
        reason = f"surrogate {type(surrogate).__name__} (kernels exist for {sorted(_dev.SURROGATES)})"
    key = (op, reason)
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(
            f"snnorm triton {op}: no fused kernel for {reason}; this op runs on the torch backend "
            "(warned once)", RuntimeWarning, stacklevel=4,
        )
    return None


def _out_dtype(x: Tensor, v: Tensor, *others) -> torch.dtype:
    """The dtype the torch reference's spikes and state end in: x, v and the tensors that
    enter the firing comparison promote together (Python floats do not promote)."""
    dtype = torch.promote_types(x.dtype, v.dtype)
    for o in others:
        if isinstance(o, Tensor):
            dtype = torch.promote_types(dtype, o.dtype)
    return dtype


def _threshold_tensor(threshold, x: Tensor) -> Tensor:
    """A float threshold as a [C] tensor of the compute dtype (a tensor passes through)."""
    if isinstance(threshold, Tensor):
        return threshold
    return torch.full((x.shape[2],), float(threshold), dtype=acc_torch_dtype(x.dtype), device=x.device)


def _membrane(x_seq: Tensor, v, op: str) -> Tensor:
    """The membrane as a (possibly stride-0) view of shape x_seq.shape[1:]; checks the device."""
    if not isinstance(v, Tensor):
        v = torch.full((), float(v), dtype=x_seq.dtype, device=x_seq.device)
    check_device(op, x_seq, v)
    return v.expand(x_seq.shape[1:])


def _wants_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(isinstance(t, Tensor) and t.requires_grad for t in tensors)


def _check_batch_size(x_seq: Tensor) -> None:
    # the same rule (and message) as torch.nn.functional.batch_norm in training
    if x_seq.shape[1] * (x_seq[0, 0, 0].numel()) == 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {tuple(x_seq.shape[1:])}")


# ==================================================================================
# The LIF / MPBN-LIF ops (kernels/lif.py, kernels/mpbn_lif_train.py)
# ==================================================================================
# The kernel modules launch; here the torch.library ops (with fake kernels, so they trace
# under torch.compile(fullgraph=True)) and their autograd, which the op-table functions
# ``lif``, ``mpbn_lif``, ``mpbn_lif_folded`` below call:
#
# * ``snnorm::lif_elementwise`` / ``_bwd``: plain LIF (FIRE_RAW), MPBN with running
#   statistics (FIRE_NORMALISED), folded threshold (FIRE_FOLDED), differentiable;
# * ``snnorm::mpbn_lif_train`` / ``_bwd``: MPBN-LIF with batch statistics, differentiable;
#   the running statistics come back as new tensors (the op is functional);
# * ``snnorm::mpbn_lif_adapt``: folded MPBN-LIF with test-time threshold modulation
#   (Zhao et al., arXiv 2505.05375) on the batch-statistics kernels, per step t
#   μ, σ² = batch statistics of h (adapt="batch") or μ ← (1 − m_t)μ + m_t·mean (adapt="running"),
#   s = Θ(sign(γ)(h − θ')), θ' = μ + (θ − β)·√(σ² + ε)/γ; forward only.

try:
    from ..kernels import lif as _lk
    from ..kernels import mpbn_lif_train as _mt
    from ..kernels._common import op_signature
except ImportError:  # pragma: no cover - exercised only without triton
    pass
else:
    #: per-channel tensors of the elementwise modes: θ, then μ, γ·rstd, β (NORM) and θ', sign(γ) (FIRE_FOLDED)
    _FIRE_TENSORS = "Tensor th, Tensor? mu, Tensor? r, Tensor? beta, Tensor? thf, Tensor? sgn"

    #: ``snnorm::lif_elementwise(x, v, <fire tensors>, <LIFKernelParameters>, fire, carry_norm, save_h, out_dtype)``
    LIF_FWD = op_signature(
        "Tensor x, Tensor v", _FIRE_TENSORS, LIFKernelParameters, "int fire, bool carry_norm, bool save_h, ScalarType out_dtype",
        returns="(Tensor, Tensor, Tensor)",
    )
    #: ``snnorm::lif_elementwise_bwd(gs, gv, h, gx_dtype, <fire tensors>, <LIFKernelParameters>, fire, carry_norm, need_gv0)``
    LIF_BWD = op_signature(
        "Tensor? gs, Tensor? gv, Tensor h, ScalarType gx_dtype", _FIRE_TENSORS, LIFKernelParameters,
        "int fire, bool carry_norm, bool need_gv0",
        returns="(Tensor, Tensor, Tensor)",
    )

    @torch.library.custom_op("snnorm::lif_elementwise", mutates_args=(), schema=LIF_FWD.schema)
    def lif_elementwise_op(x, v, th, mu, r, beta, thf, sgn, *args):
        """(spikes, v_T, saved h) for plain LIF (FIRE_RAW), MPBN eval (FIRE_NORMALISED), folded threshold (FIRE_FOLDED).

        Arguments: see ``LIF_FWD``; call with ``*lif.to_op_args()`` in the bundle's place.
        """
        lif, (fire, carry_norm, save_h, out_dtype) = LIFKernelParameters.from_op_args(args)
        return _lk.launch_lif_fwd(x, v, th, mu, r, beta, thf, sgn, out_dtype, lif, fire, carry_norm, save_h)

    @lif_elementwise_op.register_fake
    def _(x, v, th, mu, r, beta, thf, sgn, *args):
        _, (fire, carry_norm, save_h, out_dtype) = LIFKernelParameters.from_op_args(args)
        h = x.new_empty(x.shape if save_h else (0,), dtype=acc_torch_dtype(out_dtype))
        return x.new_empty(x.shape, dtype=out_dtype), x.new_empty(x.shape[1:], dtype=out_dtype), h

    @torch.library.custom_op("snnorm::lif_elementwise_bwd", mutates_args=(), schema=LIF_BWD.schema)
    def lif_elementwise_bwd_op(gs, gv, h, gx_dtype, th, mu, r, beta, thf, sgn, *args):
        """(∂x, ∂v0 (empty unless need_gv0), [4, C] per-channel sums: Σgĥ, Σgĥ·(h − μ), ∂θ, ∂θ'); gs / gv None read as zeros."""
        lif, (fire, carry_norm, need_gv0) = LIFKernelParameters.from_op_args(args)
        return _lk.launch_lif_bwd(gs, gv, h, gx_dtype, th, mu, r, beta, thf, sgn, lif, fire, carry_norm, need_gv0)

    @lif_elementwise_bwd_op.register_fake
    def _(gs, gv, h, gx_dtype, th, mu, r, beta, thf, sgn, *args):
        _, (fire, carry_norm, need_gv0) = LIFKernelParameters.from_op_args(args)
        return h.new_empty(h.shape, dtype=gx_dtype), h.new_empty(h.shape[1:] if need_gv0 else (0,)), h.new_empty((4, h.shape[2]))

    def _lif_setup(ctx, inputs, output):
        x, v, th, mu, r, beta, thf, sgn, *args = inputs
        lif, (fire, carry_norm, save_h, _) = LIFKernelParameters.from_op_args(args)
        ctx.set_materialize_grads(False)  # an unused output's gradient stays None: no zeros tensor to read
        ctx.missing_h = not save_h
        if save_h:
            ctx.save_for_backward(output[2], th, mu, r, beta, thf, sgn)
        ctx.cfg = (*lif.to_op_args(), fire, carry_norm)
        ctx.dtypes = (x.dtype, v.dtype)

    def _lif_backward(ctx, gs, gv, gh_unused):
        if ctx.missing_h:
            raise RuntimeError(
                "snnorm::lif_elementwise was called with save_h=False (no gradient was expected) but a backward pass was requested"
            )
        h, th, mu, r, beta, thf, sgn = ctx.saved_tensors
        need_gv0 = ctx.needs_input_grad[1]  # a broadcast initial state (the default) needs none: not written
        gx, gv0, sums = lif_elementwise_bwd_op(gs, gv, h, ctx.dtypes[0], th, mu, r, beta, thf, sgn, *ctx.cfg, need_gv0)
        g_beta, g_r, g_th, g_thf = sums.unbind(0)

        def cast(g, like):
            return None if like is None else g.to(like.dtype)

        g_mu = None if mu is None else (-(g_beta * r.to(g_beta.dtype))).to(mu.dtype)
        return LIF_FWD.grads(
            gx.to(ctx.dtypes[0]), gv0.to(ctx.dtypes[1]) if need_gv0 else None, cast(g_th, th),
            g_mu, cast(g_r, r), cast(g_beta, beta), cast(g_thf, thf),
        )

    def no_double_backward(op: str):
        """An autograd formula for a backward op that names the limit instead of torch's internal error."""

        def backward(ctx, *grads):
            raise NotImplementedError(
                f"snnorm triton {op}: double backward (differentiating a gradient taken with create_graph=True) "
                "is not supported by the fused kernels; use the torch backend (snnorm.functional.set_backend(net, 'torch')) "
                "for higher-order gradients"
            )

        return backward

    lif_elementwise_op.register_autograd(_lif_backward, setup_context=_lif_setup)
    lif_elementwise_bwd_op.register_autograd(no_double_backward("lif"), setup_context=lambda ctx, inputs, output: None)

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
        s, v_out, h, mean, rstd, _, _ = _mt.launch_batch_stats_fwd(
            x, v, weight, bias, rm_new, rv_new, th, None, None, None, out_dtype,
            lif=lif, bn=bn, stats=_dev.STATS_TRAIN.value, carry_norm=carry_norm, save=save,
            sync_stats=_combined_gather(group),
        )
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
            sync_sums=_all_reduce(group),
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
    mpbn_lif_train_bwd_op.register_autograd(no_double_backward("mpbn_lif"), setup_context=lambda ctx, inputs, output: None)

    #: ``snnorm::mpbn_lif_adapt(x, v, mu, sigma2, gamma, beta, th, mom, running, eps, <LIFKernelParameters>,
    #: carry_norm, out_dtype)``; the LIF bundle's detach_reset, surrogate and α are unused (forward only)
    ADAPT_FWD = op_signature(
        "Tensor x, Tensor v, Tensor mu, Tensor sigma2, Tensor gamma, Tensor beta, Tensor th, Tensor mom, bool running, "
        "float eps", LIFKernelParameters, "bool carry_norm, ScalarType out_dtype",
        returns="(Tensor, Tensor, Tensor, Tensor)",
    )

    @torch.library.custom_op("snnorm::mpbn_lif_adapt", mutates_args=(), schema=ADAPT_FWD.schema)
    def mpbn_lif_adapt_op(x, v, mu, sigma2, gamma, beta, th, mom, running, eps, *args):
        """(spikes, v_T, μ_T, σ²_T). Forward only. Arguments: see ``ADAPT_FWD``."""
        lif, (carry_norm, out_dtype) = LIFKernelParameters.from_op_args(args)
        stats = _dev.STATS_FOLD_RUNNING if running else _dev.STATS_FOLD_BATCH
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

    def _adapt_backward(ctx, *grads):
        raise NotImplementedError(
            "snnorm triton mpbn_lif_folded: backward through test-time threshold adaptation (adapt='batch'/'running') "
            "is not implemented; use the torch backend, or adapt='none', to differentiate through a folded MPBN-LIF"
        )

    mpbn_lif_adapt_op.register_autograd(_adapt_backward, setup_context=lambda ctx, inputs, output: None)


# ----------------------------------------------------------------------------------
# the ops (signatures and math: torch_backend)
# ----------------------------------------------------------------------------------


def _kernel_lif(neuron: LIFParameters, op: str) -> LIFKernelParameters | None:
    """The neuron's constants for the kernels, or None (warned) when its surrogate has no kernel."""
    spec = _kernel_surrogate(neuron.surrogate, op)
    return None if spec is None else neuron.for_kernel(*spec)


def lif(x_seq: Tensor, v: Tensor, threshold, neuron: LIFParameters) -> tuple[Tensor, Tensor]:
    """Plain LIF over T steps (see :func:`snnorm.backends.torch_backend.lif`), one fused kernel."""
    lif_k = _kernel_lif(neuron, "lif")
    if lif_k is None:
        return torch_backend.lif(x_seq, v, threshold, neuron)
    if x_seq.dim() == 2:  # [T, N]: no channel dim (single-step [N] arrives as [1, N]); run it as one channel
        v = v.unsqueeze(-1) if isinstance(v, Tensor) and v.dim() > 0 else v
        s, v_out = lif(x_seq.unsqueeze(-1), v, threshold, neuron)
        return s.squeeze(-1), v_out.squeeze(-1)
    v = _membrane(x_seq, v, "lif")
    th = _threshold_tensor(threshold, x_seq)
    s, v_out, _ = lif_elementwise_op(
        x_seq, v, th, None, None, None, None, None, *lif_k.to_op_args(), _dev.FIRE_RAW.value, False,
        _wants_grad(x_seq, v, th), _out_dtype(x_seq, v, threshold),
    )
    return s, v_out


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
    lif_k = _kernel_lif(neuron, "mpbn_lif")
    if lif_k is None:
        return torch_backend.mpbn_lif(
            x_seq, v, weight, bias, running_mean, running_var, threshold, neuron, norm, stats, sync=sync,
        )
    v = _membrane(x_seq, v, "mpbn_lif")
    th = _threshold_tensor(threshold, x_seq)
    carry_norm = norm.carry == "normalized"
    if stats.training or running_mean is None:
        if sync is None:  # synchronised, the count that matters is every rank's (as the torch backend)
            _check_batch_size(x_seq)
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
            _wants_grad(x_seq, v, weight, bias, th), _out_dtype(x_seq, v, threshold),
            "" if sync is None else sync.group_name,
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
        x_seq, v, th, running_mean, r, beta, None, None, *lif_k.to_op_args(), _dev.FIRE_NORMALISED.value,
        carry_norm, _wants_grad(x_seq, v, th, r, beta), _out_dtype(x_seq, v, threshold),
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
    lif_k = _kernel_lif(neuron, "mpbn_lif_folded")
    if lif_k is None:
        return torch_backend.mpbn_lif_folded(x_seq, v, mu, sigma2, gamma, beta, threshold, neuron, norm, adapt)
    v = _membrane(x_seq, v, "mpbn_lif_folded")
    th = _threshold_tensor(threshold, x_seq)
    carry_norm = norm.carry == "normalized"
    if adapt.mode != "none" and x_seq[0, :, 0].numel() > 1:
        running = adapt.mode == "running"
        moms, m = _adapt_momenta(adapt, x_seq.shape[0])
        mom = torch.tensor(moms, dtype=torch.float64, device=x_seq.device)
        s, v_out, mu_t, s2_t = mpbn_lif_adapt_op(
            x_seq, v, mu, sigma2, gamma, beta, th, mom, running, float(norm.eps), *lif_k.to_op_args(), carry_norm,
            _out_dtype(x_seq, v, threshold, mu, sigma2, gamma, beta),
        )
        stat_dtype = torch.promote_types(mu.dtype, x_seq.dtype) if running else x_seq.dtype
        return s, v_out, mu_t.to(stat_dtype), s2_t.to(stat_dtype), (m if running else adapt.momentum)
    std = torch.sqrt(sigma2 + norm.eps)
    thf = torch_backend.folded_threshold(threshold, mu, std, gamma, beta)
    sgn = torch.sign(gamma)
    r = gamma / std if carry_norm else None
    s, v_out, _ = lif_elementwise_op(
        x_seq, v, th, mu if carry_norm else None, r, beta if carry_norm else None, thf, sgn, *lif_k.to_op_args(),
        _dev.FIRE_FOLDED.value, carry_norm, _wants_grad(x_seq, v, th, thf, r, beta, mu), _out_dtype(x_seq, v, threshold, thf),
    )
    return s, v_out, mu, sigma2, adapt.momentum



# ==================================================================================
# The batch-statistics norms (TEBN, TAB, multi-step BN/tdBN, BNTT) on one pipeline
# ==================================================================================
# kernels/bn_pipeline.py launches the stages (partials → reduce over the rule's grouping
# → per-(t, c) coefficients → apply, and the mirrored backward); here the torch.library
# ops (with fake kernels, so they trace under torch.compile(fullgraph=True)), their
# autograd, and the op-table functions. One op set serves every rule (``rule`` names it):
#
# * ``snnorm::bn_stats``: batch statistics in the rule's layout ([C] or [T, C]); mutates
#   the running statistics; not differentiable (it receives a detached input);
# * ``snnorm::bn_apply``: y = s_t·(γ x̂ + β), differentiable; with ``batch_stats`` its
#   backward includes the path through x's own statistics, otherwise it returns ∂L/∂μ,
#   ∂L/∂σ² for the caller's autograd (TAB's single-step continuation);
# * ``snnorm::bn_apply_backward``.
#
# Synchronised batch statistics (backends/sync.py): ``group`` names the process group (""
# = local; a ProcessGroup cannot be an op argument), resolved inside the real kernels by
# ``StatsSync.from_name``. bn_stats gathers every rank's per-step partials between the
# partials and the reduce kernel; bn_apply_backward all-reduces the per-step gradient sums
# between the backward's reduce and coefficient kernels: one collective of O(T·C) values
# per stage, never O(elements).

try:
    from ..kernels import bn_pipeline as _bnp
except ImportError:  # pragma: no cover - exercised only without triton
    pass


@torch.library.custom_op("snnorm::bn_stats", mutates_args=("running_mean", "running_var"))
def _bn_stats_op(
    x: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    momentum: list[float],
    rule: str,
    group: str = "",
) -> tuple[Tensor, Tensor]:
    """(μ, biased σ²) of the rule's grouping; running statistics updated (one factor per row).
    With ``group`` the statistics pool every rank's batch (one all-gather)."""
    check_device(rule, x)
    return _bnp.launch_stats(_bnp.rule(rule), x, running_mean, running_var, momentum, _gather(group))


@_bn_stats_op.register_fake
def _(x, running_mean, running_var, momentum, rule, group=""):
    shape = _bnp.stats_shape(_bnp.rule(rule), x.shape[0], x.shape[2])
    acc = acc_torch_dtype(x.dtype)
    return x.new_empty(shape, dtype=acc), x.new_empty(shape, dtype=acc)


@torch.library.custom_op("snnorm::bn_apply", mutates_args=())
def _bn_apply_op(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    mean: Tensor,
    var: Tensor,
    p: Tensor | None,
    eps: float,
    rule: str,
    batch_stats: bool,
    group: str = "",
) -> Tensor:
    """y = s_t·(γ (x − μ)/√(σ² + ε) + β) with the given statistics (the rule's layout).
    ``group`` (synchronised statistics) reaches only the backward."""
    check_device(rule, x)
    return _bnp.launch_apply(_bnp.rule(rule), x, weight, bias, mean, var, p, eps)


@_bn_apply_op.register_fake
def _(x, weight, bias, mean, var, p, eps, rule, batch_stats, group=""):
    return torch.empty_like(x, dtype=_bnp.out_dtype(x, p), memory_format=torch.contiguous_format)


@torch.library.custom_op("snnorm::bn_apply_backward", mutates_args=())
def _bn_apply_backward_op(
    grad_y: Tensor,
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    mean: Tensor,
    var: Tensor,
    p: Tensor | None,
    eps: float,
    rule: str,
    batch_stats: bool,
    need_dx: bool,
    need_sums: bool,
    group: str = "",
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(∂x, ∂γ, ∂β, ∂p, ∂μ, ∂σ²); ∂x empty unless ``need_dx`` (custom ops cannot return None).
    With ``group`` ∂x's statistics terms (and ∂μ, ∂σ²) use every rank's sums (one all-reduce);
    ∂γ, ∂β, ∂p stay this rank's."""
    check_device(rule, x)
    return _bnp.launch_backward(
        _bnp.rule(rule), grad_y, x, weight, bias, mean, var, p, eps, batch_stats, need_dx, need_sums,
        _all_reduce(group),
    )


@_bn_apply_backward_op.register_fake
def _(grad_y, x, weight, bias, mean, var, p, eps, rule, batch_stats, need_dx, need_sums, group=""):
    acc = acc_torch_dtype(x.dtype)
    shape = _bnp.stats_shape(_bnp.rule(rule), x.shape[0], x.shape[2])
    dx = torch.empty_like(x, memory_format=torch.contiguous_format) if need_dx else x.new_empty(0)
    tc = [x.new_empty(shape, dtype=acc) for _ in range(4)]
    return dx, tc[0], tc[1], x.new_empty(x.shape[0], dtype=acc), tc[2], tc[3]


def _bn_apply_setup_context(ctx, inputs, output):
    x, weight, bias, mean, var, p, eps, rule, batch_stats, group = inputs
    ctx.save_for_backward(x, weight, bias, mean, var, p)
    ctx.eps, ctx.rule, ctx.batch_stats, ctx.group = eps, rule, batch_stats, group


def _bn_apply_backward(ctx, grad_y):
    x, weight, bias, mean, var, p = ctx.saved_tensors
    need = ctx.needs_input_grad
    dx, dw, db, dp, dmean, dvar = torch.ops.snnorm.bn_apply_backward(
        grad_y, x, weight, bias, mean, var, p, ctx.eps, ctx.rule, ctx.batch_stats, need[0], any(need[1:6]), ctx.group
    )
    return (
        dx if need[0] else None,
        dw.to(weight.dtype) if need[1] else None,
        db.to(bias.dtype) if need[2] else None,
        dmean.to(mean.dtype) if need[3] else None,  # only when (mean, var) carry their own graph
        dvar.to(var.dtype) if need[4] else None,
        dp.to(p.dtype) if need[5] else None,
        None,
        None,
        None,
        None,
    )


_bn_apply_op.register_autograd(_bn_apply_backward, setup_context=_bn_apply_setup_context)


def _check_sequence_arg(op: str, x_seq: Tensor) -> None:
    if not x_seq.is_floating_point():
        raise TypeError(f"{op} expects a floating-point x_seq, got dtype {x_seq.dtype}")
    if x_seq.dim() < 3:
        raise ValueError(f"{op} expects x_seq of shape [T, N, C, *spatial], got shape {tuple(x_seq.shape)}")


def _values_per_channel(x_seq: Tensor, steps: int) -> int:
    """Values per channel of the first ``steps`` steps (T·N·spatial under ALL, N·spatial per step)."""
    n = steps * x_seq.shape[1]
    for d in x_seq.shape[3:]:
        n *= d
    return n


def _single_value_error(x_seq: Tensor) -> ValueError:
    # the same message (and exception type) as F.batch_norm
    return ValueError(f"Expected more than 1 value per channel when training, got input size {tuple(x_seq.shape)}")


def _shared_statistics_norm(rule: str, x_seq, weight, bias, running_mean, running_var, p, training, momentum, eps,
                            sync: StatsSync | None):
    """Grouping ALL (multi-step BN, tdBN, TEBN): one μ, σ² per channel over T·N·spatial.

    With ``sync`` the batch statistics pool every rank's batch (a rank's own batch may
    then hold one value, or none, as the torch reference allows)."""
    use_batch_stats = training or running_mean is None
    group = _group_name(sync) if use_batch_stats else ""
    if use_batch_stats:
        if not group and _values_per_channel(x_seq, x_seq.shape[0]) == 1:  # raised before any update
            raise _single_value_error(x_seq)
        track = training and running_mean is not None
        mean, var = torch.ops.snnorm.bn_stats(
            x_seq.detach(), running_mean if track else None, running_var if track else None, [float(momentum)], rule,
            group,
        )
    else:
        mean, var = running_mean, running_var
    return torch.ops.snnorm.bn_apply(x_seq, weight, bias, mean, var, p, float(eps), rule, use_batch_stats, group)


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
    _check_sequence_arg("tebn", x_seq)
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
    _check_sequence_arg("batch_norm_seq", x_seq)
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
    _check_sequence_arg("tab", x_seq)
    check_device("tab", x_seq)
    use_batch_stats = training or running_mean is None
    if not use_batch_stats:
        y = torch.ops.snnorm.bn_apply(x_seq, weight, bias, running_mean, running_var, p, float(eps), "tab", False)
        return y, prefix
    if prefix is not None:
        if sync is not None:
            n_steps, step_mean, step_m2 = torch_backend.synced_statistics(sync, x_seq)
            n = float(n_steps[0])
        else:
            n, step_mean, step_m2 = torch_backend.tab_step_stats(x_seq)
        count, mean, m2 = torch_backend.chan_prefix(n, step_mean, step_m2, prefix)
        if training and running_mean is not None:
            torch_backend.update_accumulated_running_stats(running_mean, running_var, count, mean, m2, momentum)
        var = m2 / count.to(m2.dtype).unsqueeze(1)
        y = torch.ops.snnorm.bn_apply(x_seq, weight, bias, mean, var, p, float(eps), "tab", False)
        return y, (float(count[-1]), mean[-1], m2[-1])
    group = _group_name(sync)
    if not group and _values_per_channel(x_seq, 1) < 2:
        # F.batch_norm's rule (and exception type) at step 0, raised before any update; an
        # empty batch has no statistics either
        raise _single_value_error(x_seq)
    track = training and running_mean is not None
    mean, var = torch.ops.snnorm.bn_stats(
        x_seq.detach(), running_mean if track else None, running_var if track else None,
        [float(m) for m in momentum], "tab", group,
    )
    y = torch.ops.snnorm.bn_apply(x_seq, weight, bias, mean, var, p, float(eps), "tab", True, group)
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
    _check_sequence_arg("bntt", x_seq)
    T = x_seq.shape[0]
    if not (len(weights) == len(running_means) == len(running_vars) == len(momentum) == len(eps) == T):
        raise ValueError(
            f"bntt expects one weight, running mean, running variance, momentum and eps per step (T={T}), got "
            f"{len(weights)}, {len(running_means)}, {len(running_vars)}, {len(momentum)}, {len(eps)}"
        )
    if len({float(e) for e in eps}) > 1:
        key = ("bntt", "eps")
        if key not in _WARNED:
            _WARNED.add(key)
            warnings.warn(
                "snnorm triton bntt: the steps have different eps; this op runs on the torch backend (warned once)",
                RuntimeWarning, stacklevel=2,
            )
        return torch_backend.bntt(x_seq, weights, running_means, running_vars, training=training, momentum=momentum,
                                  eps=eps, sync=sync)
    tracked = all(r is not None for r in running_means) and all(r is not None for r in running_vars)
    weight = torch.stack(list(weights)) if all(w is not None for w in weights) else None
    check_device("bntt", x_seq, weight, *(running_means if tracked else ()), *(running_vars if tracked else ()))
    use_batch_stats = training or not tracked
    group = _group_name(sync) if use_batch_stats else ""
    if not use_batch_stats:
        mean, var = torch.stack(list(running_means)), torch.stack(list(running_vars))
    else:
        if not group and _values_per_channel(x_seq, 1) == 1:  # raised before any update
            raise _single_value_error(x_seq[0])
        track = training and tracked
        r_mean = torch.stack(list(running_means)) if track else None
        r_var = torch.stack(list(running_vars)) if track else None
        mean, var = torch.ops.snnorm.bn_stats(x_seq.detach(), r_mean, r_var, [float(m) for m in momentum], "bntt",
                                              group)
        if track:  # the op updated the stacked copies: move them into the per-step buffers
            with torch.no_grad():
                for t in range(T):
                    running_means[t].copy_(r_mean[t])
                    running_vars[t].copy_(r_var[t])
    return torch.ops.snnorm.bn_apply(x_seq, weight, None, mean, var, None, float(eps[0]), "bntt", use_batch_stats,
                                     group)


#: the op-table entries of this section (load_ops adds them)
STATISTICS_OPS = {"tebn": tebn, "tab": tab, "batch_norm_seq": batch_norm_seq, "bntt": bntt}


# ----------------------------------------------------------------------------------
# fused norm → LIF (kernels/norm_lif.py): the pipeline's apply stage charges, fires, resets
# ----------------------------------------------------------------------------------
# The statistics come from ``snnorm::bn_stats`` (it mutates the running statistics, so it
# cannot carry autograd); ``snnorm::norm_lif`` is functional and differentiable: with
# ``batch_stats`` its backward includes the path through x's own statistics.

try:
    from ..kernels import norm_lif as _nl
    from ..kernels._common import op_signature
except ImportError:  # pragma: no cover - exercised only without triton
    pass
else:
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
    def _norm_lif_op(x, v0, weight, bias, p, mean, var, rule, eps, batch_stats, threshold, v_init, *args):
        lif, (checkpoint, _group) = LIFKernelParameters.from_op_args(args)
        check_device("norm_lif", x, v0, weight, bias, p, mean, var)
        return _nl.launch_norm_lif_forward(
            _bnp.rule(rule), x, v0, weight, bias, p, mean, var, eps, threshold, v_init, lif, checkpoint
        )

    @_norm_lif_op.register_fake
    def _(x, v0, weight, bias, p, mean, var, rule, eps, batch_stats, threshold, v_init, *args):
        _, (checkpoint, _group) = LIFKernelParameters.from_op_args(args)
        T, N, C = x.shape[:3]
        dtype = _bnp.out_dtype(x, p)
        n_ckpt = (-(-T // _nl.segment_length(T)) - 1) if checkpoint else 0
        return (
            torch.empty(x.shape, dtype=dtype, device=x.device), x.new_empty(x.shape[1:], dtype=dtype),
            x.new_empty((n_ckpt, N, C, x[0, 0, 0].numel()), dtype=acc_torch_dtype(x.dtype)),
        )

    @torch.library.custom_op("snnorm::norm_lif_backward", mutates_args=(), schema=NORM_LIF_BWD.schema)
    def _norm_lif_backward_op(grad_s, grad_v, x, v0, ckpt, weight, bias, p, mean, var, rule, eps, batch_stats,
                              threshold, v_init, *args):
        lif, (need_dx, need_dv0, group) = LIFKernelParameters.from_op_args(args)
        dx, dv0, dw, db, dp = _nl.launch_norm_lif_backward(
            _bnp.rule(rule), grad_s, grad_v, x, v0, ckpt, weight, bias, p, mean, var, eps, batch_stats, threshold,
            v_init, lif, need_dx, need_dv0, _all_reduce(group),
        )
        return dx, dv0 if dv0 is not None else x.new_empty(0), dw, db, dp  # custom ops return no None

    @_norm_lif_backward_op.register_fake
    def _(grad_s, grad_v, x, v0, ckpt, weight, bias, p, mean, var, rule, eps, batch_stats, threshold, v_init, *args):
        _, (need_dx, need_dv0, _group) = LIFKernelParameters.from_op_args(args)
        acc = acc_torch_dtype(x.dtype)
        shape = _bnp.stats_shape(_bnp.rule(rule), x.shape[0], x.shape[2])
        dx = torch.empty(x.shape, dtype=x.dtype, device=x.device) if need_dx else x.new_empty(0)
        dv0 = x.new_empty(x.shape[1:], dtype=v0.dtype if v0 is not None else x.dtype) if need_dv0 else x.new_empty(0)
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
        dx, dv0, dw, db, dp = torch.ops.snnorm.norm_lif_backward(
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

    _norm_lif_op.register_autograd(_norm_lif_backward, setup_context=_norm_lif_setup_context)


def norm_lif_kernel(neuron: LIFParameters) -> LIFKernelParameters | None:
    """The neuron's constants for the fused norm → LIF kernels, or None (warned once) when
    its surrogate has no kernel."""
    return _kernel_lif(neuron, "norm_lif")


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
    final membrane) as ``lif(norm(x_seq), v)`` computes them (kernels/norm_lif.py).

    ``v``: the initial membrane, a float (every element) or a tensor of shape
    ``x_seq.shape[1:]``. With ``batch_stats`` the batch's statistics normalise and the running
    statistics (if given) are updated in place with ``momentum`` (one factor per statistics
    row); else the running statistics normalise. With ``sync`` (and ``batch_stats``) the
    statistics pool every rank's batch: one all-gather forward, one all-reduce backward.
    """
    _check_sequence_arg("norm_lif", x_seq)
    lif_k = norm_lif_kernel(neuron)
    if lif_k is None:
        raise ValueError(f"norm_lif: no kernel for the surrogate {type(neuron.surrogate).__name__}")
    group = _group_name(sync) if batch_stats else ""
    if batch_stats:
        mean, var = torch.ops.snnorm.bn_stats(x_seq.detach(), running_mean, running_var,
                                              [float(m) for m in momentum], rule, group)
    else:
        mean, var = running_mean, running_var
    v0, v_init = (v.expand(x_seq.shape[1:]), 0.0) if isinstance(v, Tensor) else (None, float(v))
    checkpoint = _wants_grad(x_seq, v0, weight, bias, p)
    spikes, v_out, _ = torch.ops.snnorm.norm_lif(
        x_seq, v0, weight, bias, p, mean, var, rule, float(eps), bool(batch_stats), float(threshold), v_init,
        *lif_k.to_op_args(), checkpoint, group,
    )
    return spikes, v_out
