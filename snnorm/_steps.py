r"""Step helpers: run modules over a sequence ``[T, N, ...]`` (spikingjelly's
``functional.seq_to_ann_forward``, ``multi_step_forward`` and their ``t_last_`` variants,
``chunk_multi_step_forward``).

* :func:`seq_to_ann_forward` folds T into the batch: ``y = f(x.flatten(0, 1)).unflatten(0, (T, N))``
  (a stateless module, one call);
* :func:`multi_step_forward` loops over time: ``y[t] = f(x[t])``, stacked (a single-step
  module, T calls, state carried between them).

Below the layers (which use them for their multi-step modes) and re-exported by
:mod:`snnorm.functional`, the public path.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn as nn

from . import _outputs

__all__ = [
    "seq_to_ann_forward",
    "t_last_seq_to_ann_forward",
    "multi_step_forward",
    "t_last_multi_step_forward",
    "chunk_multi_step_forward",
]


# -- forward helpers -----------------------------------------------------------------
# A module input may be a tuple of tensors (a two-argument module: x and indices, x and
# a hidden state); the output may be a tuple (nn.MaxPool2d(return_indices=True)).
# spikingjelly's rule: the tuple's members go to the first module as positional
# arguments, each later module gets the previous output as one argument.


def _check_sequences(x_seq, where: str, leading: int) -> tuple[torch.Tensor, ...]:
    """The input as a tuple of tensors, each [T, N, ...] with the same first ``leading`` dims."""
    members = x_seq if isinstance(x_seq, tuple) else (x_seq,)
    if not members:
        raise ValueError(f"{where}: expected x_seq with shape [T, N, ...] or a tuple of them, got an empty tuple")
    for k, x in enumerate(members):
        if not isinstance(x, torch.Tensor):
            what = f"member {k} of x_seq" if isinstance(x_seq, tuple) else "x_seq"
            raise TypeError(f"{where}: expected {what} to be a tensor of shape [T, N, ...], got {type(x).__name__}")
        if x.dim() < 2:
            raise ValueError(
                f"{where}: expected x_seq with shape [T, N, ...], but got x_seq with shape {tuple(x.shape)}"
            )
    # spikingjelly's wording ("[T, batch_size] leading dimensions", "temporal length"), which
    # ported code matches on
    dims = "[T, batch_size] leading dimensions" if leading == 2 else "T leading dimension (temporal length)"
    if any(x.shape[:leading] != members[0].shape[:leading] for x in members[1:]):
        raise ValueError(
            f"{where}: expected all tensors in x_seq to share the same {dims}, "
            f"but got tensors with shapes {[tuple(x.shape) for x in members]}"
        )
    return members


def _apply_modules(args: tuple, modules):
    if isinstance(modules, (list, tuple)):
        for m in modules:
            y = m(*args)
            args = (y,)
        return y
    return modules(*args)


def seq_to_ann_forward(x_seq, stateless_module: nn.Module | Sequence[nn.Module] | Callable):
    """Run stateless module(s) on ``[T, N, ...]`` by folding T into the batch.

    ``x_seq`` is a tensor or a tuple of tensors sharing ``[T, N]`` (ValueError
    otherwise), given to the first module as positional arguments. The output is
    unflattened back to ``[T, N, ...]``; a tuple (list, dict) output has each tensor
    member unflattened, other members pass unchanged.
    """
    where = "seq_to_ann_forward"
    members = _check_sequences(x_seq, where, leading=2)
    T, N = members[0].shape[:2]
    y = _apply_modules(tuple(x.flatten(0, 1) for x in members), stateless_module)

    def unflatten(t: torch.Tensor) -> torch.Tensor:
        if t.dim() == 0 or t.shape[0] != T * N:
            raise ValueError(
                f"{where}: the module returned a tensor of shape {tuple(t.shape)}, whose first dim is "
                f"not T*N = {T}*{N}; it cannot be unfolded to [T, N, ...]"
            )
        return t.unflatten(0, (T, N))

    return _outputs.map_tensors(y, unflatten)


def multi_step_forward(x_seq, single_step_module: nn.Module | Sequence[nn.Module] | Callable):
    """Run single-step module(s) over T by a loop and stack the outputs.

    ``x_seq`` is a tensor or a tuple of tensors sharing T (ValueError otherwise); step
    ``t`` passes ``x[t]`` of each member as positional arguments. A tuple (list, dict)
    output is stacked member by member; non-tensor members must be the same at every step.
    """
    where = "multi_step_forward"
    members = _check_sequences(x_seq, where, leading=1)
    outputs = [
        _apply_modules(tuple(x[t] for x in members), single_step_module) for t in range(members[0].shape[0])
    ]
    if not outputs:
        raise ValueError(f"{where}: expected x_seq with shape [T, N, ...] and T >= 1, got T = 0")
    return _outputs.merge_outputs(outputs, torch.stack, where)


def t_last_seq_to_ann_forward(x_seq, stateless_module: nn.Module | Sequence[nn.Module] | Callable):
    """:func:`seq_to_ann_forward` for sequences with time last, ``[N, ..., T]``."""
    members = x_seq if isinstance(x_seq, tuple) else (x_seq,)
    time_first = tuple(x.movedim(-1, 0) if isinstance(x, torch.Tensor) and x.dim() >= 2 else x for x in members)
    y = seq_to_ann_forward(time_first if isinstance(x_seq, tuple) else time_first[0], stateless_module)
    return _outputs.map_tensors(y, lambda t: t.movedim(0, -1))


def t_last_multi_step_forward(x_seq, single_step_module: nn.Module | Sequence[nn.Module] | Callable):
    """:func:`multi_step_forward` for sequences with time last, ``[N, ..., T]``."""
    members = x_seq if isinstance(x_seq, tuple) else (x_seq,)
    time_first = tuple(x.movedim(-1, 0) if isinstance(x, torch.Tensor) and x.dim() >= 2 else x for x in members)
    y = multi_step_forward(time_first if isinstance(x_seq, tuple) else time_first[0], single_step_module)
    return _outputs.map_tensors(y, lambda t: t.movedim(0, -1))


def chunk_multi_step_forward(split_size: int, x_seq: torch.Tensor, multi_step_module: nn.Module | Callable):
    """Run a multi-step module on chunks of at most ``split_size`` timesteps (less memory)."""
    if isinstance(split_size, bool) or not isinstance(split_size, int) or split_size < 1:
        raise ValueError(f"split_size must be a positive int, got {split_size!r}")
    return torch.cat([multi_step_module(chunk) for chunk in torch.split(x_seq, split_size)])
