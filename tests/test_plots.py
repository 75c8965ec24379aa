"""Smoke and validation tests for laplace_kron.plots: each figure is written as a non-empty PNG."""

from __future__ import annotations

from pathlib import Path

import matplotlib
import numpy as np
import pytest
import torch

from laplace_kron import plots

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _assert_png(path: Path, expected: Path) -> None:
    assert path == expected
    assert path.is_file() and path.stat().st_size > 1000
    assert path.read_bytes()[:8] == PNG_MAGIC


def _probs(n: int, c: int, scale: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    probs = torch.softmax(scale * torch.randn(n, c, generator=g), dim=1)
    return probs, torch.multinomial(probs, 1, generator=g).squeeze(1)


def test_no_global_backend_change_or_open_figures(tmp_path: Path) -> None:
    import matplotlib.pyplot as plt

    backend = matplotlib.get_backend()
    before = plt.get_fignums()
    probs, targets = _probs(100, 3, 2.0, 0)
    plots.reliability_diagram(probs, targets, tmp_path / "r.png")
    assert matplotlib.get_backend() == backend
    assert plt.get_fignums() == before


def test_reliability_diagram_single_and_dict(tmp_path: Path) -> None:
    probs, targets = _probs(300, 4, 2.0, 1)
    out = plots.reliability_diagram(probs, targets, str(tmp_path / "single.png"), n_bins=10)
    _assert_png(out, tmp_path / "single.png")
    sharp = torch.softmax(3 * torch.log(probs), dim=1)
    out = plots.reliability_diagram(
        {"MAP": sharp, "KFAC-Laplace": probs}, targets, tmp_path / "sub" / "multi.png", title="t"
    )
    _assert_png(out, tmp_path / "sub" / "multi.png")
    # binary 1-D probabilities and per-panel targets also work
    p = torch.rand(200, dtype=torch.float64)
    y = torch.bernoulli(p).long()
    out = plots.reliability_diagram({"a": p}, {"a": y}, tmp_path / "bin.png")
    _assert_png(out, tmp_path / "bin.png")


def test_reliability_diagram_bad_input(tmp_path: Path) -> None:
    probs, targets = _probs(50, 3, 1.0, 2)
    with pytest.raises(ValueError, match="sum to 1"):
        plots.reliability_diagram(probs * 0.5, targets, tmp_path / "x.png")
    with pytest.raises(ValueError, match="same keys"):
        plots.reliability_diagram({"a": probs}, {"b": targets}, tmp_path / "x.png")
    with pytest.raises(ValueError, match="empty dict"):
        plots.reliability_diagram({}, targets, tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_confidence_histogram(tmp_path: Path) -> None:
    p_in, _ = _probs(300, 5, 3.0, 3)
    p_out, _ = _probs(200, 5, 0.5, 4)
    _assert_png(plots.confidence_histogram(p_in, p_out, tmp_path / "h.png"), tmp_path / "h.png")
    out = plots.confidence_histogram(
        {"MAP": (p_in, p_out), "LA": (p_in, p_out)}, None, tmp_path / "h2.png", title="OOD"
    )
    _assert_png(out, tmp_path / "h2.png")


def test_confidence_histogram_bad_input(tmp_path: Path) -> None:
    p_in, _ = _probs(30, 5, 3.0, 3)
    with pytest.raises(ValueError, match="probs_out is None"):
        plots.confidence_histogram(p_in, None, tmp_path / "x.png")
    with pytest.raises(ValueError, match="must be None"):
        plots.confidence_histogram({"a": (p_in, p_in)}, p_in, tmp_path / "x.png")
    with pytest.raises(ValueError, match="pair"):
        plots.confidence_histogram({"a": p_in}, None, tmp_path / "x.png")
    with pytest.raises(ValueError, match="same number of classes"):
        plots.confidence_histogram(p_in, p_in[:, :3].softmax(1), tmp_path / "x.png")
    with pytest.raises(ValueError, match="NaN"):
        plots.confidence_histogram(p_in, torch.full((3, 5), float("nan")), tmp_path / "x.png")


def test_regression_band(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(5)
    x_train = torch.rand(40, 1, generator=g) * 4 - 2
    y_train = torch.sin(2 * x_train[:, 0]) + 0.1 * torch.randn(40, generator=g)
    x_test = torch.linspace(3, -3, 100)  # unsorted order is fine
    mean, std = torch.sin(2 * x_test), 0.1 + 0.2 * x_test.abs()
    out = plots.regression_band(x_train, y_train, x_test, mean, std, tmp_path / "b.png")
    _assert_png(out, tmp_path / "b.png")
    out = plots.regression_band(
        x_train.numpy(),
        y_train.numpy(),
        x_test[:, None],
        {"MAP": mean, "LA": mean[:, None]},
        {"MAP": torch.zeros(100), "LA": std},
        tmp_path / "b2.png",
        title="toy regression",
    )
    _assert_png(out, tmp_path / "b2.png")
    out = plots.regression_band(None, None, x_test, mean, std, tmp_path / "b3.png")
    _assert_png(out, tmp_path / "b3.png")


def test_regression_band_bad_input(tmp_path: Path) -> None:
    x, m, s = torch.linspace(0, 1, 10), torch.zeros(10), torch.ones(10)
    with pytest.raises(ValueError, match="negative"):
        plots.regression_band(x, m, x, m, -s, tmp_path / "x.png")
    with pytest.raises(ValueError, match="one entry per test input"):
        plots.regression_band(x, m, x, m[:5], s[:5], tmp_path / "x.png")
    with pytest.raises(ValueError, match="must match"):
        plots.regression_band(x, m[:5], x, m, s, tmp_path / "x.png")
    with pytest.raises(ValueError, match="same keys"):
        plots.regression_band(x, m, x, {"a": m}, s, tmp_path / "x.png")
    with pytest.raises(ValueError, match="same keys"):
        plots.regression_band(x, m, x, m, {"a": s}, tmp_path / "x.png")
    with pytest.raises(ValueError, match="single input"):
        plots.regression_band(x, m, torch.zeros(10, 2), m, s, tmp_path / "x.png")
    with pytest.raises(ValueError, match="both"):
        plots.regression_band(x, None, x, m, s, tmp_path / "x.png")


def test_confidence_map(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(6)
    X = torch.randn(60, 2, generator=g)
    y = (X[:, 0] > 0).long()
    gx1, gy1 = np.linspace(-3, 3, 40), np.linspace(-2, 2, 30)
    gx, gy = np.meshgrid(gx1, gy1)
    conf = 1 / (1 + np.exp(-np.abs(3 * gx)))  # binary-classifier confidence in [0.5, 1)
    _assert_png(plots.confidence_map(gx, gy, conf, X, y, tmp_path / "m.png"), tmp_path / "m.png")
    out = plots.confidence_map(
        torch.from_numpy(gx1),
        torch.from_numpy(gy1),
        {"MAP": torch.from_numpy(conf), "LA": torch.from_numpy(0.5 + 0.5 * (conf - 0.5))},
        X,
        y,
        tmp_path / "m2.png",
        title="toy",
    )
    _assert_png(out, tmp_path / "m2.png")


def test_confidence_map_bad_input(tmp_path: Path) -> None:
    gx1, gy1 = np.linspace(-3, 3, 40), np.linspace(-2, 2, 30)
    X, y = torch.randn(10, 2), torch.zeros(10)
    conf = np.full((30, 40), 0.7)
    with pytest.raises(ValueError, match="reshape it to the grid"):
        plots.confidence_map(gx1, gy1, conf.T, X, y, tmp_path / "x.png")
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        plots.confidence_map(gx1, gy1, conf + 1, X, y, tmp_path / "x.png")
    with pytest.raises(ValueError, match=r"\[N, 2\]"):
        plots.confidence_map(gx1, gy1, conf, torch.randn(10, 3), y, tmp_path / "x.png")
    with pytest.raises(ValueError, match="y has 5 entries"):
        plots.confidence_map(gx1, gy1, conf, X, y[:5], tmp_path / "x.png")
    with pytest.raises(ValueError, match="must both be 1-D"):
        plots.confidence_map(gx1, np.zeros((30, 40)), conf, X, y, tmp_path / "x.png")


def test_metric_vs_shift(tmp_path: Path) -> None:
    shifts = [0, 15, 30, 45, 60]
    results = {
        "MAP": torch.tensor([0.02, 0.08, 0.15, 0.25, 0.3]),
        "LA": (np.array([0.02, 0.04, 0.08, 0.12, 0.15]), torch.full((5,), 0.01)),
        "ens": [0.03, 0.05, 0.07, 0.1, 0.12],
    }
    out = plots.metric_vs_shift(shifts, results, tmp_path / "s.png", ylabel="ECE", title="rot")
    _assert_png(out, tmp_path / "s.png")
    # two shifts and a plain list of two values is read as values, not (mean, std)
    out = plots.metric_vs_shift([0, 1], {"a": [0.1, 0.2]}, tmp_path / "s2.png", ylabel="NLL")
    _assert_png(out, tmp_path / "s2.png")


def test_metric_vs_shift_bad_input(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="one per shift"):
        plots.metric_vs_shift([0, 1, 2], {"a": [0.1, 0.2]}, tmp_path / "x.png", ylabel="ECE")
    with pytest.raises(ValueError, match="non-empty dict"):
        plots.metric_vs_shift([0, 1], {}, tmp_path / "x.png", ylabel="ECE")
    with pytest.raises(ValueError, match="std has negative"):
        bad = {"a": ([0.1, 0.2], [0.1, -0.1])}
        plots.metric_vs_shift([0, 1], bad, tmp_path / "x.png", ylabel="ECE")
    with pytest.raises(ValueError, match="NaN"):
        plots.metric_vs_shift([0, float("nan")], {"a": [1, 2]}, tmp_path / "x.png", ylabel="ECE")
