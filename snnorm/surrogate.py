"""Surrogate spike functions (spikingjelly ``activation_based.surrogate`` numerics).

Forward: the Heaviside step Θ(x) = 1 if x >= 0 else 0 (Θ(0) = 1), in x's dtype.
Backward: the derivative of a smooth primitive g(x):

- ``Sigmoid(alpha=4)``:  g'(x) = α·σ(αx)·(1 − σ(αx))
- ``ATan(alpha=2)``:     g'(x) = (α/2) / (1 + (π/2·α·x)²)
- ``PiecewiseQuadratic(alpha=1)``: g'(x) = max(0, α − α²|x|)
- ``PiecewiseExp(alpha=1)``: g'(x) = (α/2)·exp(−α|x|)

With ``spiking=False`` the module returns the primitive g(x) itself (differentiable).
Each surrogate is a fresh ``nn.Module`` instance per neuron: no shared mutable defaults.
``kernel_spec()`` names the surrogate for fused kernels (``None`` if a backend must use
the torch path).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from ._checks import check_bool, check_positive

__all__ = ["SurrogateFunctionBase", "Sigmoid", "ATan", "PiecewiseQuadratic", "PiecewiseExp", "heaviside"]


def heaviside(x: torch.Tensor) -> torch.Tensor:
    """Θ(x) = 1 where x >= 0, else 0, in x's dtype."""
    return (x >= 0).to(x.dtype)


class _SurrogateSpike(torch.autograd.Function):
    """Heaviside forward, ``surrogate.derivative`` backward."""

    @staticmethod
    def forward(x, derivative, alpha):
        return heaviside(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, derivative, alpha = inputs
        ctx.save_for_backward(x)
        ctx.derivative = derivative
        ctx.alpha = alpha

    @staticmethod
    def backward(ctx, grad_output):
        (x,) = ctx.saved_tensors
        return grad_output * ctx.derivative(x, ctx.alpha), None, None


class SurrogateFunctionBase(nn.Module):
    """Base class: subclasses define ``derivative(x, alpha)`` and ``primitive(x, alpha)``."""

    #: name used by fused kernels, or None when no kernel implements it
    kernel_name: str | None = None

    def __init__(self, alpha: float, spiking: bool = True):
        super().__init__()
        self.alpha = check_positive(self, "alpha", alpha)
        self.spiking = check_bool(self, "spiking", spiking)

    def set_spiking_mode(self, spiking: bool) -> None:
        self.spiking = spiking

    @staticmethod
    def derivative(x: torch.Tensor, alpha: float) -> torch.Tensor:
        raise NotImplementedError

    @staticmethod
    def primitive(x: torch.Tensor, alpha: float) -> torch.Tensor:
        raise NotImplementedError

    def kernel_spec(self) -> tuple[str, float] | None:
        """(kernel name, alpha) for fused kernels, or None if no kernel supports it."""
        if self.kernel_name is None or not self.spiking:
            return None
        return self.kernel_name, self.alpha

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.spiking:
            return _SurrogateSpike.apply(x, type(self).derivative, self.alpha)
        return self.primitive(x, self.alpha)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, spiking={self.spiking}"


class Sigmoid(SurrogateFunctionBase):
    """g(x) = σ(αx); g'(x) = α·σ(αx)(1 − σ(αx)). Default α = 4 (spikingjelly)."""

    kernel_name = "sigmoid"

    def __init__(self, alpha: float = 4.0, spiking: bool = True):
        super().__init__(alpha, spiking)

    @staticmethod
    def derivative(x, alpha):
        sg = torch.sigmoid(x * alpha)
        return (1.0 - sg) * sg * alpha

    @staticmethod
    def primitive(x, alpha):
        return torch.sigmoid(x * alpha)


class ATan(SurrogateFunctionBase):
    """g(x) = arctan(π/2·αx)/π + 1/2; g'(x) = (α/2)/(1 + (π/2·αx)²). Default α = 2."""

    kernel_name = "atan"

    def __init__(self, alpha: float = 2.0, spiking: bool = True):
        super().__init__(alpha, spiking)

    @staticmethod
    def derivative(x, alpha):
        return alpha / 2 / (1 + (math.pi / 2 * alpha * x).square())

    @staticmethod
    def primitive(x, alpha):
        return (math.pi / 2 * alpha * x).atan() / math.pi + 0.5


class PiecewiseQuadratic(SurrogateFunctionBase):
    """g'(x) = α − α²|x| for |x| <= 1/α, else 0. Default α = 1."""

    kernel_name = "piecewise_quadratic"

    def __init__(self, alpha: float = 1.0, spiking: bool = True):
        super().__init__(alpha, spiking)

    @staticmethod
    def derivative(x, alpha):
        return torch.clamp(alpha - alpha**2 * x.abs(), min=0.0)

    @staticmethod
    def primitive(x, alpha):
        inner = -(alpha**2) / 2 * x.square() * x.sign() + alpha * x + 0.5
        return torch.where(x > 1.0 / alpha, torch.ones_like(x), torch.where(x.abs() <= 1.0 / alpha, inner, torch.zeros_like(x)))


class PiecewiseExp(SurrogateFunctionBase):
    """g'(x) = (α/2)·exp(−α|x|). Default α = 1."""

    kernel_name = "piecewise_exp"

    def __init__(self, alpha: float = 1.0, spiking: bool = True):
        super().__init__(alpha, spiking)

    @staticmethod
    def derivative(x, alpha):
        return alpha / 2 * torch.exp(-alpha * x.abs())

    @staticmethod
    def primitive(x, alpha):
        half = torch.exp(-alpha * x.abs()) / 2
        return torch.where(x < 0, half, 1 - half)
