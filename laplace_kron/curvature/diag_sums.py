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
        self._checked = False
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

    def fast_names(self, cap: Capture, b: FitBatch, x) -> list[str]:
        """The parameters whose sums come from the fit's backward pass for this batch: none for
        the exact Fisher with several output rows per datum; verified on the first batch."""
        N = b.num_data
        if self.options.fisher == "exact" and b.f.shape[0] > N:
            return []
        if not self._checked:
            self._checked = True
            self._verify(cap, b, x)
        ok = set(self.fast.candidates(N))
        return [n for n in self.fast.names if n in ok]

    def _verify(self, cap: Capture, b: FitBatch, x) -> None:
        """Check the recorded uses' per-example gradients against a batch-of-one pass (one
        datum) and the batch gradient, for one random output vector; failures keep the
        per-example pass."""
        gen = torch.Generator(device=b.f.device).manual_seed(1)
        v = torch.randn(b.f.shape, generator=gen, dtype=b.f.dtype, device=b.f.device)
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

        self.fast.verify(b.f, v, b.num_data, reference)
