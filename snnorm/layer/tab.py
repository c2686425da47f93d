r"""Temporal accumulated BN (TAB; Jiang et al., ICLR 2024): step t normalised with the
statistics of steps 0..t::

    y_t = p_t²·(γ_t (x_t − μ_{0..t})/√(σ²_{0..t} + ε) + β_t)
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from .. import base
from .._bn_state import NormPlan, check_batch_values, check_bn_input, resolve_running_stats, stats_sync, uses_batch_stats
from .._checks import check_positive_int
from .._recompute import check_stateful_recompute
from ._bn_common import _check_bn_args

__all__ = ["TemporalAccumulatedBatchNorm1d", "TemporalAccumulatedBatchNorm2d", "TemporalAccumulatedBatchNorm3d"]


class _TemporalAccumulatedBatchNormBase(base.MemoryModule):
    r"""Temporal accumulated BN (TAB; Jiang et al., "TAB: Temporal Accumulated Batch
    Normalization in Spiking Neural Networks", ICLR 2024).

    Step t is normalised with the statistics of all steps up to and including t:

    .. math::
        μ_t, σ_t^2 = \text{mean, biased variance of } x[0..t] \text{ per channel}
        \quad (n_t = (t+1)·N·\text{spatial values}),\qquad
        y_t = p_t^2 \left(γ_t \frac{x_t − μ_t}{\sqrt{σ_t^2 + ε}} + β_t\right)

    with a γ_t, β_t per step and p ∈ R^T (init 1; p² scales the bias too). Gradients flow
    through μ_t, σ_t² into every earlier step. Running statistics are kept per step and
    updated in training with μ_t and the unbiased σ_t²·n_t/(n_t − 1) (factor ``momentum``,
    or the cumulative 1/``num_batches_tracked[t]`` when ``momentum is None``); eval
    normalises step t with ``running_mean[t]``, ``running_var[t]``. With
    ``track_running_stats=False`` the accumulated batch statistics are used in eval too.

    * ``step_mode='m'`` (default): ``[T, N, C, *spatial]``, T equal to the module's.
      The prefix statistics come from per-step partial (count, mean, M2) combined in
      order (Chan et al.), so a sequence costs O(T) passes (the official code re-normalises
      x[0..t] at every step: O(T²)). Memories are not touched.
    * ``step_mode='s'``: ``[N, C, *spatial]`` per call; the accumulated count, mean and M2
      per channel are memories (``stat_count``, ``stat_mean``, ``stat_m2``, and the step
      index ``t``), cleared by ``reset()`` / :func:`snnorm.functional.reset_net`. T calls
      give exactly the multi-step result; call T + 1 without a reset raises ValueError.

    ``state_dict`` uses the official code's keys (HaiyanJiang/SNN-TAB: ``bn_list.{t}.weight``,
    ``.bias``, ``.running_mean``, ``.running_var``, ``.num_batches_tracked`` and ``p``), so
    its checkpoints load here; its ``p`` of shape [T, 1, 1, 1, 1] loads as well as [T].
    Internally the per-step tensors are stacked: ``weight``, ``bias``, ``running_mean``,
    ``running_var`` are ``[T, C]``, ``num_batches_tracked`` and ``p`` are ``[T]``.
    ``supported_backends = ("torch", "triton")``: the math is the op ``tab`` of the selected
    backend (:func:`snnorm.backends.torch_backend.tab`).
    """

    supported_backends = ("torch", "triton")
    _sample_ndims: tuple[int, ...] = ()

    def __init__(
        self,
        T: int,
        num_features: int,
        eps: float = 1e-5,
        momentum: Optional[float] = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        step_mode: str = "m",
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        check_positive_int(type(self).__name__, "T", T)
        _check_bn_args(type(self).__name__, num_features, eps, momentum)
        factory = {"device": device, "dtype": dtype}
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        self.affine = affine
        self.track_running_stats = track_running_stats
        if affine:
            self.weight = nn.Parameter(torch.ones(T, num_features, **factory))
            self.bias = nn.Parameter(torch.zeros(T, num_features, **factory))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        self.p = nn.Parameter(torch.ones(T, **factory))
        if track_running_stats:
            self.register_buffer("running_mean", torch.zeros(T, num_features, **factory))
            self.register_buffer("running_var", torch.ones(T, num_features, **factory))
            self.register_buffer("num_batches_tracked", torch.zeros(T, dtype=torch.long, device=device))
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
            self.register_buffer("num_batches_tracked", None)
        self.step_mode = step_mode
        self.register_memory("t", -1)  # last processed step in single-step mode
        self.register_memory("stat_count", 0)  # statistics of steps 0..t (single-step mode)
        self.register_memory("stat_mean", None)
        self.register_memory("stat_m2", None)

    @property
    def T(self) -> int:
        return self.p.shape[0]

    def reset_running_stats(self) -> None:
        if self.track_running_stats:
            self.running_mean.zero_()
            self.running_var.fill_(1)
            self.num_batches_tracked.zero_()

    def reset_parameters(self) -> None:
        self.reset_running_stats()
        with torch.no_grad():
            if self.affine:
                self.weight.fill_(1)
                self.bias.zero_()
            self.p.fill_(1)

    # -- input checks -----------------------------------------------------------------
    def _check_input(self, x: torch.Tensor, multi: bool) -> None:
        check_bn_input(
            self, x, multi=multi, sample_ndims=self._sample_ndims, num_features=self.num_features,
            T=self.T if multi else None,
        )

    def _check_first_step(self, x_step: torch.Tensor) -> None:
        """Step 0 alone (the first prefix, the fewest values) must give more than one value
        per channel; not an empty batch either, whose statistics would put NaN into the
        running statistics."""
        check_batch_values(self, x_step, batch_stats=uses_batch_stats(self), over="at t=0", empty_ok=False)

    # -- forward -------------------------------------------------------------------
    def _tab(self, x_seq: torch.Tensor, t0: int, prefix):
        window = slice(t0, t0 + x_seq.shape[0])
        sync = stats_sync(self, x_seq, channel_dim=2, batch_stats=uses_batch_stats(self))
        stats = resolve_running_stats(self, window=window)
        result = self.ops.tab(
            x_seq,
            None if self.weight is None else self.weight[window],
            None if self.bias is None else self.bias[window],
            stats.mean,
            stats.var,
            self.p[window],
            training=self.training,
            momentum=stats.factors,
            eps=self.eps,
            prefix=prefix,
            sync=sync,
        )
        stats.commit()  # counted only once the op has succeeded
        return result

    def statistics_plan(self, x_seq: torch.Tensor) -> NormPlan:
        """Multi-step: step t normalised with the statistics of steps 0..t, scaled by p_t²
        (pipeline rule ``tab``). Every input check first; ``commit`` counts every step once the
        op has run."""
        self._check_input(x_seq, multi=True)
        self._check_first_step(x_seq[0])
        batch_stats = uses_batch_stats(self)
        sync = stats_sync(self, x_seq, channel_dim=2, batch_stats=batch_stats)
        stats = resolve_running_stats(self, window=slice(0, x_seq.shape[0]))
        return NormPlan("tab", self.weight, self.bias, self.p, stats.mean, stats.var, stats.factors, self.eps,
                        batch_stats, stats.commit, sync)

    def multi_step_forward(self, x_seq: torch.Tensor) -> torch.Tensor:
        self._check_input(x_seq, multi=True)
        self._check_first_step(x_seq[0])
        y_seq, _ = self._tab(x_seq, 0, None)
        return y_seq

    def single_step_forward(self, x: torch.Tensor) -> torch.Tensor:
        check_stateful_recompute(self)  # a plain checkpoint would restart from the advanced t
        self._check_input(x, multi=False)
        t = self.t + 1
        if t >= self.T:
            raise ValueError(
                f"{type(self).__name__} has T={self.T} timesteps (its temporal length) and has already processed all of them "
                f"(t={self.t}); call reset() (snnorm.functional.reset_net) before the next sequence"
            )
        if t == 0:
            self._check_first_step(x)
        y, state = self._tab(x.unsqueeze(0), t, (self.stat_count, self.stat_mean, self.stat_m2))
        self.stat_count, self.stat_mean, self.stat_m2 = state
        self.t = t
        return y[0]

    # -- state_dict in the official layout ------------------------------------------
    def _official_entries(self):
        """(key, tensor) pairs of the official state_dict layout (views of this module's tensors)."""
        for t in range(self.T):
            if self.affine:
                yield f"bn_list.{t}.weight", self.weight, t
                yield f"bn_list.{t}.bias", self.bias, t
            if self.track_running_stats:
                yield f"bn_list.{t}.running_mean", self.running_mean, t
                yield f"bn_list.{t}.running_var", self.running_var, t
                yield f"bn_list.{t}.num_batches_tracked", self.num_batches_tracked, t
        yield "p", self.p, None

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        for key, tensor, t in self._official_entries():
            value = tensor if keep_vars else tensor.detach()
            # p in the official shape [T, 1, 1, 1, 1], so the official TAB_Layer loads it too
            destination[prefix + key] = value.view(-1, 1, 1, 1, 1) if t is None else value[t]

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        expected = set()
        for key, tensor, t in self._official_entries():
            expected.add(prefix + key)
            if prefix + key not in state_dict:
                missing_keys.append(prefix + key)
                continue
            value = state_dict[prefix + key]
            target = tensor if t is None else tensor[t]
            if not isinstance(value, torch.Tensor):
                error_msgs.append(f"{prefix + key}: expected a tensor, got {type(value).__name__}")
                continue
            if t is None and value.dim() >= 1 and value.shape[0] == self.T and value.numel() == self.T:
                value = value.reshape(self.T)  # the official p is [T, 1, 1, 1, 1]
            if value.shape != target.shape:
                error_msgs.append(
                    f"size mismatch for {prefix + key}: copying a param with shape {tuple(value.shape)} from "
                    f"checkpoint, the shape in current model is {tuple(target.shape)}"
                )
                continue
            with torch.no_grad():
                target.copy_(value)
        if strict:
            for key in state_dict:
                if key.startswith(prefix) and key not in expected:  # no submodules: every key is ours
                    unexpected_keys.append(key)

    def extra_repr(self) -> str:
        return (
            f"T={self.T}, {self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}, "
            f"track_running_stats={self.track_running_stats}, step_mode={self.step_mode}, backend={self.backend}"
        )


class TemporalAccumulatedBatchNorm1d(_TemporalAccumulatedBatchNormBase):
    """TAB on ``[T, N, C]`` or ``[T, N, C, L]`` ('m'), ``[N, C(, L)]`` per call ('s'); see
    :class:`_TemporalAccumulatedBatchNormBase` (Jiang et al., ICLR 2024)."""

    _sample_ndims = (2, 3)


class TemporalAccumulatedBatchNorm2d(_TemporalAccumulatedBatchNormBase):
    """TAB on ``[T, N, C, H, W]`` ('m'), ``[N, C, H, W]`` per call ('s') (Jiang et al., ICLR 2024):
    y_t = p_t²·(γ_t (x_t − μ_{0..t})/√(σ²_{0..t} + ε) + β_t)."""

    _sample_ndims = (4,)


class TemporalAccumulatedBatchNorm3d(_TemporalAccumulatedBatchNormBase):
    """TAB on ``[T, N, C, D, H, W]`` ('m'), ``[N, C, D, H, W]`` per call ('s'); see
    :class:`_TemporalAccumulatedBatchNormBase` (Jiang et al., ICLR 2024)."""

    _sample_ndims = (5,)
