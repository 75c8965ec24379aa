"""Batches, outputs and targets as Hugging Face gives them (issue 15, items 4 and 5), on small torch
models in float64: mapping batches, ``model(**inputs)``, tuple / ``.logits`` outputs,
``[B, T, C]`` logits with ``ignore_index`` and ``shift_labels``, padding (``attention_mask``),
flattened ``[B*T, C]`` outputs, multi-label binary with soft targets; dense ground truth from
torch.func."""

from __future__ import annotations

from collections import UserDict
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from _dense import MLP, make_data, rel_err
from torch import nn
from torch.func import functional_call, jacrev

import laplace_kron as lk
from laplace_kron.curvature import CurvatureFitter
from laplace_kron.links import laplace_bridge

DT = torch.float64
V, D, H = 7, 4, 5
C = V  # a language model: one class per token


class SeqModel(nn.Module):
    """Frozen embedding -> Linear -> tanh -> causal running mean -> Linear: ``[B, T, C]`` logits.
    Causal, so right padding never reaches a valid position."""

    def __init__(self, flatten: str = ""):
        super().__init__()
        self.emb = nn.Embedding(V, D).requires_grad_(False)
        self.inp = nn.Linear(D, H)
        self.head = nn.Linear(H, C)
        self.flatten = flatten  # "", "logits" ([B*T, C] out) or "hidden" (head on [B*T, H])

    def forward(self, input_ids, attention_mask=None):
        h = torch.tanh(self.inp(self.emb(input_ids)))
        T = h.shape[1]
        h = h.cumsum(1) / torch.arange(1, T + 1, dtype=h.dtype).unsqueeze(-1)
        if self.flatten == "hidden":
            return self.head(h.reshape(-1, H))
        f = self.head(h)
        return f.reshape(-1, C) if self.flatten == "logits" else f


def _seq_model(flatten: str = "") -> SeqModel:
    torch.manual_seed(0)
    return SeqModel(flatten).to(DT).eval()


LENGTHS = (3, 5, 2)


def _sequences(seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, V, (n,), generator=g) for n in LENGTHS]


def _padded(seqs, label_pad: int = -100, pad_id: int = 0) -> dict:
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id)
    mask = torch.zeros(len(seqs), T, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)], mask[i, : len(s)] = s, 1
    labels = torch.where(mask.bool(), ids, torch.full_like(ids, label_pad))
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _one_at_a_time(seqs) -> list[dict]:
    return [{"input_ids": s[None], "labels": s[None].clone()} for s in seqs]


def _fit(model, data, curvature="kfac", **kw):
    kw = {"fisher": "exact", **kw}
    return lk.KronLaplace(model, "classification", curvature, **kw).fit(data)


# ----------------------------------------------------------------------------- padding


@pytest.mark.parametrize(
    "curvature,sharing", [("kfac", "expand"), ("kfac", "reduce"), ("ekfac", "expand")]
)
@pytest.mark.parametrize("label_pad", [-100, 7])  # 7: padding labels left as tokens, masked
def test_padded_batch_equals_sequences_one_at_a_time(curvature, sharing, label_pad):
    model, seqs = _seq_model(), _sequences()
    kw = dict(weight_sharing=sharing, shift_labels=True)
    padded = _fit(model, [_padded(seqs, label_pad)], curvature, **kw)
    single = _fit(model, _one_at_a_time(seqs), curvature, **kw)
    assert padded.num_data == single.num_data == 3
    torch.testing.assert_close(
        padded.curvature.to_dense(), single.curvature.to_dense(), rtol=0, atol=1e-10
    )
    assert abs(padded.curvature.loss - single.curvature.loss) < 1e-10
    torch.testing.assert_close(
        padded.log_marginal_likelihood(), single.log_marginal_likelihood(), rtol=1e-12, atol=0
    )


def test_padding_reaches_no_factor_and_the_head_G_is_the_observed_hessian_sum():
    """G of the head = sum over observed (shifted, unpadded) positions of diag(p) - p p^T."""
    model, seqs = _seq_model(), _sequences()
    batch = _padded(seqs)
    batch["input_ids"][batch["attention_mask"] == 0] = 6  # what padding holds does not matter
    la = _fit(model, [batch], shift_labels=True)
    with torch.no_grad():
        f = model(batch["input_ids"])[:, :-1]
        obs = batch["labels"][:, 1:] != -100
        p = torch.softmax(f[obs], -1)
        G = torch.diag(p.sum(0)) - p.T @ p
    head = [b for b in la.curvature.blocks if "head.weight" in b.param_names][0]
    torch.testing.assert_close(head.G, G, rtol=1e-12, atol=1e-14)
    nll = F.cross_entropy(f[obs], batch["labels"][:, 1:][obs], reduction="sum")
    assert abs(la.curvature.loss - float(nll)) < 1e-10


# ----------------------------------------------------------------------------- exactness


def _dense_ggn(model, call, names, keep=None) -> torch.Tensor:
    """``sum_m keep_m J_m^T H_m J_m`` for softmax cross-entropy over output rows ``[M, C]``."""
    params = {n: p.detach() for n, p in model.named_parameters()}

    def rows(sel):
        return call({**params, **sel}).reshape(-1, C)

    sel = {n: params[n] for n in names}
    jac = jacrev(rows)(sel)
    with torch.no_grad():
        f = rows(sel)
    M = f.shape[0]
    J = torch.cat([jac[n].reshape(M, C, -1) for n in names], dim=2)
    p = torch.softmax(f, -1)
    Hf = torch.diag_embed(p) - p.unsqueeze(2) * p.unsqueeze(1)
    if keep is not None:
        Hf = Hf * keep.reshape(-1, 1, 1)
    return torch.einsum("mcp,mcd,mdq->pq", J, Hf, J)


def test_one_sequence_of_one_token_every_block_is_the_exact_ggn_block():
    model = _seq_model()
    ids = torch.tensor([[4]])
    la = _fit(model, [{"input_ids": ids, "labels": torch.tensor([[2]])}])
    names = la.param_names
    dense = _dense_ggn(model, lambda p: functional_call(model, p, (ids,)), names)
    K = la.curvature.to_dense()
    for b in la.curvature.blocks:
        idx = la.curvature.block_index(b)
        blk = dense[idx][:, idx]
        torch.testing.assert_close(K[idx][:, idx], blk, rtol=1e-10, atol=1e-12)


# ----------------------------------------------------------------------------- flattening


@pytest.mark.parametrize("flatten", ["logits", "hidden"])
@pytest.mark.parametrize(
    "curvature,sharing", [("kfac", "expand"), ("kfac", "reduce"), ("ekfac", "expand")]
)
def test_flattened_outputs_equal_unflattened(flatten, curvature, sharing):
    seqs = [s[:2] for s in _sequences()]  # equal lengths: no padding
    ids = torch.stack(seqs)
    y = torch.randint(0, C, ids.shape, generator=torch.Generator().manual_seed(1))
    y[0, 1] = -100
    ref = _fit(_seq_model(), [(ids, y)], curvature, weight_sharing=sharing)
    flat = _fit(_seq_model(flatten), [(ids, y.reshape(-1))], curvature, weight_sharing=sharing)
    assert flat.num_data == ref.num_data == 3
    torch.testing.assert_close(
        flat.curvature.to_dense(), ref.curvature.to_dense(), rtol=0, atol=1e-12
    )
    # The predictive is per datum and per position: [B, T, C] for both.
    for link in ("probit", "bridge"):
        torch.testing.assert_close(flat.predict(ids, link=link), ref.predict(ids, link=link))
    p = flat.predict(ids, method="nn", n_samples=4, generator=torch.Generator().manual_seed(0))
    assert p.shape == (3, 2, C)


def test_rows_not_a_multiple_of_the_batch_are_refused():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            return self.fc(x)[:-1]

    x, y = make_data("classification", 4, 3)
    with pytest.raises(ValueError, match="output has shape \\(3, 3\\) but the inputs hold 4"):
        lk.kfac(Odd().to(DT), [(x, y[:3])], "classification")


# ----------------------------------------------------------------------------- ignore_index


def test_ignored_targets_add_nothing_to_G_or_the_loss():
    torch.manual_seed(0)
    model = MLP().to(DT)
    x, y = make_data("classification", 8, 3)
    y_ign = y.clone()
    y_ign[[1, 5]] = -100
    keep = y_ign != -100
    for fisher in ("exact", "empirical"):  # (MC draws labels for every row: another stream)
        f_ign = CurvatureFitter(model, "classification", fisher=fisher)
        f_ref = CurvatureFitter(model, "classification", fisher=fisher)
        c_ign = f_ign.fit("kfac", [(x, y_ign)])
        c_ref = f_ref.fit("kfac", [(x[keep], y[keep])])
        for bi, br in zip(c_ign.blocks, c_ref.blocks):
            torch.testing.assert_close(bi.G, br.G, rtol=1e-12, atol=1e-14)
        assert abs(c_ign.loss - c_ref.loss) < 1e-12
        # N counts input examples; their inputs still enter A (documented)
        assert c_ign.num_data == 8
    # Another ignore_index: -100 is then a class index out of range, refused.
    with pytest.raises(ValueError, match=r"must lie in \[0, 2\].*ignore_index=-1"):
        lk.kfac(model, [(x, y_ign)], "classification", ignore_index=-1)


# ----------------------------------------------------------------------------- binary


def test_multilabel_binary_with_soft_targets_equals_the_dense_ggn():
    torch.manual_seed(0)
    model = MLP(d_out=3).to(DT)
    x = torch.randn(1, 4, dtype=DT)
    y = torch.tensor([[0.0, 0.3, 1.0]], dtype=DT)
    curv = lk.kfac(model, [(x, y)], "binary", fisher="exact")
    names = curv.param_names
    params = {n: p.detach() for n, p in model.named_parameters()}
    J = jacrev(lambda p: functional_call(model, p, (x,))[0])(params)
    J = torch.cat([J[n].reshape(3, -1) for n in names], 1)
    with torch.no_grad():
        s = torch.sigmoid(model(x)[0])
    dense = J.T @ torch.diag(s * (1 - s)) @ J
    K = curv.to_dense()
    for b in curv.blocks:
        idx = curv.block_index(b)
        torch.testing.assert_close(K[idx][:, idx], dense[idx][:, idx], rtol=1e-10, atol=1e-13)
    with torch.no_grad():
        f = model(x)
        nll = F.binary_cross_entropy_with_logits(f, y, reduction="sum")
    assert abs(curv.loss - float(nll)) < 1e-12
    # The empirical Fisher uses s - y (soft targets too): G of the last layer is that outer product.
    emp = lk.kfac(model, [(x, y)], "binary", fisher="empirical")
    r = (torch.sigmoid(f) - y)[0]
    torch.testing.assert_close(emp.blocks[-1].G, torch.outer(r, r))
    # Entries marked ignore_index add nothing; values outside [0, 1] are refused.
    y_ign = y.clone()
    y_ign[0, 1] = -100
    c = lk.kfac(model, [(x, y_ign)], "binary", fisher="exact")
    m = torch.tensor([1.0, 0.0, 1.0], dtype=DT)
    torch.testing.assert_close(c.blocks[-1].G, torch.diag(s * (1 - s) * m))
    with pytest.raises(ValueError, match="0 or 1, or probabilities"):
        lk.kfac(model, [(x, y + 0.5)], "binary")
    la = lk.KronLaplace(model, "binary").fit([(x.repeat(4, 1), y.repeat(4, 1))])
    assert la.predict(x.repeat(2, 1)).shape == (2, 3)


# ----------------------------------------------------------------------------- regression


class SeqRegressor(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(2, H)
        self.out = nn.Linear(H, 2)

    def forward(self, x, attention_mask=None):
        h = torch.tanh(self.inp(x))
        return self.out(h.cumsum(1))


def test_padded_regression_evidence_counts_observed_targets():
    torch.manual_seed(0)
    model = SeqRegressor().to(DT).eval()
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(n, 2, generator=g, dtype=DT) for n in LENGTHS]
    ys = [torch.randn(n, 2, generator=g, dtype=DT) for n in LENGTHS]
    T = max(LENGTHS)
    X, Y = torch.zeros(3, T, 2, dtype=DT), torch.full((3, T, 2), 5.0, dtype=DT)
    mask = torch.zeros(3, T, dtype=torch.long)
    for i, n in enumerate(LENGTHS):
        X[i, :n], Y[i, :n], mask[i, :n] = xs[i], ys[i], 1
    kw = dict(fisher="exact", sigma_noise=0.7)
    padded = lk.KronLaplace(model, "regression", **kw).fit(
        [{"x": X, "attention_mask": mask, "labels": Y}]
    )
    single = lk.KronLaplace(model, "regression", **kw).fit(
        [{"x": a[None], "labels": b[None]} for a, b in zip(xs, ys)]
    )
    assert padded.curvature.observed_targets == single.curvature.observed_targets == 20
    torch.testing.assert_close(padded.curvature.to_dense(), single.curvature.to_dense())
    torch.testing.assert_close(padded.log_marginal_likelihood(), single.log_marginal_likelihood())


# ----------------------------------------------------------------------------- batches, outputs


class Wrapped(nn.Module):
    """Returns the MLP's logits in a given form."""

    def __init__(self, form):
        super().__init__()
        self.body, self.form = MLP(), form

    def forward(self, features, attention_mask=None):
        f = self.body(features)
        if self.form == "tuple":
            return (f, None)
        if self.form == "logits":
            return SimpleNamespace(logits=f, loss=None)
        return {"logits": f, "hidden": f}


@pytest.mark.parametrize("form", ["tuple", "logits", "mapping"])
@pytest.mark.parametrize("container", [dict, UserDict])
def test_mapping_batches_and_output_forms(form, container):
    torch.manual_seed(0)
    model = Wrapped(form).to(DT)
    x, y = make_data("classification", 12, 3)
    batch = container({"features": x, "labels": y})
    la = _fit(model, [batch])
    ref = _fit(model.body, [(x, y)])
    torch.testing.assert_close(la.curvature.to_dense(), ref.curvature.to_dense())
    # predict takes the same mapping (the targets are dropped) and a pair's input mapping
    torch.testing.assert_close(la.predict(batch), ref.predict(x))
    torch.testing.assert_close(la.functional_variance(batch), ref.functional_variance(x))
    g = torch.Generator().manual_seed(0)
    p = la.predict(batch, method="glm_mc", n_samples=3, generator=g)
    assert p.shape == (12, 3)
    pair = _fit(model, [(container({"features": x}), y)])
    torch.testing.assert_close(pair.curvature.to_dense(), ref.curvature.to_dense())


def test_batch_refusals():
    torch.manual_seed(0)
    model = Wrapped("tuple").to(DT)
    x, y = make_data("classification", 6, 3)
    with pytest.raises(ValueError, match="no targets under target_key='labels'.*target_key="):
        lk.kfac(model, [{"features": x, "y": y}], "classification")
    c = lk.kfac(model, [{"features": x, "y": y}], "classification", target_key="y")
    assert c.num_data == 6
    with pytest.raises(TypeError, match=r"keys \['bad', 'features'\].*forward takes"):
        lk.kfac(model, [({"features": x, "bad": x}, y)], "classification")
    with pytest.raises(ValueError, match="shift_labels=True needs outputs"):
        lk.kfac(model, [({"features": x}, y)], "classification", shift_labels=True)
    with pytest.raises(TypeError, match="target_key must be a string"):
        lk.KronLaplace(model, "classification", target_key=3)
    with pytest.raises(TypeError, match="ignore_index must be an int"):
        lk.KronLaplace(model, "classification", ignore_index=1.5)
    with pytest.raises(TypeError, match="shift_labels must be True or False"):
        lk.OnlineLaplace(model, "classification", shift_labels="yes")
    bad_mask = {"features": x, "attention_mask": torch.full((6, 2), 2), "labels": y}
    with pytest.raises(ValueError, match="attention_mask must hold 0"):
        lk.kfac(model, [bad_mask], "classification")


def test_saved_posterior_keeps_the_batch_options(tmp_path):
    torch.manual_seed(0)
    model = Wrapped("logits").to(DT)
    x, y = make_data("classification", 10, 3)
    la = _fit(model, [{"features": x, "target": y}], target_key="target")
    la.save(tmp_path / "la.pt")
    back = lk.KronLaplace.load(tmp_path / "la.pt", model)
    assert back.options.target_key == "target"
    assert back.curvature.observed_targets == la.curvature.observed_targets == 30
    torch.testing.assert_close(
        back.predict({"features": x, "target": y}), la.predict({"features": x})
    )


def test_online_laplace_reads_mapping_batches():
    model, seqs = _seq_model(), _sequences()
    ol = lk.OnlineLaplace(model, "classification", fisher="exact", shift_labels=True)
    ol.consolidate([_padded(seqs)])
    ref = lk.OnlineLaplace(model, "classification", fisher="exact", shift_labels=True)
    ref.consolidate(_one_at_a_time(seqs))
    assert abs(float(ol.penalty(model)) - float(ref.penalty(model))) < 1e-12
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1)
    torch.testing.assert_close(ol.penalty(model), ref.penalty(model), rtol=1e-10, atol=0)


# ----------------------------------------------------------------------------- predict


def test_predict_uses_each_positions_block_of_the_dense_covariance():
    model, seqs = _seq_model(), [s[:2] for s in _sequences()]
    ids = torch.stack(seqs)
    la = _fit(model, [{"input_ids": ids, "labels": ids}], prior_precision=0.5)
    names = la.param_names
    params = {n: p.detach() for n, p in model.named_parameters()}
    jac = jacrev(lambda p: functional_call(model, {**params, **p}, (ids,)).reshape(3, -1))(
        {n: params[n] for n in names}
    )
    J = torch.cat([jac[n].reshape(3, 2 * C, -1) for n in names], 2)
    S = la.posterior_covariance.to_dense()
    cov = J @ S @ J.transpose(1, 2)  # [B, T C, T C]
    torch.testing.assert_close(la.functional_covariance(ids), cov, rtol=1e-9, atol=1e-12)
    with torch.no_grad():
        mu = model(ids)
    blocks = torch.stack([cov[:, t * C : (t + 1) * C, t * C : (t + 1) * C] for t in range(2)], 1)
    want = laplace_bridge(mu.reshape(-1, C), blocks.reshape(-1, C, C)).reshape(3, 2, C)
    torch.testing.assert_close(la.predict(ids, link="bridge_norm"), want, rtol=1e-9, atol=1e-12)
    p = la.predict({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids})
    assert p.shape == (3, 2, C)
    torch.testing.assert_close(p.sum(-1), torch.ones(3, 2, dtype=DT))
    assert rel_err(p, la.predict(ids, link="mc", n_samples=20000)) < 0.1  # probit ~ MC
