"""The Triton backend: fused kernels from :mod:`snnorm.kernels` behind the op table.

Runs on CUDA tensors, or on CPU tensors under the Triton interpreter
(``TRITON_INTERPRET=1`` set before triton is first imported). Each op has the
signature and semantics of its twin in :mod:`snnorm.backends.torch_backend`.
"""

from __future__ import annotations

import os

from . import BackendUnavailableError


def triton_unavailable_reason() -> str | None:
    """Why the triton backend cannot run here, or None if it can."""
    try:
        import triton  # noqa: F401
    except ImportError as err:
        return f"triton is not installed ({err}); pip install 'snnorm[triton]'"
    import torch

    if torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
        return None
    return (
        "no CUDA device and the Triton interpreter is off: set TRITON_INTERPRET=1 "
        "before triton is first imported to run the kernels on CPU tensors"
    )


def load_ops():
    reason = triton_unavailable_reason()
    if reason is not None:
        raise BackendUnavailableError(f"triton backend unavailable: {reason}")
    from ..kernels.mpbn_lif import lif, mpbn_lif, mpbn_lif_folded
    from ..kernels.tebn import tebn
    from ..kernels.tab import tab

    return {"lif": lif, "mpbn_lif": mpbn_lif, "mpbn_lif_folded": mpbn_lif_folded, "tebn": tebn, "tab": tab}
