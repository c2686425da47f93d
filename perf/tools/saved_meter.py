"""Bytes autograd saves for backward, counted with ``saved_tensors_hooks``."""

from __future__ import annotations

from typing import Callable, Iterable

import torch


def saved_tensor_bytes(fn: Callable[[], object], exclude: Iterable[torch.Tensor] = ()) -> dict[str, float]:
    """Bytes autograd saves for backward while ``fn()`` runs (``saved_tensors_hooks``).

    ``total``: the sum over every saved tensor (a tensor saved twice counts twice);
    ``unique``: distinct storages; ``new``: distinct storages other than those of
    ``exclude`` (the inputs and parameters the caller keeps anyway) — what backward keeps
    alive beyond them. ``count``: number of saved tensors.
    """
    saved: list[torch.Tensor] = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    excluded = {t.untyped_storage().data_ptr() for t in exclude if isinstance(t, torch.Tensor)}
    total, storages = 0, {}
    for t in saved:
        if not isinstance(t, torch.Tensor):
            continue
        total += t.numel() * t.element_size()
        st = t.untyped_storage()
        storages[st.data_ptr()] = st.nbytes()
    unique = sum(storages.values())
    new = sum(n for p, n in storages.items() if p not in excluded)
    del out
    return {"total": float(total), "unique": float(unique), "new": float(new), "count": float(len(saved))}
