r"""Weight-standardized convolution and linear layers with step modes.

Weight standardization (Qiao et al., "Micro-Batch Training with Batch-Channel
Normalization and Weight Standardization", arXiv:1903.10520, 2019) normalises each
output unit's weights instead of the activations; the scaled form with a learnable gain
(Brock et al., "Characterizing signal propagation to close the performance gap in
unnormalized ResNets", ICLR 2021) is what spikingjelly implements:

.. math::
    \hat W_i = g_i \frac{W_i − \mathrm{mean}(W_i)}{\sqrt{\mathrm{Var}(W_i)\,·\,\mathrm{fan\_in} + ε}}

per output unit i over its fan_in = in_channels/groups · prod(kernel_size) weights,
with the unbiased variance. No batch statistics are involved, so train and eval agree.
"""

from __future__ import annotations

import math
from typing import Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.common_types import _size_2_t

from .. import _steps
from .._checks import check_dtype, check_eps, check_positive_int
from .containers import Conv2d, Linear

__all__ = ["WSConv2d", "WSLinear", "standardize_weight"]


def standardize_weight(weight: torch.Tensor, gain: Optional[torch.Tensor], eps: float) -> torch.Tensor:
    r"""``g · (W − mean) / √(Var·fan_in + ε)`` per output unit (dim 0), unbiased variance."""
    dims = list(range(1, weight.dim()))
    fan_in = math.prod(weight.shape[1:])
    mean = weight.mean(dim=dims, keepdim=True)
    var = weight.var(dim=dims, keepdim=True)
    w = (weight - mean) / (var * fan_in + eps) ** 0.5
    return w if gain is None else w * gain


def _for_input(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]):
    """Mixed precision (a float16/bfloat16 input, float32 parameters): the weight is
    standardised in float32, then cast to the input's dtype for the conv/matmul."""
    if weight.dtype == x.dtype or torch.is_autocast_enabled(x.device.type):
        return weight, bias
    return weight.to(x.dtype), None if bias is None else bias.to(x.dtype)


class WSConv2d(Conv2d):
    r""":class:`snnorm.layer.Conv2d` with scaled weight standardization (see module docs).

    Extra arguments: ``gain`` (learnable per-output-channel gain g, shape
    ``[out_channels, 1, 1, 1]``, starting at 1) and ``eps`` (default 1e-4). The weight is
    standardised once per call, also in 'm' mode. Unlike spikingjelly 2.0.0, which calls
    ``F.conv2d`` directly, ``padding_mode`` other than ``'zeros'`` is honoured.
    """

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
        gain: bool = True,
        eps: float = 1e-4,
        device=None,
        dtype=None,
    ) -> None:
        owner = type(self).__name__
        check_positive_int(owner, "in_channels", in_channels)
        check_positive_int(owner, "out_channels", out_channels)
        eps = check_eps(owner, eps)
        super().__init__(
            in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, padding_mode,
            step_mode, device=device, dtype=dtype,
        )
        if gain:
            self.gain = nn.Parameter(torch.ones(self.out_channels, 1, 1, 1, device=device, dtype=dtype))
        else:
            self.gain = None
        self.eps = eps

    def get_weight(self) -> torch.Tensor:
        check_eps(self, self.eps)  # a plain attribute a user may have reassigned
        return standardize_weight(self.weight, self.gain, self.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        check_dtype(self, x, self.weight)
        weight, bias = _for_input(x, self.get_weight(), self.bias)
        if self.step_mode == "s":
            return self._conv_forward(x, weight, bias)
        return _steps.seq_to_ann_forward(x, lambda y: self._conv_forward(y, weight, bias))

    def extra_repr(self) -> str:
        return super().extra_repr() + f", gain={self.gain is not None}, eps={self.eps}"


class WSLinear(Linear):
    r""":class:`snnorm.layer.Linear` with scaled weight standardization (see module docs).

    ``gain``: learnable per-output gain g, shape ``[out_features, 1]``, starting at 1;
    ``eps`` default 1e-4. Acts on the last dim, so 's' and 'm' run the same code.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        step_mode: str = "s",
        gain: bool = True,
        eps: float = 1e-4,
        device=None,
        dtype=None,
    ) -> None:
        owner = type(self).__name__
        check_positive_int(owner, "in_features", in_features)
        check_positive_int(owner, "out_features", out_features)
        eps = check_eps(owner, eps)
        super().__init__(in_features, out_features, bias, step_mode, device=device, dtype=dtype)
        if gain:
            self.gain = nn.Parameter(torch.ones(self.out_features, 1, device=device, dtype=dtype))
        else:
            self.gain = None
        self.eps = eps

    def get_weight(self) -> torch.Tensor:
        check_eps(self, self.eps)  # a plain attribute a user may have reassigned
        return standardize_weight(self.weight, self.gain, self.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        check_dtype(self, x, self.weight)
        return F.linear(x, *_for_input(x, self.get_weight(), self.bias))

    def extra_repr(self) -> str:
        return super().extra_repr() + f", gain={self.gain is not None}, eps={self.eps}"
