"""Network-level helpers (spikingjelly ``activation_based.functional`` API).

``reset_net``, ``set_step_mode``, ``set_backend``, ``detach_net`` walk a network, snnorm
modules and foreign ones (spikingjelly's, a user's) alike; ``seq_to_ann_forward``,
``multi_step_forward`` (and their ``t_last_`` variants), ``chunk_multi_step_forward`` run
stateless or stateful modules over a ``[T, N, ...]`` sequence, tuple inputs and outputs
included. The conv-BN fusion helpers (``fused_conv2d_*_of_convbn2d``, ``fuse_convbn2d``,
``fuse_conv_bn_eval``) fold an eval-mode BatchNorm into the convolution before it;
``fuse_conv_bn_eval_modules`` and ``pack_conv_bn_train_modules`` do it for a whole
network (spikingjelly's ``functional.conv_bn_fusion``). ``fuse_norm_neurons`` fuses a
batch-statistics norm with the neuron after it.

This module is the spikingjelly-named front on the top floor: the step helpers live in
:mod:`snnorm._steps` (below the layers, which use them), conv-BN folding in
:mod:`snnorm.folding`, the torch.fx passes in :mod:`snnorm._fx` and norm→neuron fusion in
:mod:`snnorm.fusion`; the names are re-exported here."""

from __future__ import annotations

import sys
import warnings
from typing import Sequence

import torch.nn as nn

from . import backends, base
from . import fusion as _fusion
from ._fx import _supported_step_modes
from .folding import (  # noqa: F401  (conv-BN folding lives in snnorm.folding; this is its public path)
    fuse_conv_bn_eval,
    fuse_conv_bn_eval_modules,
    fuse_convbn2d,
    fused_conv2d_bias_of_convbn2d,
    fused_conv2d_weight_of_convbn2d,
    pack_conv_bn_train_modules,
    scale_fused_conv2d_bias_of_convbn2d,
    scale_fused_conv2d_weight_of_convbn2d,
)
from ._steps import (  # noqa: F401  (the step helpers live below the layers; this is their public path)
    chunk_multi_step_forward,
    multi_step_forward,
    seq_to_ann_forward,
    t_last_multi_step_forward,
    t_last_seq_to_ann_forward,
)

__all__ = [
    "reset_net",
    "collect_reset_modules",
    "reset_collected_modules",
    "invalidate_reset_cache",
    "set_step_mode",
    "set_backend",
    "detach_net",
    "seq_to_ann_forward",
    "t_last_seq_to_ann_forward",
    "multi_step_forward",
    "t_last_multi_step_forward",
    "chunk_multi_step_forward",
    "fused_conv2d_weight_of_convbn2d",
    "fused_conv2d_bias_of_convbn2d",
    "scale_fused_conv2d_weight_of_convbn2d",
    "scale_fused_conv2d_bias_of_convbn2d",
    "fuse_convbn2d",
    "fuse_conv_bn_eval",
    "fuse_conv_bn_eval_modules",
    "pack_conv_bn_train_modules",
    "fuse_norm_neurons",
    "unfuse_norm_neurons",
]


def _warn_foreign(action: str, module: nn.Module, contract: str, stacklevel: int = 3) -> None:
    # once per class and call site (the warnings registry): reset_net runs every batch
    cls = type(module)
    warnings.warn(
        f"{action}: called on {cls.__module__}.{cls.__qualname__}, which is not a snnorm {contract}; "
        f"snnorm cannot check what it does (spikingjelly warns the same way)",
        stacklevel=stacklevel,
    )


def reset_net(net: nn.Module) -> None:
    """Call ``reset()`` on every module of ``net`` that has one (those added later too).

    snnorm's stateful modules (:class:`snnorm.base.MemoryModule`) restore their registered
    memories. Other modules with a callable ``reset`` (a spikingjelly neuron, a user's
    recurrent cell) are reset too, with a warning as in spikingjelly, once per class:
    snnorm cannot vouch for what their ``reset`` does. Unlike spikingjelly, the list of
    modules is not cached, so modules added or swapped after a first call are reset.
    """
    _reset_modules(collect_reset_modules(net), stacklevel=4)


def collect_reset_modules(net: nn.Module) -> tuple[nn.Module, ...]:
    """The modules of ``net`` that :func:`reset_net` resets (those with a callable ``reset``)."""
    return tuple(m for m in net.modules() if callable(getattr(m, "reset", None)))


def reset_collected_modules(modules: Sequence[nn.Module]) -> None:
    """Reset ``modules`` (from :func:`collect_reset_modules`), warning for non-snnorm ones."""
    _reset_modules(modules, stacklevel=4)


def _reset_modules(modules: Sequence[nn.Module], stacklevel: int) -> None:
    for module in modules:
        if not isinstance(module, base.MemoryModule):
            _warn_foreign("reset_net: reset()", module, "MemoryModule", stacklevel)
        module.reset()


def invalidate_reset_cache(net: nn.Module) -> None:
    """Does nothing: snnorm's :func:`reset_net` walks the network on every call, so there is
    no cache to clear after a module swap (spikingjelly caches the module list)."""


def detach_net(net: nn.Module) -> None:
    """Detach the state of every module of ``net`` that has ``detach()`` (truncated BPTT).

    As :func:`reset_net`: modules that are not snnorm MemoryModules are detached too, with
    a warning once per class.
    """
    for module in net.modules():
        detach = getattr(module, "detach", None)
        if not callable(detach):
            continue
        if not isinstance(module, base.MemoryModule):
            _warn_foreign("detach_net: detach()", module, "MemoryModule")
        detach()


def _foreign_step_containers() -> tuple[type, ...]:
    """spikingjelly's containers that run their children step by step (if it is loaded)."""
    sj_layer = sys.modules.get("spikingjelly.activation_based.layer")
    names = ("StepModeContainer", "MultiStepContainer", "SeqToANNContainer", "TLastMultiStepContainer",
             "TLastSeqToANNContainer", "ElementWiseRecurrentContainer", "LinearRecurrentContainer")
    return tuple(getattr(sj_layer, n) for n in names if isinstance(getattr(sj_layer, n, None), type))


def _owns_children_step_mode(module: nn.Module, foreign_containers: tuple[type, ...]) -> bool:
    return bool(getattr(module, "owns_children_step_mode", False)) or isinstance(module, foreign_containers)


def set_step_mode(net: nn.Module, step_mode: str) -> None:
    """Set ``step_mode`` ('s' or 'm') on every module of ``net`` that has a ``step_mode``.

    snnorm and spikingjelly modules alike. The children of containers that run them
    step by step (snnorm's and spikingjelly's ``SeqToANNContainer``,
    ``MultiStepContainer``, ...) keep their mode, as in spikingjelly. Every module is
    checked before any is changed: one whose declared modes (snnorm's
    ``supported_step_modes``, spikingjelly's ``supported_step_mode()``) do not include
    ``step_mode`` raises ValueError naming it, and nothing is changed. A module with a
    ``step_mode`` but no declared modes is set anyway, with a warning (spikingjelly's
    rule); if its own setter rejects the value, the modules already set are restored.
    """
    if step_mode not in ("s", "m"):
        raise ValueError(f"step_mode must be 's' or 'm', got {step_mode!r}")
    foreign_containers = _foreign_step_containers()
    targets = []

    def collect(module: nn.Module, name: str) -> None:
        if hasattr(module, "step_mode"):
            supported = _supported_step_modes(module)
            if supported is not None and step_mode not in supported:
                raise ValueError(
                    f"module {name or type(module).__name__!r} ({type(module).__name__}) supports "
                    f"step modes {supported}, not {step_mode!r}"
                )
            targets.append((module, supported is not None))
        if _owns_children_step_mode(module, foreign_containers):
            return
        for child_name, child in module.named_children():
            collect(child, f"{name}.{child_name}" if name else child_name)

    collect(net, "")
    previous = []
    try:
        for module, declared in targets:  # all checked first: a rejected call changes nothing
            if not declared:
                _warn_foreign(f"set_step_mode({step_mode!r})", module, "StepModule (its supported modes are unknown)")
            previous.append((module, module.step_mode))
            module.step_mode = step_mode
    except Exception:
        for module, mode in reversed(previous):
            module.step_mode = mode
        raise


def _declared_backends(module: nn.Module) -> tuple[str, ...] | None:
    """snnorm's tuple, or what a foreign module declares (a tuple, or a method returning one)."""
    declared = getattr(module, "supported_backends", None)
    if callable(declared):
        declared = declared()
    return None if declared is None else tuple(declared)


def set_backend(net: nn.Module, backend: str, instance: type | tuple[type, ...] = (nn.Module,)) -> None:
    """Switch every module of ``net`` that is an ``instance`` and supports ``backend``.

    Every module that declares ``supported_backends`` takes part, snnorm's or not. A
    backend snnorm does not know (spikingjelly's ``"cupy"``) is set on the foreign
    modules that declare it; if none does, ValueError. A backend that cannot run on this
    machine raises :class:`snnorm.backends.BackendUnavailableError` with the reason.
    Modules that do not support ``backend`` keep theirs, and one warning names them.
    """
    selected = [
        (name, module) for name, module in net.named_modules()
        if isinstance(module, instance) and _declared_backends(module) is not None
    ]
    if backend in backends.backend_names() or not any(
        backend in _declared_backends(m) for _, m in selected
    ):
        backends.get_ops(backend)  # validate once, before changing anything
    skipped, previous = [], []
    try:
        for name, module in selected:
            if backend in _declared_backends(module):
                previous.append((module, getattr(module, "backend", None)))
                module.backend = backend
            else:
                skipped.append(f"{name or '<root>'} ({type(module).__name__})")
    except Exception:  # a foreign module's own setter refused: undo, so nothing changed
        for module, old in reversed(previous):
            module.backend = old
        raise
    if skipped:
        warnings.warn(
            f"set_backend({backend!r}): these modules do not support it and keep their "
            f"backend: {', '.join(skipped)}",
            stacklevel=2,
        )


# -- norm → neuron fusion (snnorm.fusion) ------------------------------------------------


def fuse_norm_neurons(net: nn.Module, example_input=None) -> nn.Module:
    """Fuse every batch-statistics norm with the IF/LIF neuron that alone consumes its
    output, in place; returns ``net``. What stays apart is said in a warning; ``example_input``
    reads a network torch.fx cannot trace by a run. See :func:`snnorm.fusion.fuse_norm_neurons`."""
    return _fusion.fuse_norm_neurons(net, example_input)


def fusion_report(net: nn.Module, example_input=None) -> "_fusion.FusionReport":
    """What :func:`fuse_norm_neurons` fuses in ``net``, what it leaves apart and why (``net``
    unchanged). See :func:`snnorm.fusion.fusion_report`."""
    return _fusion.fusion_report(net, example_input)


def unfuse_norm_neurons(net: nn.Module) -> nn.Module:
    """Undo :func:`fuse_norm_neurons` in place; returns ``net``."""
    return _fusion.unfuse_norm_neurons(net)
