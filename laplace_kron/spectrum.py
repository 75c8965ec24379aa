"""The posterior's eigenvalue spectrum, compressed, and the evidence computed from it.

This is the one place where log-determinants and the Laplace evidence are computed: its value and
gradient (:meth:`Spectrum.logdet`, :meth:`Spectrum.log_evidence`), Newton derivatives for a scalar
prior (:meth:`Spectrum.scalar_prior_derivatives`) and the effective number of parameters of
MacKay's fixed point (:meth:`Spectrum.effective_parameters`).

With ``Lambda = c H + diag(delta_l)`` and ``H`` block-diagonal with Kronecker (or EKFAC)
eigenvalues ``lambda_l,i``, every prior-dependent evidence term is a sum over the spectrum:

``log det Lambda = sum_l [ sum_i log(c lambda_l,i + delta_l) + z_l log delta_l ]``

where the sum over ``i`` runs over the *non-zero* eigenvalues only and ``z_l`` counts the zero
ones (dead ReLU units make up to half of a wide network's spectrum exactly zero). Tuning then
touches ``P_nz`` float64 numbers per evaluation, in cache-sized chunks written into one reused
buffer: no allocation per step, no pass over the data.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["Spectrum"]

# Elements per chunk: 128k float64 = 1 MiB, small enough to stay in cache between the passes.
_CHUNK = 1 << 17


@dataclass
class Spectrum:
    """Non-zero undamped eigenvalues of every block, float64, on the CPU.

    ``eigs [P_nz]`` holds block ``l``'s non-zero eigenvalues at ``eigs[starts[l]:starts[l+1]]``;
    ``n_zero [L]`` counts its zero eigenvalues, ``sizes [L]`` its parameters and ``sq [L]`` the
    squared norm ``||theta*_l||^2`` of its MAP weights.
    """

    eigs: Tensor
    starts: list[int]
    n_zero: Tensor
    sizes: Tensor
    sq: Tensor

    @classmethod
    def from_blocks(cls, eigvals: list[Tensor], sq: Tensor | None = None) -> Spectrum:
        """From each block's undamped eigenvalues (any shape) and ``sq [L]`` (default zeros)."""
        nz, starts, n_zero, sizes = [], [0], [], []
        for v in eigvals:
            v = v.detach().to("cpu", torch.float64).flatten()
            keep = v[v > 0]
            nz.append(keep)
            starts.append(starts[-1] + keep.numel())
            n_zero.append(v.numel() - keep.numel())
            sizes.append(v.numel())
        f64 = {"dtype": torch.float64}
        return cls(
            torch.cat(nz),
            starts,
            torch.tensor(n_zero, **f64),
            torch.tensor(sizes, **f64),
            torch.zeros(len(eigvals), **f64)
            if sq is None
            else sq.detach().to("cpu", torch.float64),
        )

    @property
    def n_blocks(self) -> int:
        return len(self.starts) - 1

    @property
    def n_params(self) -> int:
        return int(self.sizes.sum())

    def sums(self, c: float, deltas: Tensor, powers: tuple[str, ...]) -> dict[str, Tensor]:
        """Per-block sums over the spectrum (zero eigenvalues included analytically), ``[L]`` each.

        ``"log"``: ``sum_i log(c lambda_i + delta_l)``; ``"r"``: ``sum_i 1 / (c lambda_i +
        delta_l)``; ``"r2"``: ``sum_i (c lambda_i + delta_l)^-2``; ``"lr"``: ``sum_i lambda_i /
        (c lambda_i + delta_l)``. ``c`` is a float, ``deltas [L]`` a detached float64 tensor.
        """
        L = self.n_blocks
        out = {k: torch.zeros(L, dtype=torch.float64) for k in powers}
        dl = deltas.tolist()
        buf = torch.empty(min(_CHUNK, max(1, self.eigs.numel())), dtype=torch.float64)
        tmp = torch.empty_like(buf)
        for l in range(L):
            d = dl[l]
            acc = dict.fromkeys(powers, 0.0)
            for s in range(self.starts[l], self.starts[l + 1], _CHUNK):
                e = min(s + _CHUNK, self.starts[l + 1])
                lam = self.eigs[s:e]
                t = torch.mul(lam, c, out=buf[: e - s]).add_(d)  # c lambda + delta
                if "log" in acc:
                    acc["log"] += float(torch.log(t, out=tmp[: e - s]).sum())
                if "lr" in acc:
                    acc["lr"] += float(torch.div(lam, t, out=tmp[: e - s]).sum())
                if "r" in acc or "r2" in acc:
                    r = t.reciprocal_()
                    if "r" in acc:
                        acc["r"] += float(r.sum())
                    if "r2" in acc:
                        acc["r2"] += float(r.dot(r))
            z = float(self.n_zero[l])
            if z:  # zero eigenvalues: their damped value is delta itself
                extra = {
                    "log": math.log(d) if d > 0 else -math.inf,
                    "r": 1 / d if d > 0 else math.inf,
                    "r2": 1 / (d * d) if d > 0 else math.inf,
                    "lr": 0.0,
                }
                for k in powers:
                    out[k][l] = acc[k] + z * extra[k]
            else:
                for k in powers:
                    out[k][l] = acc[k]
        return out

    def logdet(self, c: Tensor | float, deltas: Tensor | float) -> Tensor:
        """``log det(c H + diag(delta_l))`` (float64), differentiable in ``c`` (0-d) and
        ``deltas`` (0-d, shared by all blocks, or ``[L]``)."""
        c = torch.as_tensor(c, dtype=torch.float64)
        deltas = torch.as_tensor(deltas, dtype=torch.float64)
        if deltas.ndim == 0:
            return _LogDet.apply(c, deltas.expand(self.n_blocks), self)
        return _LogDet.apply(c, deltas, self)

    def log_evidence(self, c: Tensor, deltas: Tensor) -> Tensor:
        """The prior-dependent part of the Laplace evidence, differentiable in ``c`` and
        ``deltas [L]``:

        ``- 1/2 sum_l delta_l ||theta*_l||^2 + 1/2 sum_l P_l log delta_l - 1/2 log det Lambda``.
        Adding ``log p(D | theta*)`` gives the evidence.
        """
        return (
            -0.5 * (deltas * self.sq).sum()
            + 0.5 * (self.sizes * torch.log(deltas)).sum()
            - 0.5 * self.logdet(c, deltas)
        )

    def scalar_prior_derivatives(self, c: float, delta: float) -> tuple[float, float]:
        """First and second derivative of :meth:`log_evidence` in one scalar ``delta``.

        With ``r = 1 / (c lambda + delta)``: ``dE/ddelta = -||theta||^2 / 2 + P / (2 delta) -
        sum(r) / 2`` and ``d2E/ddelta2 = -P / (2 delta^2) + sum(r^2) / 2``, both from one pass
        over the spectrum.
        """
        s = self.sums(c, torch.full((self.n_blocks,), delta, dtype=torch.float64), ("r", "r2"))
        P, S = self.n_params, float(self.sq.sum())
        g = -0.5 * S + 0.5 * P / delta - 0.5 * float(s["r"].sum())
        h = -0.5 * P / delta**2 + 0.5 * float(s["r2"].sum())
        return g, h

    def effective_parameters(self, c: float, deltas: Tensor) -> Tensor:
        """MacKay's effective number of parameters per block, ``gamma_l = P_l - delta_l
        tr(Lambda_l^{-1}) = P_l - sum_i delta_l / (c lambda_i + delta_l)``, ``[L]``."""
        return self.sizes - deltas * self.sums(c, deltas, ("r",))["r"]


class _LogDet(torch.autograd.Function):
    """``sum_l sum_i log(c lambda_l,i + delta_l)`` with its gradient from the same pass:
    ``d/d delta_l = sum_i 1 / (c lambda + delta_l)``, ``d/dc = sum_{l,i} lambda / (c lambda +
    delta_l)``."""

    @staticmethod
    def forward(ctx, c: Tensor, deltas: Tensor, spec: Spectrum) -> Tensor:
        need_c, need_d = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        powers = ("log",) + (("r",) if need_d else ()) + (("lr",) if need_c else ())
        s = spec.sums(float(c), deltas.detach(), powers)
        ctx.save_for_backward(
            s["r"] if need_d else torch.zeros(0), s["lr"].sum() if need_c else torch.zeros(0)
        )
        ctx.shapes = (c.shape, deltas.shape)
        return s["log"].sum()

    @staticmethod
    def backward(ctx, grad: Tensor):
        r, lr = ctx.saved_tensors
        gc = (grad * lr).reshape(ctx.shapes[0]) if ctx.needs_input_grad[0] else None
        gd = (grad * r).reshape(ctx.shapes[1]) if ctx.needs_input_grad[1] else None
        return gc, gd, None
