"""Take over a network built from spikingjelly 2.0.0's modules: :func:`convert_spikingjelly`.

Most SNNs come from code the user does not control (spikingjelly's model zoo, a paper's
repository, a pickled ``nn.Module``). ``convert_spikingjelly(net)`` swaps, in place, every
spikingjelly module that snnorm has for snnorm's, so that ``functional.fuse_norm_neurons`` and
``functional.set_backend(net, "triton")`` can then run the fused kernels::

    snnorm.convert_spikingjelly(net)            # spikingjelly modules -> snnorm's
    snnorm.functional.fuse_norm_neurons(net)    # norm -> neuron pairs become one block
    snnorm.functional.set_backend(net, "triton")

What a swap keeps: the *same* parameter and buffer tensor objects (an optimizer built before
the call still trains the network), the module paths, ``named_parameters()`` and
``state_dict`` keys, the training flag, the step mode, and the neuron's options and surrogate
function (mapped to snnorm's class of the same name and ``alpha``). Memories (membranes, BNTT
and NeuNorm state) start from reset, as after ``reset_net``. A module it cannot take over
stays as it is, and one warning names each such class and why. Modules of other libraries
(torch's own ``nn.BatchNorm2d`` inside a ``SeqToANNContainer``, a user's block) stay; their
spikingjelly children are converted. Calling it twice is harmless.

snnorm does not import spikingjelly, not even here: its modules are recognised by the module
path of their class.
"""

from __future__ import annotations

import inspect
import warnings
from collections import OrderedDict
from typing import Any

import torch
import torch.nn as nn

from . import layer, neuron, surrogate

__all__ = ["convert_spikingjelly"]

_SJ = "spikingjelly.activation_based"

# spikingjelly class name -> snnorm class, for modules of spikingjelly's layer / neuron modules
_LAYERS = {name: getattr(layer, name) for name in (
    "BatchNorm1d", "BatchNorm2d", "BatchNorm3d",
    "ThresholdDependentBatchNorm1d", "ThresholdDependentBatchNorm2d", "ThresholdDependentBatchNorm3d",
    "TemporalEffectiveBatchNorm1d", "TemporalEffectiveBatchNorm2d", "TemporalEffectiveBatchNorm3d",
    "BatchNormThroughTime1d", "BatchNormThroughTime2d", "BatchNormThroughTime3d",
    "NeuNorm", "GroupNorm", "WSConv2d", "WSLinear",
    "Conv1d", "Conv2d", "Conv3d", "Linear",
    "MaxPool1d", "MaxPool2d", "MaxPool3d", "AvgPool1d", "AvgPool2d", "AvgPool3d",
    "AdaptiveAvgPool1d", "AdaptiveAvgPool2d", "AdaptiveAvgPool3d",
    "Flatten", "Dropout", "Dropout2d", "SeqToANNContainer", "MultiStepContainer",
)}
_NEURONS = {"IFNode": neuron.IFNode, "LIFNode": neuron.LIFNode, "MPBNLIFNode": neuron.MPBNLIFNode}
_SURROGATES = {name: getattr(surrogate, name) for name in ("Sigmoid", "ATan", "PiecewiseQuadratic", "PiecewiseExp")}


class _CannotConvert(Exception):
    """Why one module stays as it is."""


def _constructor_parameters(cls: type) -> list[inspect.Parameter]:
    """``cls``'s constructor arguments, following ``*args, **kwargs`` into the base classes."""
    found: dict[str, inspect.Parameter] = {}
    for klass in cls.__mro__:
        if "__init__" not in vars(klass) or klass in (nn.Module, object):
            continue
        params = list(inspect.signature(klass.__init__).parameters.values())[1:]
        for p in params:
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY):
                found.setdefault(p.name, p)
        if not any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in params):
            break
    return list(found.values())


def _surrogate(fn: nn.Module) -> nn.Module:
    target = _SURROGATES.get(type(fn).__name__)
    if target is None or not type(fn).__module__.startswith(_SJ):
        raise _CannotConvert(f"its surrogate function {type(fn).__name__} has no snnorm counterpart "
                             f"(snnorm has {', '.join(sorted(_SURROGATES))})")
    return target(alpha=float(fn.alpha), spiking=bool(fn.spiking))


def _mpbn_argument(old: nn.Module, name: str) -> Any:
    # spikingjelly's MPBN keeps only its membrane BN (``vbn``: BatchNorm2d for channels, 1d for features, or None)
    vbn = old.vbn
    return {"mpbn": vbn is not None,
            "out_channels": vbn.num_features if isinstance(vbn, nn.BatchNorm2d) else None,
            "out_features": vbn.num_features if isinstance(vbn, nn.BatchNorm1d) else None}[name]


def _neunorm_argument(old: nn.Module, name: str) -> Any:
    # spikingjelly keeps k0, k1 = (1 − k0)/C² and w ([C or 1, H, W]) only
    channels = round(((1 - old.k0) / old.k1) ** 0.5)
    return {"in_channels": channels, "height": old.w.shape[-2], "width": old.w.shape[-1], "k": old.k0,
            "shared_across_channels": old.w.shape[0] == 1 and channels != 1}[name]


def _bntt_argument(old: nn.Module, name: str) -> Any:
    return getattr(old.bn_list[0], name)  # the per-step BNs hold the BN options


def _tebn_argument(old: nn.Module, name: str) -> Any:
    return {"T": old.scale.shape[0]}[name]  # spikingjelly's TEBN keeps T only as len(scale)


#: constructor arguments a spikingjelly class does not keep as attributes, derived from what it
#: keeps (a KeyError: not derivable)
_DERIVED = {
    "MPBNLIFNode": _mpbn_argument,
    "NeuNorm": _neunorm_argument,
    **dict.fromkeys(("BatchNormThroughTime1d", "BatchNormThroughTime2d", "BatchNormThroughTime3d"), _bntt_argument),
    **dict.fromkeys(("TemporalEffectiveBatchNorm1d", "TemporalEffectiveBatchNorm2d", "TemporalEffectiveBatchNorm3d"),
                    _tebn_argument),
}


def _argument(old: nn.Module, name: str, default: Any) -> Any:
    """The value of constructor argument ``name`` that rebuilds ``old``."""
    if name in ("device", "dtype", "backend"):
        return default
    if name == "surrogate_function":
        return _surrogate(old.surrogate_function)
    if hasattr(old, name):
        value = getattr(old, name)
        if isinstance(default, bool) and (value is None or isinstance(value, torch.Tensor)):
            return value is not None  # a flag the module keeps as an optional tensor (bias=, gain=)
        return value
    try:
        return _DERIVED[type(old).__name__](old, name)
    except KeyError:
        pass
    if default is inspect.Parameter.empty:
        raise _CannotConvert(f"it does not record the constructor argument {name!r}")
    return default


def _tensors(module: nn.Module) -> dict[str, tuple[nn.Module, str, Any, bool]]:
    """Every parameter and buffer that holds a tensor, by full name: (owner, local name, tensor,
    is parameter). Empty slots (spikingjelly's MPBN keeps ``mu = None`` until it folds) don't count."""
    out = {}
    for prefix, owner in module.named_modules(remove_duplicate=False):
        for kind, store in ((True, owner._parameters), (False, owner._buffers)):
            for name, tensor in store.items():
                if tensor is not None:
                    out[f"{prefix}.{name}" if prefix else name] = (owner, name, tensor, kind)
    return out


def _transplant(old: nn.Module, new: nn.Module) -> None:
    """Give ``new`` the very tensors of ``old`` (same names, shapes and dtypes required)."""
    old_t, new_t = _tensors(old), _tensors(new)
    if set(old_t) != set(new_t):
        raise _CannotConvert(f"its tensors {sorted(old_t)} differ from snnorm's {sorted(new_t)}")
    for name, (owner, local, tensor, is_param) in new_t.items():
        old_tensor, old_is_param = old_t[name][2], old_t[name][3]
        if old_is_param != is_param:
            raise _CannotConvert(f"its {name} is a {'parameter' if old_is_param else 'buffer'}, snnorm's is not")
        if old_tensor.shape != tensor.shape or old_tensor.dtype.is_floating_point != tensor.dtype.is_floating_point:
            raise _CannotConvert(f"its {name} has shape {tuple(old_tensor.shape)}, snnorm's {tuple(tensor.shape)}")
    for name, (owner, local, _, is_param) in new_t.items():
        (owner._parameters if is_param else owner._buffers)[local] = old_t[name][2]


def _check_convertible(old: nn.Module) -> None:
    if getattr(old, "fold_bn", False):
        raise _CannotConvert("its batch norm is folded into the threshold (re_parameterize_v_threshold); "
                             "convert the unfolded network and fold it with snnorm")
    if getattr(old, "learnable_vth", False):
        raise _CannotConvert("learnable_vth=True: spikingjelly fires on exp(a) but resets with v_threshold "
                             "(see docs/porting.md); snnorm does not copy that")
    if old._forward_hooks or old._forward_pre_hooks:
        raise _CannotConvert("it has forward hooks, which a new module would not carry")


def _convert_one(old: nn.Module, target: type) -> nn.Module:
    _check_convertible(old)
    if issubclass(target, nn.Sequential):  # containers: the same (already converted) children, same names
        new = target(OrderedDict(old.named_children()))
    else:
        kwargs = {p.name: _argument(old, p.name, p.default) for p in _constructor_parameters(target)}
        try:
            new = target(**kwargs)
        except (TypeError, ValueError) as error:
            raise _CannotConvert(f"snnorm's {target.__name__} refuses its configuration: {error}") from error
        _transplant(old, new)
    new.train(old.training)
    if hasattr(old, "step_mode") and hasattr(new, "step_mode"):
        new.step_mode = old.step_mode
    return new


def _target(module: nn.Module) -> type | None:
    mod, name = type(module).__module__, type(module).__name__
    if mod == f"{_SJ}.neuron" or mod.startswith(f"{_SJ}.neuron."):
        return _NEURONS.get(name, _Unknown)
    if mod == f"{_SJ}.layer" or mod.startswith(f"{_SJ}.layer."):
        return _LAYERS.get(name, _Unknown)
    return None


class _Unknown:
    """Marks a spikingjelly class that snnorm has no counterpart for."""


def convert_spikingjelly(net: nn.Module) -> nn.Module:
    """Replace, in place, every spikingjelly 2.0.0 module in ``net`` that snnorm has with
    snnorm's, keeping its tensors, names, step mode and options; return ``net``.

    Children are converted before their parents, so a ``SeqToANNContainer`` keeps its
    (converted) children under the same names. A module it cannot take over stays, and one
    ``UserWarning`` lists each such class with the reason. ``net`` itself, if it is a
    spikingjelly module, cannot be replaced in place: it is converted only when it is a
    container of other modules (its children are). Calling this twice is harmless.
    """
    if not isinstance(net, nn.Module):
        raise TypeError(f"convert_spikingjelly expects an nn.Module, got {type(net).__name__}")
    if not any(_target(m) is not None for m in net.modules()):
        return net  # nothing of spikingjelly's in it (already converted, or never was)
    left: dict[str, str] = {}

    def visit(parent: nn.Module) -> None:
        for name, child in list(parent._modules.items()):
            if child is None:
                continue
            visit(child)
            target = _target(child)
            if target is None:
                continue
            label = f"{type(child).__module__}.{type(child).__name__}"
            if target is _Unknown:
                left.setdefault(label, "snnorm has no counterpart (its spikingjelly children are converted)")
                continue
            try:
                parent._modules[name] = _convert_one(child, target)
            except _CannotConvert as why:
                left.setdefault(label, str(why))

    visit(net)
    if _target(net) not in (None, _Unknown):
        left.setdefault(f"{type(net).__module__}.{type(net).__name__}",
                        "it is the network itself, which cannot be replaced in place (its children are converted)")
    if left:
        lines = "\n".join(f"  {label}: {why}" for label, why in sorted(left.items()))
        warnings.warn(f"convert_spikingjelly left these modules as they are:\n{lines}", UserWarning, stacklevel=2)
    return net

