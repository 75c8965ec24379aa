"""Likelihoods: target validation, summed negative log-likelihoods and output-gradient vectors.

For one datum with network output ``f`` the loss Hessian with respect to ``f`` is ``H_f``; the
curvature (GGN) of the summed loss is ``sum_n J_n^T H_f,n J_n``. We write ``H_f = sum_c s_c s_c^T``
with ``s_c`` the *output-gradient vectors*, so that backpropagating each ``s_c`` gives the
per-layer output-gradients ``g`` whose outer products KFAC accumulates:

=================  =========================  ================================  ====================
likelihood          ``H_f``                    exact square root (columns)       MC sample
=================  =========================  ================================  ====================
classification      ``diag(p) - p p^T``        ``diag(sqrt p) - p sqrt(p)^T``    ``p - onehot(y~p)``
regression (s=1)    ``I``                      ``I``                             ``eps ~ N(0, I)``
binary              ``diag(s (1 - s))``        ``diag(sqrt(s (1 - s)))``         ``s - Bernoulli(s)``
=================  =========================  ================================  ====================

with ``p = softmax(f)`` and ``s = sigmoid(f)`` (binary: ``C`` independent labels, soft targets in
``[0, 1]`` allowed; the exact and MC Fisher do not depend on the targets, the empirical one
uses ``s - y``). MC vectors are scaled by ``1 / sqrt(mc_samples)``
so that their outer products average to ``H_f``. The empirical Fisher uses the observed-label
gradient ``d loss / d f``. Regression curvature is stored for ``sigma = 1``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

from ..constants import FISHER_TYPES, LIKELIHOODS

__all__ = [
    "check_likelihood",
    "prepare_targets",
    "nll_sum",
    "output_gradient_vectors",
]


def check_likelihood(likelihood: str) -> str:
    if likelihood not in LIKELIHOODS:
        raise ValueError(f"likelihood must be one of {LIKELIHOODS}, got {likelihood!r}")
    return likelihood


def check_fisher(fisher: str, mc_samples: int) -> None:
    if fisher not in FISHER_TYPES:
        raise ValueError(f"fisher must be one of {FISHER_TYPES}, got {fisher!r}")
    if not isinstance(mc_samples, int) or mc_samples < 1:
        raise ValueError(f"mc_samples must be a positive integer, got {mc_samples!r}")


def _shift(f: Tensor, y: Tensor, positions: Tensor | None):
    """``f[:, :-1]``, ``y[:, 1:]`` and the mask of the targets ``positions[:, 1:]``."""
    if f.ndim < 3 or y.ndim < 2:
        raise ValueError(
            f"shift_labels=True needs outputs [batch, positions, ...] and targets [batch, "
            f"positions, ...], got outputs {tuple(f.shape)} and targets {tuple(y.shape)}"
        )
    return f[:, :-1], y[:, 1:], None if positions is None else positions[:, 1:]


def _observed(f: Tensor, y: Tensor, ignored: Tensor | None, positions: Tensor | None) -> Tensor:
    """Observed targets ``[B, ...]`` (shaped like ``y``): not ``ignored`` and, for outputs
    ``[B, T, C]`` whose position axis has the attention mask's length, not padding."""
    obs = torch.ones(y.shape, dtype=torch.bool, device=y.device) if ignored is None else ~ignored
    if positions is not None and f.ndim == 3 and f.shape[1] == positions.shape[1]:
        pad = positions == 0
        obs = obs & ~(pad if obs.ndim == 2 else pad.unsqueeze(-1))
    return obs


def prepare_targets(
    f: Tensor,
    y: Tensor,
    likelihood: str,
    ignore_index: int = -100,
    shift_labels: bool = False,
    positions: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Validate ``(f, y)`` for the likelihood and return them as rows with their observed weights.

    ``f [B, ..., C]`` (class / output axis last; ``[B]`` is one output), ``y``: classification
    ``[B, ...]`` integer classes, regression and binary (multi-label, soft targets in ``[0, 1]``)
    shaped like ``f`` (or like ``f[..., 0]`` for one output). ``ignore_index`` targets
    (classification, binary) and, for ``[B, T, C]`` outputs, positions where ``positions [B, T]``
    (the attention mask, shifted with the targets) is 0 are not observed. ``shift_labels`` pairs
    ``f[:, :-1]`` with ``y[:, 1:]``.

    Returns ``f [M, C]`` (``f`` itself when it is ``[B, C]``), ``y`` ``[M]`` long class indices
    (ignored ones set to 0) or ``[M, C]`` floats, and ``keep``: ``None`` when every target is
    observed, else 0/1 weights ``[M, 1]`` (classification, regression) or ``[M, C]`` (binary).
    """
    if not isinstance(y, Tensor):
        raise TypeError(f"targets must be a torch.Tensor, got {type(y).__name__}")
    B = f.shape[0]
    if y.shape[:1] != (B,):
        raise ValueError(
            f"targets have batch size {tuple(y.shape)[:1]} but the model output has {B}; "
            "each batch must be (inputs, targets) with matching first dimensions"
        )
    if shift_labels:
        f, y, positions = _shift(f, y, positions)
    if likelihood == "classification":
        if f.ndim < 2:
            raise ValueError(
                "classification expects model outputs of shape [batch, ..., classes], got "
                f"{tuple(f.shape)}"
            )
        if y.dtype.is_floating_point or y.dtype == torch.bool or y.shape != f.shape[:-1]:
            raise ValueError(
                f"classification targets must be integer class indices shaped like the outputs "
                f"without their class axis, {tuple(f.shape[:-1])}; got dtype {y.dtype} and shape "
                f"{tuple(y.shape)} (one-hot targets: use y.argmax(-1))"
            )
        C = f.shape[-1]
        obs = _observed(f, y, y == ignore_index, positions)
        seen = y[obs]
        if seen.numel() and (int(seen.min()) < 0 or int(seen.max()) >= C):
            raise ValueError(
                f"classification targets must lie in [0, {C - 1}] for a model with {C} outputs, "
                f"got values in [{int(seen.min())}, {int(seen.max())}] (ignore_index="
                f"{ignore_index} marks positions without a target)"
            )
        rows = f if f.ndim == 2 else f.reshape(-1, C)
        yy = torch.where(obs, y, torch.zeros_like(y)).reshape(-1).long()
        keep = None if bool(obs.all()) else obs.reshape(-1, 1).to(f.dtype)
        return rows, yy, keep
    f1 = f.unsqueeze(-1) if f.ndim == 1 else f
    yy = y.unsqueeze(-1) if y.shape == f1.shape[:-1] and f1.shape[-1] == 1 else y
    if yy.shape != f1.shape:
        hint = (
            "; for one class per datum out of several use likelihood='classification'"
            if likelihood == "binary"
            else ""
        )
        raise ValueError(
            f"{likelihood} targets of shape {tuple(y.shape)} do not fit model outputs of shape "
            f"{tuple(f.shape)}; they must have the same shape (or [batch] for one output){hint}"
        )
    C = f1.shape[-1]
    if likelihood == "regression":  # every real value is a target: no ignore_index
        obs = _observed(f1, yy[..., 0], None, positions).unsqueeze(-1)
    else:
        obs = _observed(f1, yy, yy == ignore_index, positions)
        seen = yy[obs]
        if seen.numel() and not torch.all((seen >= 0) & (seen <= 1)):
            raise ValueError(
                "binary targets must be 0 or 1, or probabilities in [0, 1] (soft labels); "
                f"ignore_index={ignore_index} marks entries without a target"
            )
    rows = f1 if f1.ndim == 2 and f1 is f else f1.reshape(-1, C)
    yy = torch.where(obs, yy, torch.zeros_like(yy)) if not bool(obs.all()) else yy
    keep = None if bool(obs.all()) else obs.reshape(-1, obs.shape[-1]).to(f.dtype)
    return rows, yy.reshape(-1, C).to(f.dtype), keep


def nll_sum(f: Tensor, y: Tensor, likelihood: str, keep: Tensor | None = None):
    """Summed negative log-likelihood and summed squared residuals (regression, ``sigma = 1``) of
    the observed targets (``keep``: weights of :func:`prepare_targets`, ``None``: all).

    Returns ``(nll, sse)``; ``sse`` is zero for classification.
    """
    zero = f.new_zeros(())
    if keep is None:
        if likelihood == "classification":
            return F.cross_entropy(f, y, reduction="sum"), zero
        if likelihood == "binary":
            return F.binary_cross_entropy_with_logits(f, y, reduction="sum"), zero
        sse = ((f - y) ** 2).sum()
        return 0.5 * sse + 0.5 * f.numel() * math.log(2 * math.pi), sse
    if likelihood == "classification":
        return (F.cross_entropy(f, y, reduction="none") * keep[:, 0]).sum(), zero
    if likelihood == "binary":
        return (F.binary_cross_entropy_with_logits(f, y, reduction="none") * keep).sum(), zero
    sse = ((f - y) ** 2 * keep).sum()
    n = keep.sum() * f.shape[1]
    return 0.5 * sse + 0.5 * n * math.log(2 * math.pi), sse


def loss_hessian_sum(f: Tensor, likelihood: str) -> Tensor:
    """``sum_n H_n`` ``[C, C]``, the summed Hessian of the loss w.r.t. the outputs ``f [B, C]``
    (``= sum_k s_k s_k^T`` over the exact Fisher's vectors): ``diag(sum_n p_n) - P^T P`` for
    softmax cross-entropy, ``B I`` for the Gaussian (``sigma = 1``), ``O(B C^2)``."""
    if likelihood == "classification":
        p = torch.softmax(f, dim=-1)
        return torch.diag(p.sum(0)).addmm_(p.T, p, alpha=-1.0)
    if likelihood == "regression":
        return f.shape[0] * torch.eye(f.shape[1], dtype=f.dtype, device=f.device)
    raise ValueError(f"no closed-form loss Hessian for likelihood {likelihood!r}")


def loss_hessian_diag_in_basis(f: Tensor, likelihood: str, Q: Tensor) -> Tensor:
    """``diag(Q^T H_n Q)`` per datum ``[B, C]`` for an orthonormal ``Q [C, C]`` (``= sum_k
    (Q^T s_nk)^2`` over the exact Fisher's vectors)."""
    if likelihood == "classification":
        p = torch.softmax(f, dim=-1)
        # A sum of squares: clamp the round-off of the difference (directions with H q = 0).
        return (p @ Q.square() - (p @ Q).square()).clamp_min_(0)
    if likelihood == "regression":
        return f.new_ones(f.shape)  # H = I and Q is orthonormal
    raise ValueError(f"no closed-form loss Hessian for likelihood {likelihood!r}")


# Output-gradient vectors of the exact classification Fisher are drawn in chunks of this size.
VECTOR_CHUNK_ELEMENTS = 1 << 22


def softmax_hessian_sqrt_columns(p: Tensor, k0: int, k1: int) -> Tensor:
    """Columns ``k0..k1-1`` of ``S_b = diag(sqrt p_b) - p_b sqrt(p_b)^T`` (``S_b S_b^T`` is the
    softmax cross-entropy Hessian ``diag(p_b) - p_b p_b^T``) as vectors ``[k1 - k0, B, C]``:
    vector ``k`` is ``sqrt(p_bk) (e_k - p_b)``."""
    B, C = p.shape
    sq = p[:, k0:k1].sqrt().T.unsqueeze(2)  # [K, B, 1]
    out = -p.unsqueeze(0) * sq  # [K, B, C]
    idx = torch.arange(k0, k1, device=p.device)
    out[torch.arange(k1 - k0, device=p.device), :, idx] += sq[..., 0]
    return out


def iter_output_gradient_vectors(
    f: Tensor, y: Tensor, likelihood: str, fisher: str, *args, max_elements: int | None = None
) -> Iterator[Tensor]:
    """:func:`output_gradient_vectors` in chunks ``[K_c, B, C]`` of at most about ``max_elements``
    numbers (the exact classification Fisher has ``K = C`` vectors: ``B C^2`` numbers at once
    otherwise); a single chunk for every other case, so random streams are unchanged. ``args``:
    ``mc_samples, generator`` as for :func:`output_gradient_vectors`."""
    if fisher != "exact" or likelihood != "classification":
        yield output_gradient_vectors(f, y, likelihood, fisher, *args)
        return
    p = torch.softmax(f.detach(), dim=-1)
    B, C = p.shape
    step = max(1, (max_elements or VECTOR_CHUNK_ELEMENTS) // max(1, B * C))
    for k0 in range(0, C, step):
        yield softmax_hessian_sqrt_columns(p, k0, min(C, k0 + step))


def output_gradient_vectors(
    f: Tensor,
    y: Tensor,
    likelihood: str,
    fisher: str,
    mc_samples: int = 1,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Output-gradient vectors ``[K, B, C]`` with ``sum_k s_k s_k^T`` = loss Hessian (in expectation).

    ``K`` is ``C`` for the exact Fisher (columns of the Hessian square root), ``mc_samples`` for
    the MC Fisher and 1 for the empirical Fisher. ``f`` is detached.
    """
    f = f.detach()
    B, C = f.shape
    if fisher == "exact":
        if likelihood == "classification":
            return softmax_hessian_sqrt_columns(torch.softmax(f, dim=-1), 0, C)
        if likelihood == "regression":
            eye = torch.eye(C, dtype=f.dtype, device=f.device)
            return eye.unsqueeze(1).expand(C, B, C).clone()
        s = torch.sigmoid(f)  # H = diag(s (1 - s)): vector k is e_k sqrt(s_k (1 - s_k))
        return torch.diag_embed((s * (1 - s)).sqrt()).permute(1, 0, 2)
    if fisher == "empirical":
        if likelihood == "classification":
            return (torch.softmax(f, -1) - F.one_hot(y, C).to(f.dtype)).unsqueeze(0)
        if likelihood == "regression":
            return (f - y).unsqueeze(0)
        return (torch.sigmoid(f) - y).unsqueeze(0)
    # Monte-Carlo: sample labels from the model's predictive, on CPU for a device-independent stream.
    gen_device = generator.device if generator is not None else torch.device("cpu")
    fg = f.to(gen_device)
    scale = 1.0 / math.sqrt(mc_samples)
    if likelihood == "classification":
        p = torch.softmax(fg, dim=-1)
        # Inverse-CDF draws: u ~ U[0, total) falls in class c's interval [cdf_{c-1}, cdf_c) with
        # probability p_c (empty for p_c = 0); 30x faster than torch.multinomial at C = 512.
        cdf = p.cumsum(dim=-1)
        u = torch.rand(B, mc_samples, generator=generator, dtype=p.dtype) * cdf[:, -1:]
        idx = torch.searchsorted(cdf, u, right=True).clamp_max_(C - 1)  # [B, K]
        onehot = F.one_hot(idx.T, C).to(f.dtype)  # [K, B, C]
        out = (p.unsqueeze(0) - onehot) * scale
    elif likelihood == "regression":
        out = torch.randn(mc_samples, B, C, generator=generator, dtype=f.dtype) * scale
    else:
        s = torch.sigmoid(fg)
        draws = torch.bernoulli(
            s.unsqueeze(0).expand(mc_samples, B, C).contiguous(), generator=generator
        )
        out = (s.unsqueeze(0) - draws) * scale
    return out.to(f.device)
