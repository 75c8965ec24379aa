"""Out-of-distribution detection on digits: AUROC of MAP vs Laplace vs temperature scaling.

In-distribution: the digits test split. Out-of-distribution sets (all shipped with scikit-learn,
scaled like the digits, :func:`laplace_kron.datasets.ood_digits_like`):

* ``patches``: 8x8 grayscale patches of scikit-learn's sample photographs (natural images);
* ``noise``: uniform pixel noise;
* ``held-out classes``: a second CNN trained on digits 0-4 only; in = test digits 0-4, OOD = test
  digits 5-9 (near OOD: same kind of images, unseen classes).

Methods as in ``experiments/_digits.py`` (MAP, temperature scaling, KFAC / EKFAC / last-layer
Laplace with GLM and NN-sampling predictives, marglik prior per layer). Scores: AUROC of the
max-probability and of the (negative) predictive entropy, mean ± std over seeds, and the mean
confidence on each set.

Outputs (``--out``): ``ood_detection.md`` / ``.json``, ``confidence_hist_patches.png`` and
``confidence_hist_heldout.png`` (first seed).

    python experiments/ood_detection.py            # full: 3 seeds, 500 OOD inputs per set
    python experiments/ood_detection.py --quick    # smoke mode
"""

from __future__ import annotations

from collections.abc import Sequence

try:
    from . import _common as C
    from . import _digits as D
except ImportError:  # run as a script
    import _common as C
    import _digits as D

from laplace_kron import metrics, plots
from laplace_kron.datasets import load_digits_split, ood_digits_like

STUDY = "ood_detection"
HIST_METHODS = ["MAP", "Temp. scaling", "KFAC GLM", "LL-KFAC GLM"]
SETS = ["patches", "noise", "held-out classes"]


def _scores(name: str, ood: str, seed: int, p_in, p_out, y_in) -> dict:
    return {
        "seed": seed,
        "method": name,
        "ood": ood,
        "auroc_maxprob": metrics.ood_auroc(p_in, p_out, score="max_prob"),
        "auroc_entropy": metrics.ood_auroc(p_in, p_out, score="entropy"),
        "conf_in": float(metrics.confidence(p_in).mean()),
        "conf_out": float(metrics.confidence(p_out).mean()),
        "acc_in": metrics.accuracy(p_in, y_in),
    }


def run_seed(
    seed: int,
    n_ood: int,
    epochs: int,
    weight_decay: float,
    n_samples: int,
    chosen: list[D.Method],
) -> tuple[list[dict], dict, dict]:
    rows, hists = [], {}
    data = load_digits_split(seed, val_fraction=0.1, test_fraction=0.2)
    model = D.train_cnn(data["x_train"], data["y_train"], 10, seed, epochs, weight_decay)
    preds, info = D.build_predictors(model, data, chosen, n_samples, seed)
    ood = ood_digits_like(n_ood, seed=seed)
    for m in chosen:
        p_in = preds[m.name](data["x_test"])
        for key in ("patches", "noise"):
            p_out = preds[m.name](ood[key])
            rows.append(_scores(m.name, key, seed, p_in, p_out, data["y_test"]))
            if key == "patches" and m.name in HIST_METHODS:
                hists.setdefault("patches", {})[m.name] = (p_in, p_out)
    C.log(f"  seed {seed}: patches / noise done")

    # held-out classes: train on 0-4, OOD = test digits 5-9
    keep = {s: data[f"y_{s}"] < 5 for s in ("train", "val", "test")}
    half = {f"{v}_{s}": data[f"{v}_{s}"][keep[s]] for s in keep for v in ("x", "y")}
    model5 = D.train_cnn(half["x_train"], half["y_train"], 5, seed, epochs, weight_decay)
    preds5, info5 = D.build_predictors(model5, half, chosen, n_samples, seed)
    x_out = data["x_test"][~keep["test"]]
    for m in chosen:
        p_in, p_out = preds5[m.name](half["x_test"]), preds5[m.name](x_out)
        rows.append(_scores(m.name, "held-out classes", seed, p_in, p_out, half["y_test"]))
        if m.name in HIST_METHODS:
            hists.setdefault("heldout", {})[m.name] = (p_in, p_out)
    C.log(f"  seed {seed}: held-out classes done")
    return rows, {"digits": info, "digits 0-4": info5}, hists


def main(argv: Sequence[str] | None = None) -> dict:
    """Run the study; return the aggregated results."""
    p = C.make_parser(STUDY, __doc__.split("\n")[0], default_seeds=range(3))
    p.add_argument("--n-ood", type=int, default=500, help="inputs per synthetic OOD set")
    p.add_argument("--epochs", type=int, default=30, help="MAP training epochs")
    p.add_argument("--weight-decay", type=float, default=5e-4, help="MAP training weight decay")
    p.add_argument("--n-samples", type=int, default=30, help="posterior samples of NN sampling")
    p.add_argument("--methods", nargs="+", default=None, help="subset of method names")
    args = p.parse_args(argv)
    seeds = C.setup(args)
    n_ood, epochs, n_samples = args.n_ood, args.epochs, args.n_samples
    if args.quick:
        n_ood, epochs, n_samples = 100, 5, 5
    chosen = D.methods(args.quick, args.methods)
    names = [m.name for m in chosen]
    config = {
        "seeds": seeds,
        "quick": args.quick,
        "n_ood": n_ood,
        "epochs": epochs,
        "weight_decay": args.weight_decay,
        "n_samples": n_samples,
        "methods": names,
        "model": "CNN conv16-conv32-pool-fc64-fc(C) (ReLU)",
        "laplace": "exact Fisher, marglik prior per layer; GLM = probit link",
    }
    rows, infos, first = [], [], None
    for seed in seeds:
        C.log(f"[ood_detection] seed {seed}")
        seed_rows, info, hists = run_seed(seed, n_ood, epochs, args.weight_decay, n_samples, chosen)
        rows += seed_rows
        infos.append({"seed": seed, **info})
        first = first or hists
    keys = ["auroc_maxprob", "auroc_entropy", "conf_in", "conf_out", "acc_in"]
    summary = C.aggregate(rows, ["method", "ood"], keys)

    def pivot(key: str) -> str:
        table = []
        for name in names:
            row = {"method": name}
            for r in summary:
                if r["method"] == name:
                    row[r["ood"]] = r[key]
            table.append(row)
        return C.markdown_table(table, ["method", *SETS])

    conf_table = []
    for name in names:
        rs = {r["ood"]: r for r in summary if r["method"] == name}
        conf_table.append(
            {
                "method": name,
                "test digits": rs["patches"]["conf_in"],
                "acc (digits)": rs["patches"]["acc_in"],
                "acc (0-4)": rs["held-out classes"]["acc_in"],
                **{s: rs[s]["conf_out"] for s in SETS},
            }
        )
    figs = [
        plots.confidence_histogram(
            first["patches"],
            None,
            args.out / "confidence_hist_patches.png",
            title=f"Confidence: test digits vs sample-image patches (seed {seeds[0]})",
        ),
        plots.confidence_histogram(
            first["heldout"],
            None,
            args.out / "confidence_hist_heldout.png",
            title=f"Confidence: digits 0-4 vs held-out digits 5-9 (seed {seeds[0]})",
        ),
    ]
    sections = [
        ("AUROC, max-probability score", pivot("auroc_maxprob")),
        ("AUROC, entropy score", pivot("auroc_entropy")),
        (
            "Mean confidence (max probability) and in-distribution accuracy",
            C.markdown_table(
                conf_table,
                ["method", "acc (digits)", "acc (0-4)", "test digits", *SETS],
            ),
        ),
        (
            "Notes",
            f"Mean ± std over seeds {seeds}. In-distribution: 360 test digits (about 180 for the "
            f"0-4 model); {n_ood} patches and {n_ood} noise images; held-out: about 180 test "
            "digits 5-9. Higher AUROC is better (0.5 = chance). Figures: "
            + ", ".join(f"`{f.name}`" for f in figs)
            + ".",
        ),
    ]
    md, js = C.write_results(
        args.out,
        STUDY,
        "Out-of-distribution detection on digits",
        sections,
        {"summary": summary, "rows": rows, "tuning": infos, "figures": [f.name for f in figs]},
        config,
    )
    C.log(f"[ood_detection] wrote {md} and {js}")
    return {"summary": summary, "out": args.out}


if __name__ == "__main__":
    main()
