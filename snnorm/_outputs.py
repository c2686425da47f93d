"""Structured module outputs: merge per-step or per-chunk results, map over tensor members.

A module may return a tensor, or a tuple / list / dict / namedtuple whose members are
tensors or other values (indices, ``None``, a config string). The helpers here treat
such an output as a tree (``torch.utils._pytree``): tensor leaves are combined (stacked
over timesteps, concatenated over chunks, reshaped), and non-tensor leaves must be the
same in every piece, because there is no way to combine them.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch.utils import _pytree as pytree


def same_value(a: Any, b: Any) -> bool:
    """``a == b`` for non-tensor leaves, also when ``==`` is elementwise (numpy arrays)."""
    if a is b:
        return True
    try:
        equal = a == b
        if isinstance(equal, bool):
            return equal
        if hasattr(equal, "all"):
            return bool(equal.all())
        return bool(equal)
    except Exception:  # incomparable values are different
        return False


def merge_outputs(pieces: Sequence[Any], combine: Callable[[list[torch.Tensor]], torch.Tensor], where: str) -> Any:
    """Merge outputs of the same structure: ``combine`` the tensor leaves position by position.

    Non-tensor leaves must be equal in every piece (they are returned once). A piece with a
    different structure, or a tensor where another piece has something else, raises
    ValueError naming ``where``.
    """
    flats, spec = [], None
    for k, piece in enumerate(pieces):
        flat, piece_spec = pytree.tree_flatten(piece)
        if spec is None:
            spec = piece_spec
        elif piece_spec != spec:
            raise ValueError(
                f"{where}: the output of piece {k} has structure {piece_spec}, but piece 0 returned {spec}"
            )
        flats.append(flat)
    merged = []
    for i, leaves in enumerate(zip(*flats)):
        first = leaves[0]
        if isinstance(first, torch.Tensor):
            if not all(isinstance(leaf, torch.Tensor) for leaf in leaves):
                raise ValueError(f"{where}: output member {i} is a tensor in some pieces and not in others")
            merged.append(combine(list(leaves)))
        else:
            if not all(same_value(leaf, first) for leaf in leaves[1:]):
                raise ValueError(
                    f"{where}: output member {i} is not a tensor and differs between pieces "
                    f"({first!r} vs {next(leaf for leaf in leaves if not same_value(leaf, first))!r}); "
                    "only tensors can be combined"
                )
            merged.append(first)
    return pytree.tree_unflatten(merged, spec)


def map_tensors(output: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """Apply ``fn`` to every tensor member of ``output``; other members pass unchanged."""
    return pytree.tree_map(lambda leaf: fn(leaf) if isinstance(leaf, torch.Tensor) else leaf, output)
