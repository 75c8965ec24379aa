"""Diagonal blocks (issue 15 item 2): every trainable parameter without a Kronecker block gets
the exact GGN diagonal; everything downstream works with mixed blocks. Ground truth: dense
torch.func GGNs / Jacobians in float64 on a tiny attention model."""

import math

import pytest
import torch
from _dense import assert_penalty_is_quadratic, exact_ggn, jacobian
from torch import nn

import laplace_kron as lk
from laplace_kron.kron import DiagBlock, KronBlock

DEFAULT_DTYPE = torch.float64  # applied per test by conftest.py

V, T, D, C = 7, 3, 4, 3


class Scale(nn.Module):
    """A custom module with its own parameter."""

    def __init__(self, d):
        super().__init__()
        self.gain = nn.Parameter(torch.randn(d) * 0.3 + 1)

    def forward(self, x):
        return x * self.gain


class Net(nn.Module):
    """Embedding + free positional parameter + attention + LayerNorm + custom module + Linear."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(V, D)
        self.pos = nn.Parameter(torch.randn(T, D) * 0.5)
        self.attn = nn.MultiheadAttention(D, 2, batch_first=True)
        self.norm = nn.LayerNorm(D)
        self.scale = Scale(D)
        self.fc = nn.Linear(D, 5)
        self.head = nn.Linear(5, C)

    def forward(self, x):
        h = self.emb(x) + self.pos
        a, _ = self.attn(h, h, h, need_weights=False)
        h = self.scale(self.norm(h + a)).mean(1)
        return self.head(torch.tanh(self.fc(h)))


DIAG = [  # emb.weight gets a Kronecker block with a diagonal input factor (test_embedding.py)
    "pos",
    "norm.weight",
    "norm.bias",
    "scale.gain",
]


def _model(seed=0):
    torch.manual_seed(seed)
    return Net().eval()


def _data(n=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, V, (n, T), generator=g), torch.randint(0, C, (n,), generator=g)


def _dense_h(model, x, curv):
    """Dense exact GGN restricted to the blocks: exact diagonal for diagonal blocks, the
    library's own block for Kronecker blocks (checked separately)."""
    P = curv.n_params
    H = torch.zeros(P, P)
    for b in curv.blocks:
        idx = curv.block_index(b)
        if isinstance(b, DiagBlock):
            block = torch.diag(exact_ggn(model, x, b.param_names, "classification").diagonal())
        else:
            block = b.to_dense()
        H[idx.unsqueeze(1), idx.unsqueeze(0)] = block
    return H


def test_coverage_and_exact_diagonals():
    model = _model()
    x, y = _data()
    curv = lk.kfac(model, [(x[:4], y[:4]), (x[4:], y[4:])], "classification", fisher="exact")
    assert curv.param_names == [n for n, _ in model.named_parameters()]
    diag = [b.param_names[0] for b in curv.blocks if isinstance(b, DiagBlock)]
    assert sorted(diag) == sorted(DIAG)
    for b in curv.blocks:
        if isinstance(b, DiagBlock):
            H = exact_ggn(model, x, b.param_names, "classification")
            torch.testing.assert_close(b.values.flatten(), H.diagonal(), rtol=1e-10, atol=1e-13)
    # Kronecker blocks of one position on a single datum: the exact GGN block (attention's
    # projections see T = 3 positions: tests/test_capture_uses.py checks them with one)
    one = lk.kfac(model, [(x[:1], y[:1])], "classification", fisher="exact")
    for b in one.blocks:
        if isinstance(b, KronBlock) and not b.param_names[0].startswith(("attn.", "emb.")):
            H = exact_ggn(model, x[:1], b.param_names, "classification")
            torch.testing.assert_close(b.to_dense(), H, rtol=1e-10, atol=1e-13)
    # EKFAC keeps the diagonal blocks (already exact per coordinate)
    e = lk.ekfac(model, [(x, y)], "classification", fisher="exact")
    for b, b2 in zip(curv.blocks, e.blocks):
        if isinstance(b, DiagBlock):
            torch.testing.assert_close(b.values, b2.values)


def test_loop_fallback_and_mc_match_vmap():
    from laplace_kron.curvature.diagonal import DiagonalGradients

    model = _model()
    x, _ = _data()
    cot = torch.randn(2, x.shape[0], C)
    a = DiagonalGradients(model, DIAG).squared_sums(x, cot)
    b = DiagonalGradients(model, DIAG, vectorize=False).squared_sums(x, cot)
    for n in DIAG:
        torch.testing.assert_close(a[n], b[n], rtol=1e-10, atol=1e-14)


def test_out_proj_listed_explicitly():
    """Attention's projections are captured by parameter use (Kronecker blocks, see
    tests/test_capture_uses.py), also when listed alone."""
    model = _model()
    x, y = _data()
    curv = lk.kfac(model, [(x, y)], "classification", fisher="exact", modules=["attn.out_proj"])
    assert [type(b) for b in curv.blocks] == [KronBlock]
    assert curv.param_names == ["attn.out_proj.weight", "attn.out_proj.bias"]
    # a listed attention module covers its packed projection and out_proj
    curv = lk.kfac(model, [(x, y)], "classification", modules=["attn"])
    assert curv.param_names == [n for n, _ in model.named_parameters() if n.startswith("attn.")]
    assert all(isinstance(b, KronBlock) for b in curv.blocks)


@pytest.fixture(scope="module", params=["kron", "diag"])
def fitted(request):
    """The embedding as a Kronecker block with a diagonal factor, and as a diagonal block."""
    torch.set_default_dtype(torch.float64)
    model = _model()
    x, y = _data()
    kw = {"fisher": "exact", "embeddings": request.param}
    la = lk.KronLaplace(model, "classification", **kw).fit([(x, y)])
    emb = next(b for b in la.curvature.blocks if b.param_names == ["emb.weight"])
    assert isinstance(emb, KronBlock if request.param == "kron" else DiagBlock)
    la.prior_precision = torch.linspace(0.5, 2.0, la.n_blocks, dtype=torch.float64)
    return la, x


def test_precision_and_evidence_dense(fitted):
    la, x = fitted
    curv = la.curvature
    H = _dense_h(la.model, x, curv)
    deltas = la.block_deltas()
    dvec = torch.cat([d.expand(b.n_params) for b, d in zip(curv.blocks, deltas)])
    Lam = H + torch.diag(dvec)
    torch.testing.assert_close(la.posterior_precision.to_dense(), Lam, rtol=1e-10, atol=1e-12)
    Sig = torch.linalg.inv(Lam)
    torch.testing.assert_close(la.posterior_covariance.to_dense(), Sig, rtol=1e-9, atol=1e-12)
    theta = la.mean
    evidence = (
        -curv.loss
        - 0.5 * (dvec * theta**2).sum()
        + 0.5 * dvec.log().sum()
        - 0.5 * torch.logdet(Lam)
    )
    torch.testing.assert_close(la.log_marginal_likelihood(), evidence, rtol=1e-10, atol=1e-10)
    # sampling: Lambda^{-1/2} (Lambda^{-1/2})^T = Sigma, samples [n, P]
    M = curv.inv_sqrt_matvec(torch.eye(curv.n_params), *la.damping())
    torch.testing.assert_close(M @ M.T, Sig, rtol=1e-9, atol=1e-12)
    assert la.sample(5, generator=torch.Generator().manual_seed(0)).shape == (5, curv.n_params)


def test_glm_covariance_dense(fitted):
    la, x = fitted
    J = jacobian(la.model, x, la.param_names)  # [B, C, P]
    Sig = la.posterior_covariance.to_dense()
    ref = J @ Sig @ J.mT
    for kw in ({}, {"vectorize": False}, {"chunk_size": 50}):
        torch.testing.assert_close(lk.predictive.functional_covariance(la, x, **kw), ref)
    var = lk.predictive.functional_variance(la, x)
    torch.testing.assert_close(var, ref.diagonal(dim1=1, dim2=2))
    for method in ("glm_mc", "nn"):
        p = la.predict(x, method=method, n_samples=4, generator=torch.Generator().manual_seed(0))
        assert p.shape == (x.shape[0], C) and torch.allclose(p.sum(-1), torch.ones(len(x)))


def test_save_load_mixed_and_malformed(fitted, tmp_path):
    la, x = fitted
    path = tmp_path / "la.pt"
    la.save(path)
    lb = lk.KronLaplace.load(path, la.model)
    torch.testing.assert_close(lb.posterior_precision.to_dense(), la.posterior_precision.to_dense())
    torch.testing.assert_close(lb.log_marginal_likelihood(), la.log_marginal_likelihood())
    state = la.state_dict()
    i = next(i for i, b in enumerate(state["blocks"]) if "diag" in b)
    bad_values = [
        {**state["blocks"][i], "diag": -state["blocks"][i]["diag"] - 1},  # negative
        {**state["blocks"][i], "diag": state["blocks"][i]["diag"].flatten()[:-1]},  # short
        {**state["blocks"][i], "G": torch.eye(2)},  # both kinds
    ]
    for entry in bad_values:
        bad = {**state, "blocks": [*state["blocks"][:i], entry, *state["blocks"][i + 1 :]]}
        with pytest.raises(ValueError, match="malformed"):
            lk.KronLaplace(la.model, "classification").load_state_dict(bad)


def test_online_laplace_penalty_dense():
    model = _model()
    x, y = _data()
    ol = lk.OnlineLaplace(model, "classification", curvature="kfac", fisher="exact", decay=0.5)
    assert sorted(ol.diag_names) == sorted([*DIAG, "emb.weight"])
    ol.consolidate([(x, y)])
    # OnlineLaplace keeps an embedding's exact diagonal block
    curv = lk.kfac(model, [(x, y)], "classification", fisher="exact", embeddings="diag")
    ol.consolidate([(x, y)])
    Lam = 1.5 * curv.to_dense() + ol.prior_precision * torch.eye(curv.n_params)
    torch.testing.assert_close(ol.to_dense(), Lam)
    assert_penalty_is_quadratic(ol, model, Lam)
    # save / load keeps the mixed precision
    ol2 = lk.OnlineLaplace(model, "classification", curvature="kfac", fisher="exact")
    ol2.load_state_dict(ol.state_dict())
    torch.testing.assert_close(ol2.penalty(), ol.penalty())


def test_transformer_encoder_classifier():
    torch.manual_seed(0)

    class Clf(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(V, 8)
            self.enc = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
            self.out = nn.Linear(8, C)

        def forward(self, x):
            return self.out(self.enc(self.emb(x)).mean(1))

    model = Clf().eval()
    x, y = _data(8)
    la = lk.KronLaplace(model, "classification").fit([(x[:4], y[:4]), (x[4:], y[4:])])
    assert la.param_names == [n for n, _ in model.named_parameters()]
    la.optimize_prior_precision()
    assert math.isfinite(float(la.log_marginal_likelihood()))
    p = la.predict(x)
    assert p.shape == (8, C) and torch.allclose(p.sum(-1), torch.ones(8))


def test_fit_state_keeps_diagonal_sums():
    from laplace_kron.curvature import CurvatureFitter

    model = _model()
    x, y = _data()
    fitter = CurvatureFitter(model, "classification", fisher="exact")
    curv = fitter.fit("kfac", [(x, y)])
    state = fitter.state.state_dict()
    assert len(state["D_sum"]) == len(DIAG)
    other = CurvatureFitter(model, "classification", fisher="exact")
    other.state.load_state_dict(state)
    again = other.curvature(other.blocks(), "kfac")
    torch.testing.assert_close(again.to_dense(), curv.to_dense())
    bad = {**state, "D_sum": state["D_sum"][:-1]}
    with pytest.raises(ValueError, match="D_sum must be a list"):
        other.state.load_state_dict(bad)
    bad = {**state, "D_sum": [t.flatten() for t in state["D_sum"]]}
    with pytest.raises(ValueError, match="D_sum holds a tensor of shape"):
        other.state.load_state_dict(bad)
