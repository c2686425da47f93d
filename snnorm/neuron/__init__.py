"""Spiking neurons: IF, LIF and the MPBN LIF neuron (spikingjelly ``activation_based.neuron`` API).

Every neuron keeps its membrane ``v`` as a memory (``reset_net`` restores it) and runs
its math through the op table of its backend (``snnorm.backends``); the ``torch``
backend is the reference, ``triton`` the fused kernels.

LIF (spikingjelly numerics), with v_r = v_reset, or 0 for soft reset::

    decay_input:      H[t] = V[t-1] + (X[t] − (V[t-1] − v_r)) / τ
    not decay_input:  H[t] = V[t-1] − (V[t-1] − v_r) / τ + X[t]
    S[t] = Θ(H[t] − V_th)                                  (Θ(0) = 1)
    V[t] = S[t]·v_reset + (1 − S[t])·H[t]   (hard)   or   H[t] − S[t]·V_th   (soft)

MPBN (Guo et al., "Membrane Potential Batch Normalization for Spiking Neural Networks",
ICCV 2023, arXiv 2308.08359) normalises H[t] with a per-channel BN before firing; see
:class:`MPBNLIFNode`.
"""

from .lif import BaseNode, IFNode, LIFNode
from .mpbn import (
    BatchStatsNorm,
    FoldedThresholdNorm,
    MembraneNorm,
    MPBNBaseNode,
    MPBNLIFNode,
    NoMembraneNorm,
)

__all__ = [
    "BaseNode", "IFNode", "LIFNode", "MPBNBaseNode", "MPBNLIFNode",
    "MembraneNorm", "NoMembraneNorm", "BatchStatsNorm", "FoldedThresholdNorm",
]
