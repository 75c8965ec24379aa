"""Tests for laplace_kron.metrics against scikit-learn and hand-computed cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import brier_score_loss, log_loss, roc_auc_score

from laplace_kron import metrics as M


def _random_probs(n: int, c: int, seed: int = 0, scale: float = 2.0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    probs = torch.softmax(scale * torch.randn(n, c, generator=g, dtype=torch.float64), dim=1)
    targets = torch.randint(0, c, (n,), generator=g)
    return probs, targets


# --------------------------------------------------------------------------------------------------
# accuracy / nll / brier against scikit-learn
# --------------------------------------------------------------------------------------------------


def test_accuracy_multiclass_and_binary() -> None:
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.3, 0.3, 0.4], [0.5, 0.4, 0.1]])
    targets = torch.tensor([0, 2, 2, 1])
    assert M.accuracy(probs, targets) == pytest.approx(0.5)
    p = torch.tensor([0.9, 0.2, 0.6, 0.5])  # 0.5 -> class 0 (argmax ties go to the first class)
    y = torch.tensor([1, 0, 0, 0])
    assert M.accuracy(p, y) == pytest.approx(0.75)
    # float 0/1 targets are accepted for the binary case
    assert M.accuracy(p, y.float()) == pytest.approx(0.75)


def test_nll_matches_sklearn_log_loss() -> None:
    probs, targets = _random_probs(500, 5, seed=1)
    expected = log_loss(targets.numpy(), probs.numpy(), labels=list(range(5)))
    assert M.nll(probs, targets) == pytest.approx(expected, rel=1e-10)
    # float32 input gives the same answer up to float32 precision
    assert M.nll(probs.float(), targets) == pytest.approx(expected, rel=1e-5)


def test_nll_binary_matches_sklearn_and_eps_clamps() -> None:
    g = torch.Generator().manual_seed(2)
    p = torch.rand(300, generator=g, dtype=torch.float64) * 0.98 + 0.01
    y = torch.bernoulli(p, generator=g).long()
    assert M.nll(p, y) == pytest.approx(log_loss(y.numpy(), p.numpy()), rel=1e-10)
    # a confident mistake is clamped at eps, not infinite
    assert M.nll(torch.tensor([[1.0, 0.0]]), torch.tensor([1]), eps=1e-8) == pytest.approx(
        -math.log(1e-8)
    )


def test_brier_binary_matches_sklearn() -> None:
    g = torch.Generator().manual_seed(3)
    p = torch.rand(400, generator=g, dtype=torch.float64)
    y = torch.bernoulli(p, generator=g).long()
    assert M.brier(p, y) == pytest.approx(brier_score_loss(y.numpy(), p.numpy()), rel=1e-12)


def test_brier_multiclass_matches_definition_and_sklearn() -> None:
    probs, targets = _random_probs(400, 4, seed=4)
    onehot = torch.nn.functional.one_hot(targets, 4).double()
    expected = float(((probs - onehot) ** 2).sum(1).mean())
    assert M.brier(probs, targets) == pytest.approx(expected, rel=1e-12)
    sk = brier_score_loss(targets.numpy(), probs.numpy(), labels=[0, 1, 2, 3], scale_by_half=False)
    assert M.brier(probs, targets) == pytest.approx(sk, rel=1e-12)
    # perfect predictions score 0, maximally wrong ones score 2
    assert M.brier(torch.eye(3), torch.arange(3)) == 0.0
    assert M.brier(torch.eye(3), torch.tensor([1, 2, 0])) == pytest.approx(2.0)


# --------------------------------------------------------------------------------------------------
# calibration: bins, ECE, MCE
# --------------------------------------------------------------------------------------------------


def test_calibration_bins_hand_computed() -> None:
    # 4 binary predictions with 4 bins [0, .25], (.25, .5], (.5, .75], (.75, 1].
    # p(class 1) -> confidence max(p, 1-p), prediction p > 0.5:
    #   0.9 -> conf 0.9, bin 3, predicts 1, target 1: correct
    #   0.8 -> conf 0.8, bin 3, predicts 1, target 0: wrong
    #   0.4 -> conf 0.6, bin 2, predicts 0, target 0: correct
    #   0.65 -> conf 0.65, bin 2, predicts 1, target 0: wrong
    p = torch.tensor([0.9, 0.8, 0.4, 0.65], dtype=torch.float64)
    y = torch.tensor([1, 0, 0, 0])
    bins = M.calibration_bins(p, y, n_bins=4)
    assert bins.counts.tolist() == [0, 0, 2, 2]
    torch.testing.assert_close(bins.edges, torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0]).double())
    assert math.isnan(bins.confidence[0]) and math.isnan(bins.accuracy[1])
    torch.testing.assert_close(bins.confidence[2:], torch.tensor([0.625, 0.85]).double())
    torch.testing.assert_close(bins.accuracy[2:], torch.tensor([0.5, 0.5]).double())
    expected_ece = 0.5 * abs(0.5 - 0.625) + 0.5 * abs(0.5 - 0.85)
    assert M.ece(p, y, n_bins=4) == pytest.approx(expected_ece)
    assert M.mce(p, y, n_bins=4) == pytest.approx(0.35)


def test_calibration_bin_edges_are_right_closed() -> None:
    # confidences exactly on edges: 0.5 -> bin 1 = (.25, .5]; 0.75 -> bin 2; 1.0 -> last bin
    probs = torch.tensor([[0.5, 0.5, 0.0], [0.75, 0.25, 0.0], [1.0, 0.0, 0.0], [0.26, 0.37, 0.37]])
    y = torch.tensor([0, 0, 0, 0])
    bins = M.calibration_bins(probs, y, n_bins=4)
    assert bins.counts.tolist() == [0, 2, 1, 1]
    # confidence 0 is only possible in degenerate cases; check the first bin includes 0 via edges
    assert M.calibration_bins(probs, y, n_bins=1).counts.tolist() == [4]


def test_ece_multiclass_hand_computed() -> None:
    # 10 bins; two points at conf 0.95 (one right), two at conf 0.55 (both right)
    probs = torch.tensor(
        [[0.95, 0.03, 0.02], [0.02, 0.95, 0.03], [0.55, 0.25, 0.2], [0.2, 0.25, 0.55]],
        dtype=torch.float64,
    )
    y = torch.tensor([0, 0, 0, 2])
    expected = 0.5 * abs(0.5 - 0.95) + 0.5 * abs(1.0 - 0.55)
    assert M.ece(probs, y, n_bins=10) == pytest.approx(expected)
    assert M.mce(probs, y, n_bins=10) == pytest.approx(0.45)


def test_ece_perfectly_calibrated_is_near_zero_and_overconfident_is_not() -> None:
    g = torch.Generator().manual_seed(0)
    n, c = 200_000, 4
    logits = 1.5 * torch.randn(n, c, generator=g, dtype=torch.float64)
    probs = torch.softmax(logits, dim=1)
    targets = torch.multinomial(probs, 1, generator=g).squeeze(1)  # labels drawn from probs
    assert M.ece(probs, targets) < 0.01
    overconfident = torch.softmax(3.0 * logits, dim=1)
    assert M.ece(overconfident, targets) > 0.05
    # accuracy per bin tracks confidence per bin
    bins = M.calibration_bins(probs, targets)
    full = bins.counts > 1000
    torch.testing.assert_close(bins.accuracy[full], bins.confidence[full], atol=0.02, rtol=0)


def test_ece_binary_perfect_calibration() -> None:
    g = torch.Generator().manual_seed(1)
    p = torch.rand(100_000, generator=g, dtype=torch.float64)
    y = torch.bernoulli(p, generator=g).long()
    assert M.ece(p, y) < 0.01


# --------------------------------------------------------------------------------------------------
# entropy and OOD AUROC
# --------------------------------------------------------------------------------------------------


def test_entropy_values() -> None:
    probs = torch.tensor([[1.0, 0.0, 0.0], [1 / 3, 1 / 3, 1 / 3], [0.5, 0.5, 0.0]])
    torch.testing.assert_close(
        M.entropy(probs), torch.tensor([0.0, math.log(3), math.log(2)], dtype=torch.float64)
    )
    h = M.entropy(torch.tensor([0.0, 0.5, 0.2]))
    expected = torch.tensor([0.0, math.log(2), -(0.2 * math.log(0.2) + 0.8 * math.log(0.8))])
    torch.testing.assert_close(h, expected.double())
    assert M.entropy(probs).shape == (3,)


@pytest.mark.parametrize("score", ["max_prob", "entropy"])
def test_ood_auroc_matches_sklearn(score: str) -> None:
    p_in, _ = _random_probs(300, 5, seed=5, scale=3.0)
    p_out, _ = _random_probs(200, 5, seed=6, scale=1.0)
    if score == "max_prob":
        s_in, s_out = p_in.max(1).values, p_out.max(1).values
    else:
        s_in, s_out = -M.entropy(p_in), -M.entropy(p_out)
    labels = np.r_[np.ones(300), np.zeros(200)]
    expected = roc_auc_score(labels, np.r_[s_in.numpy(), s_out.numpy()])
    got = M.ood_auroc(p_in, p_out, score=score)
    assert got == pytest.approx(expected, abs=1e-12)
    assert got > 0.6  # sharper in-distribution predictions are separable


def test_ood_auroc_with_ties_matches_sklearn() -> None:
    g = torch.Generator().manual_seed(7)
    # binary probabilities on a coarse grid -> many tied confidences, within and across groups
    p_in = torch.randint(0, 11, (150,), generator=g).double() / 10
    p_out = torch.randint(3, 8, (120,), generator=g).double() / 10
    for score in ("max_prob", "entropy"):
        s_in = M.confidence(p_in) if score == "max_prob" else -M.entropy(p_in)
        s_out = M.confidence(p_out) if score == "max_prob" else -M.entropy(p_out)
        labels = np.r_[np.ones(150), np.zeros(120)]
        expected = roc_auc_score(labels, np.r_[s_in.numpy(), s_out.numpy()])
        assert M.ood_auroc(p_in, p_out, score=score) == pytest.approx(expected, abs=1e-12)


def test_ood_auroc_extremes() -> None:
    confident = torch.tensor([[0.99, 0.01], [0.01, 0.99]])
    uniform = torch.full((3, 2), 0.5)
    assert M.ood_auroc(confident, uniform) == 1.0
    assert M.ood_auroc(uniform, confident) == 0.0
    assert M.ood_auroc(uniform, uniform) == 0.5  # all tied


# --------------------------------------------------------------------------------------------------
# regression
# --------------------------------------------------------------------------------------------------


def test_gaussian_nll_matches_torch_distributions() -> None:
    g = torch.Generator().manual_seed(8)
    mean = torch.randn(50, 3, generator=g, dtype=torch.float64)
    var = torch.rand(50, 3, generator=g, dtype=torch.float64) + 0.1
    y = torch.randn(50, 3, generator=g, dtype=torch.float64)
    lp = torch.distributions.Normal(mean, var.sqrt()).log_prob(y)
    assert M.gaussian_nll(mean, var, y) == pytest.approx(float(-lp.sum(1).mean()), rel=1e-12)
    assert M.gaussian_nll(mean[:, 0], var[:, 0], y[:, 0]) == pytest.approx(
        float(-lp[:, 0].mean()), rel=1e-12
    )
    # scalar variance broadcasts; perfect mean with unit variance gives 0.5 log(2 pi)
    assert M.gaussian_nll(y[:, 0], torch.tensor(1.0), y[:, 0]) == pytest.approx(
        0.5 * math.log(2 * math.pi)
    )


def test_rmse() -> None:
    mean = torch.tensor([1.0, 2.0, 3.0, 4.0])
    y = torch.tensor([1.0, 2.0, 3.0, 6.0])
    assert M.rmse(mean, y) == pytest.approx(1.0)
    assert M.rmse(mean.reshape(2, 2), y.reshape(2, 2)) == pytest.approx(1.0)


def test_interval_coverage_of_correct_gaussian_is_nominal() -> None:
    g = torch.Generator().manual_seed(9)
    n = 100_000
    mean = torch.randn(n, generator=g, dtype=torch.float64)
    std = torch.rand(n, generator=g, dtype=torch.float64) + 0.2
    y = mean + std * torch.randn(n, generator=g, dtype=torch.float64)
    cov = M.interval_coverage(mean, std**2, y)
    assert set(cov) == {0.5, 0.68, 0.9, 0.95}
    for level, c in cov.items():
        assert c == pytest.approx(level, abs=0.01)
    assert M.regression_calibration_error(mean, std**2, y) < 0.01
    # an overconfident predictive (variance too small by 4x) under-covers
    cov_bad = M.interval_coverage(mean, std**2 / 4, y, levels=[0.9])
    assert cov_bad[0.9] < 0.7
    assert M.regression_calibration_error(mean, std**2 / 4, y) > 0.1


def test_interval_coverage_hand_computed() -> None:
    z95 = 1.959963984540054
    mean = torch.zeros(4)
    var = torch.ones(4)
    y = torch.tensor([0.1, -1.9, 2.0, -3.0])  # |y| <= z95 for the first two only
    assert M.interval_coverage(mean, var, y, levels=[0.95]) == {0.95: pytest.approx(0.5)}
    just_inside = torch.tensor([z95 - 1e-9, -(z95 - 1e-9), z95 + 1e-9], dtype=torch.float64)
    cov = M.interval_coverage(torch.zeros(3), torch.ones(3), just_inside, levels=[0.95])
    assert cov[0.95] == pytest.approx(2 / 3)


# --------------------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------------------


def test_classification_report_consistent() -> None:
    probs, targets = _random_probs(200, 3, seed=10)
    report = M.classification_report(probs, targets)
    assert set(report) == {"accuracy", "nll", "ece", "mce", "brier"}
    assert report["accuracy"] == M.accuracy(probs, targets)
    assert report["nll"] == M.nll(probs, targets)
    assert report["ece"] == M.ece(probs, targets)
    assert report["mce"] == M.mce(probs, targets)
    assert report["brier"] == M.brier(probs, targets)
    assert all(isinstance(v, float) for v in report.values())


# --------------------------------------------------------------------------------------------------
# bad input
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("probs", "targets", "match"),
    [
        (torch.tensor([[0.5, 0.6], [0.5, 0.5]]), torch.tensor([0, 1]), "sum to 1"),
        (torch.tensor([[2.0, -1.0]]), torch.tensor([0]), "logits"),
        (torch.tensor([[float("nan"), 0.5]]), torch.tensor([0]), "NaN"),
        (torch.tensor([0.2, float("inf")]), torch.tensor([0, 1]), "Inf"),
        (torch.tensor([[0.5, 0.5]]), torch.tensor([0, 1]), "same data points"),
        (torch.tensor([[0.5, 0.5]]), torch.tensor([2]), "0, ..., 1"),
        (torch.tensor([[0.5, 0.5]]), torch.tensor([-1]), "0, ..., 1"),
        (torch.tensor([[0.5, 0.5]]), torch.tensor([[1.0, 0.0]]), "one-hot"),
        (torch.tensor([0.3, 0.7]), torch.tensor([0.5, 1.0]), "integer class labels"),
        (torch.tensor([0.3, 0.7]), torch.tensor([0, 2]), "binary targets"),
        (torch.tensor([[0.3], [0.7]]), torch.tensor([0, 1]), "squeeze"),
        (torch.ones(2, 2, 2) / 2, torch.tensor([0, 1]), "shape"),
        (torch.empty(0, 3), torch.empty(0, dtype=torch.long), "empty"),
        (torch.tensor([[0, 1]]), torch.tensor([1]), "floating-point"),
    ],
)
def test_bad_classification_input_raises(probs, targets, match) -> None:
    for fn in (M.accuracy, M.nll, M.brier, M.ece, M.mce, M.classification_report):
        with pytest.raises(ValueError, match=match):
            fn(probs, targets)


def test_bad_options_raise() -> None:
    probs, targets = _random_probs(10, 3)
    with pytest.raises(ValueError, match="n_bins"):
        M.ece(probs, targets, n_bins=0)
    with pytest.raises(ValueError, match="eps"):
        M.nll(probs, targets, eps=0.0)
    with pytest.raises(ValueError, match="score"):
        M.ood_auroc(probs, probs, score="margin")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="same number of classes"):
        M.ood_auroc(probs, torch.full((4, 2), 0.5))
    with pytest.raises(ValueError, match="NaN"):
        M.entropy(torch.tensor([[float("nan"), 1.0]]))


def test_bad_regression_input_raises() -> None:
    mean, var, y = torch.zeros(5), torch.ones(5), torch.zeros(5)
    with pytest.raises(ValueError, match="strictly positive"):
        M.gaussian_nll(mean, torch.zeros(5), y)
    with pytest.raises(ValueError, match="reshape"):
        M.gaussian_nll(mean, var, y[:, None])  # [N, 1] vs [N] would silently broadcast
    with pytest.raises(ValueError, match="var must be a scalar"):
        M.gaussian_nll(mean, torch.ones(3), y)
    with pytest.raises(ValueError, match="NaN"):
        M.rmse(torch.tensor([0.0, float("nan")]), torch.zeros(2))
    with pytest.raises(ValueError, match="NaN"):
        M.interval_coverage(mean, var, torch.full((5,), float("nan")))
    with pytest.raises(ValueError, match="strictly between 0 and 1"):
        M.interval_coverage(mean, var, y, levels=(0.5, 1.0))
    with pytest.raises(ValueError, match="at least one"):
        M.regression_calibration_error(mean, var, y, levels=[])
    with pytest.raises(ValueError, match="empty"):
        M.rmse(torch.zeros(0), torch.zeros(0))
    with pytest.raises(ValueError, match=r"\[N\] or \[N, D\]"):
        M.rmse(torch.zeros(2, 2, 2), torch.zeros(2, 2, 2))
