"""Curvature blocks as plain data (tensors, lists, strings) for the posterior's files, and back."""

from __future__ import annotations

import torch
from torch import Tensor

from .kron import DiagBlock, KronBlock
from .kron_groups import make_block

__all__ = ["block_state", "parse_block"]


def block_state(b: KronBlock | DiagBlock) -> dict:
    """A block as plain data. A diagonal block is ``{"diag": values shaped like the parameter,
    "param_names", "param_shapes"}``; a Kronecker block has ``G``, ``A``, ``eigenvalues`` and
    ``bias_joint`` instead of ``diag``."""
    names, shapes = list(b.param_names), [list(s) for s in b.param_shapes]
    if isinstance(b, DiagBlock):
        values = b.values.reshape(b.param_shapes[0]).clone()
        return {"diag": values, "param_names": names, "param_shapes": shapes}
    return {
        "G": b.G.clone(),
        "A": None if b.A is None else b.A.clone(),
        "eigenvalues": None if b.eigenvalues is None else b.eigenvalues.clone(),
        "param_names": names,
        "param_shapes": shapes,
        "bias_joint": b.bias_joint,
    }


def parse_block(b: dict) -> KronBlock | DiagBlock:
    """Inverse of :func:`block_state`, validated (ValueError for a malformed entry)."""
    names, shapes = list(b["param_names"]), [torch.Size(s) for s in b["param_shapes"]]
    if "diag" not in b:
        return make_block(b["G"], b["A"], names, shapes, bool(b["bias_joint"]), b["eigenvalues"])
    extra = sorted(set(b) - {"diag", "param_names", "param_shapes"})
    if extra:
        raise ValueError(f"diagonal block {names} has Kronecker entries {extra}")
    values = b["diag"]
    if not isinstance(values, Tensor) or len(shapes) != 1 or values.shape != shapes[0]:
        raise ValueError(f"diagonal block {names}: its values do not have the parameter's shape")
    return DiagBlock(values, names, shapes)
