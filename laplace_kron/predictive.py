r"""Predictive distributions of a :class:`~laplace_kron.posterior.KronPosterior`.

**GLM (linearized) predictive**: ``f(x) ~ N(f(x; theta*), J(x) Sigma J(x)^T)``, its moments
computed Jacobian-free in the Kronecker eigenbasis by :mod:`laplace_kron.glm`.

**Links** from the logit Gaussian to probabilities are in :mod:`laplace_kron.links`.

**Sampling predictives** at posterior parameter samples (``glm_mc``, ``nn``) are in
:mod:`laplace_kron.sampling`; :func:`predict` and :func:`predictive_samples` dispatch to them.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from .constants import DEFAULT_CHUNK, LINKS
from .constants import PREDICTIVE_METHODS as METHODS
from .curvature.batches import (
    BatchSizeFn,
    Inputs,
)
from .glm import functional_covariance as _marginal_covariance
from .glm import (
    functional_variance,
    glm_moments,
    glm_outputs,
    glm_reduce,
)
from .glm_joint import functional_samples, joint_covariance
from .links import bridge_from_moments, centered_probit, factor_samples, laplace_bridge, probit
from .posterior import KronPosterior
from .sampling import parameter_sample_outputs
from .validation import positive_int

__all__ = [
    "METHODS",
    "LINKS",
    "centered_probit",
    "laplace_bridge",
    "probit",
    "functional_covariance",
    "functional_samples",
    "functional_variance",
    "glm_moments",
    "predict",
    "predictive_samples",
]


def functional_covariance(la: KronPosterior, x: Inputs, joint: bool = False, **kw) -> Tensor:
    """GLM output covariance ``J(x) Sigma J(x)^T``, Jacobian-free in the Kronecker eigenbasis:
    per input ``[B, C, C]``, or with ``joint=True`` across all inputs ``[B C, B C]``
    (input-major: row ``b C + k``; :func:`~laplace_kron.glm_joint.joint_covariance`). Keywords:
    ``chunk_size``, ``batch_size``, ``batch_size_fn``, ``vectorize``."""
    if joint:
        return joint_covariance(la, x, **kw)[1]
    return _marginal_covariance(la, x, **kw)


def _validate(method: str, link: str, n_samples: int, chunk_size: int) -> None:
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if link not in LINKS:
        raise ValueError(f"link must be one of {LINKS}, got {link!r}")
    positive_int("n_samples", n_samples)
    positive_int("chunk_size", chunk_size)


# --------------------------------------------------------------------------------------------------
# Sampling predictives
# --------------------------------------------------------------------------------------------------


def predictive_samples(
    la: KronPosterior,
    x: Inputs,
    method: str = "glm",
    n_samples: int = 100,
    generator: torch.Generator | None = None,
    chunk_size: int = DEFAULT_CHUNK,
    batch_size_fn: BatchSizeFn | None = None,
    vectorize: bool = True,
) -> Tensor:
    """Output samples ``[n_samples, B, C]`` (logits / regression means, before the link).

    ``glm``: from ``N(f(x; theta*), J Sigma J^T)``; ``glm_mc``: ``f(x; theta*) + J(x) (theta_s -
    theta*)`` by forward-mode JVP; ``nn``: ``f(x; theta_s)`` by functional call.
    """
    _validate(method, "probit", n_samples, chunk_size)
    return _samples(la, x, method, n_samples, generator, chunk_size, batch_size_fn, vectorize)[0]


def _samples(
    la: KronPosterior, x: Inputs, method: str, n_samples: int, generator, chunk_size: int, *rest
) -> tuple[Tensor, torch.Size]:
    """:func:`predictive_samples` plus the model output shape ``[B, ...]`` (``rest``:
    ``batch_size_fn, vectorize``)."""
    if method == "glm":  # per input chunk, from a factor of its covariance

        def draw(f: Tensor, R: Tensor, _: int) -> Tensor:
            return factor_samples(f, R, n_samples, generator).transpose(0, 1)

        _, s, shape = glm_reduce(la, x, "root", draw, chunk_size, None, *rest, extra=n_samples)
        return s.transpose(0, 1), shape
    return parameter_sample_outputs(la, x, method, n_samples, generator, chunk_size, *rest)


# --------------------------------------------------------------------------------------------------
# predict
# --------------------------------------------------------------------------------------------------


def predict(
    la: KronPosterior,
    x: Inputs,
    method: str = "glm",
    link: str = "probit",
    n_samples: int = 100,
    generator: torch.Generator | None = None,
    batch_size_fn: BatchSizeFn | None = None,
    chunk_size: int = DEFAULT_CHUNK,
    batch_size: int | None = None,
    vectorize: bool = True,
):
    """Posterior predictive of ``la`` at inputs ``x``.

    Args:
        x: a tensor ``[B, ...]`` or a mapping of tensors (a Hugging Face batch; its targets under
            the posterior's ``target_key`` are dropped), passed to the model as in
            :func:`~laplace_kron.curvature.batches.model_arguments`.
        method: ``"glm"`` (linearized, closed-form covariance), ``"glm_mc"`` (linearized model at
            posterior samples, forward-mode JVPs) or ``"nn"`` (network at posterior samples).
        link: for ``glm`` classification: ``"probit"``, ``"centered_probit"`` (probit after
            removing the logit variance shared by all classes, which softmax ignores),
            ``"mc"`` (``n_samples`` logit samples), ``"bridge"`` (unnormalised Laplace bridge)
            or ``"bridge_norm"`` (normalised; the bridges are not for binary), as laplace-torch
            names them. Ignored by the sampling methods.
        n_samples: samples for ``link="mc"``, ``glm_mc`` and ``nn``.
        generator: random generator for all sampling.
        batch_size_fn: number of data points of a mapping batch (default: the common leading size).
        chunk_size: element budget of the largest intermediate tile; ``batch_size``: input chunk.
        vectorize: use ``torch.func.vmap``: one batched backward pass for all outputs (``glm``),
            chunks of samples per call (``glm_mc`` / ``nn``); falls back to loops, with a warning,
            for models vmap cannot trace.

    Returns:
        classification: probabilities ``[B, ..., C]`` (one distribution per position of a
        ``[B, T, C]`` output, from that position's ``C x C`` covariance block); binary:
        ``P(y=1)`` ``[B]`` for one logit per datum, else in the output shape (multi-label);
        regression: ``(mean, var)`` in the output shape with ``var = functional variance +
        sigma_noise^2``. Outputs are per datum: a model that flattens ``[B, T, C]`` to
        ``[B*T, C]`` gets ``[B, T, C]``. No link forms a ``C x C`` covariance: ``probit``,
        ``centered_probit`` and the bridges use ``O(C)`` moments per position, ``mc`` a factor
        of it (:mod:`laplace_kron.glm_blocks`); memory is bounded by ``chunk_size`` (the formula
        is in :class:`~laplace_kron.glm.GLMPass`). Warns when the predictive is nearly uniform
        while the MAP is confident (the prior precision is too small).
    """
    _validate(method, link, n_samples, chunk_size)
    la.require_fit()
    lik = la.likelihood
    if lik == "binary" and link.startswith("bridge") and method == "glm":
        raise ValueError(f"link={link!r} needs several classes; for binary use 'probit' or 'mc'")
    if method == "glm":
        rest = (chunk_size, batch_size, batch_size_fn, vectorize)
        if lik == "regression":
            mu, S, shape = glm_outputs(la, x, True, *rest)
            var = S + la.sigma_noise.to(S.dtype) ** 2
            return mu.reshape(shape), var.reshape(shape)
        if lik == "binary":  # independent labels: the diagonal is all that matters
            mu, S, shape = glm_outputs(la, x, True, *rest)
            mu, var = mu.reshape(-1), S.reshape(-1)
            if link in ("probit", "centered_probit"):  # one logit: nothing to centre
                return _binary_shape(probit(mu, var, binary=True), shape)
            z = torch.randn(n_samples, *mu.shape, generator=generator, dtype=mu.dtype)
            return _binary_shape(torch.sigmoid(mu + var.sqrt() * z.to(mu.device)).mean(0), shape)
        kind = _LINK_KINDS[link]
        mu, p, shape = glm_reduce(
            la, x, kind, _link_reducer(link, n_samples, generator), *rest, extra=n_samples
        )
        p = p.reshape(shape)
        warn_if_uniform(la, p, mu.reshape(shape))
        return p
    samples, shape = _samples(
        la, x, method, n_samples, generator, chunk_size, batch_size_fn, vectorize
    )
    if lik == "classification":
        per_position = samples.reshape(samples.shape[0], -1, shape[-1])
        return torch.softmax(per_position, -1).mean(0).reshape(shape)
    if lik == "binary":
        return _binary_shape(torch.sigmoid(samples).mean(0), shape)
    mean = samples.mean(0)
    var = samples.var(0, correction=0) + la.sigma_noise.to(samples.dtype) ** 2
    return mean.reshape(shape), var.reshape(shape)


# What each classification link needs of the logit covariance of an input (glm_blocks.KINDS).
_LINK_KINDS = {
    "probit": "var",
    "centered_probit": "centered",
    "bridge": "bridge",
    "bridge_norm": "bridge",
    "mc": "root",
}


def _link_reducer(link: str, n_samples: int, generator):
    """``(mu [b, R C], moments, C) -> probabilities [b, R C]`` for one chunk of inputs (``R``
    positions of ``C`` classes, each position its own softmax)."""

    def reduce(mu: Tensor, m: Tensor, C: int) -> Tensor:
        b, RC = mu.shape
        if link == "mc":  # m: a factor [b, R C, r] of the covariance
            f = factor_samples(mu, m, n_samples, generator)
            p = torch.softmax(f.reshape(n_samples, -1, C), -1).mean(0)
        else:
            mu_p, m = mu.reshape(-1, C), m.reshape(-1, C, m.shape[-1])
            if link == "probit":
                p = probit(mu_p, m[..., 0])
            elif link == "centered_probit":  # m: variances of the projected logits P f
                p = probit(mu_p - mu_p.mean(-1, keepdim=True), m[..., 0].clamp_min(0))
            else:
                norm = link == "bridge_norm"
                p = bridge_from_moments(mu_p, m[..., 0], m[..., 1], m[..., :1, 2], norm)
        return p.reshape(b, RC)

    return reduce


def warn_if_uniform(la: KronPosterior, p: Tensor, logits: Tensor) -> None:
    """Warn (once) when the predictive ``p [..., C]`` is near uniform on average while the MAP
    ``softmax(logits)`` is confident: the posterior variance swamps the logits."""
    C = p.shape[-1]
    if C < 2 or p.numel() == 0:
        return
    u = 1 / C

    def lift(q: Tensor) -> float:  # mean top probability, 0 = uniform, 1 = certain
        return float((q.max(-1).values.mean() - u) / (1 - u))

    pred, map_ = lift(p), lift(torch.softmax(logits.to(p.dtype), -1))
    if pred < 0.05 and map_ > 0.5:
        prec = la.prior_precision.detach().flatten()
        shown = f"{prec.item():.3g}" if prec.numel() == 1 else f"{prec.min():.3g}-{prec.max():.3g}"
        warnings.warn(
            f"the predictive is nearly uniform (mean top probability {pred * (1 - u) + u:.3g} for "
            f"{C} classes) while the MAP is confident ({map_ * (1 - u) + u:.3g}): the posterior "
            f"variance swamps the logits at prior precision {shown}. Try tuning the prior on "
            "validation data (optimize_prior_precision(method='gridsearch', val_loader=...)), a "
            "larger prior precision, or last-layer Laplace (modules='last_layer')",
            stacklevel=3,
        )


def _binary_shape(p: Tensor, shape: torch.Size) -> Tensor:
    """``P(y = 1)`` as ``[B]`` for one logit per datum (as before), else in the output shape."""
    return p.reshape(shape[0]) if shape[1:].numel() == 1 else p.reshape(shape)


def _per_position(mu: Tensor, S: Tensor, C: int) -> tuple[Tensor, Tensor]:
    """Per-datum logits ``[B, R C]`` (``R`` positions of ``C`` classes) and their covariance
    (diagonal ``[B, R C]`` or full ``[B, R C, R C]``) as ``R B`` independent positions: ``[B R,
    C]`` and ``[B R, C]`` / the ``C x C`` diagonal blocks ``[B R, C, C]`` (the softmax of a
    position sees only its own block)."""
    B, RC = mu.shape
    R = RC // C
    if S.ndim == 2:
        return mu.reshape(B * R, C), S.reshape(B * R, C)
    blocks = S.reshape(B, R, C, R, C).diagonal(dim1=1, dim2=3)  # [B, C, C, R]
    return mu.reshape(B * R, C), blocks.permute(0, 3, 1, 2).reshape(B * R, C, C)
