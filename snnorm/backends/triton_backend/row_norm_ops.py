r"""LayerNorm / RMSNorm over the last dimension, plain and fused with an IF/LIF neuron, over
``kernels/row_norm.py`` and ``kernels/row_norm_lif.py``.

LayerNorm: y = γ·(x − μ)/√(σ² + ε) + β, μ and the biased σ² over the last dimension D;
RMSNorm: y = γ·x/√(mean_D(x²) + ε). ``snnorm::row_norm`` gives y (x's dtype, as
``F.layer_norm`` / ``F.rms_norm``) and saves the rows' μ, rstd for its backward;
``snnorm::row_norm_lif`` charges y into an IF/LIF neuron per step, h = charge(v, y_t),
s = Θ(h − θ), v = reset(h, s), and gives only the spikes and the final membrane, equal to
``torch_backend.lif(row_norm(x_seq), v, θ, neuron)``. Rows wider than one tile
(:func:`snnorm.kernels.row_norm.one_pass_max_d`: 8192 under the interpreter, 2048 on a GPU)
take a second pass (``row_norm`` then the LIF op);
a surrogate without a kernel runs the neuron on the torch backend (warned once).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ...kernels import row_norm as _rn
from ...kernels import row_norm_lif as _rl
from ...kernels.api import acc_torch_dtype, check_device, op_signature
from ...params import LIFKernelParameters, LIFParameters
from .. import torch_backend
from ._adaptors import kernel_lif, refuse_double_backward, wants_grad
from .lif_ops import lif as triton_lif

__all__ = [
    "ROW_NORM_FWD", "ROW_NORM_BWD", "ROW_NORM_LIF_FWD", "ROW_NORM_LIF_BWD", "row_norm_op", "row_norm_backward_op",
    "row_norm_lif_op", "row_norm_lif_backward_op", "row_norm", "row_norm_lif",
]

#: ``snnorm::row_norm(x, γ, β, eps, rms) -> (y, μ [R], rstd [R])``
ROW_NORM_FWD = op_signature("Tensor x, Tensor? weight, Tensor? bias, float eps, bool rms",
                            returns="(Tensor, Tensor, Tensor)")
#: ``snnorm::row_norm_backward(∂y, x, γ, μ, rstd, rms, need_dx) -> (∂x, ∂γ, ∂β)``
ROW_NORM_BWD = op_signature("Tensor grad_y, Tensor x, Tensor? weight, Tensor mean, Tensor rstd, bool rms, bool need_dx",
                            returns="(Tensor, Tensor, Tensor)")
#: ``snnorm::row_norm_lif(x, v0, γ, β, eps, rms, threshold, v_init, <LIFKernelParameters>, save)
#: -> (s, v_T, μ [T, R], rstd [T, R], checkpoints)``
ROW_NORM_LIF_FWD = op_signature(
    "Tensor x, Tensor? v0, Tensor? weight, Tensor? bias, float eps, bool rms, float threshold, float v_init",
    LIFKernelParameters, "bool save", returns="(Tensor, Tensor, Tensor, Tensor, Tensor)",
)
#: ``snnorm::row_norm_lif_backward(∂s, ∂v_T, x, v0, γ, β, μ, rstd, checkpoints, rms, threshold, v_init,
#: <LIFKernelParameters>, need_dx, need_dv0) -> (∂x, ∂v0, ∂γ, ∂β)``
ROW_NORM_LIF_BWD = op_signature(
    "Tensor? grad_s, Tensor? grad_v, Tensor x, Tensor? v0, Tensor? weight, Tensor? bias, Tensor mean, Tensor rstd, "
    "Tensor ckpt, bool rms, float threshold, float v_init", LIFKernelParameters, "bool need_dx, bool need_dv0",
    returns="(Tensor, Tensor, Tensor, Tensor)",
)


def _rows(x: Tensor, lead: int) -> int:
    n = 1
    for s in x.shape[lead:-1]:
        n *= s
    return n


# ----------------------------------------------------------------------------------------
# snnorm::row_norm
# ----------------------------------------------------------------------------------------


@torch.library.custom_op("snnorm::row_norm", mutates_args=(), schema=ROW_NORM_FWD.schema)
def row_norm_op(x, weight, bias, eps, rms):
    """(y, μ, rstd). Arguments: see ``ROW_NORM_FWD``."""
    check_device("row_norm", x, weight, bias)
    return _rn.launch_row_norm_forward(x, weight, bias, eps, rms)


@row_norm_op.register_fake
def _(x, weight, bias, eps, rms):
    acc = acc_torch_dtype(x.dtype)
    R = _rows(x, 0)
    return torch.empty_like(x, memory_format=torch.contiguous_format), x.new_empty(R, dtype=acc), \
        x.new_empty(R, dtype=acc)


@torch.library.custom_op("snnorm::row_norm_backward", mutates_args=(), schema=ROW_NORM_BWD.schema)
def row_norm_backward_op(grad_y, x, weight, mean, rstd, rms, need_dx):
    """(∂x or an empty tensor, ∂γ, ∂β) in (x's, the accumulation, the accumulation) dtype."""
    return _rn.launch_row_norm_backward(grad_y, x, weight, mean, rstd, rms, need_dx)


@row_norm_backward_op.register_fake
def _(grad_y, x, weight, mean, rstd, rms, need_dx):
    acc = acc_torch_dtype(x.dtype)
    D = x.shape[-1]
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device) if need_dx else x.new_empty(0)
    return dx, x.new_empty(D, dtype=acc), x.new_empty(D, dtype=acc)


def _row_norm_setup(ctx, inputs, output):
    x, weight, bias, eps, rms = inputs
    ctx.mark_non_differentiable(output[1], output[2])
    ctx.save_for_backward(x, weight, output[1], output[2])
    ctx.rms = rms


def _row_norm_backward(ctx, grad_y, _gm, _gr):
    x, weight, mean, rstd = ctx.saved_tensors
    need = ctx.needs_input_grad
    dx, dw, db = row_norm_backward_op(grad_y, x, weight, mean, rstd, ctx.rms, need[0])
    return ROW_NORM_FWD.grads(
        dx if need[0] else None,
        dw.to(weight.dtype) if need[1] else None,
        db.to(dw.dtype if weight is None else weight.dtype) if need[2] else None,
    )


row_norm_op.register_autograd(_row_norm_backward, setup_context=_row_norm_setup)
refuse_double_backward(row_norm_backward_op, "row_norm")


def row_norm(x: Tensor, weight: Tensor | None, bias: Tensor | None, *, eps: float, rms: bool) -> Tensor:
    """LayerNorm (``rms=False``) or RMSNorm of x ``[..., D]`` over its last dimension, with γ, β
    ``[D]`` or None (no β for RMSNorm); x's dtype, as ``F.layer_norm`` / ``F.rms_norm``. One
    kernel a direction; x is read through its strides when its leading dims merge."""
    _rn.check_row_args("row_norm", x, weight, bias, rms)
    check_device("row_norm", x, weight, bias)
    y, _, _ = row_norm_op(x, weight, bias, float(eps), bool(rms))
    return y


# ----------------------------------------------------------------------------------------
# snnorm::row_norm_lif
# ----------------------------------------------------------------------------------------


@torch.library.custom_op("snnorm::row_norm_lif", mutates_args=(), schema=ROW_NORM_LIF_FWD.schema)
def row_norm_lif_op(x, v0, weight, bias, eps, rms, threshold, v_init, *args):
    """(spikes, v_T, μ, rstd, membrane checkpoints). Arguments: see ``ROW_NORM_LIF_FWD``."""
    lif, (save,) = LIFKernelParameters.from_op_args(args)
    check_device("row_norm_lif", x, v0, weight, bias)
    return _rl.launch_row_norm_lif_forward(x, v0, weight, bias, eps, rms, threshold, v_init, lif, save)


@row_norm_lif_op.register_fake
def _(x, v0, weight, bias, eps, rms, threshold, v_init, *args):
    _, (save,) = LIFKernelParameters.from_op_args(args)
    T, D = x.shape[0], x.shape[-1]
    R = _rows(x, 1)
    acc = acc_torch_dtype(x.dtype)
    dtype = _rl.out_dtype(x, v0)
    n_ckpt = _rl.checkpoint_count(T, D, x.device.type, save, x.dtype)
    return (
        torch.empty(x.shape, dtype=dtype, device=x.device), x.new_empty(x.shape[1:], dtype=dtype),
        x.new_empty((T, R), dtype=acc), x.new_empty((T, R), dtype=acc), x.new_empty((n_ckpt, R, D), dtype=acc),
    )


@torch.library.custom_op("snnorm::row_norm_lif_backward", mutates_args=(), schema=ROW_NORM_LIF_BWD.schema)
def row_norm_lif_backward_op(grad_s, grad_v, x, v0, weight, bias, mean, rstd, ckpt, rms, threshold, v_init, *args):
    """(∂x, ∂v0, ∂γ, ∂β); ∂x, ∂v0 empty unless asked for. Arguments: see ``ROW_NORM_LIF_BWD``."""
    lif, (need_dx, need_dv0) = LIFKernelParameters.from_op_args(args)
    return _rl.launch_row_norm_lif_backward(
        grad_s, grad_v, x, v0, weight, bias, mean, rstd, ckpt, rms, threshold, v_init, lif, need_dx, need_dv0,
    )


@row_norm_lif_backward_op.register_fake
def _(grad_s, grad_v, x, v0, weight, bias, mean, rstd, ckpt, rms, threshold, v_init, *args):
    _, (need_dx, need_dv0) = LIFKernelParameters.from_op_args(args)
    acc = acc_torch_dtype(x.dtype)
    D = x.shape[-1]
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device) if need_dx else x.new_empty(0)
    dv0 = x.new_empty(x.shape[1:], dtype=acc) if need_dv0 else x.new_empty(0, dtype=acc)
    return dx, dv0, x.new_empty(D, dtype=acc), x.new_empty(D, dtype=acc)


def _row_norm_lif_setup(ctx, inputs, output):
    x, v0, weight, bias, eps, rms, threshold, v_init, *args = inputs
    ctx.mark_non_differentiable(output[2], output[3], output[4])
    ctx.set_materialize_grads(False)  # an unused spike or membrane output sends None, not zeros
    ctx.save_for_backward(x, v0, weight, bias, output[2], output[3], output[4])
    ctx.rms, ctx.threshold, ctx.v_init = rms, threshold, v_init
    ctx.lif, _ = LIFKernelParameters.from_op_args(args)


def _row_norm_lif_backward(ctx, grad_s, grad_v, _gm, _gr, _gc):
    x, v0, weight, bias, mean, rstd, ckpt = ctx.saved_tensors
    need = ctx.needs_input_grad
    dx, dv0, dw, db = row_norm_lif_backward_op(
        grad_s, grad_v, x, v0, weight, bias, mean, rstd, ckpt, ctx.rms, ctx.threshold, ctx.v_init,
        *ctx.lif.to_op_args(), need[0], need[1],
    )
    return ROW_NORM_LIF_FWD.grads(
        dx if need[0] else None,
        dv0.to(v0.dtype) if need[1] else None,
        dw.to(weight.dtype) if need[2] else None,
        db.to(bias.dtype) if need[3] else None,
    )


row_norm_lif_op.register_autograd(_row_norm_lif_backward, setup_context=_row_norm_lif_setup)
refuse_double_backward(row_norm_lif_backward_op, "row_norm_lif")


def row_norm_lif(
    x_seq: Tensor, v, weight: Tensor | None, bias: Tensor | None, *, eps: float, rms: bool, threshold: float,
    neuron: LIFParameters,
) -> tuple[Tensor, Tensor]:
    """LayerNorm / RMSNorm over the last dimension and an IF/LIF neuron, fused: (spikes, final
    membrane) as ``torch_backend.lif(row_norm(x_seq), v, threshold, neuron)`` computes them.

    ``x_seq`` ``[T, ..., D]``; ``v`` the initial membrane, a float (every element) or a tensor
    of shape ``x_seq.shape[1:]`` (or one that broadcasts to it).
    """
    _rn.check_row_args("row_norm_lif", x_seq, weight, bias, rms, min_dim=2)
    check_device("row_norm_lif", x_seq, v, weight, bias)
    if isinstance(v, Tensor):
        try:
            v0 = v.expand(x_seq.shape[1:])
        except RuntimeError:
            raise ValueError(f"row_norm_lif: v must have shape {list(x_seq.shape[1:])} (x_seq's without T) or "
                             f"broadcast to it, got {list(v.shape)}") from None
        v_init = 0.0
    else:
        v0, v_init = None, float(v)
    lif_k = kernel_lif(neuron, "row_norm_lif")
    if lif_k is None:  # no kernel for the surrogate (warned once): the neuron on the torch backend
        return torch_backend.lif(row_norm(x_seq, weight, bias, eps=eps, rms=rms), v, threshold, neuron)
    if x_seq.shape[-1] > _rn.one_pass_max_d(x_seq.device.type, fused=True, dtype=x_seq.dtype):  # wider than one tile: a second pass, the row norm then the neuron
        return triton_lif(row_norm(x_seq, weight, bias, eps=eps, rms=rms), v, threshold, neuron)
    save = wants_grad(x_seq, v0, weight, bias)
    spikes, v_out, *_ = row_norm_lif_op(
        x_seq, v0, weight, bias, float(eps), bool(rms), float(threshold), v_init, *lif_k.to_op_args(), save,
    )
    return spikes, v_out
