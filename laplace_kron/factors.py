"""Kronecker factors and their eigendecompositions, dense or diagonal.

A factor is a symmetric PSD matrix ``[d, d]`` or, for a diagonal factor, the 1-d tensor ``[d]`` of
its diagonal: the input factor of an ``nn.Embedding`` (token counts, ``d`` the vocabulary size) is
diagonal and never formed as a ``[d, d]`` matrix. The eigendecomposition of a diagonal factor has
the diagonal as its eigenvalues and the identity as its eigenvectors, which is never materialised
(:attr:`Eigen.vectors` is ``None``): every helper below applies the identity by doing nothing.

The helpers act on the matrix view ``M [..., d_out, d_in]`` of a block's parameters: ``G`` and
its eigenvectors act on the rows (from the left), ``A`` and its eigenvectors on the columns.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "Eigen",
    "dense_factor",
    "eigvec_dense",
    "factor_trace",
    "is_diagonal",
    "left_mul",
    "right_mul",
    "rotate",
    "symeig",
    "unrotate",
]

# Relative size below which an eigenvalue is treated as round-off and clamped to zero.
_EIG_CLAMP = 1e-12


@dataclass
class Eigen:
    """Eigendecomposition ``M = vectors @ diag(values) @ vectors.T`` of a symmetric PSD factor;
    ``vectors`` is ``None`` for a diagonal factor (the identity, never formed)."""

    values: Tensor  # [d]
    vectors: Tensor | None  # [d, d], or None: the identity


def is_diagonal(factor: Tensor | None) -> bool:
    """Whether ``factor`` is a diagonal factor (a 1-d tensor of its diagonal)."""
    return factor is not None and factor.ndim == 1


def _clamp(values: Tensor) -> Tensor:
    tol = _EIG_CLAMP * values.abs().max().clamp_min(1e-300)
    return torch.where(values < tol, torch.zeros_like(values), values)


def symeig(factor: Tensor) -> Eigen:
    """Eigendecomposition of a symmetric PSD matrix (or of a diagonal factor ``[d]``), computed in
    float64 and clamped to be PSD.

    Float32 factors of wide layers are often ill-conditioned; a float64 ``eigh`` keeps the small
    eigenvalues (which dominate the inverse) accurate. Negative round-off eigenvalues are clamped to
    zero, so damping by ``delta > 0`` always yields a positive-definite block.

    Rows with a zero diagonal are exactly zero (the factors are sums of outer products, so
    ``M_ii = sum_n x_ni^2 = 0`` forces ``x_ni = 0``): dead ReLU units and never-active inputs.
    They contribute eigenvalue 0 with a unit eigenvector each, and only the rest is passed to
    ``eigh`` (on the benchmark's wide net 41% of the rows of the largest factors: ``eigh`` about
    4x cheaper). A diagonal factor needs no ``eigh``: its eigenvalues are its (clamped) entries in
    their own order, its eigenvectors the identity.
    """
    if not torch.isfinite(factor).all():
        raise ValueError("factor contains NaN or Inf; cannot eigendecompose it")
    f64 = factor.detach().to(torch.float64)
    if f64.ndim == 1:
        return Eigen(_clamp(f64).to(factor.dtype), None)
    # eigh reads the lower triangle only: the factors are symmetric up to round-off, and their
    # accumulation (kfac.py) completes them by mirroring that triangle.
    live = f64.diagonal() != 0
    n = f64.shape[0]
    n_live = int(live.sum())
    # A zero diagonal entry of a PSD matrix forces a zero row; anything else is not PSD, and then
    # the whole matrix goes to eigh (which reports its negative eigenvalues, clamped below).
    if n_live < n and bool(f64[~live].any()):
        n_live = n
    if n_live == n:
        values, vectors = torch.linalg.eigh(f64)
    else:
        idx = live.nonzero().squeeze(1)
        dead = (~live).nonzero().squeeze(1)
        sub_values, sub_vectors = torch.linalg.eigh(f64.index_select(0, idx).index_select(1, idx))
        n_dead = n - n_live
        values = torch.cat([sub_values.new_zeros(n_dead), sub_values])
        vectors = f64.new_zeros(n, n)
        vectors[dead, torch.arange(n_dead, device=f64.device)] = 1.0
        vectors[idx, n_dead:] = sub_vectors
    # One memory layout for every eigenbasis (torch.kron fails on mixed row/column-major inputs).
    return Eigen(_clamp(values).to(factor.dtype), vectors.to(factor.dtype).contiguous())


def left_mul(G: Tensor, mat: Tensor) -> Tensor:
    """``G @ mat`` (``G`` on the rows of ``mat [..., d_out, d_in]``; diagonal ``G``: a scaling)."""
    return G.unsqueeze(-1) * mat if G.ndim == 1 else G @ mat


def right_mul(mat: Tensor, A: Tensor) -> Tensor:
    """``mat @ A`` (``A`` on the columns of ``mat``; diagonal ``A``: a scaling)."""
    return mat * A if A.ndim == 1 else mat @ A


def rotate(QG: Tensor | None, mat: Tensor, QA: Tensor | None) -> Tensor:
    """``QG^T mat QA`` into the eigenbasis (``None``: the identity)."""
    out = mat if QG is None else QG.mT @ mat  # mT: batched over the groups of a grouped block
    return out if QA is None else out @ QA


def unrotate(QG: Tensor | None, mat: Tensor, QA: Tensor | None) -> Tensor:
    """``QG mat QA^T`` out of the eigenbasis (``None``: the identity)."""
    out = mat if QG is None else QG @ mat
    return out if QA is None else out @ QA.mT


def factor_trace(F: Tensor) -> Tensor:
    """``tr(F)`` of a dense or diagonal factor (per group ``[g]`` for grouped factors)."""
    return F.sum() if F.ndim == 1 else F.diagonal(dim1=-2, dim2=-1).sum(-1)


def dense_factor(F: Tensor) -> Tensor:
    """The ``[d, d]`` matrix of a factor (tests and small blocks only)."""
    return torch.diag(F) if F.ndim == 1 else F


def eigvec_dense(e: Eigen, like: Tensor) -> Tensor:
    """The ``[d, d]`` eigenvectors of ``e`` (the identity formed for a diagonal factor; tests and
    small blocks only); dtype and device of ``like``."""
    if e.vectors is not None:
        return e.vectors
    return torch.eye(e.values.shape[0], dtype=like.dtype, device=like.device)
