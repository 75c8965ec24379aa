"""Per-example Jacobians of the diagonal blocks for the GLM predictive.

``J_n [C, P]``: datum ``n``'s ``C`` outputs differentiated w.r.t. the diagonal-block parameters
(``P`` of them), by one of two paths that give the same numbers:

* from the chunk's own backward pass (:class:`DiagJacobians` with recorded uses): the uses of the
  parameters or of affine images of them (``F.linear``, ``F.embedding``, layer / RMS norm,
  broadcast scale and shift; :mod:`~laplace_kron.curvature.diag_uses`) and their
  output-gradients ``[C, b, ...]`` for the ``C`` output vectors give every ``J_n`` of the chunk in
  closed form, one batched product per use. Taken when every use of every
  diagonal parameter is recognised; verified once, on the first chunk, against batch-of-one
  passes of its first two inputs (a failure keeps the other path for the whole pass);
* per-example passes (:class:`~laplace_kron.curvature.diagonal.DiagonalGradients`: ``vmap`` over
  examples, or one forward pass per example when the model cannot be vmapped, as Hugging Face
  models that build attention masks with data-dependent control flow).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import replace

import torch
from torch import Tensor, nn

from .curvature.batches import Inputs, slice_inputs
from .curvature.diag_uses import DiagUse, FastDiagonal
from .curvature.diagonal import DiagonalGradients

__all__ = ["DiagJacobians", "FastState"]

# The recorded uses of a chunk and their output-gradients ``[C, b, ...]`` (one per use).
FastState = tuple[list[DiagUse], list[Tensor]]


class DiagJacobians:
    """Per-example Jacobians of the diagonal-block parameters ``names`` of ``model``.

    Per chunk: run its forward pass in :meth:`recording`, backpropagate the ``C`` output vectors
    to :meth:`uses`' outputs as well, hand their gradients to :meth:`state`, then iterate
    :meth:`jacobians`. ``chunk_size`` bounds the elements of the Jacobians held at once.
    """

    def __init__(
        self,
        model: nn.Module,
        names: list[str],
        chunk_size: int,
        vectorize: bool,
        dtype: torch.dtype,
        device: torch.device,
    ):
        self.model, self.names, self.chunk_size = model, list(names), chunk_size
        self.dtype, self.device = dtype, device  # of the output vectors (the blocks')
        self.grads = DiagonalGradients(model, self.names, chunk_size, vectorize)
        self.n_params = self.grads.n_params
        named = dict(model.named_parameters())
        self.fast = FastDiagonal({n: named[n] for n in self.names}) if self.names else None
        # None: not yet verified; then whether the recorded uses gave the reference Jacobians.
        self.verified: bool | None = None

    def _trying(self) -> bool:
        return self.fast is not None and self.verified is not False

    @contextmanager
    def recording(self) -> Iterator[None]:
        """Record the parameters' uses during a chunk's forward pass (while the path is open)."""
        if not self._trying():
            with nullcontext():
                yield
            return
        self.fast.begin()
        with self.fast.rec:
            yield

    def uses(self, b: int) -> list[DiagUse]:
        """The chunk's recorded uses (``b`` data) to backpropagate to; empty when some use of a
        parameter was not recognised (the chunk then takes the per-example path)."""
        if not self._trying() or set(self.fast.candidates(b)) != set(self.names):
            return []
        return self.fast.uses(b, self.names)

    def state(self, x: Inputs, b: int, uses: list[DiagUse], dys: list[Tensor]) -> FastState | None:
        """The chunk's state for :meth:`jacobians` (``dys``: the uses' output-gradients
        ``[C, b, ...]``); verifies the path on the first chunk that takes it."""
        if not uses:
            return None
        # Without their outputs: those hold the chunk's autograd graph, which the closed forms
        # do not need (a caller keeping every chunk, as the joint covariance does, would keep
        # every graph).
        state = ([replace(u, output=None) for u in uses], dys)
        if self.verified is None:
            self.verified = self._verify(x, b, state)
        return state if self.verified else None

    def jacobians(
        self, x: Inputs, b: int, C: int, state: FastState | None
    ) -> Iterator[tuple[int, dict[str, Tensor]]]:
        """``(start, {name: J [b', C, numel]})`` per sub-chunk of the chunk's ``b`` inputs
        ``x`` with ``C`` outputs each; ``state`` from :meth:`state` (``None``: per-example
        passes)."""
        if state is None:
            eye = torch.eye(C, dtype=self.dtype, device=self.device)
            for start, jac in self.grads.per_example(x, eye.unsqueeze(1).expand(C, b, C)):
                with torch.no_grad():
                    yield start, {n: jac[n].flatten(2) for n in self.names}
            return
        step = max(1, self.chunk_size // max(1, C * self.n_params))
        for lo in range(0, b, step):
            yield lo, self._closed_form(state, lo, min(b, lo + step), C)

    def _closed_form(self, state: FastState, lo: int, hi: int, C: int) -> dict[str, Tensor]:
        uses, dys = state
        with torch.no_grad():
            grads = self.fast.example_jacobians(uses, dys, lo, hi, self.names)
            J = {}
            for n in self.names:  # [C, b', *shape] -> [b', C, numel]
                g = grads.get(n)
                numel = self.fast.shapes[n].numel()
                J[n] = (
                    dys[0].new_zeros(hi - lo, C, numel)
                    if g is None
                    else g.reshape(C, hi - lo, numel).transpose(0, 1)
                )
        return J

    def _verify(self, x: Inputs, b: int, state: FastState) -> bool:
        """The closed forms of the first (up to) two inputs against batch-of-one passes."""
        C = state[1][0].shape[0]
        n = min(2, b)
        got = self._closed_form(state, 0, n, C)
        ref = DiagonalGradients(self.model, self.names, self.chunk_size, vectorize=False)
        eye = torch.eye(C, dtype=self.dtype, device=self.device).unsqueeze(1)
        low = min(p.dtype.itemsize for p in self.fast.params.values())
        tol = 1e-8 if low >= 8 else 1e-4
        for i in range(n):
            for _, jac in ref.per_example(slice_inputs(x, i, i + 1, b), eye):
                for name in self.names:
                    want, have = jac[name].flatten(2)[0], got[name][i]
                    scale = max(float(want.abs().max()), float(have.abs().max()), 1e-30)
                    if float((want - have.to(want.dtype)).abs().max()) > tol * scale:
                        return False
        return True
