"""Marginal-likelihood training against the conjugate optimum of Bayesian linear regression."""

from __future__ import annotations

import math

import pytest
import torch
from scipy.optimize import minimize
from test_posterior import _conjugate
from torch import nn

import laplace_kron as lk

DEFAULT_DTYPE = torch.float64


def test_marglik_training_recovers_the_conjugate_optimum():
    """Alternating "train to the MAP of the hyperparameters" and "maximise the Laplace evidence at
    those weights" converges to the optimum of the exact evidence of Bayesian linear regression."""
    g = torch.Generator().manual_seed(1)
    N, D = 50, 3
    X = torch.randn(N, D, generator=g)
    y = X @ torch.tensor([1.0, -2.0, 0.5]) + 0.3 + 0.4 * torch.randn(N, generator=g)
    Xa = torch.cat([X, torch.ones(N, 1)], 1)

    def neg(z):
        return -float(_conjugate(Xa, y, math.exp(z[0]), math.exp(z[1]))[2])

    res = minimize(neg, [0.0, 0.0], method="Nelder-Mead", options={"xatol": 1e-10, "fatol": 1e-12})
    d_opt, s_opt = math.exp(res.x[0]), math.exp(res.x[1])

    torch.manual_seed(0)
    model = nn.Linear(D, 1)
    la, report = lk.marglik_training(
        model,
        [(X, y.unsqueeze(1))],
        "regression",
        n_epochs=1500,
        lr=0.05,
        granularity="scalar",
        n_epochs_burnin=0,
        marglik_frequency=25,
        fisher="exact",
    )
    assert abs(float(la.prior_precision) - d_opt) < 2e-3 * d_opt
    assert abs(float(la.sigma_noise) - s_opt) < 2e-3 * s_opt
    theta, *_ = _conjugate(Xa, y, float(la.prior_precision), float(la.sigma_noise))
    torch.testing.assert_close(la.mean, theta, rtol=1e-4, atol=1e-5)
    assert [r["epoch"] for r in report["refits"]] == list(range(25, 1501, 25))
    assert report["epochs"] == 1500
    evidences = [r["log_marglik"] for r in report["refits"]]
    assert evidences[-1] >= max(evidences) - 1e-6  # no refit ends below a previous one at the end


def test_marglik_training_classification_runs_and_reports():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(60, 4, generator=g)
    y = (X[:, 0] + X[:, 1] > 0).long() + (X[:, 2] > 1).long()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    loader = [(X[:30], y[:30]), (X[30:], y[30:])]
    la, report = lk.marglik_training(
        model,
        loader,
        "classification",
        n_epochs=12,
        lr=0.01,
        n_epochs_burnin=4,
        marglik_frequency=4,
        fisher="exact",
    )
    assert [r["epoch"] for r in report["refits"]] == [4, 8, 12]
    assert la.prior_precision.shape == (la.n_blocks,) and la.n_blocks == 2
    assert len(report["train_loss"]) == 12 and report["train_loss"][-1] < report["train_loss"][0]
    probs = la.predict(X)
    torch.testing.assert_close(probs.sum(-1), torch.ones(60))


@pytest.mark.parametrize(
    ("kw", "msg"),
    [
        ({"n_epochs": 0}, "n_epochs must be a positive integer"),
        ({"marglik_frequency": 0}, "marglik_frequency must be a positive integer"),
        ({"n_epochs_burnin": -1}, "n_epochs_burnin must be a non-negative integer"),
        ({"lr": 0.0}, "lr must be positive"),
        ({"fisherman": "exact"}, "fisherman"),
    ],
)
def test_marglik_training_rejects_bad_arguments(kw, msg):
    with pytest.raises((ValueError, TypeError), match=msg):
        lk.marglik_training(
            nn.Linear(2, 1), [(torch.ones(3, 2), torch.ones(3, 1))], "regression", **kw
        )


@pytest.mark.parametrize("kind", ["KFAC", "EKFAC"])
def test_from_optimizer_equals_an_empirical_fit_when_the_weights_did_not_move(kind):
    """One preconditioner step on the full batch, no optimizer step: the posterior built from
    its factors equals a fresh empirical-Fisher fit on the same batch (KFAC and EKFAC)."""
    g = torch.Generator().manual_seed(0)
    X = torch.randn(40, 5, generator=g)
    y = torch.randint(0, 3, (40,), generator=g)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3))
    precond = getattr(lk.optim, kind)(model, eps=1e-3)
    nn.functional.cross_entropy(model(X), y).backward()  # a mean loss, as the optimizer expects
    precond.step()
    precond.remove()
    la = lk.KronLaplace.from_optimizer(model, precond, "classification", [(X, y)])
    ref = lk.KronLaplace(model, "classification", kind.lower(), fisher="empirical").fit([(X, y)])
    assert la.curvature.kind == kind.lower() and la.num_data == 40
    torch.testing.assert_close(la.curvature.to_dense(), ref.curvature.to_dense())
    torch.testing.assert_close(la.log_marginal_likelihood(), ref.log_marginal_likelihood())
    with pytest.raises(ValueError, match="no factors yet"):
        lk.KronLaplace.from_optimizer(model, lk.optim.KFAC(model, eps=1e-3), "classification", [])
