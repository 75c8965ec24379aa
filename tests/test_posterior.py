"""KronLaplace: posterior, evidence and tuning against dense and closed-form answers."""

import math
import os
import pickle

import pytest
import torch
from _dense import CNN, MLP, make_data, rel_err
from scipy.optimize import minimize
from torch import nn

import laplace_kron as lk

DEFAULT_DTYPE = torch.float64  # applied per test by conftest.py


def _fit(likelihood="classification", d_out=3, curvature="kfac", n=30, model=None, **kw):
    model = model or MLP(d_out=d_out)
    x, y = make_data(likelihood, n, d_out)
    la = lk.KronLaplace(model, likelihood, curvature=curvature, fisher="exact", **kw)
    la.fit([(x[: n // 2], y[: n // 2]), (x[n // 2 :], y[n // 2 :])])
    return la, model, x, y


def _dense_evidence(la, model, x, y, delta_per_param, sigma=1.0, T=1.0):
    H = la.curvature.to_dense()
    f = model(x).detach()
    if la.likelihood == "regression":
        f = f.reshape(y.shape)
        sse = ((f - y) ** 2).sum()
        loglik = -0.5 * sse / (sigma**2 * T) - y.numel() * math.log(sigma * math.sqrt(2 * math.pi))
        c = 1 / (T * sigma**2)
    else:
        loglik = -nn.functional.cross_entropy(f, y, reduction="sum") / T
        c = 1 / T
    Lam = c * H + torch.diag(delta_per_param)
    theta = la.mean
    return (
        loglik
        - 0.5 * (delta_per_param * theta**2).sum()
        + 0.5 * delta_per_param.log().sum()
        - 0.5 * torch.linalg.slogdet(Lam)[1]
    ), Lam


def _per_param(la, delta):
    out = torch.empty(la.n_params)
    for b, d in zip(la.curvature.blocks, la.block_deltas(torch.as_tensor(delta)), strict=True):
        out[la.curvature.block_index(b)] = d
    return out


@pytest.mark.parametrize("curvature", ["kfac", "ekfac"])
@pytest.mark.parametrize("likelihood,d_out", [("classification", 3), ("regression", 2)])
@pytest.mark.parametrize("layerwise", [False, True])
def test_evidence_matches_dense(curvature, likelihood, d_out, layerwise):
    sigma = 0.7 if likelihood == "regression" else 1.0
    la, model, x, y = _fit(likelihood, d_out, curvature, temperature=1.5, sigma_noise=sigma)
    delta = torch.tensor([0.3, 2.0, 5.0]) if layerwise else torch.tensor(0.8)
    la.prior_precision = delta
    ref, Lam = _dense_evidence(la, model, x, y, _per_param(la, delta), sigma, 1.5)
    assert abs(float(la.log_marginal_likelihood()) - float(ref)) < 1e-8 * abs(float(ref))
    assert rel_err(la.posterior_precision.to_dense(), Lam) < 1e-10
    assert rel_err(la.posterior_covariance.to_dense(), torch.linalg.inv(Lam)) < 1e-10
    torch.testing.assert_close(la.log_det_posterior_precision(), torch.linalg.slogdet(Lam)[1])
    v = torch.randn(la.n_params)
    torch.testing.assert_close(la.posterior_precision @ v, Lam @ v)


def test_evidence_gradient_matches_finite_differences():
    la, *_ = _fit("regression", 2, "ekfac", sigma_noise=0.8)
    delta = torch.tensor([0.5, 1.5, 3.0], requires_grad=True)
    sigma = torch.tensor(0.8, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda d, s: la.log_marginal_likelihood(d, s), (delta, sigma), eps=1e-6, atol=1e-6
    )


@pytest.mark.parametrize("granularity", ["scalar", "layer"])
def test_marglik_and_mackay_reach_the_same_optimum(granularity):
    la, *_ = _fit("regression", 2, "kfac", n=40)
    r1 = la.optimize_prior_precision("marglik", granularity, tune_sigma_noise=True, tol=1e-10)
    d1, s1, e1 = la.prior_precision.clone(), float(la.sigma_noise), r1["log_marglik"]
    la.prior_precision, la.sigma_noise = 1.0, 1.0
    r2 = la.optimize_prior_precision("mackay", granularity, tune_sigma_noise=True, n_steps=2000)
    assert r1["converged"] and r2["converged"]
    torch.testing.assert_close(la.prior_precision, d1, rtol=1e-4, atol=0)
    assert abs(float(la.sigma_noise) - s1) < 1e-4 * s1
    assert abs(r2["log_marglik"] - e1) < 1e-7 * abs(e1)
    # the optimum is a maximum: perturbing delta lowers the evidence
    for f in (0.8, 1.25):
        assert float(la.log_marginal_likelihood(la.prior_precision * f)) < r2["log_marglik"]


def _conjugate(X, y, delta, sigma):
    """Closed-form Bayesian linear regression: MAP, posterior precision and log evidence."""
    N, P = X.shape
    prec = X.T @ X / sigma**2 + delta * torch.eye(P)
    theta = torch.linalg.solve(prec, X.T @ y / sigma**2)
    cov_y = sigma**2 * torch.eye(N) + X @ X.T / delta
    dist = torch.distributions.MultivariateNormal(torch.zeros(N), cov_y)
    return theta, prec, dist.log_prob(y)


def test_bayesian_linear_regression_is_exact():
    g = torch.Generator().manual_seed(1)
    N, D = 50, 3
    X = torch.randn(N, D, generator=g)
    y = X @ torch.tensor([1.0, -2.0, 0.5]) + 0.3 + 0.4 * torch.randn(N, generator=g)
    Xa = torch.cat([X, torch.ones(N, 1)], 1)
    model = nn.Linear(D, 1)

    def set_map(delta, sigma):
        theta, prec, ev = _conjugate(Xa, y, delta, sigma)
        with torch.no_grad():
            model.weight.copy_(theta[:D].reshape(1, D))
            model.bias.copy_(theta[D:])
        return prec, ev

    delta, sigma = 0.7, 0.5
    prec, ev = set_map(delta, sigma)
    la = lk.KronLaplace(
        model, "regression", fisher="exact", prior_precision=delta, sigma_noise=sigma
    ).fit([(X, y)])
    assert rel_err(la.posterior_precision.to_dense(), prec) < 1e-12
    assert abs(float(la.log_marginal_likelihood()) - float(ev)) < 1e-8 * abs(float(ev))

    # Optimal (delta, sigma) of the exact evidence, with the MAP moving along.
    def neg(z):
        return -float(_conjugate(Xa, y, math.exp(z[0]), math.exp(z[1]))[2])

    res = minimize(neg, [0.0, 0.0], method="Nelder-Mead", options={"xatol": 1e-10, "fatol": 1e-12})
    d_opt, s_opt = math.exp(res.x[0]), math.exp(res.x[1])
    set_map(d_opt, s_opt)
    la = lk.KronLaplace(model, "regression", fisher="exact").fit([(X, y)])
    for method in ("mackay", "marglik"):
        la.prior_precision, la.sigma_noise = 1.0, 1.0
        la.optimize_prior_precision(method, tune_sigma_noise=True, n_steps=5000, tol=1e-12)
        assert abs(float(la.prior_precision) - d_opt) < 1e-4 * d_opt, method
        assert abs(float(la.sigma_noise) - s_opt) < 1e-5 * s_opt, method


@pytest.mark.parametrize("curvature", ["kfac", "ekfac"])
def test_samples_have_posterior_mean_and_covariance(curvature):
    la, *_ = _fit("classification", 3, curvature, prior_precision=2.0)
    gen = torch.Generator().manual_seed(0)
    S = la.sample(40000, generator=gen)
    cov = la.posterior_covariance.to_dense()
    se = cov.diagonal().sqrt() / math.sqrt(40000)
    assert ((S.mean(0) - la.mean).abs() < 5 * se).all()
    # Whitened samples have identity covariance; E||C_hat - I||_F^2 ~= P (P + 1) / n.
    L = torch.linalg.cholesky(cov)
    W = torch.linalg.solve_triangular(L, (S - la.mean).T, upper=False)
    err = (W @ W.T / W.shape[1] - torch.eye(la.n_params)).norm()
    assert err < 1.3 * math.sqrt(la.n_params * (la.n_params + 1) / W.shape[1])
    S2 = la.sample(40000, generator=torch.Generator().manual_seed(0))
    assert torch.equal(S2, S)  # reproducible from the generator


def test_last_layer_and_cnn_posterior():
    model = CNN(d_out=3)
    x, y = make_data("classification", 8, 3, (2, 6, 6))
    la = lk.KronLaplace(model, "classification", modules="last_layer").fit([(x, y)])
    assert la.param_names == ["5.weight", "5.bias"] and la.n_params == 15
    la_full = lk.KronLaplace(model, "classification", curvature="ekfac").fit([(x, y)])
    assert la_full.n_blocks == 3
    la_full.optimize_prior_precision(granularity="layer")
    assert la_full.prior_precision.shape == (3,)


# ------------------------------------------------------------------ persistence
def test_save_load_round_trip(tmp_path):
    la, model, *_ = _fit("regression", 2, "ekfac", sigma_noise=0.6, prior_precision=[1.0, 2.0, 3.0])
    path = tmp_path / "la.pt"
    la.save(path)
    la2 = lk.KronLaplace.load(path, model)
    assert la2.curvature_type == "ekfac"
    torch.testing.assert_close(la2.mean, la.mean, rtol=0, atol=0)
    torch.testing.assert_close(la2.prior_precision, la.prior_precision, rtol=0, atol=0)
    assert float(la2.log_marginal_likelihood()) == float(la.log_marginal_likelihood())
    assert torch.equal(la2.posterior_precision.to_dense(), la.posterior_precision.to_dense())
    la3 = lk.KronLaplace(model, "regression", curvature="ekfac").load_state_dict(la.state_dict())
    assert float(la3.log_marginal_likelihood()) == float(la.log_marginal_likelihood())


def test_load_into_mismatched_model_is_rejected(tmp_path):
    la, *_ = _fit()
    path = tmp_path / "la.pt"
    la.save(path)
    with pytest.raises(ValueError, match="shapes differ"):
        lk.KronLaplace.load(path, MLP(hidden=6))
    with pytest.raises(ValueError, match="likelihood"):
        lk.KronLaplace(MLP(), "regression").load_state_dict(la.state_dict())
    with pytest.raises(ValueError, match="cover"):
        lk.KronLaplace(MLP(), "classification", modules="last_layer").load_state_dict(
            la.state_dict()
        )


def test_tampered_files_are_rejected(tmp_path):
    la, model, *_ = _fit()
    state = la.state_dict()
    bad = dict(state, format="something else")
    torch.save(bad, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="format"):
        lk.KronLaplace.load(tmp_path / "bad.pt", model)
    broken = dict(state, blocks=[dict(state["blocks"][0], G=torch.full((5, 5), float("nan")))])
    with pytest.raises(ValueError):
        lk.KronLaplace(model, "classification").load_state_dict(broken)
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    with open(tmp_path / "evil.pt", "wb") as fh:
        pickle.dump({"format": "laplace_kron.KronLaplace", "payload": Evil()}, fh)
    with pytest.raises(ValueError, match="refusing to load|cannot read"):
        lk.KronLaplace.load(tmp_path / "evil.pt", model)
    assert not marker.exists()


# ------------------------------------------------------------------ bad input
def test_hyperparameter_validation():
    with pytest.raises(ValueError, match="prior_precision must be positive"):
        lk.KronLaplace(MLP(), "classification", prior_precision=0.0)
    with pytest.raises(ValueError, match="prior_precision must be positive"):
        lk.KronLaplace(MLP(), "classification", prior_precision=float("nan"))
    with pytest.raises(ValueError, match="sigma_noise must be positive"):
        lk.KronLaplace(MLP(), "regression", sigma_noise=-1.0)
    with pytest.raises(ValueError, match="only used for likelihood='regression'"):
        lk.KronLaplace(MLP(), "classification", sigma_noise=2.0)
    with pytest.raises(ValueError, match="curvature must be one of"):
        lk.KronLaplace(MLP(), "classification", curvature="diag")
    la = lk.KronLaplace(MLP(), "classification")
    with pytest.raises(RuntimeError, match=r"not fitted yet.*fit\(data\)"):
        la.log_marginal_likelihood()
    with pytest.raises(RuntimeError, match="not fitted yet"):
        la.sample(3)
    la, *_ = _fit()
    with pytest.raises(ValueError, match="3 blocks"):
        la.prior_precision = [1.0, 2.0]
    with pytest.raises(ValueError, match="method must be one of"):
        la.optimize_prior_precision("bayes")
    with pytest.raises(ValueError, match="needs val_loader"):
        la.optimize_prior_precision("gridsearch")
    with pytest.raises(ValueError, match="tune_sigma_noise"):
        la.optimize_prior_precision(tune_sigma_noise=True)


def test_failed_fit_keeps_previous_state():
    la, model, x, y = _fit()
    before = float(la.log_marginal_likelihood())
    bad = x.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        la.fit([(bad, y)])
    assert float(la.log_marginal_likelihood()) == before


def test_scalar_newton_matches_lbfgs_and_mackay():
    la, *_ = _fit("classification", 3, "ekfac", n=40)
    r_newton = la.optimize_prior_precision(tol=1e-12)
    d_newton = float(la.prior_precision)
    la.prior_precision = 1.0
    la.optimize_prior_precision(granularity="layer", n_steps=1)  # warm path unaffected
    la.prior_precision = 1.0
    la.optimize_prior_precision("mackay", tol=1e-13, n_steps=10000)
    assert r_newton["converged"] and r_newton["iterations"] < 30
    assert abs(float(la.prior_precision) - d_newton) < 1e-7 * d_newton
    la.prior_precision = 1.0
    la.optimize_prior_precision(optimizer="adam", n_steps=3000, lr=0.05, tol=1e-10)
    assert abs(float(la.prior_precision) - d_newton) < 1e-3 * d_newton


def test_optimizer_names_what_runs():
    """``optimizer="lbfgs"`` runs L-BFGS (it used to run Newton silently for a scalar prior);
    Newton is the default where it applies and is refused where it does not."""
    la, *_ = _fit()
    r_default = la.optimize_prior_precision(tol=1e-10)
    d_newton = float(la.prior_precision)
    assert r_default["optimizer"] == "newton"
    la.prior_precision = 1.0
    r_lbfgs = la.optimize_prior_precision(optimizer="lbfgs", tol=1e-10)
    assert r_lbfgs["optimizer"] == "lbfgs" and r_lbfgs["evaluations"] > r_lbfgs["iterations"] - 1
    assert abs(float(la.prior_precision) - d_newton) < 1e-5 * d_newton
    with pytest.raises(ValueError, match="optimizer='newton' tunes one scalar"):
        la.optimize_prior_precision(granularity="layer", optimizer="newton")
    with pytest.raises(ValueError, match="optimizer must be one of"):
        la.optimize_prior_precision(optimizer="sgd")
    with pytest.raises(ValueError, match="applies to method='marglik' only"):
        la.optimize_prior_precision(method="mackay", optimizer="adam")


def test_prior_mean_enters_the_evidence_exactly():
    """Bayesian linear regression with prior N(mu_0, delta^-1 I): the Laplace evidence at the MAP
    of that prior equals the closed form, for mu_0 as a vector, a mapping and a number."""
    g = torch.Generator().manual_seed(3)
    N, D = 40, 3
    X = torch.randn(N, D, generator=g)
    y = X @ torch.tensor([1.0, -2.0, 0.5]) + 0.3 + 0.4 * torch.randn(N, generator=g)
    Xa = torch.cat([X, torch.ones(N, 1)], 1)
    mu0 = torch.tensor([0.5, -1.0, 0.2, 0.1])
    delta, sigma = 1.7, 0.6
    # MAP and evidence of y - X mu_0 ~ N(0, sigma^2 I + X X^T / delta)
    prec = Xa.T @ Xa / sigma**2 + delta * torch.eye(D + 1)
    theta = torch.linalg.solve(prec, Xa.T @ y / sigma**2 + delta * mu0)
    cov_y = sigma**2 * torch.eye(N) + Xa @ Xa.T / delta
    ev = torch.distributions.MultivariateNormal(Xa @ mu0, cov_y).log_prob(y)
    model = nn.Linear(D, 1)
    with torch.no_grad():
        model.weight.copy_(theta[:D].reshape(1, D))
        model.bias.copy_(theta[D:])
    kw = dict(fisher="exact", prior_precision=delta, sigma_noise=sigma)
    forms = [mu0, {"weight": mu0[:D].reshape(1, D), "bias": mu0[D:]}]
    for form in forms:
        la = lk.KronLaplace(model, "regression", prior_mean=form, **kw).fit([(X, y)])
        assert abs(float(la.log_marginal_likelihood()) - float(ev)) < 1e-10 * abs(float(ev))
    zero = lk.KronLaplace(model, "regression", **kw).fit([(X, y)])
    assert float(zero.log_marginal_likelihood()) != pytest.approx(float(ev), rel=1e-6)
    const = lk.KronLaplace(model, "regression", prior_mean=0.25, **kw).fit([(X, y)])
    ref = lk.KronLaplace(model, "regression", prior_mean=torch.full((D + 1,), 0.25), **kw)
    ref.fit([(X, y)])
    assert float(const.log_marginal_likelihood()) == float(ref.log_marginal_likelihood())
    for bad, msg in [
        (torch.ones(3), "vector of the 4 covered"),
        ({"weight": torch.ones(1, D)}, "missing"),
        (torch.tensor([0.0, float("nan"), 0.0, 0.0]), "NaN"),
    ]:
        with pytest.raises(ValueError, match=msg):
            lk.KronLaplace(model, "regression", prior_mean=bad)


def test_prior_mean_is_saved_and_loaded(tmp_path):
    la, model, *_ = _fit("regression", 2, "kfac")
    la.prior_mean = torch.linspace(-1, 1, la.n_params)
    la.save(tmp_path / "la.pt")
    la2 = lk.KronLaplace.load(tmp_path / "la.pt", model)
    torch.testing.assert_close(la2.prior_mean, la.prior_mean, rtol=0, atol=0)
    assert float(la2.log_marginal_likelihood()) == float(la.log_marginal_likelihood())


def test_fit_with_reset_false_accumulates_data_in_parts():
    """Two KFAC fits with ``reset=False`` give the curvature and evidence of one fit on all the
    data (Kronecker and diagonal blocks); EKFAC refuses; moved parameters warn."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.Tanh(), nn.Linear(6, 3))
    g = torch.Generator().manual_seed(0)
    X, y = torch.randn(30, 4, generator=g), torch.randint(0, 3, (30,), generator=g)
    whole = lk.KronLaplace(model, "classification", fisher="exact").fit(
        [(X[:12], y[:12]), (X[12:], y[12:])]
    )
    parts = lk.KronLaplace(model, "classification", fisher="exact").fit([(X[:12], y[:12])])
    parts.fit([(X[12:], y[12:])], reset=False)
    assert parts.num_data == 30 and any(
        type(b).__name__ == "DiagBlock" for b in parts.curvature.blocks
    )
    torch.testing.assert_close(parts.curvature.to_dense(), whole.curvature.to_dense())
    torch.testing.assert_close(parts.log_marginal_likelihood(), whole.log_marginal_likelihood())
    fresh = lk.KronLaplace(model, "classification", fisher="exact").fit([(X[12:], y[12:])])
    assert fresh.num_data == 18  # reset=True (the default) starts over
    e = lk.KronLaplace(model, "classification", "ekfac", fisher="exact").fit([(X, y)])
    with pytest.raises(ValueError, match="EKFAC curvatures cannot be accumulated"):
        e.fit([(X, y)], reset=False)
    with torch.no_grad():
        model[0].weight.add_(0.1)
    with pytest.warns(UserWarning, match="parameters moved"):
        parts.fit([(X, y)], reset=False)
