"""The GLM predictive's diagonal-block Jacobians from the chunk's own backward pass
(``laplace_kron/glm_diag.py``) against dense ``J Sigma J^T``, and the per-example path they
replace where they are taken, refused or fail their verification."""

from __future__ import annotations

import warnings

import pytest
import torch
from _dense import jacobian
from torch import nn

import laplace_kron as lk
from laplace_kron import glm_diag
from laplace_kron.curvature.diag_uses import FastDiagonal

DT = torch.float64
V, T, D, C = 7, 3, 4, 3


class Net(nn.Module):
    """Embedding (tied to an output map) + positional table + LayerNorm + a broadcast gain +
    Linear layers; with ``exp_gain`` the gain enters as ``exp(g)`` (a use the closed forms do
    not know)."""

    def __init__(self, exp_gain: bool = False):
        super().__init__()
        self.emb = nn.Embedding(V, D)
        self.pos = nn.Parameter(torch.randn(T, D) * 0.5)
        self.norm = nn.LayerNorm(D)
        self.gain = nn.Parameter(torch.randn(D) * 0.3)
        self.fc = nn.Linear(D, 5)
        self.head = nn.Linear(5, C)
        self.exp_gain = exp_gain

    def forward(self, x):
        h = self.norm(self.emb(x) + self.pos)
        h = h * (self.gain.exp() if self.exp_gain else self.gain)
        # the table is also an output map (tied; F.linear): a diagonal block with two uses
        tied = nn.functional.linear(h.mean(1), self.emb.weight)[:, :C]
        return self.head(torch.tanh(self.fc(h.mean(1)))) + tied


def _fitted(model):
    g = torch.Generator().manual_seed(1)
    x, y = torch.randint(0, V, (8, T), generator=g), torch.randint(0, C, (8,), generator=g)
    la = lk.KronLaplace(model, "classification", embeddings="diag", prior_precision=0.5)
    return la.fit([(x[:4], y[:4]), (x[4:], y[4:])]), x


def _spy(monkeypatch) -> list:
    """The verification outcomes of every predictive pass."""
    seen, real = [], glm_diag.DiagJacobians._verify

    def verify(self, *a):
        seen.append(real(self, *a))
        return seen[-1]

    monkeypatch.setattr(glm_diag.DiagJacobians, "_verify", verify)
    return seen


def _dense(la, x):
    J = jacobian(la.model, x, la.param_names)
    return J @ la.posterior_covariance.to_dense() @ J.mT


@pytest.mark.parametrize("kw", [{}, {"vectorize": False}, {"chunk_size": 40, "batch_size": 3}])
def test_closed_form_jacobians_equal_dense(monkeypatch, kw):
    torch.manual_seed(0)
    la, x = _fitted(Net().to(DT).eval())
    seen = _spy(monkeypatch)
    cov = lk.predictive.functional_covariance(la, x, **kw)
    assert seen == [True]  # taken, verified once on the first chunk
    torch.testing.assert_close(cov, _dense(la, x), rtol=1e-10, atol=1e-12)
    var = lk.predictive.functional_variance(la, x, **kw)
    torch.testing.assert_close(var, cov.diagonal(dim1=1, dim2=2), rtol=1e-10, atol=1e-12)
    joint = lk.predictive.functional_covariance(la, x, joint=True, **kw).reshape(8, C, 8, C)
    J = jacobian(la.model, x, la.param_names).reshape(8 * C, -1)
    ref = (J @ la.posterior_covariance.to_dense() @ J.T).reshape(8, C, 8, C)
    torch.testing.assert_close(joint, ref, rtol=1e-10, atol=1e-12)


def test_chunks_keep_no_autograd_graph():
    """A chunk's closed-form state keeps the uses' inputs and output-gradients, not their
    outputs (the graph): the joint covariance keeps every chunk alive."""
    from laplace_kron.glm import GLMPass

    torch.manual_seed(0)
    la, x = _fitted(Net().to(DT).eval())
    run = GLMPass(la, x, "cov", 2**20, 3, None, True)
    chunks = list(run.chunks())
    assert len(chunks) == 3
    for chunk in chunks:
        uses, dys = chunk.diag
        assert uses and all(u.output is None for u in uses)
        assert all(not d.requires_grad and d.grad_fn is None for d in dys)


def test_unrecognised_use_and_failed_verification_take_the_per_example_path(monkeypatch):
    torch.manual_seed(0)
    la, x = _fitted(Net(exp_gain=True).to(DT).eval())
    seen = _spy(monkeypatch)
    cov = lk.predictive.functional_covariance(la, x)
    assert seen == []  # exp(gain) is not a recorded use: never tried
    torch.testing.assert_close(cov, _dense(la, x), rtol=1e-10, atol=1e-12)

    torch.manual_seed(0)
    la, x = _fitted(Net().to(DT).eval())
    real = FastDiagonal.example_jacobians

    def wrong(self, *a):  # a closed form that is off: the verification must catch it
        return {n: 2 * g for n, g in real(self, *a).items()}

    monkeypatch.setattr(FastDiagonal, "example_jacobians", wrong)
    cov = lk.predictive.functional_covariance(la, x, batch_size=3)
    assert seen == [False]
    torch.testing.assert_close(cov, _dense(la, x), rtol=1e-10, atol=1e-12)


def test_bert_whole_network_predictive_without_per_example_passes(monkeypatch):
    transformers = pytest.importorskip("transformers")
    from test_hf_zoo_exact import NO_DROP, V, _text

    torch.manual_seed(0)
    T = transformers
    model = _text(T.BertForSequenceClassification, T.BertConfig, **NO_DROP)().to(DT).eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, V, (6, 5), generator=g)
    mask = torch.ones_like(ids)
    mask[0, 3:] = 0
    batch = {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([0, 1, 2, 0, 1, 2])}
    la = lk.KronLaplace(model, "classification", prior_precision=1.0).fit([batch])
    assert any(isinstance(b, lk.kron.DiagBlock) for b in la.curvature.blocks)
    x = {"input_ids": ids, "attention_mask": mask}
    seen = _spy(monkeypatch)
    with warnings.catch_warnings():
        # the per-example path cannot vmap this model and warns: it must not run on every input
        warnings.filterwarnings("error", message=".*vmap over examples failed.*")
        cov = lk.predictive.functional_covariance(la, x)
    assert seen == [True]
    monkeypatch.setattr(glm_diag.DiagJacobians, "uses", lambda self, b: [])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = lk.predictive.functional_covariance(la, x)
    torch.testing.assert_close(cov, ref, rtol=1e-9, atol=1e-12)


def test_affine_images_of_parameters(monkeypatch):
    """Gemma's ``1 + weight`` scale and other affine images of parameters (test_diag_fast.py):
    closed-form Jacobians, equal to dense."""
    from test_diag_fast import AffineNet

    torch.manual_seed(0)
    model = AffineNet().to(DT).eval()
    g = torch.Generator().manual_seed(3)
    x, y = torch.randint(0, 9, (6, 5), generator=g), torch.randint(0, 3, (6,), generator=g)
    la = lk.KronLaplace(model, "classification", prior_precision=0.5).fit([(x, y)])
    seen = _spy(monkeypatch)
    cov = lk.predictive.functional_covariance(la, x)
    assert seen == [True]
    torch.testing.assert_close(cov, _dense(la, x), rtol=1e-10, atol=1e-12)
