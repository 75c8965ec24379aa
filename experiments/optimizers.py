"""Optimizers on digits: SGD, Adam, KFAC and EKFAC preconditioners (issue 17, item 3a).

Models: the digits MLP 64-128-128-10 (ReLU, flat standardised pixels) and the digits CNN of
``_digits.digits_cnn`` (standardised 8x8 images). Optimizers (batch 64, constant learning rate, no
weight decay, mean cross-entropy):

* ``SGD``: SGD with momentum 0.9; ``Adam``: ``torch.optim.Adam``;
* ``KFAC``, ``EKFAC``, ``EKFAC-RA``: :mod:`laplace_kron.optim` preconditioners (``ra=False`` /
  ``ra=True`` for EKFAC, eigenbasis refreshed every ``--update-freq`` steps) in front of SGD with
  momentum 0.9: ``loss.backward(); precond.step(); opt.step()``;
* CNN only: ``KFAC-SUA``, ``EKFAC-SUA`` (spatially uncorrelated activations for the convolutions).

Protocol: each optimizer's learning rate (and ``eps`` for the preconditioners) is tuned on a small
grid with one run (first seed) by the validation loss averaged over the epochs (``--select mean``:
the area under the validation curve, which rewards early progress as well as the end point; or
``--select final``); then every seed trains with the chosen settings and is evaluated on the test
split after every epoch. Timing covers each epoch's training steps only (evaluation excluded),
with ``--threads`` torch threads, as wall clock and as CPU time of the process (the latter is not
inflated by other load on a shared machine). Reported per optimizer: final test loss and accuracy,
seconds per epoch, and the epochs and seconds until the loss on the whole training split first
falls below ``--target`` (checked at the end of each epoch).
Outputs (``--out``): ``optimizers.md`` / ``.json`` (every tuning run and every per-seed curve),
``test_loss_vs_epoch.png``, ``test_loss_vs_time.png``.

    python experiments/optimizers.py --threads 1     # full: 3 seeds, tuning grid, ~15 min
    python experiments/optimizers.py --quick         # smoke mode
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

try:
    from . import _common as C
    from ._digits import digits_cnn
except ImportError:  # run as a script
    import _common as C
    from _digits import digits_cnn

from laplace_kron.datasets import load_digits_split, make_loader
from laplace_kron.optim import EKFAC, KFAC

STUDY = "optimizers"
ARCHS = ("mlp", "cnn")
BATCH = 64
MOMENTUM = 0.9
EARLY = (1, 3)  # the table also shows the test loss after these epochs (early progress)


class Optimizer(NamedTuple):
    """A compared optimizer: ``kind`` in sgd / adam / kfac / ekfac, and the preconditioner flags.
    (A NamedTuple, not a dataclass: the smoke test imports this file without registering it in
    ``sys.modules``, which dataclasses need.)"""

    name: str
    kind: str
    sua: bool = False
    ra: bool = False

    @property
    def preconditioned(self) -> bool:
        return self.kind in ("kfac", "ekfac")


OPTIMIZERS = [
    Optimizer("SGD", "sgd"),
    Optimizer("Adam", "adam"),
    Optimizer("KFAC", "kfac"),
    Optimizer("EKFAC", "ekfac"),
    Optimizer("EKFAC-RA", "ekfac", ra=True),
    Optimizer("KFAC-SUA", "kfac", sua=True),
    Optimizer("EKFAC-SUA", "ekfac", sua=True),
]
PER_ARCH = {
    "mlp": ["SGD", "Adam", "KFAC", "EKFAC", "EKFAC-RA"],
    "cnn": ["SGD", "Adam", "KFAC", "EKFAC", "EKFAC-RA", "KFAC-SUA", "EKFAC-SUA"],
}
# Tuning grids (learning rates per kind; eps for the preconditioners).
LR_GRID = {
    "sgd": [0.01, 0.03, 0.1],
    "adam": [1e-3, 3e-3, 1e-2, 3e-2],
    "kfac": [3e-3, 0.01, 0.03, 0.1],
    "ekfac": [3e-3, 0.01, 0.03, 0.1],
}
EPS_GRID = [1e-2, 1e-1, 1.0]
QUICK_SETTINGS = {
    "sgd": (0.1, None),
    "adam": (3e-3, None),
    "kfac": (0.01, 0.1),
    "ekfac": (0.01, 0.1),
}


def make_model(arch: str) -> nn.Module:
    if arch == "mlp":
        return C.mlp(64, 10, width=128, depth=2, act=nn.ReLU)
    return digits_cnn(10)


def load_data(arch: str, seed: int, limit: int | None = None) -> dict[str, Tensor]:
    data = load_digits_split(seed=seed, image=arch == "cnn", standardize=True)
    if limit is not None:  # smoke mode: a slice of every split
        data = {k: v[:limit] if isinstance(v, Tensor) else v for k, v in data.items()}
    return data


@torch.no_grad()
def evaluate(model: nn.Module, x: Tensor, y: Tensor) -> tuple[float, float]:
    """Mean cross-entropy and accuracy (eval mode, no recording by the preconditioners)."""
    model.eval()
    logits = C.predict_logits(model, x)
    return float(F.cross_entropy(logits, y)), float((logits.argmax(-1) == y).float().mean())


def train(
    arch: str,
    opt_spec: Optimizer,
    lr: float,
    eps: float | None,
    data: dict[str, Tensor],
    seed: int,
    epochs: int,
    split: str,
    update_freq: int,
) -> dict:
    """Train one model; after every epoch record the whole-training-split loss and the loss and
    accuracy on ``split`` ("val" or "test"), and the seconds the epoch's steps took."""
    C.seed_everything(seed)
    model = make_model(arch)
    loader = make_loader(data["x_train"], data["y_train"], BATCH, seed=seed)
    if opt_spec.kind == "adam":
        opt: torch.optim.Optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=MOMENTUM)
    precond = None
    if opt_spec.kind == "kfac":
        precond = KFAC(model, eps=eps, sua=opt_spec.sua, update_freq=update_freq)
    elif opt_spec.kind == "ekfac":
        precond = EKFAC(model, eps=eps, sua=opt_spec.sua, ra=opt_spec.ra, update_freq=update_freq)
    keys = ("train_loss", "loss", "accuracy", "seconds", "cpu_seconds")
    hist: dict[str, list[float]] = {k: [] for k in keys}
    diverged = False
    try:
        for _ in range(epochs):
            model.train()
            # timed: the epoch's training steps only (evaluation excluded)
            wall0, cpu0 = time.perf_counter(), time.process_time()
            for xb, yb in loader:
                opt.zero_grad(set_to_none=True)
                loss = F.cross_entropy(model(xb), yb)
                if not torch.isfinite(loss):
                    diverged = True
                    break
                loss.backward()
                if precond is not None:
                    precond.step()
                opt.step()
            wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
            train_loss, _ = evaluate(model, data["x_train"], data["y_train"])
            loss_, acc = evaluate(model, data[f"x_{split}"], data[f"y_{split}"])
            if diverged or not math.isfinite(train_loss) or not math.isfinite(loss_):
                diverged = True
                break
            for k, v in zip(keys, (train_loss, loss_, acc, wall, cpu)):
                hist[k].append(v)
    except ValueError as e:  # the preconditioner refuses non-finite factors: a diverged run
        C.log(f"    diverged ({e})")
        diverged = True
    finally:
        if precond is not None:
            precond.remove()
    return {**hist, "diverged": diverged}


def tune(arch: str, spec: Optimizer, data: dict, seed: int, args) -> tuple[list[dict], dict]:
    """Every grid point's validation loss, final and averaged over the epochs (the area under the
    validation curve: rewards early progress and a good end alike); the chosen (lr, eps)
    minimises the one ``args.select`` names. Diverged runs count as ``inf``."""
    if args.quick:
        grid = [QUICK_SETTINGS[spec.kind]]
    else:
        eps_grid = EPS_GRID if spec.preconditioned else [None]
        grid = [(lr, eps) for lr in LR_GRID[spec.kind] for eps in eps_grid]
    rows = []
    for lr, eps in grid:
        with C.Timer() as t:
            epochs = args.epochs[ARCHS.index(arch)]
            h = train(arch, spec, lr, eps, data, seed, epochs, "val", args.update_freq)
        ok = not h["diverged"] and h["loss"]
        final = h["loss"][-1] if ok else float("inf")
        mean = float(np.mean(h["loss"])) if ok else float("inf")
        rows.append(
            {
                "arch": arch,
                "optimizer": spec.name,
                "lr": lr,
                "eps": eps,
                "val_loss": final,
                "val_loss_mean": mean,
                "val_accuracy": h["accuracy"][-1] if h["accuracy"] and not h["diverged"] else None,
                "seconds": t.seconds,
            }
        )
        C.log(
            f"  tune {arch} {spec.name:>9} lr {lr:g} eps {eps}: val loss final {final:.4f} "
            f"mean {mean:.4f}"
        )
    key = {"final": "val_loss", "mean": "val_loss_mean"}[args.select]
    best = min(rows, key=lambda r: r[key])
    if not math.isfinite(best[key]):
        raise RuntimeError(f"{arch} {spec.name}: every grid point diverged; widen the grid")
    return rows, {"lr": best["lr"], "eps": best["eps"]}


def first_below(values: list[float], target: float) -> int | None:
    """Index (0-based epoch) of the first value <= target, or None."""
    return next((i for i, v in enumerate(values) if v <= target), None)


def run_row(arch: str, spec: Optimizer, chosen: dict, seed: int, args) -> dict:
    data = load_data(arch, seed, args.limit)
    epochs = args.epochs[ARCHS.index(arch)]
    h = train(arch, spec, chosen["lr"], chosen["eps"], data, seed, epochs, "test", args.update_freq)
    cum = np.cumsum(h["seconds"]).tolist()
    cum_cpu = np.cumsum(h["cpu_seconds"]).tolist()
    target = args.target[ARCHS.index(arch)]
    i = first_below(h["train_loss"], target)
    row = {
        "arch": arch,
        "optimizer": spec.name,
        "seed": seed,
        **chosen,
        "diverged": h["diverged"],
        "test_loss": h["loss"][-1] if h["loss"] else float("nan"),
        "test_accuracy": h["accuracy"][-1] if h["accuracy"] else float("nan"),
        "train_loss": h["train_loss"][-1] if h["train_loss"] else float("nan"),
        "sec_per_epoch": float(np.mean(h["seconds"])) if h["seconds"] else float("nan"),
        "cpu_sec_per_epoch": float(np.mean(h["cpu_seconds"])) if h["seconds"] else float("nan"),
        "target": target,
        **{
            f"test_loss_epoch{e}": h["loss"][e - 1] if len(h["loss"]) >= e else float("nan")
            for e in EARLY
        },
        "epochs_to_target": float(i + 1) if i is not None else float("nan"),
        "seconds_to_target": cum[i] if i is not None else float("nan"),
        "cpu_seconds_to_target": cum_cpu[i] if i is not None else float("nan"),
        "reached": i is not None,
        "curve_test_loss": h["loss"],
        "curve_test_accuracy": h["accuracy"],
        "curve_train_loss": h["train_loss"],
        "curve_seconds": cum,
        "curve_cpu_seconds": cum_cpu,
    }
    C.log(
        f"  {arch} {spec.name:>9} seed {seed}: test loss {row['test_loss']:.4f} "
        f"acc {row['test_accuracy']:.4f} | {row['sec_per_epoch']:.3f} s/epoch "
        f"({row['cpu_sec_per_epoch']:.3f} CPU) | "
        f"target {target} at epoch {row['epochs_to_target']} ({row['seconds_to_target']:.2f} s)"
    )
    return row


def _curves(rows: list[dict], key: str) -> np.ndarray:
    """``[seeds, epochs]``, cut to the shortest run (a diverged run stops early)."""
    n = min(len(r[key]) for r in rows)
    return np.asarray([r[key][:n] for r in rows], dtype=np.float64)


XLABELS = {
    None: "epoch",
    "curve_seconds": "training time (s, wall clock)",
    "curve_cpu_seconds": "training time (s, CPU time of the process)",
}


def plot_curves(rows: list[dict], archs: list[str], x_key: str | None, path: Path) -> Path:
    """Test loss (mean over seeds, min-max band) against epochs (``x_key=None``) or against
    cumulative training seconds (``x_key="curve_seconds"`` wall clock, ``"curve_cpu_seconds"`` CPU
    time of the process; mean over seeds); one panel per model."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.2 * len(archs), 4.0), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(archs), squeeze=False)[0]
    for ax, arch in zip(axes, archs):
        for spec in OPTIMIZERS:
            rs = [r for r in rows if r["arch"] == arch and r["optimizer"] == spec.name]
            rs = [r for r in rs if r["curve_test_loss"]]
            if not rs:
                continue
            loss = _curves(rs, "curve_test_loss")
            mean = loss.mean(0)
            if x_key is None:
                xs = np.arange(1, len(mean) + 1)
            else:
                xs = _curves(rs, x_key).mean(0)[: len(mean)]
            k = [s.name for s in OPTIMIZERS].index(spec.name)
            style = "--" if spec.sua else ("-." if spec.ra else "-")
            ax.plot(xs, mean, style, color=f"C{k}", label=spec.name, lw=1.6)
            ax.fill_between(xs, loss.min(0), loss.max(0), color=f"C{k}", alpha=0.12, lw=0)
        ax.set_yscale("log")
        ax.set_title({"mlp": "digits MLP 64-128-128-10", "cnn": "digits CNN"}[arch])
        ax.set_xlabel(XLABELS[x_key])
        ax.set_ylabel("test loss (cross-entropy)")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize="small")
    fig.suptitle("test loss: mean over seeds, shaded from the lowest to the highest seed")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def main(argv=None) -> list[dict]:
    p = C.make_parser(STUDY, __doc__.splitlines()[0], default_seeds=[0, 1, 2])
    p.add_argument("--archs", nargs="+", default=list(ARCHS), choices=ARCHS)
    p.add_argument("--optimizers", nargs="+", default=None, help="subset of the optimizer names")
    p.add_argument(
        "--epochs",
        type=int,
        nargs=2,
        default=[30, 20],
        metavar=("MLP", "CNN"),
        help="epochs of every run (tuning and per-seed) for the MLP and the CNN",
    )
    p.add_argument("--update-freq", type=int, default=10, help="eigenbasis refresh every N steps")
    p.add_argument(
        "--select",
        choices=["mean", "final"],
        default="mean",
        help="tuning criterion: validation loss averaged over the epochs, or the last epoch's",
    )
    p.add_argument(
        "--clock",
        choices=["cpu", "wall"],
        default="cpu",
        help="time axis of test_loss_vs_time.png: CPU time of the process (robust to other load "
        "on the machine; equals wall time for --threads 1 on an idle core) or wall clock",
    )
    p.add_argument(
        "--target",
        type=float,
        nargs=2,
        default=[0.05, 0.05],
        metavar=("MLP", "CNN"),
        help="training-loss target (whole training split) for the MLP and the CNN",
    )
    args = p.parse_args(argv)
    seeds = C.setup(args)
    args.limit = None
    if args.quick:
        args.epochs, args.limit = [2, 2], 300
    names = {s.name for s in OPTIMIZERS}
    if args.optimizers is not None and set(args.optimizers) - names:
        raise ValueError(f"unknown optimizers {sorted(set(args.optimizers) - names)}: {names}")

    tuning, chosen, rows = [], {}, []
    with C.Timer() as total:
        for arch in args.archs:
            specs = [s for s in OPTIMIZERS if s.name in PER_ARCH[arch]]
            if args.optimizers is not None:
                specs = [s for s in specs if s.name in args.optimizers]
            data = load_data(arch, seeds[0], args.limit)
            for spec in specs:
                t_rows, best = tune(arch, spec, data, seeds[0], args)
                tuning += t_rows
                chosen[f"{arch}/{spec.name}"] = best
                C.log(f"  chosen {arch} {spec.name}: {best}")
                rows += [run_row(arch, spec, best, s, args) for s in seeds]

    metrics = [
        *(f"test_loss_epoch{e}" for e in EARLY),
        "test_loss",
        "test_accuracy",
        "train_loss",
        "sec_per_epoch",
        "cpu_sec_per_epoch",
        "epochs_to_target",
        "seconds_to_target",
        "cpu_seconds_to_target",
    ]
    summary = C.aggregate(rows, ["arch", "optimizer"], metrics)
    for s in summary:
        rs = [r for r in rows if r["arch"] == s["arch"] and r["optimizer"] == s["optimizer"]]
        c = chosen[f"{s['arch']}/{s['optimizer']}"]
        s["lr"] = f"{c['lr']:g}"
        s["eps"] = "–" if c["eps"] is None else f"{c['eps']:g}"
        s["reached"] = f"{sum(r['reached'] for r in rs)}/{len(rs)}"
    cols = [
        ("optimizer", "optimizer"),
        ("lr", "lr"),
        ("eps", "eps"),
        *((f"test_loss_epoch{e}", f"test loss, epoch {e}") for e in EARLY),
        ("test_loss", "test loss, final"),
        ("test_accuracy", "test acc."),
        ("cpu_sec_per_epoch", "CPU s / epoch"),
        ("sec_per_epoch", "wall s / epoch"),
        ("reached", "reached target"),
        ("epochs_to_target", "epochs to target"),
        ("cpu_seconds_to_target", "CPU s to target"),
        ("seconds_to_target", "wall s to target"),
    ]
    digits = {
        **{f"test_loss_epoch{e}": 3 for e in EARLY},
        "test_loss": 4,
        "train_loss": 4,
        "epochs_to_target": 1,
        "seconds_to_target": 2,
        "cpu_seconds_to_target": 2,
    }
    sections = []
    for arch in args.archs:
        target = args.target[ARCHS.index(arch)]
        table = C.markdown_table([s for s in summary if s["arch"] == arch], cols, digits)
        heading = (
            f"{arch.upper()}: after {args.epochs[ARCHS.index(arch)]} epochs (mean ± std over {len(seeds)} seeds; "
            f"target training loss {target})"
        )
        sections.append((heading, table))
    tune_cols = [
        ("arch", "model"),
        ("optimizer", "optimizer"),
        ("lr", "lr"),
        ("eps", "eps"),
        ("val_loss_mean", "val loss (mean over epochs)"),
        ("val_loss", "val loss (final)"),
        ("seconds", "s"),
    ]
    t_table = C.markdown_table(
        [
            {**r, "lr": f"{r['lr']:g}", "eps": "–" if r["eps"] is None else f"{r['eps']:g}"}
            for r in tuning
        ],
        tune_cols,
        {"val_loss": 4, "val_loss_mean": 4, "seconds": 1},
    )
    crit = {"mean": "mean over the epochs", "final": "final"}[args.select]
    sections.append(
        (f"Tuning (seed {seeds[0]}, same epochs; chosen by the {crit} validation loss)", t_table)
    )
    sections.append(("", f"Total run time: {total.seconds:.0f} s."))
    figs = [
        plot_curves(rows, args.archs, None, args.out / "test_loss_vs_epoch.png"),
        plot_curves(
            rows,
            args.archs,
            {"cpu": "curve_cpu_seconds", "wall": "curve_seconds"}[args.clock],
            args.out / "test_loss_vs_time.png",
        ),
    ]
    config = {k: v for k, v in vars(args).items() if k != "limit"}
    md, _ = C.write_results(
        args.out,
        STUDY,
        "Optimizers on digits: SGD, Adam, KFAC, EKFAC",
        sections,
        {
            "summary": summary,
            "chosen": chosen,
            "tuning": tuning,
            "rows": rows,
            "figures": [f.name for f in figs],
            "total_seconds": total.seconds,
        },
        {**config, "lr_grid": LR_GRID, "eps_grid": EPS_GRID, "batch": BATCH, "momentum": MOMENTUM},
    )
    C.log(md.read_text())
    return summary


if __name__ == "__main__":
    main()
