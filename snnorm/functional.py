"""Network-level helpers (spikingjelly ``activation_based.functional`` API).

``reset_net``, ``set_step_mode``, ``set_backend``, ``detach_net`` walk a network, snnorm
modules and foreign ones (spikingjelly's, a user's) alike; ``seq_to_ann_forward``,
``multi_step_forward`` (and their ``t_last_`` variants), ``chunk_multi_step_forward`` run
stateless or stateful modules over a ``[T, N, ...]`` sequence, tuple inputs and outputs
included. The conv-BN fusion helpers (``fused_conv2d_*_of_convbn2d``, ``fuse_convbn2d``,
``fuse_conv_bn_eval``) fold an eval-mode BatchNorm into the convolution before it;
``fuse_conv_bn_eval_modules`` and ``pack_conv_bn_train_modules`` do it for a whole
network (spikingjelly's ``functional.conv_bn_fusion``)."""

from __future__ import annotations

import contextlib
import copy
import sys
import warnings
from typing import Callable, Sequence

import torch
import torch.fx
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd

from . import _outputs, backends, base

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


def _supported_step_modes(module: nn.Module) -> tuple[str, ...] | None:
    """What the module declares (snnorm's attribute or spikingjelly's method); None if nothing."""
    if isinstance(module, base.StepModule):
        return tuple(module.supported_step_modes)
    declared = getattr(module, "supported_step_mode", None)
    if callable(declared):
        return tuple(declared())
    return None


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


# -- forward helpers -----------------------------------------------------------------
# A module input may be a tuple of tensors (a two-argument module: x and indices, x and
# a hidden state); the output may be a tuple (nn.MaxPool2d(return_indices=True)).
# spikingjelly's rule: the tuple's members go to the first module as positional
# arguments, each later module gets the previous output as one argument.


def _check_sequences(x_seq, where: str, leading: int) -> tuple[torch.Tensor, ...]:
    """The input as a tuple of tensors, each [T, N, ...] with the same first ``leading`` dims."""
    members = x_seq if isinstance(x_seq, tuple) else (x_seq,)
    if not members:
        raise ValueError(f"{where}: expected x_seq with shape [T, N, ...] or a tuple of them, got an empty tuple")
    for k, x in enumerate(members):
        if not isinstance(x, torch.Tensor):
            what = f"member {k} of x_seq" if isinstance(x_seq, tuple) else "x_seq"
            raise TypeError(f"{where}: expected {what} to be a tensor of shape [T, N, ...], got {type(x).__name__}")
        if x.dim() < 2:
            raise ValueError(
                f"{where}: expected x_seq with shape [T, N, ...], but got x_seq with shape {tuple(x.shape)}"
            )
    # spikingjelly's wording ("[T, batch_size] leading dimensions", "temporal length"), which
    # ported code matches on
    dims = "[T, batch_size] leading dimensions" if leading == 2 else "T leading dimension (temporal length)"
    if any(x.shape[:leading] != members[0].shape[:leading] for x in members[1:]):
        raise ValueError(
            f"{where}: expected all tensors in x_seq to share the same {dims}, "
            f"but got tensors with shapes {[tuple(x.shape) for x in members]}"
        )
    return members


def _apply_modules(args: tuple, modules):
    if isinstance(modules, (list, tuple)):
        for m in modules:
            y = m(*args)
            args = (y,)
        return y
    return modules(*args)


def seq_to_ann_forward(x_seq, stateless_module: nn.Module | Sequence[nn.Module] | Callable):
    """Run stateless module(s) on ``[T, N, ...]`` by folding T into the batch.

    ``x_seq`` is a tensor or a tuple of tensors sharing ``[T, N]`` (ValueError
    otherwise), given to the first module as positional arguments. The output is
    unflattened back to ``[T, N, ...]``; a tuple (list, dict) output has each tensor
    member unflattened, other members pass unchanged.
    """
    where = "seq_to_ann_forward"
    members = _check_sequences(x_seq, where, leading=2)
    T, N = members[0].shape[:2]
    y = _apply_modules(tuple(x.flatten(0, 1) for x in members), stateless_module)

    def unflatten(t: torch.Tensor) -> torch.Tensor:
        if t.dim() == 0 or t.shape[0] != T * N:
            raise ValueError(
                f"{where}: the module returned a tensor of shape {tuple(t.shape)}, whose first dim is "
                f"not T*N = {T}*{N}; it cannot be unfolded to [T, N, ...]"
            )
        return t.unflatten(0, (T, N))

    return _outputs.map_tensors(y, unflatten)


def multi_step_forward(x_seq, single_step_module: nn.Module | Sequence[nn.Module] | Callable):
    """Run single-step module(s) over T by a loop and stack the outputs.

    ``x_seq`` is a tensor or a tuple of tensors sharing T (ValueError otherwise); step
    ``t`` passes ``x[t]`` of each member as positional arguments. A tuple (list, dict)
    output is stacked member by member; non-tensor members must be the same at every step.
    """
    where = "multi_step_forward"
    members = _check_sequences(x_seq, where, leading=1)
    outputs = [
        _apply_modules(tuple(x[t] for x in members), single_step_module) for t in range(members[0].shape[0])
    ]
    if not outputs:
        raise ValueError(f"{where}: expected x_seq with shape [T, N, ...] and T >= 1, got T = 0")
    return _outputs.merge_outputs(outputs, torch.stack, where)


def t_last_seq_to_ann_forward(x_seq, stateless_module: nn.Module | Sequence[nn.Module] | Callable):
    """:func:`seq_to_ann_forward` for sequences with time last, ``[N, ..., T]``."""
    members = x_seq if isinstance(x_seq, tuple) else (x_seq,)
    time_first = tuple(x.movedim(-1, 0) if isinstance(x, torch.Tensor) and x.dim() >= 2 else x for x in members)
    y = seq_to_ann_forward(time_first if isinstance(x_seq, tuple) else time_first[0], stateless_module)
    return _outputs.map_tensors(y, lambda t: t.movedim(0, -1))


def t_last_multi_step_forward(x_seq, single_step_module: nn.Module | Sequence[nn.Module] | Callable):
    """:func:`multi_step_forward` for sequences with time last, ``[N, ..., T]``."""
    members = x_seq if isinstance(x_seq, tuple) else (x_seq,)
    time_first = tuple(x.movedim(-1, 0) if isinstance(x, torch.Tensor) and x.dim() >= 2 else x for x in members)
    y = multi_step_forward(time_first if isinstance(x_seq, tuple) else time_first[0], single_step_module)
    return _outputs.map_tensors(y, lambda t: t.movedim(0, -1))


def chunk_multi_step_forward(split_size: int, x_seq: torch.Tensor, multi_step_module: nn.Module | Callable):
    """Run a multi-step module on chunks of at most ``split_size`` timesteps (less memory)."""
    if isinstance(split_size, bool) or not isinstance(split_size, int) or split_size < 1:
        raise ValueError(f"split_size must be a positive int, got {split_size!r}")
    return torch.cat([multi_step_module(chunk) for chunk in torch.split(x_seq, split_size)])


# -- conv-BN fusion ------------------------------------------------------------------
# An eval BN is a per-channel affine map of its input z:
#     y = γ (z − μ)/√(σ² + ε) + β = s·z + (β − s·μ),   s = γ/√(σ² + ε).
# After a convolution z = W ⋆ x + b (output channel o scales with W[o]) it folds into
#     W' = s[o]·W[o],   b' = s·(b − μ) + β.
# (Ioffe & Szegedy, "Batch Normalization", ICML 2015, §3.2: in inference BN is a linear map.)


def _check_conv(conv: nn.Module, where: str) -> None:
    if not isinstance(conv, _ConvNd) or conv.transposed:
        raise TypeError(
            f"{where}: expected a convolution (nn.Conv1d/2d/3d or a subclass), got {type(conv).__name__}"
        )
    extra = [name for name, _ in conv.named_parameters(recurse=False) if name not in ("weight", "bias")]
    if hasattr(conv, "get_weight"):  # weight-standardised convs (WSConv2d) compute their weight
        extra = extra + ["get_weight()"]
    if extra or torch.nn.utils.parametrize.is_parametrized(conv):
        raise TypeError(
            f"{where}: {type(conv).__name__} transforms its weight ({extra or 'parametrized'}); "
            "only a plain convolution can absorb a BatchNorm"
        )


def _check_bn(bn: nn.Module, where: str, num_channels: int | None = None) -> None:
    if not isinstance(bn, _BatchNorm):
        raise TypeError(
            f"{where}: expected a BatchNorm (a torch.nn.modules.batchnorm._BatchNorm subclass), "
            f"got {type(bn).__name__}"
        )
    extra = [name for name, _ in bn.named_parameters(recurse=False) if name not in ("weight", "bias")]
    if extra:
        raise TypeError(
            f"{where}: {type(bn).__name__} has parameters {extra} besides weight/bias, so its eval "
            "output is not a per-channel affine map (e.g. TEBN scales each timestep); it cannot be "
            "folded into a convolution"
        )
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError(
            f"{where}: {type(bn).__name__} does not track running statistics "
            "(track_running_stats=False uses batch statistics even in eval); nothing to fold"
        )
    if bn.running_mean.shape != (bn.num_features,) or bn.running_var.shape != (bn.num_features,):
        raise TypeError(
            f"{where}: {type(bn).__name__} has running statistics of shape {tuple(bn.running_mean.shape)}, "
            f"not ({bn.num_features},) (per-timestep statistics cannot be folded into one convolution)"
        )
    if num_channels is not None and bn.num_features != num_channels:
        raise ValueError(
            f"{where}: the convolution has {num_channels} output channels but "
            f"{type(bn).__name__} has num_features={bn.num_features}"
        )


def _bn_scale_shift(bn: _BatchNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """(s, t) with eval BN(z) = s·z + t per channel."""
    inv_std = torch.rsqrt(bn.running_var + bn.eps)
    gamma = bn.weight if bn.weight is not None else torch.ones_like(inv_std)
    beta = bn.bias if bn.bias is not None else torch.zeros_like(inv_std)
    scale = gamma * inv_std
    return scale, beta - scale * bn.running_mean


def fused_conv2d_weight_of_convbn2d(conv2d: nn.Conv2d, bn2d: nn.BatchNorm2d) -> torch.Tensor:
    """Weight of the convolution equivalent to ``conv2d`` followed by eval ``bn2d``.

    ``W'[o] = W[o]·γ[o]/√(σ²[o] + ε)`` with the BN's running variance σ² (its eval
    statistics, whatever mode it is in). Differentiable in the conv and BN parameters.
    Unlike spikingjelly, a conv with a bias is accepted (the bias goes into
    :func:`fused_conv2d_bias_of_convbn2d`).
    """
    where = "fused_conv2d_weight_of_convbn2d"
    _check_conv(conv2d, where)
    _check_bn(bn2d, where, conv2d.out_channels)
    scale, _ = _bn_scale_shift(bn2d)
    return conv2d.weight * scale.view(-1, *([1] * (conv2d.weight.dim() - 1)))


def fused_conv2d_bias_of_convbn2d(conv2d: nn.Conv2d, bn2d: nn.BatchNorm2d) -> torch.Tensor:
    """Bias of the convolution equivalent to ``conv2d`` followed by eval ``bn2d``.

    ``b' = (b − μ)·γ/√(σ² + ε) + β`` with the running statistics (``b = 0`` when the
    conv has no bias, as in spikingjelly).
    """
    where = "fused_conv2d_bias_of_convbn2d"
    _check_conv(conv2d, where)
    _check_bn(bn2d, where, conv2d.out_channels)
    scale, shift = _bn_scale_shift(bn2d)
    if conv2d.bias is None:
        return shift
    return scale * conv2d.bias + shift


@torch.no_grad()
def scale_fused_conv2d_weight_of_convbn2d(conv2d: nn.Conv2d, bn2d: nn.BatchNorm2d, k=None, b=None) -> None:
    """Change ``conv2d`` in place so that the fused weight becomes ``k·W' + b``.

    ``W'`` is :func:`fused_conv2d_weight_of_convbn2d`; ``k`` and ``b`` are scalars or
    tensors broadcastable to the weight. ``k`` scales W; ``b`` is added to the fused
    weight, i.e. ``b·√(σ² + ε)/γ`` to W per output channel (spikingjelly adds ``b`` to W
    itself, which adds ``b·γ/√(σ² + ε)`` to the fused weight instead). Adding ``b`` needs
    every γ ≠ 0.
    """
    where = "scale_fused_conv2d_weight_of_convbn2d"
    _check_conv(conv2d, where)
    _check_bn(bn2d, where, conv2d.out_channels)
    if k is not None:
        conv2d.weight.mul_(k)
    if b is not None:
        scale, _ = _bn_scale_shift(bn2d)
        if bool((scale == 0).any()):
            raise ValueError(f"{where}: a BN channel has γ = 0, so the fused weight cannot be shifted by b")
        conv2d.weight.add_(torch.as_tensor(b, dtype=scale.dtype, device=scale.device)
                           / scale.view(-1, *([1] * (conv2d.weight.dim() - 1))))


@torch.no_grad()
def scale_fused_conv2d_bias_of_convbn2d(conv2d: nn.Conv2d, bn2d: nn.BatchNorm2d, k=None, b=None) -> None:
    """Change ``bn2d`` (and the conv bias) in place so the fused bias becomes ``k·b' + b``.

    ``k`` scales β, μ and the conv bias (so ``(b − μ)·s + β`` scales by ``k``); ``b`` is
    added to β. Scalars or per-channel tensors. Needs an affine BN when ``b`` is given.
    """
    where = "scale_fused_conv2d_bias_of_convbn2d"
    _check_conv(conv2d, where)
    _check_bn(bn2d, where, conv2d.out_channels)
    if b is not None and bn2d.bias is None:
        raise ValueError(f"{where}: {type(bn2d).__name__} has no bias (affine=False) to add b to")
    if k is not None:
        if bn2d.bias is None and not bool(torch.all(torch.as_tensor(k) == 1)):
            raise ValueError(f"{where}: {type(bn2d).__name__} has no bias (affine=False) to scale by k")
        if bn2d.bias is not None:
            bn2d.bias.mul_(k)
        bn2d.running_mean.mul_(k)
        if conv2d.bias is not None:
            conv2d.bias.mul_(k)
    if b is not None:
        bn2d.bias.add_(b)


@torch.no_grad()
def fuse_convbn2d(conv2d: nn.Conv2d, bn2d: nn.BatchNorm2d) -> nn.Conv2d:
    """A new ``nn.Conv2d`` (with bias) computing ``bn2d(conv2d(x))`` with BN's running stats.

    spikingjelly's helper: the result is always a plain single-step ``nn.Conv2d`` on the
    conv's device and dtype; the BN's mode is not checked (its running statistics are
    used). For a step-mode-aware fold that checks the BN is in eval mode, use
    :func:`fuse_conv_bn_eval`.
    """
    where = "fuse_convbn2d"
    if not isinstance(conv2d, nn.Conv2d):
        raise TypeError(f"{where}: expected an nn.Conv2d, got {type(conv2d).__name__}")
    _check_conv(conv2d, where)
    _check_bn(bn2d, where, conv2d.out_channels)
    fused = nn.Conv2d(
        conv2d.in_channels, conv2d.out_channels, conv2d.kernel_size, stride=conv2d.stride,
        padding=conv2d.padding, dilation=conv2d.dilation, groups=conv2d.groups, bias=True,
        padding_mode=conv2d.padding_mode, device=conv2d.weight.device, dtype=conv2d.weight.dtype,
    )
    fused.weight.copy_(fused_conv2d_weight_of_convbn2d(conv2d, bn2d))
    fused.bias.copy_(fused_conv2d_bias_of_convbn2d(conv2d, bn2d))
    return fused


def _bn_takes_spatial(bn: _BatchNorm, spatial: int) -> bool:
    """Whether ``bn`` normalises per-step inputs [N, C, *spatial] with ``spatial`` dims."""
    sample_ndims = getattr(bn, "_sample_ndims", ())  # snnorm.layer BNs: accepted [N, C, *] dims
    if sample_ndims:
        return spatial + 2 in sample_ndims
    for cls, dims in ((nn.BatchNorm1d, (0, 1)), (nn.BatchNorm2d, (2,)), (nn.BatchNorm3d, (3,))):
        if isinstance(bn, cls):
            return spatial in dims
    # other _BatchNorm subclasses (spikingjelly's tdBN): ask their own input check,
    # per step [N, C, ...] or, for a multi-step module, [T, N, C, ...]
    ndims = [spatial + 2] + ([spatial + 3] if getattr(bn, "step_mode", "s") == "m" else [])
    for ndim in ndims:
        try:
            bn._check_input_dim(torch.empty((1, bn.num_features) + (1,) * (ndim - 2), device="meta"))
            return True
        except (AssertionError, ValueError):
            continue
        except NotImplementedError:  # a bare _BatchNorm subclass: it does not say; allow
            return True
    return False


@torch.no_grad()
def fuse_conv_bn_eval(conv: nn.Module, bn: nn.Module) -> nn.Module:
    """Fold an eval-mode BatchNorm into the convolution before it.

    Returns a copy of ``conv`` (same class, so a ``snnorm.layer.Conv2d`` keeps its
    ``step_mode``, padding mode, groups...) with weight ``W'`` and bias ``b'`` (see
    :func:`fused_conv2d_weight_of_convbn2d`): ``fused(x) == bn(conv(x))`` for a ``bn`` in
    eval mode. ``bn`` is any ``_BatchNorm`` with per-channel running statistics and the
    conv's dimensionality: ``nn.BatchNorm1d/2d/3d``, the multi-step ``snnorm.layer``
    BatchNorms and tdBN (statistics shared over T fold into one conv applied at every
    step). ``conv`` and ``bn`` are not changed.

    :raises TypeError: ``conv`` is not a plain convolution (transposed, weight
        re-parameterised) or ``bn`` is not a BatchNorm with per-channel affine eval output
        (TEBN's per-timestep scale, BNTT's per-timestep statistics).
    :raises ValueError: ``bn`` is in training mode, does not track running statistics,
        has a channel count or dimensionality other than the conv's.
    """
    where = "fuse_conv_bn_eval"
    _check_conv(conv, where)
    _check_bn(bn, where, conv.out_channels)
    if bn.training:
        raise ValueError(
            f"{where}: {type(bn).__name__} is in training mode (it normalises with batch "
            "statistics); call .eval() on it first"
        )
    spatial = conv.weight.dim() - 2
    if not _bn_takes_spatial(bn, spatial):
        raise ValueError(
            f"{where}: {type(conv).__name__} has {spatial} spatial dims but {type(bn).__name__} "
            "normalises inputs of another dimensionality"
        )
    fused = copy.deepcopy(conv)
    weight = fused_conv2d_weight_of_convbn2d(conv, bn)
    bias = fused_conv2d_bias_of_convbn2d(conv, bn)
    fused.weight = nn.Parameter(weight.to(conv.weight.dtype), requires_grad=conv.weight.requires_grad)
    fused.bias = nn.Parameter(bias.to(device=conv.weight.device, dtype=conv.weight.dtype),
                              requires_grad=conv.weight.requires_grad)
    return fused


# -- spikingjelly's graph-level conv-BN API -------------------------------------------
# fuse_conv_bn_eval_modules / pack_conv_bn_train_modules (spikingjelly 2.0.0,
# functional/conv_bn_fusion.py): trace the network with torch.fx, find every
# `bn(conv(x))` where the conv's output feeds nothing else, and rewrite the pair (once
# for a conv called at several sites, each followed by the same BN).
# Step modules (snnorm's and spikingjelly's) are leaves of the trace, so the pairs
# inside a SeqToANNContainer are left alone, as in spikingjelly.


class _StepModuleLeafTracer(torch.fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualified_name: str) -> bool:
        if isinstance(m, (base.StepModule, _ConvBNPack)) or _is_foreign_step_module(m) or \
                getattr(type(m), "traced_as_leaf", False):
            return True
        return super().is_leaf_module(m, qualified_name)


def _is_foreign_step_module(m: nn.Module) -> bool:
    sj_base = sys.modules.get("spikingjelly.activation_based.base")
    return sj_base is not None and isinstance(m, sj_base.StepModule)


def _conv_bn_pairs(graph_module: torch.fx.GraphModule, is_pair: Callable[[nn.Module, nn.Module], bool]):
    """``(conv target, bn target, [(conv node, bn node), ...])`` for each conv module whose
    every call is ``bn(conv(x))`` with the same BN module and no other user of the conv's
    output: a conv called at several sites (``self.bn(self.conv(x))`` twice) is rewritten
    once for all of them. A conv that feeds two different BNs, or whose output (at any
    call) has another user, is left alone: one module cannot be rewritten for some of its
    call sites only. The BN may have other calls; they keep the BN module."""
    modules = dict(graph_module.named_modules())
    calls: dict[str, int] = {}
    for node in graph_module.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    sites: dict[str, list] = {}  # conv target -> [(conv node, bn node)]
    for node in graph_module.graph.nodes:
        if node.op != "call_module" or len(node.args) != 1 or node.kwargs:
            continue
        conv_node = node.args[0]
        if not isinstance(conv_node, torch.fx.Node) or conv_node.op != "call_module" or len(conv_node.users) != 1:
            continue
        if is_pair(modules[conv_node.target], modules[node.target]):
            sites.setdefault(conv_node.target, []).append((conv_node, node))
    groups = []
    for conv_target, pairs in sites.items():
        bn_targets = {bn_node.target for _, bn_node in pairs}
        if len(bn_targets) == 1 and len(pairs) == calls[conv_target]:
            groups.append((conv_target, bn_targets.pop(), pairs))
    return groups


def _trace(net: nn.Module) -> torch.fx.GraphModule:
    tracer = _StepModuleLeafTracer()
    graph = tracer.trace(net)
    return torch.fx.GraphModule(tracer.root, graph)


def _set_submodule(root: nn.Module, target: str, module: nn.Module) -> None:
    parent, _, name = target.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, module)


def _replace_pairs(graph_module: torch.fx.GraphModule, groups, make: Callable[[nn.Module, nn.Module], nn.Module]):
    """Replace each group's conv module by ``make(conv, bn)`` and drop its BN calls: every
    call site of the conv now calls the new module, whose output stands for the BN's."""
    for conv_target, bn_target, pairs in groups:
        conv = graph_module.get_submodule(conv_target)
        bn = graph_module.get_submodule(bn_target)
        _set_submodule(graph_module, conv_target, make(conv, bn))
        for conv_node, bn_node in pairs:
            bn_node.replace_all_uses_with(conv_node)
            graph_module.graph.erase_node(bn_node)
        if not any(n.op == "call_module" and n.target == bn_target for n in graph_module.graph.nodes):
            # by name: a packed BN is still reachable through the pack, so the sweep below keeps it
            graph_module.delete_submodule(bn_target)
    graph_module.graph.lint()
    graph_module.delete_all_unused_submodules()
    graph_module.recompile()
    return graph_module


def _is_plain_conv(m: nn.Module) -> bool:
    try:
        _check_conv(m, "")
    except TypeError:
        return False
    return True


def _is_foldable_pair(conv: nn.Module, bn: nn.Module) -> bool:
    """A plain conv followed by a BN with per-channel statistics of the conv's dimensionality."""
    if not _is_plain_conv(conv) or not isinstance(bn, _BatchNorm) or bn.num_features != conv.out_channels:
        return False
    if any(name not in ("weight", "bias") for name, _ in bn.named_parameters(recurse=False)):
        return False  # TEBN's per-timestep scale: not a per-channel affine map
    if bn.running_mean is not None and bn.running_mean.shape != (bn.num_features,):
        return False  # BNTT-like per-timestep statistics
    return _bn_takes_spatial(bn, conv.weight.dim() - 2)


@torch.no_grad()
def fuse_conv_bn_eval_modules(net: nn.Module) -> torch.fx.GraphModule:
    """Fold every eval-mode BatchNorm that follows a convolution into it (spikingjelly's API).

    ``net`` is traced with ``torch.fx`` (snnorm and spikingjelly step modules are leaves);
    each ``bn(conv(x))`` pair, with ``conv`` a plain convolution (torch's, snnorm's or
    spikingjelly's ``Conv1d/2d/3d``) and ``bn`` a BatchNorm with per-channel running
    statistics (``nn.BatchNorm*``, snnorm's and spikingjelly's multi-step BatchNorms,
    tdBN), becomes one convolution computed by :func:`fuse_conv_bn_eval`. TEBN and BNTT
    are not per-channel affine maps and stay. A pair called at several sites (the same
    conv and BN, ``self.bn(self.conv(x))`` twice) is fused once and every site calls the
    fused conv; a conv whose output also goes elsewhere, or that feeds different BNs, is
    left as it is. ``net`` itself is not changed; as in spikingjelly, the modules that
    are not fused are shared with it (neuron state too).

    :returns: the fused ``torch.fx.GraphModule``.
    :raises ValueError: ``net`` is in training mode, or a matched BatchNorm does not track
        running statistics (or is itself still in training mode).
    """
    if net.training:
        raise ValueError(
            "fuse_conv_bn_eval_modules only supports eval() models: the network is in training mode, "
            "where BatchNorm normalises with batch statistics; call net.eval() first"
        )
    graph_module = _trace(net)
    groups = _conv_bn_pairs(graph_module, _is_foldable_pair)
    for _, bn_target, _ in groups:
        bn = graph_module.get_submodule(bn_target)
        if not bn.track_running_stats or bn.running_mean is None or bn.running_var is None:
            raise ValueError(
                f"Cannot fuse {bn_target}: BatchNorm must track running stats "
                f"({type(bn).__name__} has track_running_stats=False and normalises with batch statistics)"
            )
    return _replace_pairs(graph_module, groups, fuse_conv_bn_eval)


def _same_kind_conv_bn(conv: nn.Module, bn: nn.Module) -> bool:
    """Conv{k}d then BatchNorm{k}d whose single-step forward on [T·N, ...] is exact."""
    if not _is_plain_conv(conv) or not isinstance(bn, nn.modules.batchnorm._NormBase):
        return False
    kinds = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
    bn_kind = kinds.get(conv.weight.dim() - 2)
    if bn_kind is None or not isinstance(bn, bn_kind):
        return False
    modes = _supported_step_modes(bn)
    if modes is not None and "s" not in modes:
        return False  # a multi-step-only BN (tdBN) has no single-step forward to call
    # both step-mode aware and in different modes: the network runs them differently
    return not (hasattr(conv, "step_mode") and hasattr(bn, "step_mode") and conv.step_mode != bn.step_mode)


class _ConvBNPack(nn.Module):
    """``bn(conv(x))`` with one flatten of ``[T, N, ...]`` for both (training).

    Multi-step, a step-mode conv and BN each fold T into the batch and unfold it again;
    packed, the sequence is folded once and both run their single-step forward on
    ``[T·N, ...]`` (the same numbers: both are per-sample or per-channel over T·N).
    """

    def __init__(self, conv: nn.Module, bn: nn.Module) -> None:
        super().__init__()
        self.conv = conv
        self.bn = bn

    @staticmethod
    @contextlib.contextmanager
    def _single_step(module: nn.Module):
        if not hasattr(module, "step_mode"):
            yield
            return
        mode = module.step_mode
        module.step_mode = "s"
        try:
            yield
        finally:
            module.step_mode = mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        multi = all(getattr(m, "step_mode", "m") == "m" for m in (self.conv, self.bn))
        if not multi or x.dim() != self.conv.weight.dim() + 1:  # not [T, N, C, *spatial]
            return self.bn(self.conv(x))
        with self._single_step(self.conv), self._single_step(self.bn):
            y = self.bn(self.conv(x.flatten(0, 1)))
        return y.unflatten(0, x.shape[:2])


def pack_conv_bn_train_modules(net: nn.Module) -> torch.fx.GraphModule:
    """Pack each ``bn(conv(x))`` of a training network into one module (spikingjelly's API).

    Nothing is folded: the conv and BN keep their parameters (shared with ``net``) and
    their training behaviour; a multi-step pair folds ``[T, N, ...]`` into the batch once
    instead of twice, which ``torch.compile`` handles better. Pairs are ``Conv{k}d`` then
    ``BatchNorm{k}d`` (torch's, snnorm's, spikingjelly's); a step-mode pair in different
    modes, and multi-step-only BNs (tdBN), are left alone.

    :returns: the packed ``torch.fx.GraphModule``.
    :raises ValueError: ``net`` is not in training mode.
    """
    if not net.training:
        raise ValueError(
            "pack_conv_bn_train_modules only supports train() models: the network is in eval mode; "
            "for inference fold the BatchNorms with fuse_conv_bn_eval_modules"
        )
    graph_module = _trace(net)
    return _replace_pairs(graph_module, _conv_bn_pairs(graph_module, _same_kind_conv_bn), _ConvBNPack)


# -- norm → neuron fusion (snnorm.fusion; imported on use: it needs the layers and neurons) --


def fuse_norm_neurons(net: nn.Module) -> nn.Module:
    """Fuse every batch-statistics norm with the IF/LIF neuron that alone consumes its
    output, in place; returns ``net``. See :func:`snnorm.fusion.fuse_norm_neurons`."""
    from .fusion import fuse_norm_neurons as fuse

    return fuse(net)


def unfuse_norm_neurons(net: nn.Module) -> nn.Module:
    """Undo :func:`fuse_norm_neurons` in place; returns ``net``."""
    from .fusion import unfuse_norm_neurons as unfuse

    return unfuse(net)
