"""Calibration under dataset shift on digits: MAP vs Laplace (KFAC / EKFAC / last layer, GLM vs NN
sampling) vs temperature scaling, on test digits rotated by 0..180 degrees.

Per seed: a stratified 70 / 10 / 20 train / validation / test split of scikit-learn's digits, a small
CNN trained to the MAP, then every method of ``experiments/_digits.py`` (Laplace prior tuned by the
marginal likelihood per layer, temperature and the "val prior" variant on the validation set). The
test images are rotated with :func:`laplace_kron.datasets.rotate_images`; accuracy, NLL, ECE (15
bins) and Brier score are recorded per angle. Tables give mean ± std over seeds: in distribution
(0 degrees), averaged over the shifted angles, and per angle.

Outputs (``--out``): ``calibration_shift.md`` / ``.json``; ``accuracy_vs_angle.png``,
``ece_vs_angle.png``, ``nll_vs_angle.png`` (mean ± std over seeds); ``reliability_0deg.png`` and
``reliability_<a>deg.png`` (first seed).

    python experiments/calibration_shift.py            # full: 3 seeds, angles 0, 30, ..., 180
    python experiments/calibration_shift.py --quick    # smoke mode
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

try:
    from . import _common as C
    from . import _digits as D
except ImportError:  # run as a script
    import _common as C
    import _digits as D

from laplace_kron import metrics, plots
from laplace_kron.datasets import load_digits_split, rotate_images

STUDY = "calibration_shift"
METRICS = ["accuracy", "nll", "ece", "brier"]
RELIABILITY_METHODS = ["MAP", "Temp. scaling", "KFAC GLM", "LL-KFAC GLM"]


def run_seed(
    seed: int,
    angles: list[float],
    epochs: int,
    weight_decay: float,
    n_samples: int,
    chosen: list[D.Method],
) -> tuple[list[dict], dict, dict]:
    data = load_digits_split(seed, val_fraction=0.1, test_fraction=0.2)
    with C.Timer() as t:
        model = D.train_cnn(data["x_train"], data["y_train"], 10, seed, epochs, weight_decay)
    C.log(f"  seed {seed}: MAP trained in {t.seconds:.1f}s")
    preds, info = D.build_predictors(model, data, chosen, n_samples, seed)
    rows, probs_for_plots = [], {}
    y = data["y_test"]
    for angle in angles:
        x = rotate_images(data["x_test"], angle)
        for m in chosen:
            with C.Timer() as t:
                p = preds[m.name](x)
            rows.append(
                {
                    "seed": seed,
                    "method": m.name,
                    "angle": angle,
                    **metrics.classification_report(p, y),
                    "predict_seconds": t.seconds,
                }
            )
            if m.name in RELIABILITY_METHODS:
                probs_for_plots[(angle, m.name)] = p
        C.log(
            f"  seed {seed} angle {angle:5.1f}: "
            + ", ".join(f"{r['method']} ECE {r['ece']:.3f}" for r in rows[-len(chosen) :])
        )
    return rows, info, {"probs": probs_for_plots, "y": y}


def per_angle_table(summary: list[dict], names: list[str], angles: list[float], key: str) -> str:
    table = []
    for name in names:
        row = {"method": name}
        for r in summary:
            if r["method"] == name:
                row[f"{r['angle']:g}°"] = r[key]
        table.append(row)
    return C.markdown_table(table, ["method", *[f"{a:g}°" for a in angles]])


def main(argv: Sequence[str] | None = None) -> dict:
    """Run the study; return the aggregated results."""
    p = C.make_parser(STUDY, __doc__.split("\n")[0], default_seeds=range(3))
    p.add_argument("--angles", type=float, nargs="+", default=[float(a) for a in range(0, 181, 30)])
    p.add_argument("--epochs", type=int, default=30, help="MAP training epochs")
    p.add_argument("--weight-decay", type=float, default=5e-4, help="MAP training weight decay")
    p.add_argument("--n-samples", type=int, default=30, help="posterior samples of NN sampling")
    p.add_argument("--methods", nargs="+", default=None, help="subset of method names")
    args = p.parse_args(argv)
    seeds = C.setup(args)
    angles, epochs, n_samples = args.angles, args.epochs, args.n_samples
    if args.quick:
        angles, epochs, n_samples = [0.0, 90.0], 5, 5
    chosen = D.methods(args.quick, args.methods)
    names = [m.name for m in chosen]
    config = {
        "seeds": seeds,
        "quick": args.quick,
        "angles": angles,
        "epochs": epochs,
        "weight_decay": args.weight_decay,
        "n_samples": n_samples,
        "methods": names,
        "model": "CNN conv16-conv32-pool-fc64-fc10 (ReLU)",
        "map_training": "datasets.train_map: Adam lr 3e-3, batch 64, cosine",
        "laplace": "exact Fisher, marglik prior per layer; GLM = probit link",
        "split": "digits 70/10/20 stratified",
    }
    rows, infos, first = [], [], None
    for seed in seeds:
        C.log(f"[calibration_shift] seed {seed}")
        seed_rows, info, plots_data = run_seed(
            seed, angles, epochs, args.weight_decay, n_samples, chosen
        )
        rows += seed_rows
        infos.append({"seed": seed, **info})
        first = first or plots_data
    summary = C.aggregate(rows, ["method", "angle"], METRICS)
    in_dist = [r for r in summary if r["angle"] == angles[0]]
    shifted_rows = []
    for seed in seeds:
        for name in names:
            rs = [r for r in rows if r["seed"] == seed and r["method"] == name and r["angle"] > 0]
            if rs:
                shifted_rows.append(
                    {"method": name, **{k: float(np.mean([r[k] for r in rs])) for k in METRICS}}
                )
    shifted = C.aggregate(shifted_rows, ["method"], METRICS) if shifted_rows else []
    figs = []
    for key, label in (("accuracy", "accuracy"), ("ece", "ECE"), ("nll", "NLL")):
        results = {}
        for name in names:
            rs = [r for r in summary if r["method"] == name]
            results[name] = (
                np.array([r[key]["mean"] for r in rs]),
                np.array([r[key]["std"] for r in rs]),
            )
        figs.append(
            plots.metric_vs_shift(
                angles,
                results,
                args.out / f"{key}_vs_angle.png",
                ylabel=f"test {label}",
                xlabel="rotation angle (degrees)",
                title=f"Rotated digits: {label} (mean ± std over {len(seeds)} seeds)",
            )
        )
    plot_angles = [angles[0]] + ([a for a in angles if a >= 60][:1] or angles[1:2])
    for a in plot_angles:
        panels = {
            n: first["probs"][(a, n)] for n in RELIABILITY_METHODS if (a, n) in first["probs"]
        }
        figs.append(
            plots.reliability_diagram(
                panels,
                first["y"],
                args.out / f"reliability_{a:g}deg.png",
                title=f"Reliability, test digits rotated by {a:g}° (seed {seeds[0]})",
            )
        )
    cols = ["method", "accuracy", "nll", "ece", "brier"]
    priors = "; ".join(
        f"{name}: {D.fmt_prior(infos[0][name]['prior_precision'])}"
        for name in names
        if "prior_precision" in infos[0][name]
    )
    temps = ", ".join(
        f"{i['Temp. scaling']['temperature']:.2f}" for i in infos if "Temp. scaling" in i
    )
    sections = [
        (f"In distribution ({angles[0]:g}°)", C.markdown_table(in_dist, cols)),
        ("Shifted: mean over the rotated angles", C.markdown_table(shifted, cols)),
        ("ECE per angle", per_angle_table(summary, names, angles, "ece")),
        ("NLL per angle", per_angle_table(summary, names, angles, "nll")),
        ("Accuracy per angle", per_angle_table(summary, names, angles, "accuracy")),
        (
            "Notes",
            f"Mean ± std over seeds {seeds}; 360 test digits per angle. Tuned prior precisions "
            f"(seed {seeds[0]}, per layer): {priors}. Temperatures: {temps}. "
            "Figures: " + ", ".join(f"`{f.name}`" for f in figs) + ".",
        ),
    ]
    md, js = C.write_results(
        args.out,
        STUDY,
        "Calibration under rotation shift on digits",
        sections,
        {
            "in_distribution": in_dist,
            "shifted": shifted,
            "summary": summary,
            "rows": rows,
            "tuning": infos,
            "figures": [f.name for f in figs],
        },
        config,
    )
    C.log(f"[calibration_shift] wrote {md} and {js}")
    return {"summary": summary, "in_distribution": in_dist, "shifted": shifted, "out": args.out}


if __name__ == "__main__":
    main()
