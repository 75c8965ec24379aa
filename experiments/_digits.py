"""Shared set-up of the digits studies (calibration under shift, OOD detection).

A small CNN is trained to the MAP on scikit-learn's digits with :func:`laplace_kron.datasets.train_map`
(Adam, weight decay 5e-4, cosine schedule, batch 64). On top of it every method of :data:`METHODS`
gives a predictor ``x -> probs [B, C]``:

* ``MAP``: ``softmax(f(x))``; ``Temp. scaling``: ``softmax(f(x) / T)`` with ``T`` fitted on the
  validation set (Guo et al., 2017);
* Laplace posteriors ``KFAC`` / ``EKFAC`` (all weights) and ``LL-KFAC`` (last layer), exact Fisher,
  prior precision tuned by the marginal likelihood (one value per layer), each with the GLM
  predictive (probit link), the GLM predictive with Monte-Carlo link (``GLM-MC``: 200 samples of
  the logit Gaussian, which unlike probit respects the softmax's shift invariance) and network
  sampling (``NN``);
* ``KFAC GLM, val prior``: the KFAC GLM predictive with the prior precision chosen instead by the
  validation NLL over a log grid (``optimize_prior_precision(method="gridsearch")``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

try:
    from . import _common as C
except ImportError:  # run as a script
    import _common as C

from laplace_kron import KronLaplace
from laplace_kron.datasets import make_loader, train_map

Predictor = Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class Method:
    """A row of the tables: a posterior (``None`` for MAP / temperature scaling) and a predictive."""

    name: str
    posterior: str | None = None  # key of POSTERIORS
    predict: dict = field(default_factory=dict)
    prior: str = "marglik"  # or "val" (grid search on the validation NLL)


POSTERIORS = {
    "KFAC": {"curvature": "kfac"},
    "EKFAC": {"curvature": "ekfac"},
    "LL-KFAC": {"curvature": "kfac", "modules": "last_layer"},
}
GLM = {"method": "glm", "link": "probit"}
GLM_MC = {"method": "glm", "link": "mc", "n_samples": 200}  # cheap: samples of [B, C] logits
NN = {"method": "nn"}

METHODS = [
    Method("MAP"),
    Method("Temp. scaling"),
    Method("KFAC GLM", "KFAC", GLM),
    Method("KFAC GLM-MC", "KFAC", GLM_MC),
    Method("KFAC NN", "KFAC", NN),
    Method("EKFAC GLM", "EKFAC", GLM),
    Method("EKFAC NN", "EKFAC", NN),
    Method("LL-KFAC GLM", "LL-KFAC", GLM),
    Method("LL-KFAC GLM-MC", "LL-KFAC", GLM_MC),
    Method("LL-KFAC NN", "LL-KFAC", NN),
    Method("KFAC GLM, val prior", "KFAC", GLM, prior="val"),
]
QUICK_METHODS = ["MAP", "Temp. scaling", "KFAC GLM", "KFAC NN", "LL-KFAC GLM"]


def methods(quick: bool, only: list[str] | None = None) -> list[Method]:
    names = only or (QUICK_METHODS if quick else [m.name for m in METHODS])
    unknown = set(names) - {m.name for m in METHODS}
    if unknown:
        raise ValueError(
            f"unknown methods {sorted(unknown)}; choose from {[m.name for m in METHODS]}"
        )
    return [m for m in METHODS if m.name in names]


def digits_cnn(n_classes: int = 10) -> nn.Sequential:
    """Conv(16) - ReLU - Conv(32) - ReLU - MaxPool - Linear(64) - ReLU - Linear(C): 38k parameters."""
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * 4 * 4, 64),
        nn.ReLU(),
        nn.Linear(64, n_classes),
    )


def train_cnn(
    x: Tensor, y: Tensor, n_classes: int, seed: int, epochs: int, weight_decay: float = 5e-4
) -> nn.Module:
    """:func:`digits_cnn` trained by ``train_map`` (Adam lr 3e-3, batch 64, cosine schedule)."""
    C.seed_everything(seed)
    model = digits_cnn(n_classes)
    loader = make_loader(x, y, 64, seed=seed)
    train_map(model, loader, epochs=epochs, seed=seed, weight_decay=weight_decay)
    return model.eval()


def build_predictors(
    model: nn.Module,
    data: dict[str, Tensor],
    chosen: list[Method],
    n_samples: int,
    seed: int,
) -> tuple[dict[str, Predictor], dict[str, dict]]:
    """Fit what ``chosen`` needs; return ``name -> predictor`` and ``name -> info`` (tuned prior,
    temperature, seconds)."""
    x, y = data["x_train"], data["y_train"]
    loader = make_loader(x, y, 256, shuffle=False)
    val = [(data["x_val"], data["y_val"])]
    gen = torch.Generator().manual_seed(seed)
    fitted: dict[str, tuple[KronLaplace, float]] = {}
    preds: dict[str, Predictor] = {}
    info: dict[str, dict] = {}
    for m in chosen:
        if m.posterior is None:
            if m.name == "MAP":
                preds[m.name] = lambda z: torch.softmax(C.predict_logits(model, z), -1)
                info[m.name] = {}
            else:
                T = C.fit_temperature(C.predict_logits(model, data["x_val"]), data["y_val"])
                preds[m.name] = lambda z, T=T: torch.softmax(C.predict_logits(model, z) / T, -1)
                info[m.name] = {"temperature": T}
            continue
        if m.posterior not in fitted:
            with C.Timer() as t:
                la = KronLaplace(model, "classification", fisher="exact", **POSTERIORS[m.posterior])
                la.fit(loader)
            fitted[m.posterior] = (la, t.seconds)
        base, fit_seconds = fitted[m.posterior]
        la = KronLaplace(model, "classification", fisher="exact", **POSTERIORS[m.posterior])
        la.load_state_dict(base.state_dict())  # an independent copy for this prior
        with C.Timer() as t:
            if m.prior == "marglik":
                la.optimize_prior_precision(method="marglik", granularity="layer")
            else:
                # optimize_prior_precision's own ``method`` shadows predict's: the grid search
                # uses the default (GLM) predictive, so only the link is passed on.
                grid = torch.logspace(-1, 4, 21, dtype=torch.float64)
                link = m.predict.get("link", "probit")
                la.optimize_prior_precision(
                    method="gridsearch", val_loader=val, grid=grid, predict_kwargs={"link": link}
                )
        delta = la.prior_precision
        info[m.name] = {
            "prior_precision": delta.tolist() if delta.ndim else float(delta),
            "fit_seconds": fit_seconds,
            "tune_seconds": t.seconds,
        }
        kw = dict(m.predict)
        if kw["method"] != "glm":  # network sampling: the costly one, n_samples from the CLI
            kw["n_samples"] = n_samples

        def predict(z: Tensor, la: KronLaplace = la, kw: dict = kw) -> Tensor:
            return la.predict(z, generator=gen, **kw)

        preds[m.name] = predict
    return preds, info


def fmt_prior(value: float | list[float]) -> str:
    """Short text of a tuned prior precision (scalar or per layer)."""
    if isinstance(value, list):
        return "[" + ", ".join(f"{v:.3g}" for v in value) + "]"
    return f"{value:.3g}" if math.isfinite(value) else "–"
