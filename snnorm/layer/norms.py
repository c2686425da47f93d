r"""Normalizations that do not use batch statistics: GroupNorm with step modes, NeuNorm."""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from .. import _steps, base
from .._checks import (
    check_device, check_dtype, check_eps, check_ndim, check_positive_int, check_sequence, check_size, check_tensor,
    check_unit_interval,
)
from .._recompute import check_stateful_recompute

__all__ = ["GroupNorm", "NeuNorm", "neunorm_step"]


class GroupNorm(nn.GroupNorm, base.StepModule):
    r""":class:`torch.nn.GroupNorm` with step modes (Wu & He, "Group Normalization", ECCV 2018).

    .. math::
        y = γ \frac{x − μ_g}{\sqrt{σ_g^2 + ε}} + β

    with μ_g, σ_g² over the channels of group g and all spatial positions of one sample
    (no batch statistics, so train and eval agree). 's': ``[N, C, *]``; 'm':
    ``[T, N, C, *]``, each (t, n) normalised on its own (T folded into the batch).

    ``eps`` must be > 0: μ_g, σ_g² are computed from the input, like batch statistics, and a
    group whose values are all equal (a silent region of a spike map) has σ_g² = 0, so
    ε = 0 would divide by zero. Refused in the constructor and, since ``eps`` is a plain
    attribute, again by every forward before it computes anything.
    """

    _EPS_REASON = (
        "GroupNorm normalises with statistics computed from the input (per sample and group), and a "
        "group of equal values (e.g. no spikes) has variance 0, so eps = 0 divides by zero"
    )

    def __init__(
        self,
        num_groups: int,
        num_channels: int,
        eps: float = 1e-5,
        affine: bool = True,
        step_mode: str = "s",
        device=None,
        dtype=None,
    ) -> None:
        owner = type(self).__name__
        check_positive_int(owner, "num_groups", num_groups)
        check_positive_int(owner, "num_channels", num_channels)
        check_eps(owner, eps, batch_stats=True, reason=self._EPS_REASON)
        super().__init__(num_groups, num_channels, eps, affine, device=device, dtype=dtype)
        self.step_mode = step_mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_tensor(self, x)
        multi = self.step_mode == "m"
        if x.dim() < 2 + multi:
            check_ndim(self, x, (2 + multi, 3 + multi, 4 + multi, 5 + multi))
        if multi:
            check_sequence(self, x)
        check_size(self, x, 1 + multi, self.num_channels, "channels")
        check_device(self, x, self.weight)
        check_dtype(self, x, self.weight)
        check_eps(self, self.eps, batch_stats=True, reason=self._EPS_REASON)
        if multi:
            return _steps.seq_to_ann_forward(x, super().forward)
        return super().forward(x)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", step_mode={self.step_mode}"


def neunorm_step(
    spikes: torch.Tensor, state: torch.Tensor, weight: torch.Tensor, k0: float, k1: float
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""One NeuNorm step: ``a = k0·a + k1·Σ_c s``, ``out = s − w ⊙ a``.

    ``spikes`` ``[N, C, H, W]``, ``state`` a ``[N, 1, H, W]``, ``weight`` w broadcastable
    to ``[N, C, H, W]``. Returns ``(out, a)``.
    """
    state = k0 * state + k1 * spikes.sum(dim=1, keepdim=True)
    return spikes - weight * state, state


class NeuNorm(base.MemoryModule):
    r"""Neuron normalization (NeuNorm; Wu et al., "Direct Training for Spiking Neural
    Networks: Faster, Larger, Better", AAAI 2019).

    An auxiliary neuron per position integrates the spikes of all C channels and
    inhibits them:

    .. math::
        a[t] = k_0\,a[t−1] + k_1 \sum_c s_c[t],\qquad k_1 = \frac{1 − k_0}{C^2}

        \text{out}[t] = s[t] − w \odot a[t]

    ``a`` starts at 0 (memory ``x``, shape ``[N, 1, H, W]``, reset by ``reset()``);
    w is learnable, ``[C, H, W]`` or ``[1, H, W]`` when ``shared_across_channels``.
    Place it after the spiking neurons of a 2-D conv layer (Conv2d → LIF → NeuNorm).
    Input ``[N, C, H, W]`` ('s') or ``[T, N, C, H, W]`` ('m').
    """

    def __init__(
        self,
        in_channels: int,
        height: int,
        width: int,
        k: float = 0.9,
        shared_across_channels: bool = False,
        step_mode: str = "s",
    ) -> None:
        super().__init__()
        check_positive_int(self, "in_channels", in_channels)
        check_positive_int(self, "height", height)
        check_positive_int(self, "width", width)
        k = check_unit_interval(self, "k", k)
        self.step_mode = step_mode
        self.register_memory("x", 0.0)
        self.in_channels = in_channels
        self.k0 = k
        self.k1 = (1.0 - k) / in_channels**2
        self.w = nn.Parameter(torch.empty(1 if shared_across_channels else in_channels, height, width))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.w, a=math.sqrt(5))

    def _check_input(self, x: torch.Tensor, multi: bool) -> None:
        check_tensor(self, x)
        check_ndim(self, x, (4 + multi,), "m" if multi else "s")
        if multi:
            check_sequence(self, x)
        check_size(self, x, 1 + multi, self.in_channels, "channels")
        check_size(self, x, 2 + multi, self.w.shape[1], "rows (height)")
        check_size(self, x, 3 + multi, self.w.shape[2], "columns (width)")
        check_device(self, x, self.w)
        check_dtype(self, x, self.w)

    def _initial_state(self, spikes: torch.Tensor) -> torch.Tensor:
        """The state ``a`` for a step with input ``spikes`` ``[N, C, H, W]``."""
        state = self.x
        expected = (spikes.shape[0], 1, *spikes.shape[2:])
        if not isinstance(state, torch.Tensor):
            return torch.full(expected, float(state), dtype=spikes.dtype, device=spikes.device)
        if tuple(state.shape) != expected:
            raise ValueError(
                f"{type(self).__name__}: the state from the previous step has shape {tuple(state.shape)}, "
                f"but this input {tuple(spikes.shape)} needs {expected}; call reset() "
                "(snnorm.functional.reset_net) before a new sequence or batch size"
            )
        return state

    def single_step_forward(self, x: torch.Tensor) -> torch.Tensor:
        check_stateful_recompute(self)  # a plain checkpoint would restart from the advanced state
        self._check_input(x, multi=False)
        out, self.x = neunorm_step(x, self._initial_state(x), self.w, self.k0, self.k1)
        return out

    def multi_step_forward(self, x_seq: torch.Tensor) -> torch.Tensor:
        check_stateful_recompute(self)
        self._check_input(x_seq, multi=True)
        state = self._initial_state(x_seq[0])
        outputs = []
        for spikes in x_seq:
            out, state = neunorm_step(spikes, state, self.w, self.k0, self.k1)
            outputs.append(out)
        self.x = state
        return torch.stack(outputs)

    def extra_repr(self) -> str:
        return f"shape={tuple(self.w.shape)}, k={self.k0}, step_mode={self.step_mode}"
