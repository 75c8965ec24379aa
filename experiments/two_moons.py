"""Two-moons toy: MAP is overconfident far from the data, the Laplace predictive is not.

A ReLU MLP (2-50-50-2) is trained to the MAP on ``sklearn.datasets.make_moons`` (noise 0.1). On
top of it: KFAC Laplace of all weights and last-layer KFAC Laplace, prior precision tuned by the
marginal likelihood, GLM predictive with the probit link; and NN sampling of the KFAC posterior.
For ReLU networks the MAP confidence tends to 1 along almost every ray away from the data, while
the GLM Laplace confidence stays bounded away from 1 (Kristiadi et al., 2020).

Metrics (mean ± std over seeds): test accuracy, NLL and ECE on fresh moons; the mean confidence on
the plotted grid points farther than 1.5 from every training point (``conf_far``) and on a circle
of radius 20 around the data (``conf_r20``; 1/C = 0.5 is the ideal "don't know"). Outputs
(``--out``): ``two_moons.md``, ``two_moons.json``, ``confidence_map.png`` (first seed).

    python experiments/two_moons.py            # full: 5 seeds
    python experiments/two_moons.py --quick    # smoke mode
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

STUDY = "two_moons"
XLIM, YLIM = (-4.0, 5.0), (-4.0, 4.5)
FAR = 1.5


def make_moons(n: int, seed: int) -> tuple[Tensor, Tensor]:
    from sklearn.datasets import make_moons as sk_moons

    x, y = sk_moons(n_samples=n, noise=0.1, random_state=seed)
    return torch.tensor(x, dtype=torch.float32), torch.tensor(y, dtype=torch.int64)


def methods(quick: bool) -> dict[str, dict]:
    """name -> (Laplace options, predict options); ``None`` for the MAP."""
    m = {
        "MAP": None,
        "LA KFAC (GLM)": ({}, {"method": "glm", "link": "probit"}),
        "LA last-layer (GLM)": ({"modules": "last_layer"}, {"method": "glm", "link": "probit"}),
        "LA KFAC (NN samples)": ({}, {"method": "nn", "n_samples": 30 if quick else 200}),
    }
    return m


def run_seed(seed: int, n_train: int, epochs: int, grid_n: int, quick: bool) -> tuple[list, dict]:
    gen = C.seed_everything(seed)
    x, y = make_moons(n_train, seed)
    x_te, y_te = make_moons(1000, 1000 + seed)
    model = C.mlp(2, 2, 50, 2, nn.ReLU)
    C.train_full_batch(model, x, y, "ce", prior_precision=1.0, epochs=epochs)
    gx, gy = np.linspace(*XLIM, grid_n), np.linspace(*YLIM, grid_n)
    mx, my = np.meshgrid(gx, gy, indexing="xy")
    grid = torch.tensor(np.stack([mx.ravel(), my.ravel()], 1), dtype=torch.float32)
    far_mask = torch.cdist(grid, x).min(1).values > FAR
    angles = torch.linspace(0, 2 * math.pi, 361)[:-1]
    ring = torch.stack([torch.cos(angles), torch.sin(angles)], 1) * 20 + x.mean(0)
    rows, maps = [], {}
    for name, spec in methods(quick).items():
        info: dict = {}
        if spec is None:

            def prob(z: Tensor) -> Tensor:
                return torch.softmax(C.predict_logits(model, z), -1)
        else:
            la_kw, pred_kw = spec
            la = KronLaplace(model, "classification", fisher="exact", **la_kw).fit([(x, y)])
            rep = la.optimize_prior_precision(method="marglik", granularity="scalar")
            info = {"prior_precision": float(rep["prior_precision"])}

            def prob(z: Tensor, la: KronLaplace = la, kw: dict = pred_kw) -> Tensor:
                return la.predict(z, generator=gen, **kw)

        p_te, p_grid, p_ring = prob(x_te), prob(grid), prob(ring)
        conf_grid = metrics.confidence(p_grid)
        rows.append(
            {
                "method": name,
                "seed": seed,
                "accuracy": metrics.accuracy(p_te, y_te),
                "nll": metrics.nll(p_te, y_te),
                "ece": metrics.ece(p_te, y_te),
                "conf_far": float(conf_grid[far_mask].mean()),
                "conf_r20": float(metrics.confidence(p_ring).mean()),
                **info,
            }
        )
        maps[name] = conf_grid.reshape(grid_n, grid_n)
    return rows, {"gx": gx, "gy": gy, "maps": maps, "x": x, "y": y}


METRICS = ["accuracy", "nll", "ece", "conf_far", "conf_r20", "prior_precision"]


def main(argv: Sequence[str] | None = None) -> dict:
    """Run the study; return the aggregated results."""
    p = C.make_parser(STUDY, __doc__.split("\n")[0], default_seeds=range(5))
    p.add_argument("--n-train", type=int, default=200, help="training points")
    args = p.parse_args(argv)
    seeds = C.setup(args)
    epochs = 500 if args.quick else 3000
    grid_n = 60 if args.quick else 150
    config = {
        "seeds": seeds,
        "quick": args.quick,
        "n_train": args.n_train,
        "model": "MLP 2-50-50-2 ReLU",
        "epochs": epochs,
        "train_prior_precision": 1.0,
        "fisher": "exact",
        "prior": "marglik, scalar",
        "grid": {"xlim": XLIM, "ylim": YLIM, "n": grid_n, "far": FAR},
    }
    all_rows, first = [], None
    for seed in seeds:
        C.log(f"[two_moons] seed {seed}")
        rows, maps = run_seed(seed, args.n_train, epochs, grid_n, args.quick)
        all_rows += rows
        first = first or maps
    summary = C.aggregate(all_rows, ["method"], METRICS)
    show = ["MAP", "LA KFAC (GLM)", "LA last-layer (GLM)"]
    fig = plots.confidence_map(
        first["gx"],
        first["gy"],
        {k: first["maps"][k] for k in show},
        first["x"],
        first["y"],
        args.out / "confidence_map.png",
        title=f"Two moons (seed {seeds[0]}): max-probability confidence",
    )
    table = C.markdown_table(summary, ["method", *METRICS])
    notes = (
        "Mean ± std over seeds. accuracy / nll / ece: 1000 fresh test moons. conf_far: mean "
        f"confidence on the grid points farther than {FAR} from all training points; conf_r20: "
        "mean confidence on a circle of radius 20 around the data (0.5 = uninformed). "
        "Figure: `confidence_map.png`."
    )
    md, js = C.write_results(
        args.out,
        STUDY,
        "Two moons: confidence far from the data, MAP vs Laplace",
        [("Results", table), ("Notes", notes)],
        {"summary": summary, "rows": all_rows, "figures": [fig.name]},
        config,
    )
    C.log(f"[two_moons] wrote {md}, {js} and {fig}")
    return {"summary": summary, "out": args.out}


if __name__ == "__main__":
    main()
