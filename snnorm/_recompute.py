r"""The recompute guard: whether a forward may commit its side effects now.

Ground floor of snnorm (it imports only torch): the layers and neurons ask it before they
update running statistics or advance a memory, and :mod:`snnorm.memopt` (the checkpoint
wrappers, on the top floor) sets the thread-local state it reads. A checkpointed block
runs its forward twice, once in the forward pass and once more in backward to recompute
activations; **the first forward commits, the recompute does not**:

* :func:`should_update_running_stats` — false in eval, inside :func:`gc_1st_forward` and
  in a plain ``torch.utils.checkpoint`` recompute (autograd's backward runs on this
  thread); inside :func:`snnorm.memopt.checkpoint`'s recompute true for the block's
  training-mode modules, whose buffers are then throw-away copies, so the running update
  ``r ← (1 − m)·r + m·batch`` lands once in the real buffers.
* :func:`check_stateful_recompute` — a stateful module (membrane ``v``, a step counter)
  that a plain checkpoint recomputes would restart from the state its forward left:
  RuntimeError naming the fix, unless :func:`allow_stateful_recompute` says its memories
  are restored.
* :func:`in_gc_1st_forward` / :func:`gc_1st_forward` — a forward whose side effects will be
  discarded (a dry run): BN-like layers leave their statistics alone.

The public names are re-exported by :mod:`snnorm.memopt` (``snnorm.memopt.gc_1st_forward``
...), whose module doc describes the whole scheme.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any, Iterable

import torch
import torch.nn as nn

__all__ = [
    "in_gc_1st_forward",
    "gc_1st_forward",
    "in_recomputation",
    "should_update_running_stats",
    "check_stateful_recompute",
    "allow_stateful_recompute",
]

_state = threading.local()


def in_gc_1st_forward() -> bool:
    """True inside ``with gc_1st_forward():`` on this thread (see the module doc).

    :func:`snnorm.memopt.checkpoint` never sets it: its first forward commits side
    effects, its recompute does not.
    """
    return getattr(_state, "gc_1st_forward", False)


@contextlib.contextmanager
def gc_1st_forward():
    """Mark a forward pass whose side effects will be discarded (it is run again).

    BN-like layers do not update running statistics inside it.
    """
    previous = in_gc_1st_forward()
    _state.gc_1st_forward = True
    try:
        yield
    finally:
        _state.gc_1st_forward = previous


def _in_tracked_recompute() -> bool:
    return getattr(_state, "replay", None) is not None


def _in_autograd_backward() -> bool:
    """True while autograd's engine runs a backward pass on this thread.

    False under ``torch.compile`` tracing: dynamo cannot trace the engine query (a graph
    break, "torch.* op returned non-Tensor"), and tracing happens in the forward, where
    it is -1 anyway.
    """
    if torch.compiler.is_compiling():
        return False
    return torch._C._current_graph_task_id() != -1


def in_recomputation() -> bool:
    """True while a forward on this thread is a checkpoint recomputation.

    That is: autograd's engine is running a backward pass on this thread (where both
    reentrant and non-reentrant ``torch.utils.checkpoint`` recompute), or
    :func:`checkpoint` is recomputing (which may also happen outside backward, when a
    saved tensor is unpacked by hand). Its side effects already happened once.
    """
    return _in_tracked_recompute() or _in_autograd_backward()


def should_update_running_stats(module: torch.nn.Module) -> bool:
    """Whether a BN-like ``module`` may update its running statistics now.

    False in eval, inside :func:`gc_1st_forward` and in a plain checkpoint's recompute.
    Inside :func:`checkpoint`'s recompute it is true for the modules of the block in
    training mode: their buffers are then throw-away copies, so the recompute repeats
    the forward op for op (non-reentrant checkpointing demands the same saved tensors)
    and its updates are discarded.
    """
    if not module.training or in_gc_1st_forward():
        return False
    replay = getattr(_state, "replay", None)
    if replay is not None:
        return id(module) in replay
    return not _in_autograd_backward()


@contextlib.contextmanager
def allow_stateful_recompute():
    """Let stateful modules run inside a backward pass without
    :func:`check_stateful_recompute` raising (for code that restores their memories
    itself)."""
    previous = getattr(_state, "allow_stateful", 0)
    _state.allow_stateful = previous + 1
    try:
        yield
    finally:
        _state.allow_stateful = previous


def check_stateful_recompute(module: nn.Module) -> None:
    """Raise if the stateful ``module`` is being recomputed by a plain checkpoint.

    Call at the start of a stateful module's forward. Inside autograd's backward (where
    ``torch.utils.checkpoint`` recomputes) a stateful module would start from the
    state the forward left, not the one it started from: its recomputed activations
    and so the gradients would be wrong, and it would overwrite its state. Inside
    :func:`checkpoint`'s recompute, or :func:`allow_stateful_recompute`, it passes.
    Memories that are still the registered reset values are harmless and pass too
    (nothing has advanced them yet).

    :raises RuntimeError: naming the module and the fix.
    """
    if _in_tracked_recompute() or getattr(_state, "allow_stateful", 0):
        return
    if not _in_autograd_backward():
        return
    advanced = [name for name, value in _named_memories(module) if not _is_reset_value(module, name, value)]
    if advanced:
        raise RuntimeError(
            f"{type(module).__name__} is stateful (memories {advanced}) and is being run inside "
            "a backward pass, i.e. recomputed by torch.utils.checkpoint. Plain checkpointing restarts "
            "it from the state its forward left instead of the state that forward started from, "
            "which gives wrong gradients and advances the state again. Use "
            "snnorm.memopt.checkpoint(block, x) or snnorm.memopt.checkpoint_module(block) instead "
            "(they restore the memories for the recompute), or wrap code that restores them itself "
            "in snnorm.memopt.allow_stateful_recompute()."
        )


def _named_memories(module: nn.Module) -> Iterable[tuple[str, Any]]:
    fn = getattr(module, "named_memories", None)
    if fn is None or not isinstance(getattr(module, "_memories", None), dict):
        return ()
    return list(fn())


def _is_reset_value(module: nn.Module, name: str, value: Any) -> bool:
    reset_values = getattr(module, "_memories_rv", {})
    if name not in reset_values:
        return False
    rv = reset_values[name]
    if isinstance(value, torch.Tensor) or isinstance(rv, torch.Tensor):
        return (
            isinstance(value, torch.Tensor)
            and isinstance(rv, torch.Tensor)
            and value.shape == rv.shape
            and bool(torch.equal(value.detach().cpu(), rv.detach().cpu()))
        )
    try:
        return bool(value == rv)
    except Exception:  # uncomparable objects: treat as advanced
        return False
