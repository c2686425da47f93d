"""Which module's output feeds which module, recorded from one run of an example input.

torch.fx cannot trace a forward that branches on a tensor (spikingjelly's attention and
transformer blocks check ``x.ndim`` first). :func:`record_handoffs` runs such a network
instead, on a deep copy under ``torch.no_grad`` (the network's own state is untouched),
and watches every module call and every torch function:

* a *handoff* ``(producer, consumer)``: ``consumer`` was called with the very tensor object
  ``producer`` returned, as its only argument;
* an *other user* of ``producer``: anything else touched that tensor (an op outside the
  consumer, a second module, a residual add). Reading its shape or dtype does not count.

The fusion pass uses this as the torch.fx pass's twin: a handoff whose producer has no
other user and whose two modules run once each is a pair that may be fused.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn as nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

# reading metadata is not using the values
_METADATA = {"size", "dim", "numel", "stride", "is_contiguous", "__get__", "data_ptr", "element_size"}


@dataclass
class Handoffs:
    """What one run of the network showed (module names as in ``named_modules``)."""

    pairs: list[tuple[str, str]] = field(default_factory=list)  # (producer, consumer), in call order
    other_users: set[str] = field(default_factory=set)  # producers whose output something else used
    calls: dict[str, int] = field(default_factory=dict)  # module -> number of calls


class _Watch(TorchFunctionMode):
    def __init__(self, names: dict[int, str], watched: Callable[[nn.Module], bool]):
        super().__init__()
        self.names = names
        self.watched = watched
        self.stack: list[str] = []
        self.outputs: dict[int, tuple[str, torch.Tensor]] = {}  # id(output) -> (producer, output)
        self.consumer: dict[str, str] = {}  # producer -> the module it handed its output to
        self.result = Handoffs()

    def _touch(self, values: Any) -> None:
        for value in tree_flatten(values)[0]:
            entry = self.outputs.get(id(value)) if isinstance(value, torch.Tensor) else None
            if entry is None or entry[1] is not value:
                continue
            if self.consumer.get(entry[0]) in self.stack:
                continue  # the consumer at work on its input (its own ops and child modules)
            self.result.other_users.add(entry[0])

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__name__", "") not in _METADATA:
            self._touch((args, kwargs))
        return func(*args, **kwargs)

    def pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        name = self.names[id(module)]
        self.result.calls[name] = self.result.calls.get(name, 0) + 1
        if len(args) == 1 and not kwargs and isinstance(args[0], torch.Tensor):
            entry = self.outputs.get(id(args[0]))
            if entry is not None and entry[1] is args[0] and entry[0] not in self.consumer:
                self.consumer[entry[0]] = name
                self.result.pairs.append((entry[0], name))
                self.stack.append(name)
                return
        self._touch((args, kwargs))
        self.stack.append(name)

    def hook(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        name = self.stack.pop()
        if self.watched(module) and isinstance(output, torch.Tensor):
            self.outputs[id(output)] = (name, output)


def record_handoffs(net: nn.Module, example_input: Any, watched: Callable[[nn.Module], bool]) -> Handoffs:
    """Run ``example_input`` (a tensor, or a tuple of positional arguments) through a deep copy
    of ``net`` and return its :class:`Handoffs` for the modules ``watched`` selects as producers.

    :raises Exception: whatever the network raises on ``example_input``.
    """
    twin = copy.deepcopy(net)
    names = {id(m): name for name, m in twin.named_modules()}
    watch = _Watch(names, watched)
    handles = []
    for module in twin.modules():
        handles.append(module.register_forward_pre_hook(watch.pre_hook, with_kwargs=True))
        handles.append(module.register_forward_hook(watch.hook, with_kwargs=True))
    args = example_input if isinstance(example_input, tuple) else (example_input,)
    try:
        with torch.no_grad(), watch:
            twin(*args)
    finally:
        for handle in handles:
            handle.remove()
    watch.result.calls.pop("", None)  # the network itself
    return watch.result
