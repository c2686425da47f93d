"""Layers: step-mode wrappers, SNN normalization layers and containers.

A drop-in replacement for ``spikingjelly.activation_based.layer`` (2.0.0 constructor
arguments and defaults, ``state_dict`` interchangeable), plus snntorch's
``BatchNormTT1d/2d``. Porting means changing the import::

    from spikingjelly.activation_based import layer   ->   from snnorm import layer

Differences from the peers are fixes: inputs are checked (shape, step mode, channels,
T, dtype) with ValueError/TypeError that name what was expected and what came, a
rejected call changes no state, TEBN/BNTT refuse a sequence whose T differs from
theirs, BNTT refuses to run past its T steps, and BN-like layers update running
statistics once under activation checkpointing (:mod:`snnorm.memopt`).
"""

from .batch_norm import (
    BatchNorm1d,
    BatchNorm2d,
    BatchNorm3d,
    BatchNormThroughTime1d,
    BatchNormThroughTime2d,
    BatchNormThroughTime3d,
    BatchNormTT1d,
    BatchNormTT2d,
    TemporalEffectiveBatchNorm1d,
    TemporalEffectiveBatchNorm2d,
    TemporalEffectiveBatchNorm3d,
    ThresholdDependentBatchNorm1d,
    ThresholdDependentBatchNorm2d,
    ThresholdDependentBatchNorm3d,
)
from .containers import (
    AdaptiveAvgPool1d,
    AdaptiveAvgPool2d,
    AdaptiveAvgPool3d,
    AvgPool1d,
    AvgPool2d,
    AvgPool3d,
    Conv1d,
    Conv2d,
    Conv3d,
    Dropout,
    Dropout2d,
    Flatten,
    Linear,
    MaxPool1d,
    MaxPool2d,
    MaxPool3d,
    MultiStepContainer,
    SeqToANNContainer,
)
from .norms import GroupNorm, NeuNorm
from .weight_standardization import WSConv2d, WSLinear

__all__ = [
    "Conv1d",
    "Conv2d",
    "Conv3d",
    "Linear",
    "Flatten",
    "MaxPool1d",
    "MaxPool2d",
    "MaxPool3d",
    "AvgPool1d",
    "AvgPool2d",
    "AvgPool3d",
    "AdaptiveAvgPool1d",
    "AdaptiveAvgPool2d",
    "AdaptiveAvgPool3d",
    "Dropout",
    "Dropout2d",
    "SeqToANNContainer",
    "MultiStepContainer",
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "ThresholdDependentBatchNorm1d",
    "ThresholdDependentBatchNorm2d",
    "ThresholdDependentBatchNorm3d",
    "TemporalEffectiveBatchNorm1d",
    "TemporalEffectiveBatchNorm2d",
    "TemporalEffectiveBatchNorm3d",
    "BatchNormThroughTime1d",
    "BatchNormThroughTime2d",
    "BatchNormThroughTime3d",
    "BatchNormTT1d",
    "BatchNormTT2d",
    "GroupNorm",
    "NeuNorm",
    "WSConv2d",
    "WSLinear",
]
