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

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .eigen import Eigen, symeig
from .kron import KronBlock

__all__ = ["GroupedKronBlock", "make_block"]


def _stacked_eig(factors: Tensor) -> Eigen:
    """:func:`~laplace_kron.eigen.symeig` of each ``[d, d]`` of ``factors [g, d, d]``, stacked."""
    eigs = [symeig(f) for f in factors]
    return Eigen(torch.stack([e.values for e in eigs]), torch.stack([e.vectors for e in eigs]))


@dataclass
class GroupedKronBlock(KronBlock):
    """``blockdiag_g(G_g (x) A_g)`` of a grouped convolution (see the module docstring); the
    arguments of :class:`~laplace_kron.kron.KronBlock` with a leading group axis on ``G``, ``A``
    and ``eigenvalues``."""

    def __post_init__(self) -> None:
        self.param_shapes = [torch.Size(s) for s in self.param_shapes]
        G, A = self.G, self.A
        if G.ndim != 3 or G.shape[1] != G.shape[2]:
            raise ValueError(f"grouped G must be [groups, d, d], got shape {tuple(G.shape)}")
        if A is not None and (A.ndim != 3 or A.shape[1] != A.shape[2] or len(A) != len(G)):
            raise ValueError(
                f"grouped A must be [{len(G)}, d, d] like G {tuple(G.shape)}, got {tuple(A.shape)}"
            )
        if self.n_params != sum(s.numel() for s in self.param_shapes):
            raise ValueError(
                f"block {self.param_names}: {self.groups} groups of factor sizes {self.d_out} x "
                f"{self.d_in} do not match parameter shapes {[tuple(s) for s in self.param_shapes]}"
            )
        shape = (self.groups, self.d_out, self.d_in)
        if self.eigenvalues is not None and self.eigenvalues.shape != shape:
            raise ValueError(
                f"EKFAC eigenvalues must have shape {shape}, got {tuple(self.eigenvalues.shape)}"
            )

    @property
    def groups(self) -> int:
        """Number of groups ``g``."""
        return self.G.shape[0]

    @property
    def d_out(self) -> int:
        """Output size per group (rows of one group's matrix view)."""
        return self.G.shape[-1]

    @property
    def d_in(self) -> int:
        """Input size per group (columns, including a joint bias column)."""
        return 1 if self.A is None else self.A.shape[-1]

    @property
    def n_params(self) -> int:
        """Number of parameters covered, ``groups * d_out * d_in``."""
        return self.groups * self.d_out * self.d_in

    @property
    def eig_G(self) -> Eigen:
        """Per-group eigendecompositions of ``G``: values ``[g, o]``, vectors ``[g, o, o]``."""
        if self._eig_G is None:
            self._eig_G = _stacked_eig(self.G)
        return self._eig_G

    @property
    def eig_A(self) -> Eigen:
        """Per-group eigendecompositions of ``A`` (ones for a bias-only block)."""
        if self._eig_A is None:
            if self.A is None:
                one = torch.ones(self.groups, 1, 1, dtype=self.dtype, device=self.device)
                self._eig_A = Eigen(one[:, 0], one)
            else:
                self._eig_A = _stacked_eig(self.A)
        return self._eig_A

    def eigvals(self) -> Tensor:
        """Eigenvalues of the undamped block, ``[g, d_out, d_in]``."""
        if self.eigenvalues is not None:
            return self.eigenvalues
        return self.eig_G.values.unsqueeze(-1) * self.eig_A.values.unsqueeze(-2)

    def params_to_mat(self, params: Sequence[Tensor]) -> Tensor:
        """Parameter-shaped tensors (optional batch dims) -> ``[..., g, d_out, d_in]``."""
        if len(params) != len(self.param_shapes):
            raise ValueError(f"expected {len(self.param_shapes)} tensors, got {len(params)}")
        mats = []
        for p, shape in zip(params, self.param_shapes, strict=True):
            batch = p.shape[: p.ndim - len(shape)]
            if p.shape[len(batch) :] != shape:
                raise ValueError(f"tensor of shape {tuple(p.shape)} does not end in {tuple(shape)}")
            mats.append(p.reshape(*batch, self.groups, self.d_out, -1))
        return torch.cat(mats, dim=-1) if len(mats) > 1 else mats[0]

    def mat_to_params(self, mat: Tensor) -> list[Tensor]:
        """Inverse of :meth:`params_to_mat`."""
        batch = mat.shape[:-3]
        out, start = [], 0
        for shape in self.param_shapes:
            width = shape.numel() // (self.groups * self.d_out)
            out.append(mat[..., start : start + width].reshape(*batch, *shape))
            start += width
        return out

    def mat_to_vec(self, mat: Tensor) -> Tensor:
        """Inverse of :meth:`vec_to_mat`."""
        batch = mat.shape[:-3]
        return torch.cat([p.reshape(*batch, -1) for p in self.mat_to_params(mat)], dim=-1)

    def apply_fn(
        self,
        mat: Tensor,
        fn: Callable[[Tensor], Tensor] | None = None,
        scale: Tensor | float = 1.0,
        delta: Tensor | float = 0.0,
    ) -> Tensor:
        """``f(scale * K + delta * I)`` applied to ``mat [..., g, d_out, d_in]``."""
        QG, QA = self.eig_G.vectors, self.eig_A.vectors
        lam = self.damped_eigvals(scale, delta)
        if fn is not None:
            lam = fn(lam)
        return QG @ (lam * (QG.mT @ mat @ QA)) @ QA.mT

    def trace(self, scale: Tensor | float = 1.0, delta: Tensor | float = 0.0) -> Tensor:
        """``tr(scale * K + delta I)``: ``sum_g tr(G_g) tr(A_g)`` for KFAC."""
        if self.eigenvalues is None:
            tr_g = self.G.diagonal(dim1=-2, dim2=-1).sum(-1)
            tr_a = 1.0 if self.A is None else self.A.diagonal(dim1=-2, dim2=-1).sum(-1)
            return scale * (tr_g * tr_a).sum() + delta * self.n_params
        return (scale * self.eigenvalues + delta).sum()

    def quadratic(self, mat: Tensor, scale: Tensor | float = 1.0, delta: Tensor | float = 0.0):
        """``vec(mat)^T (scale * K + delta I) vec(mat)`` for ``mat [..., g, o, i]`` -> ``[...]``."""
        return (mat * self.matvec(mat, scale, delta)).sum(dim=(-3, -2, -1))

    def to_dense(
        self,
        scale: Tensor | float = 1.0,
        delta: Tensor | float = 0.0,
        fn: Callable[[Tensor], Tensor] | None = None,
    ) -> Tensor:
        """Dense ``f(scale * K + delta I)`` in parameter order (block-diagonal over the groups in
        the matrix view's order; tests only)."""
        QG, QA = self.eig_G.vectors, self.eig_A.vectors
        lam = self.damped_eigvals(scale, delta)
        if fn is not None:
            lam = fn(lam)
        parts = []
        for g in range(self.groups):
            Q = torch.kron(QG[g], QA[g])
            parts.append((Q * lam[g].flatten()) @ Q.T)
        kron = torch.block_diag(*parts)
        perm = self.param_permutation()
        dense = torch.empty_like(kron)
        dense[perm.unsqueeze(1), perm.unsqueeze(0)] = kron
        return dense


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
