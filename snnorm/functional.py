"""Network-level helpers (spikingjelly ``activation_based.functional`` API).

``reset_net``, ``set_step_mode``, ``set_backend``, ``detach_net`` walk a network;
``seq_to_ann_forward``, ``multi_step_forward``, ``chunk_multi_step_forward`` run
stateless or stateful modules over a ``[T, N, ...]`` sequence.
"""

from __future__ import annotations

import warnings
from typing import Callable, Sequence

import torch
import torch.nn as nn

from . import backends, base

__all__ = [
    "reset_net",
    "set_step_mode",
    "set_backend",
    "detach_net",
    "seq_to_ann_forward",
    "multi_step_forward",
    "chunk_multi_step_forward",
]


def reset_net(net: nn.Module) -> None:
    """Reset the state of every stateful module in ``net`` (those added later too)."""
    for module in net.modules():
        if hasattr(module, "reset") and isinstance(module, base.MemoryModule):
            module.reset()


def detach_net(net: nn.Module) -> None:
    """Detach the state of every stateful module in ``net`` (truncated BPTT)."""
    for module in net.modules():
        if isinstance(module, base.MemoryModule):
            module.detach()


def set_step_mode(net: nn.Module, step_mode: str) -> None:
    """Set ``step_mode`` ('s' or 'm') on every step module of ``net``.

    Modules that support only one step mode and are already in it are left alone;
    a module that cannot run in ``step_mode`` raises ValueError naming it.
    """
    if step_mode not in ("s", "m"):
        raise ValueError(f"step_mode must be 's' or 'm', got {step_mode!r}")
    for name, module in net.named_modules():
        if isinstance(module, base.StepModule):
            if step_mode not in module.supported_step_modes:
                raise ValueError(
                    f"module {name or type(module).__name__!r} ({type(module).__name__}) supports "
                    f"step modes {module.supported_step_modes}, not {step_mode!r}"
                )
            module.step_mode = step_mode


def set_backend(net: nn.Module, backend: str, instance: type | tuple[type, ...] = (nn.Module,)) -> None:
    """Switch every module of ``net`` that is an ``instance`` and supports ``backend``.

    An unknown backend raises ValueError; a backend that cannot run on this machine
    raises :class:`snnorm.backends.BackendUnavailableError` with the reason. Modules
    with a ``backend`` that do not support it keep theirs, and one warning names them.
    """
    backends.get_ops(backend)  # validate once, before changing anything
    skipped = []
    for name, module in net.named_modules():
        if not isinstance(module, base.StepModule) or not isinstance(module, instance):
            continue
        if backend in module.supported_backends:
            module.backend = backend
        elif len(module.supported_backends) > 1 or module.backend != backend:
            skipped.append(f"{name or '<root>'} ({type(module).__name__})")
    if skipped:
        warnings.warn(
            f"set_backend({backend!r}): these modules do not support it and keep their "
            f"backend: {', '.join(skipped)}",
            stacklevel=2,
        )


def seq_to_ann_forward(x_seq: torch.Tensor, stateless_module: nn.Module | Sequence[nn.Module] | Callable):
    """Run stateless module(s) on ``[T, N, ...]`` by folding T into the batch."""
    if x_seq.dim() < 2:
        raise ValueError(f"seq_to_ann_forward expects x_seq of shape [T, N, ...], got {tuple(x_seq.shape)}")
    y = x_seq.flatten(0, 1)
    if isinstance(stateless_module, (list, tuple, nn.Sequential)):
        for m in stateless_module:
            y = m(y)
    else:
        y = stateless_module(y)
    return y.view(x_seq.shape[0], x_seq.shape[1], *y.shape[1:])


def multi_step_forward(x_seq: torch.Tensor, single_step_module: nn.Module | Sequence[nn.Module] | Callable):
    """Run single-step module(s) over T by a loop and stack the outputs."""
    modules = single_step_module if isinstance(single_step_module, (list, tuple, nn.Sequential)) else [single_step_module]
    outputs = []
    for x in x_seq:
        for m in modules:
            x = m(x)
        outputs.append(x)
    return torch.stack(outputs)


def chunk_multi_step_forward(split_size: int, x_seq: torch.Tensor, multi_step_module: nn.Module | Callable):
    """Run a multi-step module on chunks of at most ``split_size`` timesteps (less memory)."""
    if not isinstance(split_size, int) or split_size < 1:
        raise ValueError(f"split_size must be a positive int, got {split_size!r}")
    return torch.cat([multi_step_module(chunk) for chunk in torch.split(x_seq, split_size)])
