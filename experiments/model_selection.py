"""Model selection with the Laplace evidence: does the marginal likelihood pick a good model?

On scikit-learn's digits (flat 64-d inputs in [0, 1], stratified 80 / 20 train / test split per
seed) a tanh MLP with one hidden layer is trained to the MAP for every pair (width, prior
precision ``delta``) of a grid, on the objective ``sum_n CE_n + delta/2 ||theta||^2`` (full-batch
Adam). For each model the KFAC Laplace evidence (exact Fisher, the training ``delta``) is compared
with the test NLL of the MAP predictive and of the Laplace GLM (probit) predictive. Reported per
seed, then mean ± std: the Spearman rank correlation between the evidence and the negative test
NLL over the grid, and the test NLL of the evidence-selected model against the best model of the
grid ("regret").

Outputs (``--out``): ``model_selection.md``, ``model_selection.json``, ``evidence_grid.png``
(evidence and test NLLs against ``delta`` for every width) and ``evidence_vs_nll.png`` (scatter).

    python experiments/model_selection.py            # full: widths 8..128, delta 1e-2..1e2, 3 seeds
    python experiments/model_selection.py --quick    # smoke mode
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from scipy.stats import spearmanr
from torch import nn

try:
    from . import _common as C
except ImportError:  # run as a script
    import _common as C

from laplace_kron import KronLaplace, metrics
from laplace_kron.datasets import load_digits_split

STUDY = "model_selection"


def run_seed(seed: int, widths: list[int], priors: list[float], epochs: int) -> list[dict]:
    """One row per (width, delta) of the grid."""
    d = load_digits_split(seed, val_fraction=0.0, test_fraction=0.2, image=False)
    x, y, x_te, y_te = d["x_train"], d["y_train"], d["x_test"], d["y_test"]
    n = x.shape[0]
    rows = []
    for width in widths:
        for delta in priors:
            C.seed_everything(seed)
            model = C.mlp(64, 10, width, 1, nn.Tanh)
            with C.Timer() as t:
                C.train_full_batch(model, x, y, "ce", delta, epochs)
            la = KronLaplace(model, "classification", fisher="exact", prior_precision=delta)
            la.fit([(x, y)])
            p_map = torch.softmax(C.predict_logits(model, x_te), -1)
            p_la = la.predict(x_te, method="glm", link="probit")
            rows.append(
                {
                    "seed": seed,
                    "width": width,
                    "delta": delta,
                    "n_params": la.n_params,
                    "log_marglik": float(la.log_marginal_likelihood()) / n,
                    "nll_map": metrics.nll(p_map, y_te),
                    "nll_la": metrics.nll(p_la, y_te),
                    "acc_map": metrics.accuracy(p_map, y_te),
                    "acc_la": metrics.accuracy(p_la, y_te),
                    "train_seconds": t.seconds,
                }
            )
            C.log(
                f"  seed {seed} width {width:4d} delta {delta:g}: log p(D)/N "
                f"{rows[-1]['log_marglik']:.4f}, test NLL MAP {rows[-1]['nll_map']:.4f} "
                f"LA {rows[-1]['nll_la']:.4f}"
            )
    return rows


def selection_scores(rows: list[dict]) -> dict[str, float]:
    """Rank correlations and regret of the evidence-selected model, for one seed's grid."""
    ev = np.array([r["log_marglik"] for r in rows])
    out: dict[str, float] = {}
    for key in ("nll_map", "nll_la"):
        nll = np.array([r[key] for r in rows])
        rho = spearmanr(ev, -nll).statistic if len(rows) > 2 else float("nan")
        pick = int(ev.argmax())
        out[f"spearman_{key}"] = float(rho)
        out[f"regret_{key}"] = float(nll[pick] - nll.min())
        out[f"selected_{key}"] = float(nll[pick])
        out[f"best_{key}"] = float(nll.min())
        out[f"rank_{key}"] = int((nll < nll[pick]).sum()) + 1
    best = rows[int(ev.argmax())]
    out["selected_width"], out["selected_delta"] = best["width"], best["delta"]
    return out


def _figures(summary: list[dict], rows: list[dict], out: Path) -> list[Path]:
    widths = sorted({r["width"] for r in summary})
    fig = Figure(figsize=(13.5, 3.9), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 3)
    panels = [
        ("log_marglik", "log marginal likelihood / N (higher = better)"),
        ("nll_la", "test NLL, Laplace GLM"),
        ("nll_map", "test NLL, MAP"),
    ]
    for ax, (key, label) in zip(axes, panels):
        for k, w in enumerate(widths):
            rs = [r for r in summary if r["width"] == w]
            xs = [r["delta"] for r in rs]
            mu = np.array([r[key]["mean"] for r in rs])
            sd = np.array([r[key]["std"] for r in rs])
            ax.plot(xs, mu, marker="o", ms=4, color=f"C{k}", label=f"width {w}")
            ax.fill_between(xs, mu - sd, mu + sd, color=f"C{k}", alpha=0.15, lw=0)
        ax.set(xscale="log", xlabel="prior precision delta", ylabel=label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize="small")
    grid_path = out / "evidence_grid.png"
    fig.savefig(grid_path, dpi=110)

    fig = Figure(figsize=(9.0, 3.9), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2, sharex=True)
    for ax, key, label in zip(axes, ("nll_la", "nll_map"), ("Laplace GLM", "MAP")):
        for k, w in enumerate(widths):
            rs = [r for r in rows if r["width"] == w]
            ax.scatter(
                [r["log_marglik"] for r in rs],
                [r[key] for r in rs],
                s=[
                    12 + 6 * np.log10(r["delta"] / min(x["delta"] for x in rows) + 1) * 6
                    for r in rs
                ],
                color=f"C{k}",
                alpha=0.75,
                label=f"width {w}",
            )
        ax.set(xlabel="log marginal likelihood / N", ylabel=f"test NLL ({label})")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize="small", title="marker size ~ log delta")
    scatter_path = out / "evidence_vs_nll.png"
    fig.savefig(scatter_path, dpi=110)
    return [grid_path, scatter_path]


def main(argv: Sequence[str] | None = None) -> dict:
    """Run the study; return the aggregated results."""
    p = C.make_parser(STUDY, __doc__.split("\n")[0], default_seeds=range(3))
    p.add_argument("--widths", type=int, nargs="+", default=[8, 16, 32, 64, 128])
    p.add_argument("--priors", type=float, nargs="+", default=[0.01, 0.1, 1.0, 10.0, 100.0])
    p.add_argument("--epochs", type=int, default=500, help="full-batch Adam steps per model")
    args = p.parse_args(argv)
    seeds = C.setup(args)
    widths, priors, epochs = args.widths, args.priors, args.epochs
    if args.quick:
        widths, priors, epochs = [8, 32], [0.1, 10.0], 150
    config = {
        "seeds": seeds,
        "quick": args.quick,
        "widths": widths,
        "priors": priors,
        "epochs": epochs,
        "model": "MLP 64-width-10, tanh",
        "fisher": "exact",
        "curvature": "kfac",
        "predictive": "glm probit",
    }
    rows, scores = [], []
    for seed in seeds:
        C.log(f"[model_selection] seed {seed}")
        seed_rows = run_seed(seed, widths, priors, epochs)
        rows += seed_rows
        scores.append({"seed": seed, **selection_scores(seed_rows)})
    metric_keys = ["n_params", "log_marglik", "nll_la", "nll_map", "acc_la", "acc_map"]
    summary = C.aggregate(rows, ["width", "delta"], metric_keys)
    score_keys = [k for k in scores[0] if k != "seed"]
    score_summary = C.aggregate([{"all": "all", **s} for s in scores], ["all"], score_keys)[0]
    figs = _figures(summary, rows, args.out)
    grid_table = C.markdown_table(
        summary,
        [
            "width",
            "delta",
            ("n_params", "P"),
            ("log_marglik", "log p(D)/N"),
            ("nll_la", "test NLL (LA)"),
            ("nll_map", "test NLL (MAP)"),
            ("acc_la", "acc (LA)"),
            ("acc_map", "acc (MAP)"),
        ],
        digits={"n_params": 0, "delta": 2},
    )
    sel_rows = [
        {
            "predictive": name,
            "spearman": score_summary[f"spearman_{key}"],
            "selected": score_summary[f"selected_{key}"],
            "best": score_summary[f"best_{key}"],
            "regret": score_summary[f"regret_{key}"],
            "rank": score_summary[f"rank_{key}"],
        }
        for name, key in (("Laplace GLM", "nll_la"), ("MAP", "nll_map"))
    ]
    sel_table = C.markdown_table(
        sel_rows,
        [
            "predictive",
            ("spearman", "Spearman(evidence, -test NLL)"),
            ("selected", "test NLL of max-evidence model"),
            ("best", "best test NLL on grid"),
            ("regret", "regret"),
            ("rank", f"rank of selected (of {len(widths) * len(priors)})"),
        ],
        digits={"rank": 1},
    )
    picks = ", ".join(
        f"seed {s['seed']}: width {s['selected_width']}, delta {s['selected_delta']:g}"
        for s in scores
    )
    md, js = C.write_results(
        args.out,
        STUDY,
        "Model selection on digits: Laplace evidence vs test NLL",
        [
            ("Does the evidence pick a good model?", sel_table + f"\n\nSelected: {picks}."),
            ("Grid (mean ± std over seeds)", grid_table),
            (
                "Notes",
                "Evidence: KFAC Laplace log marginal likelihood per training point at the "
                "training prior precision. Spearman correlations are computed per seed over the "
                "grid and then averaged. Figures: `evidence_grid.png`, `evidence_vs_nll.png`.",
            ),
        ],
        {
            "selection": score_summary,
            "per_seed": scores,
            "summary": summary,
            "rows": rows,
            "figures": [f.name for f in figs],
        },
        config,
    )
    C.log(f"[model_selection] wrote {md} and {js}")
    return {"summary": summary, "selection": score_summary, "out": args.out}


if __name__ == "__main__":
    main()
