r"""The MPBN neuron (Guo et al., "Membrane Potential Batch Normalization for Spiking
Neural Networks", ICCV 2023, arXiv 2308.08359): a LIF neuron whose membrane H[t] is
batch-normalised before it fires, Ĥ[t] = BN(H[t]), S[t] = Θ(Ĥ[t] − V_th), and the
strategies (:class:`MembraneNorm`) for what happens to H: nothing, the BN, or the BN
folded into a per-channel threshold θ′.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .. import surrogate as surrogate_mod
from .._bn_state import check_batch_values, resolve_running_stats, stats_sync, uses_batch_stats
from .._checks import (
    check_bool, check_device, check_dtype, check_eps, check_momentum, check_positive_int, check_tau,
    check_unit_interval,
)
from .._recompute import should_update_running_stats
from ..backends.torch_backend import folded_threshold
from ..params import CARRY_MODES, AdaptParameters, BNStatistics, MPBNParameters
from .lif import BaseNode

__all__ = [
    "MPBNBaseNode", "MPBNLIFNode", "MembraneNorm", "NoMembraneNorm", "BatchStatsNorm", "FoldedThresholdNorm",
]


# --------------------------------------------------------------------------------------
# membrane-norm strategies of an MPBN neuron
# --------------------------------------------------------------------------------------


class MembraneNorm:
    """What an MPBN neuron does to its membrane before firing: a strategy the neuron holds
    (``node.membrane_norm``) and :meth:`MPBNBaseNode.re_parameterize_v_threshold` swaps.

    Strategies keep no tensors: the parameters and buffers they use live on the neuron, so
    ``state_dict`` keys stay the neuron's own (``vbn.*``, ``a``, and after folding ``mu``,
    ``sigma2``, ``gamma``, ``beta``, ``normalized_v_threshold``, ``folded_v_threshold``,
    ``adapt_momentum``), exactly as spikingjelly names them.
    """

    #: "none", "batch" or "folded"
    name = ""

    def reference(self, node: MPBNBaseNode) -> torch.Tensor | None:
        """The tensor an input must match in device and dtype (None: nothing to match)."""
        return node.a if node.learnable_vth else None

    def check(self, node: MPBNBaseNode) -> None:
        """Checks of plain attributes a user may have reassigned since construction."""

    def threshold(self, node: MPBNBaseNode):
        """V_th in the normalised domain: exp(a) (learnable) or the float ``v_threshold``."""
        return torch.exp(node.a) if node.learnable_vth else node.v_threshold

    def run(self, node: MPBNBaseNode, x_seq: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError


class NoMembraneNorm(MembraneNorm):
    """``mpbn=False``: a plain LIF neuron, Ĥ = H."""

    name = "none"

    def run(self, node, x_seq, v):
        return node.ops.lif(x_seq, v, self.threshold(node), node.lif_parameters)


class BatchStatsNorm(MembraneNorm):
    """The membrane BN ``node.vbn``: batch statistics in training (running statistics updated
    every step), running statistics in eval."""

    name = "batch"

    def reference(self, node):
        bn = node.vbn
        return bn.weight if bn.weight is not None else bn.running_mean

    def check(self, node):
        batch_stats = node.training or node.vbn.running_mean is None
        check_eps(node, node.vbn.eps, "vbn.eps", batch_stats=batch_stats)
        check_momentum(node, node.vbn.momentum, "vbn.momentum")

    def run(self, node, x_seq, v):
        bn = node.vbn
        # one statistic per timestep, over N·spatial of H[t] (the shape of x[t]); checked
        # before the batches are counted, so a rejected call moves nothing
        batch_stats = uses_batch_stats(bn)
        check_batch_values(node, x_seq[0], batch_stats=batch_stats, over="at each timestep")
        sync = stats_sync(node, x_seq, channel_dim=2, batch_stats=batch_stats)
        stats = resolve_running_stats(node, bn, steps=x_seq.shape[0])
        result = node.ops.mpbn_lif(
            x_seq, v, bn.weight, bn.bias, stats.mean, stats.var, self.threshold(node),
            node.lif_parameters, MPBNParameters(bn.eps, node.carry),
            BNStatistics(node.training, bn.momentum, stats.batches_before), sync=sync,
        )
        stats.commit()  # the steps are counted only once the op has succeeded
        return result


class FoldedThresholdNorm(MembraneNorm):
    """The BN folded into a per-channel threshold θ′ on the raw membrane (the neuron's buffers
    ``mu``, ``sigma2``, ``normalized_v_threshold``, ``folded_v_threshold``, ``adapt_momentum``
    and parameters ``gamma``, ``beta``); in training mode the statistics adapt at test time,
    from each batch or (``running_stats``) as a decaying running average."""

    name = "folded"

    def __init__(self, eps: float, running_stats: bool):
        self.eps = eps
        self.running_stats = bool(running_stats)

    def reference(self, node):
        return node.mu

    def threshold(self, node):
        return node.normalized_v_threshold

    @staticmethod
    @torch.no_grad()
    def install(node: MPBNBaseNode, running_stats: bool) -> "FoldedThresholdNorm":
        """Move ``node.vbn``'s statistics and affine (and V_th) into the folded state; return the strategy."""
        bn = node.vbn
        like = bn.running_mean
        gamma = bn.weight.detach().clone() if bn.affine else torch.ones_like(like)
        beta = bn.bias.detach().clone() if bn.affine else torch.zeros_like(like)
        zero = (gamma == 0).nonzero().flatten().tolist()
        if zero:
            raise ValueError(
                f"{type(node).__name__}: gamma is 0 in channels {zero}; their BN output is constant and no threshold "
                "on the raw membrane reproduces it"
            )
        threshold = node.threshold()
        normalized_vth = (threshold.detach().clone() if isinstance(threshold, torch.Tensor)
                          else torch.full((node.num_channels,), threshold, device=like.device, dtype=like.dtype))
        node.register_buffer("mu", bn.running_mean.detach().clone())
        node.register_buffer("sigma2", bn.running_var.detach().clone())
        node.gamma = nn.Parameter(gamma)
        node.beta = nn.Parameter(beta)
        node.register_buffer("normalized_v_threshold", normalized_vth)
        node.register_buffer("folded_v_threshold", torch.empty_like(normalized_vth))
        node.register_buffer("adapt_momentum", torch.tensor(node.bn_momentum, dtype=like.dtype, device=like.device))
        if node.learnable_vth:  # exp(a) now lives in normalized_v_threshold
            del node.a
        node.vbn = nn.Identity()
        return FoldedThresholdNorm(bn.eps, running_stats)

    def run(self, node, x_seq, v):
        mode = ("running" if self.running_stats else "batch") if node.training else "none"
        # read the momentum buffer only where it is used (no .item() in an eval graph)
        momentum = node.bn_momentum if mode == "running" else 0.0
        adapt = AdaptParameters(mode, momentum, node.bn_decay_momentum, node.bn_min_momentum)
        spike_seq, v, mu, sigma2, momentum = node.ops.mpbn_lif_folded(
            x_seq, v, node.mu, node.sigma2, node.gamma, node.beta, self.threshold(node),
            node.lif_parameters, MPBNParameters(self.eps, node.carry), adapt,
        )
        # a checkpoint recompute adapts exactly as the first forward did (memopt restores
        # mu, sigma2 and adapt_momentum for it) and commits into throw-away buffers
        if mode != "none" and should_update_running_stats(node):
            node.mu, node.sigma2 = mu.detach(), sigma2.detach()  # statistics, never part of a graph
            if mode == "running":
                node.bn_momentum = momentum
            node._refresh_folded_threshold()
        return spike_seq, v


class MPBNBaseNode(BaseNode):
    """A spiking neuron with membrane-potential batch normalisation (MPBN); usable by itself.

    Per step (training uses that step's batch statistics and updates the running
    statistics every step; eval uses the running statistics)::

        H[t] = charge(V[t-1], X[t]);   Ĥ[t] = BN(H[t]);   S[t] = Θ(Ĥ[t] − V_th)
        V[t] = reset(Ĥ[t], S[t])   carry="normalized" (spikingjelly, default)
        V[t] = reset(H[t], S[t])   carry="raw"        (the MPBN paper's code: pre-BN state)

    The charge is LIF's with ``tau`` and ``decay_input`` (keyword arguments; defaults as
    :class:`MPBNLIFNode`, τ = ∞ gives an IF charge H = V + X).

    What happens to H before firing is a strategy held in ``membrane_norm``
    (:class:`MembraneNorm`): :class:`NoMembraneNorm` (``mpbn=False``, plain LIF),
    :class:`BatchStatsNorm` (the BN ``vbn``) or, after :meth:`re_parameterize_v_threshold`,
    :class:`FoldedThresholdNorm`. ``mpbn``, ``fold_bn``, ``running_stats`` and ``eps`` read
    it (spikingjelly's attribute names).

    ``learnable_vth`` fires on V_th = exp(a) per channel (a starts at 0) and, unlike
    spikingjelly 2.0.0, a soft reset subtracts that same threshold.

    :meth:`re_parameterize_v_threshold` folds the BN into a per-channel threshold θ′ on
    the raw membrane (Zhao et al., "Threshold Modulation for Online Test-Time Adaptation
    of Spiking Neural Networks", arXiv 2505.05375)::

        θ′ = μ + (V_th − β)·√(σ² + ε)/γ,    S[t] = Θ(sign(γ)·(H[t] − θ′))

    **Exactness.** In real arithmetic the fold changes nothing: Ĥ ≥ V_th ⇔
    sign(γ)·(H − θ′) ≥ 0, so an eval network keeps every spike and state. In floating
    point the two sides are rounded differently, so a spike can flip only where the
    membrane H lies within rounding of θ′: a few ulps of the largest of |μ|, |θ′| and
    |V_th − β|·√(σ² + ε)/|γ| (float32: ~1e-7 relative). Measured: for float32 membranes
    spread ~1e-3 relative around θ′, 1 of 4096 spike decisions flipped; within ±32 ulps
    of θ′, about 1 in 50. A flip then changes that neuron's later state.
    ``tests/test_fold_exactness.py`` bounds the flip rate and checks that every flip is
    within a few ulps of θ′.

    **State after the fold** (all in ``state_dict``): ``mu``, ``sigma2`` (buffers),
    ``gamma``, ``beta`` (parameters), ``normalized_v_threshold`` (V_th per channel, the
    threshold Ĥ is compared with, also the one a soft reset subtracts),
    ``folded_v_threshold`` (θ′ per channel; derived from the others, refreshed by the
    fold, by every adaptation step and by ``state_dict()``; a loaded θ′ that disagrees
    with the loaded μ, σ², γ, β, V_th is an error) and ``adapt_momentum`` (see below).
    Load a folded ``state_dict`` into a folded neuron.

    **Test-time adaptation.** After folding, a module in training mode adapts μ, σ² at
    test time from each step's batch (``running_stats=False``) or with an exponential
    average whose momentum starts at ``bn_momentum`` and decays by ``bn_decay_momentum``
    per step down to ``bn_min_momentum`` (``running_stats=True``). The current momentum
    is the buffer ``adapt_momentum`` (read and set as ``bn_momentum``, as in
    spikingjelly): it is saved with the model and restored by a checkpoint recompute
    (:mod:`snnorm.memopt`), and, like μ and σ², ``reset_net`` leaves it alone — it
    belongs to the test stream, not to one sequence. Set ``node.bn_momentum = m`` to
    restart the decay.

    Inputs per step: ``[N, C]``, ``[N, C, L]`` or ``[N, C, H, W]``; multi-step adds T
    first. The input dtype follows the dtype policy of :mod:`snnorm._checks`.
    """

    supported_backends = ("torch", "triton")

    def __init__(
        self,
        v_threshold: float = 1.0,
        v_reset: float | None = 0.0,
        surrogate_function: surrogate_mod.SurrogateFunctionBase | None = None,
        detach_reset: bool = False,
        step_mode: str = "s",
        store_v_seq: bool = False,
        mpbn: bool = True,
        out_features: int | None = None,
        out_channels: int | None = None,
        learnable_vth: bool = False,
        bn_momentum: float = 0.1,
        bn_decay_momentum: float = 0.94,
        bn_min_momentum: float = 0.005,
        backend: str = "torch",
        carry: str = "normalized",
        *,
        tau: float = 2.0,
        decay_input: bool = False,
    ):
        owner = type(self).__name__
        if (out_features is None) == (out_channels is None):
            raise ValueError(
                f"{owner}: give exactly one of out_features or out_channels, got "
                f"out_features={out_features!r}, out_channels={out_channels!r}"
            )
        name = "out_channels" if out_channels is not None else "out_features"
        features = check_positive_int(owner, name, out_channels if out_channels is not None else out_features)
        if carry not in CARRY_MODES:
            raise ValueError(f"{owner}: carry must be one of {CARRY_MODES}, got {carry!r}")
        tau = check_tau(owner, tau)
        decay_input = check_bool(owner, "decay_input", decay_input)
        mpbn = check_bool(owner, "mpbn", mpbn)
        learnable_vth = check_bool(owner, "learnable_vth", learnable_vth)
        bn_momentum = check_unit_interval(owner, "bn_momentum", bn_momentum)
        bn_decay_momentum = check_unit_interval(owner, "bn_decay_momentum", bn_decay_momentum)
        bn_min_momentum = check_unit_interval(owner, "bn_min_momentum", bn_min_momentum)
        super().__init__(v_threshold, v_reset, surrogate_function, detach_reset, step_mode, backend, store_v_seq)
        self.tau = tau
        self.decay_input = decay_input
        self.out_features = out_features
        self.out_channels = out_channels
        self.num_channels = features
        self.carry = carry
        if mpbn:
            self.vbn = nn.BatchNorm2d(features) if out_channels is not None else nn.BatchNorm1d(features)
            self.membrane_norm: MembraneNorm = BatchStatsNorm()
        else:
            self.vbn = nn.Identity()
            self.membrane_norm = NoMembraneNorm()
        if learnable_vth:
            self.a = nn.Parameter(torch.zeros(features))
        self.bn_momentum = bn_momentum
        self.bn_decay_momentum = bn_decay_momentum
        self.bn_min_momentum = bn_min_momentum

    # -- what the strategy says, under spikingjelly's names -------------------------------
    @property
    def mpbn(self) -> bool:
        """Whether the membrane is batch-normalised (folded or not)."""
        return self.membrane_norm.name != "none"

    @property
    def fold_bn(self) -> bool:
        """Whether the BN is folded into the threshold (:meth:`re_parameterize_v_threshold`)."""
        return self.membrane_norm.name == "folded"

    @property
    def learnable_vth(self) -> bool:
        """Whether V_th = exp(a) is learned (until a fold moves it into ``normalized_v_threshold``)."""
        return "a" in self._parameters

    @property
    def eps(self) -> float | None:
        """The folded BN's ε (None before folding: the BN's own is ``vbn.eps``)."""
        return self.membrane_norm.eps if self.fold_bn else None

    @eps.setter
    def eps(self, value: float) -> None:
        if not self.fold_bn:
            raise RuntimeError(
                f"{type(self).__name__}: eps belongs to the folded threshold; before folding set vbn.eps"
            )
        self.membrane_norm.eps = check_eps(self, value)
        self._refresh_folded_threshold()  # θ′ depends on ε

    @property
    def running_stats(self) -> bool:
        """After folding: adapt with a decaying running average (True) or per-batch statistics (False)."""
        return self.fold_bn and self.membrane_norm.running_stats

    @running_stats.setter
    def running_stats(self, value: bool) -> None:
        if not self.fold_bn:
            raise RuntimeError(
                f"{type(self).__name__}: running_stats selects the test-time adaptation of a folded neuron; "
                "fold first with re_parameterize_v_threshold(running_stats=...)"
            )
        self.membrane_norm.running_stats = check_bool(self, "running_stats", value)

    # -- the test-time momentum: a buffer once folded --------------------------------
    @property
    def bn_momentum(self) -> float:
        """The test-time adaptation momentum: the buffer ``adapt_momentum`` once folded."""
        buffer = self._buffers.get("adapt_momentum")
        return self.__dict__["_bn_momentum"] if buffer is None else float(buffer)

    @bn_momentum.setter
    def bn_momentum(self, value: float) -> None:
        value = check_unit_interval(self, "bn_momentum", value)
        buffer = self._buffers.get("adapt_momentum")
        if buffer is None:
            self.__dict__["_bn_momentum"] = value
        else:
            with torch.no_grad():
                buffer.fill_(value)

    # -- checks ---------------------------------------------------------------------
    def _check_input(self, x: torch.Tensor, multi_step: bool) -> None:
        super()._check_input(x, multi_step)
        step_ndim = x.dim() - (1 if multi_step else 0)
        layout = "[T, N, C, ...]" if multi_step else "[N, C, ...]"
        if step_ndim not in (2, 3, 4):
            raise ValueError(
                f"{type(self).__name__} (step_mode={self.step_mode!r}): expected {layout} with per-step "
                f"shape [N, C], [N, C, L] or [N, C, H, W], got shape {tuple(x.shape)}"
            )
        channels = x.shape[2 if multi_step else 1]
        if channels != self.num_channels:
            raise ValueError(
                f"{type(self).__name__}: expected {self.num_channels} channels in dim "
                f"{2 if multi_step else 1}, got {channels} (input shape {tuple(x.shape)})"
            )
        reference = self.membrane_norm.reference(self)
        check_device(self, x, reference)
        check_dtype(self, x, reference)
        self.membrane_norm.check(self)

    # -- the threshold ------------------------------------------------------------------
    def threshold(self):
        """V_th in the normalised domain: exp(a) (learnable), the folded [C] buffer, or a float."""
        return self.membrane_norm.threshold(self)

    @torch.no_grad()
    def _folded_threshold_now(self) -> torch.Tensor:
        """θ′ per channel from the current μ, σ², γ, β and V_th (the torch backend's formula)."""
        std = torch.sqrt(self.sigma2 + self.eps)
        return folded_threshold(self.normalized_v_threshold, self.mu, std, self.gamma, self.beta)

    def _refresh_folded_threshold(self) -> None:
        with torch.no_grad():
            self.folded_v_threshold.copy_(self._folded_threshold_now())

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        if self.fold_bn:  # γ, β may have been trained since the last forward
            self._refresh_folded_threshold()
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        errors_before = len(error_msgs)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        if not self.fold_bn or len(error_msgs) > errors_before or prefix + "folded_v_threshold" not in state_dict:
            return
        loaded, derived = self.folded_v_threshold, self._folded_threshold_now()
        scale = torch.maximum(loaded.abs(), self.mu.abs()).max().clamp_min(1.0)
        tolerance = 8 * torch.finfo(loaded.dtype).eps * scale
        if not bool(((loaded - derived).abs() <= tolerance).all()):
            error_msgs.append(
                f"{type(self).__name__}: {prefix}folded_v_threshold (θ′) disagrees with the θ′ derived from "
                f"the loaded mu, sigma2, gamma, beta and normalized_v_threshold (largest difference "
                f"{(loaded - derived).abs().max().item():.3g}). θ′ is derived state: change those instead."
            )

    # -- forward ----------------------------------------------------------------------
    def _run(self, x_seq, v):
        return self.membrane_norm.run(self, x_seq, v)

    # -- folding ----------------------------------------------------------------------
    @torch.no_grad()
    def re_parameterize_v_threshold(self, normalize_residual: bool | None = None, running_stats: bool = False) -> None:
        """Fold the membrane BN into a per-channel threshold θ′ (see the class doc).

        Exact in real arithmetic; in floating point a spike can flip only where the
        membrane is within rounding of θ′ (class doc, "Exactness").
        ``normalize_residual`` keeps the carried membrane in the normalised domain;
        it must be True for carry="normalized" and False for carry="raw" (the only
        exact choices; None picks it). ``running_stats`` selects the test-time
        statistics update used in training mode after the fold (see the class doc).

        Raises ValueError where an exact fold is impossible (mpbn=False, no running
        statistics, a channel with γ = 0, a normalize_residual that would change the
        network) and RuntimeError when the neuron is already folded.
        """
        owner = type(self).__name__
        if self.fold_bn:
            raise RuntimeError(f"{owner}: the threshold is already re-parameterized; folding twice is an error")
        if not self.mpbn:
            raise ValueError(f"{owner}: mpbn=False, there is no membrane BN to fold")
        exact = self.carry == "normalized"
        if normalize_residual is None:
            normalize_residual = exact
        if normalize_residual != exact:
            raise ValueError(
                f"{owner}: normalize_residual={normalize_residual} with carry={self.carry!r} would change "
                f"what the network computes: the carried membrane lives in the "
                f"{'normalised' if exact else 'raw (pre-BN)'} domain, so use normalize_residual={exact}"
            )
        if not self.vbn.track_running_stats:
            raise ValueError(f"{owner}: the membrane BN has no running statistics (track_running_stats=False) to fold")
        self.membrane_norm = FoldedThresholdNorm.install(self, running_stats)
        self._refresh_folded_threshold()

    def extra_repr(self) -> str:
        return (
            super().extra_repr() + f", carry={self.carry}, mpbn={self.mpbn}, learnable_vth={self.learnable_vth}, "
            f"fold_bn={self.fold_bn}, tau={self.tau}, decay_input={self.decay_input}"
        )


class MPBNLIFNode(MPBNBaseNode):
    """LIF neuron with membrane-potential BN (MPBN, arXiv 2308.08359).

    Constructor arguments and defaults as spikingjelly 2.0.0 (``decay_input=False``,
    ``v_reset=0.0``), plus ``backend`` and ``carry`` ("normalized" as spikingjelly, or
    "raw" for the MPBN paper's pre-BN state). See :class:`MPBNBaseNode` for the math.
    """

    def __init__(self, tau: float = 2.0, decay_input: bool = False, *args, **kwargs):
        # spikingjelly's positional order: tau, decay_input, then MPBNBaseNode's arguments in its order
        super().__init__(*args, tau=tau, decay_input=decay_input, **kwargs)
