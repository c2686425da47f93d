"""snnorm: normalization layers for spiking neural networks.

Drop-in replacements for spikingjelly's ``activation_based`` normalization layers
(multi-step BatchNorm, tdBN, TEBN, BNTT, NeuNorm, GroupNorm, weight-standardized
conv/linear) and the MPBN LIF neuron, plus the per-token LayerNorm and RMSNorm of spiking
transformers, with a reference ``torch`` backend and fused
Triton kernels behind ``snnorm.functional.set_backend(net, "triton")``.
"""

from . import backends, base, functional, memopt, neuron, surrogate  # noqa: F401
from . import layer  # noqa: F401
from .distributed import convert_sync_batchnorm  # noqa: F401
from .porting import convert_spikingjelly  # noqa: F401

__version__ = "0.1.0"
