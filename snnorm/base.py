"""Step-mode and memory modules: the spikingjelly ``activation_based.base`` API.

A :class:`StepModule` runs either one timestep per call (``step_mode='s'``, input
``[N, ...]``) or a whole sequence (``step_mode='m'``, input ``[T, N, ...]``).
A :class:`MemoryModule` also holds state across calls (the membrane potential of a
neuron, a timestep counter) registered with :meth:`MemoryModule.register_memory` and
restored by :meth:`MemoryModule.reset` (or :func:`snnorm.functional.reset_net`).

Every snnorm module has a ``backend`` property, validated against its
``supported_backends`` tuple; modules look their math up in
``snnorm.backends.get_ops(self.backend)``.
"""

from __future__ import annotations

import copy
from typing import Any, Iterator

import torch
import torch.nn as nn

from . import backends, memopt

__all__ = ["StepModule", "SingleStepModule", "MultiStepModule", "MemoryModule"]


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
            memopt.check_stateful_recompute(self)
        if self.step_mode == "s":
            return self.single_step_forward(*args, **kwargs)
        return self.multi_step_forward(*args, **kwargs)

    def extra_repr(self) -> str:
        return f"step_mode={self.step_mode}, backend={self.backend}"
