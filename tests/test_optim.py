"""KFAC / EKFAC preconditioners (laplace_kron.optim) against a dense float64 computation.

The reference below forms the layer's basis ``U = Q_G (x) Q_A`` (with SUA ``Q_G (x) Q_Omega (x)
I_K``) as a dense matrix, takes per-example gradients from ``torch.func`` (``vmap(grad)``), patches
from ``F.unfold`` and output-gradients from ``torch.autograd.grad``, and applies the formulas of
docs/math.md ("Training with curvature") step by step, keeping its own eigenbases and running
eigenvalues between refreshes.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from laplace_kron.optim import EKFAC, KFAC

DEFAULT_DTYPE = torch.float64


# ------------------------------------------------------------------------------------------------
# models


class Seq(nn.Module):
    """``nn.Linear`` on ``[B, T, D]`` inputs (``L = T`` positions per example)."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(5, 6)
        self.fc2 = nn.Linear(6, 3)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)).mean(dim=1))


class Tied(nn.Module):
    """One layer called twice in a forward pass (its positions are concatenated)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.out = nn.Linear(4, 3)

    def forward(self, x):
        return self.out(torch.tanh(self.fc(torch.tanh(self.fc(x)))))


def make_model(kind: str) -> nn.Module:
    torch.manual_seed(1)
    if kind == "mlp":
        return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))
    if kind == "mlp_nobias":
        return nn.Sequential(nn.Linear(5, 7, bias=False), nn.Tanh(), nn.Linear(7, 3, bias=False))
    if kind == "conv":
        return nn.Sequential(
            nn.Conv2d(2, 3, 3, padding=1),
            nn.Tanh(),
            nn.Conv2d(3, 2, 2, stride=2),
            nn.Tanh(),
            nn.Flatten(),
            nn.Linear(18, 3),
        )
    if kind == "conv_nobias":
        return nn.Sequential(
            nn.Conv2d(2, 3, 3, padding=1, bias=False),
            nn.Tanh(),
            nn.Conv2d(3, 2, 2, stride=2, dilation=1),
            nn.Tanh(),
            nn.Flatten(),
            nn.Linear(18, 3),
        )
    if kind == "seq":
        return Seq()
    if kind == "tied":
        return Tied()
    raise ValueError(kind)


def make_batch(kind: str, B: int = 24, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    shape = {"conv": (B, 2, 6, 6), "conv_nobias": (B, 2, 6, 6), "seq": (B, 4, 5), "tied": (B, 4)}
    x = torch.randn(*shape.get(kind, (B, 5)), generator=gen)
    y = torch.randint(0, 3, (B,), generator=gen)
    return x, y


# ------------------------------------------------------------------------------------------------
# dense reference


def _patches(module: nn.Module, x):
    if isinstance(module, nn.Linear):
        return x.reshape(x.shape[0], -1, x.shape[-1])
    cols = F.unfold(x, module.kernel_size, module.dilation, module.padding, module.stride)
    return cols.transpose(1, 2)


def _out_rows(module: nn.Module, y):
    if isinstance(module, nn.Linear):
        return y.reshape(y.shape[0], -1, y.shape[-1])
    return y.flatten(2).transpose(1, 2)


class Reference:
    """The preconditioner's formulas, computed densely, one step at a time."""

    def __init__(self, kind, method, eps, sua=False, update_freq=1, alpha=0.75):
        self.kind, self.method, self.eps = kind, method, eps
        self.sua, self.freq, self.alpha = sua, update_freq, alpha
        self.steps = 0
        self.state: dict[str, dict] = {}

    def _layers(self, model):
        return [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]

    def step(self, params: dict, x, y) -> dict:
        model = make_model(self.kind)
        model.load_state_dict(params)
        B = x.shape[0]
        calls: dict[str, list] = {}
        hooks = [
            m.register_forward_hook(
                lambda mod, inp, out, n=n: calls.setdefault(n, []).append((inp[0], out))
            )
            for n, m in self._layers(model)
        ]
        loss = F.cross_entropy(model(x), y)
        for h in hooks:
            h.remove()
        names = list(calls)
        outs = [o for n in names for _, o in calls[n]]
        gouts = iter(torch.autograd.grad(loss, outs))

        p = {k: v.detach() for k, v in model.named_parameters()}

        def loss_one(p, xn, yn):
            return F.cross_entropy(functional_call(model, p, (xn[None],)), yn[None])

        per = vmap(grad(loss_one), in_dims=(None, 0, 0))(p, x, y)
        result = {}
        for n in names:
            m = dict(model.named_modules())[n]
            a = torch.cat([_patches(m, xi) for xi, _ in calls[n]], dim=1)
            g = torch.cat([_out_rows(m, next(gouts)) for _ in calls[n]], dim=1) * B
            result.update(self._layer(n, m, a, g, [xi for xi, _ in calls[n]], per, B))
        self.steps += 1
        return result

    def _layer(self, n, m, a, g, xs, per, B):
        L = a.shape[1]
        sua = self.sua and isinstance(m, nn.Conv2d)
        has_b = m.bias is not None
        d_out = g.shape[-1]
        Gw = per[f"{n}.weight"].reshape(B, d_out, -1)
        if sua:
            K = math.prod(m.kernel_size)
            center = (m.kernel_size[0] // 2) * m.kernel_size[1] + m.kernel_size[1] // 2
            Gn = Gw.reshape(B, d_out, -1, K)
            if has_b:
                bias_ch = torch.zeros(B, d_out, 1, K)
                bias_ch[:, :, 0, center] = per[f"{n}.bias"]
                Gn = torch.cat([Gn, bias_ch], dim=2)
            vecs = Gn.reshape(B, -1)
        else:
            parts = [Gw] + ([per[f"{n}.bias"][..., None]] if has_b else [])
            vecs = torch.cat(parts, dim=2).reshape(B, -1)
        st = self.state.setdefault(n, {})
        if self.steps % self.freq == 0 or not st:
            if sua:
                pix = torch.cat([xi.permute(0, 2, 3, 1).reshape(-1, xi.shape[1]) for xi in xs])
                if has_b:
                    pix = torch.cat([pix, torch.ones(pix.shape[0], 1)], dim=1)
                A = pix.T @ pix / pix.shape[0]
            else:
                rows = a.reshape(B * L, -1)
                if has_b:
                    rows = torch.cat([rows, torch.ones(B * L, 1)], dim=1)
                A = rows.T @ rows / (B * L)
            G = g.reshape(B * L, -1).T @ g.reshape(B * L, -1) / (B * L)
            eA, QA = torch.linalg.eigh(A)
            QA = QA.contiguous()  # torch.kron fails on the column-major result of eigh
            eG, QG = torch.linalg.eigh(G)
            QG = QG.contiguous()
            if sua:
                QA, eA = torch.kron(QA, torch.eye(K)), torch.kron(eA, torch.ones(K))
            st.update(U=torch.kron(QG, QA), kfac=L * torch.kron(eG, eA), A=A, G=G)
            st["m2"] = st["kfac"].clone()
        U = st["U"]
        gvec = vecs.mean(0)
        proj = U.T @ gvec
        if self.method == "kfac":
            s = st["kfac"]
        elif self.method == "ekfac":
            s = ((vecs @ U) ** 2).mean(0)
            assert torch.allclose(proj, (vecs @ U).mean(0))
        else:
            st["m2"] = self.alpha * st["m2"] + (1 - self.alpha) * B * proj**2
            s = st["m2"]
        new = (U @ (proj / (s + self.eps))).reshape(d_out, -1)
        out = {}
        if sua:
            new = new.reshape(d_out, -1, K)
            out[f"{n}.weight"] = new[:, : m.in_channels].reshape(m.weight.shape)
            if has_b:
                out[f"{n}.bias"] = new[:, -1, center]
        else:
            out[f"{n}.weight"] = new[:, : m.weight[0].numel()].reshape(m.weight.shape)
            if has_b:
                out[f"{n}.bias"] = new[:, -1]
        return out


def make_precond(model, method, eps, sua=False, update_freq=1, alpha=0.75):
    if method == "kfac":
        return KFAC(model, eps, sua=sua, update_freq=update_freq)
    return EKFAC(model, eps, sua=sua, ra=method == "ekfac_ra", update_freq=update_freq, alpha=alpha)


def run_and_compare(kind, method, sua=False, update_freq=1, steps=4, eps=1e-3, alpha=0.75):
    model = make_model(kind)
    precond = make_precond(model, method, eps, sua, update_freq, alpha)
    ref = Reference(kind, method, eps, sua, update_freq, alpha)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for k in range(steps):
        x, y = make_batch(kind, seed=k)
        expected = ref.step({n: v.detach().clone() for n, v in model.state_dict().items()}, x, y)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        precond.step()
        for n, p in model.named_parameters():
            torch.testing.assert_close(p.grad, expected[n], rtol=1e-9, atol=1e-12, msg=n)
        opt.step()
    return precond, ref


METHODS = ["kfac", "ekfac", "ekfac_ra"]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("kind", ["mlp", "mlp_nobias", "seq", "tied"])
def test_linear_matches_dense_reference(kind, method):
    run_and_compare(kind, method, update_freq=1, steps=2)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("kind", ["mlp", "conv"])
def test_update_freq_keeps_basis_and_running_average(kind, method):
    """update_freq=3 over 5 steps: refreshes at steps 0 and 3, stale bases in between."""
    precond, ref = run_and_compare(kind, method, update_freq=3, steps=5, alpha=0.6)
    for c in precond.curvature():
        assert c.refreshed_at == 3
        torch.testing.assert_close(c.A, ref.state[c.name]["A"])
        torch.testing.assert_close(c.G, ref.state[c.name]["G"])
        if method == "ekfac_ra":
            torch.testing.assert_close(c.m2.flatten(), ref.state[c.name]["m2"])


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("sua", [False, True])
@pytest.mark.parametrize("kind", ["conv", "conv_nobias"])
def test_conv_matches_dense_reference(kind, method, sua):
    run_and_compare(kind, method, sua=sua, update_freq=2, steps=3)
