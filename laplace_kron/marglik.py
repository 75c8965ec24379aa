"""The Laplace evidence of a fitted :class:`~laplace_kron.posterior.KronPosterior`, and tuning of its
prior precision (and regression noise) by it.

    log p(D | h) ~= log p(D | theta*) - 1/2 sum_l delta_l ||theta*_l||^2 + 1/2 sum_l P_l log delta_l
                    - 1/2 log det Lambda

Everything after the first term comes from the posterior's compressed spectrum
(:mod:`laplace_kron.spectrum`, where value, gradient and Newton derivatives live); no function here
passes over the training data. Three tuning methods:

* ``"marglik"``: maximise the evidence over ``log delta`` (and ``log sigma``). ``optimizer``:
  ``"newton"`` (analytic Newton steps; one scalar ``delta`` without noise tuning, a few passes over
  the spectrum), ``"lbfgs"`` (strong-Wolfe line search) or ``"adam"`` (``lr``); the default
  (``None``) is Newton where it applies and L-BFGS otherwise. ``tol`` bounds the gradient of the
  evidence per datum.
* ``"mackay"``: the evidence fixed point ``delta_l = gamma_l / ||theta*_l||^2`` with the effective
  number of parameters ``gamma_l = P_l - delta_l tr(Sigma_l)`` (MacKay 1992); for regression the
  noise update ``sigma^2 = sse / (T (N D - gamma))``. Both are the exact stationarity conditions
  of the Laplace evidence at fixed ``theta*``. Iterated until the relative change is ``< tol``.
* ``"gridsearch"``: the validation NLL of the predictive over a log grid (scalar prior only).

``granularity``: one prior precision (``"scalar"``), one per block (``"layer"``) or one per
parameter (``"diag"``, tuned by ``"marglik"`` with L-BFGS / Adam or by ``"mackay"``, whose
per-parameter step never lowers the evidence; Kronecker blocks take it approximately, see
:mod:`laplace_kron.diagprior`).
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Iterable, Sequence

import torch
from torch import Tensor

from . import metrics
from .constants import PRIOR_GRANULARITIES, TUNING_METHODS, TUNING_OPTIMIZERS
from .diagprior import DiagPrior, is_per_parameter, param_deltas
from .output_noise import gaussian_log_likelihood, mackay_noise, noise_weights, per_output_logdet
from .posterior import KronPosterior
from .predictive import predict
from .validation import positive, positive_int

__all__ = [
    "log_likelihood",
    "log_marginal_likelihood",
    "optimize_prior_precision",
    "validation_nll",
]


def log_likelihood(post: KronPosterior, sigma_noise: Tensor | None = None) -> Tensor:
    """``log p(D | theta*)`` tempered by ``T`` (as laplace-torch): ``-NLL / T`` for
    classification; ``-sse / (2 sigma^2 T) - N D log(sigma sqrt(2 pi))`` for regression."""
    curv = post.require_fit()
    if post.likelihood != "regression":
        return torch.tensor(-curv.loss / post.temperature, dtype=torch.float64)
    sigma = post.sigma_noise if sigma_noise is None else sigma_noise
    if post.output_factors is not None:  # per-output noise: sum over outputs
        return gaussian_log_likelihood(post.output_factors, sigma, post.temperature)
    nd = curv.observed_targets
    return -0.5 * curv.sse / (sigma**2 * post.temperature) - nd * torch.log(
        sigma * math.sqrt(2 * math.pi)
    )


def _as_positive(name: str, value) -> Tensor | None:
    """``None``, or ``value`` as a float64 tensor (autograd kept) after checking it is positive."""
    if value is None:
        return None
    t = value if isinstance(value, Tensor) else torch.as_tensor(value, dtype=torch.float64)
    positive(name, t.detach())
    return t


def log_marginal_likelihood(post: KronPosterior, prior_precision=None, sigma_noise=None) -> Tensor:
    """Laplace evidence (float64), differentiable in ``prior_precision`` and ``sigma_noise``
    (default: the posterior's own). Only eigenvalues are touched: no pass over the data."""
    d = _as_positive("prior_precision", prior_precision)
    sigma = _as_positive("sigma_noise", sigma_noise)
    full = post.prior_precision if d is None else d
    if is_per_parameter(full, post.require_fit()):
        _refuse_per_output(post)
        c = post.precision_scale(sigma).to(torch.float64)
        prior = DiagPrior.of(post.curvature).log_evidence(c, full.to(torch.float64), _sq(post))
        return log_likelihood(post, sigma) + prior
    deltas = post.block_deltas(d).to(torch.float64)
    if post.output_factors is not None:
        return log_likelihood(post, sigma) + _per_output_evidence(post, deltas, sigma)
    c = post.precision_scale(sigma).to(torch.float64)
    return log_likelihood(post, sigma) + post.spectrum().log_evidence(c, deltas)


def _per_output_evidence(post: KronPosterior, deltas: Tensor, sigma: Tensor | None) -> Tensor:
    """:meth:`Spectrum.log_evidence` with per-output noise: ``log det(H(w) / T + delta)`` of
    :func:`~laplace_kron.output_noise.per_output_logdet` (differentiable in ``w = sigma^-2``)."""
    factors, spec = post.output_factors, post.spectrum()
    sigma = post.sigma_noise if sigma is None else sigma
    w = noise_weights(sigma).expand(factors.n_outputs)
    logdet = per_output_logdet(factors, w, deltas, 1.0 / post.temperature)
    return -0.5 * (deltas * spec.sq).sum() + 0.5 * (spec.sizes * deltas.log()).sum() - 0.5 * logdet


def _sq(post: KronPosterior) -> Tensor:
    """``(theta* - mu_0)^2`` per parameter, ``[P]`` float64."""
    d = post.mean if post.prior_mean is None else post.mean - post.prior_mean
    return d.to(torch.float64).square().cpu()


def _refuse_per_output(post: KronPosterior) -> None:
    if post.output_factors is not None:
        raise ValueError(
            "a per-parameter prior (granularity='diag') is not supported with per-output noise "
            "(a tensor sigma_noise): use a scalar or per-layer prior, or a scalar sigma_noise"
        )


def _initial(post: KronPosterior, granularity: str) -> Tensor:
    d = post.prior_precision
    if granularity == "scalar":
        return d.mean().reshape(()) if d.ndim else d.clone()
    if granularity == "diag":
        return param_deltas(d, post.require_fit()).clone()
    if is_per_parameter(d, post.require_fit()):  # per parameter -> per block: the block means
        return torch.stack([d[post.curvature.block_index(b)].mean() for b in post.curvature.blocks])
    return d.clone() if d.ndim else d.repeat(post.n_blocks)


def optimize_prior_precision(
    post: KronPosterior,
    method: str = "marglik",
    granularity: str = "scalar",
    n_steps: int = 100,
    lr: float = 0.1,
    tune_sigma_noise: bool = False,
    val_loader: Iterable | None = None,
    grid: Sequence[float] | Tensor | None = None,
    tol: float = 1e-6,
    optimizer: str | None = None,
    predict_kwargs: dict | None = None,
) -> dict:
    """Set ``post.prior_precision`` (and ``post.sigma_noise``) to the tuned values.

    ``predict_kwargs`` are passed to the predictive by grid search (e.g. ``{"link": "mc"}``).

    Returns ``{"method", "optimizer", "iterations", "converged", "log_marglik",
    "prior_precision", "sigma_noise", "seconds"}`` (plus ``"val_nll"`` per grid point for grid
    search).
    """
    post.require_fit()
    if method not in TUNING_METHODS:
        raise ValueError(f"method must be one of {TUNING_METHODS}, got {method!r}")
    if granularity not in PRIOR_GRANULARITIES:
        raise ValueError(f"granularity must be one of {PRIOR_GRANULARITIES}, got {granularity!r}")
    positive_int("n_steps", n_steps)
    if not lr > 0:
        raise ValueError(f"lr must be positive, got {lr!r}")
    if tune_sigma_noise and post.likelihood != "regression":
        raise ValueError("tune_sigma_noise=True needs likelihood='regression'")
    newton_ok = granularity == "scalar" and not tune_sigma_noise
    if optimizer is None:
        optimizer = "newton" if newton_ok else "lbfgs"
    if optimizer not in TUNING_OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {TUNING_OPTIMIZERS}, got {optimizer!r}")
    if method != "marglik" and optimizer != ("newton" if newton_ok else "lbfgs"):
        raise ValueError(f"optimizer={optimizer!r} applies to method='marglik' only")
    if method == "marglik" and optimizer == "newton" and not newton_ok:
        raise ValueError(
            "optimizer='newton' tunes one scalar prior precision without the noise; use "
            "optimizer='lbfgs' or 'adam' for granularity='layer' / 'diag' or tune_sigma_noise=True"
        )
    t0 = time.perf_counter()
    if method == "marglik" and optimizer == "newton":
        report = _newton_scalar(post, n_steps, tol)
    elif method == "marglik":
        report = _gradient_ascent(post, granularity, n_steps, lr, tune_sigma_noise, tol, optimizer)
    elif method == "mackay":
        report = _mackay(post, granularity, n_steps, tune_sigma_noise, tol)
    else:
        if granularity != "scalar":
            raise ValueError("gridsearch supports granularity='scalar' only")
        if tune_sigma_noise:
            raise ValueError("gridsearch tunes the prior precision only")
        report = _gridsearch(post, val_loader, grid, **(predict_kwargs or {}))
    with torch.no_grad():
        report["log_marglik"] = float(log_marginal_likelihood(post))
    report["prior_precision"] = post.prior_precision.clone()
    report["sigma_noise"] = post.sigma_noise.tolist()  # a float, or one per output
    report["seconds"] = time.perf_counter() - t0
    report["method"] = method
    report["optimizer"] = optimizer if method == "marglik" else None
    return report


def _newton_scalar(post: KronPosterior, n_steps: int, tol: float) -> dict:
    """Newton's method on ``u = log delta`` for one scalar prior precision; each step is one
    pass over the spectrum (:meth:`Spectrum.scalar_prior_derivatives`), convergence takes a
    handful of steps (versus several evidence + gradient evaluations per L-BFGS iteration)."""
    spec = post.spectrum()
    c = float(post.precision_scale())
    norm = float(max(1, post.num_data))
    u = float(_initial(post, "scalar").log())
    converged = False
    it = 0
    for step in range(1, n_steps + 1):
        it = step
        d = math.exp(u)
        g, h = spec.scalar_prior_derivatives(c, d)
        gu, hu = d * g, d * g + d * d * h
        if abs(gu) / norm <= tol:
            converged = True
            break
        # Newton where the evidence is concave in u, otherwise a unit ascent step.
        delta_u = -gu / hu if hu < 0 else math.copysign(1.0, gu)
        u = u + min(2.0, max(-2.0, delta_u))
    post.prior_precision = torch.tensor(math.exp(u), dtype=torch.float64)
    return {"iterations": it, "evaluations": it, "converged": converged}


def _gradient_ascent(post, granularity, n_steps, lr, tune_sigma, tol, optimizer) -> dict:
    log_delta = _initial(post, granularity).log().requires_grad_(True)
    log_sigma = post.sigma_noise.clone().log().requires_grad_(tune_sigma)
    params = [log_delta] + ([log_sigma] if tune_sigma else [])
    # Normalising by the number of data keeps tolerances meaningful across problem sizes.
    norm = float(max(1, post.num_data))
    n_evals = 0

    def objective() -> Tensor:
        nonlocal n_evals
        n_evals += 1
        sigma = log_sigma.exp() if tune_sigma else None
        neg = -log_marginal_likelihood(post, log_delta.exp(), sigma) / norm
        if not torch.isfinite(neg):
            raise FloatingPointError(
                "the evidence became non-finite while tuning; lower lr or start from another "
                "prior_precision"
            )
        return neg

    converged = False
    iterations = 0
    if optimizer == "lbfgs":
        opt = torch.optim.LBFGS(
            params,
            lr=1.0,
            max_iter=n_steps,
            tolerance_grad=tol,
            tolerance_change=1e-14,
            history_size=20,
            line_search_fn="strong_wolfe",
        )

        def closure() -> Tensor:
            opt.zero_grad()
            neg = objective()
            neg.backward()
            return neg

        opt.step(closure)
        iterations = int(opt.state[log_delta]["n_iter"])
        grad_max = max(float(p.grad.abs().max()) for p in params)
        converged = grad_max <= tol or iterations < n_steps
    else:
        opt = torch.optim.Adam(params, lr=lr)
        for step in range(1, n_steps + 1):
            iterations = step
            opt.zero_grad()
            objective().backward()
            if max(float(p.grad.abs().max()) for p in params) <= tol:
                converged = True
                break
            opt.step()
    post.prior_precision = log_delta.detach().exp()
    if tune_sigma:
        post.sigma_noise = log_sigma.detach().exp()
    return {"iterations": iterations, "evaluations": n_evals, "converged": converged}


def _mackay(post: KronPosterior, granularity, n_steps, tune_sigma, tol) -> dict:
    step = _diag_step(post) if granularity == "diag" else _block_step(post, granularity)
    delta = _initial(post, granularity)
    sigma = post.sigma_noise.clone()
    converged = False
    it = 0
    for step_i in range(1, n_steps + 1):
        it = step_i
        new, gamma, gamma_out = step(sigma, delta)
        change = float(((new - delta).abs() / delta).max())
        delta = new
        if tune_sigma and gamma_out is not None:  # per-output noise: one update per output
            new_sigma = mackay_noise(post.output_factors, gamma_out, post.temperature)
            change = max(change, float(((new_sigma - sigma).abs() / sigma).max()))
            sigma = new_sigma
        elif tune_sigma:
            sigma, change = _noise_step(post, float(gamma.sum()), sigma, change)
        if change < tol:
            converged = True
            break
    post.prior_precision = delta
    if tune_sigma:
        post.sigma_noise = sigma
    return {"iterations": it, "converged": converged}


def _block_step(post: KronPosterior, granularity: str) -> Callable:
    """MacKay's step for a scalar / per-block prior: ``delta_l = gamma_l / ||theta*_l||^2``
    (a scalar: ``sum gamma / sum ||theta*||^2``); returns ``(new delta, gamma [L], gamma per
    output [C] or None)``."""
    spec = post.spectrum()
    sq = spec.sq
    if (sq <= 0).any():
        raise ValueError(
            "MacKay updates need non-zero MAP weights in every block (||theta_l||^2 > 0)"
        )

    factors = post.output_factors

    def step(sigma: Tensor, delta: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        gamma_out = None
        if factors is None:
            c = float(post.precision_scale(sigma))
            gamma = spec.effective_parameters(c, post.block_deltas(delta))
        else:  # per-output noise: gamma per block and per output from H(w)
            w, deltas = noise_weights(sigma), post.block_deltas(delta)
            gamma, gamma_out = factors.effective_parameters(w, deltas, 1.0 / post.temperature)
        new = gamma.sum() / sq.sum() if granularity == "scalar" else gamma / sq
        return new.clamp_min(1e-12), gamma, gamma_out

    return step


def _diag_step(post: KronPosterior) -> Callable:
    """MacKay's step per parameter, ``delta_i = gamma_i / (theta*_i - mu_i)^2`` with ``gamma_i =
    1 - delta_i Sigma_ii``, or an (over-relaxed) minorise-maximise step where that one would
    lower the evidence (:meth:`DiagPrior.mackay_step`: at fixed noise no step lowers it)."""
    _refuse_per_output(post)
    prior, sq = DiagPrior.of(post.require_fit()), _sq(post)
    omega = 1.5  # the over-relaxation, adapted from step to step

    def step(sigma: Tensor, delta: Tensor) -> tuple[Tensor, Tensor, None]:
        nonlocal omega
        c = float(post.precision_scale(sigma))
        new, gamma, omega = prior.mackay_step(c, delta, sq, omega)
        return new.to(delta.device), gamma, None

    return step


def _noise_step(post: KronPosterior, gamma: float, sigma: Tensor, change: float):
    """MacKay's noise update ``sigma^2 = sse / (T (N D - gamma))`` and the larger relative change."""
    curv = post.require_fit()
    dof = curv.observed_targets - gamma
    if dof <= 0:
        raise ValueError("MacKay noise update undefined: more effective parameters than data")
    new_sigma = torch.tensor(math.sqrt(curv.sse / (post.temperature * dof)), dtype=torch.float64)
    return new_sigma, max(change, float(abs(new_sigma - sigma) / sigma))


def validation_nll(post: KronPosterior, val_loader: Iterable, **predict_kwargs) -> float:
    """Mean negative log predictive density of the predictive over ``val_loader`` (the NLLs of
    :mod:`laplace_kron.metrics`)."""
    total, n = 0.0, 0
    for x, y in val_loader:
        with warnings.catch_warnings():
            # grid search visits small priors on purpose; their near-uniform predictives are
            # scored, not a user mistake
            warnings.filterwarnings("ignore", message="the predictive is nearly uniform")
            out = predict(post, x, **predict_kwargs)
        if post.likelihood == "regression":
            mean, var = out
            nll = metrics.gaussian_nll(mean, var, y.reshape(mean.shape))
        else:
            nll = metrics.nll(out, y.reshape(-1))
        total += nll * len(y)
        n += len(y)
    if n == 0:
        raise ValueError("val_loader is empty")
    return total / n


def _gridsearch(post: KronPosterior, val_loader, grid, **predict_kwargs) -> dict:
    if val_loader is None:
        raise ValueError("method='gridsearch' needs val_loader=(validation batches)")
    if grid is None:
        grid = torch.logspace(-4, 4, 21, dtype=torch.float64)
    grid = torch.as_tensor(grid, dtype=torch.float64).flatten()
    if (grid <= 0).any() or not torch.isfinite(grid).all():
        raise ValueError("grid values must be positive and finite")
    scores = []
    for d in grid:
        post.prior_precision = d
        scores.append(validation_nll(post, val_loader, **predict_kwargs))
    best = int(torch.tensor(scores).argmin())
    post.prior_precision = grid[best]
    return {
        "iterations": len(grid),
        "converged": True,
        "grid": grid.tolist(),
        "val_nll": scores,
    }
