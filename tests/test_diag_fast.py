"""Diagonal blocks from the fit's own backward pass (curvature/diag_uses.py): the per-example
gradients of recognised uses (linear, embedding, layer / RMS norm, broadcast scale and shift)
equal the vmapped ones, and anything not recognised, or recognised on the wrong axis, keeps the
vmapped path. Ground truth: torch.func per-example gradients and exact GGN diagonals, float64."""

import pytest
import torch
from _dense import exact_ggn
from test_diagonal_blocks import DIAG, _data, _model
from torch import nn
from torch.func import functional_call, grad, vmap

import laplace_kron as lk
from laplace_kron.curvature import diag_sums
from laplace_kron.curvature.diagonal import DiagonalGradients
from laplace_kron.kron import DiagBlock

DEFAULT_DTYPE = torch.float64  # applied per test by conftest.py


def _diag(curv) -> dict:
    return {b.param_names[0]: b.values for b in curv.blocks if isinstance(b, DiagBlock)}


@pytest.fixture
def no_vmap(monkeypatch):
    """Fail if the fit falls back to the vmapped per-example pass."""

    def refuse(self, x, cot):
        raise AssertionError(f"vmapped per-example pass used for {self.names}")

    monkeypatch.setattr(DiagonalGradients, "squared_sums", refuse)


def _vmap_only(monkeypatch):
    monkeypatch.setattr(diag_sums.DiagonalSums, "fast_names", lambda *a: [])


def test_exact_diagonals_without_the_vmapped_pass(no_vmap):
    model = _model()
    x, y = _data()
    curv = lk.kfac(model, [(x[:4], y[:4]), (x[4:], y[4:])], "classification", fisher="exact")
    d = _diag(curv)
    assert sorted(d) == sorted(DIAG)
    for n in DIAG:
        H = exact_ggn(model, x, [n], "classification")
        torch.testing.assert_close(d[n].flatten(), H.diagonal(), rtol=1e-10, atol=1e-13)


class RMSNet(nn.Module):
    """RMSNorm, a tied embedding / output matrix, an untied bias and a [1, T] position lookup."""

    def __init__(self, V=9, D=4, T=5):
        super().__init__()
        self.emb = nn.Embedding(V, D, padding_idx=0)
        self.pos = nn.Embedding(T, D)
        self.norm = nn.RMSNorm(D)
        self.mix = nn.Linear(D, D)
        self.head = nn.Linear(D, V, bias=False)
        self.head.weight = self.emb.weight  # tied as Hugging Face ties them
        self.out_bias = nn.Parameter(torch.randn(V) * 0.1)

    def forward(self, ids):
        h = self.emb(ids) + self.pos(torch.arange(ids.shape[1]).unsqueeze(0))
        h = torch.tanh(self.mix(self.norm(h)))
        return self.head(h) + self.out_bias  # [B, T, V]


def _seq_data(n=6, T=5, V=9, seed=2):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (n, T), generator=g)
    ids[1, 3:] = 0  # padding tokens
    return ids, torch.randint(0, V, (n, T), generator=g)


def test_sequence_empirical_fisher_equals_per_example_gradients(no_vmap):
    torch.manual_seed(0)
    model = RMSNet().eval()
    ids, y = _seq_data()
    data = [(ids[:3], y[:3]), (ids[3:], y[3:])]
    # embeddings="diag": the position table, looked up with [1, T] ids, gets a diagonal block too
    curv = lk.kfac(model, data, "classification", fisher="empirical", embeddings="diag")
    d = _diag(curv)
    names = ["emb.weight", "pos.weight", "norm.weight", "out_bias"]
    assert sorted(d) == sorted(names)
    params = {n: p.detach() for n, p in model.named_parameters()}

    def loss(p, i, t):
        f = functional_call(model, p, (i.unsqueeze(0),))[0]
        return nn.functional.cross_entropy(f, t, reduction="sum")

    g = vmap(grad(loss), in_dims=(None, 0, 0))(params, ids, y)
    for n in names:
        torch.testing.assert_close(
            d[n].flatten(), g[n].square().sum(0).flatten(), rtol=1e-10, atol=1e-13
        )


@pytest.mark.parametrize("fisher", ["mc", "exact"])
def test_same_numbers_as_the_vmapped_pass(monkeypatch, fisher):
    torch.manual_seed(0)
    model = RMSNet().eval()
    ids, y = _seq_data()
    data = [(ids[:3], y[:3]), (ids[3:], y[3:])]
    fast = _diag(lk.kfac(model, data, "classification", fisher=fisher))
    _vmap_only(monkeypatch)
    ref = _diag(lk.kfac(model, data, "classification", fisher=fisher))
    for n in ref:
        torch.testing.assert_close(fast[n], ref[n], rtol=1e-10, atol=1e-13)


class SeqFirst(nn.Module):
    """A LayerNorm applied to a sequence-first [T, B, D] tensor: its leading axis is not the
    batch, and with T == B the shapes cannot tell."""

    def __init__(self, D=3):
        super().__init__()
        self.inp = nn.Linear(2, D)
        self.norm = nn.LayerNorm(D)
        self.head = nn.Linear(D, 2)

    def forward(self, x):  # x [B, T, 2]
        h = self.norm(self.inp(x).transpose(0, 1))  # [T, B, D]
        return self.head(torch.tanh(h).mean(0))


def test_wrong_axis_keeps_the_vmapped_pass(monkeypatch):
    torch.manual_seed(0)
    model = SeqFirst().eval()
    x, y = torch.randn(4, 4, 2), torch.randint(0, 2, (4,))
    used = []
    orig = DiagonalGradients.squared_sums

    def spy(self, xx, cot):
        used.extend(self.names)
        return orig(self, xx, cot)

    monkeypatch.setattr(DiagonalGradients, "squared_sums", spy)
    curv = lk.kfac(model, [(x, y)], "classification", fisher="exact")
    assert sorted(set(used)) == ["norm.bias", "norm.weight"]
    d = _diag(curv)
    for n in ["norm.weight", "norm.bias"]:
        H = exact_ggn(model, x, [n], "classification")
        torch.testing.assert_close(d[n].flatten(), H.diagonal(), rtol=1e-10, atol=1e-13)


def test_norm_without_positions(no_vmap):
    """A LayerNorm on [B, D] rows (nothing to sum over but the data)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.Tanh(), nn.Linear(6, 3))
    x, y = torch.randn(10, 4), torch.randint(0, 3, (10,))
    d = _diag(lk.kfac(model, [(x[:4], y[:4]), (x[4:], y[4:])], "classification", fisher="exact"))
    for n in ["1.weight", "1.bias"]:
        H = exact_ggn(model, x, [n], "classification")
        torch.testing.assert_close(d[n].flatten(), H.diagonal(), rtol=1e-10, atol=1e-13)


class AffineNet(nn.Module):
    """Parameters used through affine images: Gemma's RMS norm scale ``x * (1 + w.double())``, a
    scaled gain ``x * (0.5 g)``, a reversed shift ``x + (1 - s)``."""

    def __init__(self, V=9, D=4, C=3):
        super().__init__()
        self.emb = nn.Embedding(V, D)
        self.w = nn.Parameter(torch.randn(D) * 0.3)
        self.g = nn.Parameter(torch.randn(D) * 0.3 + 1)
        self.s = nn.Parameter(torch.randn(D) * 0.3)
        self.head = nn.Linear(D, C)

    def forward(self, ids):
        h = self.emb(ids)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
        h = (h.double() * (1.0 + self.w.double())).to(h.dtype)
        h = h * (0.5 * self.g) + (1.0 - self.s)
        return self.head(torch.tanh(h).mean(1))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_affine_images_of_parameters(no_vmap, dtype):
    """``1 + w`` (after a cast), ``0.5 g`` and ``1 - s`` are images of the parameters: their
    uses give the parameters' per-example gradients times the slope (1, 0.5, -1)."""
    torch.manual_seed(0)
    model = AffineNet().to(dtype).eval()
    g = torch.Generator().manual_seed(3)
    x, y = torch.randint(0, 9, (6, 5), generator=g), torch.randint(0, 3, (6,), generator=g)
    curv = lk.kfac(model, [(x[:3], y[:3]), (x[3:], y[3:])], "classification", fisher="exact")
    d = _diag(curv)
    assert sorted(d) == ["g", "s", "w"]
    ref = model.double()
    for n in ("g", "s", "w"):
        H = exact_ggn(ref, x, [n], "classification")
        tol = 1e-10 if dtype == torch.float64 else 1e-4
        torch.testing.assert_close(d[n].double().flatten(), H.diagonal(), rtol=tol, atol=tol)
