"""Layers: step-mode wrappers, SNN normalization layers and containers.

A drop-in replacement for ``spikingjelly.activation_based.layer`` (2.0.0 constructor
arguments and defaults, ``state_dict`` interchangeable), plus snntorch's
``BatchNormTT1d/2d`` and the per-token norms of spiking transformers (``LayerNorm``,
``RMSNorm``: torch's, with step modes and a triton backend). Porting means changing the import::

    from spikingjelly.activation_based import layer   ->   from snnorm import layer

Differences from the peers are fixes: inputs are checked (shape, step mode, channels,
T, dtype) with ValueError/TypeError that name what was expected and what came, a
rejected call changes no state, TEBN/BNTT refuse a sequence whose T differs from
theirs, BNTT refuses to run past its T steps, and BN-like layers update running
statistics once under activation checkpointing (:mod:`snnorm.memopt`).
"""

from . import batch_norm, containers
from .batch_norm import *  # noqa: F401,F403  (names listed in batch_norm.__all__)
from .containers import *  # noqa: F401,F403  (names listed in containers.__all__)
from .norms import GroupNorm, NeuNorm
from .token_norms import LayerNorm, RMSNorm
from .weight_standardization import WSConv2d, WSLinear

__all__ = [
    *containers.__all__, *batch_norm.__all__, "GroupNorm", "NeuNorm", "LayerNorm", "RMSNorm", "WSConv2d", "WSLinear",
]
