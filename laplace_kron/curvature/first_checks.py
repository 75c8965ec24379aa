"""The checks a fit runs once, on the first data of its first batch, before accumulating.

With one random output vector that is zero outside the first datum and one backward pass:

* the layers captured by parameter use, and module-hooked linear layers / convolutions (whose
  weight may also be used outside the module's call, which hooks cannot see), must account for
  their parameters' whole gradient, and nothing may reach other data
  (:func:`~laplace_kron.curvature.uses.check_uses`);
* the diagonal blocks' recognised uses are verified against a batch-of-one pass
  (:meth:`~laplace_kron.curvature.diag_sums.DiagonalSums.verify`).

They run on the first two data (a forward and a backward pass of two data, not of the batch); if
they fail, again on the whole batch, so that a message names the batch's own values and shapes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager, nullcontext

import torch
from torch import Tensor

from .batches import FitBatch, fit_batch_size, group_by_datum
from .capture import Capture, LayerSpec
from .diag_sums import DiagonalSums
from .uses import check_uses

__all__ = ["batch_size", "first_checks", "recording"]

Forward = Callable[[object, object], FitBatch]


def recording(diag: DiagonalSums | None) -> AbstractContextManager:
    """Record the diagonal blocks' uses during a forward pass (nothing without them)."""
    return nullcontext() if diag is None else diag.recording()


def first_checks(specs: list[LayerSpec], forward: Forward, diag: DiagonalSums | None, x, y) -> None:
    """Run the checks on the first two data of the batch ``(x, y)``, and on the whole batch
    when they fail there (``forward(x, y)``: the fit's checked forward pass)."""
    try:
        _checks(specs, forward, diag, *_first_data(x, y, 2))
    except ValueError:  # said again of the whole batch (its values, its shapes)
        _checks(specs, forward, diag, x, y)


def _checks(specs: list[LayerSpec], forward: Forward, diag: DiagonalSums | None, x, y) -> None:
    checked = [s for s in specs if s.by_use or (s.groups == 1 and not s.transposed)]
    with Capture(specs, batch_size(x, y)) as cap:
        with recording(diag):
            b = forward(x, y)
        state, dtens = ((), []) if diag is None else diag.verify_tensors(b)
        pairs = [_weight_bias(s) for s in checked]
        wanted = [t for pair in pairs for t in pair if t is not None and t.requires_grad]
        if not checked and not dtens:
            if diag is not None:
                diag.verify(cap, b, x, None, (), [])
            return
        gen = torch.Generator(device=b.f.device).manual_seed(0)
        v = torch.randn(b.f.shape, generator=gen, dtype=b.f.dtype, device=b.f.device)
        v[b.f.shape[0] // b.num_data :] = 0  # the first data point only: see check_uses
        grads = next(cap.iter_output_gradients(b.f, v.unsqueeze(0), True, wanted + dtens))
        got = grads.pop() if wanted or dtens else []
        if diag is not None:
            diag.verify(cap, b, x, v, state, got[len(wanted) :])
        if not checked:
            return
        by_id = {id(t): g for t, g in zip(wanted, got, strict=False)}
        params = [(by_id.get(id(w)), by_id.get(id(bias))) for w, bias in pairs]
        index = [specs.index(s) for s in checked]
        with torch.no_grad():
            N = b.num_data
            gs = [group_by_datum(grads[li], N, s.name, 1) for li, s in zip(index, checked)]
            a = [group_by_datum(cap.layer_inputs(s), N, s.name) for s in checked]
            check_uses(checked, gs, a, params)


def batch_size(x, y) -> int | None:
    """``N`` of a batch for the capture, ``None`` if the batch is malformed (the checked forward
    then names the problem)."""
    try:
        return fit_batch_size(x, y)
    except (ValueError, TypeError, AttributeError):
        return None


def _first_data(x, y, n: int):
    """The first ``n`` data of a batch ``(x, y)`` (tensors whose leading dimension is the batch's
    ``N`` are sliced, others kept; targets flattened as ``[N R, ...]`` keep ``n R`` rows); the
    whole batch when its size cannot be told."""
    N = batch_size(x, y)
    if N is None or N <= n or not isinstance(y, Tensor) or y.ndim == 0 or y.shape[0] % N:
        return x, y
    if isinstance(x, Mapping):
        xs = {
            k: v[:n] if isinstance(v, Tensor) and v.ndim and v.shape[0] == N else v
            for k, v in x.items()
        }
    elif isinstance(x, Tensor):
        xs = x[:n]
    else:
        return x, y
    return xs, y[: n * (y.shape[0] // N)]


def _weight_bias(spec: LayerSpec) -> tuple[Tensor | None, Tensor | None]:
    """The covered weight and bias tensors of a layer (``None`` where not covered)."""
    if spec.by_use:
        return spec.weight, spec.bias
    m = spec.module
    return (m.weight if spec.has_weight else None), (m.bias if spec.has_bias else None)
