"""Activation checkpointing for SNN blocks: side effects once, state restored.

A checkpointed block runs its forward twice: once in the forward pass, keeping only
its inputs, and once more in backward to recompute the activations the gradient
needs. An SNN block has side effects that ordinary checkpointing replays:

* BN-like layers update running statistics (``r ← (1 − m)·r + m·batch``) on every
  training forward, so plain ``torch.utils.checkpoint`` updates them twice;
* stateful modules (:class:`snnorm.base.MemoryModule`, e.g. a LIF neuron's membrane
  ``v``) start each call from the state the previous call left. A recompute that runs
  in backward starts from the state after the forward, not the state the forward
  started from, so it computes other activations (wrong gradients) and then leaves a
  state advanced once more.

snnorm's scheme (the one of spikingjelly 2.0.0's ``memopt.checkpoint``): **the first
forward commits, the recompute does not.** The first forward runs normally and
updates running statistics and memories; the recompute (in backward) must not.

* Every snnorm BN-like layer asks :func:`should_update_running_stats` before it
  updates running statistics. Under plain ``torch.utils.checkpoint`` (reentrant or
  not) that is false in the recompute (it runs inside autograd's backward), so the
  statistics move once. A layer that must not update in training should still hand
  ``F.batch_norm`` tensors (throw-away copies of the running statistics), not None:
  non-reentrant checkpointing requires the recompute to save the same tensors as the
  forward and raises ``CheckpointError`` otherwise.
* :func:`checkpoint` (and :func:`checkpoint_module`) also make stateful blocks exact:
  they record the memories (by reference) and the buffers of modules in training mode
  (copies) that the block had when its forward started. The recompute runs on those
  memories and on throw-away copies of those buffers, with
  :func:`should_update_running_stats` true for the block's training-mode modules, so it
  repeats the forward op for op and its updates land in the copies; afterwards the
  memories and buffers from before the recompute are put back. Plain
  ``torch.nn.BatchNorm*`` layers inside the block therefore also update once.
* Plain ``torch.utils.checkpoint`` cannot restore memories: a stateful module it
  recomputes restarts from the state its forward left, so the recomputed activations,
  hence the gradients, are wrong (the one exact pattern: the whole sequence inside one
  checkpoint and ``reset_net`` before ``backward``). :func:`check_stateful_recompute`
  detects the situation and raises; a stateful module calls it at the start of its
  forward.

:func:`in_gc_1st_forward` belongs to the other scheme (spikingjelly <= 0.0.0.0.14,
the seeds): the first forward runs without grad and must *not* commit, because the
recompute commits. snnorm's checkpoint never sets it. It is true only inside
``with gc_1st_forward():``, for code that runs a forward pass it will throw away and
run again (a dry run, a probe of shapes or of a look-ahead), so that BN-like layers
leave their statistics alone. Do not combine it with :func:`checkpoint`: then neither
pass would commit.

Chen et al., "Training Deep Nets with Sublinear Memory Cost", arXiv 1604.06174.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.utils.checkpoint as torch_checkpoint

from . import _outputs
from ._recompute import (  # the guard lives on the ground floor; its public names stay here
    _named_memories,
    _state,
    allow_stateful_recompute,
    check_stateful_recompute,
    gc_1st_forward,
    in_gc_1st_forward,
    in_recomputation,
    should_update_running_stats,
)
from .base import make_state_dict_transparent

__all__ = [
    "in_gc_1st_forward",
    "gc_1st_forward",
    "in_recomputation",
    "should_update_running_stats",
    "check_stateful_recompute",
    "allow_stateful_recompute",
    "checkpoint",
    "checkpoint_module",
    "CheckpointModule",
]

# -- state of a checkpointed block --------------------------------------------------
class _Snapshot:
    """Memories and buffers of one module at one moment.

    Memories are kept by reference (modules replace them, ``self.v = ...``; the
    recompute must see the very tensors the forward saw, with their autograd history).
    Buffers are cloned (BN updates them in place), and only for modules in training
    mode, the ones that update buffers.
    """

    __slots__ = ("memories", "versions", "buffers")

    def __init__(self, module: nn.Module, clone_buffers: bool):
        self.memories = dict(_named_memories(module))
        self.versions = {
            name: value._version for name, value in self.memories.items() if isinstance(value, torch.Tensor)
        }
        # name -> (live buffer, its value at the start; None once known unchanged)
        self.buffers: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
        if clone_buffers:
            for name, buf in module._buffers.items():
                if buf is not None:
                    self.buffers[name] = (buf, buf.detach().clone())


class _BlockState:
    """Tracks the stateful modules a checkpointed block touches.

    Modules reachable from the function (itself, ``__self__`` of a bound method,
    ``functools.partial`` parts, nn.Module arguments and closure cells) are recorded
    before the forward; any other module the forward calls is recorded on its first
    call (a global forward pre-hook on this thread, for the first forward only).
    """

    def __init__(self) -> None:
        self.start: dict[int, tuple[nn.Module, _Snapshot]] = {}
        self.visited: set[int] = set()
        self.thread = threading.get_ident()
        self.active_forward = False

    def track(self, module: nn.Module) -> None:
        if id(module) in self.visited:  # its submodules were recorded with it
            return
        for m in module.modules():
            self.visited.add(id(m))
            if id(m) not in self.start:
                has_memories = bool(_named_memories(m))
                clone = m.training and any(b is not None for b in m._buffers.values())
                if has_memories or clone:
                    self.start[id(m)] = (m, _Snapshot(m, clone))

    def _hook(self, module: nn.Module, args) -> None:
        if self.active_forward and threading.get_ident() == self.thread:
            self.track(module)

    @contextlib.contextmanager
    def forward_context(self, roots: list[nn.Module]):
        for root in roots:
            self.track(root)
        handle = nn.modules.module.register_module_forward_pre_hook(self._hook)
        self.active_forward = True
        try:
            yield
        finally:
            self.active_forward = False
            handle.remove()
            self._drop_unchanged_buffers()

    def _drop_unchanged_buffers(self) -> None:
        # A buffer the forward did not change is copied from the live one in the
        # recompute: no need to hold a start copy until then. Compare values:
        # batch_norm updates running statistics in place without a version bump.
        for module, snap in self.start.values():
            for name, (obj, start_value) in list(snap.buffers.items()):
                if module._buffers.get(name) is obj and torch.equal(obj, start_value):
                    snap.buffers[name] = (obj, None)

    @contextlib.contextmanager
    def recompute_context(self):
        saved = []
        replay = set()
        for module, snap in self.start.values():
            for name, value in snap.memories.items():
                if isinstance(value, torch.Tensor) and value._version != snap.versions[name]:
                    raise RuntimeError(
                        f"snnorm.memopt.checkpoint: memory {name!r} of {type(module).__name__} was "
                        "modified in place after the checkpointed forward started; the recompute "
                        "cannot start from its original value. Assign new tensors to memories "
                        "(self.v = ...) instead of updating them in place."
                    )
        for module, snap in self.start.values():
            current_memories = dict(_named_memories(module))
            current_buffers = {name: module._buffers.get(name) for name in snap.buffers}
            saved.append((module, current_memories, current_buffers))
            for name, value in snap.memories.items():
                setattr(module, name, value)
            for name, (obj, start_value) in snap.buffers.items():
                # a throw-away copy: the recompute's updates never reach the live buffer
                source = obj if start_value is None else start_value
                module._buffers[name] = source.detach().clone()
        for module, snap in self.start.values():
            # modules in training mode whose buffers (if any) are all throw-away now
            if module.training and all(module._buffers.get(n) is None or n in snap.buffers for n in module._buffers):
                replay.add(id(module))
        previous = getattr(_state, "replay", None)
        _state.replay = frozenset(replay)
        try:
            yield
        finally:
            _state.replay = previous
            for module, memories, buffers in saved:
                for name, value in memories.items():
                    setattr(module, name, value)
                for name, buf in buffers.items():
                    module._buffers[name] = buf


def _modules_of(function: Callable, args: tuple, kwargs: dict) -> list[nn.Module]:
    found: list[nn.Module] = []

    def visit(obj: Any, depth: int) -> None:
        if isinstance(obj, nn.Module):
            found.append(obj)
        elif isinstance(obj, functools.partial) and depth < 3:
            visit(obj.func, depth + 1)
            for a in (*obj.args, *obj.keywords.values()):
                visit(a, depth + 1)
        elif depth < 3:
            owner = getattr(obj, "__self__", None)
            if isinstance(owner, nn.Module):
                found.append(owner)
            for cell in getattr(obj, "__closure__", None) or ():
                try:
                    contents = cell.cell_contents
                except ValueError:  # an empty cell
                    continue
                if isinstance(contents, nn.Module) or callable(contents):
                    visit(contents, depth + 1)

    visit(function, 0)
    for a in (*args, *kwargs.values()):
        if isinstance(a, nn.Module):
            found.append(a)
    return found


def checkpoint(
    function: Callable,
    *args: Any,
    preserve_rng_state: bool = True,
    determinism_check: str = "default",
    **kwargs: Any,
) -> Any:
    """Run ``function(*args, **kwargs)`` with activation checkpointing.

    Non-reentrant ``torch.utils.checkpoint`` underneath: only the inputs are kept; the
    activations are recomputed in backward. On top of it, the recompute

    * does not update running statistics (:func:`in_recomputation` is true in it, and
      the buffers of modules in training mode are swapped for throw-away copies of
      their values at the start of the forward, so plain ``torch.nn.BatchNorm*``
      layers update once as well);
    * starts from the memories of every stateful module (:class:`snnorm.base.MemoryModule`)
      as they were when the forward started, and afterwards leaves them as they were
      before the recompute (normally: as the forward left them).

    So one training step with checkpointing gives the same outputs, gradients, running
    statistics and memories as without. Stateful modules must be reachable from
    ``function`` (an nn.Module, a bound method of one, a ``functools.partial`` or
    closure over one, or an nn.Module argument) or be called through ``module(...)``
    inside it. Plain attributes that are not registered memories or buffers (Python
    counters) are not restored. With grad disabled, ``function`` just runs.

    spikingjelly's ``compressor`` argument is not supported.
    """
    for reserved in ("use_reentrant", "context_fn", "compressor"):
        if reserved in kwargs:
            value = kwargs.pop(reserved)
            if reserved == "use_reentrant" and value is False:
                continue
            if reserved == "compressor" and value is None:
                continue
            raise ValueError(
                f"snnorm.memopt.checkpoint: {reserved}={value!r} is not supported (it is always "
                "non-reentrant, manages its own context_fn, and does not compress inputs)"
            )
    if not callable(function):
        raise TypeError(f"snnorm.memopt.checkpoint: function must be callable, got {type(function).__name__}")
    if not torch.is_grad_enabled():
        return function(*args, **kwargs)
    block = _BlockState()
    roots = _modules_of(function, args, kwargs)
    return torch_checkpoint.checkpoint(
        function,
        *args,
        use_reentrant=False,
        context_fn=lambda: (block.forward_context(roots), block.recompute_context()),
        preserve_rng_state=preserve_rng_state,
        determinism_check=determinism_check,
        **kwargs,
    )


class CheckpointModule(nn.Module):
    """Wraps ``module`` so that each call runs through :func:`checkpoint`.

    ``state_dict`` keys and parameter names are those of the wrapped module (a
    checkpoint saved with or without the wrapper loads into either). With
    ``chunks > 1`` the tensors at positions ``chunked_args`` are split into ``chunks``
    pieces along ``time_dim`` and each piece is checkpointed on its own, the state
    carried from one piece to the next; tensor outputs are concatenated along
    ``time_dim`` (a smaller peak: one chunk's activations are recomputed at a time).
    """

    def __init__(self, module: nn.Module, chunks: int = 1, chunked_args: tuple[int, ...] = (0,), time_dim: int = 0):
        super().__init__()
        if not isinstance(module, nn.Module):
            raise TypeError(f"CheckpointModule: expected an nn.Module, got {type(module).__name__}")
        if isinstance(chunks, bool) or not isinstance(chunks, int) or chunks < 1:
            raise ValueError(f"CheckpointModule: chunks must be a positive int, got {chunks!r}")
        chunked_args = tuple(chunked_args)
        if not chunked_args or not all(isinstance(i, int) and i >= 0 for i in chunked_args):
            raise ValueError(f"CheckpointModule: chunked_args must be non-negative ints, got {chunked_args!r}")
        self.module = module
        self.chunks = chunks
        self.chunked_args = chunked_args
        self.time_dim = time_dim
        make_state_dict_transparent(self, "module")

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.chunks == 1:
            return checkpoint(self.module, *args, **kwargs)
        length = None
        for i in self.chunked_args:
            if i >= len(args) or not isinstance(args[i], torch.Tensor):
                raise ValueError(f"CheckpointModule: chunked argument {i} is not a tensor argument")
            n = args[i].shape[self.time_dim]
            if length is not None and n != length:
                raise ValueError(
                    f"CheckpointModule: chunked arguments differ in length along dim {self.time_dim}: "
                    f"{length} and {n} (all must have the same temporal length)"
                )
            length = n
        if length < self.chunks:
            raise ValueError(
                f"CheckpointModule: chunks={self.chunks} needs at least that many steps along dim "
                f"{self.time_dim} (a temporal length T >= chunks), got {length}"
            )
        pieces = {i: torch.tensor_split(args[i], self.chunks, dim=self.time_dim) for i in self.chunked_args}
        outputs = []
        for k in range(self.chunks):
            chunk_args = [pieces[i][k] if i in pieces else a for i, a in enumerate(args)]
            outputs.append(checkpoint(self.module, *chunk_args, **kwargs))
        return _cat_outputs(outputs, self.time_dim)

    # parameter names without the wrapper's "module." prefix
    def named_parameters(self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True):
        for name, p in self.module.named_parameters(prefix, recurse, remove_duplicate):
            yield name, p

    def named_buffers(self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True):
        for name, b in self.module.named_buffers(prefix, recurse, remove_duplicate):
            yield name, b

    def extra_repr(self) -> str:
        return f"chunks={self.chunks}, chunked_args={self.chunked_args}, time_dim={self.time_dim}"


def _cat_outputs(outputs: list, dim: int):
    """Concatenate the chunks' outputs along ``dim``: tensor members of a tuple, list, dict
    or namedtuple member by member; other members must be the same in every chunk."""

    def cat(tensors: list[torch.Tensor]) -> torch.Tensor:
        if tensors[0].dim() == 0:
            raise ValueError(
                "CheckpointModule: the module returns a 0-dim tensor (a scalar such as a loss), which "
                "cannot be concatenated over chunks; return it per timestep or use chunks=1"
            )
        return torch.cat(tensors, dim=dim)

    return _outputs.merge_outputs(outputs, cat, "CheckpointModule (chunks)")


def checkpoint_module(
    module: nn.Module, *, chunks: int = 1, chunked_args: tuple[int, ...] = (0,), time_dim: int = 0
) -> CheckpointModule:
    """Return ``module`` wrapped in a :class:`CheckpointModule` (spikingjelly's API)."""
    return CheckpointModule(module, chunks=chunks, chunked_args=chunked_args, time_dim=time_dim)
