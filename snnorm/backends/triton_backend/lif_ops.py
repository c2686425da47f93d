r"""LIF ops over ``kernels/lif.py``: ``snnorm::lif_elementwise`` / ``_bwd`` and the op-table ``lif``.

One elementwise kernel fires three ways, per channel c, all differentiable:
plain LIF (FIRE_RAW, z = h − θ), MPBN with running statistics (FIRE_NORMALISED,
z = (h − μ)·r + β − θ with r = γ/√(σ² + ε)) and the folded threshold (FIRE_FOLDED,
z = sign(γ)·(h − θ')). The MPBN op-table functions (:mod:`.mpbn_lif`) reuse the op.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ...kernels import api as modes
from ...kernels import lif as _lk
from ...kernels.api import acc_torch_dtype, check_device, op_signature
from ...params import LIFKernelParameters, LIFParameters
from .. import torch_backend
from ._adaptors import kernel_lif, membrane, refuse_double_backward, result_dtype, threshold_tensor, wants_grad

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


lif_elementwise_op.register_autograd(_lif_backward, setup_context=_lif_setup)
refuse_double_backward(lif_elementwise_bwd_op, "lif")


def lif(x_seq: Tensor, v: Tensor, threshold, neuron: LIFParameters) -> tuple[Tensor, Tensor]:
    """Plain LIF over T steps (see :func:`snnorm.backends.torch_backend.lif`), one fused kernel."""
    check_device("lif", x_seq, v, threshold)
    lif_k = kernel_lif(neuron, "lif")
    if lif_k is None:
        return torch_backend.lif(x_seq, v, threshold, neuron)
    if x_seq.dim() == 2:  # [T, N]: no channel dim (single-step [N] arrives as [1, N]); run it as one channel
        v = v.unsqueeze(-1) if isinstance(v, Tensor) and v.dim() > 0 else v
        s, v_out = lif(x_seq.unsqueeze(-1), v, threshold, neuron)
        return s.squeeze(-1), v_out.squeeze(-1)
    v = membrane(x_seq, v, "lif")
    th = threshold_tensor(threshold, x_seq)
    s, v_out, _ = lif_elementwise_op(
        x_seq, v, th, None, None, None, None, None, *lif_k.to_op_args(), modes.FIRE_RAW.value, False,
        wants_grad(x_seq, v, th), result_dtype(x_seq, v, threshold),
    )
    return s, v_out
