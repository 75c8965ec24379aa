"""Kronecker block algebra with exact damping in the eigenbasis.

A layer's curvature block is ``K = G (x) A`` (KFAC) with ``G`` the output-side factor
``[d_out, d_out]`` and ``A`` the input-side factor ``[d_in, d_in]``. With the eigendecompositions
``G = Q_G diag(l_G) Q_G^T`` and ``A = Q_A diag(l_A) Q_A^T``, the damped block

    Lambda = c * K + delta * I

has eigenvectors ``Q_G (x) Q_A`` and eigenvalues ``c * l_G[i] * l_A[j] + delta``. EKFAC keeps the
eigenbasis and replaces the eigenvalue matrix ``outer(l_G, l_A)`` by a full ``[d_out, d_in]``
matrix ``E`` of corrections. Every operation (matvec, inverse, inverse square root, logdet, trace,
sampling) is a function ``f`` of these eigenvalues applied in the eigenbasis:

    f(Lambda) vec(V) = vec(Q_G [f(c * E + delta) * (Q_G^T V Q_A)] Q_A^T)

where ``V`` is the ``[d_out, d_in]`` matrix view of the block's parameters and ``vec`` is the
row-major flatten (PyTorch's ``W.flatten()``), so that ``(G (x) A) vec(V) = vec(G V A)``.

A block maps to one or more model parameters: a weight reshaped to ``[d_out, d_in]`` (a conv weight
``[out, in, *k]`` to ``[out, in * prod(k)]``), optionally with its bias appended as an extra input
column (the augmented weight ``[W | b]``), or a bias alone (one factor: ``A = [[1]]``).
A factor may be diagonal, given as the 1-d tensor of its diagonal (an ``nn.Embedding``'s token
counts, :mod:`~laplace_kron.factors`): its eigenvectors are the identity and are never formed.
Only ``to_dense()`` ever forms a ``P x P`` matrix.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .diagblock import BlockOps, DiagBlock, is_uniform
from .factors import (
    Eigen,
    dense_factor,
    eigvec_dense,
    factor_trace,
    left_mul,
    right_mul,
    rotate,
    symeig,
    unrotate,
)
from .spectrum import Spectrum

__all__ = [
    "Block",
    "DiagBlock",
    "Eigen",
    "KronBlock",
    "KronCurvature",
    "per_block",
    "symeig",
]


@dataclass
class KronBlock(BlockOps):
    """One curvature block ``G (x) A`` (or ``G`` alone for a bias), optionally EKFAC-corrected.

    Args:
        G: output-side factor ``[d_out, d_out]`` (or its diagonal ``[d_out]``).
        A: input-side factor ``[d_in, d_in]`` (or its diagonal ``[d_in]``), or ``None`` for a
            bias-only block (``d_in = 1``).
        param_names: names of the parameters the block covers, e.g. ``["fc.weight", "fc.bias"]``.
        param_shapes: their shapes.
        bias_joint: whether the last parameter is a bias stored as the last input column.
        eigenvalues: EKFAC corrected eigenvalues ``[d_out, d_in]`` in the basis ``Q_G (x) Q_A``;
            ``None`` for plain KFAC (eigenvalues ``outer(l_G, l_A)``).
    """

    G: Tensor
    A: Tensor | None
    param_names: list[str]
    param_shapes: list[torch.Size]
    bias_joint: bool = False
    eigenvalues: Tensor | None = None
    _eig_G: Eigen | None = field(default=None, repr=False)
    _eig_A: Eigen | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.param_shapes = [torch.Size(s) for s in self.param_shapes]
        self.check_factors()
        if self.n_params != sum(s.numel() for s in self.param_shapes):
            raise ValueError(
                f"block {self.param_names}: factor sizes {self.d_out} x {self.d_in} "
                f"(matrix view {(*self.row_shape, self.d_in)}) do not match parameter shapes "
                f"{[tuple(s) for s in self.param_shapes]}"
            )
        shape = (*self.row_shape, self.d_in)
        if self.eigenvalues is not None and self.eigenvalues.shape != shape:
            raise ValueError(
                f"EKFAC eigenvalues must have shape {shape}, got {tuple(self.eigenvalues.shape)}"
            )

    def check_factors(self) -> None:
        """``G`` and ``A`` are square matrices or 1-d diagonals (a grouped block checks its
        group axis)."""
        for name, fac in (("G", self.G), ("A", self.A)):
            if fac is not None and not _factor_shape(fac):
                raise ValueError(
                    f"{name} must be square (or the 1-d diagonal of a diagonal factor), got shape "
                    f"{tuple(fac.shape)}"
                )

    # ----------------------------------------------------------------------------- shapes
    @property
    def d_out(self) -> int:
        """Output size (rows of the block's matrix view; per group for a grouped block)."""
        return self.G.shape[-1]

    @property
    def d_in(self) -> int:
        """Input size (columns of the matrix view, including a joint bias column)."""
        return 1 if self.A is None else self.A.shape[-1]

    @property
    def n_params(self) -> int:
        """Number of parameters covered, ``d_out * d_in`` (times the groups of a grouped block)."""
        return math.prod(self.row_shape) * self.d_in

    @property
    def dtype(self) -> torch.dtype:
        """Dtype of the factors."""
        return self.G.dtype

    @property
    def device(self) -> torch.device:
        """Device of the factors."""
        return self.G.device

    # ----------------------------------------------------------------------------- eigen
    @property
    def eig_G(self) -> Eigen:
        """Eigendecomposition of ``G`` (computed once, float64, clamped PSD)."""
        if self._eig_G is None:
            self._eig_G = self.decompose(self.G)
        return self._eig_G

    @property
    def eig_A(self) -> Eigen:
        """Eigendecomposition of ``A`` (``[[1]]`` for a bias-only block)."""
        if self._eig_A is None:
            if self.A is None:
                one = torch.ones(*self.row_shape[:-1], 1, 1, dtype=self.dtype, device=self.device)
                self._eig_A = Eigen(one[..., 0], one)
            else:
                self._eig_A = self.decompose(self.A)
        return self._eig_A

    def decompose(self, factor: Tensor) -> Eigen:
        """The eigendecomposition of a factor (:func:`~laplace_kron.factors.symeig`)."""
        return symeig(factor)

    def eigvals(self) -> Tensor:
        """Eigenvalues of the undamped block as a ``[d_out, d_in]`` matrix."""
        if self.eigenvalues is not None:
            return self.eigenvalues
        return self.eig_G.values.unsqueeze(-1) * self.eig_A.values.unsqueeze(-2)

    # ----------------------------------------------------------------------------- layouts
    @property
    def row_shape(self) -> tuple[int, ...]:
        """Shape of the matrix view's leading axes (``(d_out,)``; ``(groups, d_out)`` for a
        grouped block, :mod:`~laplace_kron.kron_groups`)."""
        return (self.d_out,)

    def params_to_mat(self, params: Sequence[Tensor]) -> Tensor:
        """Stack parameter-shaped tensors (optional leading batch dims) into ``[..., d_out, d_in]``."""
        if len(params) != len(self.param_shapes):
            raise ValueError(f"expected {len(self.param_shapes)} tensors, got {len(params)}")
        mats = []
        for p, shape in zip(params, self.param_shapes, strict=True):
            batch = p.shape[: p.ndim - len(shape)]
            if p.shape[len(batch) :] != shape:
                raise ValueError(f"tensor of shape {tuple(p.shape)} does not end in {tuple(shape)}")
            mats.append(p.reshape(*batch, *self.row_shape, -1))
        return torch.cat(mats, dim=-1) if len(mats) > 1 else mats[0]

    def mat_to_params(self, mat: Tensor) -> list[Tensor]:
        """Inverse of :meth:`params_to_mat`."""
        batch = mat.shape[: mat.ndim - 1 - len(self.row_shape)]
        out, start = [], 0
        for shape in self.param_shapes:
            width = shape.numel() // math.prod(self.row_shape)
            out.append(mat[..., start : start + width].reshape(*batch, *shape))
            start += width
        return out

    def vec_to_mat(self, vec: Tensor) -> Tensor:
        """Parameter-order vector(s) ``[..., P_block]`` (params concatenated) -> ``[..., d_out, d_in]``."""
        params, start = [], 0
        for shape in self.param_shapes:
            n = shape.numel()
            params.append(vec[..., start : start + n].reshape(*vec.shape[:-1], *shape))
            start += n
        return self.params_to_mat(params)

    def mat_to_vec(self, mat: Tensor) -> Tensor:
        """Inverse of :meth:`vec_to_mat`."""
        batch = mat.shape[: mat.ndim - 1 - len(self.row_shape)]
        return torch.cat([p.reshape(*batch, -1) for p in self.mat_to_params(mat)], dim=-1)

    # ----------------------------------------------------------------------------- algebra
    def apply_fn(
        self,
        mat: Tensor,
        fn: Callable[[Tensor], Tensor] | None = None,
        scale: Tensor | float = 1.0,
        delta: Tensor | float = 0.0,
    ) -> Tensor:
        """Apply ``f(scale * K + delta * I)`` to matrices ``mat`` of shape ``[..., d_out, d_in]``.

        ``fn`` maps the damped eigenvalues elementwise (identity when ``None``).
        """
        QG, QA = self.eig_G.vectors, self.eig_A.vectors
        lam = self.damped_eigvals(scale, delta)
        if fn is not None:
            lam = fn(lam)
        return unrotate(QG, lam * rotate(QG, mat, QA), QA)

    def matvec(
        self, mat: Tensor, scale: Tensor | float = 1.0, delta: Tensor | float = 0.0
    ) -> Tensor:
        """``(scale * K + delta I) vec(mat)`` in matrix form. KFAC uses the factors directly."""
        if self.eigenvalues is None and is_uniform(delta):
            out = mat if self.A is None else right_mul(mat, self.A)
            return scale * left_mul(self.G, out) + delta * mat
        return self.apply_fn(mat, None, scale, delta)

    def trace(self, scale: Tensor | float = 1.0, delta: Tensor | float = 0.0) -> Tensor:
        """``tr(scale * K + delta I)``."""
        if self.eigenvalues is None and is_uniform(delta):  # summed over groups if grouped
            tr_a = 1.0 if self.A is None else factor_trace(self.A)
            return scale * (factor_trace(self.G) * tr_a).sum() + delta * self.n_params
        return self.damped_eigvals(scale, delta).sum()

    def param_permutation(self) -> Tensor:
        """Index ``perm`` with ``vec_param[perm] = mat.flatten()`` (Kronecker -> parameter order)."""
        idx = torch.arange(self.n_params, device=self.device)
        return self.vec_to_mat(idx).flatten()

    def to_dense(
        self,
        scale: Tensor | float = 1.0,
        delta: Tensor | float = 0.0,
        fn: Callable[[Tensor], Tensor] | None = None,
    ) -> Tensor:
        """Dense ``f(scale * K + delta I)`` ``[P_block, P_block]`` in parameter order (tests only)."""
        plain = fn is None and self.eigenvalues is None and is_uniform(delta)
        if plain and len(self.row_shape) == 1:
            A = torch.ones(1, 1, dtype=self.dtype, device=self.device) if self.A is None else self.A
            kron = scale * torch.kron(dense_factor(self.G), dense_factor(A))
            kron = kron + delta * torch.eye(self.n_params, dtype=self.dtype, device=self.device)
        else:
            Q = self.dense_eigenvectors()
            lam = self.damped_eigvals(scale, delta).flatten()
            if fn is not None:
                lam = fn(lam)
            kron = (Q * lam) @ Q.T
        return self.to_param_order(kron)

    def dense_eigenvectors(self) -> Tensor:
        """The eigenvectors ``Q_G (x) Q_A`` as a dense ``[P_block, P_block]`` matrix in the matrix
        view's order (tests only)."""
        return torch.kron(eigvec_dense(self.eig_G, self.G), eigvec_dense(self.eig_A, self.G))

    def to_param_order(self, kron: Tensor) -> Tensor:
        """A dense ``[P_block, P_block]`` matrix in the matrix view's (Kronecker) order, permuted
        to parameter order."""
        perm = self.param_permutation()
        dense = torch.empty_like(kron)
        dense[perm.unsqueeze(1), perm.unsqueeze(0)] = kron
        return dense

    def with_eigenvalues(self, eigenvalues: Tensor | None) -> KronBlock:
        """A copy sharing factors and eigenbases with new EKFAC eigenvalues."""
        return type(self)(
            self.G,
            self.A,
            list(self.param_names),
            list(self.param_shapes),
            self.bias_joint,
            eigenvalues,
            self._eig_G,
            self._eig_A,
        )


def _factor_shape(fac: Tensor) -> bool:
    """A square matrix, or a 1-d diagonal."""
    return fac.ndim == 1 or (fac.ndim == 2 and fac.shape[0] == fac.shape[1])


# A curvature block: Kronecker-factored, or diagonal (:mod:`~laplace_kron.diagblock`) for a
# parameter no Kronecker factorisation covers. Both share the interface KronCurvature uses.
Block = KronBlock | DiagBlock


def per_block(value: Tensor | float, n_blocks: int) -> list[Tensor | float]:
    """Broadcast a scalar or a ``[n_blocks]`` tensor to one value per block (the one place where a
    prior precision is broadcast over blocks); a list is taken as one value per block already."""
    if isinstance(value, list) and len(value) == n_blocks:
        return value
    if isinstance(value, Tensor) and value.ndim > 0:
        if value.numel() == 1:
            return [value.reshape(())] * n_blocks
        if value.shape != (n_blocks,):
            raise ValueError(
                f"a per-block value (e.g. the prior precision) has shape {tuple(value.shape)} but "
                f"there are {n_blocks} blocks; give a scalar or one value per block"
            )
        return list(value.unbind())
    return [value] * n_blocks


@dataclass
class KronCurvature:
    """Block-diagonal collection of :class:`KronBlock` and :class:`DiagBlock` mapped to a model's
    parameters.

    Attributes:
        blocks: one Kronecker block per covered layer (or per weight / bias when treated
            separately) and one diagonal block per other covered parameter, in the order of their
            first parameter in ``model.named_parameters()``.
        param_names: covered parameter names in ``model.named_parameters()`` order; the order of
            :meth:`to_dense` and of flat parameter vectors.
        num_data: number of data points ``N`` the curvature was summed over.
        likelihood: ``"classification"``, ``"regression"`` or ``"binary"``.
        fisher: ``"exact"``, ``"mc"`` or ``"empirical"``.
        loss: summed negative log-likelihood at the fitted parameters (``sigma = 1`` for regression).
        sse: summed squared residuals (regression; lets ``sigma`` change without refitting).
        n_outputs: number of network outputs per datum (per position for sequence outputs).
        n_observed: observed scalar targets (ignored / padded ones excluded), the count of the
            Gaussian evidence; ``None`` (older states): ``num_data * n_outputs``.
    """

    blocks: list[Block]
    param_names: list[str]
    num_data: int
    likelihood: str = "classification"
    fisher: str = "mc"
    loss: float = 0.0
    sse: float = 0.0
    n_outputs: int = 1
    kind: str = "kfac"
    n_observed: int | None = None

    @property
    def observed_targets(self) -> int:
        """Observed scalar targets: :attr:`n_observed`, or ``num_data * n_outputs`` if unknown."""
        return self.num_data * self.n_outputs if self.n_observed is None else self.n_observed

    def __post_init__(self) -> None:
        covered = [n for b in self.blocks for n in b.param_names]
        if sorted(covered) != sorted(self.param_names):
            raise ValueError(
                f"blocks cover {covered} but param_names lists {self.param_names}; they must match"
            )
        pos = {n: i for i, n in enumerate(self.param_names)}
        sizes = {n: s.numel() for b in self.blocks for n, s in zip(b.param_names, b.param_shapes)}
        offsets, start = {}, 0
        for n in self.param_names:
            offsets[n] = start
            start += sizes[n]
        self._offsets = offsets
        self._sizes = sizes
        self._pos = pos

    @property
    def n_params(self) -> int:
        """Total number of covered parameters ``P``."""
        return sum(b.n_params for b in self.blocks)

    @property
    def block_sizes(self) -> list[int]:
        """Number of parameters per block."""
        return [b.n_params for b in self.blocks]

    def block_index(self, block: Block) -> Tensor:
        """Positions of a block's parameter-order entries in the flat parameter vector."""
        return torch.cat(
            [
                torch.arange(self._offsets[n], self._offsets[n] + self._sizes[n])
                for n in block.param_names
            ]
        )

    def split_vector(self, vec: Tensor) -> list[Tensor]:
        """Flat vectors ``[..., P]`` -> list of block matrices ``[..., d_out, d_in]``."""
        if vec.shape[-1] != self.n_params:
            raise ValueError(f"vector has {vec.shape[-1]} entries, the curvature {self.n_params}")
        return [b.vec_to_mat(vec[..., self.block_index(b).to(vec.device)]) for b in self.blocks]

    def join_mats(self, mats: Sequence[Tensor]) -> Tensor:
        """Inverse of :meth:`split_vector`."""
        batch = mats[0].shape[:-2]
        out = mats[0].new_zeros(*batch, self.n_params)
        for b, m in zip(self.blocks, mats, strict=True):
            out[..., self.block_index(b).to(m.device)] = b.mat_to_vec(m)
        return out

    def _apply(self, fn_name: str, vec: Tensor, scale, delta) -> Tensor:
        deltas = per_block(delta, len(self.blocks))
        mats = self.split_vector(vec)
        outs = [
            getattr(b, fn_name)(m, scale, d)
            for b, m, d in zip(self.blocks, mats, deltas, strict=True)
        ]
        return self.join_mats(outs)

    def matvec(self, vec: Tensor, scale=1.0, delta=0.0) -> Tensor:
        """``(scale * H + delta) v`` for flat ``v [..., P]`` (``delta`` scalar or per block)."""
        return self._apply("matvec", vec, scale, delta)

    def inv_matvec(self, vec: Tensor, scale=1.0, delta=0.0) -> Tensor:
        """``(scale * H + delta)^{-1} v``."""
        return self._apply("inv_matvec", vec, scale, delta)

    def inv_sqrt_matvec(self, vec: Tensor, scale=1.0, delta=0.0) -> Tensor:
        """``(scale * H + delta)^{-1/2} v``."""
        return self._apply("inv_sqrt_matvec", vec, scale, delta)

    def logdet(self, scale=1.0, delta=0.0) -> Tensor:
        """``log det(scale * H + delta)`` (float64; ``delta`` scalar or per block), through the
        compressed spectrum (:mod:`~laplace_kron.spectrum`)."""
        if isinstance(delta, list):  # eigenvalue-shaped dampings (:mod:`~laplace_kron.diagprior`)
            return sum(b.logdet(scale, d) for b, d in zip(self.blocks, delta, strict=True))
        deltas = per_block(torch.as_tensor(delta, dtype=torch.float64), len(self.blocks))
        spec = Spectrum.from_blocks([b.eigvals() for b in self.blocks])
        return spec.logdet(scale, torch.stack(deltas))

    def trace(self, scale=1.0, delta=0.0) -> Tensor:
        """``tr(scale * H + delta)``."""
        deltas = per_block(delta, len(self.blocks))
        return sum(b.trace(scale, d) for b, d in zip(self.blocks, deltas, strict=True))

    def to_dense(self, scale=1.0, delta=0.0, fn=None) -> Tensor:
        """Dense ``[P, P]`` matrix in :attr:`param_names` order (small models / tests only)."""
        P = self.n_params
        dtype = self.blocks[0].dtype
        out = torch.zeros(P, P, dtype=dtype, device=self.blocks[0].device)
        deltas = per_block(delta, len(self.blocks))
        for b, d in zip(self.blocks, deltas, strict=True):
            idx = self.block_index(b).to(out.device)
            out[idx.unsqueeze(1), idx.unsqueeze(0)] = b.to_dense(scale, d, fn)
        return out

    def __repr__(self) -> str:
        return (
            f"KronCurvature(kind={self.kind!r}, blocks={len(self.blocks)}, P={self.n_params}, "
            f"N={self.num_data}, likelihood={self.likelihood!r}, fisher={self.fisher!r})"
        )
