"""The diagonal GGN / Fisher of the summed negative log-likelihood (EWC's curvature).

    diag H = sum_{n,k} (d (s_k . f(x_n)) / d theta)^2

with ``s_k`` the output-gradient vectors of
:func:`~laplace_kron.curvature.likelihoods.output_gradient_vectors` (the exact diagonal for
``fisher="exact"``, its MC / empirical estimate otherwise). The per-example gradient of a layer's
weight is ``sum_t g_t a_t^T`` (``t``: shared positions), built from the same captured inputs ``a``
and output-gradients ``g`` as KFAC and squared before summing over data; a separate bias gets
``(sum_t g_t)^2``. Parameters outside the supported layers get the same diagonal as the
posterior's diagonal blocks (:class:`~laplace_kron.curvature.diagonal.DiagonalGradients`).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

from .batches import (
    forward_batch,
    group_by_datum,
    is_empty,
    iter_batches,
    mask_padding,
    to_device,
    warn_if_train_mode,
)
from .capture import Capture
from .convs import grouped_sq
from .diagonal import DiagonalGradients, example_cotangents
from .gram import per_example_sq
from .likelihoods import check_likelihood, output_gradient_vectors
from .options import CurvatureOptions
from .selection import select_coverage

__all__ = ["DIAG_CHUNK", "fit_diagonal"]

# Per-example gradients for the diagonal are built in chunks of at most this many entries.
DIAG_CHUNK = 2**23


def fit_diagonal(
    model: nn.Module,
    data: Iterable,
    likelihood: str,
    options: CurvatureOptions | None = None,
    progress: bool = False,
) -> tuple[dict[str, Tensor], int]:
    """Diagonal curvature of ``model`` over ``data`` (``(inputs, targets)`` batches).

    Uses ``options.fisher``, ``mc_samples``, ``separate_bias``, ``modules`` and ``generator`` (MC
    labels; ``None`` draws from torch's global stream). Returns ``(diag, N)``: covered parameter
    name -> diagonal shaped like the parameter, and the number of data points.
    """
    check_likelihood(likelihood)
    options = CurvatureOptions() if options is None else options
    warn_if_train_mode(model, "fitting", stacklevel=2)
    coverage = select_coverage(model, options.modules, options.separate_bias)
    specs = coverage.specs
    named = dict(model.named_parameters())
    device = named[coverage.param_names[0]].device
    others = DiagonalGradients(model, coverage.diag_names, shift_labels=options.shift_labels)
    other_sums: dict[str, Tensor] = {}
    sums: list[Tensor | None] = [None] * len(specs)
    bias_sums: list[Tensor | None] = [None] * len(specs)
    num = 0
    o = options
    for i, x, y in iter_batches(data, progress, "DIAG", o.target_key):
        if is_empty(y):
            continue
        with Capture(specs) as cap:
            b = forward_batch(
                model,
                x,
                y,
                likelihood,
                device,
                i,
                ignore_index=o.ignore_index,
                shift_labels=o.shift_labels,
            )
            S = output_gradient_vectors(b.f, b.y, likelihood, o.fisher, o.mc_samples, o.generator)
            if b.keep is not None:  # unobserved targets add nothing
                S = S * b.keep
            grads = [
                mask_padding(group_by_datum(g, b.num_data, s.name, 1), b.positions)
                for g, s in zip(cap.output_gradients(b.f, S), specs, strict=True)
            ]
            inputs = [group_by_datum(cap.layer_inputs(s), b.num_data, s.name) for s in specs]
            if coverage.diag_names:
                others.check_mode()
                per_datum = example_cotangents(S.detach(), b.num_data, o.fisher == "exact")
                with cap.paused():
                    sq = others.squared_sums(to_device(x, device), per_datum)
                other_sums = {n: v + other_sums[n] if other_sums else v for n, v in sq.items()}
        with torch.no_grad():
            for li, (spec, a, g) in enumerate(zip(specs, inputs, grads)):
                if spec.has_weight and spec.groups > 1:
                    sq = grouped_sq(a, g, spec.groups, DIAG_CHUNK)  # [g, o, i (+1)]
                    sums[li] = sq if sums[li] is None else sums[li] + sq
                elif spec.has_weight:
                    sq = per_example_sq(a, g, DIAG_CHUNK)
                    sums[li] = sq if sums[li] is None else sums[li] + sq
                if spec.has_bias and not spec.joint:
                    sq = (g.sum(dim=2) ** 2).sum(dim=(0, 1))
                    bias_sums[li] = sq if bias_sums[li] is None else bias_sums[li] + sq
        num += b.num_data
    if num == 0:
        raise ValueError("no data was seen: the data iterable is empty")
    diag: dict[str, Tensor] = dict(other_sums)
    for spec, sq, bsq in zip(specs, sums, bias_sums):
        if spec.joint:
            diag[spec.weight_name] = sq[..., :-1].reshape(named[spec.weight_name].shape)
            diag[spec.bias_name] = sq[..., -1].reshape(named[spec.bias_name].shape)
            continue
        if spec.has_weight:
            sq = sq.mT if spec.transposed else sq  # a weight stored [d_in, d_out]
            diag[spec.weight_name] = sq.reshape(named[spec.weight_name].shape)
        if spec.has_bias:
            diag[spec.bias_name] = bsq.reshape(named[spec.bias_name].shape)
    return {n: diag[n] for n in coverage.param_names}, num
