"""What the op layer (:mod:`snnorm.backends.triton_backend`) takes from the kernels besides the
launchers: the named modes a launcher is called with, the surrogate table, and the host helpers
for the ops' dtypes, device checks and schemas. Everything here is defined in the kernels'
private modules (:mod:`snnorm.kernels._device`, :mod:`snnorm.kernels._common`); this is the
one door to them from outside ``kernels/``.

Debugging: :func:`poisoned_allocations` (a context manager) fills every buffer a launcher
allocates with NaN (integers: a sentinel) before the kernels run, so an element no kernel
writes shows up in the results; ``SNNORM_POISON=1`` in the environment when this module is
first imported opens it for the whole process (e.g. a test run:
``SNNORM_POISON=1 python -m pytest tests/test_triton_*.py``). Debug only: every allocation
costs one more fill.
"""

import os

from ._common import acc_torch_dtype, check_device, device_vector, op_signature, poisoned_allocations
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
    "SURROGATES", "acc_torch_dtype", "check_device", "device_vector", "op_signature", "poisoned_allocations",
]

#: the process-wide poison of ``SNNORM_POISON=1`` (held here: a collected context would close)
PROCESS_POISON = poisoned_allocations() if os.environ.get("SNNORM_POISON", "") == "1" else None
if PROCESS_POISON is not None:
    PROCESS_POISON.__enter__()
