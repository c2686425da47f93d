"""Step-mode and memory modules: the spikingjelly ``activation_based.base`` API.

A :class:`StepModule` runs either one timestep per call (``step_mode='s'``, input
``[N, ...]``) or a whole sequence (``step_mode='m'``, input ``[T, N, ...]``).
A :class:`MemoryModule` also holds state across calls (the membrane potential of a
neuron, a timestep counter) registered with :meth:`MemoryModule.register_memory` and
restored by :meth:`MemoryModule.reset` (or :func:`snnorm.functional.reset_net`).

The module-level :func:`named_memories`, :func:`extract_memories`, :func:`load_memories`
and :func:`to_functional_forward` (and ``MemoryModule.functional_forward``) are
spikingjelly's explicit-state API: run a network from given states and get the new ones.

Every snnorm module has a ``backend`` property, validated against its
``supported_backends`` tuple; modules look their math up in
``snnorm.backends.get_ops(self.backend)``.
"""

from __future__ import annotations

import copy
from typing import Any, Callable, Iterator

import torch
import torch.nn as nn

from . import backends
from ._recompute import check_stateful_recompute

__all__ = [
    "StepModule",
    "SingleStepModule",
    "MultiStepModule",
    "MemoryModule",
    "named_memories",
    "memories",
    "extract_memories",
    "load_memories",
    "to_functional_forward",
    "make_state_dict_transparent",
]


def _without_history(value: Any) -> Any:
    if isinstance(value, torch.Tensor) and value.grad_fn is not None:
        return value.detach()
    return value


class StepModule:
    """Mixin giving a validated ``step_mode`` and ``backend``.

    ``supported_step_modes`` and ``supported_backends`` are class attributes (tuples);
    subclasses narrow or widen them.
    """

    supported_step_modes: tuple[str, ...] = ("s", "m")
    supported_backends: tuple[str, ...] = ("torch",)
    #: containers that run their children one step at a time set this: set_step_mode
    #: then leaves the children alone (as spikingjelly does)
    owns_children_step_mode: bool = False

    def supported_step_mode(self) -> tuple[str, ...]:  # spikingjelly spelling
        return self.supported_step_modes

    @property
    def step_mode(self) -> str:
        return self.__dict__.get("_step_mode", self.supported_step_modes[0])

    @step_mode.setter
    def step_mode(self, value: str) -> None:
        if value not in self.supported_step_modes:
            raise ValueError(
                f"{type(self).__name__}: step_mode must be one of "
                f"{self.supported_step_modes}, got {value!r}"
            )
        self.__dict__["_step_mode"] = value

    @property
    def backend(self) -> str:
        return self.__dict__.get("_backend", "torch")

    @backend.setter
    def backend(self, value: str) -> None:
        if value not in self.supported_backends:
            raise ValueError(
                f"{type(self).__name__}: backend must be one of "
                f"{self.supported_backends}, got {value!r}"
            )
        backends.get_ops(value)  # raises BackendUnavailableError with the reason
        self.__dict__["_backend"] = value

    @property
    def ops(self) -> backends.OpTable:
        """The op table of this module's backend."""
        return backends.get_ops(self.backend)


class SingleStepModule(StepModule):
    supported_step_modes = ("s",)


class MultiStepModule(StepModule):
    supported_step_modes = ("m",)


class MemoryModule(nn.Module, StepModule):
    """A module with state that persists across calls until :meth:`reset`.

    ``register_memory(name, value)`` declares a state variable and its reset value;
    it is then read and written as an attribute (``self.v``). ``forward`` dispatches to
    :meth:`single_step_forward` (``[N, ...]``) or :meth:`multi_step_forward`
    (``[T, N, ...]``); the default multi-step forward loops over T.
    """

    def __init__(self) -> None:
        super().__init__()
        self._memories: dict[str, Any] = {}
        self._memories_rv: dict[str, Any] = {}
        self.step_mode = "s"

    # -- memories -------------------------------------------------------------
    def register_memory(self, name: str, value: Any) -> None:
        if name in self._memories or hasattr(self, name):
            raise ValueError(
                f"{type(self).__name__}: cannot register memory {name!r}: "
                "an attribute of that name already exists"
            )
        self._memories[name] = value
        self._memories_rv[name] = copy.deepcopy(value)

    def reset(self) -> None:
        """Restore every memory to the value it was registered with."""
        for name, value in self._memories_rv.items():
            self._memories[name] = copy.deepcopy(value)

    def detach(self) -> None:
        """Cut the autograd history of tensor memories (truncated BPTT)."""
        for name, value in self._memories.items():
            if isinstance(value, torch.Tensor):
                self._memories[name] = value.detach()

    def set_reset_value(self, name: str, value: Any) -> None:
        """Make ``value`` what memory ``name`` is restored to by :meth:`reset`."""
        if name not in self._memories:
            raise KeyError(f"{type(self).__name__}: {name!r} is not a registered memory")
        self._memories_rv[name] = copy.deepcopy(value)

    def get_reset_value(self, name: str) -> Any:
        """The value memory ``name`` is restored to by :meth:`reset`."""
        if name not in self._memories:
            raise KeyError(f"{type(self).__name__}: {name!r} is not a registered memory")
        return self._memories_rv[name]

    def __dir__(self):
        return sorted(set(super().__dir__()) | set(self._memories))

    # -- explicit state (spikingjelly's functional-forward protocol) ---------
    def materialize_states(self, inputs: tuple, states: tuple, step_mode: str) -> tuple:
        """States ready for :meth:`functional_forward` (unchanged by default)."""
        return states

    def _forward_with_states(self, step_forward: Callable, inputs: tuple, states: tuple, kwargs: dict):
        names = list(self._memories)
        if len(states) != len(names):
            raise ValueError(
                f"{type(self).__name__} has {len(names)} memories {names}, but got {len(states)} states"
            )
        saved = dict(self._memories)
        try:
            self._memories.update(zip(names, states))
            outputs = step_forward(*inputs, **kwargs)
            updated = tuple(self._memories[name] for name in names)
        finally:
            self._memories.update(saved)  # the module's own memories are left as they were
        return (tuple(outputs) if isinstance(outputs, (tuple, list)) else (outputs,)), updated

    def single_step_functional_forward(self, inputs: tuple, states: tuple, **kwargs):
        """``(outputs, new_states)`` of one step from explicit ``states`` (in memory order).

        The module's memories are not changed; its buffers are (a BN in training
        updates its running statistics, as in a normal call).
        """
        return self._forward_with_states(self.single_step_forward, inputs, states, kwargs)

    def multi_step_functional_forward(self, inputs: tuple, states: tuple, **kwargs):
        """``(outputs, new_states)`` of a ``[T, N, ...]`` sequence from explicit ``states``."""
        return self._forward_with_states(self.multi_step_forward, inputs, states, kwargs)

    def functional_forward(self, inputs: tuple, states: tuple, **kwargs):
        """:meth:`single_step_functional_forward` or the multi-step one, by ``step_mode``."""
        states = self.materialize_states(inputs, states, self.step_mode)
        if self.step_mode == "s":
            return self.single_step_functional_forward(inputs, states, **kwargs)
        return self.multi_step_functional_forward(inputs, states, **kwargs)

    def memories(self) -> Iterator[Any]:
        yield from self._memories.values()

    def named_memories(self) -> Iterator[tuple[str, Any]]:
        yield from self._memories.items()

    def __getattr__(self, name: str) -> Any:
        memories = self.__dict__.get("_memories")
        if memories is not None and name in memories:
            return memories[name]
        return super().__getattr__(name)

    def __setattr__(self, name: str, value: Any) -> None:
        memories = self.__dict__.get("_memories")
        if memories is not None and name in memories:
            memories[name] = value
        else:
            super().__setattr__(name, value)

    def __delattr__(self, name: str) -> None:
        if name in self._memories:
            del self._memories[name]
            del self._memories_rv[name]
        else:
            super().__delattr__(name)

    def _apply(self, fn, *args, **kwargs):
        for store in (self._memories, self._memories_rv):
            for name, value in store.items():
                if isinstance(value, torch.Tensor):
                    store[name] = fn(value)
        return super()._apply(fn, *args, **kwargs)

    def __getstate__(self):
        """What ``copy.deepcopy`` and pickling (``torch.save(model)``) copy.

        Works in the middle of a sequence (an EMA or best-model copy): memories, and
        any other tensor attribute (``v_seq``), that carry autograd history are copied
        detached — same values, a leaf without ``requires_grad`` — so a copy's graph
        never reaches into the original's (torch refuses to deepcopy a non-leaf tensor).
        """
        state = super().__getstate__()
        for key in ("_memories", "_memories_rv"):
            state[key] = {name: _without_history(value) for name, value in state[key].items()}
        return {key: _without_history(value) for key, value in state.items()}

    def _replicate_for_data_parallel(self):
        replica = super()._replicate_for_data_parallel()
        replica._memories = self._memories.copy()
        return replica

    # -- forward --------------------------------------------------------------
    def single_step_forward(self, x: torch.Tensor, *args, **kwargs):
        raise NotImplementedError(f"{type(self).__name__} has no single-step forward")

    def multi_step_forward(self, x_seq: torch.Tensor, *args, **kwargs):
        return torch.stack([self.single_step_forward(x, *args, **kwargs) for x in x_seq])

    def forward(self, *args, **kwargs):
        if not torch.compiler.is_compiling():
            # a plain torch.utils.checkpoint recompute would restart from the wrong state
            check_stateful_recompute(self)
        if self.step_mode == "s":
            return self.single_step_forward(*args, **kwargs)
        return self.multi_step_forward(*args, **kwargs)

    def extra_repr(self) -> str:
        return f"step_mode={self.step_mode}, backend={self.backend}"


# -- memories of a whole network (spikingjelly's module-level helpers) ---------------


def named_memories(module: nn.Module, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """``(dotted name, value)`` of every memory in ``module``'s tree, like ``named_parameters``."""
    for name, sub in module.named_modules(prefix=prefix):
        if isinstance(sub, MemoryModule):
            for memory, value in sub.named_memories():
                yield (f"{name}.{memory}" if name else memory), value


def memories(module: nn.Module) -> Iterator[Any]:
    """The value of every memory in ``module``'s tree, in :func:`named_memories` order."""
    for _, value in named_memories(module):
        yield value


def extract_memories(module: nn.Module) -> list:
    """The memories of ``module``'s tree as a list (for :func:`load_memories`)."""
    return list(memories(module))


def load_memories(module: nn.Module, memory_list: list) -> None:
    """Set the memories of ``module``'s tree from a list in :func:`named_memories` order."""
    owners = [
        (sub, memory) for _, sub in module.named_modules() if isinstance(sub, MemoryModule)
        for memory in sub._memories
    ]
    if len(owners) != len(memory_list):
        raise ValueError(
            f"load_memories: {type(module).__name__} has {len(owners)} memories but the list holds "
            f"{len(memory_list)} (Memory length mismatch)"
        )
    for (sub, memory), value in zip(owners, memory_list):
        sub._memories[memory] = value


def _has_functional_forward(module: nn.Module) -> bool:
    """Whether ``module.functional_forward`` computes what ``module.forward`` does.

    snnorm's :meth:`MemoryModule.functional_forward` swaps the states in and runs the
    step forward, so it stands for ``forward`` unless a subclass replaced ``forward``
    without giving a functional version of its own.
    """
    kind = type(module)
    return (
        kind.forward is MemoryModule.forward
        or kind.functional_forward is not MemoryModule.functional_forward
        or kind.single_step_functional_forward is not MemoryModule.single_step_functional_forward
        or kind.multi_step_functional_forward is not MemoryModule.multi_step_functional_forward
    )


def _as_outputs(result: Any) -> tuple:
    """A tuple or list output spreads into the next call's positional arguments."""
    return tuple(result) if isinstance(result, (tuple, list)) else (result,)


def to_functional_forward(module: nn.Module, fn: Callable | None = None) -> Callable:
    """``f(inputs, states, **kwargs) -> (outputs, new_states)`` for ``module`` (or ``fn``).

    ``inputs`` and ``outputs`` are tuples (a single output too); ``states`` are the
    memories of the whole tree in :func:`named_memories` order. The module's own
    memories are left as they were, so calls do not depend on one another. As in
    spikingjelly 2.0.0, with ``fn=None``:

    * a :class:`MemoryModule` that is the only memory module of its tree runs its
      :meth:`MemoryModule.functional_forward` with ``**kwargs``;
    * a plain ``nn.Sequential`` (``forward`` not overridden) runs its children in order:
      ``**kwargs`` go to the first child only, and a tuple (or list) output of one child
      is spread into the next child's positional arguments. Memory children whose states
      are all their own run their functional forward; otherwise the states are loaded
      into the tree for the run;
    * any other module runs ``module.forward(*inputs, **kwargs)`` (``fn(...)`` when given)
      with the states loaded into the tree, which is restored afterwards.

    :raises ValueError: ``states`` does not hold one value per memory of the tree.
    """
    memory_modules = [sub for sub in module.modules() if isinstance(sub, MemoryModule)]
    count = sum(len(sub._memories) for sub in memory_modules)

    def check_state_count(states: tuple) -> None:
        if len(states) != count:
            raise ValueError(f"{type(module).__name__} expected {count} states, but got {len(states)}")

    if fn is None and isinstance(module, MemoryModule) and len(memory_modules) == 1 and _has_functional_forward(module):

        def direct_forward(inputs: tuple, states: tuple, **kwargs):
            check_state_count(states)
            return module.functional_forward(tuple(inputs), tuple(states), **kwargs)

        return direct_forward

    forward = module.forward if fn is None else fn
    if fn is None and isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward:
        children = list(module._modules.values())
        own_counts = [
            len(child._memories) if isinstance(child, MemoryModule) and _has_functional_forward(child) else 0
            for child in children
        ]
        if sum(own_counts) == count:  # every memory sits in a direct child: no loading needed

            def sequential_forward(inputs: tuple, states: tuple, **kwargs):
                check_state_count(states)
                outputs, updated, offset = tuple(inputs), [], 0
                for index, (child, own) in enumerate(zip(children, own_counts)):
                    child_kwargs = kwargs if index == 0 else {}
                    if own:
                        outputs, child_states = child.functional_forward(
                            outputs, tuple(states[offset:offset + own]), **child_kwargs
                        )
                        updated.extend(child_states)
                        offset += own
                    else:
                        outputs = _as_outputs(child(*outputs, **child_kwargs))
                return outputs, tuple(updated)

            return sequential_forward

        def chain_forward(*inputs, **kwargs):  # the chain above, with the states loaded instead
            outputs = inputs
            for index, child in enumerate(children):
                outputs = _as_outputs(child(*outputs, **(kwargs if index == 0 else {})))
            return outputs

        forward = chain_forward

    def fallback_forward(inputs: tuple, states: tuple, **kwargs):
        check_state_count(states)
        saved = extract_memories(module)
        load_memories(module, list(states))
        try:
            outputs = _as_outputs(forward(*inputs, **kwargs))
            updated = tuple(extract_memories(module))
        finally:
            load_memories(module, saved)
        return outputs, updated

    return fallback_forward


def make_state_dict_transparent(wrapper: nn.Module, inner: str) -> None:
    """Show the ``state_dict`` keys (and version metadata) of ``wrapper``'s child ``inner`` at
    ``wrapper``'s own prefix, on save and on load, so a checkpoint saved with or without the
    wrapper loads into either (:class:`snnorm.memopt.CheckpointModule`, the fused blocks of
    :mod:`snnorm.fusion`). ``wrapper`` must hold no state of its own."""

    def strip(module, state_dict, prefix, local_metadata):
        head = prefix + inner + "."
        for key in [k for k in state_dict if k.startswith(head)]:
            state_dict[prefix + key[len(head):]] = state_dict.pop(key)
        metadata = getattr(state_dict, "_metadata", None)
        if metadata is not None and head[:-1] in metadata:
            metadata[prefix[:-1]] = metadata.pop(head[:-1])
        return state_dict

    def add(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        # every key under the wrapper's prefix is its child's ("1." does not prefix "10.")
        head = prefix + inner + "."
        for key in [k for k in state_dict if k.startswith(prefix) and not k.startswith(head)]:
            state_dict[head + key[len(prefix):]] = state_dict.pop(key)
        metadata = getattr(state_dict, "_metadata", None)
        if metadata is not None and prefix[:-1] in metadata:
            metadata[head[:-1]] = metadata[prefix[:-1]]

    wrapper._register_state_dict_hook(strip)
    wrapper._register_load_state_dict_pre_hook(add)
