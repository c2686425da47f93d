r"""Folded MPBN-LIF with test-time threshold modulation: the ``snnorm::mpbn_lif_adapt`` op
(forward only).

The BN is folded into a per-channel threshold θ' = μ + (θ − β)·√(σ² + ε)/γ, and μ, σ²
follow the data at test time (Zhao et al., arXiv 2505.05375), per step t::

    h = charge(v, x[t])
    STATS_FOLD_BATCH:   μ, σ² = mean, unbiased variance of h over N·S     (adapt="batch")
    STATS_FOLD_RUNNING: μ ← (1 − m_t)μ + m_t·mean, σ² likewise              (adapt="running")
    s = Θ(sign(γ)(h − θ')),  v = reset(γ(h − μ)/√(σ² + ε) + β | h, s)

It runs on the batch-statistics kernels of :mod:`snnorm.kernels.mpbn_lif_train` (the
resident path, or the pipelined path for large channels), which compute exactly these
per-step statistics. Layouts as there; μ, σ² ``[C]``, momenta ``[T]``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..params import BNKernelParameters, LIFKernelParameters
from . import _lif_device as dev
from ._common import acc_torch_dtype, op_signature
from .mpbn_lif_train import launch_batch_stats_fwd

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
    stats = dev.STATS_FOLD_RUNNING if running else dev.STATS_FOLD_BATCH
    s, v_out, _, _, _, mu_out, s2_out = launch_batch_stats_fwd(
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


def _backward(ctx, *grads):
    raise NotImplementedError(
        "snnorm triton mpbn_lif_folded: backward through test-time threshold adaptation (adapt='batch'/'running') "
        "is not implemented; use the torch backend, or adapt='none', to differentiate through a folded MPBN-LIF"
    )


mpbn_lif_adapt_op.register_autograd(_backward, setup_context=lambda ctx, inputs, output: None)
