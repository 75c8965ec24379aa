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


def test_inplace_relu_after_layer():
    """The output hook sees dloss/doutput of the layer even when an in-place op follows it."""

    def net(inplace):
        torch.manual_seed(3)
        return nn.Sequential(nn.Linear(5, 7), nn.ReLU(inplace=inplace), nn.Linear(7, 3))

    x, y = make_batch("mlp")
    grads = []
    for inplace in (False, True):
        model = net(inplace)
        precond = EKFAC(model, 1e-3)
        F.cross_entropy(model(x), y).backward()
        precond.step()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("sua", [False, True])
def test_conv1d_equals_conv2d_of_height_one(sua):
    torch.manual_seed(0)
    c1 = nn.Sequential(nn.Conv1d(2, 3, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(24, 3))
    c2 = nn.Sequential(
        nn.Conv2d(2, 3, (1, 3), padding=(0, 1)), nn.Tanh(), nn.Flatten(), nn.Linear(24, 3)
    )
    c2[0].weight.data.copy_(c1[0].weight.data.unsqueeze(2))
    c2[0].bias.data.copy_(c1[0].bias.data)
    c2[3].load_state_dict(c1[3].state_dict())
    x, y = torch.randn(20, 2, 8), torch.randint(0, 3, (20,))
    for model, inp in ((c1, x), (c2, x.unsqueeze(2))):
        precond = EKFAC(model, 1e-3, sua=sua)
        F.cross_entropy(model(inp), y).backward()
        precond.step()
    torch.testing.assert_close(c2[0].weight.grad, c1[0].weight.grad.unsqueeze(2))
    torch.testing.assert_close(c2[0].bias.grad, c1[0].bias.grad)


def test_composes_with_sgd_and_leaves_uncovered_parameters_alone():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.LayerNorm(7), nn.Tanh(), nn.Linear(7, 3))
    precond = KFAC(model, 1e-2)
    assert precond.uncovered == ["1.weight", "1.bias"]
    assert [layer.name for layer in precond.layers] == ["0", "3"]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = make_batch("mlp")
    before = [p.detach().clone() for p in model.parameters()]
    F.cross_entropy(model(x), y).backward()
    raw = [p.grad.clone() for p in model.parameters()]
    precond.step()
    new = [p.grad.clone() for p in model.parameters()]
    opt.step()
    for b, g, p in zip(before, new, model.parameters()):
        torch.testing.assert_close(p.detach(), b - 0.1 * g)
    torch.testing.assert_close(new[2], raw[2])  # LayerNorm: plain gradient
    assert not torch.allclose(new[0], raw[0])


def test_float32_model_runs_and_agrees_with_float64():
    x, y = make_batch("mlp")
    out = []
    for dtype in (torch.float64, torch.float32):
        m = make_model("mlp").to(dtype)
        precond = EKFAC(m, 1e-2, ra=True)
        F.cross_entropy(m(x.to(dtype)), y).backward()
        precond.step()
        out.append(m[0].weight.grad.double())
    torch.testing.assert_close(out[1], out[0], rtol=1e-3, atol=1e-4)


def test_no_grad_and_unbackpropagated_forwards_are_ignored():
    model = make_model("mlp")
    precond = EKFAC(model, 1e-3)
    x, y = make_batch("mlp")
    with torch.no_grad():
        model(x)
    assert all(not layer.records for layer in precond.layers)
    model(x[:5])  # evaluated with gradients but never backpropagated
    F.cross_entropy(model(x), y).backward()
    precond.step()
    assert precond.curvature()[0].batch_size == 24
    assert all(not layer.records for layer in precond.layers)


def test_remove_and_context_manager():
    model = make_model("mlp")
    x, y = make_batch("mlp")
    with EKFAC(model, 1e-3) as precond:
        F.cross_entropy(model(x), y).backward()
        precond.step()
    assert not model[0]._forward_hooks and not model._forward_pre_hooks
    F.cross_entropy(model(x), y).backward()
    with pytest.raises(RuntimeError, match="no covered layer received a gradient"):
        precond.step()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(eps=0.0), "eps must be positive"),
        (dict(eps=-1.0), "eps must be positive"),
        (dict(eps=float("nan")), "eps must be positive"),
        (dict(eps=[1e-3, 1e-3]), "eps must be a positive number"),
        (dict(eps=1e-3, update_freq=0), "update_freq must be a positive integer"),
        (dict(eps=1e-3, update_freq=1.5), "update_freq must be a positive integer"),
        (dict(eps=1e-3, alpha=1.0), r"alpha must lie in \[0, 1\)"),
        (dict(eps=1e-3, alpha=-0.1), "alpha must lie in"),
        (dict(eps=1e-3, sua="yes"), "sua must be True or False"),
        (dict(eps=1e-3, ra=1), "ra must be True or False"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        EKFAC(make_model("mlp"), **kwargs)


def test_model_without_covered_layers():
    with pytest.raises(ValueError, match="no layer to precondition"):
        KFAC(nn.Sequential(nn.LayerNorm(4), nn.Tanh()), 1e-3)
    frozen = make_model("mlp").requires_grad_(False)
    with pytest.raises(ValueError, match="no layer to precondition"):
        EKFAC(frozen, 1e-3)


def test_step_needs_one_forward_and_backward():
    model = make_model("mlp")
    precond = EKFAC(model, 1e-3, ra=True)
    with pytest.raises(RuntimeError, match="call it after a forward pass"):
        precond.step()
    x, y = make_batch("mlp")
    model(x)
    with pytest.raises(RuntimeError, match="call it after a forward pass"):
        precond.step()
    # Two backpropagated batches (gradient accumulation) are refused, not silently mixed.
    F.cross_entropy(model(x), y).backward()
    F.cross_entropy(model(x), y).backward()
    with pytest.raises(RuntimeError, match="gradient accumulation"):
        precond.step()
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    precond.step()  # the failed steps left nothing behind
    assert precond.steps == 1


def test_unbatched_input_is_refused():
    model = make_model("mlp")
    EKFAC(model, 1e-3)
    with pytest.raises(ValueError, match="no batch axis"):
        model(torch.randn(5))


@pytest.mark.parametrize("method", METHODS)
def test_digits_training_beats_sgd(method):
    """Same lr, same batches, 2 epochs of a 64-32-10 MLP on scikit-learn digits: SGD reaches a
    training loss of about 2.0; KFAC / EKFAC + SGD (eps=1e-3) reach 0.05-0.3 (seeds 0-2)."""
    datasets = pytest.importorskip("sklearn.datasets")
    X, y = datasets.load_digits(return_X_y=True)
    X, y = torch.tensor(X / 16.0), torch.tensor(y)

    def train(method):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))
        precond = None if method is None else make_precond(model, method, 1e-3)
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        gen = torch.Generator().manual_seed(0)
        for _ in range(2):
            perm = torch.randperm(len(X), generator=gen)
            for i in range(0, len(X), 64):
                idx = perm[i : i + 64]
                opt.zero_grad()
                F.cross_entropy(model(X[idx]), y[idx]).backward()
                if precond is not None:
                    precond.step()
                opt.step()
        with torch.no_grad():
            return F.cross_entropy(model(X), y).item()

    sgd, pre = train(None), train(method)
    assert sgd > 1.5
    assert pre < 0.25 * sgd


@pytest.mark.parametrize("method", METHODS)
def test_state_dict_round_trip_continues_identically(method, tmp_path):
    kind = "conv"
    models = [make_model(kind), make_model(kind)]
    pre = [make_precond(m, method, 1e-3, sua=True, update_freq=3) for m in models]
    for k in range(2):
        x, y = make_batch(kind, seed=k)
        models[0].zero_grad()
        F.cross_entropy(models[0](x), y).backward()
        pre[0].step()
    torch.save(pre[0].state_dict(), tmp_path / "p.pt")
    pre[1].load_state_dict(torch.load(tmp_path / "p.pt", weights_only=True))
    assert pre[1].steps == 2
    x, y = make_batch(kind, seed=5)
    for m, p in zip(models, pre):
        m.zero_grad()
        F.cross_entropy(m(x), y).backward()
        p.step()
    for a, b in zip(*(m.parameters() for m in models)):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-12, atol=0)


def test_bad_state_dict_is_refused_and_changes_nothing():
    model = make_model("mlp")
    precond = EKFAC(model, 1e-3, ra=True)
    x, y = make_batch("mlp")
    F.cross_entropy(model(x), y).backward()
    precond.step()
    good = precond.state_dict()
    before = precond.curvature()[0].m2.clone()

    def edited(**changes):
        state = {**good, "layers": {n: dict(v) for n, v in good["layers"].items()}}
        for key, value in changes.items():
            if key in state:
                state[key] = value
            else:
                state["layers"]["0"][key] = value
        return state

    cases = [
        (edited(kind="KFAC"), "saved by KFAC"),
        (edited(sua=True), "saved by EKFAC"),
        (edited(steps=-1), "steps must be"),
        (edited(m2=torch.zeros(3, 3)), "m2 must be a tensor of shape"),
        (edited(A=torch.full((6, 6), float("nan"))), "A contains NaN"),
        (edited(positions=1.5), "integers >= 0"),
        ({**good, "layers": {"9": good["layers"]["0"]}}, "does not cover"),
        ({"steps": 1}, "not a preconditioner state_dict"),
    ]
    for state, match in cases:
        with pytest.raises(ValueError, match=match):
            precond.load_state_dict(state)
    assert precond.steps == 1
    torch.testing.assert_close(precond.curvature()[0].m2, before)
