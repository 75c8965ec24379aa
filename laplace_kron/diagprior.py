"""A per-parameter (diagonal) prior precision ``D = diag(delta_1, ..., delta_P)`` with Kronecker
posteriors.

A diagonal curvature block takes it exactly: ``Lambda = c diag(h) + diag(delta)``. A Kronecker
block ``c Q diag(E) Q^T`` (``Q = Q_G (x) Q_A``, eigenvalues ``E [d_out, d_in]``) would lose its
eigenbasis, since ``D`` is not diagonal in it. We keep the basis and add the diagonal of ``D`` in
it (the approximation EKFAC makes for the curvature):

    Lambda = Q (c E + D~) Q^T,   D~ = diag(Q^T D Q) = (Q_G o Q_G)^T Dmat (Q_A o Q_A)

with ``Dmat`` the ``[d_out, d_in]`` matrix view of the block's ``delta`` and ``o`` elementwise
squaring (``Q`` is never formed). This is exact where ``D`` is constant on a block (scalar and
per-block priors give the same numbers) and drops the off-diagonal part of ``Q^T D Q``
otherwise. The exact diagonal of the covariance follows from the same squares:

    Sigma_ii = [(Q_G o Q_G) (1 / (c E + D~)) (Q_A o Q_A)^T]_i.

The evidence uses the exact prior terms ``1/2 sum_i log delta_i - 1/2 sum_i delta_i (theta_i -
mu_i)^2`` with ``- 1/2 log det Lambda = - 1/2 sum log(c E + D~)``. As ``D~`` is linear in
``delta``, ``d log det Lambda / d delta_i = Sigma_ii``, so the evidence is stationary where
``delta_i (theta_i^2 + Sigma_ii) = 1``: MacKay's ``delta_i = gamma_i / theta_i^2`` with
``gamma_i = 1 - delta_i Sigma_ii`` (:meth:`DiagPrior.mackay_step`).

:func:`block_dampings` gives each block's damping for the block operations of
:mod:`~laplace_kron.kron` (``matvec``, inverse, square root, ``logdet``, ``to_dense``): a 0-d
tensor for a scalar / per-block prior, an eigenvalue-shaped ``D~`` for a per-parameter one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .kron import Block, DiagBlock, KronBlock, KronCurvature, per_block

__all__ = [
    "DiagPrior",
    "block_dampings",
    "block_values",
    "check_prior_length",
    "is_per_parameter",
    "param_deltas",
]

# Bounds of a tuned per-parameter precision: the evidence drives some entries to 0 (no data
# information, theta != 0) or to infinity (theta = 0 with curvature), automatic relevance
# determination's pruning.
DELTA_MIN, DELTA_MAX = 1e-12, 1e12
# Over-relaxation of the minorise-maximise step (DiagPrior.mackay_step): first and largest factor.
_OMEGA_START, _OMEGA_MAX = 1.5, 50.0


def check_prior_length(value: Tensor, curv: KronCurvature) -> None:
    """A 1-d prior precision must have one value, one per block or one per parameter."""
    n, P = len(curv.blocks), curv.n_params
    if value.ndim == 1 and value.numel() not in (1, n, P):
        raise ValueError(
            f"prior_precision has {value.numel()} values but the posterior has {n} blocks and "
            f"{P} covered parameters; give a scalar, one value per block or one per parameter "
            "(a vector or a mapping name -> tensor)"
        )


def is_per_parameter(value: Tensor, curv: KronCurvature) -> bool:
    """Whether ``value`` holds one precision per parameter (``[P]``). Where every block has one
    parameter (``P`` blocks) the per-block reading is taken: the numbers are the same."""
    check_prior_length(value, curv)
    return value.ndim == 1 and value.numel() == curv.n_params != len(curv.blocks)


def block_values(value: Tensor, curv: KronCurvature) -> Tensor:
    """A scalar or per-block prior precision as ``[n_blocks]`` (autograd kept); ValueError for a
    per-parameter one, which has no single value per block."""
    if is_per_parameter(value, curv):
        raise ValueError(
            "the prior precision is per parameter (granularity='diag') and has no single value "
            "per block; use param_deltas(...) for its values"
        )
    return torch.stack(per_block(value, len(curv.blocks)))


def _owners(curv: KronCurvature) -> Tensor:
    """The block of each entry of a flat parameter vector, ``[P]``."""
    owner = torch.empty(curv.n_params, dtype=torch.long)
    for i, b in enumerate(curv.blocks):
        owner[curv.block_index(b)] = i
    return owner


def param_deltas(value: Tensor, curv: KronCurvature) -> Tensor:
    """Any prior precision (scalar, per block, per parameter) as ``[P]`` (autograd kept)."""
    if value.ndim == 0 or value.numel() == 1:
        return value.reshape(()).expand(curv.n_params)
    if is_per_parameter(value, curv):
        return value
    return value[_owners(curv).to(value.device)]


def _squared(vectors: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """``Q o Q`` in ``dtype`` (``None`` stays the identity of a diagonal factor)."""
    return None if vectors is None else vectors.to(dtype).square()


def _check_block(b: Block) -> None:
    if not isinstance(b, (KronBlock, DiagBlock)) or b.eigvals().shape != (b.d_out, b.d_in):
        raise NotImplementedError(
            f"a per-parameter prior precision is not implemented for the block {b.param_names} "
            f"({type(b).__name__}); use a scalar or per-block prior precision"
        )


@dataclass
class DiagPrior:
    """A curvature's eigenvalues and squared eigenbases in one dtype (float64 by default, for the
    evidence), reused across evaluations of a per-parameter prior.

    ``eigvals[l]`` is block ``l``'s ``[d_out, d_in]`` eigenvalues, ``squares[l]`` its ``(Q_G o Q_G,
    Q_A o Q_A)`` (``None`` for a diagonal block, whose eigenvectors are the unit vectors).
    """

    curv: KronCurvature
    eigvals: list[Tensor]
    squares: list[tuple[Tensor | None, Tensor | None] | None]

    @classmethod
    def of(cls, curv: KronCurvature, dtype: torch.dtype = torch.float64) -> DiagPrior:
        """From a fitted curvature; ``NotImplementedError`` for a block kind it does not know."""
        eigvals, squares = [], []
        for b in curv.blocks:
            _check_block(b)
            eigvals.append(b.eigvals().to(dtype))
            squares.append(
                None
                if isinstance(b, DiagBlock)
                else (_squared(b.eig_G.vectors, dtype), _squared(b.eig_A.vectors, dtype))
            )
        return cls(curv, eigvals, squares)

    @property
    def device(self) -> torch.device:
        """The curvature's device: inputs move there, results stay there."""
        return self.eigvals[0].device

    def project(self, delta: Tensor) -> list[Tensor]:
        """``D~`` per block, shaped like its eigenvalues, from ``delta [P]`` (autograd kept)."""
        out = []
        mats = self.curv.split_vector(delta.to(self.device))
        for sq, mat in zip(self.squares, mats, strict=True):
            if sq is not None:
                SG, SA = sq
                mat = mat if SG is None else SG.T @ mat
                mat = mat if SA is None else mat @ SA
            out.append(mat)
        return out

    def damped(self, c: Tensor | float, delta: Tensor) -> list[Tensor]:
        """``c E + D~`` per block: the eigenvalues of ``Lambda``."""
        return [c * e + d for e, d in zip(self.eigvals, self.project(delta), strict=True)]

    def logdet(self, c: Tensor | float, delta: Tensor) -> Tensor:
        """``log det Lambda = sum log(c E + D~)``, differentiable in ``c`` and ``delta [P]``."""
        return sum(torch.log(lam).sum() for lam in self.damped(c, delta))

    def variance(self, c: Tensor | float, delta: Tensor) -> Tensor:
        """The exact diagonal of ``Sigma = Lambda^{-1}``, ``[P]`` in parameter order."""
        mats = []
        for sq, lam in zip(self.squares, self.damped(c, delta), strict=True):
            r = lam.reciprocal()
            if sq is not None:
                SG, SA = sq
                r = r if SG is None else SG @ r
                r = r if SA is None else r @ SA.T
            mats.append(r)
        return self.curv.join_mats(mats)

    def log_evidence(self, c: Tensor | float, delta: Tensor, sq: Tensor) -> Tensor:
        """The prior-dependent part of the evidence, ``- 1/2 sum_i delta_i sq_i + 1/2 sum_i log
        delta_i - 1/2 log det Lambda`` with ``sq [P] = (theta* - mu_0)^2``."""
        delta, sq = delta.to(self.device), sq.to(self.device)
        return -0.5 * (delta * sq).sum() + 0.5 * delta.log().sum() - 0.5 * self.logdet(c, delta)

    def mackay_step(
        self, c: float, delta: Tensor, sq: Tensor, omega: float = 1.0
    ) -> tuple[Tensor, Tensor, float]:
        """One fixed-point step that never lowers the evidence; returns ``(new delta, gamma,
        new omega)``.

        MacKay's update ``delta_i <- gamma_i / sq_i`` (``gamma_i = 1 - delta_i Sigma_ii``) is
        taken if it does not lower the evidence. It is undefined where ``sq_i = 0`` or ``gamma_i
        <= 0`` (which the projected ``D~`` allows), and can overshoot; the fallback is ``b_i = 1
        / (sq_i + Sigma_ii)``, which maximises a lower bound of the evidence touching it at
        ``delta`` (``log det Lambda`` is concave in ``delta``, so its tangent bounds it): a
        minorise-maximise step, which cannot lower the evidence. Like EM it can be slow, so first
        the over-relaxed ``delta (b / delta)^omega`` is tried (``omega`` grows while it is
        accepted and restarts when it is not). All have the same fixed points; entries are
        clamped to ``[DELTA_MIN, DELTA_MAX]``.
        """
        delta, sq = delta.to(self.device), sq.to(self.device)
        var = self.variance(c, delta)
        gamma = 1 - delta * var
        bound = (sq + var).reciprocal().clamp(DELTA_MIN, DELTA_MAX)
        ok = (gamma > 0) & (sq > 0)
        mackay = torch.where(ok, gamma / torch.where(ok, sq, 1.0), bound)
        relaxed = delta * (bound / delta).pow(omega)
        e0 = self.log_evidence(c, delta, sq)
        for step, grow in ((mackay, omega), (relaxed, min(1.5 * omega, _OMEGA_MAX))):
            step = step.clamp(DELTA_MIN, DELTA_MAX)
            if self.log_evidence(c, step, sq) >= e0:
                return step, gamma, grow
        return bound, gamma, _OMEGA_START


def block_dampings(value: Tensor, curv: KronCurvature, dtype: torch.dtype) -> Tensor | list[Tensor]:
    """The prior precision as the damping of the block operations, in ``dtype``: the value
    itself (scalar / per block) or, per parameter, each block's eigenvalue-shaped ``D~``."""
    if not is_per_parameter(value, curv):
        return value.to(dtype)
    return DiagPrior.of(curv, dtype).project(value.to(dtype))
