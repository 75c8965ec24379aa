"""Marginal-likelihood training: the network and its prior precisions (and regression noise)
learned together (Immer et al. 2021, "Scalable marginal likelihood estimation for model selection
in deep learning").

The network is trained on the MAP objective of the current hyperparameters, per batch of ``B`` of
the ``N`` data points

    mean_b NLL_b(theta; sigma) + 1 / (2 N) sum_l delta_l ||theta_l||^2

(the summed objective ``sum_n NLL_n + 1/2 sum_l delta_l ||theta_l||^2`` divided by ``N``; for
regression ``NLL = ||y - f||^2 / (2 sigma^2) + const``), so the prior precisions act as per-block
weight decay. After ``n_epochs_burnin`` epochs, every ``marglik_frequency`` epochs the Laplace
posterior (KFAC or EKFAC) is fitted at the current weights and the hyperparameters are set to the
maximiser of its evidence (:func:`laplace_kron.marglik.optimize_prior_precision`; no pass over the
data beyond the fit). At a fixed point the weights are the MAP of the hyperparameters and the
hyperparameters maximise the evidence at those weights; for a linear-Gaussian model this is the
optimum of the exact evidence (envelope theorem; tested). The Laplace of the final network is
fitted and returned.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .curvature import batches
from .laplace import KronLaplace
from .validation import positive, positive_int

__all__ = ["marglik_training"]


def _nll_mean(f: Tensor, y: Tensor, likelihood: str, sigma: Tensor) -> Tensor:
    """Mean NLL over the batch (regression up to the ``log sigma`` constant, which does not
    depend on the weights)."""
    if likelihood == "classification":
        return nn.functional.cross_entropy(f, y)
    if likelihood == "binary":
        return nn.functional.binary_cross_entropy_with_logits(f.reshape(-1), y.reshape(-1).to(f))
    sq = (f - y.reshape(f.shape).to(f)) ** 2
    if sigma.ndim:  # per-output noise [C]
        return 0.5 * (sq / sigma**2).sum() / f.shape[0]
    return 0.5 * sq.sum() / (sigma**2 * f.shape[0])


def _groups(la: KronLaplace, model: nn.Module) -> list[list[nn.Parameter]]:
    """The model's parameters grouped by posterior block (block order), from a fitted ``la``."""
    params = dict(model.named_parameters())
    return [[params[n] for n in b.param_names] for b in la.require_fit().blocks]


def marglik_training(
    model: nn.Module,
    train_loader: Iterable,
    likelihood: str,
    n_epochs: int = 100,
    lr: float = 1e-3,
    curvature: str = "kfac",
    granularity: str = "layer",
    prior_precision: float = 1.0,
    sigma_noise: float | Tensor = 1.0,
    n_epochs_burnin: int = 10,
    marglik_frequency: int = 5,
    tune_sigma_noise: bool | None = None,
    optimizer: type[torch.optim.Optimizer] = torch.optim.Adam,
    progress: bool = False,
    **options,
) -> tuple[KronLaplace, dict]:
    """Train ``model`` and tune its prior precisions (and ``sigma_noise``) by the Laplace evidence.

    Args:
        model: the network (trained in place; left in eval mode).
        train_loader: re-iterable ``(inputs, targets)`` batches (e.g. a DataLoader).
        likelihood: ``"classification"``, ``"regression"`` or ``"binary"``.
        n_epochs, lr, optimizer: the training loop (``optimizer(model.parameters(), lr=lr)``).
        curvature, granularity: the Laplace fitted for the evidence (``"kfac"`` / ``"ekfac"``)
            and one prior precision per block (``"layer"``) or one for all (``"scalar"``).
        prior_precision, sigma_noise: initial hyperparameters.
        n_epochs_burnin, marglik_frequency: the first refit after ``n_epochs_burnin`` epochs,
            then one every ``marglik_frequency`` epochs.
        tune_sigma_noise: tune the noise (regression; default: True for regression).
        **options: curvature options of :class:`~laplace_kron.KronLaplace` (``fisher``, ...).

    Returns:
        The :class:`~laplace_kron.KronLaplace` fitted at the final weights with the final
        hyperparameters, and a report ``{"epochs", "seconds", "train_loss" (per epoch), "refits":
        [{"epoch", "log_marglik", "prior_precision", "sigma_noise"}, ...]}``.
    """
    positive_int("n_epochs", n_epochs)
    positive_int("marglik_frequency", marglik_frequency)
    if isinstance(n_epochs_burnin, bool) or not isinstance(n_epochs_burnin, int):
        raise ValueError(f"n_epochs_burnin must be a non-negative integer, got {n_epochs_burnin!r}")
    if n_epochs_burnin < 0:
        raise ValueError(f"n_epochs_burnin must be a non-negative integer, got {n_epochs_burnin!r}")
    positive("lr", lr)
    if granularity not in ("scalar", "layer"):
        raise ValueError(
            f"marglik_training tunes granularity 'scalar' or 'layer', got {granularity!r} (its "
            "training penalty is per block; tune a per-parameter prior after training instead)"
        )
    if tune_sigma_noise is None:
        tune_sigma_noise = likelihood == "regression"
    la = KronLaplace(
        model,
        likelihood,
        curvature,
        prior_precision=prior_precision,
        sigma_noise=sigma_noise,
        **options,
    )
    opt = optimizer(model.parameters(), lr=lr)
    device = next(model.parameters()).device
    t0 = time.perf_counter()
    report: dict = {"train_loss": [], "refits": []}
    # (delta, parameters) per posterior block once a fit gave the layout; the initial prior
    # precision for everything before that, and always for trainable parameters outside it.
    delta0 = float(la.prior_precision.mean())
    deltas: list[tuple[Tensor, list[nn.Parameter]]] = []
    outside = [p for p in model.parameters() if p.requires_grad]
    for epoch in tqdm(range(1, n_epochs + 1), disable=not progress, desc="marglik training"):
        model.train()
        total, count = 0.0, 0
        n_data = 0
        for _, x, y in batches.iter_batches(train_loader):
            x, y = batches.to_device(x, device), y.to(device)
            opt.zero_grad(set_to_none=True)
            f = batches.checked_forward(model, x)
            nll = _nll_mean(f, y, likelihood, la.sigma_noise.to(f.dtype))
            n_data += f.shape[0]
            # 1/(2N) sum_l delta_l ||theta_l||^2 with the N of the previous epoch (or of the fit).
            n_ref = la.num_data if la.curvature is not None else max(n_data, 1)
            reg = delta0 * sum((p**2).sum() for p in outside)
            reg = reg + sum(d.to(f.dtype) * sum((p**2).sum() for p in ps) for d, ps in deltas)
            (nll + 0.5 * reg / n_ref).backward()
            opt.step()
            total += float(nll.detach()) * f.shape[0]
            count += f.shape[0]
        report["train_loss"].append(total / max(count, 1))
        due = epoch >= n_epochs_burnin and (epoch - n_epochs_burnin) % marglik_frequency == 0
        if due or epoch == n_epochs:
            model.eval()
            la.fit(train_loader)
            if granularity == "layer" and la.prior_precision.ndim == 0:
                la.prior_precision = la.prior_precision.repeat(la.n_blocks)
            la.optimize_prior_precision(granularity=granularity, tune_sigma_noise=tune_sigma_noise)
            deltas = list(zip(la.block_deltas().unbind(), _groups(la, model), strict=True))
            covered = {id(p) for _, ps in deltas for p in ps}
            outside = [p for p in model.parameters() if p.requires_grad and id(p) not in covered]
            report["refits"].append(
                {
                    "epoch": epoch,
                    "log_marglik": float(la.log_marginal_likelihood()),
                    "prior_precision": la.prior_precision.tolist(),
                    "sigma_noise": la.sigma_noise.tolist(),
                }
            )
    model.eval()
    report["epochs"] = n_epochs
    report["seconds"] = time.perf_counter() - t0
    return la, report
