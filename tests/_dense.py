"""Dense ground truth for tests: exact GGN, Jacobians and per-example gradients via torch.func."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.func import functional_call, jacrev


def loss_hessian(f: Tensor, likelihood: str) -> Tensor:
    """Per-datum Hessian of the NLL w.r.t. the output, ``[B, C, C]`` (regression: sigma = 1)."""
    if likelihood == "classification":
        p = torch.softmax(f, -1)
        return torch.diag_embed(p) - p.unsqueeze(2) * p.unsqueeze(1)
    if likelihood == "regression":
        return torch.eye(f.shape[1], dtype=f.dtype).expand(f.shape[0], -1, -1)
    s = torch.sigmoid(f)
    return (s * (1 - s)).unsqueeze(-1)


def jacobian(model: nn.Module, x: Tensor, names: list[str]) -> Tensor:
    """Jacobian ``[B, C, P]`` of the outputs w.r.t. the named parameters (concatenated, flat)."""
    params = {n: p.detach() for n, p in model.named_parameters()}
    sel = {n: params[n] for n in names}

    def f(sel_params):
        out = functional_call(model, {**params, **sel_params}, (x,))
        return out.reshape(x.shape[0], -1)

    jac = jacrev(f)(sel)
    B = x.shape[0]
    return torch.cat([jac[n].reshape(B, jac[n].shape[1], -1) for n in names], dim=2)


def exact_ggn(model: nn.Module, x: Tensor, names: list[str], likelihood: str) -> Tensor:
    """Dense GGN ``sum_n J_n^T H_n J_n`` of the summed NLL, ``[P, P]``."""
    with torch.no_grad():
        f = model(x).reshape(x.shape[0], -1)
    J = jacobian(model, x, names)
    H = loss_hessian(f, likelihood)
    return torch.einsum("bcp,bcd,bdq->pq", J, H, J)


def block_mask(curv) -> Tensor:
    """Boolean ``[P, P]`` mask of the block-diagonal structure of a KronCurvature."""
    P = curv.n_params
    mask = torch.zeros(P, P, dtype=torch.bool)
    for b in curv.blocks:
        idx = curv.block_index(b)
        mask[idx.unsqueeze(1), idx.unsqueeze(0)] = True
    return mask


def rel_err(a: Tensor, b: Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


class MLP(nn.Sequential):
    def __init__(self, d_in=4, hidden=5, d_out=3, bias=True):
        super().__init__(
            nn.Linear(d_in, hidden, bias=bias),
            nn.Tanh(),
            nn.Linear(hidden, hidden, bias=bias),
            nn.Tanh(),
            nn.Linear(hidden, d_out, bias=bias),
        )


class CNN(nn.Sequential):
    """Conv2d -> Conv2d(1x1 output) -> Linear; the second conv sees exactly one position."""

    def __init__(self, d_out=3):
        super().__init__(
            nn.Conv2d(2, 3, kernel_size=3, padding=1, stride=2),  # 6x6 -> 3x3
            nn.Tanh(),
            nn.Conv2d(3, 4, kernel_size=3),  # 3x3 -> 1x1
            nn.Tanh(),
            nn.Flatten(),
            nn.Linear(4, d_out),
        )


class WideCNN(nn.Sequential):
    """Convolutions with 36 and 54 patch columns (channels-last patches by default)."""

    def __init__(self, d_out=3):
        super().__init__(
            nn.Conv2d(4, 6, kernel_size=3, padding=1),  # 7x7 -> 7x7
            nn.Tanh(),
            nn.Conv2d(6, 5, kernel_size=3, stride=2),  # 7x7 -> 3x3
            nn.Tanh(),
            nn.Flatten(),
            nn.Linear(45, d_out),
        )


def make_data(likelihood: str, n: int, d_out: int, x_shape=(4,), seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *x_shape, generator=g, dtype=torch.float64)
    if likelihood == "classification":
        y = torch.randint(0, d_out, (n,), generator=g)
    elif likelihood == "regression":
        y = torch.randn(n, d_out, generator=g, dtype=torch.float64)
    else:
        y = torch.randint(0, 2, (n,), generator=g).double()
    return x, y


def assert_penalty_is_quadratic(ol, model: nn.Module, Lam: Tensor) -> None:
    """Perturb ``model``'s parameters and check ``ol.penalty() = strength/2 d^T Lam d``."""
    theta0 = torch.cat([p.detach().flatten() for p in model.parameters()])
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    d = torch.cat([p.detach().flatten() for p in model.parameters()]) - theta0
    torch.testing.assert_close(ol.penalty(), 0.5 * ol.strength * d @ Lam @ d)


class Crash:
    """Yields batches and raises ``KeyboardInterrupt`` after ``at`` batches in total (over all
    passes): a fit killed mid-way, for checkpoint tests."""

    def __init__(self, batches, at):
        self.batches, self.at, self.n = batches, at, 0

    def __iter__(self):
        for b in self.batches:
            if self.n == self.at:
                raise KeyboardInterrupt("simulated crash")
            self.n += 1
            yield b
