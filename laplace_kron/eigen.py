"""Eigendecompositions of the Kronecker factors (symmetric PSD, float64, clamped)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["Eigen", "symeig"]

# Relative size below which an eigenvalue is treated as round-off and clamped to zero.
_EIG_CLAMP = 1e-12


@dataclass
class Eigen:
    """Eigendecomposition ``M = vectors @ diag(values) @ vectors.T`` of a symmetric PSD factor."""

    values: Tensor  # [d]
    vectors: Tensor  # [d, d]


def symeig(factor: Tensor) -> Eigen:
    """Eigendecomposition of a symmetric PSD matrix, computed in float64 and clamped to be PSD.

    Float32 factors of wide layers are often ill-conditioned; a float64 ``eigh`` keeps the small
    eigenvalues (which dominate the inverse) accurate. Negative round-off eigenvalues are clamped to
    zero, so damping by ``delta > 0`` always yields a positive-definite block.

    Rows with a zero diagonal are exactly zero (the factors are sums of outer products, so
    ``M_ii = sum_n x_ni^2 = 0`` forces ``x_ni = 0``): dead ReLU units and never-active inputs.
    They contribute eigenvalue 0 with a unit eigenvector each, and only the rest is passed to
    ``eigh`` (on the benchmark's wide net 41% of the rows of the largest factors: ``eigh`` about
    4x cheaper).
    """
    if not torch.isfinite(factor).all():
        raise ValueError("factor contains NaN or Inf; cannot eigendecompose it")
    # eigh reads the lower triangle only: the factors are symmetric up to round-off, and their
    # accumulation (kfac.py) completes them by mirroring that triangle.
    f64 = factor.detach().to(torch.float64)
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
    tol = _EIG_CLAMP * values.abs().max().clamp_min(1e-300)
    values = torch.where(values < tol, torch.zeros_like(values), values)
    # One memory layout for every eigenbasis (torch.kron fails on mixed row/column-major inputs).
    return Eigen(values.to(factor.dtype), vectors.to(factor.dtype).contiguous())
