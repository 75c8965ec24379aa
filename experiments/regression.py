"""Regression with error bars: Laplace (GLM predictive) vs MAP with a tuned homoscedastic noise.

Two data sets:

* ``diabetes``: scikit-learn's diabetes data (442 x 10), inputs and targets standardised with the
  training statistics; random 70 / 10 / 20 train / validation / test split per seed.
* ``toy``: a 1-D sine with a gap in the inputs, ``y = sin(2 x) + 0.15 eps``, training inputs
  uniform on ``[-4, -1.5] U [1.5, 4]``; test inputs uniform on ``[-4, 4]`` (the gap included,
  reported separately as ``nll_gap``).

The same MAP network (tanh MLP, full-batch Adam on ``0.5 sum (y - f)^2 + delta/2 ||theta||^2``) is
used by every method:

* ``MAP (sigma: train)``: ``N(f(x), sigma^2)`` with ``sigma^2`` the training mean squared residual;
* ``MAP (sigma: val)``: ``sigma^2`` the validation mean squared residual (the maximum-likelihood
  homoscedastic noise on held-out data: the tuned baseline);
* ``LA KFAC`` / ``LA EKFAC`` / ``LA last-layer``: Kronecker Laplace on the training data, prior
  precision and ``sigma`` tuned by the marginal likelihood, GLM predictive
  ``N(f(x), J Sigma J^T + sigma^2)``; the validation set is not used.

Metrics on the test set (standardised target units): Gaussian NLL per point, RMSE, 95% interval
coverage. Outputs (``--out``): ``regression.md``, ``regression.json``, ``toy_band.png``.

    python experiments/regression.py            # full: 10 seeds
    python experiments/regression.py --quick    # smoke mode
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor, nn

try:
    from . import _common as C
except ImportError:  # run as a script
    import _common as C

from laplace_kron import KronLaplace, metrics, plots

STUDY = "regression"
GAP = (-1.5, 1.5)
TOY_RANGE = (-4.0, 4.0)
TOY_NOISE = 0.15


def toy_function(x: Tensor) -> Tensor:
    return torch.sin(2 * x)


def make_toy(n_train: int, n_val: int, n_test: int, seed: int) -> dict[str, Tensor]:
    """Training / validation inputs outside the gap, test inputs on the whole range."""
    g = torch.Generator().manual_seed(10_000 + seed)
    lo, hi = TOY_RANGE
    width = (GAP[0] - lo) + (hi - GAP[1])

    def outside_gap(n: int) -> Tensor:
        u = torch.rand(n, generator=g) * width
        return torch.where(u < GAP[0] - lo, lo + u, GAP[1] + (u - (GAP[0] - lo)))

    def targets(x: Tensor) -> Tensor:
        return toy_function(x) + TOY_NOISE * torch.randn(x.shape, generator=g)

    x_tr, x_va = outside_gap(n_train), outside_gap(n_val)
    x_te = lo + (hi - lo) * torch.rand(n_test, generator=g)
    return {
        "x_train": x_tr[:, None],
        "y_train": targets(x_tr)[:, None],
        "x_val": x_va[:, None],
        "y_val": targets(x_va)[:, None],
        "x_test": x_te[:, None],
        "y_test": targets(x_te)[:, None],
    }


def make_diabetes(seed: int) -> dict[str, Tensor]:
    """Standardised 70 / 10 / 20 split of scikit-learn's diabetes data."""
    from sklearn.datasets import load_diabetes
    from sklearn.model_selection import train_test_split

    x, y = load_diabetes(return_X_y=True)
    idx = np.arange(len(y))
    rest, test = train_test_split(idx, test_size=0.2, random_state=seed)
    train, val = train_test_split(rest, test_size=0.125, random_state=seed + 1)
    mx, sx = x[train].mean(0), x[train].std(0)
    my, sy = y[train].mean(), y[train].std()
    out = {}
    for name, part in (("train", train), ("val", val), ("test", test)):
        out[f"x_{name}"] = torch.tensor((x[part] - mx) / sx, dtype=torch.float32)
        out[f"y_{name}"] = torch.tensor((y[part] - my) / sy, dtype=torch.float32)[:, None]
    return out


def evaluate(mean: Tensor, var: Tensor, y: Tensor) -> dict[str, float]:
    cov = metrics.interval_coverage(mean, var, y, levels=(0.95,))[0.95]
    return {
        "nll": metrics.gaussian_nll(mean, var, y),
        "rmse": metrics.rmse(mean, y),
        "cov95": cov,
    }


def laplace_variants(quick: bool) -> dict[str, dict]:
    v = {
        "LA KFAC": {"curvature": "kfac"},
        "LA EKFAC": {"curvature": "ekfac"},
        "LA last-layer": {"curvature": "kfac", "modules": "last_layer"},
    }
    return {k: v[k] for k in ("LA KFAC", "LA last-layer")} if quick else v


def run_one(
    data: dict[str, Tensor],
    seed: int,
    width: int,
    depth: int,
    epochs: int,
    train_prior: float,
    granularity: str,
    quick: bool,
    gap_mask: Tensor | None = None,
    grid: Tensor | None = None,
) -> tuple[list[dict], dict[str, tuple[Tensor, Tensor]]]:
    """Train one MAP network and evaluate every method; return rows and the grid predictions."""
    C.seed_everything(seed)
    x_tr, y_tr = data["x_train"], data["y_train"]
    model = C.mlp(x_tr.shape[1], 1, width, depth, nn.Tanh)
    C.train_full_batch(model, x_tr, y_tr, "mse", train_prior, epochs)
    rows: list[dict] = []
    bands: dict[str, tuple[Tensor, Tensor]] = {}
    with torch.no_grad():
        f_tr, f_va, f_te = (model(data[f"x_{s}"]) for s in ("train", "val", "test"))
    sig2 = {
        "MAP (sigma: train)": float(((f_tr - y_tr) ** 2).mean()),
        "MAP (sigma: val)": float(((f_va - data["y_val"]) ** 2).mean()),
    }
    for name, s2 in sig2.items():
        var = torch.full_like(f_te, s2)
        row = {"method": name, "seed": seed, **evaluate(f_te, var, data["y_test"])}
        row["sigma"] = math.sqrt(s2)
        if gap_mask is not None:
            row.update(_gap_split(f_te, var, data["y_test"], gap_mask))
        rows.append(row)
        if grid is not None:
            with torch.no_grad():
                fg = model(grid)
            bands[name] = (fg.squeeze(-1), torch.full_like(fg, math.sqrt(s2)).squeeze(-1))
    loader = [(x_tr, y_tr)]
    for name, kw in laplace_variants(quick).items():
        with C.Timer() as t:
            la = KronLaplace(model, "regression", fisher="exact", **kw).fit(loader)
            rep = la.optimize_prior_precision(
                method="marglik", granularity=granularity, tune_sigma_noise=True
            )
            mean, var = la.predict(data["x_test"])
        row = {"method": name, "seed": seed, **evaluate(mean, var, data["y_test"])}
        prior = rep["prior_precision"]
        row.update(
            sigma=float(la.sigma_noise),
            prior_precision=float(prior.mean()) if prior.ndim else float(prior),
            log_marglik=float(rep["log_marglik"]),
            seconds=t.seconds,
        )
        if gap_mask is not None:
            row.update(_gap_split(mean, var, data["y_test"], gap_mask))
        rows.append(row)
        if grid is not None:
            gm, gv = la.predict(grid)
            bands[name] = (gm.squeeze(-1), gv.sqrt().squeeze(-1))
    return rows, bands


def _gap_split(mean: Tensor, var: Tensor, y: Tensor, gap: Tensor) -> dict[str, float]:
    return {
        "nll_gap": metrics.gaussian_nll(mean[gap], var[gap], y[gap]),
        "nll_data": metrics.gaussian_nll(mean[~gap], var[~gap], y[~gap]),
    }


METRICS = ["nll", "rmse", "cov95", "nll_gap", "nll_data", "sigma", "prior_precision"]


def main(argv: Sequence[str] | None = None) -> dict:
    """Run the study; return the aggregated results."""
    p = C.make_parser(STUDY, __doc__.split("\n")[0], default_seeds=range(10))
    p.add_argument("--width", type=int, default=50, help="hidden units per layer")
    p.add_argument(
        "--granularity", choices=["scalar", "layer"], default="layer", help="prior precision"
    )
    args = p.parse_args(argv)
    seeds = C.setup(args)
    settings = {  # MAP training: (hidden layers, epochs, prior precision during training)
        "diabetes": {"depth": 1, "epochs": 150 if args.quick else 1000, "train_prior": 10.0},
        "toy": {"depth": 2, "epochs": 300 if args.quick else 2000, "train_prior": 0.1},
    }
    config = {
        "seeds": seeds,
        "quick": args.quick,
        "width": args.width,
        "map": settings,
        "granularity": args.granularity,
        "fisher": "exact",
        "toy": {"n_train": 150, "n_val": 50, "n_test": 1000, "noise": TOY_NOISE, "gap": GAP},
    }
    grid = torch.linspace(-6, 6, 400)[:, None]
    common = {"granularity": args.granularity, "quick": args.quick}
    all_rows: list[dict] = []
    toy_bands = None
    for seed in seeds:
        C.log(f"[regression] seed {seed}: diabetes")
        rows, _ = run_one(make_diabetes(seed), seed, args.width, **settings["diabetes"], **common)
        all_rows += [{"data": "diabetes", **r} for r in rows]
        C.log(f"[regression] seed {seed}: toy")
        toy = make_toy(150, 50, 1000, seed)
        gap = (toy["x_test"][:, 0] > GAP[0]) & (toy["x_test"][:, 0] < GAP[1])
        rows, bands = run_one(
            toy, seed, args.width, **settings["toy"], **common, gap_mask=gap, grid=grid
        )
        all_rows += [{"data": "toy", **r} for r in rows]
        if toy_bands is None:
            toy_bands = (toy, bands)
    summary = C.aggregate(all_rows, ["data", "method"], METRICS)
    toy, bands = toy_bands
    show = [k for k in ("MAP (sigma: val)", "LA KFAC", "LA last-layer") if k in bands]
    fig = plots.regression_band(
        toy["x_train"],
        toy["y_train"],
        grid,
        {k: bands[k][0] for k in show},
        {k: bands[k][1] for k in show},
        args.out / "toy_band.png",
        title=f"1-D toy with a gap in {GAP} (seed {seeds[0]}): predictive mean +/- 2 std",
    )
    sections = []
    for ds, cols in (
        ("diabetes", ["method", "nll", "rmse", "cov95", "sigma", "prior_precision"]),
        ("toy", ["method", "nll", "nll_data", "nll_gap", "rmse", "cov95", "sigma"]),
    ):
        rows = [r for r in summary if r["data"] == ds]
        sections.append((ds, C.markdown_table(rows, cols)))
    sections.append(
        (
            "Notes",
            "Test-set mean ± std over seeds; Gaussian NLL per point (lower is better), in "
            "standardised target units for diabetes and raw units for the toy (noise std "
            f"{TOY_NOISE}); cov95 is the empirical coverage of the central 95% interval. `sigma`: the "
            "noise used by the predictive; `prior_precision`: the marglik prior (mean over layers "
            "for layer-wise). Figure: `toy_band.png`.",
        )
    )
    md, js = C.write_results(
        args.out,
        STUDY,
        "Regression: Laplace (GLM, marglik) vs MAP with a tuned noise",
        sections,
        {"summary": summary, "rows": all_rows, "figures": [fig.name]},
        config,
    )
    C.log(f"[regression] wrote {md}, {js} and {fig}")
    return {"summary": summary, "out": args.out}


if __name__ == "__main__":
    main()
