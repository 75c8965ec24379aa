"""Evaluation metrics for classification and regression predictives.

All functions take plain tensors (anything ``torch.as_tensor`` accepts also works) and compute in
float64 on the inputs' device. Scalar metrics are returned as Python floats.

Conventions
-----------
Classification probabilities ``probs`` are either

* ``[N, C]`` with ``C >= 2``: one probability vector per row (rows must sum to 1), or
* ``[N]``: binary probabilities of class 1. Internally these become ``[N, 2] = [1 - p, p]`` for
  accuracy, NLL, calibration and entropy, so the predicted class is ``p > 0.5`` (ties go to class
  0, like ``argmax``) and the confidence is ``max(p, 1 - p)``.

``targets`` are integer class labels ``[N]`` in ``{0, ..., C-1}`` (integral floats and bools are
accepted). Logs are natural (nats).

Regression metrics take a Gaussian predictive ``N(mean, var)`` per output with ``mean``, ``var`` and
``targets`` all ``[N]`` or ``[N, D]`` (``var`` may also be a scalar, e.g. a shared noise variance).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

__all__ = [
    "CalibrationBins",
    "accuracy",
    "brier",
    "calibration_bins",
    "classification_report",
    "confidence",
    "ece",
    "entropy",
    "gaussian_nll",
    "interval_coverage",
    "mce",
    "nll",
    "ood_auroc",
    "regression_calibration_error",
    "rmse",
]

# Tolerance on |sum_c p_c - 1| and on values slightly outside [0, 1] (float32 softmax round-off).
_PROB_TOL = 1e-4


# --------------------------------------------------------------------------------------------------
# Input validation
# --------------------------------------------------------------------------------------------------


_INT_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def _as_float64(x: Any, name: str) -> Tensor:
    if not isinstance(x, Tensor):
        try:
            x = torch.as_tensor(x)
        except (TypeError, ValueError, RuntimeError) as err:
            kind = type(x).__name__
            raise ValueError(f"{name} must be a tensor or array-like, got {kind}") from err
    x = x.detach()
    if x.dtype == torch.bool or not (x.is_floating_point() or x.dtype in _INT_DTYPES):
        raise ValueError(f"{name} must hold real numbers, got dtype {x.dtype}")
    return x.to(torch.float64)


def _check_finite(x: Tensor, name: str) -> None:
    if not torch.isfinite(x).all():
        n_nan = int(torch.isnan(x).sum())
        n_inf = int(torch.isinf(x).sum())
        raise ValueError(
            f"{name} contains {n_nan} NaN and {n_inf} Inf values; remove or fix those entries "
            "(e.g. check for diverged training or a division by zero upstream)"
        )


def _check_probs(probs: Any, name: str = "probs") -> tuple[Tensor, bool]:
    """Validate class probabilities and return them as float64 ``[N, C]`` plus a binary flag."""
    if not isinstance(probs, Tensor):
        try:
            probs = torch.as_tensor(probs)
        except (TypeError, ValueError, RuntimeError) as err:
            raise ValueError(f"{name} must be a tensor of probabilities") from err
    if not probs.is_floating_point():
        raise ValueError(
            f"{name} must be floating-point probabilities, got dtype {probs.dtype}; "
            "pass predicted probabilities, not predicted labels"
        )
    p = _as_float64(probs, name)
    if p.ndim not in (1, 2):
        raise ValueError(
            f"{name} must have shape [N, C] (class probabilities) or [N] (binary probability of "
            f"class 1), got shape {list(p.shape)}"
        )
    if p.shape[0] == 0:
        raise ValueError(f"{name} is empty (N = 0); metrics need at least one prediction")
    if p.ndim == 2 and p.shape[1] < 2:
        raise ValueError(
            f"{name} has shape {list(p.shape)}: a single column is ambiguous; pass binary "
            f"probabilities of class 1 as a 1-D tensor ({name}.squeeze(-1)) or all C >= 2 columns"
        )
    _check_finite(p, name)
    lo, hi = float(p.min()), float(p.max())
    if lo < -_PROB_TOL or hi > 1 + _PROB_TOL:
        raise ValueError(
            f"{name} must lie in [0, 1], got values in [{lo:.4g}, {hi:.4g}]; "
            "did you pass logits? apply torch.softmax(logits, -1) (or torch.sigmoid for binary)"
        )
    p = p.clamp(0.0, 1.0)
    binary = p.ndim == 1
    if binary:
        p = torch.stack([1.0 - p, p], dim=1)
    else:
        err = (p.sum(dim=1) - 1.0).abs()
        if float(err.max()) > _PROB_TOL:
            bad = int((err > _PROB_TOL).sum())
            raise ValueError(
                f"rows of {name} must sum to 1, but {bad} of {p.shape[0]} rows are off by up to "
                f"{float(err.max()):.3g}; did you pass logits or unnormalised scores? "
                "apply torch.softmax(logits, -1)"
            )
    return p, binary


def _check_targets(targets: Any, n: int, n_classes: int, name: str = "targets") -> Tensor:
    """Validate integer class labels ``[N]`` in ``[0, n_classes)`` and return them as int64."""
    if not isinstance(targets, Tensor):
        try:
            targets = torch.as_tensor(targets)
        except (TypeError, ValueError, RuntimeError) as err:
            raise ValueError(f"{name} must be a tensor of class labels") from err
    t = targets.detach()
    if t.ndim == 2 and t.shape[1] == n_classes and t.shape[1] > 1:
        raise ValueError(
            f"{name} has shape {list(t.shape)}, which looks one-hot; pass integer class labels "
            f"of shape [N] ({name}.argmax(-1))"
        )
    if t.ndim != 1:
        raise ValueError(
            f"{name} must be 1-D integer class labels of shape [N] = [{n}], got shape "
            f"{list(t.shape)}" + ("; use .reshape(-1)" if t.numel() == n else "")
        )
    if t.shape[0] != n:
        raise ValueError(
            f"{name} has {t.shape[0]} entries but the predictions have N = {n}; "
            "they must describe the same data points"
        )
    if t.is_floating_point():
        _check_finite(t, name)
        if not torch.equal(t, t.round()):
            raise ValueError(
                f"{name} must be integer class labels, got non-integral floats; "
                "pass labels, not probabilities"
            )
    elif t.is_complex():
        raise ValueError(f"{name} must be integer class labels, got dtype {t.dtype}")
    t = t.to(torch.int64)
    lo, hi = int(t.min()), int(t.max())
    if lo < 0 or hi >= n_classes:
        raise ValueError(
            f"{name} must lie in {{0, ..., {n_classes - 1}}} for {n_classes} classes, got labels "
            f"in [{lo}, {hi}]" + ("; binary targets must be 0/1" if n_classes == 2 else "")
        )
    return t


def _check_cls(probs: Any, targets: Any) -> tuple[Tensor, Tensor, bool]:
    p, binary = _check_probs(probs)
    t = _check_targets(targets, p.shape[0], p.shape[1]).to(p.device)
    return p, t, binary


def _check_n_bins(n_bins: int) -> None:
    if isinstance(n_bins, bool) or not isinstance(n_bins, int) or n_bins < 1:
        raise ValueError(f"n_bins must be a positive integer, got {n_bins!r}")


# --------------------------------------------------------------------------------------------------
# Classification
# --------------------------------------------------------------------------------------------------


def confidence(probs: Tensor) -> Tensor:
    """Max-probability confidence ``max_c p_c``, shape ``[N]`` (binary ``[N]``: ``max(p, 1-p)``)."""
    p, _ = _check_probs(probs)
    return p.max(dim=1).values


def accuracy(probs: Tensor, targets: Tensor) -> float:
    """Fraction of points whose argmax class equals the target: ``mean_n [argmax_c p_nc = y_n]``.

    ``probs``: ``[N, C]`` or binary ``[N]`` (predicts 1 iff ``p > 0.5``); ``targets``: ``[N]``.
    """
    p, t, _ = _check_cls(probs, targets)
    return float((p.argmax(dim=1) == t).double().mean())


def nll(probs: Tensor, targets: Tensor, eps: float = 1e-12) -> float:
    """Mean negative log-likelihood ``-1/N sum_n log max(p_{n, y_n}, eps)``.

    ``probs``: ``[N, C]`` or binary ``[N]``; ``targets``: ``[N]``. ``eps`` guards ``log 0``.
    """
    if not eps > 0:
        raise ValueError(f"eps must be positive, got {eps!r}")
    p, t, _ = _check_cls(probs, targets)
    p_true = p.gather(1, t[:, None]).squeeze(1)
    return float(-torch.log(p_true.clamp_min(eps)).mean())


def brier(probs: Tensor, targets: Tensor) -> float:
    """Brier score.

    Multiclass ``[N, C]``: ``1/N sum_n sum_c (p_nc - onehot(y_n)_c)^2`` (range ``[0, 2]``).
    Binary ``[N]``: ``1/N sum_n (p_n - y_n)^2`` (range ``[0, 1]``), equal to
    ``sklearn.metrics.brier_score_loss``. Note a 2-column ``[N, 2]`` input uses the multiclass
    formula, which is twice the binary value.
    """
    p, t, binary = _check_cls(probs, targets)
    if binary:
        return float(((p[:, 1] - t.double()) ** 2).mean())
    onehot = torch.nn.functional.one_hot(t, p.shape[1]).double()
    return float(((p - onehot) ** 2).sum(dim=1).mean())


@dataclass(frozen=True)
class CalibrationBins:
    """Equal-width confidence bins for reliability diagrams, ECE and MCE.

    Attributes (``B = n_bins``):
        edges: ``[B + 1]`` bin edges ``0, 1/B, ..., 1``; bin ``i`` covers ``(i/B, (i+1)/B]`` and
            the first bin also contains 0.
        confidence: ``[B]`` mean max-probability confidence in each bin (NaN for empty bins).
        accuracy: ``[B]`` fraction of correct argmax predictions in each bin (NaN if empty).
        counts: ``[B]`` number of points per bin (int64).
    """

    edges: Tensor
    confidence: Tensor
    accuracy: Tensor
    counts: Tensor

    @property
    def n_bins(self) -> int:
        return int(self.counts.numel())

    @property
    def gap(self) -> Tensor:
        """``[B]`` absolute calibration gap ``|accuracy - confidence|`` (NaN for empty bins)."""
        return (self.accuracy - self.confidence).abs()

    @property
    def ece(self) -> float:
        """Expected calibration error ``sum_b (n_b / N) |acc_b - conf_b|``."""
        nonempty = self.counts > 0
        w = self.counts[nonempty].double() / self.counts.sum()
        return float((w * self.gap[nonempty]).sum())

    @property
    def mce(self) -> float:
        """Maximum calibration error ``max_{b: n_b > 0} |acc_b - conf_b|``."""
        return float(self.gap[self.counts > 0].max())


def calibration_bins(probs: Tensor, targets: Tensor, n_bins: int = 15) -> CalibrationBins:
    """Bin predictions by max-probability confidence into ``n_bins`` equal-width bins on [0, 1].

    Bin ``i`` covers ``(i/n_bins, (i+1)/n_bins]``; the first bin also contains 0 (Guo et al.,
    2017). ``probs``: ``[N, C]`` or binary ``[N]``; ``targets``: ``[N]``.
    """
    _check_n_bins(n_bins)
    p, t, _ = _check_cls(probs, targets)
    conf, pred = p.max(dim=1)
    correct = (pred == t).double()
    # i/B as correctly rounded float64 divisions, so dyadic boundaries (0.25, 0.5, ...) are exact.
    edges = torch.arange(n_bins + 1, dtype=torch.float64, device=p.device) / n_bins
    # bucketize(right=False) returns i with edges[i-1] < x <= edges[i] over the inner edges.
    idx = torch.bucketize(conf, edges[1:-1], right=False)
    counts = torch.bincount(idx, minlength=n_bins)
    conf_sum = torch.bincount(idx, weights=conf, minlength=n_bins)
    acc_sum = torch.bincount(idx, weights=correct, minlength=n_bins)
    denom = counts.double()
    nan = torch.full_like(denom, float("nan"))
    nonempty = counts > 0
    return CalibrationBins(
        edges=edges,
        confidence=torch.where(nonempty, conf_sum / denom.clamp_min(1), nan),
        accuracy=torch.where(nonempty, acc_sum / denom.clamp_min(1), nan),
        counts=counts,
    )


def ece(probs: Tensor, targets: Tensor, n_bins: int = 15) -> float:
    """Expected calibration error ``sum_b (n_b / N) |acc_b - conf_b|`` over equal-width bins.

    See :func:`calibration_bins` for the binning. ``probs``: ``[N, C]`` or ``[N]``; ``targets``:
    ``[N]``.
    """
    return calibration_bins(probs, targets, n_bins).ece


def mce(probs: Tensor, targets: Tensor, n_bins: int = 15) -> float:
    """Maximum calibration error ``max_b |acc_b - conf_b|`` over non-empty equal-width bins."""
    return calibration_bins(probs, targets, n_bins).mce


def entropy(probs: Tensor) -> Tensor:
    """Predictive entropy ``H_n = -sum_c p_nc log p_nc`` in nats (``0 log 0 = 0``), shape ``[N]``.

    Binary ``[N]`` probabilities give the Bernoulli entropy. Returned as float64.
    """
    p, _ = _check_probs(probs)
    return -torch.special.xlogy(p, p).sum(dim=1)


def _average_ranks(x: Tensor) -> Tensor:
    """1-based ranks of a 1-D tensor, ties receiving the mean of their ranks (like scipy)."""
    _, inverse, counts = torch.unique(x, sorted=True, return_inverse=True, return_counts=True)
    upper = torch.cumsum(counts, 0).double()  # rank of the last element of each tie group
    avg = upper - (counts.double() - 1.0) / 2.0
    return avg[inverse]


def ood_auroc(
    probs_in: Tensor,
    probs_out: Tensor,
    score: Literal["max_prob", "entropy"] = "max_prob",
) -> float:
    """AUROC of separating in-distribution (positive) from out-of-distribution inputs.

    The confidence score is the max probability (``score="max_prob"``) or the negative predictive
    entropy (``score="entropy"``); higher means "more in-distribution". Computed as the
    Mann-Whitney statistic ``P(s_in > s_out) + 1/2 P(s_in = s_out)`` from average ranks, which
    equals ``sklearn.metrics.roc_auc_score``. ``probs_in``: ``[N_in, C]``, ``probs_out``:
    ``[N_out, C]`` (or both binary 1-D).
    """
    if score not in ("max_prob", "entropy"):
        raise ValueError(f"score must be 'max_prob' or 'entropy', got {score!r}")
    p_in, bin_in = _check_probs(probs_in, "probs_in")
    p_out, bin_out = _check_probs(probs_out, "probs_out")
    if bin_in != bin_out or p_in.shape[1] != p_out.shape[1]:
        kind_in = "binary [N]" if bin_in else f"{p_in.shape[1]} classes"
        kind_out = "binary [N]" if bin_out else f"{p_out.shape[1]} classes"
        raise ValueError(
            f"probs_in and probs_out must have the same number of classes, got {kind_in} and "
            f"{kind_out}"
        )
    p_out = p_out.to(p_in.device)
    if score == "max_prob":
        s_in, s_out = p_in.max(dim=1).values, p_out.max(dim=1).values
    else:  # negative entropy
        s_in = torch.special.xlogy(p_in, p_in).sum(dim=1)
        s_out = torch.special.xlogy(p_out, p_out).sum(dim=1)
    n_in, n_out = s_in.numel(), s_out.numel()
    ranks = _average_ranks(torch.cat([s_in, s_out]))
    u = ranks[:n_in].sum() - n_in * (n_in + 1) / 2.0
    return float(u / (n_in * n_out))


def classification_report(probs: Tensor, targets: Tensor, n_bins: int = 15) -> dict[str, float]:
    """Convenience bundle: ``{"accuracy", "nll", "ece", "mce", "brier"}`` as floats."""
    bins = calibration_bins(probs, targets, n_bins)
    return {
        "accuracy": accuracy(probs, targets),
        "nll": nll(probs, targets),
        "ece": bins.ece,
        "mce": bins.mce,
        "brier": brier(probs, targets),
    }


# --------------------------------------------------------------------------------------------------
# Regression
# --------------------------------------------------------------------------------------------------


def _check_reg(mean: Any, var: Any | None, targets: Any) -> tuple[Tensor, Tensor | None, Tensor]:
    m = _as_float64(mean, "mean")
    if m.ndim not in (1, 2):
        raise ValueError(f"mean must have shape [N] or [N, D], got shape {list(m.shape)}")
    if m.shape[0] == 0:
        raise ValueError("mean is empty (N = 0); metrics need at least one prediction")
    _check_finite(m, "mean")
    y = _as_float64(targets, "targets").to(m.device)
    if y.shape != m.shape:
        hint = ""
        if y.numel() == m.numel():
            hint = f"; reshape one of them, e.g. targets.reshape({list(m.shape)})"
        raise ValueError(
            f"targets must have the same shape as mean, got {list(y.shape)} and "
            f"{list(m.shape)}{hint}"
        )
    _check_finite(y, "targets")
    v = None
    if var is not None:
        v = _as_float64(var, "var").to(m.device)
        if v.ndim != 0 and v.shape != m.shape:
            raise ValueError(
                f"var must be a scalar or have the same shape as mean {list(m.shape)}, got "
                f"{list(v.shape)}" + ("; reshape it" if v.numel() == m.numel() else "")
            )
        _check_finite(v, "var")
        if float(v.min()) <= 0:
            raise ValueError(
                f"var must be strictly positive, got minimum {float(v.min()):.3g}; pass variances "
                "(std**2), and add the observation noise sigma**2 if it is missing"
            )
        v = v.expand_as(m)
    return m, v, y


def gaussian_nll(mean: Tensor, var: Tensor, targets: Tensor) -> float:
    """Mean Gaussian negative log-likelihood per data point.

    ``1/N sum_n sum_d [0.5 log(2 pi var_nd) + (y_nd - mean_nd)^2 / (2 var_nd)]``: the outputs of one
    data point are independent and their NLLs add; the mean is over the ``N`` data points. ``mean``
    and ``targets``: ``[N]`` or ``[N, D]``; ``var``: the same shape or a scalar, strictly positive.
    """
    m, v, y = _check_reg(mean, var, targets)
    assert v is not None
    per_elem = 0.5 * (math.log(2 * math.pi) + torch.log(v) + (y - m) ** 2 / v)
    return float(per_elem.reshape(m.shape[0], -1).sum(dim=1).mean())


def rmse(mean: Tensor, targets: Tensor) -> float:
    """Root mean squared error ``sqrt(mean over all entries of (mean - y)^2)``.

    ``mean`` and ``targets``: ``[N]`` or ``[N, D]`` (averaged over all ``N * D`` entries).
    """
    m, _, y = _check_reg(mean, None, targets)
    return float(torch.sqrt(((m - y) ** 2).mean()))


def _check_levels(levels: Sequence[float]) -> list[float]:
    lv = [float(level) for level in levels]
    if not lv:
        raise ValueError("levels must contain at least one nominal coverage level")
    bad = [level for level in lv if not 0.0 < level < 1.0]
    if bad:
        raise ValueError(f"coverage levels must lie strictly between 0 and 1, got {bad}")
    return lv


def _coverages(m: Tensor, v: Tensor, y: Tensor, levels: list[float]) -> Tensor:
    # |y - m| / std <= z_{(1+l)/2}  <=>  y in the central interval of mass l.
    z_abs = ((y - m).abs() / v.sqrt()).reshape(-1)
    lv = torch.tensor(levels, dtype=torch.float64, device=m.device)
    z = torch.special.ndtri((1.0 + lv) / 2.0)
    return (z_abs[None, :] <= z[:, None]).double().mean(dim=1)


def interval_coverage(
    mean: Tensor,
    var: Tensor,
    targets: Tensor,
    levels: Sequence[float] = (0.5, 0.68, 0.9, 0.95),
) -> dict[float, float]:
    """Empirical coverage of central Gaussian predictive intervals.

    For each nominal level ``l``, the fraction of entries with
    ``|y - mean| <= z_{(1+l)/2} sqrt(var)`` (``z_q`` the standard normal quantile), computed over
    all ``N * D`` entries. Returns ``{l: coverage}``; a calibrated predictive has
    ``coverage ~ l``.
    """
    lv = _check_levels(levels)
    m, v, y = _check_reg(mean, var, targets)
    assert v is not None
    cov = _coverages(m, v, y, lv)
    return {level: float(c) for level, c in zip(lv, cov, strict=True)}


def regression_calibration_error(
    mean: Tensor,
    var: Tensor,
    targets: Tensor,
    levels: Sequence[float] | None = None,
) -> float:
    """Mean absolute gap ``1/L sum_l |coverage(l) - l|`` between nominal and empirical coverage.

    ``levels`` defaults to the grid ``0.05, 0.10, ..., 0.95``. See :func:`interval_coverage`.
    """
    lv = _check_levels([i / 20 for i in range(1, 20)] if levels is None else levels)
    m, v, y = _check_reg(mean, var, targets)
    assert v is not None
    cov = _coverages(m, v, y, lv)
    nominal = torch.tensor(lv, dtype=torch.float64, device=cov.device)
    return float((cov - nominal).abs().mean())
