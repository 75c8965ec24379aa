r"""Links: from a Gaussian over the logits to class probabilities.

For classification, with ``mu = f(x; theta*)`` and ``S = J Sigma J^T`` (the GLM predictive):

* ``probit``: ``softmax(mu_k / sqrt(1 + pi/8 S_kk))`` (extended probit; binary: sigmoid probit);
* ``centered_probit``: the probit of the projection ``P f``, ``P = I - 1 1^T / C``: softmax is
  shift invariant, so ``E[softmax(f)] = E[softmax(P f)]`` exactly, but the probit approximation
  is not; projecting first removes the shared-shift variance it would otherwise count;
* ``mc``: ``mean_s softmax(f_s)``, ``f_s ~ N(mu, S)``;
* ``bridge`` / ``bridge_norm``: Laplace bridge (Hobbhahn et al., 2022), laplace-torch's
  ``bridge`` / ``bridge_norm``. The logit Gaussian is first conditioned on ``sum_k f_k = 0``
  (softmax is shift invariant): ``mu <- mu - S 1 (1^T mu) / (1^T S 1)``, ``S <- S - S 1 1^T S /
  (1^T S 1)``; ``bridge_norm`` then rescales so that the mean variance is ``sqrt(K/2)``:
  ``r = mean_k S_kk / sqrt(K/2)``, ``mu <- mu / sqrt(r)``, ``s_k = S_kk / r``; then
  ``alpha_k = (1 - 2/K + exp(mu_k) / K^2 sum_l exp(-mu_l)) / s_k`` and the prediction is the
  Dirichlet mean ``alpha / sum_k alpha_k`` (computed in log space).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "bridge_from_moments",
    "centered_probit",
    "factor_samples",
    "gaussian_samples",
    "laplace_bridge",
    "probit",
]


def probit(mean: Tensor, var: Tensor, binary: bool = False) -> Tensor:
    """Extended probit approximation ``softmax(mean / sqrt(1 + pi/8 var))`` over the last axis
    (``binary``: ``sigmoid``) for ``mean, var [..., C]``."""
    kappa = torch.rsqrt(1 + math.pi / 8 * var)
    return torch.sigmoid(kappa * mean) if binary else torch.softmax(kappa * mean, dim=-1)


def centered_probit(mean: Tensor, cov: Tensor) -> Tensor:
    """Extended probit on the logit Gaussian projected onto the sum-zero subspace.

    ``softmax`` is invariant to a shift shared by all logits, so ``E[softmax(f)]`` is the same for
    ``f ~ N(mean, cov)`` and for its projection ``P f`` with ``P = I - 1 1^T / C``. The probit
    approximation is not shift invariant; applying it to ``N(P mean, P cov P)`` discards the
    shared-shift variance that cannot change the prediction (it is invariant to
    ``cov + a 1 1^T``). ``mean [..., C]``, ``cov [..., C, C]`` -> probabilities ``[..., C]``.
    """
    C = mean.shape[-1]
    row = cov.sum(-1)  # cov 1
    total = row.sum(-1, keepdim=True)  # 1^T cov 1
    var = cov.diagonal(dim1=-2, dim2=-1) - 2 * row / C + total / C**2
    return probit(mean - mean.mean(-1, keepdim=True), var.clamp_min(0))


def laplace_bridge(mean: Tensor, cov: Tensor, normalize: bool = True) -> Tensor:
    """Laplace-bridge predictive (Dirichlet mean) for logits ``N(mean [B, K], cov [B, K, K])``.

    The Gaussian is conditioned on ``sum_k f_k = 0`` and (``normalize``) rescaled so that its
    mean variance is ``sqrt(K / 2)`` before ``alpha_k = (1 - 2/K + e^{mu_k} sum_l e^{-mu_l} / K^2)
    / s_k``; returns ``alpha / sum(alpha)`` ``[B, K]`` (see :func:`bridge_from_moments`).
    """
    row = cov.sum(-1)  # S 1, [B, K]
    return bridge_from_moments(
        mean, cov.diagonal(dim1=-2, dim2=-1), row, row.sum(-1, keepdim=True), normalize
    )


def bridge_from_moments(
    mean: Tensor, var: Tensor, cov_sum: Tensor, var_sum: Tensor, normalize: bool
) -> Tensor:
    """The Laplace bridge from ``mean, var = S_kk, cov_sum = (S 1)_k`` ``[..., K]`` and
    ``var_sum = 1^T S 1`` (``[..., 1]`` or broadcastable): all it needs of ``S``, so the GLM
    predictive never forms ``S`` for it (``O(K)`` per input).

    ``normalize=False`` is laplace-torch's ``bridge``, ``True`` its ``bridge_norm``; evaluated in
    log space (``logsumexp``), where the direct ``exp(mu)`` overflows once the logits span more
    than ~88 (float32) after the normalisation's rescaling ``mu / sqrt(r)``.
    """
    K = mean.shape[-1]
    if K < 2:
        raise ValueError("the Laplace bridge needs at least 2 classes; use link='probit'")
    tot = var_sum
    ok = tot > 0
    safe = torch.where(ok, tot, torch.ones_like(tot))
    mu = torch.where(ok, mean - cov_sum * mean.sum(-1, keepdim=True) / safe, mean)
    var = torch.where(ok, var - cov_sum.square() / safe, var)
    tiny = torch.finfo(var.dtype).tiny
    var = var.clamp_min(tiny)
    if normalize:
        r = (var.mean(-1, keepdim=True) / math.sqrt(K / 2)).clamp_min(tiny)
        mu = mu / r.sqrt()
        var = var / r
    lse = torch.logsumexp(-mu, dim=-1, keepdim=True)
    base = math.log(1 - 2 / K) if K > 2 else -math.inf
    log_alpha = torch.logaddexp(torch.full_like(mu, base), mu + lse - 2 * math.log(K))
    return torch.softmax(log_alpha - var.log(), dim=-1)


def gaussian_samples(
    mean: Tensor, cov: Tensor, n: int, generator: torch.Generator | None
) -> Tensor:
    """``n`` samples of ``N(mean [B, C], cov [B, C, C])`` (PSD square root by eigh): ``[n, B, C]``."""
    evals, evecs = torch.linalg.eigh(cov)
    root = evecs * evals.clamp_min(0).sqrt().unsqueeze(-2)
    z = torch.randn(n, *mean.shape, generator=generator, dtype=mean.dtype).to(mean.device)
    return mean + torch.einsum("bij,nbj->nbi", root, z)


def factor_samples(mean: Tensor, root: Tensor, n: int, generator: torch.Generator | None) -> Tensor:
    """``n`` samples of ``N(mean [B, C], R R^T)`` from a factor ``root [B, C, r]``: ``mean + R z``,
    ``z ~ N(0, I_r)``, ``[n, B, C]`` (no ``eigh``: ``O(n C r)`` per input)."""
    z = torch.randn(n, *mean.shape[:-1], root.shape[-1], generator=generator, dtype=mean.dtype)
    return mean + torch.einsum("bcr,nbr->nbc", root, z.to(mean.device))
