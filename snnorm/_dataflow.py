"""Which module's output feeds which module, recorded from one run of an example input.

torch.fx cannot trace a forward that branches on a tensor (spikingjelly's attention and
transformer blocks check ``x.ndim`` first). :func:`record_handoffs` runs such a network
instead, on a deep copy under ``torch.no_grad`` (the network's own state is untouched),
and watches every module call and every torch function:

* a *handoff* ``(producer, consumer)``: ``consumer`` was called with the very tensor object
  ``producer`` returned, as its only argument;
* an *other user* of ``producer``: anything else touched that tensor (an op outside the
  consumer, a second module, a residual add). Reading its shape or dtype does not count.

A handoff may pass through one :class:`Relayout` (``transpose``, ``permute``, ``swapaxes``,
``.mT``): the consumer then gets a view of the producer's output in another layout, which
counts as the output itself (Spikformer's ``sn(bn(x.mT).mT)``); :attr:`Handoffs.relayouts` says
which change it was.

The fusion pass uses this as the torch.fx pass's twin: a handoff whose producer has no
other user and whose two modules run once each is a pair that may be fused.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
import torch.nn as nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

# reading metadata is not using the values
_METADATA = {"size", "dim", "numel", "stride", "is_contiguous", "__get__", "data_ptr", "element_size"}


@dataclass(frozen=True)
class Relayout:
    """A layout change as written, ``transpose(d0, d1)`` or ``permute(*dims)`` (dims may be
    negative: the permutation of an ``ndim``-dim tensor is :meth:`perm`). Applied to a tensor it
    gives a view (same storage, permuted shape and strides)."""

    op: str  # "transpose" or "permute"
    dims: tuple[int, ...]

    def perm(self, ndim: int) -> tuple[int, ...]:
        """The full permutation for an ``ndim``-dim tensor (``t.permute(perm)``).

        :raises ValueError: the dims do not fit ``ndim``."""
        if any(not -ndim <= d < ndim for d in self.dims) or (self.op == "permute" and len(self.dims) != ndim):
            raise ValueError(f"{self} does not apply to a {ndim}-dim tensor")
        if self.op == "permute":
            return tuple(d % ndim for d in self.dims)
        order = list(range(ndim))
        a, b = (d % ndim for d in self.dims)
        order[a], order[b] = order[b], order[a]
        return tuple(order)

    def keeps_time(self, ndim: int) -> bool:
        """Whether dim 0 (T of a multi-step sequence) stays where it is."""
        try:
            return self.perm(ndim)[0] == 0
        except ValueError:
            return False

    def moves_time(self) -> bool:
        """Whether it moves dim 0 whatever ``ndim`` is (negative dims decide only once ``ndim`` is known)."""
        return (0 in self.dims) if self.op == "transpose" else (self.dims[0] % len(self.dims) != 0)

    def apply(self, t: torch.Tensor) -> torch.Tensor:
        return t.permute(self.perm(t.ndim))

    def apply_to_state(self, v: torch.Tensor, inverse: bool = False) -> torch.Tensor:
        """The change (or its inverse) on one step's ``[N, ...]`` tensor of a ``[T, N, ...]``
        sequence that it keeps T of: a neuron's membrane."""
        perm = [d - 1 for d in self.perm(v.ndim + 1)[1:]]
        return v.permute([perm.index(i) for i in range(len(perm))] if inverse else perm)

    def __str__(self) -> str:
        return f"{self.op}({', '.join(map(str, self.dims))})"


_RELAYOUT_OPS = {"transpose": "transpose", "swapaxes": "transpose", "swapdims": "transpose", "permute": "permute"}


def relayout_of(name: str, args: tuple, kwargs: dict) -> Optional[Relayout]:
    """The :class:`Relayout` of a call ``name(tensor, *args, **kwargs)`` (a torch function, a
    tensor method or the ``mT`` attribute), or None when it is no layout change of constant dims."""
    if name == "mT":
        return Relayout("transpose", (-2, -1)) if not args and not kwargs else None
    op = _RELAYOUT_OPS.get(name)
    if op is None:
        return None
    dims = tuple(kwargs.values()) if not args else args
    if op == "permute" and len(dims) == 1 and isinstance(dims[0], (list, tuple)):
        dims = tuple(dims[0])
    if (args and kwargs) or not all(type(d) is int for d in dims) or (op == "transpose" and len(dims) != 2):
        return None
    return Relayout(op, tuple(dims))


@dataclass
class Handoffs:
    """What one run of the network showed (module names as in ``named_modules``)."""

    pairs: list[tuple[str, str]] = field(default_factory=list)  # (producer, consumer), in call order
    other_users: set[str] = field(default_factory=set)  # producers whose output something else used
    calls: dict[str, int] = field(default_factory=dict)  # module -> number of calls
    relayouts: dict[str, Relayout] = field(default_factory=dict)  # producer -> the change its handoff went through
    ndims: dict[str, int] = field(default_factory=dict)  # producer -> its output's ndim, where it went through one


class _Watch(TorchFunctionMode):
    def __init__(self, names: dict[int, str], watched: Callable[[nn.Module], bool]):
        super().__init__()
        self.names = names
        self.watched = watched
        self.stack: list[str] = []
        # id(output) -> (producer, output or its relaid view, the Relayout of that view or None)
        self.outputs: dict[int, tuple[str, torch.Tensor, Optional[Relayout]]] = {}
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
        name = getattr(func, "__name__", "")
        attribute = getattr(getattr(func, "__self__", None), "__name__", "") if name == "__get__" else ""
        relaid = self._relaid(attribute or name, args, kwargs)  # .mT is a layout change, .shape metadata
        if relaid is None and name not in _METADATA:
            self._touch((args, kwargs))
        out = func(*args, **kwargs)
        if relaid is not None and isinstance(out, torch.Tensor):
            self.outputs[id(out)] = (relaid[0], out, relaid[1])
        return out

    def _relaid(self, name: str, args: tuple, kwargs: dict) -> Optional[tuple[str, Relayout]]:
        """(producer, change) when this call changes the layout of a producer's own output."""
        entry = self.outputs.get(id(args[0])) if args and isinstance(args[0], torch.Tensor) else None
        if entry is None or entry[1] is not args[0] or entry[2] is not None:
            return None
        relayout = relayout_of(name, args[1:], kwargs)
        return None if relayout is None else (entry[0], relayout)

    def pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        name = self.names[id(module)]
        self.result.calls[name] = self.result.calls.get(name, 0) + 1
        if len(args) == 1 and not kwargs and isinstance(args[0], torch.Tensor):
            entry = self.outputs.get(id(args[0]))
            if entry is not None and entry[1] is args[0] and entry[0] not in self.consumer:
                self.consumer[entry[0]] = name
                self.result.pairs.append((entry[0], name))
                if entry[2] is not None:
                    self.result.relayouts[entry[0]] = entry[2]
                    self.result.ndims[entry[0]] = entry[1].ndim
                self.stack.append(name)
                return
        self._touch((args, kwargs))
        self.stack.append(name)

    def hook(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        name = self.stack.pop()
        if self.watched(module) and isinstance(output, torch.Tensor):
            self.outputs[id(output)] = (name, output, None)


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
