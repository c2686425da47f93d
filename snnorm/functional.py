"""Network-level helpers (spikingjelly ``activation_based.functional`` API).

``reset_net``, ``set_step_mode``, ``set_backend``, ``detach_net`` walk a network;
``seq_to_ann_forward``, ``multi_step_forward``, ``chunk_multi_step_forward`` run
stateless or stateful modules over a ``[T, N, ...]`` sequence. The conv-BN fusion
helpers (``fused_conv2d_*_of_convbn2d``, ``fuse_convbn2d``, ``fuse_conv_bn_eval``)
fold an eval-mode BatchNorm into the convolution before it.
"""

from __future__ import annotations

import copy
import warnings
from typing import Callable, Sequence

import torch
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd

from . import backends, base

__all__ = [
    "reset_net",
    "set_step_mode",
    "set_backend",
    "detach_net",
    "seq_to_ann_forward",
    "multi_step_forward",
    "chunk_multi_step_forward",
    "fused_conv2d_weight_of_convbn2d",
    "fused_conv2d_bias_of_convbn2d",
    "scale_fused_conv2d_weight_of_convbn2d",
    "scale_fused_conv2d_bias_of_convbn2d",
    "fuse_convbn2d",
    "fuse_conv_bn_eval",
]


def reset_net(net: nn.Module) -> None:
    """Reset the state of every stateful module in ``net`` (those added later too)."""
    for module in net.modules():
        if hasattr(module, "reset") and isinstance(module, base.MemoryModule):
            module.reset()


def detach_net(net: nn.Module) -> None:
    """Detach the state of every stateful module in ``net`` (truncated BPTT)."""
    for module in net.modules():
        if isinstance(module, base.MemoryModule):
            module.detach()


def set_step_mode(net: nn.Module, step_mode: str) -> None:
    """Set ``step_mode`` ('s' or 'm') on every step module of ``net``.

    The children of containers that run them step by step (``SeqToANNContainer``,
    ``MultiStepContainer``) keep their mode, as in spikingjelly. A module that cannot
    run in ``step_mode`` raises ValueError naming it, and nothing is changed.
    """
    if step_mode not in ("s", "m"):
        raise ValueError(f"step_mode must be 's' or 'm', got {step_mode!r}")
    targets = []

    def collect(module: nn.Module, name: str) -> None:
        if isinstance(module, base.StepModule):
            if step_mode not in module.supported_step_modes:
                raise ValueError(
                    f"module {name or type(module).__name__!r} ({type(module).__name__}) supports "
                    f"step modes {module.supported_step_modes}, not {step_mode!r}"
                )
            targets.append(module)
            if module.owns_children_step_mode:
                return
        for child_name, child in module.named_children():
            collect(child, f"{name}.{child_name}" if name else child_name)

    collect(net, "")
    for module in targets:  # all checked first: a rejected call changes nothing
        module.step_mode = step_mode


def set_backend(net: nn.Module, backend: str, instance: type | tuple[type, ...] = (nn.Module,)) -> None:
    """Switch every module of ``net`` that is an ``instance`` and supports ``backend``.

    An unknown backend raises ValueError; a backend that cannot run on this machine
    raises :class:`snnorm.backends.BackendUnavailableError` with the reason. Modules
    with a ``backend`` that do not support it keep theirs, and one warning names them.
    """
    backends.get_ops(backend)  # validate once, before changing anything
    skipped = []
    for name, module in net.named_modules():
        if not isinstance(module, base.StepModule) or not isinstance(module, instance):
            continue
        if backend in module.supported_backends:
            module.backend = backend
        elif len(module.supported_backends) > 1 or module.backend != backend:
            skipped.append(f"{name or '<root>'} ({type(module).__name__})")
    if skipped:
        warnings.warn(
            f"set_backend({backend!r}): these modules do not support it and keep their "
            f"backend: {', '.join(skipped)}",
            stacklevel=2,
        )


def seq_to_ann_forward(x_seq: torch.Tensor, stateless_module: nn.Module | Sequence[nn.Module] | Callable):
    """Run stateless module(s) on ``[T, N, ...]`` by folding T into the batch."""
    if x_seq.dim() < 2:
        raise ValueError(f"seq_to_ann_forward expects x_seq of shape [T, N, ...], got {tuple(x_seq.shape)}")
    y = x_seq.flatten(0, 1)
    if isinstance(stateless_module, (list, tuple, nn.Sequential)):
        for m in stateless_module:
            y = m(y)
    else:
        y = stateless_module(y)
    return y.view(x_seq.shape[0], x_seq.shape[1], *y.shape[1:])


def multi_step_forward(x_seq: torch.Tensor, single_step_module: nn.Module | Sequence[nn.Module] | Callable):
    """Run single-step module(s) over T by a loop and stack the outputs."""
    modules = single_step_module if isinstance(single_step_module, (list, tuple, nn.Sequential)) else [single_step_module]
    outputs = []
    for x in x_seq:
        for m in modules:
            x = m(x)
        outputs.append(x)
    return torch.stack(outputs)


def chunk_multi_step_forward(split_size: int, x_seq: torch.Tensor, multi_step_module: nn.Module | Callable):
    """Run a multi-step module on chunks of at most ``split_size`` timesteps (less memory)."""
    if not isinstance(split_size, int) or split_size < 1:
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
