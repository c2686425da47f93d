"""Step-mode wrappers of stateless torch layers, SNN dropout, and sequence containers.

Each wrapper subclasses the torch layer (its ``state_dict`` is the torch layer's) and
:class:`snnorm.base.StepModule`. With ``step_mode='s'`` (default) it is the torch layer,
one timestep ``[N, ...]`` per call. With ``step_mode='m'`` it takes a whole sequence
``[T, N, ...]`` and folds T into the batch::

    y_seq = layer(x_seq.flatten(0, 1)).unflatten(0, (T, N))

which is exact for layers without state (each sample is processed independently).
The constructor arguments and defaults are spikingjelly 2.0.0's
(``spikingjelly.activation_based.layer``); porting means changing the import.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.common_types import _size_1_t, _size_2_t, _size_3_t

from .. import _steps, base
from .._checks import check_device, check_ndim, check_sequence, check_size, check_tensor

__all__ = [
    "Conv1d",
    "Conv2d",
    "Conv3d",
    "Linear",
    "Flatten",
    "MaxPool1d",
    "MaxPool2d",
    "MaxPool3d",
    "AvgPool1d",
    "AvgPool2d",
    "AvgPool3d",
    "AdaptiveAvgPool1d",
    "AdaptiveAvgPool2d",
    "AdaptiveAvgPool3d",
    "Dropout",
    "Dropout2d",
    "SeqToANNContainer",
    "MultiStepContainer",
]


class _FoldTimeMixin(base.StepModule):
    """Forward for stateless wrappers: the torch forward in 's', T folded into N in 'm'.

    Class attributes describe the accepted input: ``_spatial_dims`` (k for an Nd layer;
    single-step input is ``[C, *k]`` unbatched or ``[N, C, *k]``, multi-step input is
    ``[T, N, C, *k]``) and ``_channels_attr`` (the attribute holding the expected channel
    count, checked at dim ``-(k+1)``; None for layers that accept any channel count).
    Placed before the torch class in the bases so its ``forward`` wraps the torch one.
    """

    _spatial_dims: int = 0
    _channels_attr: Optional[str] = None
    _floating_only: bool = False

    def _check_input(self, x: torch.Tensor) -> None:
        check_tensor(self, x, floating=self._floating_only)
        k = self._spatial_dims
        if self.step_mode == "s":
            check_ndim(self, x, (k + 1, k + 2))
        else:
            check_ndim(self, x, (k + 3,))
            check_sequence(self, x)
        if self._channels_attr is not None:
            check_size(self, x, x.dim() - (k + 1), getattr(self, self._channels_attr), "input channels")
        check_device(self, x, getattr(self, "weight", None))

    def forward(self, x: torch.Tensor):
        self._check_input(x)
        if self.step_mode == "s":
            return super().forward(x)
        T, N = x.shape[:2]
        y = super().forward(x.flatten(0, 1))
        if isinstance(y, tuple):  # MaxPool with return_indices=True
            return tuple(item.unflatten(0, (T, N)) for item in y)
        return y.unflatten(0, (T, N))

    def extra_repr(self) -> str:
        return super().extra_repr() + f", step_mode={self.step_mode}"


# -- convolutions ---------------------------------------------------------------


class Conv1d(_FoldTimeMixin, nn.Conv1d):
    """:class:`torch.nn.Conv1d` with step modes: ``[N, C, L]`` ('s') or ``[T, N, C, L]`` ('m')."""

    _spatial_dims = 1
    _channels_attr = "in_channels"
    _floating_only = True

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: _size_1_t,
        stride: _size_1_t = 1,
        padding: Union[str, _size_1_t] = 0,
        dilation: _size_1_t = 1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        step_mode: str = "s",
        device=None,
        dtype=None,
    ) -> None:
        super().__init__(
            in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, padding_mode,
            device=device, dtype=dtype,
        )
        self.step_mode = step_mode


class Conv2d(_FoldTimeMixin, nn.Conv2d):
    """:class:`torch.nn.Conv2d` with step modes: ``[N, C, H, W]`` ('s') or ``[T, N, C, H, W]`` ('m')."""

    _spatial_dims = 2
    _channels_attr = "in_channels"
    _floating_only = True

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: _size_2_t,
        stride: _size_2_t = 1,
        padding: Union[str, _size_2_t] = 0,
        dilation: _size_2_t = 1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        step_mode: str = "s",
        device=None,
        dtype=None,
    ) -> None:
        super().__init__(
            in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, padding_mode,
            device=device, dtype=dtype,
        )
        self.step_mode = step_mode


class Conv3d(_FoldTimeMixin, nn.Conv3d):
    """:class:`torch.nn.Conv3d` with step modes: ``[N, C, D, H, W]`` ('s') or ``[T, N, C, D, H, W]`` ('m')."""

    _spatial_dims = 3
    _channels_attr = "in_channels"
    _floating_only = True

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: _size_3_t,
        stride: _size_3_t = 1,
        padding: Union[str, _size_3_t] = 0,
        dilation: _size_3_t = 1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        step_mode: str = "s",
        device=None,
        dtype=None,
    ) -> None:
        super().__init__(
            in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, padding_mode,
            device=device, dtype=dtype,
        )
        self.step_mode = step_mode


# -- linear, flatten ------------------------------------------------------------


class Linear(nn.Linear, base.StepModule):
    """:class:`torch.nn.Linear` with step modes.

    A linear map acts on the last dim only, so ``[N, *, in]`` ('s') and ``[T, N, *, in]``
    ('m') run the same torch forward; no reshape is needed.
    """

    def __init__(
        self, in_features: int, out_features: int, bias: bool = True, step_mode: str = "s", device=None, dtype=None
    ) -> None:
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self.step_mode = step_mode

    def _check_input(self, x: torch.Tensor) -> None:
        check_tensor(self, x)
        min_ndim = 1 if self.step_mode == "s" else 2
        if x.dim() < min_ndim:
            check_ndim(self, x, (min_ndim,))
        if self.step_mode == "m":
            check_sequence(self, x)
        check_size(self, x, x.dim() - 1, self.in_features, "input features")
        check_device(self, x, self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        return super().forward(x)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", step_mode={self.step_mode}"


class Flatten(_FoldTimeMixin, nn.Flatten):
    """:class:`torch.nn.Flatten` with step modes; in 'm' mode dims count from the per-step sample.

    ``Flatten()`` maps ``[T, N, C, H, W]`` to ``[T, N, C·H·W]`` in 'm' mode.
    """

    def __init__(self, start_dim: int = 1, end_dim: int = -1, step_mode: str = "s") -> None:
        super().__init__(start_dim, end_dim)
        self.step_mode = step_mode

    def _check_input(self, x: torch.Tensor) -> None:
        check_tensor(self, x, floating=False)
        if self.step_mode == "m":
            if x.dim() < 2:
                check_ndim(self, x, (2,))
            check_sequence(self, x)


# -- pooling --------------------------------------------------------------------


class MaxPool1d(_FoldTimeMixin, nn.MaxPool1d):
    """:class:`torch.nn.MaxPool1d` with step modes."""

    _spatial_dims = 1

    def __init__(
        self,
        kernel_size: _size_1_t,
        stride: Optional[_size_1_t] = None,
        padding: _size_1_t = 0,
        dilation: _size_1_t = 1,
        return_indices: bool = False,
        ceil_mode: bool = False,
        step_mode: str = "s",
    ) -> None:
        super().__init__(kernel_size, stride, padding, dilation, return_indices, ceil_mode)
        self.step_mode = step_mode


class MaxPool2d(_FoldTimeMixin, nn.MaxPool2d):
    """:class:`torch.nn.MaxPool2d` with step modes."""

    _spatial_dims = 2

    def __init__(
        self,
        kernel_size: _size_2_t,
        stride: Optional[_size_2_t] = None,
        padding: _size_2_t = 0,
        dilation: _size_2_t = 1,
        return_indices: bool = False,
        ceil_mode: bool = False,
        step_mode: str = "s",
    ) -> None:
        super().__init__(kernel_size, stride, padding, dilation, return_indices, ceil_mode)
        self.step_mode = step_mode


class MaxPool3d(_FoldTimeMixin, nn.MaxPool3d):
    """:class:`torch.nn.MaxPool3d` with step modes."""

    _spatial_dims = 3

    def __init__(
        self,
        kernel_size: _size_3_t,
        stride: Optional[_size_3_t] = None,
        padding: _size_3_t = 0,
        dilation: _size_3_t = 1,
        return_indices: bool = False,
        ceil_mode: bool = False,
        step_mode: str = "s",
    ) -> None:
        super().__init__(kernel_size, stride, padding, dilation, return_indices, ceil_mode)
        self.step_mode = step_mode


class AvgPool1d(_FoldTimeMixin, nn.AvgPool1d):
    """:class:`torch.nn.AvgPool1d` with step modes."""

    _spatial_dims = 1

    def __init__(
        self,
        kernel_size: _size_1_t,
        stride: Optional[_size_1_t] = None,
        padding: _size_1_t = 0,
        ceil_mode: bool = False,
        count_include_pad: bool = True,
        step_mode: str = "s",
    ) -> None:
        super().__init__(kernel_size, stride, padding, ceil_mode, count_include_pad)
        self.step_mode = step_mode


class AvgPool2d(_FoldTimeMixin, nn.AvgPool2d):
    """:class:`torch.nn.AvgPool2d` with step modes."""

    _spatial_dims = 2

    def __init__(
        self,
        kernel_size: _size_2_t,
        stride: Optional[_size_2_t] = None,
        padding: _size_2_t = 0,
        ceil_mode: bool = False,
        count_include_pad: bool = True,
        divisor_override: Optional[int] = None,
        step_mode: str = "s",
    ) -> None:
        super().__init__(kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override)
        self.step_mode = step_mode


class AvgPool3d(_FoldTimeMixin, nn.AvgPool3d):
    """:class:`torch.nn.AvgPool3d` with step modes."""

    _spatial_dims = 3

    def __init__(
        self,
        kernel_size: _size_3_t,
        stride: Optional[_size_3_t] = None,
        padding: _size_3_t = 0,
        ceil_mode: bool = False,
        count_include_pad: bool = True,
        divisor_override: Optional[int] = None,
        step_mode: str = "s",
    ) -> None:
        super().__init__(kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override)
        self.step_mode = step_mode


class AdaptiveAvgPool1d(_FoldTimeMixin, nn.AdaptiveAvgPool1d):
    """:class:`torch.nn.AdaptiveAvgPool1d` with step modes."""

    _spatial_dims = 1

    def __init__(self, output_size, step_mode: str = "s") -> None:
        super().__init__(output_size)
        self.step_mode = step_mode


class AdaptiveAvgPool2d(_FoldTimeMixin, nn.AdaptiveAvgPool2d):
    """:class:`torch.nn.AdaptiveAvgPool2d` with step modes."""

    _spatial_dims = 2

    def __init__(self, output_size, step_mode: str = "s") -> None:
        super().__init__(output_size)
        self.step_mode = step_mode


class AdaptiveAvgPool3d(_FoldTimeMixin, nn.AdaptiveAvgPool3d):
    """:class:`torch.nn.AdaptiveAvgPool3d` with step modes."""

    _spatial_dims = 3

    def __init__(self, output_size, step_mode: str = "s") -> None:
        super().__init__(output_size)
        self.step_mode = step_mode


# -- dropout --------------------------------------------------------------------


class Dropout(base.MemoryModule):
    """Dropout whose mask is drawn once per sequence and kept for every timestep.

    In training, the first call after :meth:`reset` draws ``mask = dropout(1, p)``
    (entries 0 with probability p, else 1/(1−p)) with the shape of one timestep's input;
    every timestep until the next reset is multiplied by that same mask, so the network
    is one fixed sub-network for the whole simulation (Lee et al., "Enabling Spike-based
    Backpropagation for Training Deep Neural Network Architectures", Front. Neurosci. 2020).
    In eval it is the identity. ``mask`` is a memory: ``reset()`` clears it.
    """

    def __init__(self, p: float = 0.5, step_mode: str = "s") -> None:
        super().__init__()
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p < 1.0:
            raise ValueError(f"{type(self).__name__}: p must be a float in [0, 1), got {p!r}")
        self.step_mode = step_mode
        self.p = float(p)
        self.register_memory("mask", None)

    def extra_repr(self) -> str:
        return f"p={self.p}, step_mode={self.step_mode}"

    def create_mask(self, x: torch.Tensor) -> torch.Tensor:
        return F.dropout(torch.ones_like(x), self.p, training=True)

    def _masked(self, x: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
        """``x * mask``; ``step`` is one timestep of ``x`` (x itself in 's' mode)."""
        if not self.training:
            return x
        if self.mask is None:
            self.mask = self.create_mask(step)
        elif self.mask.shape != step.shape:
            # a silent broadcast would apply one sample's mask to another batch
            raise ValueError(
                f"{type(self).__name__}: the mask drawn for this sequence has shape "
                f"{tuple(self.mask.shape)} but one timestep of the input has shape {tuple(step.shape)}; "
                "call reset() (snnorm.functional.reset_net) before a new sequence or batch size"
            )
        return x * self.mask

    def single_step_forward(self, x: torch.Tensor) -> torch.Tensor:
        check_tensor(self, x)
        return self._masked(x, x)

    def multi_step_forward(self, x_seq: torch.Tensor) -> torch.Tensor:
        check_tensor(self, x_seq)
        if x_seq.dim() < 2:
            check_ndim(self, x_seq, (2,))
        check_sequence(self, x_seq)
        return self._masked(x_seq, x_seq[0])


class Dropout2d(Dropout):
    """:class:`Dropout` that drops whole channels (``F.dropout2d`` mask), fixed across T."""

    def __init__(self, p: float = 0.2, step_mode: str = "s") -> None:
        super().__init__(p, step_mode)

    def create_mask(self, x: torch.Tensor) -> torch.Tensor:
        return F.dropout2d(torch.ones_like(x), self.p, training=True)


# -- containers -----------------------------------------------------------------


def _check_children_single_step(container: nn.Sequential) -> None:
    for name, child in container.named_children():
        mode = getattr(child, "step_mode", "s")
        if mode != "s":
            raise ValueError(
                f"{type(container).__name__}: child {name!r} ({type(child).__name__}) has "
                f"step_mode={mode!r}, but a container feeds its children one timestep "
                "(or T folded into the batch) at a time, so they must have step_mode='s'"
            )


class SeqToANNContainer(nn.Sequential, base.MultiStepModule):
    """Runs stateless single-step modules on ``[T, N, ...]`` by folding T into the batch.

    ``y_seq = modules(x_seq.flatten(0, 1)).unflatten(0, (T, N))``. Children must be
    stateless (conv, BN in 's' mode, pooling...) and in step_mode 's'.
    """

    owns_children_step_mode = True

    def __init__(self, *args: nn.Module) -> None:
        super().__init__(*args)
        _check_children_single_step(self)

    def forward(self, x_seq: torch.Tensor) -> torch.Tensor:
        check_tensor(self, x_seq, floating=False)
        if x_seq.dim() < 2:
            check_ndim(self, x_seq, (2,))
        check_sequence(self, x_seq)
        _check_children_single_step(self)
        return _steps.seq_to_ann_forward(x_seq, super().forward)


class MultiStepContainer(nn.Sequential, base.MultiStepModule):
    """Runs single-step modules (stateful ones too) over ``[T, N, ...]`` with a loop over T.

    ``y[t] = modules(x[t])`` for t = 0..T−1, stacked. Children must be in step_mode 's'.
    """

    owns_children_step_mode = True

    def __init__(self, *args: nn.Module) -> None:
        super().__init__(*args)
        _check_children_single_step(self)

    def forward(self, x_seq: torch.Tensor) -> torch.Tensor:
        check_tensor(self, x_seq, floating=False)
        if x_seq.dim() < 2:
            check_ndim(self, x_seq, (2,))
        check_sequence(self, x_seq)
        _check_children_single_step(self)
        return _steps.multi_step_forward(x_seq, super().forward)
