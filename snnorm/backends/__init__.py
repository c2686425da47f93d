"""The backend registry.

A backend is a named op table: a mapping from the op names in :data:`OP_NAMES` to
functions of tensors and plain values. Modules validate their input, then call
``backends.get_ops(self.backend).<op>(...)``. The ``torch`` backend
(:mod:`snnorm.backends.torch_backend`) is the reference: plain PyTorch, the executable
specification. Every other backend must fill the same slots and agree with it.

Backends are loaded lazily, on first use, so ``import snnorm`` never imports triton.
A loader that cannot run on this machine raises :class:`BackendUnavailableError` with
the reason; :func:`available_backends` reports it.
"""

from __future__ import annotations

import importlib
from typing import Callable, Mapping

__all__ = [
    "OP_NAMES",
    "OpTable",
    "BackendUnavailableError",
    "register_backend",
    "get_ops",
    "available_backends",
    "backend_names",
]

#: The slots every backend fills. Signatures and math: see torch_backend.py.
OP_NAMES: tuple[str, ...] = (
    "lif", "mpbn_lif", "mpbn_lif_folded", "tebn", "tab", "batch_norm_seq", "bntt", "row_norm",
)


class BackendUnavailableError(RuntimeError):
    """A backend that is registered but cannot run here (the message says why)."""


class OpTable:
    """Read-only attribute access to a backend's ops (``ops.mpbn_lif(...)``)."""

    def __init__(self, name: str, ops: Mapping[str, Callable]):
        missing = [op for op in OP_NAMES if op not in ops]
        if missing:
            raise TypeError(f"backend {name!r} does not fill the op slots {missing}")
        self.name = name
        # a private plain dict, not a MappingProxyType: torch.compile graph-breaks on reading a
        # mappingproxy once any dict was mutated in the traced region (e.g. a neuron's memories)
        self._ops = dict(ops)

    def __getattr__(self, op: str) -> Callable:
        try:
            return self.__dict__["_ops"][op]
        except KeyError:
            raise AttributeError(f"backend {self.__dict__.get('name')!r} has no op {op!r}") from None

    def __repr__(self) -> str:
        return f"OpTable({self.name!r}, ops={list(self._ops)})"


# name -> loader returning the op mapping (or raising BackendUnavailableError)
_LOADERS: dict[str, Callable[[], Mapping[str, Callable]]] = {}
_LOADED: dict[str, OpTable] = {}


def register_backend(name: str, loader: Callable[[], Mapping[str, Callable]]) -> None:
    """Register ``loader`` (called once, on first use) as backend ``name``."""
    _LOADERS[name] = loader
    _LOADED.pop(name, None)


def backend_names() -> tuple[str, ...]:
    return tuple(_LOADERS)


def get_ops(name: str) -> OpTable:
    """The op table of backend ``name``.

    Raises ValueError for an unknown name and BackendUnavailableError (with the
    reason) for a backend that cannot run on this machine.
    """
    table = _LOADED.get(name)
    if table is not None:
        return table
    if name not in _LOADERS:
        raise ValueError(f"unknown backend {name!r}; registered backends: {backend_names()}")
    table = OpTable(name, _LOADERS[name]())
    _LOADED[name] = table
    return table


def available_backends() -> dict[str, str | None]:
    """Every registered backend mapped to ``None`` if it runs here, else the reason."""
    status: dict[str, str | None] = {}
    for name in _LOADERS:
        try:
            get_ops(name)
            status[name] = None
        except BackendUnavailableError as err:
            status[name] = str(err)
    return status


def _module_loader(module: str) -> Callable[[], Mapping[str, Callable]]:
    def load() -> Mapping[str, Callable]:
        return importlib.import_module(module, __name__).load_ops()

    return load


register_backend("torch", _module_loader(".torch_backend"))
register_backend("triton", _module_loader(".triton_backend"))
