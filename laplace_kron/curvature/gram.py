"""Sums of outer products for the Kronecker factors and the EKFAC eigenvalues."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["gram_lower_", "mirror_", "per_example_sq"]

_EKFAC_CHUNK = 2**24

# Factors at least this wide are accumulated as a triangle of column strips (PyTorch has no
# syrk): strip i holds rows i h .. d of columns i h .. (i + 1) h, about (k + 1) / 2k of the GEMM
# work. Strips of about 256 columns are fastest on 2 CPU cores: the whole matrix costs 1.3-1.6x
# the strips for widths 384 to 2048 (no gain at 145).
_GRAM_SPLIT = 256
_STRIP = 256
_MAX_STRIPS = 8


def _bounds(d: int) -> list[int]:
    """Column-strip boundaries ``0 = c_0 < ... < c_k = d`` (``k = 1`` below ``_GRAM_SPLIT``)."""
    k = 1 if d < _GRAM_SPLIT else min(_MAX_STRIPS, max(2, d // _STRIP))
    return [d * i // k for i in range(k + 1)]


def gram_lower_(out: Tensor, X: Tensor, alpha: float, beta: float = 1.0) -> None:
    """``out <- beta out + alpha X^T X`` on and below the diagonal blocks of the column strips.

    ``X [N, d]``, ``out [d, d]``. For ``d < _GRAM_SPLIT`` the whole matrix is updated; otherwise
    the blocks above the diagonal ones are left untouched and :func:`mirror_` fills them.
    """
    c = _bounds(X.shape[1])
    for lo, hi in zip(c[:-1], c[1:]):
        out[lo:, lo:hi].addmm_(X[:, lo:].T, X[:, lo:hi], beta=beta, alpha=alpha)


def mirror_(M: Tensor) -> None:
    """Copy the blocks below the diagonal ones of a :func:`gram_lower_` result to those above
    (idempotent: the lower ones are never written)."""
    c = _bounds(M.shape[0])
    for lo, hi in zip(c[1:-1], c[2:]):
        M[:lo, lo:hi].copy_(M[lo:hi, :lo].T)


def per_example_sq(a: Tensor, g: Tensor, chunk: int = _EKFAC_CHUNK) -> Tensor:
    """``sum_{k,n} (sum_t g[k,n,t] a[n,t]^T)^2`` for ``a [B, T, i]``, ``g [K, B, T, o]`` -> ``[o, i]``.

    The squared per-example (per output-gradient vector) weight gradients, summed over shared
    positions before squaring. ``T = 1`` is one GEMM; otherwise per-example gradients are built in
    chunks of at most ``chunk`` elements.
    """
    K, B, T, d_out = g.shape
    d_in = a.shape[-1]
    if T == 1:
        return torch.einsum("kbo,bi->oi", g[:, :, 0] ** 2, a[:, 0] ** 2)
    out = g.new_zeros(d_out, d_in)
    step = max(1, chunk // max(1, K * d_out * d_in))
    for s in range(0, B, step):
        per = torch.einsum("kbto,bti->kboi", g[:, s : s + step], a[s : s + step])
        out += (per**2).sum(dim=(0, 1))
    return out
