"""The one place that handles batches: for fitting (KFAC, EKFAC, the diagonal), predicting and
continual learning.

**Batches.** A fit batch is a pair ``(inputs, targets)`` or any ``collections.abc.Mapping`` (a
dict, ``UserDict``, Hugging Face ``BatchEncoding``) holding the targets under ``target_key``
(default ``"labels"``); the other entries are the inputs. Inputs are a tensor or a mapping.

**How inputs reach the model** (:func:`model_arguments`): a tensor as ``model(x)``; a mapping as
``model(**x)`` when ``model.forward`` takes ``**kwargs`` or every key names one of its
parameters, else as one argument ``model(x)`` when ``forward`` takes one positional argument
and no key names one of its parameters, else it is refused (naming the keys and the parameters).

**Outputs** (:func:`model_output`): a tensor, a tuple / list (its first element), an object with a
``logits`` tensor (Hugging Face ``ModelOutput``) or a mapping with ``"logits"``. The leading
dimension is the number of data points ``N`` (that of the inputs); an output with ``N * R``
leading rows (a model that flattens ``[N, T, C]`` to ``[N*T, C]``) is read as ``[N, R, ...]``
(the rows of a datum must be contiguous, as a reshape gives); any other leading size is refused.

**Padding.** An ``attention_mask [N, T]`` in the inputs marks padded positions (0): see
:mod:`~laplace_kron.curvature.accumulate`.

Everything here checks what it is given and names the batch and the fix: NaN / Inf in inputs or
targets, an output that is not understood, NaN / Inf produced inside the network (finite inputs,
non-finite output), an output whose leading dimension does not fit the number of data points, and
a model left in train mode with dropout or batch-norm (a warning).
"""

from __future__ import annotations

import inspect
import math
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .likelihoods import prepare_targets

__all__ = [
    "ATTENTION_MASK_KEY",
    "BatchSizeFn",
    "FitBatch",
    "Inputs",
    "STOCHASTIC_LAYERS",
    "check_finite_inputs",
    "check_finite_targets",
    "check_inputs",
    "checked_forward",
    "fingerprint",
    "fit_batch_size",
    "forward_batch",
    "group_by_datum",
    "mask_padding",
    "input_batch_size",
    "input_tensors",
    "is_empty",
    "iter_batches",
    "model_arguments",
    "model_output",
    "num_targets",
    "prediction_inputs",
    "same_fingerprint",
    "slice_inputs",
    "to_device",
    "warn_if_train_mode",
]

Inputs = Tensor | Mapping[str, Any]
BatchSizeFn = Callable[[Any], int]
# The inputs' entry that marks padded positions (0) of a sequence batch [N, T].
ATTENTION_MASK_KEY = "attention_mask"

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
    data: Iterable, progress: bool = False, desc: str | None = None, target_key: str = "labels"
) -> Iterator[tuple[int, Any, Any]]:
    """``(i, inputs, targets)`` for every batch of ``data`` (a tqdm bar when ``progress``).

    A batch is an ``(inputs, targets)`` pair or a mapping holding the targets under
    ``target_key`` (the inputs are then the other entries, as a dict); anything else, and a
    mapping without ``target_key``, is a ``ValueError`` naming the batch and the fix."""
    try:
        total = len(data)  # type: ignore[arg-type]
    except TypeError:
        total = None
    it = tqdm(data, total=total, desc=desc, disable=not progress, leave=False)
    for i, batch in enumerate(it):
        if isinstance(batch, Mapping):
            if target_key not in batch:
                raise ValueError(
                    f"batch {i}: the batch mapping has no targets under target_key={target_key!r} "
                    f"(its keys: {', '.join(map(repr, batch))}); pass target_key=<the key of the "
                    "targets> (a curvature option) or yield (inputs, targets) pairs"
                )
            yield i, {k: v for k, v in batch.items() if k != target_key}, batch[target_key]
            continue
        if not isinstance(batch, (tuple, list)) or len(batch) != 2:
            raise ValueError(
                f"batch {i}: data must yield (inputs, targets) pairs or mappings holding the "
                f"targets under target_key={target_key!r}, got {type(batch).__name__}"
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


def _forward_parameters(model: Callable) -> list[inspect.Parameter] | None:
    """The parameters of ``model.forward`` (or of a plain callable); ``None`` if unknown."""
    fn = model.forward if isinstance(model, nn.Module) else model
    try:
        return list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return None


def model_arguments(model: Callable, x: Inputs) -> tuple[tuple, dict[str, Any]]:
    """``(args, kwargs)`` with which inputs ``x`` reach ``model`` (the rule of the module
    docstring): a tensor as ``model(x)``; a mapping as ``model(**x)`` when ``forward`` takes
    ``**kwargs`` or has a parameter for every key (or cannot be inspected), else as ``model(x)``
    when ``forward`` takes one positional argument and no key names a parameter; otherwise a
    ``TypeError``."""
    if not isinstance(x, Mapping):
        return (x,), {}
    params = _forward_parameters(model)
    if params is None:
        return (), dict(x)
    kinds = inspect.Parameter
    if any(p.kind == kinds.VAR_KEYWORD for p in params):
        return (), dict(x)
    named = {p.name for p in params if p.kind in (kinds.POSITIONAL_OR_KEYWORD, kinds.KEYWORD_ONLY)}
    if set(x) <= named:
        return (), dict(x)
    positional = [
        p
        for p in params
        if p.kind in (kinds.POSITIONAL_ONLY, kinds.POSITIONAL_OR_KEYWORD, kinds.VAR_POSITIONAL)
    ]
    required = [p for p in positional if p.default is p.empty and p.kind != kinds.VAR_POSITIONAL]
    # Some keys name parameters but not all: a keyword call with stray keys, never one argument.
    if positional and len(required) <= 1 and not set(x) & named:
        return (x,), {}
    raise TypeError(
        f"the input mapping has keys {sorted(map(str, x))} but the model's forward takes "
        f"({', '.join(p.name for p in params)}): a mapping is passed as model(**inputs) when "
        "forward has a parameter for every key (or **kwargs), or as model(inputs) when forward "
        "takes one argument and no key names a parameter; drop or rename the keys or wrap the model"
    )


def model_output(out: Any) -> Tensor:
    """The output tensor of a model's return value: a tensor, the ``logits`` of an object or a
    mapping (Hugging Face ``ModelOutput``), or the first element of a tuple / list."""
    if isinstance(out, Tensor):
        return out
    logits = out.get("logits") if isinstance(out, Mapping) else getattr(out, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
        return out[0]
    raise TypeError(
        f"the model must return a tensor, a tuple / list whose first element is the output "
        f"tensor, or an object or mapping with a 'logits' tensor; got {type(out).__name__}. Wrap "
        "the model so that it returns the logits / outputs"
    )


def checked_forward(
    model: Callable, x: Inputs, num_data: int | None = None, i: int | None = None
) -> Tensor:
    """``f = model(x)`` (:func:`model_arguments`, :func:`model_output`), checked: finite (inputs
    are checked by the caller, so NaN / Inf here was produced inside the network) and, when
    ``num_data`` (``N``) is given, ``[N, ...]``: an output with ``N * R`` leading rows is
    returned as ``[N, R, ...]`` (a model that flattens its positions into the batch axis)."""
    args, kwargs = model_arguments(model, x)
    f = model_output(model(*args, **kwargs))
    if num_data is not None and (f.ndim == 0 or f.shape[0] != num_data):
        rows = f.shape[0] if f.ndim else 0
        if num_data < 1 or rows < num_data or rows % num_data:
            raise ValueError(
                f"the model output has shape {tuple(f.shape)} but the inputs hold {num_data} data "
                "points; its leading dimension must be the number of data points, or a multiple of "
                "it (a model that flattens [N, T, C] outputs to [N*T, C]). Pass batch_size_fn= if "
                "the batch size is not the leading input dimension"
            )
        f = f.unflatten(0, (num_data, rows // num_data))
    if not torch.isfinite(f).all():
        raise ValueError(
            f"{_where(i)}the network output contains NaN or Inf although the inputs are "
            "finite (NaN produced inside the network); check the weights and the forward pass"
        )
    return f


def fit_batch_size(x: Inputs, y: Any) -> int:
    """``N`` of a fit batch: the leading dimension of the inputs (for a mapping the common one;
    if its tensors disagree, the targets' leading dimension when it is one of them)."""
    if isinstance(x, Mapping):
        sizes = {t.shape[0] for t in input_tensors(x) if t.ndim > 0}
        if len(sizes) > 1 and isinstance(y, Tensor) and y.ndim and y.shape[0] in sizes:
            return int(y.shape[0])
        if len(sizes) != 1:
            raise ValueError(
                f"cannot tell the number of data points of an input mapping whose tensors have "
                f"leading dimensions {sorted(sizes)}; give every per-example entry the batch as "
                "its leading dimension"
            )
        return int(sizes.pop())
    if isinstance(x, Tensor) and x.ndim:
        return int(x.shape[0])
    return num_targets(y)


@dataclass
class FitBatch:
    """One fit batch after the checked forward, in the likelihood's canonical shapes.

    ``f [M, C]`` output rows (a differentiable view of the output, ``R`` rows per datum),
    ``y`` and ``keep`` as :func:`~laplace_kron.curvature.likelihoods.prepare_targets` returns
    them, ``num_data`` ``N``, ``positions`` the float ``attention_mask [N, T]`` or ``None``."""

    f: Tensor
    y: Tensor
    keep: Tensor | None
    num_data: int
    positions: Tensor | None

    def observed(self) -> int:
        """Number of observed scalar targets (for the Gaussian evidence)."""
        if self.keep is None:
            return self.f.numel()
        return int(self.keep.sum()) * (self.f.shape[1] // self.keep.shape[1])


def attention_positions(x: Inputs, num_data: int, device: torch.device) -> Tensor | None:
    """The inputs' ``attention_mask [N, T]`` as a float 0/1 tensor on ``device``; ``None`` if
    there is none or nothing is masked. Anything but a 0/1 ``[N, T]`` tensor is refused."""
    m = x.get(ATTENTION_MASK_KEY) if isinstance(x, Mapping) else None
    if m is None:
        return None
    if not isinstance(m, Tensor) or m.ndim != 2 or m.shape[0] != num_data:
        shape = tuple(m.shape) if isinstance(m, Tensor) else type(m).__name__
        raise ValueError(
            f"{ATTENTION_MASK_KEY} must be a [batch, positions] tensor with the batch's {num_data} "
            f"rows, got {shape}"
        )
    if not torch.all((m == 0) | (m == 1)):
        raise ValueError(f"{ATTENTION_MASK_KEY} must hold 0 (padding) and 1 (tokens) only")
    if bool(m.all()):
        return None
    return m.to(device=device, dtype=torch.float64)


def group_by_datum(t: Tensor, num_data: int, layer: str, lead: int = 0) -> Tensor:
    """A layer's inputs ``[B', T, d]`` (``lead = 0``) or output-gradients ``[K, B', T, d]``
    (``lead = 1``) as ``[..., N, B' T / N, d]``: a layer that sees ``B' = N R`` rows (the
    positions flattened into the batch axis) has ``R T`` positions per datum (rows of a datum
    contiguous). ``B'`` not a multiple of ``N`` is refused."""
    rows = t.shape[lead]
    if rows == num_data:
        return t
    if rows % num_data:
        raise ValueError(
            f"layer {layer!r} sees {rows} rows for a batch of {num_data} data points; its leading "
            "dimension must be the number of data points or a multiple of it (positions flattened "
            "into the batch axis)"
        )
    return t.reshape(*t.shape[:lead], num_data, -1, t.shape[-1])


def mask_padding(g: Tensor, positions: Tensor | None) -> Tensor:
    """Output-gradients ``[K, N, T, d]`` with padded positions (``positions [N, T]`` = 0) zeroed;
    unchanged when nothing is padded or the layer's ``T`` is not the mask's length."""
    if positions is None or g.shape[2] != positions.shape[1]:
        return g
    return g * positions.to(g.dtype)[None, :, :, None]


def forward_batch(
    model: nn.Module,
    x: Inputs,
    y: Any,
    likelihood: str,
    device: torch.device,
    i: int = 0,
    *,
    ignore_index: int = -100,
    shift_labels: bool = False,
) -> FitBatch:
    """The checked forward of one fit batch: finite inputs and targets, both moved to ``device``,
    ``f = model(x)`` checked (``[N, ...]``, ``N`` from the inputs), then outputs and targets in
    the likelihood's canonical shapes with the observed-target weights
    (:func:`~laplace_kron.curvature.likelihoods.prepare_targets`)."""
    check_finite_inputs(x, i)
    check_finite_targets(y, i)
    if not isinstance(y, Tensor):
        raise TypeError(f"targets must be a torch.Tensor, got {type(y).__name__}")
    N = fit_batch_size(x, y)
    xd = to_device(x, device)
    positions = attention_positions(xd, N, device)
    f = checked_forward(model, xd, N, i=i)
    if y.ndim and y.shape[0] != N and y.shape[0] % N == 0 and f.shape[:2].numel() == y.shape[0]:
        y = y.unflatten(0, (N, -1))  # flattened [N*T] targets of flattened [N*T, C] outputs
    fc, yc, keep = prepare_targets(
        f, y.to(device), likelihood, ignore_index, shift_labels, positions
    )
    pos = None if positions is None else positions.to(fc.dtype)
    return FitBatch(fc, yc, keep, N, pos)


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
def prediction_inputs(x: Inputs, target_key: str = "labels") -> Inputs:
    """Inputs to predict on (:func:`check_inputs`); a mapping loses its ``target_key`` entry."""
    check_inputs(x)
    if isinstance(x, Mapping) and target_key in x:
        x = {k: v for k, v in x.items() if k != target_key}
        check_inputs(x)
    return x


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
