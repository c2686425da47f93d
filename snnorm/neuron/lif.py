r"""IF and LIF neurons (spikingjelly ``activation_based.neuron`` API), with v_r = v_reset,
or 0 for soft reset::

    decay_input:      H[t] = V[t-1] + (X[t] − (V[t-1] − v_r)) / τ
    not decay_input:  H[t] = V[t-1] − (V[t-1] − v_r) / τ + X[t]
    S[t] = Θ(H[t] − V_th)                                  (Θ(0) = 1)
    V[t] = S[t]·v_reset + (1 − S[t])·H[t]   (hard)   or   H[t] − S[t]·V_th   (soft)
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn as nn

from .. import surrogate as surrogate_mod
from .._checks import check_bool, check_finite, check_sequence, check_tau, check_tensor, check_threshold
from ..base import MemoryModule
from ..params import LIFParameters

__all__ = ["BaseNode", "IFNode", "LIFNode"]


@contextlib.contextmanager
def _buffers_restored_on_error(module: nn.Module):
    """On an exception, put every buffer of ``module`` (and its submodules) back as it was.

    For a forward that runs its op once per step (``store_v_seq``): a step's op updates
    running statistics and counters (the MPBN neuron) only once it succeeded, but the steps
    before a failing one have already done so. The membrane needs nothing: it is assigned
    after the loop.
    """
    saved = [
        (m, name, buf, buf.detach().clone())
        for m in module.modules()
        for name, buf in m._buffers.items()
        if buf is not None
    ]
    try:
        yield
    except BaseException:
        with torch.no_grad():
            for m, name, buf, value in saved:
                m._buffers[name] = buf
                buf.copy_(value)
        raise


class BaseNode(MemoryModule):
    """Base class of spiking neurons with membrane ``v`` (registered memory).

    Subclasses implement :meth:`_run`, which maps ``x_seq [T, N, ...]`` and the membrane
    ``v [N, ...]`` to ``(spike_seq, v)`` through the backend's ops, passing the neuron's
    constants as one :class:`~snnorm.params.LIFParameters` (:attr:`lif_parameters`). The
    charge is LIF's with ``tau`` and ``decay_input``; here τ = ∞, an IF charge
    H = V + X, which LIF-type subclasses override. Single-step mode
    runs a sequence of one step. The membrane starts at ``v_reset`` (0 for soft reset)
    and must keep its shape until :meth:`reset`: a batch-size change mid-sequence is
    an error, not a silent re-initialisation.
    """

    #: the charge's constants (class defaults: IF, H = V + X; LIF-type neurons set their own)
    tau: float = math.inf
    decay_input: bool = False

    def __init__(
        self,
        v_threshold: float = 1.0,
        v_reset: float | None = 0.0,
        surrogate_function: surrogate_mod.SurrogateFunctionBase | None = None,
        detach_reset: bool = False,
        step_mode: str = "s",
        backend: str = "torch",
        store_v_seq: bool = False,
    ):
        super().__init__()
        owner = type(self).__name__
        self.v_threshold = v_threshold  # checked by the setter: finite and > 0
        self.v_reset = None if v_reset is None else check_finite(owner, "v_reset", v_reset)
        self.detach_reset = check_bool(owner, "detach_reset", detach_reset)
        self.store_v_seq = check_bool(owner, "store_v_seq", store_v_seq)
        if surrogate_function is None:
            surrogate_function = surrogate_mod.Sigmoid()
        if not callable(surrogate_function):
            raise TypeError(f"{owner}: surrogate_function must be callable, got {surrogate_function!r}")
        self.surrogate_function = surrogate_function
        self.register_memory("v", 0.0 if self.v_reset is None else self.v_reset)
        self.v_seq = None
        self.step_mode = step_mode
        self.backend = backend

    # -- the threshold ------------------------------------------------------------
    @property
    def v_threshold(self) -> float:
        """V_th of S[t] = Θ(H[t] − V_th): a finite float > 0 (ValueError otherwise, in the
        constructor and on assignment; with V_th ≤ 0 the neuron fires on every step from rest)."""
        return self.__dict__["_v_threshold"]

    @v_threshold.setter
    def v_threshold(self, value: float) -> None:
        self.__dict__["_v_threshold"] = check_threshold(self, value)

    # -- input checks and state --------------------------------------------------
    def _check_input(self, x: torch.Tensor, multi_step: bool) -> None:
        check_tensor(self, x)
        if multi_step and x.dim() < 2:
            raise ValueError(
                f"{type(self).__name__} (step_mode='m'): expected input [T, N, ...], got shape {tuple(x.shape)}"
            )
        if multi_step:
            check_sequence(self, x)

    def _initial_membrane(self, x_step: torch.Tensor) -> torch.Tensor:
        v = self.v
        if isinstance(v, torch.Tensor):
            if v.shape != x_step.shape:
                raise ValueError(
                    f"{type(self).__name__}: membrane state has shape {tuple(v.shape)} but this "
                    f"step's input has shape {tuple(x_step.shape)}; the batch (or feature) shape "
                    "changed in the middle of a sequence. Call snnorm.functional.reset_net(net) "
                    "between sequences."
                )
            return v.to(device=x_step.device, dtype=x_step.dtype)
        return torch.full_like(x_step, float(v))

    def reset(self) -> None:
        super().reset()
        self.v_seq = None

    @property
    def lif_parameters(self) -> LIFParameters:
        """The neuron's charge, reset and surrogate as the one bundle the ops take."""
        return LIFParameters(self.surrogate_function, self.tau, self.decay_input, self.v_reset, self.detach_reset)

    # -- forward -------------------------------------------------------------------
    def _run(self, x_seq: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def multi_step_forward(self, x_seq: torch.Tensor) -> torch.Tensor:
        self._check_input(x_seq, multi_step=True)
        v = self._initial_membrane(x_seq[0])
        if self.store_v_seq:  # one op call per step so every V[t] is kept
            spikes, v_seq = [], []
            with _buffers_restored_on_error(self):  # a step that fails undoes the steps before it
                for t in range(x_seq.shape[0]):
                    s, v = self._run(x_seq[t : t + 1], v)
                    spikes.append(s)
                    v_seq.append(v)
            self.v_seq = torch.stack(v_seq)
            spike_seq = torch.cat(spikes)
        else:
            spike_seq, v = self._run(x_seq, v)
        self.v = v
        return spike_seq

    def single_step_forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x, multi_step=False)
        spike_seq, v = self._run(x.unsqueeze(0), self._initial_membrane(x))
        self.v = v
        if self.store_v_seq:
            self.v_seq = v.unsqueeze(0) if self.v_seq is None else torch.cat([self.v_seq, v.unsqueeze(0)])
        return spike_seq[0]

    def extra_repr(self) -> str:
        return (
            f"v_threshold={self.v_threshold}, v_reset={self.v_reset}, detach_reset={self.detach_reset}, "
            f"step_mode={self.step_mode}, backend={self.backend}"
        )


class LIFNode(BaseNode):
    """Leaky integrate-and-fire neuron (charge, fire, reset as in the module docstring).

    ``tau`` > 1 (an int is accepted); ``decay_input`` True by default as spikingjelly.
    """

    supported_backends = ("torch", "triton")

    def __init__(
        self,
        tau: float = 2.0,
        decay_input: bool = True,
        v_threshold: float = 1.0,
        v_reset: float | None = 0.0,
        surrogate_function: surrogate_mod.SurrogateFunctionBase | None = None,
        detach_reset: bool = False,
        step_mode: str = "s",
        backend: str = "torch",
        store_v_seq: bool = False,
    ):
        tau = check_tau(type(self).__name__, tau)
        super().__init__(v_threshold, v_reset, surrogate_function, detach_reset, step_mode, backend, store_v_seq)
        self.tau = tau
        self.decay_input = check_bool(self, "decay_input", decay_input)

    def _run(self, x_seq, v):
        return self.ops.lif(x_seq, v, self.v_threshold, self.lif_parameters)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", tau={self.tau}, decay_input={self.decay_input}"


class IFNode(BaseNode):
    """Integrate-and-fire neuron: H[t] = V[t-1] + X[t], then fire and reset as LIF.

    Runs on the LIF op with the base class's τ = ∞ (no decay input), which is exactly V + X.
    """

    supported_backends = ("torch", "triton")

    def _run(self, x_seq, v):
        return self.ops.lif(x_seq, v, self.v_threshold, self.lif_parameters)
