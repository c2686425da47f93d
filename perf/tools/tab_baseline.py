"""The O(T²) TAB baseline: the official code's algorithm (HaiyanJiang/SNN-TAB, ``models.py``,
``TAB_Layer``), restated for comparison and benchmarking.

For every step t it runs a fresh torch BatchNorm3d (one per step, ``bn_list[t]``) over the
whole growing block x[0..t] and keeps only slice t of the result, then multiplies step t
by p_t². That re-normalises (t+1)·N·spatial values at step t: Σ_t (t+1) = T(T+1)/2
passes over a step's worth of data, against snnorm's O(T) prefix statistics
(:func:`snnorm.backends.torch_backend.tab`). Layout as the official code: input
``[N, T, C, H, W]``, ``p`` of shape ``[T, 1, 1, 1, 1]``; :func:`run_on_tncs` adapts
snnorm's ``[T, N, C, *spatial]``. ``state_dict`` keys are the official ones, so
``load_state_dict`` moves parameters and statistics between this and
:class:`snnorm.layer.TemporalAccumulatedBatchNorm2d` in both directions.

Only for tests and ``perf/bench_tab.py``; not part of the library.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn


class QuadraticTAB(nn.Module):
    """TAB as the official code computes it: per step, a BatchNorm3d over x[:, 0..t]."""

    def __init__(self, num_features: int, time_steps: int = 4, eps: float = 1e-5, momentum=0.1,
                 affine: bool = True, track_running_stats: bool = True):
        super().__init__()
        self.time_steps = time_steps
        self.bn_list = nn.ModuleList(
            nn.BatchNorm3d(num_features, eps, momentum, affine, track_running_stats) for _ in range(time_steps)
        )
        self.p = nn.Parameter(torch.ones(time_steps, 1, 1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``[N, T, C, H, W]``."""
        if x.dim() != 5 or x.shape[1] != self.time_steps:
            raise ValueError(f"expected [N, T={self.time_steps}, C, H, W], got {tuple(x.shape)}")
        outputs = []
        for t in range(self.time_steps):
            block = x[:, : t + 1].transpose(1, 2)  # [N, C, t+1, H, W]: BatchNorm3d's channel dim 1
            normalised = self.bn_list[t](block).transpose(1, 2)  # back to [N, t+1, C, H, W]
            outputs.append(normalised[:, t])  # keep the newest step only
        y = torch.stack(outputs, dim=1).transpose(0, 1)  # [T, N, C, H, W]
        y = y * (self.p * self.p)  # p² broadcast over [T, N, C, H, W]
        return y.transpose(0, 1)


def run_on_tncs(module: QuadraticTAB, x_seq: torch.Tensor) -> torch.Tensor:
    """Apply ``module`` to snnorm's ``[T, N, C, *spatial]`` (any 0–3 spatial dims)."""
    T, N, C = x_seq.shape[:3]
    S = math.prod(x_seq.shape[3:])
    y = module(x_seq.reshape(T, N, C, S, 1).transpose(0, 1))
    return y.transpose(0, 1).reshape(x_seq.shape)
