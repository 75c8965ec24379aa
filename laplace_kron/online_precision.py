"""The online precision of one parameter block: an exact sum of Kronecker (or EKFAC) terms.

After tasks ``1..t`` a block's precision is ``sum_k c_k K_k`` with ``K_k = G_k (x) A_k`` (KFAC) or
``(Q_G,k (x) Q_A,k) diag(E_k) (Q_G,k (x) Q_A,k)^T`` (EKFAC) and ``c_k = decay^(t - k)``. A sum of
Kronecker products is not one, so :class:`BlockSum` keeps the terms as a list; :func:`merge_terms`
merges terms into one Kronecker product when a bounded cost is wanted (``max_terms``). The
quadratic form ``vec(D)^T (sum_k c_k K_k) vec(D)`` of a block's parameter difference
``D [d_out, d_in]`` (row-major ``vec``, so ``(G (x) A) vec(D) = vec(G D A)``) is evaluated for all
terms at once with batched GEMMs and never forms a ``P x P`` matrix (only :meth:`BlockSum.to_dense`,
for tests, does): one pair of small GEMMs per term and step, so memory and time grow linearly
with the number of tasks. Merging the two oldest terms whenever there are more than ``max_terms``
bounds that (``max_terms=1``: one Kronecker product per block, Ritter et al. 2018); keeping the
recent tasks exact and merging only old ones is a middle ground. :class:`DiagSum` is the
diagonal (EWC) precision, summed exactly. Used by :class:`laplace_kron.continual.OnlineLaplace`.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .kron import Eigen, KronBlock
from .kron_groups import make_block

__all__ = ["BlockSum", "DiagSum", "Term", "merge_terms"]

# EKFAC terms also store their eigenbases: eigenvectors of repeated eigenvalues are not unique, so
# recomputing them after a load could change the penalty.
_EIGEN_KEYS = ("eigenvalues", "eig_G_values", "eig_G_vectors", "eig_A_values", "eig_A_vectors")


@dataclass
class Term:
    """One Kronecker term ``coef * K`` of a block's precision (``K``: KFAC or EKFAC block)."""

    coef: float
    block: KronBlock


@dataclass
class BlockSum:
    """Precision of one parameter block: ``sum_k coef_k * K_k`` over :attr:`terms`.

    ``param_names`` / ``param_shapes`` / ``bias_joint`` describe the block as in
    :class:`~laplace_kron.kron.KronBlock`; ``ekfac`` says whether the terms carry EKFAC eigenvalues.
    """

    param_names: list[str]
    param_shapes: list[torch.Size]
    bias_joint: bool
    ekfac: bool = False
    terms: list[Term] = field(default_factory=list)
    _stack: tuple | None = field(default=None, repr=False)

    def fold(self, block: KronBlock, decay: float, max_terms: int | None) -> None:
        """``sum_k c_k K_k <- decay * sum_k c_k K_k + block``, then merge the oldest terms while
        there are more than ``max_terms`` (``None``: never)."""
        for t in self.terms:
            t.coef *= decay
        self.terms.append(Term(1.0, block))
        if max_terms is not None:
            while len(self.terms) > max_terms:
                self.terms[:2] = [merge_terms(self.terms[:2], self.ekfac)]
        self._stack = None

    def params_to_mat(self, params: Sequence[Tensor]) -> Tensor:
        """The block's parameter tensors -> ``[d_out, d_in]`` (as :meth:`KronBlock.params_to_mat`)."""
        return self.terms[0].block.params_to_mat(params)

    def stacked(self) -> tuple:
        """Batched factors for :meth:`quadratic` (cached until the terms change).

        KFAC: ``(coefs [T], G [T, o, o], A [T, i, i] or None)``.
        EKFAC: ``(Q_G^T [T, o, o], Q_A [T, i, i], coef * E [T, o, i])``.
        """
        if self._stack is None:
            blocks = [t.block for t in self.terms]
            if self.ekfac:
                self._stack = (
                    torch.stack([b.eig_G.vectors.mT for b in blocks]).contiguous(),
                    torch.stack([b.eig_A.vectors for b in blocks]),
                    torch.stack([t.coef * t.block.eigvals() for t in self.terms]),
                )
            else:
                coefs = torch.tensor([t.coef for t in self.terms], dtype=blocks[0].dtype)
                A = None if blocks[0].A is None else torch.stack([b.A for b in blocks])
                self._stack = (coefs.to(blocks[0].device), torch.stack([b.G for b in blocks]), A)
        return self._stack

    def quadratic(self, D: Tensor) -> Tensor:
        """``vec(D)^T (sum_k c_k K_k) vec(D)`` for ``D [d_out, d_in]``, batched over the terms.

        KFAC term: ``c <D, G D A>``; EKFAC term: ``sum(c E * (Q_G^T D Q_A)^2)``. Differentiable.
        """
        if self.ekfac:
            QGt, QA, E = self.stacked()
            rot = QGt @ D @ QA  # [T, o, i]
            return (E * rot * rot).sum()
        coefs, G, A = self.stacked()
        GD = G @ D  # [T, o, i]
        if A is not None:
            GD = GD @ A
        return (coefs.reshape(-1, *[1] * (GD.ndim - 1)) * GD * D).sum()

    def to_dense(self) -> Tensor:
        """Dense ``sum_k c_k K_k`` ``[P_block, P_block]`` in the parameters' own flatten order."""
        return sum(t.coef * t.block.to_dense() for t in self.terms)

    # ------------------------------------------------------------------------- state
    def state_dict(self) -> dict:
        """Copies of the terms as plain tensors, numbers, strings and lists (``weights_only``)."""

        def copies(fn: Callable[[Term], Tensor | None]) -> list[Tensor | None]:
            return [None if fn(t) is None else fn(t).clone() for t in self.terms]

        entry: dict = {
            "param_names": list(self.param_names),
            "bias_joint": self.bias_joint,
            "coefs": [t.coef for t in self.terms],
            "G": copies(lambda t: t.block.G),
            "A": copies(lambda t: t.block.A),
        }
        if self.ekfac:
            entry["eigenvalues"] = copies(lambda t: t.block.eigenvalues)
            entry["eig_G_values"] = copies(lambda t: t.block.eig_G.values)
            entry["eig_G_vectors"] = copies(lambda t: t.block.eig_G.vectors)
            entry["eig_A_values"] = copies(lambda t: t.block.eig_A.values)
            entry["eig_A_vectors"] = copies(lambda t: t.block.eig_A.vectors)
        return entry

    @classmethod
    def from_state(
        cls,
        entry: Mapping,
        shapes: Mapping[str, torch.Size],
        ekfac: bool,
        cast: Callable[[Tensor | None], Tensor | None],
    ) -> BlockSum:
        """Rebuild a :meth:`state_dict` entry; ``shapes``: the model's parameter shapes by name,
        ``cast``: copies a tensor to the model's device and dtype.

        Raises ``ValueError`` naming the block for wrong types, list lengths or factor shapes; a
        missing key raises ``KeyError`` (callers parse inside :func:`laplace_kron.io.reading`).
        """
        names = entry["param_names"]
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise ValueError(f"block param_names must be a list of strings, got {names!r}")
        unknown = [n for n in names if n not in shapes]
        if not names or unknown:
            raise ValueError(f"block {names} covers parameters the model lacks: {unknown}")
        if not isinstance(entry["bias_joint"], bool):
            raise ValueError(f"block {names}: bias_joint must be a bool")
        coefs = entry["coefs"]
        keys = ("G", "A", *(_EIGEN_KEYS if ekfac else ()))
        lists = {k: entry[k] for k in keys}
        if not isinstance(coefs, list) or any(
            not isinstance(v, list) or len(v) != len(coefs) for v in lists.values()
        ):
            raise ValueError(f"block {names}: coefs, {', '.join(keys)} must be lists of one length")
        bs = cls(list(names), [shapes[n] for n in names], entry["bias_joint"], ekfac)
        for k, coef in enumerate(coefs):
            if isinstance(coef, bool) or not isinstance(coef, numbers.Real) or not coef >= 0:
                raise ValueError(f"block {names}: coefficient {coef!r} is not a number >= 0")
            t = {key: _tensor_or_none(lists[key][k], names, key, key == "A") for key in keys}
            block = make_block(
                cast(t["G"]), cast(t["A"]), bs.param_names, bs.param_shapes, bs.bias_joint
            )
            if ekfac:
                block = _ekfac_block(block, {key: cast(v) for key, v in t.items()}, names)
            first = bs.terms[0].block if bs.terms else block
            if (block.d_out, block.d_in) != (first.d_out, first.d_in):
                raise ValueError(f"block {names}: its terms have factors of different sizes")
            bs.terms.append(Term(float(coef), block))
        for p, s in zip(names, bs.param_shapes):
            if bs.terms and s.numel() % bs.terms[0].block.d_out:
                raise ValueError(f"block {names}: {p} {tuple(s)} does not fit d_out factors")
        return bs


@dataclass
class DiagSum:
    """Diagonal precision (EWC), one tensor ``F`` per parameter, summed exactly over tasks."""

    values: dict[str, Tensor] = field(default_factory=dict)

    def fold(self, diag: Mapping[str, Tensor], decay: float, named: Mapping[str, Tensor]) -> None:
        """``F <- decay * F + diag`` for every parameter in ``named`` (``diag`` shaped like it)."""
        missing = [n for n in named if n not in diag]
        if missing:
            raise ValueError(f"the diagonal curvature lacks parameters {missing}")
        new = {}
        for n, p in named.items():
            d = diag[n].detach()
            if d.shape != p.shape:
                raise ValueError(
                    f"diagonal for {n!r} has shape {tuple(d.shape)}, the parameter {tuple(p.shape)}"
                )
            if not torch.isfinite(d).all():
                raise ValueError(f"diagonal curvature of {n!r} contains NaN or Inf")
            old = self.values.get(n)
            new[n] = d.clone() if old is None else decay * old + d
        self.values.update(new)

    def quadratic(self, diffs: Mapping[str, Tensor]) -> Tensor:
        """``sum_n sum(F_n * D_n^2)`` over the parameter differences ``diffs``, differentiable."""
        return sum((self.values[n] * d * d).sum() for n, d in diffs.items())


def _tensor_or_none(value: object, names: list[str], key: str, optional: bool) -> Tensor | None:
    if value is None and optional:
        return None
    if not isinstance(value, Tensor) or not value.is_floating_point():
        raise ValueError(f"block {names}: {key} must be a floating-point tensor, got {value!r:.60}")
    return value


def _ekfac_block(block: KronBlock, t: Mapping[str, Tensor], names: list[str]) -> KronBlock:
    """``block`` with the stored EKFAC eigenvalues and eigenbases, shapes checked."""
    o, i, g = block.d_out, block.d_in, tuple(block.G.shape[:-2])  # g: a grouped block's groups
    want = {
        "eigenvalues": (*g, o, i),
        "eig_G_values": (*g, o),
        "eig_G_vectors": (*g, o, o),
        "eig_A_values": (*g, i),
        "eig_A_vectors": (*g, i, i),
    }
    bad = [f"{k} {tuple(t[k].shape)} (expected {s})" for k, s in want.items() if t[k].shape != s]
    if bad:
        raise ValueError(f"block {names}: EKFAC tensors of the wrong shape: {bad}")
    if (t["eigenvalues"] < 0).any():
        raise ValueError(f"block {names}: EKFAC eigenvalues must be >= 0 (sums of squares)")
    return type(block)(
        block.G,
        block.A,
        block.param_names,
        block.param_shapes,
        block.bias_joint,
        t["eigenvalues"],
        Eigen(t["eig_G_values"], t["eig_G_vectors"]),
        Eigen(t["eig_A_values"], t["eig_A_vectors"]),
    )


def merge_terms(terms: Sequence[Term], ekfac: bool) -> Term:
    """Merge ``sum_k c_k G_k (x) A_k`` into one Kronecker term (Ritter et al. style).

    KFAC: ``(sum_k c_k G_k) (x) (sum_k w_k A_k)`` with ``w_k = c_k tr(G_k) / sum_j c_j tr(G_j)``.
    This is the Kronecker product of the summed factors, normalised so that it is exact whenever
    all ``A_k`` (or, up to scale, all ``G_k``) coincide, and so that the trace is preserved
    (``A`` is an average over data, ``G`` a sum, see :mod:`laplace_kron.curvature.kfac`).

    EKFAC: the merged factors above give a new eigenbasis ``Q_G (x) Q_A``; the eigenvalues are the
    diagonal of the exact sum in that basis, ``E[i, j] = sum_k c_k (R_G,k^2 E_k R_A,k^2^T)[i, j]``
    with ``R_k = Q^T Q_k``, the Frobenius-closest matrix diagonal in the new basis (trace-exact).
    """
    blocks = [t.block for t in terms]
    first = blocks[0]
    G = sum(t.coef * t.block.G for t in terms)
    A = None
    if first.A is not None:
        # [terms] (or [terms, groups]: one weighting per group of a grouped block)
        tr = torch.stack([t.coef * t.block.G.diagonal(dim1=-2, dim2=-1).sum(-1) for t in terms])
        tot = tr.sum(0)
        w = torch.where(tot > 0, tr / torch.where(tot > 0, tot, 1.0), 1.0 / len(terms))
        A = sum(wk[..., None, None] * b.A for wk, b in zip(w, blocks))
    merged = make_block(G, A, list(first.param_names), list(first.param_shapes), first.bias_joint)
    if ekfac:
        QG, QA = merged.eig_G.vectors, merged.eig_A.vectors
        E = torch.zeros_like(merged.eigvals())
        for t in terms:
            RG = (QG.mT @ t.block.eig_G.vectors) ** 2
            RA = (QA.mT @ t.block.eig_A.vectors) ** 2
            E = E + t.coef * (RG @ t.block.eigvals() @ RA.mT)
        merged = merged.with_eigenvalues(E)
    return Term(1.0, merged)
