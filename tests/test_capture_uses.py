"""Capture by parameter use (curvature/uses.py): Kronecker blocks for attention's projections,
Hugging Face Conv1D and weights tied between linear layers, against the exact GGN (torch.func)."""

from __future__ import annotations

import pytest
import torch
from _dense import assert_penalty_is_quadratic, exact_ggn, jacobian, rel_err
from torch import nn

import laplace_kron as lk
from laplace_kron.curvature import CurvatureFitter
from laplace_kron.kron import KronBlock

DEFAULT_DTYPE = torch.float64  # applied per test by conftest.py


class HFConv1D(nn.Module):
    """Hugging Face's Conv1D (transformers.pytorch_utils), copied so the test needs no download."""

    def __init__(self, nf, nx):
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.5)
        self.bias = nn.Parameter(torch.randn(nf) * 0.1)

    def forward(self, x):
        size_out = x.size()[:-1] + (self.nf,)
        return torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight).view(size_out)


HFConv1D.__name__ = "Conv1D"


class AttnNet(nn.Module):
    """Sequence classifier: Conv1D, self-attention, a tied pair of linear layers, pooled head."""

    def __init__(self, d=6, heads=2, C=3, cross=False):
        super().__init__()
        self.inp = HFConv1D(d, 4)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.l1 = nn.Linear(d, d)
        self.l2 = nn.Linear(d, d)
        self.l2.weight = self.l1.weight  # tied, with the same bias
        self.l2.bias = self.l1.bias
        self.head = nn.Linear(d, C)
        self.cross = cross

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        kv = torch.tanh(h.flip(1)) if self.cross else h
        h = h + self.attn(h, kv, kv, need_weights=False)[0]
        h = self.l2(torch.tanh(self.l1(h)))
        return self.head(h.mean(1))


def _fit(model, x, y, kind="kfac", **kw):
    return CurvatureFitter(model, "classification", fisher="exact", **kw).fit(kind, [(x, y)])


def _data(n=1, T=1, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, T, 4, generator=g), torch.randint(0, 3, (n,), generator=g)


def test_coverage_kinds():
    torch.manual_seed(0)
    model = AttnNet().eval()
    fitter = CurvatureFitter(model, "classification")
    kinds = {s.name: s.kind for s in fitter.specs}
    assert kinds == {
        "head": "module",
        "inp": "linear_t",
        "attn": "linear",
        "attn.out_proj": "linear",
        "l1": "linear",
    }
    assert fitter.diag_names == []


@pytest.mark.parametrize("kind", ["kfac", "ekfac"])
@pytest.mark.parametrize("separate_bias", [False, True])
def test_single_datum_one_position_exact(kind, separate_bias):
    """One datum, one position, exact Fisher: every block is the exact GGN block."""
    torch.manual_seed(0)
    model = AttnNet().eval()
    # The tied pair is used twice per datum: with one position the uses are still two
    # "positions" of the same weight, so its KFAC-expand block is not exact; check it apart.
    x, y = _data()
    curv = _fit(model, x, y, kind, separate_bias=separate_bias)
    for b in curv.blocks:
        assert isinstance(b, KronBlock)
        H = exact_ggn(model, x, b.param_names, "classification")
        if b.param_names[0].startswith("l1."):
            continue
        assert rel_err(b.to_dense(), H) < 1e-10, b.param_names


def test_tied_linear_used_twice_block_is_expand():
    """A weight used by two calls: one block, G from both uses' output-gradients, A the mean
    over both uses' inputs (KFAC-expand); here checked against a direct computation."""
    torch.manual_seed(0)
    lin = nn.Linear(3, 3)

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = lin
            self.head = nn.Linear(3, 2)

        def forward(self, x):
            return self.head(torch.tanh(self.lin(torch.tanh(self.lin(x)))))

    class Tied(Twice):
        def __init__(self):
            super().__init__()
            self.other = nn.Linear(3, 3)
            self.other.weight, self.other.bias = lin.weight, lin.bias

        def forward(self, x):
            return self.head(torch.tanh(self.other(torch.tanh(self.lin(x)))))

    x = torch.randn(5, 3)
    y = torch.randint(0, 2, (5,))
    torch.manual_seed(1)
    twice = Twice().eval()
    torch.manual_seed(1)
    tied = Tied().eval()
    a = _fit(twice, x, y)  # module hooks: one module called twice
    b = _fit(tied, x, y)  # by use: one weight in two modules
    assert [blk.param_names for blk in b.blocks] == [
        ["lin.weight", "lin.bias"],
        ["head.weight", "head.bias"],
    ]
    assert torch.allclose(a.to_dense(), b.to_dense(), atol=1e-12, rtol=0)


def test_conv1d_block_is_parameter_order():
    """Conv1D's weight [in, out]: the block is A (x) G in W.flatten() order; EKFAC too."""
    torch.manual_seed(0)
    model = nn.Sequential(HFConv1D(3, 4), nn.Tanh(), HFConv1D(2, 3)).eval()
    x = torch.randn(1, 4)
    y = torch.randint(0, 2, (1,))
    for kind in ("kfac", "ekfac"):
        curv = _fit(model, x, y, kind)
        assert len(curv.blocks) == 4
        H = exact_ggn(model, x, curv.param_names, "classification")
        mask = torch.zeros_like(H, dtype=torch.bool)
        for blk in curv.blocks:
            idx = curv.block_index(blk)
            mask[idx.unsqueeze(1), idx.unsqueeze(0)] = True
        assert rel_err(curv.to_dense(), H * mask) < 1e-10


def test_cross_attention_rows():
    """Cross-attention: the query / key / value row slices are uses of one packed weight; the
    capture accounts for its gradient (check_uses) and the fit runs."""
    torch.manual_seed(0)
    model = AttnNet(cross=True).eval()
    x, y = _data(4, 3)
    curv = _fit(model, x, y, separate_bias=True)
    assert any(
        "attn.in_proj_weight" in b.param_names for b in curv.blocks if isinstance(b, KronBlock)
    )


def test_unseen_use_is_refused():
    """A covered weight used outside the recorded calls is refused, never silently wrong."""
    torch.manual_seed(0)

    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.c = HFConv1D(3, 4)

        def forward(self, x):
            return self.c(x) + x @ self.c.weight.t().t()  # a second use through a view

    with pytest.raises(ValueError, match="used outside the linear maps"):
        _fit(Odd().eval(), torch.randn(3, 4), torch.randint(0, 3, (3,)))


def test_module_weight_used_outside_its_call_is_refused():
    """An nn.Linear / nn.Conv2d called as a module whose weight is also used elsewhere in the
    forward: the hooks see only the module's call, so the block would be silently wrong (it was:
    0.83 relative error on one datum). Refused; the layer applied twice through its module stays
    accepted (both calls are captured)."""
    torch.manual_seed(0)

    class Extra(nn.Module):
        def __init__(self, conv=False):
            super().__init__()
            self.conv = conv
            self.lin = nn.Conv2d(3, 3, 1) if conv else nn.Linear(3, 3)

        def forward(self, x):
            if self.conv:
                h = self.lin(x[:, :, None, None]).flatten(1)
                return h + x * self.lin.weight.flatten(1).sum(0)
            return self.lin(x) + x * self.lin.weight.sum(0)

    x, y = torch.randn(4, 3), torch.randint(0, 3, (4,))
    for conv in (False, True):
        with pytest.raises(ValueError, match="used outside the module's own call"):
            _fit(Extra(conv).eval(), x, y)

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 3)

        def forward(self, x):
            return self.lin(torch.tanh(self.lin(x)))

    _fit(Twice().eval(), x, y)
    # train-mode batch norm couples the data points but uses no weight elsewhere: accepted
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 3)).train()
    with pytest.warns(UserWarning, match="train mode"):
        lk.kfac(model, [(x, y)], "classification", modules=["0", "2"])


def test_glm_covariance_and_save_load_dense(tmp_path):
    """GLM covariance with Conv1D / attention / tied blocks (KFAC and EKFAC) = dense
    J Sigma J^T from the library's own dense posterior; save / load keeps the blocks."""
    torch.manual_seed(0)
    model = AttnNet().eval()
    x, y = _data(6, 3)
    xt, _ = _data(3, 3, seed=5)
    for kind in ("kfac", "ekfac"):
        la = lk.KronLaplace(model, "classification", curvature=kind).fit([(x, y)])
        la.prior_precision = torch.linspace(0.5, 2.0, la.n_blocks)
        J = jacobian(model, xt, la.param_names)
        ref = J @ la.posterior_covariance.to_dense() @ J.mT
        for kw in ({}, {"vectorize": False}):
            cov = lk.predictive.functional_covariance(la, xt, **kw)
            torch.testing.assert_close(cov, ref, rtol=1e-9, atol=1e-12)
        path = tmp_path / f"{kind}.pt"
        la.save(path)
        lb = lk.KronLaplace.load(path, model)
        torch.testing.assert_close(lb.log_marginal_likelihood(), la.log_marginal_likelihood())
        torch.testing.assert_close(lk.predictive.functional_covariance(lb, xt), ref)


def test_online_laplace_with_use_blocks():
    """EWC / online Laplace penalty over Conv1D and attention blocks = its dense quadratic."""
    torch.manual_seed(0)
    model = AttnNet().eval()
    x, y = _data(4, 2)
    ol = lk.OnlineLaplace(model, "classification", curvature="kfac", fisher="exact")
    ol.consolidate([(x, y)])
    curv = lk.kfac(model, [(x, y)], "classification", fisher="exact")
    Lam = curv.to_dense() + ol.prior_precision * torch.eye(curv.n_params)
    torch.testing.assert_close(ol.to_dense(), Lam)
    assert_penalty_is_quadratic(ol, model, Lam)


def test_gpt2_one_token_conv1d_blocks_exact():
    """A tiny GPT-2, one sequence of one token, exact Fisher: every Conv1D block (attention's
    c_attn / c_proj, the MLP's c_fc / c_proj) and the position embedding wpe (a diagonal input
    factor) is a Kronecker block equal to the exact GGN block; the tied wte / lm_head weight
    (mixed orientation) stays diagonal."""
    transformers = pytest.importorskip("transformers")
    from torch.func import functional_call, jacrev

    torch.manual_seed(0)
    cfg = transformers.GPT2Config(
        vocab_size=11, n_embd=8, n_layer=1, n_head=2, n_positions=4, attn_implementation="eager"
    )
    model = transformers.GPT2LMHeadModel(cfg).double().eval()
    batch = {"input_ids": torch.tensor([[3]]), "labels": torch.tensor([[5]])}
    params = {n: p.detach() for n, p in model.named_parameters()}

    def logits(sel):
        out = functional_call(model, {**params, **sel}, (), {"input_ids": batch["input_ids"]})
        return out.logits[0, 0]

    p = torch.softmax(logits({}), -1)
    for kind in ("kfac", "ekfac"):
        la = lk.KronLaplace(model, "classification", fisher="exact", curvature=kind).fit([batch])
        kron = [b for b in la.curvature.blocks if isinstance(b, KronBlock)]
        names = {n for b in kron for n in b.param_names}
        assert names == {
            f"transformer.h.0.{m}.{p}"
            for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
            for p in ("weight", "bias")
        } | {"transformer.wpe.weight"}
        for b in kron:
            jac = jacrev(logits)({n: params[n] for n in b.param_names})
            J = torch.cat([jac[n].reshape(11, -1) for n in b.param_names], 1)
            H = J.T @ (torch.diag(p) - torch.outer(p, p)) @ J
            assert rel_err(b.to_dense(), H) < 1e-10, (kind, b.param_names)
