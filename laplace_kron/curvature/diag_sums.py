"""The diagonal blocks' squared-gradient sums of a KFAC fit, by the cheapest exact path.

``D_sum += sum_{n,k} grad_{n,k}^2`` per diagonal-block parameter, ``grad_{n,k}`` the gradient of
output-gradient vector ``k`` applied to datum ``n``'s outputs. Two paths give the same numbers:

* from the fit's own backward pass (:class:`~laplace_kron.curvature.diag_uses.FastDiagonal`):
  for parameters whose every use is recognised, verified on the first batch;
* a separate per-example pass (:class:`~laplace_kron.curvature.diagonal.DiagonalGradients`):
  for all others, and for the exact Fisher of data with several output rows (whose GGN diagonal
  needs each row's gradient separately).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from .batches import FitBatch, to_device
from .capture import Capture
from .diag_uses import FastDiagonal
from .diagonal import DiagonalGradients, example_cotangents, slice_examples
from .options import CurvatureOptions

__all__ = ["DiagonalSums"]


class DiagonalSums:
    """Routes each diagonal-block parameter of ``names`` to one of the two paths."""

    def __init__(self, model: nn.Module, names: list[str], options: CurvatureOptions):
        self.model, self.names, self.options = model, list(names), options
        named = dict(model.named_parameters())
        self.fast = FastDiagonal({n: named[n] for n in self.names})
        self._vmapped: dict[tuple[str, ...], DiagonalGradients] = {}

    @contextmanager
    def recording(self) -> Iterator[None]:
        """Record the recognised uses during the fit's forward pass."""
        self.fast.begin()
        with self.fast.rec:
            yield

    @contextmanager
    def _quiet(self, cap: Capture) -> Iterator[None]:
        """No recording during the separate per-example passes."""
        with cap.paused():
            self.fast.rec.paused = True
            try:
                yield
            finally:
                self.fast.rec.paused = False

    def _gradients(self, names: list[str], vectorize: bool = True) -> DiagonalGradients:
        key = (tuple(names), vectorize)
        if key not in self._vmapped:
            shift = self.options.shift_labels
            grads = DiagonalGradients(self.model, names, vectorize=vectorize, shift_labels=shift)
            self._vmapped[key] = grads
        return self._vmapped[key]

    def vmapped_sums(
        self, cap: Capture, x, vectors: Tensor, num_data: int, exclude: list[str]
    ) -> dict[str, Tensor]:
        """Sums of the parameters not in ``exclude`` for vectors ``[K, M, C]`` over the ``M``
        output rows (``M / N`` per datum), by the per-example pass."""
        names = [n for n in self.names if n not in exclude]
        if not names:
            return {}
        diag = self._gradients(names)
        diag.check_mode()
        exact = self.options.fisher == "exact"
        per_datum = example_cotangents(vectors.detach(), num_data, separate_rows=exact)
        with self._quiet(cap):
            return diag.squared_sums(to_device(x, per_datum.device), per_datum)

    def uses_fast_path(self, b: FitBatch) -> bool:
        """Not for the exact Fisher with several output rows per datum (its GGN diagonal needs
        each row's gradient separately)."""
        return not (self.options.fisher == "exact" and b.f.shape[0] > b.num_data)

    def fast_names(self, b: FitBatch) -> list[str]:
        """The parameters whose sums come from the fit's backward pass for this batch: the
        verified ones (:meth:`verify`) whose uses in this batch are all recognised."""
        if not self.uses_fast_path(b):
            return []
        ok = set(self.fast.candidates(b.num_data))
        return [n for n in self.fast.names if n in ok]

    def verify_tensors(self, b: FitBatch) -> tuple[tuple, list[Tensor]]:
        """What :meth:`verify` needs the gradients of, for one backward pass of the first
        batch's checks: ``(state, tensors)``."""
        if not self.uses_fast_path(b):
            return (), []
        cands, uses, tensors = self.fast.verify_tensors(b.num_data)
        return (cands, uses), tensors

    def verify(
        self, cap: Capture, b: FitBatch, x, v: Tensor | None, state: tuple, got: list
    ) -> None:
        """Check the recorded uses' per-example gradients for the output vector ``v`` (zero
        outside the first datum) against a batch-of-one pass of that datum and the batch
        gradient (``got``: the gradients of :meth:`verify_tensors`); failures keep the
        per-example pass."""
        if len(state) != 2:
            self.fast.names = []
            return
        x = to_device(x, b.f.device)
        cot = example_cotangents(v.unsqueeze(0), b.num_data, separate_rows=False)

        def reference(names: list[str], lo: int, hi: int) -> dict[str, Tensor]:
            parts: dict[str, list[Tensor]] = {n: [] for n in names}
            with self._quiet(cap):
                diag = self._gradients(names, vectorize=False)
                for _, grads in diag.per_example(slice_examples(x, lo, hi), cot[:, lo:hi]):
                    for n, g in grads.items():
                        parts[n].append(g[:, 0].detach())
            return {n: torch.cat(p) for n, p in parts.items()}

        tol = 1e-8 if b.f.dtype == torch.float64 else 1e-4
        cands, uses = state
        self.fast.verify(cands, uses, got, b.num_data, reference, tol)
