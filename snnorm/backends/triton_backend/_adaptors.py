"""What the op files share: argument adaptors, the sync collectives by group name, warnings,
and the one refusal of a double backward.

The adaptors turn the op-table arguments into what the custom ops take: a surrogate into
its kernel name and α, a float threshold into a ``[C]`` tensor, a scalar membrane into a
stride-0 view, the output dtype the torch reference would end in.
"""

from __future__ import annotations

import functools
import warnings
from typing import Callable

import torch
from torch import Tensor

from ...kernels import api as modes
from ...kernels.api import acc_torch_dtype, check_device
from ...params import LIFKernelParameters, LIFParameters
from ..sync import StatsSync, combine_rank_partials, gather_step_partials

#: (op, reason) keys already warned about (each fallback warns once per process)
_WARNED: set = set()


def warn_once(key, message: str, stacklevel: int) -> None:
    """A RuntimeWarning, the first time ``key`` is seen; ``stacklevel`` counts from the caller."""
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=stacklevel + 1)


# ----------------------------------------------------------------------------------
# double backward: refused with one message, the same way for every op
# ----------------------------------------------------------------------------------


def register_refusal(op, message) -> None:
    """Give custom op ``op`` an autograd formula that raises NotImplementedError(``message``);
    ``message`` is a string or a function of the op's inputs returning one."""

    def setup_context(ctx, inputs, output):
        ctx.message = message(inputs) if callable(message) else message

    def backward(ctx, *grads):
        raise NotImplementedError(ctx.message)

    op.register_autograd(backward, setup_context=setup_context)


def refuse_double_backward(backward_op, family, rule_arg: int | None = None) -> None:
    """Make the gradient that ``backward_op`` (the backward of a ``family`` op) returns refuse
    to be differentiated again: with ``create_graph=True`` its outputs carry a graph node
    whose backward raises a NotImplementedError naming the torch backend. ``rule_arg``: the
    position of an argument (the norm's rule) that names the op better than ``family``."""

    def message(inputs) -> str:
        name = family if rule_arg is None else f"{family} (rule {inputs[rule_arg]!r})"
        return (
            f"snnorm triton {name}: double backward (differentiating a gradient taken with create_graph=True) "
            "is not supported on the triton backend; use the torch backend "
            "(snnorm.functional.set_backend(net, 'torch')) for higher-order gradients"
        )

    register_refusal(backward_op, message)


# ----------------------------------------------------------------------------------
# synchronised statistics: the collectives, from the group's name ("" = this rank alone)
# ----------------------------------------------------------------------------------


def group_name(sync: StatsSync | None) -> str:
    """The op argument naming ``sync``'s process group (a ProcessGroup cannot be one); "" = local."""
    return "" if sync is None else sync.group_name


def gather(group: str):
    """The pipeline's ``gather``: this rank's per-step partials → every rank's, in rank order."""
    sync = StatsSync.from_name(group)
    return None if sync is None else functools.partial(gather_step_partials, sync)


def combined_gather(group: str):
    """MPBN-LIF's per-step exchange: this rank's (count [1], mean [1, C], M2 [1, C]) → every
    rank's, gathered and combined in rank order."""
    g = gather(group)
    return None if g is None else (lambda count, mean, m2: combine_rank_partials(*g(count, mean, m2)))


def all_reduce(group: str):
    """The backward's all-reduce (Σ over ranks) of its per-step gradient sums."""
    sync = StatsSync.from_name(group)
    return None if sync is None else sync.all_reduce


# ----------------------------------------------------------------------------------
# argument adaptors
# ----------------------------------------------------------------------------------


def _kernel_surrogate(surrogate: Callable, op: str) -> tuple[str, float] | None:
    """(kernel name, α) of ``surrogate``, or None (warned once per op and reason) when no kernel has it."""
    spec = surrogate.kernel_spec() if hasattr(surrogate, "kernel_spec") else None
    if spec is not None and spec[0] in modes.SURROGATES:
        return spec[0], float(spec[1])
    if getattr(surrogate, "spiking", True) is False:
        reason = f"surrogate {type(surrogate).__name__}(spiking=False) (the kernels emit spikes, not the primitive)"
    else:
        reason = f"surrogate {type(surrogate).__name__} (kernels exist for {sorted(modes.SURROGATES)})"
    warn_once(
        (op, reason),
        f"snnorm triton {op}: no fused kernel for {reason}; this op runs on the torch backend (warned once)",
        stacklevel=4,
    )
    return None


def kernel_lif(neuron: LIFParameters, op: str) -> LIFKernelParameters | None:
    """The neuron's constants for the kernels, or None (warned) when its surrogate has no kernel."""
    spec = _kernel_surrogate(neuron.surrogate, op)
    return None if spec is None else neuron.for_kernel(*spec)


def result_dtype(x: Tensor, v: Tensor, *others) -> torch.dtype:
    """The dtype the torch reference's spikes and state end in: x, v and the tensors that
    enter the firing comparison promote together (Python floats do not promote)."""
    dtype = torch.promote_types(x.dtype, v.dtype)
    for o in others:
        if isinstance(o, Tensor):
            dtype = torch.promote_types(dtype, o.dtype)
    return dtype


def threshold_tensor(threshold, x: Tensor) -> Tensor:
    """A float threshold as a [C] tensor of the compute dtype (a tensor passes through)."""
    if isinstance(threshold, Tensor):
        return threshold
    return torch.full((x.shape[2],), float(threshold), dtype=acc_torch_dtype(x.dtype), device=x.device)


def membrane(x_seq: Tensor, v, op: str) -> Tensor:
    """The membrane as a (possibly stride-0) view of shape x_seq.shape[1:]; checks the device."""
    if not isinstance(v, Tensor):
        v = torch.full((), float(v), dtype=x_seq.dtype, device=x_seq.device)
    check_device(op, x_seq, v)
    return v.expand(x_seq.shape[1:])


def wants_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(isinstance(t, Tensor) and t.requires_grad for t in tensors)


# ----------------------------------------------------------------------------------
# input checks of the batch-statistics ops
# ----------------------------------------------------------------------------------


def check_sequence_arg(op: str, x_seq: Tensor) -> None:
    if not x_seq.is_floating_point():
        raise TypeError(f"{op} expects a floating-point x_seq, got dtype {x_seq.dtype}")
    if x_seq.dim() < 3:
        raise ValueError(f"{op} expects x_seq of shape [T, N, C, *spatial], got shape {tuple(x_seq.shape)}")


def values_per_channel(x_seq: Tensor, steps: int) -> int:
    """Values per channel of the first ``steps`` steps (T·N·spatial under ALL, N·spatial per step)."""
    n = steps * x_seq.shape[1]
    for d in x_seq.shape[3:]:
        n *= d
    return n


def single_value_error(x_seq: Tensor) -> ValueError:
    # the same message (and exception type) as F.batch_norm in training
    return ValueError(f"Expected more than 1 value per channel when training, got input size {tuple(x_seq.shape)}")


def check_batch_size(x_seq: Tensor) -> None:
    """F.batch_norm's training rule: more than one value per channel in a step."""
    if x_seq[0, :, 0].numel() == 1:  # N·spatial (N = 0 included)
        raise single_value_error(x_seq[0])
