"""The one place that handles batches: for fitting (KFAC, EKFAC, the diagonal), predicting and
continual learning.

A fit batch is a pair ``(inputs, targets)``; inputs are a tensor or a mapping of tensors (e.g. a
tokenizer batch, passed to the model as one argument), targets a tensor. Everything here checks
what it is given and names the batch and the fix: NaN / Inf in inputs or targets, a model that
does not return a tensor, NaN / Inf produced inside the network (finite inputs, non-finite
output), an output whose leading dimension is not the number of data points, and a model left in
train mode with dropout or batch-norm (a warning).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .likelihoods import prepare_targets

__all__ = [
    "BatchSizeFn",
    "Inputs",
    "STOCHASTIC_LAYERS",
    "check_finite_inputs",
    "check_finite_targets",
    "check_inputs",
    "checked_forward",
    "fingerprint",
    "forward_batch",
    "input_batch_size",
    "input_tensors",
    "is_empty",
    "iter_batches",
    "num_targets",
    "same_fingerprint",
    "slice_inputs",
    "to_device",
    "warn_if_train_mode",
]

Inputs = Tensor | Mapping[str, Any]
BatchSizeFn = Callable[[Any], int]

# Layers whose train-mode output is random (dropout) or depends on the batch (batch-norm); public
# torch classes only (the lazy variants become the plain ones once materialised).
STOCHASTIC_LAYERS: tuple[type[nn.Module], ...] = (
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.FeatureAlphaDropout,
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.LazyBatchNorm1d,
    nn.LazyBatchNorm2d,
    nn.LazyBatchNorm3d,
    nn.SyncBatchNorm,
)
_TRAIN_MODE_EFFECT = {
    "fitting": "the curvature will be noisy and batch-dependent",
    "predicting": "predictions will be stochastic",
}


# --------------------------------------------------------------------------------- model mode
def warn_if_train_mode(model: nn.Module, what: str, stacklevel: int = 2) -> None:
    """Warn if ``model`` has dropout / batch-norm layers in train mode.

    ``what``: ``"fitting"`` or ``"predicting"`` (names the consequence and the fix);
    ``stacklevel`` counts from the caller of this function, as in :func:`warnings.warn`.
    """
    stochastic = [
        n for n, m in model.named_modules() if m.training and isinstance(m, STOCHASTIC_LAYERS)
    ]
    if stochastic:
        effect = _TRAIN_MODE_EFFECT.get(what, f"{what} will depend on the batch")
        warnings.warn(
            f"model is in train mode with dropout/batch-norm layers ({', '.join(stochastic[:5])}); "
            f"{effect}. Call model.eval() before {what}.",
            stacklevel=stacklevel + 1,
        )


# --------------------------------------------------------------------------------- fit batches
def iter_batches(
    data: Iterable, progress: bool = False, desc: str | None = None
) -> Iterator[tuple[int, Any, Any]]:
    """``(i, inputs, targets)`` for every batch of ``data`` (a tqdm bar when ``progress``);
    anything that is not an ``(inputs, targets)`` pair is a ``ValueError`` naming the batch."""
    try:
        total = len(data)  # type: ignore[arg-type]
    except TypeError:
        total = None
    it = tqdm(data, total=total, desc=desc, disable=not progress, leave=False)
    for i, batch in enumerate(it):
        if not isinstance(batch, (tuple, list)) or len(batch) != 2:
            raise ValueError(
                f"batch {i}: data must yield (inputs, targets) pairs, got {type(batch).__name__}"
                + (f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else "")
            )
        yield i, batch[0], batch[1]


def _where(i: int | None) -> str:
    return "" if i is None else f"batch {i}: "


def input_tensors(x: Inputs) -> list[Tensor]:
    """The tensors of inputs ``x`` (a tensor, or the tensor values of a mapping)."""
    return [v for v in x.values() if isinstance(v, Tensor)] if isinstance(x, Mapping) else [x]


def check_finite_inputs(x: Any, i: int | None = None) -> None:
    """``ValueError`` if a floating-point input tensor holds NaN or Inf (``i``: batch index)."""
    for t in input_tensors(x) if isinstance(x, (Tensor, Mapping)) else []:
        if isinstance(t, Tensor) and t.is_floating_point() and not torch.isfinite(t).all():
            raise ValueError(f"{_where(i)}inputs contain NaN or Inf; clean or impute the data")


def check_finite_targets(y: Any, i: int | None = None) -> None:
    """``ValueError`` if floating-point targets hold NaN or Inf (``i``: batch index)."""
    if isinstance(y, Tensor) and y.is_floating_point() and not torch.isfinite(y).all():
        raise ValueError(f"{_where(i)}targets contain NaN or Inf; drop or impute those data points")


def is_empty(y: Any) -> bool:
    """Whether targets ``y`` hold no data points (such a batch adds nothing)."""
    return isinstance(y, Tensor) and y.ndim > 0 and y.shape[0] == 0


def num_targets(y: Any) -> int:
    """Number of data points of targets ``y`` (leading dimension, or ``len``)."""
    return int(y.shape[0]) if isinstance(y, Tensor) and y.ndim else len(y)


def to_device(x: Inputs, device: torch.device | str) -> Inputs:
    """Inputs moved to ``device``: a tensor, or a mapping whose tensor values are moved."""
    if isinstance(x, Tensor):
        return x.to(device)
    if isinstance(x, Mapping):
        return {k: (v.to(device) if isinstance(v, Tensor) else v) for k, v in x.items()}
    raise TypeError(
        f"inputs must be a torch.Tensor or a mapping of tensors (e.g. a tokenizer batch), got "
        f"{type(x).__name__}"
    )


def checked_forward(
    model: nn.Module, x: Inputs, num_data: int | None = None, i: int | None = None
) -> Tensor:
    """``f = model(x)``, checked: a tensor, finite (inputs are checked by the caller, so NaN / Inf
    here was produced inside the network) and, when ``num_data`` is given, ``[num_data, ...]``."""
    f = model(x)
    if not isinstance(f, Tensor):
        raise TypeError(
            f"the model must return a tensor, got {type(f).__name__}; wrap it so that it returns "
            "the logits / outputs"
        )
    if num_data is not None and (f.ndim == 0 or f.shape[0] != num_data):
        raise ValueError(
            f"the model output has shape {tuple(f.shape)} but the inputs hold {num_data} data "
            "points; pass batch_size_fn= if the batch size is not the leading input dimension"
        )
    if not torch.isfinite(f).all():
        raise ValueError(
            f"{_where(i)}the network output contains NaN or Inf although the inputs are "
            "finite (NaN produced inside the network); check the weights and the forward pass"
        )
    return f


def forward_batch(
    model: nn.Module, x: Inputs, y: Any, likelihood: str, device: torch.device, i: int = 0
) -> tuple[Tensor, Tensor]:
    """The checked forward of one fit batch: finite inputs and targets, both moved to ``device``,
    ``f = model(x)`` checked, then outputs and targets in the likelihood's canonical shapes
    (:func:`~laplace_kron.curvature.likelihoods.prepare_targets`: ``f [B, C]``, ``y [B]`` class
    indices or ``[B, C]`` floats)."""
    check_finite_inputs(x, i)
    check_finite_targets(y, i)
    if not isinstance(y, Tensor):
        raise TypeError(f"targets must be a torch.Tensor, got {type(y).__name__}")
    f = checked_forward(model, to_device(x, device), i=i)
    return prepare_targets(f, y.to(device), likelihood)


def fingerprint(x: Inputs, y: Any) -> list[float]:
    """Sizes and float64 sums of a batch's tensors: tells whether a resumed fit sees the same
    batches in the same order."""
    tensors = [*(input_tensors(x) if isinstance(x, (Tensor, Mapping)) else []), y]
    out = []
    for t in tensors:
        if isinstance(t, Tensor):
            d = t.detach().to(torch.float64)
            out += [float(t.numel()), float(d.sum()), float(d.abs().sum())]
    return out


def same_fingerprint(a: list[float] | None, b: list[float] | None) -> bool:
    """Whether two :func:`fingerprint` results agree (to float64 round-off)."""
    return (
        a is not None
        and b is not None
        and len(a) == len(b)
        and all(math.isclose(u, v, rel_tol=1e-9, abs_tol=1e-12) for u, v in zip(a, b))
    )


# --------------------------------------------------------------------------------- predict inputs
def check_inputs(x: Inputs) -> None:
    """Inputs to predict on: a tensor or a mapping holding tensors, all finite."""
    if not isinstance(x, (Tensor, Mapping)):
        raise TypeError(
            f"inputs must be a torch.Tensor or a mapping of tensors (e.g. a tokenizer batch), got "
            f"{type(x).__name__}"
        )
    if not input_tensors(x):
        raise ValueError("the input mapping contains no tensors")
    check_finite_inputs(x)


def input_batch_size(x: Inputs, batch_size_fn: BatchSizeFn | None = None) -> int:
    """Number of data points in ``x``: ``batch_size_fn(x)``, ``x.shape[0]``, or the common leading
    dimension of a mapping's tensors."""
    if batch_size_fn is not None:
        B = batch_size_fn(x)
        if not isinstance(B, int) or B < 0:
            raise ValueError(f"batch_size_fn must return a non-negative int, got {B!r}")
    elif isinstance(x, Tensor):
        if x.ndim == 0:
            raise ValueError("inputs must have a leading batch dimension, got a 0-d tensor")
        B = x.shape[0]
    else:
        sizes = {t.shape[0] for t in input_tensors(x) if t.ndim > 0}
        if len(sizes) != 1:
            raise ValueError(
                f"cannot infer the batch size of a mapping whose tensors have leading dimensions "
                f"{sorted(sizes)}; pass batch_size_fn=lambda batch: <number of data points>"
            )
        B = sizes.pop()
    if B == 0:
        raise ValueError("the input batch is empty")
    return B


def slice_inputs(x: Inputs, start: int, stop: int, B: int) -> Inputs:
    """Rows ``start:stop`` of ``x`` (mapping: every tensor whose leading dimension is ``B``; the
    mapping's type is kept when it can be built from a dict)."""
    if start == 0 and stop == B:
        return x
    if isinstance(x, Tensor):
        return x[start:stop]
    out = {
        k: (v[start:stop] if isinstance(v, Tensor) and v.ndim > 0 and v.shape[0] == B else v)
        for k, v in x.items()
    }
    if type(x) is dict:
        return out
    try:
        return type(x)(out)
    except TypeError:
        return out
