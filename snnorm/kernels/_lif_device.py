"""Re-exports of the named modes the op layer reads (``snnorm.backends.triton_backend`` imports
this module as ``_dev``). Every device function and mode lives in :mod:`snnorm.kernels._device`."""

from ._device import (  # noqa: F401
    FIRE_FOLDED,
    FIRE_NORMALISED,
    FIRE_RAW,
    STATS_FOLD_BATCH,
    STATS_FOLD_RUNNING,
    STATS_TRAIN,
    SURROGATE_ATAN,
    SURROGATE_PIECEWISE_EXP,
    SURROGATE_PIECEWISE_QUADRATIC,
    SURROGATE_SIGMOID,
    SURROGATES,
    lif_kernel_args,
)

__all__ = [
    "FIRE_FOLDED", "FIRE_NORMALISED", "FIRE_RAW", "STATS_FOLD_BATCH", "STATS_FOLD_RUNNING", "STATS_TRAIN",
    "SURROGATE_ATAN", "SURROGATE_PIECEWISE_EXP", "SURROGATE_PIECEWISE_QUADRATIC", "SURROGATE_SIGMOID", "SURROGATES",
    "lif_kernel_args",
]
