"""The predictive at scale and in every form: joint covariance across inputs, functional samples,
the O(C) link moments (centered probit, bridges) and the shared last layer, against dense truth
(torch.func Jacobians, ``la.posterior_covariance.to_dense()``, float64); memory bounded by
``chunk_size``; a synthetic 1,000-class last layer."""

from __future__ import annotations

import warnings

import pytest
import torch
from _dense import CNN, MLP, jacobian, make_data, rel_err
from test_predictive import laplace_torch_pair, peak_cpu_bytes
from torch import nn

import laplace_kron as lk
from laplace_kron import links
from laplace_kron.constants import LINKS

DT = torch.float64


def _fit(model, x_shape, d_out=3, n=20, curvature="kfac", **kw):
    torch.manual_seed(0)
    model = model.to(DT)
    x, y = make_data("classification", n, d_out, x_shape)
    x = x.to(DT)
    la = lk.KronLaplace(
        model, "classification", curvature=curvature, fisher="exact", prior_precision=0.7, **kw
    )
    la.fit([(x[: n // 2], y[: n // 2]), (x[n // 2 :], y[n // 2 :])])
    return la, model, x


def _dense_joint(la, model, x):
    J = jacobian(model, x, la.param_names)  # [B, C, P]
    Jf = J.reshape(-1, J.shape[-1])
    return Jf @ la.posterior_covariance.to_dense() @ Jf.T


class NormNet(nn.Sequential):
    """A LayerNorm between two Linear layers: its scale and shift get diagonal blocks."""

    def __init__(self, d_out=3):
        super().__init__(nn.Linear(4, 5), nn.LayerNorm(5), nn.Tanh(), nn.Linear(5, d_out))


CASES = [
    ("mlp", dict(), "kfac"),
    ("mlp", dict(separate_bias=True), "ekfac"),
    ("mlp", dict(modules="last_layer"), "kfac"),
    ("mlp", dict(modules="last_layer", separate_bias=True), "ekfac"),
    ("cnn", dict(), "kfac"),
    ("cnn", dict(separate_bias=True), "ekfac"),
    ("norm", dict(), "kfac"),
]


def _case(arch, kw, curvature):
    model, shape = {
        "mlp": (MLP(d_out=3), (4,)),
        "cnn": (CNN(d_out=3), (2, 6, 6)),
        "norm": (NormNet(), (4,)),
    }[arch]
    return _fit(model, shape, curvature=curvature, **kw)


@pytest.mark.parametrize("arch,kw,curvature", CASES)
@pytest.mark.parametrize("chunk_size", [2**22, 40])
def test_joint_covariance_matches_dense(arch, kw, curvature, chunk_size):
    la, model, x = _case(arch, kw, curvature)
    x = x[:5]
    want = _dense_joint(la, model, x)
    got = la.functional_covariance(x, joint=True, chunk_size=chunk_size, batch_size=2)
    assert got.shape == (15, 15)
    assert rel_err(got, want) < 1e-9
    # Its diagonal blocks are the per-input covariances.
    per = la.functional_covariance(x)
    blocks = got.reshape(5, 3, 5, 3).diagonal(dim1=0, dim2=2).permute(2, 0, 1)
    torch.testing.assert_close(blocks, per, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("arch,kw,curvature", CASES)
def test_link_moments_match_dense_links(arch, kw, curvature):
    """centered probit and both bridges from the O(C) moments = the links on the dense C x C."""
    la, model, x = _case(arch, kw, curvature)
    x = x[:6]
    J = jacobian(model, x, la.param_names)
    S = J @ la.posterior_covariance.to_dense() @ J.mT
    with torch.no_grad():
        mu = model(x)
    for chunk_size in (2**22, 30):
        got = la.predict(x, link="centered_probit", chunk_size=chunk_size)
        torch.testing.assert_close(got, links.centered_probit(mu, S), rtol=1e-9, atol=1e-12)
        for link, norm in (("bridge", False), ("bridge_norm", True)):
            got = la.predict(x, link=link, chunk_size=chunk_size)
            want = links.laplace_bridge(mu, S, normalize=norm)
            torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


def test_bridges_equal_laplace_torch_to_1e_8():
    torch.manual_seed(0)
    model = MLP(d_out=5).to(DT)
    x, y = make_data("classification", 40, 5, (4,))
    lt, la = laplace_torch_pair(model, x.to(DT), y, 0.5, "last_layer")
    x = x.to(DT)
    xt = x[:9]
    for link in ("bridge", "bridge_norm"):
        want = lt(xt, pred_type="glm", link_approx=link)
        assert (la.predict(xt, link=link) - want).abs().max() < 1e-8
    # laplace-torch's joint GLM covariance (its KronLLLaplace) = ours, Jacobian-free.
    _, f_cov = lt._glm_predictive_distribution(xt, joint=True)
    assert rel_err(la.functional_covariance(xt, joint=True), f_cov) < 1e-10


def test_bridge_is_finite_for_widely_spread_logits():
    """Logits spanning thousands (here after bridge_norm's rescaling) stay finite: log space."""
    mu = torch.tensor([[900.0, -900.0, 0.0, 5.0]], dtype=DT)
    S = torch.eye(4, dtype=DT)[None] * 1e-6
    for norm in (False, True):
        p = links.laplace_bridge(mu, S, normalize=norm)
        assert torch.isfinite(p).all() and abs(float(p.sum()) - 1) < 1e-12
        assert int(p.argmax()) == 0


def test_functional_samples_shapes_and_moments():
    la, model, x = _case("mlp", {}, "kfac")
    x = x[:3]
    g = torch.Generator().manual_seed(0)
    s = la.functional_samples(x, 40000, joint=True, generator=g)
    assert s.shape == (40000, 3, 3)
    with torch.no_grad():
        mu = model(x)
    want = _dense_joint(la, model, x)
    flat = s.reshape(s.shape[0], -1)
    torch.testing.assert_close(
        flat.mean(0), mu.reshape(-1), atol=0.05 * want.diag().sqrt().max(), rtol=0
    )
    emp = torch.cov(flat.T)
    assert (emp - want).abs().max() < 0.05 * want.diag().max()
    # Independent per input: the cross-input blocks vanish, the per-input blocks agree.
    s2 = la.functional_samples(x, 40000, generator=g)
    emp2 = torch.cov(s2.reshape(40000, -1).T).reshape(3, 3, 3, 3)
    assert emp2[0, :, 1].abs().max() < 0.05 * want.diag().max()
    assert (
        emp2[1, :, 1] - want.reshape(3, 3, 3, 3)[1, :, 1]
    ).abs().max() < 0.05 * want.diag().max()
    # Reproducible with a generator.
    a = la.functional_samples(x, 5, joint=True, generator=torch.Generator().manual_seed(3))
    b = la.functional_samples(x, 5, joint=True, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


# ----------------------------------------------------------------------------- many classes


def _prototype_head(C=1000, D=128, n=3000, noise=2.5, scale=0.3, seed=0):
    """A synthetic 1,000-class last layer: a nearest-prototype classifier on 128 features."""
    g = torch.Generator().manual_seed(seed)
    protos = torch.randn(C, D, generator=g)

    def draw(m):
        y = torch.randint(0, C, (m,), generator=g)
        return protos[y] + noise * torch.randn(m, D, generator=g), y

    model = nn.Linear(D, C)
    with torch.no_grad():
        model.weight.copy_(scale * protos)
        model.bias.copy_(-scale / 2 * protos.square().sum(1))
    return model, draw(n), draw(600)


def test_thousand_classes_every_link_keeps_the_map_accuracy(monkeypatch):
    model, (x, y), (xt, yt) = _prototype_head()
    la = lk.KronLaplace(model, "classification", modules="last_layer").fit([(x, y)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the grid's small priors are near uniform
        la.optimize_prior_precision(
            method="gridsearch", val_loader=[(xt[:300], yt[:300])], grid=torch.logspace(-2, 4, 7)
        )
    xs, ys = xt[300:], yt[300:]
    with torch.no_grad():
        map_acc = float((model(xs).argmax(-1) == ys).float().mean())
    assert map_acc > 0.7
    # The last layer's outputs are the network's: no backward pass at all.
    calls = []
    grad = torch.autograd.grad
    monkeypatch.setattr(torch.autograd, "grad", lambda *a, **k: calls.append(1) or grad(*a, **k))
    g = torch.Generator().manual_seed(0)
    for link in LINKS:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a tuned prior: no near-uniform warning
            p = la.predict(xs, link=link, n_samples=50, generator=g)
        acc = float((p.argmax(-1) == ys).float().mean())
        assert acc > map_acc - 0.03, (link, acc, map_acc)
        assert torch.allclose(p.sum(-1), torch.ones(len(xs)), atol=1e-4)
    assert not calls
    # A far too small prior: the predictive collapses to uniform; say so, once, with the fix.
    la.prior_precision = 1e-4
    with pytest.warns(UserWarning, match="nearly uniform.*prior precision 0.0001.*gridsearch") as w:
        la.predict(xs)
    assert sum("nearly uniform" in str(r.message) for r in w) == 1


@pytest.mark.parametrize("modules", ["last_layer", None])
def test_every_link_memory_is_bounded_by_chunk_size(modules):
    """Peak memory of every link stays within a few chunk budgets, far below the ``B C^2``
    covariances of all inputs (20 MB here, which centered probit / bridge used to hold)."""
    torch.manual_seed(0)
    C, B, chunk = 200, 64, 2**16
    model = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, C)).to(DT)
    x = torch.randn(300, 8, dtype=DT)
    y = torch.randint(0, C, (300,))
    la = lk.KronLaplace(model, "classification", modules=modules, prior_precision=10.0)
    la.fit([(x, y)])
    la.predict(x[:2])  # warm-up (eigendecompositions)
    all_covs = 8 * B * C * C
    for link in LINKS:
        peak = peak_cpu_bytes(
            lambda link=link: la.predict(x[:B], link=link, chunk_size=chunk, n_samples=20)
        )
        assert peak < 4 * 8 * chunk + 2**20, (link, peak)  # measured 0.7-1.7 MB
        assert peak < all_covs / 8, (link, peak)


def test_gridsearch_does_not_warn_about_the_priors_it_visits():
    import warnings as _w

    from _dense import MLP as _MLP
    from _dense import make_data as _make

    import laplace_kron as _lk

    model = _MLP(d_out=3).double()
    with torch.no_grad():  # a confident MAP, so that tiny priors give a near-uniform predictive
        for p in model.parameters():
            p.mul_(8.0)
    x, y = _make("classification", 40, 3)
    x = x.double()
    la = _lk.KronLaplace(model, "classification", fisher="exact").fit([(x, y)])
    with _w.catch_warnings():
        _w.simplefilter("error")
        la.optimize_prior_precision(
            method="gridsearch", val_loader=[(x, y)], grid=[1e-8, 1e-4, 1.0, 1e4]
        )


def test_glm_refuses_an_input_it_cannot_form_and_glm_mc_still_runs(monkeypatch):
    """A single input whose GLM moments need more numbers than MAX_INPUT_ELEMENTS (a language
    model's [T V] outputs with a tied vocabulary table: C^2 cotangents, a [C, P_diag] Jacobian)
    is refused with the alternatives named, instead of an allocator crash."""
    from laplace_kron import glm

    torch.manual_seed(0)
    V, T, D = 40, 5, 6
    emb = nn.Embedding(V, D)
    head = nn.Linear(D, V, bias=False)
    head.weight = emb.weight  # tied: a diagonal block over V x D parameters
    model = nn.Sequential(emb, nn.Tanh(), head).eval()
    ids = torch.randint(0, V, (6, T))
    la = lk.KronLaplace(model, "classification").fit([(ids, ids)])
    C = T * V
    need = C * C + C * V * D  # at least the cotangents and the diagonal-block Jacobian
    monkeypatch.setattr(glm, "MAX_INPUT_ELEMENTS", need // 2)
    with pytest.raises(ValueError, match="single input.*method='glm_mc'"):
        la.predict(ids[:2])
    probs = la.predict(ids[:2], method="glm_mc", n_samples=4)
    assert probs.shape == (2, T, V)
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, T))
    monkeypatch.setattr(glm, "MAX_INPUT_ELEMENTS", 100 * need)
    assert la.predict(ids[:2]).shape == (2, T, V)  # below the limit: unchanged
