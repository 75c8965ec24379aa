"""Diagonal curvature blocks: parameters that no Kronecker factorisation covers.

A trainable parameter that is not the weight (or bias) of a supported linear map (LayerNorm /
BatchNorm affine parameters, embedding tables, free positional parameters, parameters of custom
modules) gets the block ``H = diag(h)`` with ``h`` the exact (or MC / empirical) GGN diagonal

    h = sum_{n,k} (d (s_k . f(x_n)) / d theta)^2

in the parameter's own ``p.flatten()`` order. Its damped form ``c H + delta I`` has eigenvectors
the unit vectors and eigenvalues ``c h_i + delta``, so every operation is elementwise.

:class:`DiagBlock` has the interface of :class:`~laplace_kron.kron.KronBlock` that the rest of the
library uses. Its matrix view is the column ``[P_block, 1]`` (``d_out = P_block``, ``d_in = 1``):
the values are its "eigenvalues" ``[P_block, 1]`` and a flat vector maps to the matrix view by
adding a trailing axis, so a :class:`~laplace_kron.kron.KronCurvature` can mix both kinds.
:class:`BlockOps` holds the damped operations both kinds derive from their eigenvalues.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .spectrum import Spectrum

__all__ = ["BlockOps", "DiagBlock", "is_uniform"]

Num = Tensor | float
Fn = Callable[[Tensor], Tensor]


def is_uniform(delta: Tensor | float) -> bool:
    """A damping ``delta I`` (a number), not eigenvalue-shaped (:mod:`~laplace_kron.diagprior`)."""
    return not isinstance(delta, Tensor) or delta.ndim == 0


class BlockOps:
    """The damped operations every block derives from ``eigvals()`` and ``apply_fn`` (shared by
    :class:`DiagBlock` and :class:`~laplace_kron.kron.KronBlock`)."""

    def damped_eigvals(self, scale: Tensor | float = 1.0, delta: Tensor | float = 0.0) -> Tensor:
        """Eigenvalues ``scale * lambda + delta`` of ``scale * K + delta * I``, ``[d_out, d_in]``."""
        return scale * self.eigvals() + delta

    def inv_matvec(self, mat: Tensor, scale: Tensor | float = 1.0, delta: Tensor | float = 0.0):
        """``(scale * K + delta I)^{-1} vec(mat)`` in matrix form."""
        return self.apply_fn(mat, torch.reciprocal, scale, delta)

    def inv_sqrt_matvec(
        self, mat: Tensor, scale: Tensor | float = 1.0, delta: Tensor | float = 0.0
    ) -> Tensor:
        """``(scale * K + delta I)^{-1/2} vec(mat)`` (symmetric inverse square root)."""
        return self.apply_fn(mat, torch.rsqrt, scale, delta)

    def trace_inv(self, scale: Tensor | float = 1.0, delta: Tensor | float = 0.0) -> Tensor:
        """``tr((scale * K + delta I)^{-1})``."""
        return torch.reciprocal(self.damped_eigvals(scale, delta)).sum()

    def quadratic(self, mat: Tensor, scale: Tensor | float = 1.0, delta: Tensor | float = 0.0):
        """``vec(mat)^T (scale * K + delta I) vec(mat)`` for ``mat [..., d_out, d_in]`` -> ``[...]``."""
        return (mat * self.matvec(mat, scale, delta)).sum(dim=(-2, -1))

    def logdet(self, scale: Tensor | float = 1.0, delta: Tensor | float = 0.0) -> Tensor:
        """``log det(scale * K + delta I)`` (float64, differentiable in ``scale`` and ``delta``);
        ``-inf`` for a singular block with ``delta = 0``. Computed by :mod:`~laplace_kron.spectrum`,
        the library's one log-determinant path; an eigenvalue-shaped ``delta`` directly."""
        if not is_uniform(delta):
            return torch.log(self.damped_eigvals(scale, delta).to(torch.float64)).sum()
        return Spectrum.from_blocks([self.eigvals()]).logdet(scale, delta)


@dataclass
class DiagBlock(BlockOps):
    """One diagonal curvature block ``H = diag(values.flatten())``.

    Args:
        values: the undamped diagonal, shaped like the parameter (or flat ``[P_block]``); finite
            and ``>= 0`` (sums of squares).
        param_names: the one parameter the block covers, e.g. ``["norm.weight"]``.
        param_shapes: its shape.
    """

    values: Tensor
    param_names: list[str]
    param_shapes: list[torch.Size]

    def __post_init__(self) -> None:
        self.param_shapes = [torch.Size(s) for s in self.param_shapes]
        if len(self.param_names) != 1 or len(self.param_shapes) != 1:
            raise ValueError(
                f"a diagonal block covers exactly one parameter, got names {self.param_names}"
            )
        if not isinstance(self.values, Tensor) or not self.values.is_floating_point():
            raise ValueError(f"diagonal block {self.param_names}: values must be a float tensor")
        if self.values.numel() != self.param_shapes[0].numel():
            raise ValueError(
                f"diagonal block {self.param_names}: {self.values.numel()} values for a parameter "
                f"of shape {tuple(self.param_shapes[0])}"
            )
        if not torch.isfinite(self.values).all() or bool((self.values < 0).any()):
            raise ValueError(
                f"diagonal block {self.param_names}: values must be finite and >= 0 (sums of "
                "squared gradients)"
            )
        self.values = self.values.reshape(-1, 1)

    def __repr__(self) -> str:
        return f"DiagBlock({self.param_names[0]!r}, shape={tuple(self.param_shapes[0])})"

    # ----------------------------------------------------------------------------- shapes
    bias_joint = False  # interface of KronBlock: no augmented bias column
    eigenvalues = None  # not an EKFAC correction (the values are already exact per coordinate)

    @property
    def d_out(self) -> int:
        """Rows of the matrix view: the number of parameters."""
        return self.values.shape[0]

    @property
    def d_in(self) -> int:
        """Columns of the matrix view: 1."""
        return 1

    @property
    def n_params(self) -> int:
        """Number of parameters covered."""
        return self.values.shape[0]

    dtype = property(lambda self: self.values.dtype, doc="Dtype of the values.")
    device = property(lambda self: self.values.device, doc="Device of the values.")

    # ----------------------------------------------------------------------------- eigen
    def eigvals(self) -> Tensor:
        """Eigenvalues of the undamped block: the values, ``[P_block, 1]``."""
        return self.values

    # ----------------------------------------------------------------------------- layouts
    def params_to_mat(self, params: Sequence[Tensor]) -> Tensor:
        """The parameter-shaped tensor (optional leading batch dims) -> ``[..., P_block, 1]``."""
        if len(params) != 1:
            raise ValueError(f"expected 1 tensor, got {len(params)}")
        (p,), shape = params, self.param_shapes[0]
        batch = p.shape[: p.ndim - len(shape)]
        if p.shape[len(batch) :] != shape:
            raise ValueError(f"tensor of shape {tuple(p.shape)} does not end in {tuple(shape)}")
        return p.reshape(*batch, self.n_params, 1)

    def mat_to_params(self, mat: Tensor) -> list[Tensor]:
        """Inverse of :meth:`params_to_mat`."""
        return [mat.reshape(*mat.shape[:-2], *self.param_shapes[0])]

    def vec_to_mat(self, vec: Tensor) -> Tensor:
        """Flat vector(s) ``[..., P_block]`` -> ``[..., P_block, 1]``."""
        return vec.unsqueeze(-1)

    def mat_to_vec(self, mat: Tensor) -> Tensor:
        """Inverse of :meth:`vec_to_mat`."""
        return mat.squeeze(-1)

    def param_permutation(self) -> Tensor:
        """The identity: the matrix view is already in parameter order."""
        return torch.arange(self.n_params, device=self.device)

    # ------------------------------------------------------------------ elementwise algebra
    def apply_fn(self, mat: Tensor, fn: Fn | None = None, scale: Num = 1.0, delta: Num = 0.0):
        """``f(scale * H + delta I)`` applied to ``mat [..., P_block, 1]`` (elementwise)."""
        lam = self.damped_eigvals(scale, delta)
        return (lam if fn is None else fn(lam)) * mat

    def matvec(self, mat: Tensor, scale: Tensor | float = 1.0, delta: Tensor | float = 0.0):
        """``(scale * H + delta I) vec(mat)``."""
        return self.apply_fn(mat, None, scale, delta)

    def trace(self, scale: Tensor | float = 1.0, delta: Tensor | float = 0.0) -> Tensor:
        """``tr(scale * H + delta I)``."""
        return self.damped_eigvals(scale, delta).sum()

    def to_dense(self, scale: Num = 1.0, delta: Num = 0.0, fn: Fn | None = None) -> Tensor:
        """Dense ``f(scale * H + delta I)`` ``[P_block, P_block]`` (tests only)."""
        lam = self.damped_eigvals(scale, delta)
        return torch.diag((lam if fn is None else fn(lam)).reshape(-1))
