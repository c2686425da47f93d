"""What the op layer (:mod:`snnorm.backends.triton_backend`) takes from the kernels besides the
launchers: the named modes a launcher is called with, the surrogate table, and the host helpers
for the ops' dtypes, device checks and schemas. Everything here is defined in the kernels'
private modules (:mod:`snnorm.kernels._device`, :mod:`snnorm.kernels._common`); this is the
one door to them from outside ``kernels/``."""

from ._common import acc_torch_dtype, check_device, device_vector, op_signature
from ._device import (
    FIRE_FOLDED,
    FIRE_NORMALISED,
    FIRE_RAW,
    STATS_FOLD_BATCH,
    STATS_FOLD_RUNNING,
    STATS_TRAIN,
    SURROGATES,
)

__all__ = [
    "FIRE_FOLDED", "FIRE_NORMALISED", "FIRE_RAW", "STATS_FOLD_BATCH", "STATS_FOLD_RUNNING", "STATS_TRAIN",
    "SURROGATES", "acc_torch_dtype", "check_device", "device_vector", "op_signature",
]
