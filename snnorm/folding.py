r"""Conv-BN folding (spikingjelly ``activation_based.functional`` API, re-exported by
:mod:`snnorm.functional`).

An eval BN is a per-channel affine map of its input z (Ioffe & Szegedy, "Batch
Normalization", ICML 2015, §3.2)::

    y = γ (z − μ)/√(σ² + ε) + β = s·z + (β − s·μ),   s = γ/√(σ² + ε)

so after a convolution z = W ⋆ x + b it folds into W' = s[o]·W[o], b' = s·(b − μ) + β.
``fused_conv2d_*_of_convbn2d``, ``fuse_convbn2d`` and ``fuse_conv_bn_eval`` fold one pair;
``fuse_conv_bn_eval_modules`` folds every pair of a traced network and
``pack_conv_bn_train_modules`` packs the pairs of a training network (spikingjelly's
``functional.conv_bn_fusion``).
"""

from __future__ import annotations

import contextlib
import copy

import torch
import torch.fx
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd

from ._fx import _conv_bn_pairs, _replace_pairs, _supported_step_modes, _trace

__all__ = [
    "fused_conv2d_weight_of_convbn2d",
    "fused_conv2d_bias_of_convbn2d",
    "scale_fused_conv2d_weight_of_convbn2d",
    "scale_fused_conv2d_bias_of_convbn2d",
    "fuse_convbn2d",
    "fuse_conv_bn_eval",
    "fuse_conv_bn_eval_modules",
    "pack_conv_bn_train_modules",
]


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

    #: a leaf of :func:`snnorm._fx._trace` (a packed network can be traced again)
    traced_as_leaf = True

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
