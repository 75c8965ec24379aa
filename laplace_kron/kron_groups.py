"""Kronecker blocks of grouped convolutions: one ``G_g (x) A_g`` per group, as one block.

A convolution with ``groups = g`` (depthwise: ``g = C_in``) maps input channels ``g I/g ..`` to
output channels ``g O/g ..`` only, so its weight ``[O, I/g, *k]`` is ``g`` independent weights
``[O/g, I/g prod(k)]`` and its KFAC block is block-diagonal over the groups:

    K = blockdiag_g(G_g (x) A_g),   G_g = sum g_g g_g^T  [O/g, O/g],   A_g = mean a_g a_g^T,

with ``a_g`` the patch of the group's input channels and ``g_g`` the output-gradient of its output
channels (per position, KFAC-expand / -reduce as for any convolution). :class:`GroupedKronBlock` is
a :class:`~laplace_kron.kron.KronBlock` whose factors carry the group as a leading axis: ``G [g, o,
o]``, ``A [g, i, i]`` (``None`` for a bias alone), EKFAC eigenvalues ``[g, o, i]`` and the matrix
view ``[..., g, o, i]``: ``W.reshape(g, O/g, I/g prod(k))`` (row-major: the group is the leading
part of the output channel), with a joint bias as the last column ``b.reshape(g, O/g, 1)``. Its
eigenvectors are ``Q_G,g (x) Q_A,g`` per group and every damped operation is the ungrouped one
batched over the groups.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .factors import Eigen, symeig
from .kron import KronBlock

__all__ = ["GroupedKronBlock", "make_block"]


def _stacked_eig(factors: Tensor) -> Eigen:
    """:func:`~laplace_kron.factors.symeig` of each ``[d, d]`` of ``factors [g, d, d]``, stacked."""
    eigs = [symeig(f) for f in factors]
    return Eigen(torch.stack([e.values for e in eigs]), torch.stack([e.vectors for e in eigs]))


@dataclass
class GroupedKronBlock(KronBlock):
    """``blockdiag_g(G_g (x) A_g)`` of a grouped convolution (see the module docstring); the
    arguments of :class:`~laplace_kron.kron.KronBlock` with a leading group axis on ``G``, ``A``
    and ``eigenvalues``."""

    def check_factors(self) -> None:
        """``G [g, o, o]`` and ``A [g, i, i]`` (or ``None``) with one group axis."""
        G, A = self.G, self.A
        if G.ndim != 3 or G.shape[1] != G.shape[2]:
            raise ValueError(f"grouped G must be [groups, d, d], got shape {tuple(G.shape)}")
        if A is not None and (A.ndim != 3 or A.shape[1] != A.shape[2] or len(A) != len(G)):
            raise ValueError(
                f"grouped A must be [{len(G)}, d, d] like G {tuple(G.shape)}, got {tuple(A.shape)}"
            )

    @property
    def groups(self) -> int:
        """Number of groups ``g``."""
        return self.G.shape[0]

    def decompose(self, factor: Tensor) -> Eigen:
        """Per-group eigendecompositions of a ``[g, d, d]`` factor: values ``[g, d]``, vectors
        ``[g, d, d]``."""
        return _stacked_eig(factor)

    @property
    def row_shape(self) -> tuple[int, ...]:
        """The matrix view ``[..., groups, d_out, d_in]``."""
        return (self.groups, self.d_out)

    def quadratic(self, mat: Tensor, scale: Tensor | float = 1.0, delta: Tensor | float = 0.0):
        """``vec(mat)^T (scale * K + delta I) vec(mat)`` for ``mat [..., g, o, i]`` -> ``[...]``."""
        return (mat * self.matvec(mat, scale, delta)).sum(dim=(-3, -2, -1))

    def dense_eigenvectors(self) -> Tensor:
        """``blockdiag_g(Q_G,g (x) Q_A,g)`` ``[P_block, P_block]`` in the matrix view's order."""
        QG, QA = self.eig_G.vectors, self.eig_A.vectors
        return torch.block_diag(*[torch.kron(QG[g], QA[g]) for g in range(self.groups)])


def make_block(
    G: Tensor,
    A: Tensor | None,
    param_names: list[str],
    param_shapes: list[torch.Size],
    bias_joint: bool = False,
    eigenvalues: Tensor | None = None,
) -> KronBlock:
    """A :class:`GroupedKronBlock` if ``G`` has a group axis (``[g, o, o]``), else a
    :class:`~laplace_kron.kron.KronBlock` (what a saved state or a fit rebuilds)."""
    cls = GroupedKronBlock if isinstance(G, Tensor) and G.ndim == 3 else KronBlock
    return cls(G, A, param_names, param_shapes, bias_joint, eigenvalues)
