"""nn.Embedding weights get a Kronecker block whose input factor is the diagonal of token counts
(issue 15, item 1). Ground truth in float64 from torch.func: the exact GGN block for one token,
the dense KFAC-expand formula for several tokens, EKFAC eigenvalues from dense per-example
gradients, dense GLM covariances; padding (padding_idx, attention_mask) changes nothing; a
50,000-token vocabulary never forms a [V, V] matrix."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _dense import exact_ggn, jacobian, loss_hessian
from torch import nn
from torch.func import functional_call, jacrev

import laplace_kron as lk
from laplace_kron.curvature import CurvatureFitter
from laplace_kron.glm_joint import joint_covariance
from laplace_kron.kron import DiagBlock, KronBlock

DEFAULT_DTYPE = torch.float64  # applied per test by conftest.py
DT = torch.float64
V, D, C, TMAX, PAD = 9, 4, 3, 6, 0


class Net(nn.Module):
    """Token embedding (with ``padding_idx``) + position embedding ([1, T] positions shared by
    the batch) -> tanh -> masked mean -> Linear."""

    def __init__(self):
        super().__init__()
        self.tok = nn.Embedding(V, D, padding_idx=PAD)
        self.pos = nn.Embedding(TMAX, D)
        self.head = nn.Linear(D, C)

    def embed(self, ids):
        return self.tok(ids) + self.pos(torch.arange(ids.shape[1])[None])

    def body(self, h, mask):
        m = mask.unsqueeze(-1)
        return self.head((torch.tanh(h) * m).sum(1) / m.sum(1))

    def forward(self, input_ids, attention_mask=None):
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        return self.body(self.embed(input_ids), mask.to(DT))


def _model(seed=0):
    torch.manual_seed(seed)
    return Net().to(DT).eval()


def _block(curv, name) -> KronBlock:
    (b,) = [b for b in curv.blocks if b.param_names == [name]]
    return b


# Three sequences with repeated tokens and padding_idx tokens; the third is padded at the end.
IDS = torch.tensor([[3, 5, 3, 0, 7], [1, 1, 1, 2, 8], [4, 0, 6, 0, 0]])
MASK = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
LABELS = torch.tensor([0, 2, 1])


def _batch():
    return {"input_ids": IDS, "attention_mask": MASK, "labels": LABELS}


@pytest.mark.parametrize("kind", ["kfac", "ekfac"])
def test_one_token_is_the_exact_ggn_block(kind):
    model = _model()
    for token in (3, PAD):  # the padding row has no gradient: a zero block, exactly
        x, y = torch.tensor([[token]]), torch.tensor([1])
        curv = getattr(lk, kind)(model, [(x, y)], "classification", fisher="exact")
        for name in ("tok.weight", "pos.weight"):
            b = _block(curv, name)
            assert b.G.shape == (b.param_shapes[0][0],) and b.A.shape == (D, D)  # [V] (x) G
            H = exact_ggn(model, x, [name], "classification")
            torch.testing.assert_close(b.to_dense(), H, rtol=1e-10, atol=1e-14)


def _per_position_jacobians(model):
    """``J [N, T, C, D]``: d f_n / d h_{n,t} at the embedding output, per datum."""
    with torch.no_grad():
        h = model.embed(IDS)
    out = []
    for n in range(IDS.shape[0]):
        J = jacrev(lambda hn, n=n: model.body(hn[None], MASK[n : n + 1].to(DT))[0])(h[n])
        out.append(J.permute(1, 0, 2))  # [T, C, D]
    return torch.stack(out)


def _dense_factors(model, ids, valid):
    """The KFAC-expand factors by hand: counts ``c [V']`` (``1/N sum_n 1/T_n`` per valid
    position holding the token), ``G = sum_{n, t valid} J^T H_n J``, and the square roots
    ``S_n`` (``S S^T = H_n``) for the per-example gradients."""
    with torch.no_grad():
        f = model(IDS, MASK)
    Hs = loss_hessian(f, "classification")
    J = _per_position_jacobians(model)
    N, T = ids.shape
    rows = int(ids.max()) + 1
    c = torch.zeros(rows)
    G = torch.zeros(D, D)
    for n in range(N):
        Tn = int(valid[n].sum())
        for t in range(T):
            if valid[n, t]:
                c[ids[n, t]] += 1.0 / (N * Tn)
                G += J[n, t].T @ Hs[n] @ J[n, t]
    lam, Q = torch.linalg.eigh(Hs)
    S = Q * lam.clamp_min(0).sqrt().unsqueeze(1)  # S_n S_n^T = H_n
    return c, G, J, S


@pytest.mark.parametrize("name", ["tok.weight", "pos.weight"])
def test_several_tokens_kfac_and_ekfac_match_dense_definitions(name):
    model = _model()
    ids = IDS if name == "tok.weight" else torch.arange(IDS.shape[1]).expand_as(IDS)
    valid = MASK.bool() & (ids != PAD) if name == "tok.weight" else MASK.bool()
    c, G, J, S = _dense_factors(model, ids, valid)
    Vn = model.get_parameter(name).shape[0]
    c = torch.cat([c, c.new_zeros(Vn - c.numel())])
    kfac = lk.kfac(model, [_batch()], "classification", fisher="exact")
    b = _block(kfac, name)
    torch.testing.assert_close(b.G, c, rtol=1e-12, atol=1e-15)  # the diagonal input factor
    torch.testing.assert_close(b.A, G, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(b.to_dense(), torch.kron(torch.diag(c), G), rtol=1e-10, atol=1e-14)
    if name == "tok.weight":
        assert b.G[PAD] == 0  # padding_idx positions are no data of the layer
    # EKFAC: E[v, i] = sum_{k,n} ((sum_{t valid} onehot(i_nt) g_{k,n,t}^T) Q_G)[v, i]^2
    e = _block(lk.ekfac(model, [_batch()], "classification", fisher="exact"), name)
    assert e.eig_G.vectors is None  # the identity, never formed
    QG = e.eig_A.vectors
    E = torch.zeros(Vn, D)
    for n in range(IDS.shape[0]):
        for k in range(C):
            grad = torch.zeros(Vn, D)
            for t in range(IDS.shape[1]):
                if valid[n, t]:
                    grad[ids[n, t]] += J[n, t].T @ S[n][:, k]
            E += (grad @ QG) ** 2
    torch.testing.assert_close(e.eigenvalues, E, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("kind", ["kfac", "ekfac"])
def test_padded_equals_unpadded(kind):
    model = _model()
    lengths = MASK.sum(1)
    single = [
        {"input_ids": IDS[i : i + 1, :n], "labels": LABELS[i : i + 1]}
        for i, n in enumerate(lengths.tolist())
    ]
    la = lk.KronLaplace(model, "classification", kind, fisher="exact").fit([_batch()])
    one = lk.KronLaplace(model, "classification", kind, fisher="exact").fit(single)
    assert isinstance(_block(la.curvature, "tok.weight"), KronBlock)
    torch.testing.assert_close(
        la.curvature.to_dense(), one.curvature.to_dense(), atol=1e-12, rtol=0
    )
    torch.testing.assert_close(la.log_marginal_likelihood(), one.log_marginal_likelihood())


def test_glm_evidence_sampling_match_dense(tmp_path):
    """GLM covariance = dense ``J Sigma J^T`` (padding_idx positions have no Jacobian), the
    evidence = the dense formula, save / load keeps everything, the prior tunes."""
    model = _model()
    x = IDS[:, :4]  # repeats and padding_idx tokens, no attention mask
    y = LABELS
    la = lk.KronLaplace(model, "classification", "ekfac", fisher="exact").fit([(x, y)])
    la.prior_precision = torch.linspace(0.5, 2.0, la.n_blocks)
    Sig = la.posterior_covariance.to_dense()
    J = jacobian(model, x, la.param_names)
    ref = J @ Sig @ J.mT
    for kw in ({}, {"chunk_size": 40}):
        torch.testing.assert_close(lk.predictive.functional_covariance(la, x, **kw), ref)
    torch.testing.assert_close(lk.predictive.functional_variance(la, x), ref.diagonal(0, 1, 2))
    _, joint = joint_covariance(la, x, chunk_size=200)  # across inputs
    Jf = J.reshape(-1, J.shape[-1])
    torch.testing.assert_close(joint, Jf @ Sig @ Jf.T)
    Lam = la.posterior_precision.to_dense()
    torch.testing.assert_close(Lam @ Sig, torch.eye(la.n_params), atol=1e-9, rtol=0)
    dvec = torch.cat([d.expand(b.n_params) for b, d in zip(la.curvature.blocks, la.block_deltas())])
    evidence = (
        -la.curvature.loss
        - 0.5 * (dvec * la.mean**2).sum()
        + 0.5 * dvec.log().sum()
        - 0.5 * torch.logdet(Lam)
    )
    torch.testing.assert_close(la.log_marginal_likelihood(), evidence)
    M = la.curvature.inv_sqrt_matvec(torch.eye(la.n_params), *la.damping())
    torch.testing.assert_close(M @ M.T, Sig, rtol=1e-9, atol=1e-12)
    for method in ("glm_mc", "nn"):
        p = la.predict(x, method=method, n_samples=3, generator=torch.Generator().manual_seed(0))
        assert p.shape == (3, C)
    path = tmp_path / "la.pt"
    la.save(path)
    lb = lk.KronLaplace.load(path, model)
    assert _block(lb.curvature, "tok.weight").G.ndim == 1
    torch.testing.assert_close(lb.posterior_precision.to_dense(), Lam)
    torch.testing.assert_close(lb.log_marginal_likelihood(), la.log_marginal_likelihood())
    la.optimize_prior_precision()
    assert torch.isfinite(la.log_marginal_likelihood())


def test_fit_state_roundtrip_and_accumulate_more_data():
    model = _model()
    fitter = CurvatureFitter(model, "classification", fisher="exact")
    curv = fitter.fit("kfac", [_batch()])
    state = fitter.state.state_dict()
    assert any(t is not None and t.ndim == 1 for t in state["A_sum"])  # the counts [V]
    other = CurvatureFitter(model, "classification", fisher="exact")
    other.state.load_state_dict(state)
    torch.testing.assert_close(other.curvature(other.blocks(), "kfac").to_dense(), curv.to_dense())
    bad = {
        **state,
        "A_sum": [t if t is None or t.ndim == 2 else torch.diag(t) for t in state["A_sum"]],
    }
    with pytest.raises(ValueError, match="A_sum holds a tensor of shape"):
        other.state.load_state_dict(bad)
    # fit(reset=False) adds data: the counts are a mean over data, G a sum (swapped slots)
    x, y = IDS[:, :3], LABELS
    la = lk.KronLaplace(model, "classification", fisher="exact").fit([(x[:1], y[:1])])
    la.fit([(x[1:], y[1:])], reset=False)
    whole = lk.KronLaplace(model, "classification", fisher="exact").fit([(x, y)])
    torch.testing.assert_close(la.curvature.to_dense(), whole.curvature.to_dense())


def test_large_vocabulary_never_forms_v_by_v():
    """V = 50,000: a [V, V] float64 matrix would take 20 GB; every factor stays [V] or [D, D]."""
    torch.manual_seed(0)
    Vb, Db = 50_000, 6
    model = nn.Sequential(nn.Embedding(Vb, Db), nn.Flatten(), nn.Linear(3 * Db, C)).to(DT).eval()
    g = torch.Generator().manual_seed(0)
    x, y = torch.randint(0, Vb, (16, 3), generator=g), torch.randint(0, C, (16,), generator=g)
    la = lk.KronLaplace(model, "classification", "ekfac").fit([(x[:8], y[:8]), (x[8:], y[8:])])
    b = _block(la.curvature, "0.weight")
    assert b.G.shape == (Vb,) and b.A.shape == (Db, Db) and b.eigenvalues.shape == (Vb, Db)
    assert b.eig_G.vectors is None
    la.optimize_prior_precision()
    assert torch.isfinite(la.log_marginal_likelihood())
    p = la.predict(x)
    assert p.shape == (16, C)
    assert la.sample(2).shape == (2, la.n_params)


class Tied(nn.Module):
    def __init__(self, functional: bool = False):
        super().__init__()
        self.emb = nn.Embedding(V, D)
        self.functional = functional
        if not functional:
            self.head = nn.Linear(D, V, bias=False)
            self.head.weight = self.emb.weight  # registered twice: a tied weight

    def forward(self, ids):
        h = torch.tanh(self.emb(ids)).mean(1)
        return F.linear(h, self.emb.weight) if self.functional else self.head(h)


def test_what_keeps_the_exact_diagonal_block():
    torch.manual_seed(0)
    x, y = IDS[:2, :3], LABELS[:2]
    cases = [
        (nn.Embedding(V, D, max_norm=1.0), {}),
        (nn.Embedding(V, D, scale_grad_by_freq=True), {}),
        (nn.Embedding(V, D), {"embeddings": "diag"}),
        (nn.Embedding(V, D), {"weight_sharing": "reduce"}),  # a dense [V, V] factor
    ]
    for emb, kw in cases:
        model = nn.Sequential(emb, nn.Flatten(), nn.Linear(3 * D, C)).to(DT).eval()
        curv = lk.kfac(model, [(x, y)], "classification", fisher="exact", **kw)
        assert isinstance(curv.blocks[0], DiagBlock), kw
    # sparse=True changes only the gradient's storage: the same Kronecker block
    torch.manual_seed(0)
    blocks = []
    for sparse in (False, True):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Embedding(V, D, sparse=sparse), nn.Flatten(), nn.Linear(3 * D, C))
        curv = lk.kfac(model.to(DT).eval(), [(x, y)], "classification", fisher="exact")
        blocks.append(curv.blocks[0].to_dense())
    torch.testing.assert_close(blocks[0], blocks[1], rtol=0, atol=0)
    # tied to a linear head (mixed orientation): one exact diagonal block over both uses
    model = Tied().to(DT).eval()
    curv = lk.kfac(model, [(x, y)], "classification", fisher="exact")
    assert [type(b) for b in curv.blocks] == [DiagBlock]
    H = exact_ggn(model, x, ["emb.weight"], "classification")
    torch.testing.assert_close(curv.blocks[0].values.flatten(), H.diagonal())


def test_refusals_name_the_fix():
    x, y = IDS[:2, :4], LABELS[:2]
    # the weight also used functionally (not registered twice): refused, embeddings='diag' works
    model = Tied(functional=True).to(DT).eval()
    with pytest.raises(ValueError, match="both as an embedding table.*embeddings='diag'"):
        lk.kfac(model, [(x, y)], "classification")
    curv = lk.kfac(model, [(x, y)], "classification", embeddings="diag")
    assert isinstance(curv.blocks[0], DiagBlock)

    # positions without a batch axis (arange(T)): per-datum gradients cannot be separated
    class Shared(Net):
        def embed(self, ids):
            return self.tok(ids) + self.pos(torch.arange(ids.shape[1]))

    with pytest.raises(ValueError, match="shared by the batch"):
        lk.kfac(_shared := Shared().to(DT).eval(), [(x, y)], "classification")
    assert isinstance(
        _block(lk.kfac(_shared, [(x[:1], y[:1])], "classification"), "pos.weight"), KronBlock
    )
    with pytest.raises(ValueError, match="embeddings must be one of"):
        lk.kfac(_model(), [(x, y)], "classification", embeddings="dense")


def test_bert_embeddings_one_token_exact_and_padded_equals_unpadded():
    pytest.importorskip("transformers")
    from test_huggingface import _bert

    model, _ = _bert(vocab=13, positions=8)
    names = [f"bert.embeddings.{e}_embeddings.weight" for e in ("word", "position", "token_type")]
    batch = {"input_ids": torch.tensor([[5]]), "labels": torch.tensor([1])}
    curv = lk.kfac(model, [batch], "classification", fisher="exact")
    params = {n: p.detach() for n, p in model.named_parameters()}

    def logits(sel):
        out = functional_call(model, {**params, **sel}, (), {"input_ids": batch["input_ids"]})
        return out.logits[0]

    p = torch.softmax(logits({}), -1)
    for name in names:
        b = _block(curv, name)
        assert b.G.ndim == 1
        Jn = jacrev(logits)({name: params[name]})[name].reshape(3, -1)
        H = Jn.T @ (torch.diag(p) - torch.outer(p, p)) @ Jn
        torch.testing.assert_close(b.to_dense(), H, rtol=1e-9, atol=1e-13)
    # padded = unpadded over the whole network ([1, T] position ids broadcast to the batch)
    ids = torch.tensor([[3, 4, 5, 6], [7, 8, 0, 0], [9, 10, 11, 0]])
    mask = (torch.arange(4) < torch.tensor([[4], [2], [3]])).long()
    labels = torch.tensor([0, 2, 1])
    padded = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    single = [
        {"input_ids": ids[i : i + 1, :n], "labels": labels[i : i + 1]}
        for i, n in enumerate(mask.sum(1).tolist())
    ]
    a = lk.kfac(model, [padded], "classification", fisher="exact")
    b = lk.kfac(model, single, "classification", fisher="exact")
    for name in names:
        torch.testing.assert_close(_block(a, name).G, _block(b, name).G, rtol=1e-10, atol=1e-14)
        torch.testing.assert_close(_block(a, name).A, _block(b, name).A, rtol=1e-9, atol=1e-12)
