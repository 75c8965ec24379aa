"""Matplotlib figures for evaluating Laplace predictives.

Every function draws on a fresh :class:`matplotlib.figure.Figure` rendered with the Agg canvas,
saves it to the ``path`` given by the caller (format from the file extension, PNG if none; parent
directories are created) and returns that path as a :class:`pathlib.Path`. Figures are never
registered with ``pyplot``, so nothing is left open, no window appears and the user's global
matplotlib backend is left untouched (works headless and inside notebooks alike).

Inputs may be tensors (any device, detached automatically) or array-likes. Most functions accept
either a single result or a ``dict`` mapping a method name to its result, in which case one panel
per method is drawn side by side with shared axes.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from . import metrics

__all__ = [
    "confidence_histogram",
    "confidence_map",
    "metric_vs_shift",
    "regression_band",
    "reliability_diagram",
]

PathLike = str | os.PathLike

_PANEL_W, _PANEL_H, _DPI = 4.2, 3.8, 110


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------


def _to_numpy(x: Any, name: str, ndim: tuple[int, ...] | None = None) -> np.ndarray:
    """Convert a tensor / array-like to a finite float64 numpy array, optionally checking ndim."""
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu", torch.float64).numpy()
    try:
        arr = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise ValueError(
            f"{name} must be a tensor or array of numbers, got {type(x).__name__}"
        ) from err
    if ndim is not None and arr.ndim not in ndim:
        want = " or ".join(f"{d}-D" for d in ndim)
        raise ValueError(f"{name} must be {want}, got shape {list(arr.shape)}")
    if arr.size == 0:
        raise ValueError(f"{name} is empty; nothing to plot")
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} contains NaN or Inf values; remove or fix those entries")
    return arr


def _flat_1d(x: Any, name: str) -> np.ndarray:
    """Accept ``[M]`` or ``[M, 1]`` and return ``[M]``."""
    arr = _to_numpy(x, name, ndim=(1, 2))
    if arr.ndim == 2:
        if arr.shape[1] != 1:
            raise ValueError(
                f"{name} must be 1-D data of shape [M] or [M, 1], got shape {list(arr.shape)}; "
                "this plot is for a single input and a single output dimension"
            )
        arr = arr[:, 0]
    return arr


def _panels(obj: Any, name: str) -> list[tuple[str | None, Any]]:
    """A dict ``name -> value`` becomes one panel per entry; anything else is a single panel."""
    if isinstance(obj, Mapping):
        if not obj:
            raise ValueError(f"{name} is an empty dict; pass at least one method name -> result")
        return [(str(k), v) for k, v in obj.items()]
    return [(None, obj)]


def _match_keys(other: Any, panels: list[tuple[str | None, Any]], name: str, ref: str) -> list:
    """Per-panel values of ``other``: a dict with the same keys as ``ref``, or one shared value."""
    if isinstance(other, Mapping):
        keys = [k for k, _ in panels]
        if panels[0][0] is None or set(map(str, other)) != set(keys):
            raise ValueError(
                f"{name} is a dict, so {ref} must be a dict with the same keys; got keys "
                f"{sorted(map(str, other))} and "
                f"{'a single result' if panels[0][0] is None else sorted(keys)}"
            )
        by_key = {str(k): v for k, v in other.items()}
        return [by_key[k] for k in keys]
    return [other] * len(panels)


def _figure(n_panels: int, width: float = _PANEL_W) -> tuple[Figure, list[Axes]]:
    fig = Figure(figsize=(width * n_panels, _PANEL_H), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, n_panels, sharey=True, squeeze=False)[0]
    return fig, list(axes)


def _annotate(ax: Axes, text: str) -> None:
    """A boxed note in the panel's top-left corner (the panel's summary number)."""
    ax.text(
        0.04,
        0.93,
        text,
        transform=ax.transAxes,
        bbox={"boxstyle": "round", "facecolor": "white", "alpha": 0.85},
    )


def _save(fig: Figure, path: PathLike, title: str | None) -> Path:
    if title is not None:
        fig.suptitle(title)
    out = Path(path)
    if out.name == "":
        raise ValueError(f"path must name a file, got {str(path)!r}")
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=_DPI)
    fig.clear()
    return out


# --------------------------------------------------------------------------------------------------
# classification
# --------------------------------------------------------------------------------------------------


def reliability_diagram(
    probs: torch.Tensor | Mapping[str, torch.Tensor],
    targets: torch.Tensor | Mapping[str, torch.Tensor],
    path: PathLike,
    n_bins: int = 15,
    title: str | None = None,
) -> Path:
    """Reliability diagram: per-bin accuracy against max-probability confidence.

    Bars show the accuracy of each equal-width confidence bin (see
    :func:`laplace_kron.metrics.calibration_bins`), hatched bars the gap to the bin's mean
    confidence, the dashed diagonal perfect calibration; ECE is annotated. ``probs``: ``[N, C]``
    or binary ``[N]``, or a dict ``name -> probs`` for one panel each; ``targets``: ``[N]`` shared
    by all panels, or a dict with the same keys.
    """
    panels = _panels(probs, "probs")
    all_targets = _match_keys(targets, panels, "probs", "targets")
    fig, axes = _figure(len(panels))
    for ax, (name, p), t in zip(axes, panels, all_targets, strict=True):
        bins = metrics.calibration_bins(p, t, n_bins)
        left = bins.edges[:-1].cpu().numpy()
        width = 1.0 / bins.n_bins
        acc = np.nan_to_num(bins.accuracy.cpu().numpy(), nan=0.0)
        conf = bins.confidence.cpu().numpy()
        filled = bins.counts.cpu().numpy() > 0
        ax.bar(
            left,
            acc,
            width=width,
            align="edge",
            color="tab:blue",
            edgecolor="black",
            lw=0.6,
            label="accuracy",
        )
        lo = np.minimum(acc, np.nan_to_num(conf, nan=0.0))
        gap = np.where(filled, np.abs(acc - np.nan_to_num(conf, nan=0.0)), 0.0)
        ax.bar(
            left,
            gap,
            bottom=lo,
            width=width,
            align="edge",
            color="tab:red",
            alpha=0.3,
            edgecolor="tab:red",
            hatch="//",
            lw=0.6,
            label="gap",
        )
        ax.plot([0, 1], [0, 1], ls="--", color="gray", lw=1, label="perfect calibration")
        _annotate(ax, f"ECE = {100 * bins.ece:.2f}%")
        ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence", aspect="equal")
        if name is not None:
            ax.set_title(name)
    axes[0].set_ylabel("accuracy")
    axes[-1].legend(loc="lower right", fontsize="small")
    return _save(fig, path, title)


def _in_out_pair(value: Any, name: str) -> tuple[Any, Any]:
    if not (isinstance(value, Sequence) and len(value) == 2):
        raise ValueError(
            f"each value of the dict {name} must be a pair (probs_in, probs_out), "
            f"got {type(value).__name__}"
        )
    return value[0], value[1]


def confidence_histogram(
    probs_in: torch.Tensor | Mapping[str, tuple[torch.Tensor, torch.Tensor]],
    probs_out: torch.Tensor | None,
    path: PathLike,
    title: str | None = None,
    n_bins: int = 20,
) -> Path:
    """Histograms of max-probability confidence on in- vs out-of-distribution inputs.

    Each panel overlays the two normalised histograms and annotates the OOD AUROC
    (:func:`laplace_kron.metrics.ood_auroc`, max-prob score). ``probs_in``: ``[N_in, C]``,
    ``probs_out``: ``[N_out, C]`` (or both binary ``[N]``). For several panels pass a dict
    ``name -> (probs_in, probs_out)`` as ``probs_in`` and ``probs_out=None``.
    """
    if isinstance(n_bins, bool) or not isinstance(n_bins, int) or n_bins < 1:
        raise ValueError(f"n_bins must be a positive integer, got {n_bins!r}")
    if isinstance(probs_in, Mapping):
        if probs_out is not None:
            raise ValueError(
                "probs_in is a dict name -> (probs_in, probs_out), so probs_out must be None"
            )
        panels = [(name, _in_out_pair(v, "probs_in")) for name, v in _panels(probs_in, "probs_in")]
    else:
        if probs_out is None:
            raise ValueError(
                "probs_out is None; pass out-of-distribution probabilities, or a dict "
                "name -> (probs_in, probs_out) as probs_in"
            )
        panels = [(None, (probs_in, probs_out))]
    fig, axes = _figure(len(panels))
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    for ax, (name, (p_in, p_out)) in zip(axes, panels, strict=True):
        auroc = metrics.ood_auroc(p_in, p_out, score="max_prob")
        c_in = metrics.confidence(p_in).cpu().numpy()
        c_out = metrics.confidence(p_out).cpu().numpy()
        ax.hist(c_in, bins=edges, density=True, alpha=0.55, color="tab:blue", label="in-dist.")
        ax.hist(c_out, bins=edges, density=True, alpha=0.55, color="tab:orange", label="OOD")
        _annotate(ax, f"AUROC = {auroc:.3f}")
        ax.set(xlim=(0, 1), xlabel="confidence (max probability)")
        if name is not None:
            ax.set_title(name)
    axes[0].set_ylabel("density")
    axes[0].legend(loc="upper center", fontsize="small")
    return _save(fig, path, title)


def confidence_map(
    grid_x: Any,
    grid_y: Any,
    confidence: torch.Tensor | Mapping[str, torch.Tensor],
    X: Any,
    y: Any,
    path: PathLike,
    title: str | None = None,
) -> Path:
    """Filled contours of a 2-D toy classifier's max-probability confidence, with the data on top.

    ``grid_x``, ``grid_y``: ``[H, W]`` meshgrid coordinates (``indexing="xy"``) or 1-D ``[W]`` and
    ``[H]`` axes; ``confidence``: ``[H, W]`` values in [0, 1] (e.g.
    ``metrics.confidence(probs).reshape(H, W)``), or a dict ``name -> [H, W]``; ``X``: ``[N, 2]``
    inputs; ``y``: ``[N]`` class labels (colour of the points). Panels share one colour scale.
    """
    gx = _to_numpy(grid_x, "grid_x", ndim=(1, 2))
    gy = _to_numpy(grid_y, "grid_y", ndim=(1, 2))
    if gx.ndim != gy.ndim:
        raise ValueError(
            f"grid_x and grid_y must both be 1-D axes or both [H, W] meshgrids, got shapes "
            f"{list(gx.shape)} and {list(gy.shape)}"
        )
    if gx.ndim == 1:
        gx, gy = np.meshgrid(gx, gy, indexing="xy")
    elif gx.shape != gy.shape:
        raise ValueError(f"grid_x {list(gx.shape)} and grid_y {list(gy.shape)} differ in shape")
    xs = _to_numpy(X, "X", ndim=(2,))
    if xs.shape[1] != 2:
        raise ValueError(f"X must have shape [N, 2] (2-D inputs), got {list(xs.shape)}")
    labels = _flat_1d(y, "y")
    if labels.shape[0] != xs.shape[0]:
        raise ValueError(f"y has {labels.shape[0]} entries but X has {xs.shape[0]} rows")
    panels = []
    for name, c in _panels(confidence, "confidence"):
        conf = _to_numpy(c, "confidence" if name is None else f"confidence[{name!r}]", ndim=(2,))
        if conf.shape != gx.shape:
            raise ValueError(
                f"confidence has shape {list(conf.shape)} but the grid is {list(gx.shape)} "
                "([H, W] = [len(grid_y), len(grid_x)]); reshape it to the grid"
            )
        if conf.min() < -1e-6 or conf.max() > 1 + 1e-6:
            raise ValueError(
                f"confidence must lie in [0, 1], got [{conf.min():.3g}, {conf.max():.3g}]; "
                "pass max-probabilities, e.g. metrics.confidence(probs)"
            )
        panels.append((name, conf))
    lo = min(math.floor(10 * min(float(c.min()) for _, c in panels)) / 10, 0.9)
    levels = np.linspace(lo, 1.0, int(round((1.0 - lo) / 0.05)) + 1)
    fig, axes = _figure(len(panels))
    mappable = None
    classes = np.unique(labels)
    for ax, (name, conf) in zip(axes, panels, strict=True):
        mappable = ax.contourf(gx, gy, np.clip(conf, lo, 1.0), levels=levels, cmap="viridis")
        for k, cls in enumerate(classes):
            sel = labels == cls
            ax.scatter(
                xs[sel, 0],
                xs[sel, 1],
                s=12,
                color=f"C{k % 10}",
                edgecolors="white",
                linewidths=0.4,
                label=f"class {cls:g}",
            )
        ax.set(xlim=(gx.min(), gx.max()), ylim=(gy.min(), gy.max()), xlabel="$x_1$")
        if name is not None:
            ax.set_title(name)
    axes[0].set_ylabel("$x_2$")
    axes[-1].legend(loc="upper right", fontsize="small")
    fig.colorbar(mappable, ax=axes, label="confidence (max probability)", shrink=0.9)
    return _save(fig, path, title)


# --------------------------------------------------------------------------------------------------
# regression and shift studies
# --------------------------------------------------------------------------------------------------


def regression_band(
    x_train: Any,
    y_train: Any,
    x_test: Any,
    mean: torch.Tensor | Mapping[str, torch.Tensor],
    std: torch.Tensor | Mapping[str, torch.Tensor],
    path: PathLike,
    title: str | None = None,
) -> Path:
    """1-D regression plot: predictive mean with a ``mean +/- 2 std`` band and the training data.

    ``x_train``, ``y_train``: ``[N]`` (or ``[N, 1]``; both may be ``None`` to omit the data);
    ``x_test``: ``[M]`` (need not be sorted); ``mean``, ``std``: ``[M]`` predictive mean and
    standard deviation (include the observation noise if you want a predictive band), or dicts
    ``name -> [M]`` with the same keys for one panel per method.
    """
    if (x_train is None) != (y_train is None):
        raise ValueError("pass both x_train and y_train, or neither")
    xtr = ytr = None
    if x_train is not None:
        xtr, ytr = _flat_1d(x_train, "x_train"), _flat_1d(y_train, "y_train")
        if xtr.shape != ytr.shape:
            raise ValueError(
                f"x_train has {xtr.shape[0]} points but y_train has {ytr.shape[0]}; they must match"
            )
    xte = _flat_1d(x_test, "x_test")
    order = np.argsort(xte, kind="stable")
    panels = _panels(mean, "mean")
    if panels[0][0] is not None and not isinstance(std, Mapping):
        raise ValueError("mean is a dict, so std must be a dict with the same keys")
    stds = _match_keys(std, panels, "mean", "std")
    checked = []
    for (name, m), s in zip(panels, stds, strict=True):
        tag = "" if name is None else f"[{name!r}]"
        m_arr, s_arr = _flat_1d(m, f"mean{tag}"), _flat_1d(s, f"std{tag}")
        if m_arr.shape != xte.shape or s_arr.shape != xte.shape:
            raise ValueError(
                f"mean{tag} {list(m_arr.shape)} and std{tag} {list(s_arr.shape)} must have one "
                f"entry per test input, x_test has {xte.shape[0]}"
            )
        if (s_arr < 0).any():
            raise ValueError(
                f"std{tag} has negative entries; pass standard deviations (sqrt of variances)"
            )
        checked.append((name, m_arr[order], s_arr[order]))
    fig, axes = _figure(len(checked))
    xs = xte[order]
    for ax, (name, m_arr, s_arr) in zip(axes, checked, strict=True):
        ax.fill_between(
            xs,
            m_arr - 2 * s_arr,
            m_arr + 2 * s_arr,
            color="tab:blue",
            alpha=0.25,
            lw=0,
            label=r"mean $\pm$ 2 std",
        )
        ax.plot(xs, m_arr, color="tab:blue", lw=1.5, label="predictive mean")
        if xtr is not None:
            ax.scatter(xtr, ytr, s=10, color="black", alpha=0.7, label="training data", zorder=3)
        ax.set_xlabel("x")
        if name is not None:
            ax.set_title(name)
    axes[0].set_ylabel("y")
    axes[0].legend(loc="best", fontsize="small")
    return _save(fig, path, title)


def _mean_std(value: Any, name: str, n: int) -> tuple[np.ndarray, np.ndarray | None]:
    """``values`` ``[S]`` or a pair ``(mean [S], std [S])``."""

    def ndim(x: Any) -> int:
        return x.ndim if isinstance(x, torch.Tensor) else np.ndim(x)

    if isinstance(value, tuple | list) and len(value) == 2 and ndim(value[0]) >= 1:
        mean = _flat_1d(value[0], f"{name} mean")
        std = _flat_1d(value[1], f"{name} std")
        if (std < 0).any():
            raise ValueError(f"{name} std has negative entries")
    else:
        mean, std = _flat_1d(value, name), None
    for arr, what in ((mean, "values"), (std, "std")):
        if arr is not None and arr.shape[0] != n:
            raise ValueError(
                f"{name} has {arr.shape[0]} {what} but there are {n} shifts; pass one per shift"
            )
    return mean, std


def metric_vs_shift(
    shifts: Any,
    results: Mapping[str, Any],
    path: PathLike,
    ylabel: str,
    title: str | None = None,
    xlabel: str = "shift intensity",
) -> Path:
    """Line plot of a metric against dataset-shift intensity, one line per method.

    ``shifts``: ``[S]`` shift intensities (e.g. rotation angles); ``results``: dict
    ``method -> values [S]`` or ``method -> (mean [S], std [S])``, the latter drawn with a
    ``mean +/- std`` band (e.g. over seeds).
    """
    xs = _flat_1d(shifts, "shifts")
    if not isinstance(results, Mapping) or not results:
        raise ValueError("results must be a non-empty dict method -> values (or (mean, std))")
    fig, axes = _figure(1, width=5.6)
    ax = axes[0]
    for k, (method, value) in enumerate(results.items()):
        mean, std = _mean_std(value, f"results[{method!r}]", xs.shape[0])
        color = f"C{k % 10}"
        ax.plot(xs, mean, marker="o", ms=4, color=color, label=str(method))
        if std is not None:
            ax.fill_between(xs, mean - std, mean + std, color=color, alpha=0.2, lw=0)
    ax.set(xlabel=xlabel, ylabel=ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return _save(fig, path, title)
