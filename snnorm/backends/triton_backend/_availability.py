"""Whether the triton backend can run here: the one place that tries ``import triton``.

The registry (:mod:`snnorm.backends`) asks :func:`require_triton` through ``load_ops``; a
machine without triton still imports the package and gets the reason, never an ImportError.
"""

from __future__ import annotations

import os

from .. import BackendUnavailableError

try:
    import triton  # noqa: F401
except ImportError as err:  # pragma: no cover - exercised only without triton
    _IMPORT_ERROR: ImportError | None = err
else:
    _IMPORT_ERROR = None

#: True when triton imports (the kernel modules, and so the ops, can be loaded)
HAVE_TRITON = _IMPORT_ERROR is None


def triton_unavailable_reason() -> str | None:
    """Why the triton backend cannot run here, or None if it can."""
    if _IMPORT_ERROR is not None:
        return f"triton is not installed ({_IMPORT_ERROR}); pip install 'snnorm[triton]'"
    import torch

    if torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
        return None
    return (
        "no CUDA device and the Triton interpreter is off: set TRITON_INTERPRET=1 "
        "before triton is first imported to run the kernels on CPU tensors"
    )


def require_triton() -> None:
    """Raise :class:`BackendUnavailableError` (with the reason) when the backend cannot run here."""
    reason = triton_unavailable_reason()
    if reason is not None:
        raise BackendUnavailableError(f"triton backend unavailable: {reason}")
