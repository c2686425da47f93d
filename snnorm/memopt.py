"""Activation checkpointing that does not update BN running statistics twice.

A checkpointed block runs its forward twice: once without saving activations, once
more in backward to recompute them. Running statistics (and any other side effect a
BN-like layer has in training) must happen exactly once. snnorm's BN-like layers ask
:func:`should_update_running_stats` before touching running statistics.
"""

from __future__ import annotations

import contextlib
import threading

import torch

__all__ = ["in_gc_1st_forward", "in_recomputation", "should_update_running_stats"]

_state = threading.local()


def in_gc_1st_forward() -> bool:
    """True inside the first (no-grad) forward of :func:`snnorm.memopt.checkpoint`."""
    return getattr(_state, "gc_1st_forward", False)


@contextlib.contextmanager
def gc_1st_forward():
    previous = in_gc_1st_forward()
    _state.gc_1st_forward = True
    try:
        yield
    finally:
        _state.gc_1st_forward = previous


def in_recomputation() -> bool:
    """True while autograd's engine is running a backward pass on this thread.

    A forward that runs then is a checkpoint recomputation (plain
    ``torch.utils.checkpoint``): its side effects already happened once.
    """
    return torch._C._current_graph_task_id() != -1


def should_update_running_stats(module: torch.nn.Module) -> bool:
    """Whether a BN-like ``module`` may update its running statistics now."""
    return module.training and not in_gc_1st_forward() and not in_recomputation()
