"""One preconditioned layer: what the hooks record, its gradient as a matrix, its Kronecker factors
and the rotation into their eigenbasis.

A layer ``y = W a + b`` (applied at ``L`` positions per example: 1 for ``nn.Linear`` on
``[B, D]``, the middle positions of ``[B, ..., D]``, or the output pixels of a convolution) has the
augmented weight ``V = [W | b]`` of shape ``[d_out, D]``. Without SUA the columns are the patch
columns ``a`` of :func:`~laplace_kron.curvature.capture.unfold_input` plus a ones column for the
bias; with SUA (convolutions) they are ``(input channel, kernel position)`` pairs over the
channels plus a constant-1 channel that carries the bias at the kernel's centre position, and the
input-side eigenbasis is ``Q_Omega (x) I_K`` (see docs/math.md, "Training with curvature").
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..curvature.capture import LayerSpec, flatten_output, unfold_input
from ..curvature.gram import per_example_sq
from ..kron import Eigen, symeig

__all__ = ["Batch", "Layer", "LayerCurvature", "Record"]


@dataclass
class Record:
    """One call of a layer in a forward pass: its input (kept only if the step needs it) and the
    gradient of the loss w.r.t. its output (summed over backward passes through it)."""

    pass_id: int
    batch_size: int
    x: Tensor | None
    keep_grad: bool
    grad: Tensor | None = None
    seen: bool = False


@dataclass
class LayerCurvature:
    """The curvature a preconditioner keeps for one layer (all tensors in the parameter dtype).

    ``A [D_A, D_A]``: input factor, mean of ``a a^T`` over the ``B * L`` columns (with SUA: mean of
    ``[x; 1][x; 1]^T`` over the input pixels, channels only). ``G [d_out, d_out]``: mean of
    ``g g^T`` over the ``B * L`` columns, ``g`` the output-gradients times ``B``. ``eig_A``,
    ``eig_G``: their eigendecompositions. ``positions``: ``L``; ``batch_size``: ``B`` of the batch
    they came from; ``refreshed_at``: that step's index. ``m2 [d_out, D]``: EKFAC's running
    eigenvalues; ``eigenvalues [d_out, D]``: the ``s`` of the last step (before adding ``eps``).
    With SUA, ``D = (C_in + 1) K`` (``C_in K`` without bias); otherwise ``D = D_A``.
    """

    name: str
    spec: LayerSpec
    sua: bool
    A: Tensor
    G: Tensor
    eig_A: Eigen
    eig_G: Eigen
    positions: int
    batch_size: int
    refreshed_at: int
    m2: Tensor
    eigenvalues: Tensor | None = field(default=None, repr=False)


@dataclass
class Batch:
    """What one step sees of a layer: ``g [B, L, d_out]`` (output-gradients times ``B``), patches
    ``a [B, L, D]`` in the column layout of :meth:`Layer.grad_matrix` (``None`` if not needed) and,
    with SUA, the input pixels ``pixels [N_pix, D_A]`` (``None`` otherwise)."""

    B: int
    L: int
    g: Tensor
    a: Tensor | None
    pixels: Tensor | None


def _center(kernel_size: tuple[int, ...]) -> int:
    """Row-major index of the kernel's centre position (``k // 2`` along each axis)."""
    idx = 0
    for k in kernel_size:
        idx = idx * k + k // 2
    return idx


class Layer:
    """A covered layer: gradient matrix view, patches, factors and eigenbasis rotations."""

    def __init__(self, spec: LayerSpec, sua: bool):
        m = spec.module
        self.spec = spec
        self.weight: Tensor | None = m.weight if spec.has_weight else None
        self.bias: Tensor | None = m.bias if spec.has_bias else None
        self.sua = bool(sua and spec.has_weight and isinstance(m, (nn.Conv1d, nn.Conv2d)))
        self.K = math.prod(m.kernel_size) if self.sua else 1
        self.center = _center(m.kernel_size) if self.sua else 0
        self.records: list[Record] = []
        self.curvature: LayerCurvature | None = None

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def channels(self) -> int:
        """SUA: input channels plus the bias channel."""
        return self.spec.module.in_channels + (self.bias is not None)

    @property
    def input_size(self) -> int:
        """Size of the input factor ``A`` (SUA: channels plus the bias channel)."""
        if self.sua:
            return self.channels
        return (self.spec.d_in if self.weight is not None else 0) + (self.bias is not None)

    # -- state ------------------------------------------------------------------------------
    def curvature_state(self) -> dict:
        """The layer's curvature as plain tensors (copies) and numbers (for ``state_dict``)."""
        c = self.curvature
        return {
            "A": c.A.clone(),
            "G": c.G.clone(),
            "eig_A_values": c.eig_A.values.clone(),
            "eig_A_vectors": c.eig_A.vectors.clone(),
            "eig_G_values": c.eig_G.values.clone(),
            "eig_G_vectors": c.eig_G.vectors.clone(),
            "m2": c.m2.clone(),
            "positions": c.positions,
            "batch_size": c.batch_size,
            "refreshed_at": c.refreshed_at,
        }

    def read_curvature(self, state: dict, like: Tensor) -> LayerCurvature:
        """Validate a :meth:`curvature_state` entry for this layer (dtype/device of ``like``)."""
        d_in, d_out = self.input_size, self.spec.d_out
        shapes = {
            "A": (d_in, d_in),
            "G": (d_out, d_out),
            "eig_A_values": (d_in,),
            "eig_A_vectors": (d_in, d_in),
            "eig_G_values": (d_out,),
            "eig_G_vectors": (d_out, d_out),
            "m2": (d_out, d_in * self.K),
        }
        where = f"state for layer {self.name!r}"
        if not isinstance(state, dict) or set(state) != set(shapes) | {
            "positions",
            "batch_size",
            "refreshed_at",
        }:
            raise ValueError(f"{where}: expected the keys of curvature_state(), got {state!r}")
        t = {}
        for key, shape in shapes.items():
            v = state[key]
            if not isinstance(v, Tensor) or tuple(v.shape) != shape:
                got = tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__
                raise ValueError(f"{where}: {key} must be a tensor of shape {shape}, got {got}")
            if not torch.isfinite(v).all():
                raise ValueError(f"{where}: {key} contains NaN or Inf")
            t[key] = v.detach().to(like, copy=True)
        ints = [state[k] for k in ("positions", "batch_size", "refreshed_at")]
        if any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in ints):
            raise ValueError(f"{where}: positions, batch_size, refreshed_at must be integers >= 0")
        return LayerCurvature(
            self.name,
            self.spec,
            self.sua,
            t["A"],
            t["G"],
            Eigen(t["eig_A_values"], t["eig_A_vectors"]),
            Eigen(t["eig_G_values"], t["eig_G_vectors"]),
            *ints,
            t["m2"],
        )

    # -- the gradient as a [d_out, D] matrix ------------------------------------------------
    def grad_matrix(self) -> Tensor:
        """``[d_out, D]``: the weight gradient and the bias gradient in their columns."""
        for p, what in ((self.weight, "weight"), (self.bias, "bias")):
            if p is not None and p.grad is None:
                raise ValueError(
                    f"layer {self.name!r}: its {what} has no .grad although its output received a "
                    "gradient; was .grad set to None between loss.backward() and step()?"
                )
        d_out = self.spec.d_out
        parts = [] if self.weight is None else [self.weight.grad.reshape(d_out, -1)]
        if self.bias is not None:
            gb = self.bias.grad.reshape(d_out, 1)
            if self.sua:
                # The bias is the weight of a constant channel at the kernel's centre only.
                col = gb.new_zeros(d_out, self.K)
                col[:, self.center] = gb[:, 0]
                gb = col
            parts.append(gb)
        return torch.cat(parts, dim=1)

    def split(self, mat: Tensor) -> list[tuple[Tensor, Tensor]]:
        """``[(param, new_grad)]`` from a ``[d_out, D]`` matrix (inverse of :meth:`grad_matrix`;
        with SUA the constant channel's other kernel positions are not parameters and dropped)."""
        out = []
        if self.weight is not None:
            n = self.weight[0].numel()
            out.append((self.weight, mat[:, :n].reshape(self.weight.shape)))
        if self.bias is not None:
            col = mat[:, -self.K + self.center] if self.sua else mat[:, -1]
            out.append((self.bias, col.reshape(self.bias.shape)))
        return out

    # -- the captured batch -----------------------------------------------------------------
    def batch_size(self, records: list[Record]) -> int:
        """The batch size ``B`` shared by the calls of one forward pass."""
        sizes = {r.batch_size for r in records}
        if len(sizes) > 1:
            raise ValueError(
                f"layer {self.name!r} was called with batch sizes {sorted(sizes)} in one forward "
                "pass; a shared layer must see the same batch in every call"
            )
        return sizes.pop()

    def batch(self, records: list[Record], patches: bool) -> Batch:
        """Stack the calls of one forward pass along the positions axis."""
        B = self.batch_size(records)
        m = self.spec.module
        g = torch.cat([flatten_output(m, r.grad) for r in records], dim=1) * B
        a = pixels = None
        if patches:
            a = self.patches([r.x for r in records], g)
        if self.sua:
            pix = [r.x.transpose(0, 1).flatten(1).T for r in records]
            pixels = torch.cat(pix, dim=0)
            if self.bias is not None:
                pixels = torch.cat([pixels, pixels.new_ones(pixels.shape[0], 1)], dim=1)
        return Batch(B, g.shape[1], g, a, pixels)

    def patches(self, xs: list[Tensor], g: Tensor) -> Tensor:
        """``[B, L, D]`` columns matching :meth:`grad_matrix`: per-example weight gradients are
        ``G_n = sum_t g_{n,t} a_{n,t}^T``."""
        B, L = g.shape[:2]
        if self.weight is None:
            return g.new_ones(B, L, 1)
        a = torch.cat([unfold_input(self.spec.module, x) for x in xs], dim=1)
        if self.bias is None:
            return a
        if not self.sua:
            return torch.cat([a, a.new_ones(B, L, 1)], dim=2)
        ones = a.new_zeros(B, L, 1, self.K)
        ones[..., self.center] = 1.0
        return torch.cat([a.unflatten(2, (-1, self.K)), ones], dim=2).flatten(2)

    # -- factors and rotations --------------------------------------------------------------
    def refresh(self, batch: Batch, step: int) -> None:
        """New factors, eigenbases and ``m2 = L e_G e_A^T`` from ``batch``."""
        BL = batch.g.shape[0] * batch.L
        g = batch.g.reshape(BL, -1)
        if self.sua:
            A = batch.pixels.T @ batch.pixels / batch.pixels.shape[0]
        else:
            a = batch.a.reshape(BL, -1)
            A = a.T @ a / BL
        G = g.T @ g / BL
        for name, f in (("input", A), ("output-gradient", G)):
            if not torch.isfinite(f).all():
                raise ValueError(
                    f"layer {self.name!r}: the {name} factor contains NaN or Inf (the forward "
                    "pass or the loss produced non-finite values); lower the learning rate or "
                    "raise eps"
                )
        eig_A, eig_G = symeig(A), symeig(G)
        m2 = batch.L * torch.outer(eig_G.values, self.input_values(eig_A.values))
        self.curvature = LayerCurvature(
            self.name, self.spec, self.sua, A, G, eig_A, eig_G, batch.L, batch.B, step, m2
        )

    def input_values(self, e_A: Tensor) -> Tensor:
        """Eigenvalues of the input side per column: ``e_A``, or with SUA ``e_Omega (x) 1_K``."""
        return e_A.repeat_interleave(self.K) if self.sua else e_A

    def rotate_in(self, X: Tensor, back: bool = False) -> Tensor:
        """``X [..., D]`` times the input-side eigenbasis (``Q_A``; SUA: ``Q_Omega (x) I_K``),
        or its transpose if ``back``."""
        Q = self.curvature.eig_A.vectors
        Q = Q.T if back else Q
        if not self.sua:
            return X @ Q
        Xc = X.unflatten(-1, (self.channels, self.K))
        return torch.einsum("...ck,cd->...dk", Xc, Q).flatten(-2)

    def to_eigenbasis(self, V: Tensor) -> Tensor:
        """``Q_G^T V Q_A`` for ``V [d_out, D]``."""
        return self.rotate_in(self.curvature.eig_G.vectors.T @ V)

    def from_eigenbasis(self, V: Tensor) -> Tensor:
        """``Q_G V Q_A^T`` for ``V [d_out, D]``."""
        return self.rotate_in(self.curvature.eig_G.vectors @ V, back=True)

    def intra_batch(self, batch: Batch) -> Tensor:
        """``s = mean_n (Q_G^T G_n Q_A)^2`` from the per-example gradients of ``batch``."""
        a = self.rotate_in(batch.a)
        g = batch.g @ self.curvature.eig_G.vectors
        return per_example_sq(a, g.unsqueeze(0)) / batch.B
