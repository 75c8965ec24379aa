"""Predictive distributions against dense J Sigma J^T, closed forms and Monte Carlo."""

import itertools
import math

import pytest
import torch
from _dense import CNN, MLP, WideCNN, jacobian, make_data, rel_err
from torch import nn
from torch._C._profiler import _EventType
from torch.profiler import ProfilerActivity, profile

import laplace_kron as lk
from laplace_kron import predictive as pred

DT = torch.float64


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny problems: one intra-op thread avoids OpenMP spin-waiting on shared cores."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _fit(
    arch="mlp",
    likelihood="classification",
    d_out=3,
    curvature="kfac",
    n=24,
    model=None,
    x_shape=None,
    **kw,
):
    torch.manual_seed(0)
    if model is None:
        model = {"mlp": MLP, "cnn": CNN, "widecnn": WideCNN}[arch](d_out=d_out)
    model = model.to(DT)
    if x_shape is None:
        x_shape = {"mlp": (4,), "cnn": (2, 6, 6), "widecnn": (4, 7, 7)}[arch]
    x, y = make_data(likelihood, n, d_out, x_shape)
    x = x.to(DT)
    kw.setdefault("prior_precision", 0.7)
    if likelihood == "regression":
        kw.setdefault("sigma_noise", 0.6)
    la = lk.KronLaplace(model, likelihood, curvature=curvature, fisher="exact", **kw)
    la.fit([(x[: n // 2], y[: n // 2]), (x[n // 2 :], y[n // 2 :])])
    return la, model, x, y


def _dense_cov(la, model, x):
    J = jacobian(model, x, la.param_names)
    S = la.posterior_covariance.to_dense()
    return J @ S @ J.transpose(1, 2), J


# ----------------------------------------------------------------------------- exactness


@pytest.mark.parametrize("arch", ["mlp", "cnn", "widecnn"])
@pytest.mark.parametrize("curvature", ["kfac", "ekfac"])
@pytest.mark.parametrize("separate_bias", [False, True])
@pytest.mark.parametrize("modules", [None, "last_layer"])
@pytest.mark.parametrize("likelihood,d_out", [("classification", 3), ("regression", 2)])
def test_functional_covariance_matches_dense(
    arch, curvature, separate_bias, modules, likelihood, d_out
):
    la, model, x, _ = _fit(
        arch,
        likelihood,
        d_out,
        curvature,
        separate_bias=separate_bias,
        modules=modules,
        prior_precision=torch.tensor([0.5, 2.0, 3.0, 0.9, 1.5, 4.0][: 6 if separate_bias else 3])
        if modules is None
        else (torch.tensor([0.5, 2.0]) if separate_bias else 0.8),
    )
    x = x[:5]
    dense, _ = _dense_cov(la, model, x)
    cov = la.functional_covariance(x)
    assert cov.shape == (5, d_out, d_out)
    assert rel_err(cov, dense) < 1e-8
    # Tiny tiles and input chunks exercise every chunking path (pairs of output tiles for convs).
    tiny = la.functional_covariance(x, chunk_size=7, batch_size=2, vectorize=False)
    assert rel_err(tiny, dense) < 1e-8
    var = la.functional_variance(x, chunk_size=7)
    assert var.shape == (5, d_out)
    assert rel_err(var, dense.diagonal(dim1=1, dim2=2)) < 1e-8


@pytest.mark.parametrize("weight_sharing", ["expand", "reduce"])
def test_sequence_model_with_weight_tying_matches_dense(weight_sharing):
    """Linear layers on [B, S, D] (T = S positions) and a layer called twice (T = 2 S)."""

    class Seq(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp = nn.Linear(4, 5)
            self.mix = nn.Linear(5, 5)
            self.out = nn.Linear(5, 3)

        def forward(self, x):
            h = torch.tanh(self.inp(x))
            h = torch.tanh(self.mix(torch.tanh(self.mix(h))))  # tied weights
            return self.out(h.mean(1))

    for sep in (False, True):
        la, model, x, _ = _fit(
            model=Seq(), x_shape=(3, 4), weight_sharing=weight_sharing, separate_bias=sep
        )
        dense, _ = _dense_cov(la, model, x[:4])
        assert rel_err(la.functional_covariance(x[:4]), dense) < 1e-8
        assert rel_err(la.functional_covariance(x[:4], chunk_size=3), dense) < 1e-8


@pytest.mark.parametrize("weight_sharing", ["expand", "reduce"])
def test_conv1d_matches_dense(weight_sharing):
    model = nn.Sequential(
        nn.Conv1d(2, 3, 3, padding=1, stride=2),  # 9 -> 5 positions
        nn.Tanh(),
        nn.Conv1d(3, 4, 2, dilation=2),  # 5 -> 3 positions
        nn.Flatten(),
        nn.Linear(12, 3),
    )
    la, model, x, _ = _fit(
        model=model, x_shape=(2, 9), curvature="ekfac", weight_sharing=weight_sharing
    )
    dense, _ = _dense_cov(la, model, x[:4])
    assert rel_err(la.functional_covariance(x[:4]), dense) < 1e-8
    assert rel_err(la.functional_covariance(x[:4], chunk_size=5), dense) < 1e-8


def test_output_shapes_regression_and_binary():
    # Regression with [B] outputs, [B, 1] outputs and binary [B] logits.
    class Squeeze(nn.Module):
        def forward(self, f):
            return f.squeeze(-1)

    for lik in ("regression", "binary"):
        for squeeze in (False, True):
            model = nn.Sequential(MLP(d_out=1), Squeeze()) if squeeze else MLP(d_out=1)
            la, model, x, _ = _fit(likelihood=lik, d_out=1, model=model)
            x = x[:6]
            dense, _ = _dense_cov(la, model, x)
            fvar = dense.reshape(6)
            assert la.functional_variance(x).shape == (6, 1)
            with torch.no_grad():
                f = model(x)
            out = la.predict(x)
            if lik == "regression":
                mean, var = out
                assert mean.shape == f.shape and var.shape == f.shape
                torch.testing.assert_close(mean, f)
                torch.testing.assert_close(var.reshape(6), fvar + 0.6**2, rtol=1e-10, atol=0)
            else:
                assert out.shape == (6,)
                expected = torch.sigmoid(f.reshape(6) / torch.sqrt(1 + math.pi / 8 * fvar))
                torch.testing.assert_close(out, expected, rtol=1e-10, atol=0)


# ----------------------------------------------------------------------------- links


def test_probit_and_bridge_match_closed_forms():
    la, model, x, _ = _fit(d_out=4, prior_precision=0.3)
    x = x[:6]
    S, _ = _dense_cov(la, model, x)
    with torch.no_grad():
        mu = model(x)
    var = S.diagonal(dim1=1, dim2=2)
    expected = torch.softmax(mu / torch.sqrt(1 + math.pi / 8 * var), -1)
    torch.testing.assert_close(la.predict(x, link="probit"), expected, rtol=1e-10, atol=0)

    # Laplace bridge written out as in Hobbhahn et al. (2022), in plain (not log) space.
    def bridge(mu, S, normalize):
        K = mu.shape[1]
        S1 = S.sum(2)
        tot = S1.sum(1, keepdim=True)
        m = mu - S1 * mu.sum(1, keepdim=True) / tot
        v = S.diagonal(dim1=1, dim2=2) - S1**2 / tot
        if normalize:
            r = v.mean(1, keepdim=True) / math.sqrt(K / 2)
            m, v = m / r.sqrt(), v / r
        alpha = (1 - 2 / K + m.exp() / K**2 * (-m).exp().sum(1, keepdim=True)) / v
        return alpha / alpha.sum(1, keepdim=True)

    probs = la.predict(x, link="bridge_norm")
    torch.testing.assert_close(probs, bridge(mu, S, True), rtol=1e-10, atol=0)
    # "bridge" is the unnormalised bridge (laplace-torch's naming).
    torch.testing.assert_close(
        la.predict(x, link="bridge"), bridge(mu, S, False), rtol=1e-10, atol=0
    )
    assert torch.allclose(probs.sum(1), torch.ones(6, dtype=DT))
    torch.testing.assert_close(
        pred.laplace_bridge(mu, S, normalize=False), bridge(mu, S, False), rtol=1e-10, atol=0
    )
    # Logits that would overflow exp() in the plain formula.
    big = pred.laplace_bridge(torch.tensor([[900.0, -900.0, 0.0]], dtype=DT), torch.eye(3)[None])
    assert torch.isfinite(big).all() and abs(float(big.sum()) - 1) < 1e-12


def test_glm_samples_mc_link_and_glm_mc_converge_to_glm_moments():
    la, model, x, _ = _fit(d_out=3, prior_precision=2.0)
    x = x[:4]
    f, S = pred.glm_moments(la, x)

    def moment_errors(samples):
        """Largest z-score of the sample mean and relative error of the sample covariance."""
        n = samples.shape[0]
        d = samples - samples.mean(0)
        cov = torch.einsum("nbi,nbj->bij", d, d) / n
        se = (S.diagonal(dim1=1, dim2=2) / n).sqrt()
        return float(((samples.mean(0) - f).abs() / se).max()), rel_err(cov, S)

    for method in ("glm", "glm_mc"):
        errs = []
        for n in (100, 20000):
            g = torch.Generator().manual_seed(1)
            errs.append(moment_errors(pred.predictive_samples(la, x, method, n, g)))
        (z_small, c_small), (z_big, c_big) = errs
        assert z_small < 5 and z_big < 5, (method, errs)
        assert c_big < 0.03 and c_big < c_small / 3, (method, errs)

    # The mc link is the average softmax of exactly those GLM samples.
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    probs = la.predict(x, link="mc", n_samples=500, generator=g1)
    samples = pred.predictive_samples(la, x, "glm", 500, g2)
    torch.testing.assert_close(probs, torch.softmax(samples, -1).mean(0))


@pytest.mark.parametrize("vectorize", [True, False])
def test_glm_mc_is_the_linearized_model_at_posterior_samples(vectorize):
    la, model, x, _ = _fit(arch="cnn", d_out=3, curvature="ekfac", separate_bias=True)
    x = x[:5]
    J = jacobian(model, x, la.param_names)
    with torch.no_grad():
        f = model(x)
    thetas = la.sample(7, generator=torch.Generator().manual_seed(5))
    expected = f + torch.einsum("bcp,np->nbc", J, thetas - la.mean)
    g = torch.Generator().manual_seed(5)
    got = pred.predictive_samples(la, x, "glm_mc", 7, g, vectorize=vectorize)
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12)
    # nn sampling evaluates the network itself at the same parameter samples.
    g = torch.Generator().manual_seed(5)
    got_nn = pred.predictive_samples(la, x, "nn", 7, g, vectorize=vectorize)
    for theta, out in zip(thetas, got_nn):
        params = dict(model.named_parameters())
        start = 0
        sub = {}
        for n in la.param_names:
            sub[n] = theta[start : start + params[n].numel()].view_as(params[n])
            start += params[n].numel()
        torch.testing.assert_close(out, torch.func.functional_call(model, sub, (x,)))


def test_sampling_leaves_parameters_bit_identical():
    la, model, x, _ = _fit(d_out=3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = {k: id(p) for k, p in model.named_parameters()}
    for method in ("nn", "glm_mc"):
        for vectorize in (True, False):
            la.predict(x, method=method, n_samples=5, vectorize=vectorize)
    la.predict(x)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert ids == {k: id(p) for k, p in model.named_parameters()}
    assert all(p.grad is None for p in model.parameters())


def test_sampling_methods_collapse_to_map_for_a_sharp_posterior():
    la, model, x, _ = _fit(d_out=3, prior_precision=1e8)
    with torch.no_grad():
        map_probs = torch.softmax(model(x), -1)
    for method, link in [("glm", "probit"), ("glm", "mc"), ("glm_mc", "probit"), ("nn", "mc")]:
        p = la.predict(x, method=method, link=link, n_samples=20)
        torch.testing.assert_close(p, map_probs, rtol=0, atol=1e-4)


def test_regression_sampling_moments():
    la, model, x, _ = _fit(likelihood="regression", d_out=2, prior_precision=3.0)
    x = x[:5]
    mean, var = la.predict(x)
    fvar = var - 0.6**2
    n = 4000
    for method in ("glm_mc", "nn"):
        m, v = la.predict(x, method=method, n_samples=n, generator=torch.Generator())
        assert m.shape == v.shape == (5, 2)
        assert (v > 0.6**2).all()
        if method == "glm_mc":  # the linearized model has exactly the GLM moments
            assert ((m - mean).abs() / (fvar / n).sqrt()).max() < 5
            assert rel_err(v, var) < 0.05


# ----------------------------------------------------------------------------- inputs


class DictModel(nn.Module):
    """A Hugging Face style model taking a mapping of tensors."""

    def __init__(self):
        super().__init__()
        self.body = MLP(d_out=3)

    def forward(self, batch):
        return self.body(batch["features"] * batch["mask"].unsqueeze(-1)) * batch["scale"][0]


def test_dict_batches():
    torch.manual_seed(0)
    model = DictModel().to(DT)
    x, y = make_data("classification", 20, 3)
    batch = {"features": x, "mask": torch.ones(20, dtype=DT), "scale": torch.ones(20, dtype=DT)}
    la = lk.KronLaplace(model, "classification", fisher="exact").fit([(batch, y)])
    la_t = lk.KronLaplace(model.body, "classification", fisher="exact").fit([(x, y)])
    torch.testing.assert_close(la.predict(batch), la_t.predict(x))
    torch.testing.assert_close(
        la.functional_covariance(batch, batch_size=3), la_t.functional_covariance(x)
    )
    # A non-batch entry makes the batch size ambiguous: the user says how to count.
    odd = dict(batch, scale=torch.ones(1, dtype=DT))
    with pytest.raises(ValueError, match="batch_size_fn"):
        la.predict(odd)
    p = la.predict(odd, batch_size_fn=lambda b: b["features"].shape[0], batch_size=7)
    torch.testing.assert_close(p, la_t.predict(x))
    p = la.predict(odd, method="nn", n_samples=3, batch_size_fn=lambda b: len(b["features"]))
    assert p.shape == (20, 3)


def test_bad_input_is_rejected():
    model = MLP(d_out=3).to(DT)
    la = lk.KronLaplace(model, "classification")
    x = torch.randn(4, 4, dtype=DT)
    with pytest.raises(RuntimeError, match="fit"):
        la.predict(x)
    with pytest.raises(RuntimeError, match="fit"):
        la.functional_variance(x)
    la, model, x, _ = _fit(d_out=3)
    with pytest.raises(ValueError, match="method"):
        la.predict(x, method="laplace")
    with pytest.raises(ValueError, match="link"):
        la.predict(x, link="logit")
    with pytest.raises(ValueError, match="n_samples"):
        la.predict(x, method="nn", n_samples=0)
    with pytest.raises(ValueError, match="chunk_size"):
        la.functional_variance(x, chunk_size=0)
    bad = x.clone()
    bad[1, 2] = float("nan")
    for method in pred.METHODS:
        with pytest.raises(ValueError, match="NaN"):
            la.predict(bad, method=method)
    with pytest.raises(ValueError, match="empty"):
        la.predict(x[:0])
    with pytest.raises(TypeError, match="Tensor"):
        la.predict([x])
    with torch.inference_mode(), pytest.raises(RuntimeError, match="inference_mode"):
        la.predict(x)
    with torch.no_grad():  # the usual evaluation context works for every method
        for method in pred.METHODS:
            assert la.predict(x, method=method, n_samples=2).shape == (x.shape[0], 3)
    la_b, *_ = _fit(likelihood="binary", d_out=1)
    with pytest.raises(ValueError, match="bridge"):
        la_b.predict(x, link="bridge")


def test_predictive_warns_when_model_moved_away_from_the_mean():
    la, model, x, _ = _fit(d_out=3)
    with torch.no_grad():
        model[0].weight.add_(0.1)
    with pytest.warns(UserWarning, match="differs from the posterior mean"):
        la.functional_variance(x)


# ----------------------------------------------------------------------------- memory


def peak_cpu_bytes(fn):
    """Peak of live CPU tensor memory allocated while ``fn()`` runs (torch profiler events)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    sizes = []

    def walk(node):
        if node.tag == _EventType.Allocation:
            sizes.append((node.start_time_ns, node.extra_fields.alloc_size))
        for child in node.children:
            walk(child)

    for root in prof.profiler.kineto_results.experimental_event_tree():
        walk(root)
    sizes.sort()
    return max(itertools.accumulate(s for _, s in sizes), default=0)


def test_functional_variance_memory_is_far_below_a_full_jacobian():
    torch.manual_seed(0)
    width, B, C = 1024, 64, 10
    model = nn.Sequential(
        nn.Linear(784, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, C)
    )  # float32, P ~ 1.9M
    x, y = torch.randn(B, 784), torch.randint(0, C, (B,))
    la = lk.KronLaplace(model, "classification", prior_precision=1.0).fit([(x, y)])
    P = la.n_params
    la.functional_variance(x[:1])  # eigendecompose the factors outside the measurement
    peak = peak_cpu_bytes(lambda: la.functional_variance(x))
    jacobian_bytes = B * C * P * 4
    largest_block = max(b.n_params for b in la.curvature.blocks) * 4
    # What the GLM predictive needs: the inverse damped eigenvalues of every block (P numbers, kept
    # for all chunks of one call), ~two block-sized temporaries, and per-layer activations with
    # their C output-gradients. A [B, C, P] Jacobian is 4.8 GB here, 50x more than we allow.
    assert peak < 4 * P + 2 * largest_block + 8 * B * C * (784 + 2 * width) * 4
    assert peak < jacobian_bytes / 50, (peak, jacobian_bytes)


# ----------------------------------------------------------------------------- laplace-torch


def laplace_torch_pair(model, x, y, prior: float, sub: str):
    """laplace-torch's Kronecker Laplace (``subset_of_weights=sub``, its exact GGN, one batch)
    and ours with the same prior, biases as separate blocks: the same posterior."""
    laplace = pytest.importorskip("laplace")
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=len(x))
    lt = laplace.Laplace(model, "classification", subset_of_weights=sub, hessian_structure="kron")
    lt.prior_precision = prior
    lt.fit(loader)
    la = lk.KronLaplace(
        model,
        "classification",
        fisher="exact",
        separate_bias=True,
        prior_precision=prior,
        modules="last_layer" if sub == "last_layer" else None,
    ).fit([(x, y)])
    return lt, la


def test_agrees_with_laplace_torch():
    """laplace-torch (test-only dependency) treats biases as separate Kronecker blocks and uses the
    exact (type-2) GGN; with one batch its KFAC equals ours, so the predictives must agree."""
    torch.manual_seed(0)
    model = MLP(d_in=6, hidden=8, d_out=4).to(DT)
    x, y = make_data("classification", 40, 4, (6,))
    for sub in ("last_layer", "all"):
        lt, la = laplace_torch_pair(model, x, y, 0.8, sub)
        xt = x[:7]
        _, f_var = lt._glm_predictive_distribution(xt)
        assert rel_err(la.functional_covariance(xt), f_var) < 1e-10
        links = ("probit", "bridge", "bridge_norm")
        for link, lt_link in zip(links, links, strict=True):
            expected = lt(xt, pred_type="glm", link_approx=lt_link)
            torch.testing.assert_close(la.predict(xt, link=link), expected, rtol=1e-9, atol=1e-12)


def test_centered_probit_ignores_shared_logit_shift_and_matches_projection():
    from laplace_kron.predictive import centered_probit, probit

    g = torch.Generator().manual_seed(0)
    mu = torch.randn(4, 5, generator=g, dtype=torch.float64)
    X = torch.randn(4, 5, 5, generator=g, dtype=torch.float64)
    S = X @ X.transpose(1, 2)
    P = torch.eye(5, dtype=torch.float64) - 1 / 5
    ref = probit(mu @ P, (P @ S @ P).diagonal(dim1=1, dim2=2))
    torch.testing.assert_close(centered_probit(mu, S), ref)
    ones = torch.ones(5, 5, dtype=torch.float64)
    shifted = centered_probit(mu + 3.0, S + 7.0 * ones)
    torch.testing.assert_close(shifted, ref)  # invariant, unlike the plain probit
    assert (probit(mu, (S + 7.0 * ones).diagonal(dim1=1, dim2=2)) - ref).abs().max() > 1e-3
