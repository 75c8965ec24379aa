"""Per-parameter (diagonal) prior precision, granularity="diag" (issue 16 item 3).

Ground truth (float64, tiny models): the dense posterior precision ``Q (c E + diag(Q^T D Q)) Q^T``
built by hand from each Kronecker block's factors (``c diag(h) + D`` for diagonal blocks), its
inverse, log-determinant and the evidence (value and gradient) computed densely; constant ``D``
against today's scalar / per-block numbers; MacKay's fixed point; the GLM covariance ``J Sigma
J^T``; Bayesian linear regression in closed form.
"""

import pytest
import torch
from _dense import jacobian, rel_err
from test_capture_uses import HFConv1D
from test_diagonal_blocks import Scale
from torch import nn

import laplace_kron as lk
from laplace_kron.diagprior import DiagPrior, param_deltas
from laplace_kron.kron import DiagBlock

DEFAULT_DTYPE = torch.float64  # applied per test by conftest.py


class Net(nn.Sequential):
    def __init__(self, d_out=3):
        super().__init__(
            HFConv1D(5, 3), nn.Tanh(), Scale(5), nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, d_out)
        )


def _fit(likelihood="classification", curvature="kfac", n=20, sigma=1.0, **kw):
    d_out = 3 if likelihood == "classification" else 2
    model = Net(d_out).eval()
    x = torch.randn(n, 3)
    y = torch.randint(0, d_out, (n,)) if likelihood == "classification" else torch.randn(n, d_out)
    la = lk.KronLaplace(model, likelihood, curvature, fisher="exact", sigma_noise=sigma, **kw)
    return la.fit([(x[: n // 2], y[: n // 2]), (x[n // 2 :], y[n // 2 :])]), x, y


def _dense_precision(la, delta, c):
    """``Q (c E + diag(Q^T D Q)) Q^T`` per Kronecker block, ``c diag(h) + D`` per diagonal block,
    built from the factors (parameter order; differentiable in ``delta`` and ``c``)."""
    curv = la.curvature
    out = torch.zeros(curv.n_params, curv.n_params)
    for b in curv.blocks:
        idx = curv.block_index(b)
        d = delta[idx]
        if isinstance(b, DiagBlock):
            M = torch.diag(c * b.values.flatten() + d)
        else:
            Q = torch.kron(b.eig_G.vectors, b.eig_A.vectors)  # Kronecker (matrix-view) order
            Dt = torch.diagonal(Q.T @ torch.diag(b.vec_to_mat(d).flatten()) @ Q)
            K = Q @ torch.diag(c * b.eigvals().flatten() + Dt) @ Q.T
            perm = b.param_permutation()
            M = torch.zeros_like(K)
            M[perm.unsqueeze(1), perm.unsqueeze(0)] = K
        out[idx.unsqueeze(1), idx.unsqueeze(0)] = M
    return out


def _dense_evidence(la, delta, sigma=None):
    """The evidence with the dense precision of :func:`_dense_precision`."""
    sigma = la.sigma_noise if sigma is None else sigma
    c = la.precision_scale(sigma)
    Lam = _dense_precision(la, delta, c)
    sq = la.mean**2
    prior = -0.5 * (delta * sq).sum() + 0.5 * delta.log().sum() - 0.5 * torch.logdet(Lam)
    return lk.marglik.log_likelihood(la, sigma) + prior


def _delta(la, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(la.n_params, generator=g) * 5 + 0.1


@pytest.mark.parametrize("curvature", ["kfac", "ekfac"])
@pytest.mark.parametrize("likelihood", ["classification", "regression"])
def test_precision_covariance_evidence_and_gradient_match_dense(curvature, likelihood):
    la, *_ = _fit(likelihood, curvature, sigma=0.7 if likelihood == "regression" else 1.0)
    assert {type(b).__name__ for b in la.curvature.blocks} == {"KronBlock", "DiagBlock"}
    delta = _delta(la)
    la.prior_precision = delta
    c = la.precision_scale()
    Lam = _dense_precision(la, delta, c)
    Sig = torch.linalg.inv(Lam)
    assert rel_err(la.posterior_precision.to_dense(), Lam) < 1e-12
    assert rel_err(la.posterior_covariance.to_dense(), Sig) < 1e-10
    v = torch.randn(la.n_params)
    torch.testing.assert_close(la.posterior_precision @ v, Lam @ v)
    torch.testing.assert_close(la.posterior_covariance @ v, Sig @ v)
    torch.testing.assert_close(la.log_det_posterior_precision(), torch.logdet(Lam))
    torch.testing.assert_close(la.posterior_precision.logdet(), torch.logdet(Lam))
    torch.testing.assert_close(la.log_det_prior_precision(), delta.log().sum())
    torch.testing.assert_close(la.scatter(), (delta * la.mean**2).sum())
    # The exact diagonal of Sigma from the squared eigenvectors.
    torch.testing.assert_close(DiagPrior.of(la.curvature).variance(c, delta), Sig.diagonal())
    # Sampling: Lambda^{-1/2} (Lambda^{-1/2})^T = Sigma.
    R = la.curvature.inv_sqrt_matvec(torch.eye(la.n_params), *la.damping())
    torch.testing.assert_close(R @ R.T, Sig)
    # Evidence and its gradient in delta (and sigma) against the dense computation.
    d = delta.clone().requires_grad_(True)
    s = la.sigma_noise.clone().requires_grad_(likelihood == "regression")
    ev = la.log_marginal_likelihood(d, s if likelihood == "regression" else None)
    d_ref = delta.clone().requires_grad_(True)
    s_ref = la.sigma_noise.clone().requires_grad_(likelihood == "regression")
    ref = _dense_evidence(la, d_ref, s_ref)
    torch.testing.assert_close(ev, ref, rtol=1e-12, atol=1e-10)
    wrt, wrt_ref = ([d, s], [d_ref, s_ref]) if likelihood == "regression" else ([d], [d_ref])
    for g, gr in zip(torch.autograd.grad(ev, wrt), torch.autograd.grad(ref, wrt_ref)):
        torch.testing.assert_close(g, gr, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("curvature", ["kfac", "ekfac"])
def test_constant_prior_per_block_equals_scalar_and_layer(curvature):
    la, x, _ = _fit("regression", curvature, sigma=0.8)
    for value in (torch.tensor(1.7), torch.linspace(0.5, 3.0, la.n_blocks)):
        la.prior_precision = value
        ref = {
            "Lam": la.posterior_precision.to_dense(),
            "ev": la.log_marginal_likelihood(),
            "logdet": la.log_det_posterior_precision(),
            "cov": la.functional_covariance(x[:4]),
            "sample": la.sample(3, generator=torch.Generator().manual_seed(0)),
        }
        la.prior_precision = param_deltas(value, la.curvature).clone()
        assert la.prior_precision.shape == (la.n_params,)
        assert rel_err(la.posterior_precision.to_dense(), ref["Lam"]) < 1e-12
        assert abs(float(la.log_marginal_likelihood() - ref["ev"])) < 1e-12 * abs(float(ref["ev"]))
        assert abs(float(la.log_det_posterior_precision() - ref["logdet"])) < 1e-10
        assert rel_err(la.functional_covariance(x[:4]), ref["cov"]) < 1e-12
        sample = la.sample(3, generator=torch.Generator().manual_seed(0))
        assert rel_err(sample, ref["sample"]) < 1e-12


def test_glm_predictive_and_joint_covariance_match_dense():
    la, x, _ = _fit("classification", "ekfac")
    la.prior_precision = _delta(la, 3)
    Sig = torch.linalg.inv(_dense_precision(la, la.prior_precision, la.precision_scale()))
    x = x[:4]
    J = jacobian(la.model, x, la.param_names)  # [B, C, P]
    ref = J @ Sig @ J.mT
    for kw in ({}, {"chunk_size": 30, "batch_size": 2, "vectorize": False}):
        assert rel_err(la.functional_covariance(x, **kw), ref) < 1e-10
    Jf = J.reshape(-1, J.shape[-1])
    assert rel_err(la.functional_covariance(x, joint=True), Jf @ Sig @ Jf.T) < 1e-10
    torch.testing.assert_close(la.functional_variance(x), ref.diagonal(dim1=1, dim2=2))
    p = la.predict(x, method="nn", n_samples=3, generator=torch.Generator().manual_seed(0))
    assert p.shape == (4, 3) and torch.allclose(p.sum(-1), torch.ones(4))


def test_mackay_reaches_its_fixed_point_without_lowering_the_evidence():
    la, *_ = _fit("regression", "kfac", sigma=0.5)
    la.prior_precision = 1.0
    evidence = [float(la.log_marginal_likelihood())]
    for _ in range(5):  # one step at a time: the evidence never decreases
        la.optimize_prior_precision("mackay", "diag", n_steps=1)
        evidence.append(float(la.log_marginal_likelihood()))
    assert all(b >= a - 1e-9 for a, b in zip(evidence, evidence[1:]))
    # ... also from scattered per-parameter values, where MacKay's own update overshoots
    prior, sq, c = DiagPrior.of(la.curvature), la.mean**2, float(la.precision_scale())
    taken = set()
    for seed in range(6):
        u = torch.rand(la.n_params, generator=torch.Generator().manual_seed(seed))
        delta = torch.exp(4 * u - 2)
        for omega in (1.2, 2.0):  # the step taken shows in the new omega
            new, gamma, omega_new = prior.mackay_step(c, delta, sq, omega)
            assert prior.log_evidence(c, new, sq) >= prior.log_evidence(c, delta, sq)
            torch.testing.assert_close(gamma, 1 - delta * prior.variance(c, delta))
            taken.add({omega: "mackay", 1.5 * omega: "relaxed", 1.5: "mm"}[omega_new])
    assert taken == {"mackay", "relaxed", "mm"}
    report = la.optimize_prior_precision("mackay", "diag", n_steps=5000, tol=1e-10)
    assert report["converged"] and report["log_marglik"] >= evidence[-1] - 1e-9
    delta = la.prior_precision
    assert delta.shape == (la.n_params,)
    var = DiagPrior.of(la.curvature).variance(la.precision_scale(), delta)
    # delta_i = gamma_i / theta_i^2 with gamma_i = 1 - delta_i Sigma_ii
    torch.testing.assert_close(
        delta * (la.mean**2 + var), torch.ones(la.n_params), atol=1e-7, rtol=0
    )
    # ... the evidence is stationary there, so the gradient path finds the same optimum.
    ld = delta.log().requires_grad_(True)
    (g,) = torch.autograd.grad(la.log_marginal_likelihood(ld.exp()), ld)
    assert float(g.abs().max()) < 1e-6
    la.prior_precision = 1.0
    r = la.optimize_prior_precision("marglik", "diag", n_steps=500, tol=1e-9)
    assert abs(r["log_marglik"] - report["log_marglik"]) < 1e-6
    assert rel_err(la.prior_precision, delta) < 1e-4


def test_diag_tuning_with_noise_and_from_other_granularities():
    la, *_ = _fit("regression", "ekfac", sigma=0.5)
    la.prior_precision = torch.linspace(0.5, 2.0, la.n_blocks)
    before = float(la.log_marginal_likelihood())
    for method in ("mackay", "marglik"):
        r = la.optimize_prior_precision(method, "diag", tune_sigma_noise=True, n_steps=300)
        assert la.prior_precision.shape == (la.n_params,) and r["log_marglik"] > before
    # back to per block: the block means of the per-parameter values are the start
    la.optimize_prior_precision("marglik", "layer")
    assert la.prior_precision.shape == (la.n_blocks,)


def test_bayesian_linear_regression_closed_form():
    """One Linear layer with one output: G is 1 x 1, the eigenbasis is A's. ``D~ = diag(Q_A^T D
    Q_A)`` is exact where the design's Gram matrix is diagonal (Q_A a permutation); then the
    Laplace evidence is Bayesian linear regression's closed form with a per-weight prior."""
    n, d, sigma = 40, 3, 0.3
    raw = torch.randn(n, d)
    raw = raw - raw.mean(0)  # orthogonal to the bias column of ones
    Qx, _ = torch.linalg.qr(raw)
    X = Qx * torch.tensor([3.0, 2.0, 1.0])  # orthogonal columns, distinct norms
    Xa = torch.cat([X, torch.ones(n, 1)], 1)  # [W | b]
    delta = torch.tensor([0.5, 2.0, 7.0, 0.2])
    y = Xa @ torch.tensor([1.0, -2.0, 0.5, 0.3]) + sigma * torch.randn(n)
    Lam = Xa.T @ Xa / sigma**2 + torch.diag(delta)
    theta = torch.linalg.solve(Lam, Xa.T @ y / sigma**2)  # the MAP under this prior
    model = nn.Linear(d, 1)
    with torch.no_grad():
        model.weight.copy_(theta[:d].reshape(1, d))
        model.bias.copy_(theta[d:])
    la = lk.KronLaplace(model, "regression", fisher="exact", sigma_noise=sigma)
    la.fit([(X, y.reshape(n, 1))])
    la.prior_precision = {"weight": delta[:d].reshape(1, d), "bias": delta[d:]}
    assert la.prior_precision.shape == (d + 1,)
    torch.testing.assert_close(la.posterior_precision.to_dense(), Lam)
    marginal = torch.distributions.MultivariateNormal(
        torch.zeros(n), sigma**2 * torch.eye(n) + Xa @ torch.diag(1 / delta) @ Xa.T
    )
    torch.testing.assert_close(la.log_marginal_likelihood(), marginal.log_prob(y))
    x_test = torch.randn(5, d)
    Jt = torch.cat([x_test, torch.ones(5, 1)], 1)
    var = la.functional_variance(x_test).reshape(-1)
    torch.testing.assert_close(var, (Jt @ torch.linalg.inv(Lam) * Jt).sum(1))
    # A generic design: the eigenbasis mixes the weights and D~ drops the off-diagonal part of
    # Q_A^T D Q_A, so the precision is not X^T X / sigma^2 + D any more (the documented
    # approximation); a constant D stays exact.
    Xg = torch.randn(n, d)
    lg = lk.KronLaplace(model, "regression", fisher="exact", sigma_noise=sigma)
    lg.fit([(Xg, y.reshape(n, 1))])
    Xga = torch.cat([Xg, torch.ones(n, 1)], 1)
    lg.prior_precision = delta
    assert rel_err(lg.posterior_precision.to_dense(), Xga.T @ Xga / sigma**2 + torch.diag(delta))
    assert (
        rel_err(lg.posterior_precision.to_dense(), Xga.T @ Xga / sigma**2 + torch.diag(delta))
        > 1e-3
    )
    lg.prior_precision = torch.full((d + 1,), 2.0)
    exact = Xga.T @ Xga / sigma**2 + 2.0 * torch.eye(d + 1)
    torch.testing.assert_close(lg.posterior_precision.to_dense(), exact)


def test_save_load_roundtrip(tmp_path):
    la, x, _ = _fit("classification", "kfac")
    la.prior_precision = _delta(la, 4)
    path = tmp_path / "la.pt"
    la.save(path)
    lb = lk.KronLaplace.load(path, la.model)
    assert torch.equal(lb.prior_precision, la.prior_precision)
    torch.testing.assert_close(lb.posterior_precision.to_dense(), la.posterior_precision.to_dense())
    torch.testing.assert_close(lb.log_marginal_likelihood(), la.log_marginal_likelihood())
    torch.testing.assert_close(lb.functional_covariance(x[:3]), la.functional_covariance(x[:3]))
    state = la.state_dict()
    state["prior_precision"] = state["prior_precision"][:-1]
    with pytest.raises(ValueError, match="malformed.*one per parameter"):
        lk.KronLaplace(la.model, "classification", fisher="exact").load_state_dict(state)


def test_bad_per_parameter_priors_are_refused():
    la, *_ = _fit("classification", "kfac")
    P, names = la.n_params, la.param_names
    with pytest.raises(ValueError, match=f"{P} covered parameters"):
        la.prior_precision = torch.ones(P - 1)
    bad = torch.ones(P)
    bad[3] = -1.0
    with pytest.raises(ValueError, match="prior_precision must be positive"):
        la.prior_precision = bad
    shapes = dict((n, p.shape) for n, p in la.model.named_parameters())
    good = {n: torch.full(shapes[n], 2.0) for n in names}
    with pytest.raises(ValueError, match=r"not covered \['nope'\]"):
        la.prior_precision = {**good, "nope": torch.ones(2)}
    with pytest.raises(ValueError, match=r"missing \['0.weight'\]"):
        la.prior_precision = {n: v for n, v in good.items() if n != "0.weight"}
    with pytest.raises(ValueError, match="not shaped like"):
        la.prior_precision = {**good, "0.weight": torch.ones(3)}
    la.prior_precision = good
    assert torch.equal(la.prior_precision, torch.full((P,), 2.0))
    # before the fit: the length is checked when the fit gives the layout
    lb = lk.KronLaplace(Net(), "classification", prior_precision=torch.ones(P + 1))
    with pytest.raises(ValueError, match="one per parameter"):
        lb.fit([(torch.randn(4, 3), torch.randint(0, 3, (4,)))])
    with pytest.raises(ValueError, match="no single value per block"):
        la.block_deltas()
    with pytest.raises(ValueError, match="optimizer='newton'"):
        la.optimize_prior_precision("marglik", "diag", optimizer="newton")
    with pytest.raises(ValueError, match="gridsearch supports granularity='scalar'"):
        la.optimize_prior_precision("gridsearch", "diag", val_loader=[])
    with pytest.raises(ValueError, match="marglik_training tunes granularity"):
        lk.marglik_training(Net(), [], "classification", granularity="diag")
    with pytest.raises(ValueError, match="prior_precision must be a finite number"):
        lk.OnlineLaplace(Net(), "classification", prior_precision=torch.ones(P))  # isotropic only
