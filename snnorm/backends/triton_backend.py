"""The Triton backend: fused kernels from :mod:`snnorm.kernels` behind the op table.

Runs on CUDA tensors, or on CPU tensors under the Triton interpreter
(``TRITON_INTERPRET=1`` set before triton is first imported). Each op has the
signature and semantics of its twin in :mod:`snnorm.backends.torch_backend`; this file
reads one-for-one against it. The ops here only adapt arguments (the parameter bundles
of :mod:`snnorm.params` to their plain-value twins — the surrogate resolved to its kernel
name and α —, threshold tensors, output dtype, the running-statistics copy-back) and call
the custom ops of ``snnorm/kernels/<op>.py``:

===================  ==============================================================
op                   kernels
===================  ==============================================================
``lif``              ``kernels/lif.py`` (FIRE_RAW)
``mpbn_lif``         ``kernels/mpbn_lif_train.py`` (batch statistics) or
                     ``kernels/lif.py`` (FIRE_NORMALISED, running statistics)
``mpbn_lif_folded``  ``kernels/lif.py`` (FIRE_FOLDED) or ``kernels/mpbn_lif_adapt.py``
``tebn``             ``kernels/tebn.py``
===================  ==============================================================

What the kernels cannot run (a surrogate with no kernel, e.g. a user-defined one or
``spiking=False``) runs on the torch backend's op, with a RuntimeWarning naming it the
first time: the triton backend never falls back silently.
"""

from __future__ import annotations

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
    from ..kernels.tab import tab
    from ..kernels.tebn import tebn

    return {"lif": lif, "mpbn_lif": mpbn_lif, "mpbn_lif_folded": mpbn_lif_folded, "tebn": tebn, "tab": tab}


# The kernels import triton; a machine without it still imports this module (the registry
# asks load_ops, which says why the backend cannot run).
try:
    import torch
    from torch import Tensor

    from ..kernels import _lif_device as _dev
    from ..kernels._common import acc_torch_dtype, check_device
    from ..kernels.lif import lif_elementwise_op
    from ..kernels.mpbn_lif_adapt import mpbn_lif_adapt_op
    from ..kernels.mpbn_lif_train import mpbn_lif_train_op
except ImportError:  # pragma: no cover - exercised only without triton
    pass

from ..params import AdaptParameters, BNKernelParameters, BNStatistics, LIFKernelParameters, LIFParameters, MPBNParameters
from . import torch_backend


# ----------------------------------------------------------------------------------
# argument adaptors
# ----------------------------------------------------------------------------------

_WARNED: set = set()


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
) -> tuple[Tensor, Tensor]:
    """MPBN-LIF (see :func:`snnorm.backends.torch_backend.mpbn_lif`), fused.

    Batch statistics (training, or no running statistics): ``snnorm::mpbn_lif_train``, whose
    updated running statistics are copied back into the buffers here. Running statistics
    (eval): the elementwise kernel with ĥ = (h − μ)·γ/√(σ² + ε) + β.
    """
    lif_k = _kernel_lif(neuron, "mpbn_lif")
    if lif_k is None:
        return torch_backend.mpbn_lif(x_seq, v, weight, bias, running_mean, running_var, threshold, neuron, norm, stats)
    v = _membrane(x_seq, v, "mpbn_lif")
    th = _threshold_tensor(threshold, x_seq)
    carry_norm = norm.carry == "normalized"
    if stats.training or running_mean is None:
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
