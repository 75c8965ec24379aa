"""Marginal-likelihood training vs post-hoc evidence tuning vs laplace-torch's marglik_training.

Digits MLP 64-128-128-10 (ReLU), standardised pixels. Methods:

* ``MAP``: Adam (lr 1e-3, batch 64) with weight decay ``--weight-decay``;
* ``post-hoc KFAC``: that MAP, KFAC Laplace, prior per layer tuned by the evidence afterwards;
* ``marglik KFAC`` (this library, :func:`laplace_kron.marglik_training`): the same network
  trained together with its per-layer prior precisions (burn-in 10 epochs, a KFAC refit every 5);
* ``laplace-torch`` (``laplace.marglik_training``, its defaults: Kron GGN by ASDL, layer-wise prior,
  a refit every epoch with 10 Adam steps on the hyperparameters), when laplace-torch imports.

All Laplace predictives are GLM with the probit link. Test sets: the digits test split, the test
digits rotated by 30 and 60 degrees (shift), and the test digits with a fixed random permutation
of their pixels (OOD; AUROC of the max probability). Same epochs, data and initialisation for all.
Outputs (``--out``): ``marglik_training.md`` / ``.json``.

    python experiments/marglik_training.py            # full: 100 epochs, 3 seeds
    python experiments/marglik_training.py --quick    # smoke mode
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

try:
    from . import _common as C
except ImportError:  # run as a script
    import _common as C

import laplace_kron as lk
from laplace_kron import metrics
from laplace_kron.datasets import load_digits_split, make_loader, rotate_images, train_map

STUDY = "marglik_training"
ANGLES = (30, 60)


def digits_mlp() -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10)
    )


def _test_sets(data: dict, seed: int) -> dict[str, Tensor]:
    x = data["x_test"]
    flat = {"test": x.reshape(len(x), -1)}
    for a in ANGLES:
        flat[f"rot{a}"] = rotate_images(x, a).reshape(len(x), -1)
    perm = torch.randperm(64, generator=torch.Generator().manual_seed(seed))
    flat["permuted"] = flat["test"][:, perm]
    return flat


def _evaluate(name: str, seed: int, predict, sets: dict, y: Tensor, seconds: float) -> dict:
    with torch.no_grad():
        p = {k: predict(v) for k, v in sets.items()}
    row = {"seed": seed, "method": name, "seconds": seconds}
    row.update(metrics.classification_report(p["test"], y))
    for a in ANGLES:
        row[f"acc_rot{a}"] = metrics.accuracy(p[f"rot{a}"], y)
        row[f"nll_rot{a}"] = metrics.nll(p[f"rot{a}"], y)
        row[f"ece_rot{a}"] = metrics.ece(p[f"rot{a}"], y)
    row["auroc_permuted"] = metrics.ood_auroc(p["test"], p["permuted"])
    C.log(
        f"  seed {seed} {name:>15}: acc {row['accuracy']:.3f} nll {row['nll']:.3f} "
        f"ece {row['ece']:.3f} | rot30 nll {row['nll_rot30']:.3f} | "
        f"auroc {row['auroc_permuted']:.3f} | {seconds:.1f}s"
    )
    return row


def _laplace_torch(model, loader, epochs: int):
    try:
        from laplace.marglik_training import marglik_training
    except Exception as e:  # noqa: BLE001 - laplace-torch's imports may fail next to this torch
        C.log(f"  laplace-torch unavailable ({type(e).__name__}: {e}); skipped")
        return None
    la, model, _, _ = marglik_training(
        model,
        loader,
        likelihood="classification",
        hessian_structure="kron",
        n_epochs=epochs,
        optimizer_kwargs={"lr": 1e-3},
    )

    def predict(x: Tensor) -> Tensor:
        with torch.enable_grad():
            return la(x, pred_type="glm", link_approx="probit").detach()

    return predict


def run_seed(seed: int, args) -> list[dict]:
    data = load_digits_split(seed=seed, image=True, standardize=True)
    x_train = data["x_train"].reshape(len(data["x_train"]), -1)
    y_train, y = data["y_train"], data["y_test"]
    sets = _test_sets(data, seed)
    loader = make_loader(x_train, y_train, batch_size=64, seed=seed)
    fit_loader = make_loader(x_train, y_train, batch_size=256, shuffle=False)
    rows = []

    C.seed_everything(seed)
    model = digits_mlp()
    with C.Timer() as t_map:
        train_map(model, loader, epochs=args.epochs, lr=1e-3, weight_decay=args.weight_decay)
    rows.append(
        _evaluate("MAP", seed, lambda x: torch.softmax(model(x), -1), sets, y, t_map.seconds)
    )
    with C.Timer() as t:
        la = lk.KronLaplace(model, "classification", fisher="exact").fit(fit_loader)
        la.optimize_prior_precision(granularity="layer")
    rows.append(_evaluate("post-hoc KFAC", seed, la.predict, sets, y, t_map.seconds + t.seconds))

    C.seed_everything(seed)
    model = digits_mlp()
    with C.Timer() as t:
        la, report = lk.marglik_training(
            model,
            loader,
            "classification",
            n_epochs=args.epochs,
            lr=1e-3,
            n_epochs_burnin=min(10, args.epochs - 1),
            marglik_frequency=5,
            fisher="exact",
        )
    rows.append(_evaluate("marglik KFAC", seed, la.predict, sets, y, t.seconds))
    rows[-1]["prior_precision"] = report["refits"][-1]["prior_precision"]

    if not args.no_laplace_torch:
        C.seed_everything(seed)
        model = digits_mlp()
        with C.Timer() as t:
            predict = _laplace_torch(model, loader, args.epochs)
        if predict is not None:
            rows.append(_evaluate("laplace-torch", seed, predict, sets, y, t.seconds))
    return rows


def main(argv=None) -> None:
    p = C.make_parser(STUDY, __doc__.splitlines()[0], default_seeds=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--no-laplace-torch", action="store_true", help="skip the laplace-torch run")
    args = p.parse_args(argv)
    seeds = C.setup(args)
    if args.quick:
        args.epochs = 3
    rows = [r for s in seeds for r in run_seed(s, args)]
    keys = ["accuracy", "nll", "ece"]
    keys += [f"{m}_rot{a}" for a in ANGLES for m in ("acc", "nll", "ece")]
    keys += ["auroc_permuted", "seconds"]
    table = C.aggregate(rows, ["method"], keys)
    cols = [("method", "method"), ("accuracy", "Acc"), ("nll", "NLL"), ("ece", "ECE")]
    cols += [
        (f"{m}_rot{a}", f"{h}@{a}°")
        for a in ANGLES
        for m, h in (("acc", "Acc"), ("nll", "NLL"), ("ece", "ECE"))
    ]
    cols += [("auroc_permuted", "AUROC perm."), ("seconds", "time (s)")]
    md, _ = C.write_results(
        args.out,
        STUDY,
        "Marginal-likelihood training on the digits MLP",
        [("Results (mean ± std over seeds)", C.markdown_table(table, cols, digits={"seconds": 1}))],
        {"rows": rows, "summary": table},
        vars(args),
    )
    C.log(md.read_text())


if __name__ == "__main__":
    main()
