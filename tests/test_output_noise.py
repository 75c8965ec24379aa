"""Per-output observation noise (sigma_noise [C]) against closed-form and dense ground truth."""

import math

import pytest
import torch
from _dense import CNN, MLP, Crash, jacobian, make_data, rel_err
from scipy.optimize import minimize
from torch import nn

import laplace_kron as lk
from laplace_kron.marglik import log_marginal_likelihood

DEFAULT_DTYPE = torch.float64  # applied per test by conftest.py


# ------------------------------------------------------------------ Bayesian linear regression
def _blr_data(N=40, D=3, C=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(N, D, generator=g)
    W = torch.randn(C, D, generator=g)
    noise = torch.tensor([0.1, 0.5, 1.5])[:C]
    Y = X @ W.T + 0.3 + noise * torch.randn(N, C, generator=g)
    return X, Y


def _blr(X, Y, delta, sigma):
    """Per output c: MAP, precision w_c X~^T X~ + delta I and evidence log N(y_c; 0, sigma_c^2 I +
    X~ X~^T / delta) (X~ = [X | 1]); the outputs are independent a priori and given theta."""
    N, D = X.shape
    Xa = torch.cat([X, torch.ones(N, 1)], 1)
    thetas, precs, ev = [], [], 0.0
    for c in range(Y.shape[1]):
        w = sigma[c] ** -2
        prec = w * Xa.T @ Xa + delta * torch.eye(D + 1)
        thetas.append(torch.linalg.solve(prec, w * Xa.T @ Y[:, c]))
        precs.append(prec)
        cov = sigma[c] ** 2 * torch.eye(N) + Xa @ Xa.T / delta
        ev = ev + torch.distributions.MultivariateNormal(torch.zeros(N), cov).log_prob(Y[:, c])
    return torch.stack(thetas), precs, ev


def _set_map(model, X, Y, delta, sigma):
    theta, precs, ev = _blr(X, Y, delta, sigma)
    D = X.shape[1]
    with torch.no_grad():
        model.weight.copy_(theta[:, :D])
        model.bias.copy_(theta[:, D])
    return precs, ev


def _param_order(d_out: int, d_in: int) -> torch.Tensor:
    """Index of each [W | b] matrix-view entry (row-major) in the (W.flatten(), b) order."""
    idx = torch.empty(d_out, d_in + 1, dtype=torch.long)
    idx[:, :d_in] = torch.arange(d_out * d_in).reshape(d_out, d_in)
    idx[:, d_in] = d_out * d_in + torch.arange(d_out)
    return idx.flatten()


@pytest.mark.parametrize("curvature", ["kfac", "ekfac"])
def test_bayesian_linear_regression_per_output(curvature):
    X, Y = _blr_data()
    D, C = X.shape[1], Y.shape[1]
    model = nn.Linear(D, C)
    delta, sigma = 0.7, torch.tensor([0.2, 0.6, 1.3])
    precs, ev = _set_map(model, X, Y, delta, sigma)
    la = lk.KronLaplace(
        model, "regression", curvature, fisher="exact", prior_precision=delta, sigma_noise=sigma
    ).fit([(X[:25], Y[:25]), (X[25:], Y[25:])])
    # Dense truth: block-diagonal over outputs in the [W | b] row-major view.
    dense = torch.block_diag(*precs)
    perm = _param_order(C, D)
    truth = torch.empty_like(dense)
    truth[perm.unsqueeze(1), perm.unsqueeze(0)] = dense
    assert rel_err(la.posterior_precision.to_dense(), truth) < 1e-12
    assert abs(float(la.log_marginal_likelihood()) - float(ev)) < 1e-10 * abs(float(ev))
    # GLM predictive of y: x~^T Sigma_c x~ + sigma_c^2.
    xs = torch.randn(5, D)
    xa = torch.cat([xs, torch.ones(5, 1)], 1)
    mean, var = la.predict(xs)
    var_true = torch.stack(
        [(xa @ torch.linalg.solve(p, xa.T)).diagonal() + s**2 for p, s in zip(precs, sigma)], 1
    )
    assert rel_err(var, var_true) < 1e-10
    assert rel_err(mean, model(xs).detach()) < 1e-14


def test_tuned_noise_is_the_closed_form_optimum():
    X, Y = _blr_data()
    D, C = X.shape[1], Y.shape[1]
    model = nn.Linear(D, C)

    def neg(z):  # exact evidence over (log delta, log sigma_c), the MAP moving along
        return -float(_blr(X, Y, math.exp(z[0]), torch.tensor(z[1:]).exp())[2])

    res = minimize(neg, [0.0] * (C + 1), method="BFGS", options={"gtol": 1e-9})
    d_opt, s_opt = math.exp(res.x[0]), torch.tensor(res.x[1:]).exp()
    _set_map(model, X, Y, d_opt, s_opt)
    la = lk.KronLaplace(model, "regression", fisher="exact", sigma_noise=torch.ones(C))
    la.fit([(X, Y)])
    for method in ("mackay", "marglik"):
        la.prior_precision, la.sigma_noise = 1.0, torch.ones(C)
        rep = la.optimize_prior_precision(method, tune_sigma_noise=True, n_steps=3000, tol=1e-11)
        assert abs(float(la.prior_precision) - d_opt) < 1e-4 * d_opt, method
        assert rel_err(la.sigma_noise, s_opt) < 1e-5, method
        assert len(rep["sigma_noise"]) == C


# ------------------------------------------------------------------ 2-layer MLP, C = 3
def _mlp_fit(curvature="kfac", N=12, sigma=(0.3, 0.8, 1.7), model=None, **kw):
    torch.manual_seed(3)
    x, y = torch.randn(N, 4), torch.randn(N, 3)
    model = model or MLP(d_in=4, hidden=5, d_out=3)
    sigma = torch.tensor(sigma)
    la = lk.KronLaplace(
        model, "regression", curvature, fisher="exact", sigma_noise=sigma, **kw
    ).fit([(x[: N // 2], y[: N // 2]), (x[N // 2 :], y[N // 2 :])])
    return la, model, x, y, sigma


def _kfac_by_hand(model, x, w):
    """Per Linear layer ``(G(w), A, per-example rows)``: ``A = mean a~ a~^T``, ``G(w) = sum_{n,c}
    w_c g_nc g_nc^T`` with ``g_nc = d f_c / d (layer output)`` (hooks + autograd)."""
    layers = [m for m in model if isinstance(m, nn.Linear)]
    ins, outs = {}, {}

    def keep(m, i, o):
        ins[m], outs[m] = i[0], o

    hooks = [m.register_forward_hook(keep) for m in layers]
    f = model(x)
    for h in hooks:
        h.remove()
    res = []
    for m in layers:
        a = torch.cat([ins[m].detach(), torch.ones(len(x), 1)], 1)
        g = torch.stack(
            [torch.autograd.grad(f[:, c].sum(), outs[m], retain_graph=True)[0] for c in range(3)]
        )  # [C, N, d_out]
        G = torch.einsum("c,cni,cnj->ij", w, g, g)
        res.append((G, a.T @ a / len(x), a, g))
    return res


def _dense_by_hand(model, x, w, delta, ekfac_basis_of=None):
    """Block-diagonal dense precision in parameter order from :func:`_kfac_by_hand`; with
    ``ekfac_basis_of`` (sigma = 1 weights) the EKFAC eigenvalues in that KFAC basis."""
    blocks = []
    base = _kfac_by_hand(model, x, torch.ones(3)) if ekfac_basis_of is not None else None
    for li, (G, A, a, g) in enumerate(_kfac_by_hand(model, x, w)):
        d_out, d_in = G.shape[0], A.shape[0] - 1
        if base is None:
            K = torch.kron(G, A)
        else:
            QG, QA = torch.linalg.eigh(base[li][0])[1], torch.linalg.eigh(base[li][1])[1]
            grads = torch.einsum("cno,ni->cnoi", g, a)  # per example, per output
            E = torch.einsum("c,cnij->ij", w, (QG.T @ grads @ QA) ** 2)
            Q = torch.kron(QG, QA)
            K = Q @ torch.diag(E.flatten()) @ Q.T
        K = K + delta * torch.eye(K.shape[0])
        perm = _param_order(d_out, d_in)
        out = torch.empty_like(K)
        out[perm.unsqueeze(1), perm.unsqueeze(0)] = K
        blocks.append(out)
    return torch.block_diag(*blocks)


@pytest.mark.parametrize("curvature", ["kfac", "ekfac"])
def test_mlp_precision_evidence_and_predictive_are_dense(curvature):
    delta = 0.9
    la, model, x, y, sigma = _mlp_fit(curvature, prior_precision=delta)
    w = sigma**-2
    basis = None if curvature == "kfac" else torch.ones(3)
    Lam = _dense_by_hand(model, x, w, delta, basis)
    assert rel_err(la.posterior_precision.to_dense(), Lam) < 1e-10
    # Evidence: sum_c Gaussian log-likelihoods - delta/2 ||theta||^2 + P/2 log delta - logdet/2.
    theta = la.mean
    r = (model(x) - y).detach()
    loglik = (
        -0.5 * (r**2).sum(0) / sigma**2 - len(x) * torch.log(sigma * math.sqrt(2 * math.pi))
    ).sum()
    P = theta.numel()
    ev = loglik - 0.5 * delta * theta @ theta + 0.5 * P * math.log(delta) - 0.5 * torch.logdet(Lam)
    assert abs(float(la.log_marginal_likelihood()) - float(ev)) < 1e-10 * abs(float(ev))
    # Its gradient in sigma (and delta) equals autograd through the dense formula.
    s = sigma.clone().requires_grad_(True)
    d = torch.tensor(delta, requires_grad=True)
    log_marginal_likelihood(la, d, s).backward()
    s2 = sigma.clone().requires_grad_(True)
    d2 = torch.tensor(delta, requires_grad=True)
    w2 = s2**-2
    Lam2 = _dense_by_hand_autograd(model, x, w2, d2, basis)
    ll2 = (-0.5 * (r**2).sum(0) / s2**2 - len(x) * torch.log(s2 * math.sqrt(2 * math.pi))).sum()
    ev2 = ll2 - 0.5 * d2 * theta @ theta + 0.5 * P * torch.log(d2) - 0.5 * torch.logdet(Lam2)
    ev2.backward()
    assert rel_err(s.grad, s2.grad) < 1e-8
    assert abs(float(d.grad) - float(d2.grad)) < 1e-8 * abs(float(d2.grad))
    # GLM predictive of y: diag(J Sigma J^T) + sigma_c^2.
    xs = torch.randn(4, 4)
    J = jacobian(model, xs, la.param_names)
    Sigma = torch.linalg.inv(Lam)
    fvar = torch.einsum("bcp,pq,bcq->bc", J, Sigma, J)
    mean, var = la.predict(xs)
    assert rel_err(var, fvar + sigma**2) < 1e-10
    assert rel_err(la.functional_variance(xs), fvar) < 1e-10
    gen = torch.Generator().manual_seed(0)
    _, var_mc = la.predict(xs, method="glm_mc", n_samples=20000, generator=gen)
    assert rel_err(var_mc - sigma**2, fvar) < 0.05  # Monte Carlo: about sqrt(2 / n) = 1%


def _dense_by_hand_autograd(model, x, w, delta, basis):
    """:func:`_dense_by_hand` differentiable in ``w`` and ``delta`` (the weighted sums are
    linear in ``w``; KFAC's Kronecker product and EKFAC's fixed basis keep it so)."""
    parts = [_dense_by_hand(model, x, e, 0.0, basis) for e in torch.eye(3)]
    Hw = sum(wc * Pc for wc, Pc in zip(w, parts))
    return Hw + delta * torch.eye(Hw.shape[0])


def test_single_datum_kfac_is_the_weighted_exact_ggn():
    """N = 1: KFAC of sum_c w_c J_c^T J_c equals its exact blocks."""
    la, model, x, y, sigma = _mlp_fit("kfac", N=1, prior_precision=1e-3)
    J = jacobian(model, x, la.param_names)[0]  # [C, P]
    ggn = J.T @ torch.diag(sigma**-2) @ J
    H = la.posterior_precision.to_dense() - 1e-3 * torch.eye(J.shape[1])
    mask = H != 0
    assert rel_err(H[mask], ggn[mask]) < 1e-12


def test_diagonal_blocks_are_weighted_ggn_diagonals():
    """A LayerNorm's affine parameters get D(w) = sum_{n,c} w_c (d f_c / d theta)^2."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.LayerNorm(5), nn.Tanh(), nn.Linear(5, 3))
    la, model, x, y, sigma = _mlp_fit("kfac", model=model)
    J = jacobian(model, x, la.param_names)  # [N, C, P]
    diag = torch.einsum("c,ncp->p", sigma**-2, J**2)
    names = la.param_names
    params = dict(model.named_parameters())
    start = 0
    for n in names:
        k = params[n].numel()
        if n.startswith("1."):
            idx = torch.arange(start, start + k)
            got = la.posterior_precision.to_dense()[idx, idx] - 1.0
            assert rel_err(got, diag[idx]) < 1e-12
        start += k


def test_equal_sigma_matches_scalar_and_scalar_keeps_no_factors():
    la, model, x, y, _ = _mlp_fit("kfac", sigma=(0.7, 0.7, 0.7), prior_precision=0.5)
    ref = lk.KronLaplace(model, "regression", fisher="exact", sigma_noise=0.7, prior_precision=0.5)
    ref.fit([(x[:6], y[:6]), (x[6:], y[6:])])
    assert ref.output_factors is None and la.output_factors is not None
    assert rel_err(la.posterior_precision.to_dense(), ref.posterior_precision.to_dense()) < 1e-12
    assert abs(float(la.log_marginal_likelihood() - ref.log_marginal_likelihood())) < 1e-9
    # A scalar set on a per-output posterior is broadcast to every output.
    la.sigma_noise = 0.4
    ref.sigma_noise = 0.4
    assert la.sigma_noise.shape == (3,)
    assert abs(float(la.log_marginal_likelihood() - ref.log_marginal_likelihood())) < 1e-9
    assert abs(float(la.log_det_posterior_precision() - ref.log_det_posterior_precision())) < 1e-9


def test_changing_sigma_rebuilds_and_matches_a_fresh_fit():
    la, model, x, y, _ = _mlp_fit("ekfac", prior_precision=0.5)
    new = torch.tensor([1.1, 0.2, 0.5])
    la.sigma_noise = new
    fresh, *_ = _mlp_fit("ekfac", sigma=tuple(new.tolist()), prior_precision=0.5, model=model)
    assert rel_err(la.posterior_precision.to_dense(), fresh.posterior_precision.to_dense()) < 1e-12
    assert abs(float(la.log_marginal_likelihood() - fresh.log_marginal_likelihood())) < 1e-9
    S = la.sample(3, generator=torch.Generator().manual_seed(0))
    assert S.shape == (3, la.n_params)


def test_save_load_roundtrip(tmp_path):
    la, model, x, y, sigma = _mlp_fit("ekfac", prior_precision=[0.5, 1.0, 2.0])
    la.optimize_prior_precision(tune_sigma_noise=True, granularity="layer")
    path = tmp_path / "post.pt"
    la.save(path)
    lb = lk.KronLaplace.load(path, model)
    assert torch.equal(lb.sigma_noise, la.sigma_noise)
    assert rel_err(lb.posterior_precision.to_dense(), la.posterior_precision.to_dense()) < 1e-14
    assert float(lb.log_marginal_likelihood()) == pytest.approx(float(la.log_marginal_likelihood()))
    lb.sigma_noise = torch.ones(3)  # still per-output after loading
    la.sigma_noise = torch.ones(3)
    assert rel_err(lb.posterior_precision.to_dense(), la.posterior_precision.to_dense()) < 1e-14


def test_refusals():
    model = MLP(d_out=3)
    with pytest.raises(ValueError, match="only used for likelihood='regression'"):
        lk.KronLaplace(model, "classification", sigma_noise=torch.ones(3))
    for fisher in ("mc", "empirical"):
        with pytest.raises(ValueError, match="fisher='exact'"):
            lk.KronLaplace(model, "regression", fisher=fisher, sigma_noise=torch.ones(3))
    x, y = torch.randn(8, 4), torch.randn(8, 3)
    bad = lk.KronLaplace(model, "regression", fisher="exact", sigma_noise=torch.ones(2))
    with pytest.raises(ValueError, match="sigma_noise has 2 values"):
        bad.fit([(x, y)])
    la = lk.KronLaplace(model, "regression", fisher="exact", sigma_noise=torch.ones(3))
    la.fit([(x, y)])
    with pytest.raises(ValueError, match="3 outputs"):
        la.sigma_noise = torch.ones(4)
    with pytest.raises(ValueError, match="reset=False"):
        la.fit([(x, y)], reset=False)
    scalar = lk.KronLaplace(model, "regression", fisher="exact").fit([(x, y)])
    with pytest.raises(ValueError, match="before fitting"):
        scalar.sigma_noise = torch.ones(3)
    with pytest.raises(ValueError, match="per-output factors"):
        lk.KronLaplace(
            model, "regression", sigma_noise=torch.ones(3), fisher="exact"
        ).set_curvature(scalar.curvature)


def test_marglik_training_with_per_output_noise():
    torch.manual_seed(0)
    model = MLP(d_out=3)
    x = torch.randn(32, 4)
    y = torch.stack([x[:, 0], x[:, 1], x[:, 2]], 1) + torch.tensor([0.05, 0.3, 1.0]) * torch.randn(
        32, 3
    )
    la, rep = lk.marglik_training(
        model,
        [(x[:16], y[:16]), (x[16:], y[16:])],
        "regression",
        n_epochs=4,
        lr=1e-2,
        n_epochs_burnin=2,
        marglik_frequency=2,
        sigma_noise=torch.ones(3),
        fisher="exact",
    )
    assert la.sigma_noise.shape == (3,) and len(rep["refits"][-1]["sigma_noise"]) == 3


def test_newton_prior_tuning_uses_the_noise_weighted_spectrum():
    la, *_ = _mlp_fit("kfac", prior_precision=1.0)
    la.optimize_prior_precision(optimizer="newton", tol=1e-12)
    newton = float(la.prior_precision)
    la.prior_precision = 1.0
    la.optimize_prior_precision(optimizer="lbfgs", tol=1e-12, n_steps=500)
    assert abs(float(la.prior_precision) - newton) < 1e-6 * newton
    assert float(la.log_det_posterior_precision(sigma_noise=0.5)) == pytest.approx(
        float(la.log_det_posterior_precision(sigma_noise=torch.full((3,), 0.5)))
    )


@pytest.mark.parametrize("at", [2, 6])  # in the KFAC pass, in the EKFAC pass
def test_checkpointed_fit_resumes_exactly(tmp_path, at):
    torch.manual_seed(0)
    model = CNN(d_out=2).eval()
    x, y = make_data("regression", 16, 2, x_shape=(2, 6, 6), seed=2)
    batches = [(x[i : i + 4], y[i : i + 4]) for i in range(0, 16, 4)]
    path = tmp_path / "fit.pt"

    def la():
        kw = {"fisher": "exact", "sigma_noise": torch.tensor([0.3, 0.9])}
        return lk.KronLaplace(model, "regression", "ekfac", **kw)

    with pytest.raises(KeyboardInterrupt):
        la().fit(Crash(batches, at), checkpoint=path, checkpoint_every=1)
    resumed = la().fit(batches, checkpoint=path, checkpoint_every=1)
    ref = la().fit(batches)
    assert torch.equal(resumed.posterior_precision.to_dense(), ref.posterior_precision.to_dense())
    assert torch.equal(resumed.log_marginal_likelihood(), ref.log_marginal_likelihood())
    # A scalar-noise fit cannot resume a per-output checkpoint.
    with pytest.raises(KeyboardInterrupt):
        la().fit(Crash(batches, 2), checkpoint=path, checkpoint_every=1)
    with pytest.raises(ValueError, match="per-output sums"):
        lk.KronLaplace(model, "regression", "ekfac", fisher="exact").fit(
            batches, checkpoint=path, checkpoint_every=1
        )


@pytest.mark.parametrize("curvature", ["kfac", "ekfac"])
@pytest.mark.parametrize("weight_sharing", ["expand", "reduce"])
def test_convolutions_sum_of_outputs_is_the_scalar_fit(curvature, weight_sharing):
    """Shared positions: sum_c H_c (sigma = 1 for every output) is the scalar fit's H."""
    torch.manual_seed(0)
    model = CNN(d_out=2).eval()
    x, y = make_data("regression", 10, 2, x_shape=(2, 6, 6), seed=2)
    kw = {"fisher": "exact", "weight_sharing": weight_sharing, "separate_bias": True}
    per = lk.KronLaplace(model, "regression", curvature, sigma_noise=torch.ones(2), **kw)
    per.fit([(x, y)])
    ref = lk.KronLaplace(model, "regression", curvature, **kw).fit([(x, y)])
    assert rel_err(per.posterior_precision.to_dense(), ref.posterior_precision.to_dense()) < 1e-12
    assert float(per.log_marginal_likelihood()) == pytest.approx(
        float(ref.log_marginal_likelihood()), rel=1e-12
    )
