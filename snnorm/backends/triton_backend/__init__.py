"""The Triton backend: the fused kernels of :mod:`snnorm.kernels` behind the op table.

Runs on CUDA tensors, or on CPU tensors under the Triton interpreter (``TRITON_INTERPRET=1``
set before triton is first imported). Each op has the signature and semantics of its twin
in :mod:`snnorm.backends.torch_backend`. The files mirror ``kernels/`` one for one: each
registers the custom ops (``snnorm::*``: schema, fake kernel, autograd) around its kernel
file's launchers and holds the op-table functions that adapt the arguments and call them:

=====================  =========================  ===================================================
file                   kernels                    op-table functions
=====================  =========================  ===================================================
``lif_ops.py``         ``kernels/lif.py``         ``lif``
``mpbn_lif_ops.py``    ``kernels/mpbn_lif_train`` ``mpbn_lif``, ``mpbn_lif_folded`` (eval and folded
                                                  without adaptation: the ``lif_ops.py`` op)
``bn_pipeline_ops.py`` ``kernels/bn_pipeline.py`` ``batch_norm_seq``, ``tebn``, ``bntt``, ``tab``
``norm_lif_ops.py``    ``kernels/norm_lif.py``    ``norm_lif`` (a norm and an IF/LIF neuron fused)
``row_norm_ops.py``    ``kernels/row_norm.py``,   ``row_norm`` (LayerNorm / RMSNorm over the last
                       ``kernels/row_norm_lif``   dimension), ``row_norm_lif`` (fused with IF/LIF)
=====================  =========================  ===================================================

``_availability.py`` says whether the backend runs here; ``_adaptors.py`` holds what the op
files share. What the kernels cannot run (a surrogate with no kernel, e.g. a user-defined
one or ``spiking=False``) runs on the torch backend's op, with a RuntimeWarning the first
time: the triton backend never falls back silently. No op has a double backward: a
gradient taken with ``create_graph=True`` raises NotImplementedError when differentiated.
"""

from __future__ import annotations

from ._availability import HAVE_TRITON, require_triton, triton_unavailable_reason

__all__ = ["HAVE_TRITON", "triton_unavailable_reason", "load_ops"]

if HAVE_TRITON:  # a machine without triton imports the package; load_ops says why it cannot run
    from ._adaptors import _WARNED  # noqa: F401  (the warned-once keys; tests reset them)
    from .bn_pipeline_ops import STATISTICS_OPS, batch_norm_seq, bntt, tab, tebn
    from .lif_ops import LIF_BWD, LIF_FWD, lif, lif_elementwise_bwd_op, lif_elementwise_op
    from .mpbn_lif_ops import (
        ADAPT_FWD, TRAIN_BWD, TRAIN_FWD, mpbn_lif, mpbn_lif_adapt_op, mpbn_lif_folded, mpbn_lif_train_bwd_op,
        mpbn_lif_train_op,
    )
    from .norm_lif_ops import norm_lif, norm_lif_kernel
    from .row_norm_ops import (
        ROW_NORM_BWD, ROW_NORM_FWD, ROW_NORM_LIF_BWD, ROW_NORM_LIF_FWD, row_norm, row_norm_backward_op, row_norm_lif,
        row_norm_lif_backward_op, row_norm_lif_op, row_norm_op,
    )

    __all__ += [
        # the op table
        "lif", "mpbn_lif", "mpbn_lif_folded", "batch_norm_seq", "tebn", "tab", "bntt", "norm_lif", "norm_lif_kernel",
        "row_norm", "row_norm_lif",
        # the custom ops and their signatures, for tests (opcheck) and tools
        "lif_elementwise_op", "lif_elementwise_bwd_op", "LIF_FWD", "LIF_BWD", "mpbn_lif_train_op",
        "mpbn_lif_train_bwd_op", "mpbn_lif_adapt_op", "TRAIN_FWD", "TRAIN_BWD", "ADAPT_FWD",
        "row_norm_op", "row_norm_backward_op", "row_norm_lif_op", "row_norm_lif_backward_op", "ROW_NORM_FWD",
        "ROW_NORM_BWD", "ROW_NORM_LIF_FWD", "ROW_NORM_LIF_BWD",
    ]


def load_ops():
    """The op table (:data:`snnorm.backends.OP_NAMES` and the fused ``norm_lif``, ``row_norm_lif``); raises
    BackendUnavailableError (with the reason) where the backend cannot run."""
    require_triton()
    return {
        "lif": lif, "mpbn_lif": mpbn_lif, "mpbn_lif_folded": mpbn_lif_folded,
        **STATISTICS_OPS,  # tebn, tab, batch_norm_seq, bntt
        # beyond the common slots: a norm and an IF/LIF neuron fused
        "norm_lif": norm_lif, "norm_lif_kernel": norm_lif_kernel,
        "row_norm": row_norm,  # LayerNorm / RMSNorm over the last dimension (an OP_NAMES slot)
        "row_norm_lif": row_norm_lif,  # ... fused with an IF/LIF neuron
    }
