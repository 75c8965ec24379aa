"""Continual learning on scikit-learn digits: fine-tuning vs EWC vs online KFAC / EKFAC Laplace.

Two task sequences (``--variant``):

* ``permuted`` (domain-incremental): every task is the full 10-class digits problem with its own
  fixed random pixel permutation; one shared 10-way head.
* ``split`` (task-incremental): classes (0, 1), (2, 3), ..., (8, 9); a multi-head MLP (one 2-way
  head per task, selected by the known task id).

Every method gets the same network, initialisation, data order, optimiser and epochs per task. The
loss on task ``t`` with ``N_t`` training points is ``mean CE + penalty / N_t`` (the penalty is on the
summed-NLL scale of :class:`laplace_kron.continual.OnlineLaplace`). The strength of each method is
chosen from a grid by the validation accuracy averaged over all tasks after the last task (mean over
seeds); the reported numbers are test accuracies of that strength. Outputs (``--out``):
``{variant}.json``, ``{variant}.md`` and ``{variant}.png`` (average accuracy over seen tasks after
each task, mean +- std over seeds).

    python experiments/continual_permuted_digits.py                  # full (both variants)
    python experiments/continual_permuted_digits.py --quick          # smoke mode, < 60 s
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import Tensor, nn

from laplace_kron.continual import OnlineLaplace

METHODS = {
    # name: (curvature or None for plain fine-tuning, extra OnlineLaplace kwargs)
    "finetune": (None, {}),
    "ewc": ("diag", {}),
    "kfac": ("kfac", {}),
    "ekfac": ("ekfac", {}),
    "kfac_merged": ("kfac", {"max_terms": 1}),
}
LABELS = {
    "finetune": "fine-tuning",
    "ewc": "EWC (diag)",
    "kfac": "online KFAC",
    "ekfac": "online EKFAC",
    "kfac_merged": "online KFAC, merged (max_terms=1)",
}


@dataclass
class Config:
    variant: str = "permuted"
    n_tasks: int = 10
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 4])
    methods: list[str] = field(
        default_factory=lambda: ["finetune", "ewc", "kfac", "ekfac", "kfac_merged"]
    )
    grid: list[float] = field(default_factory=lambda: [1, 3, 10, 30, 100, 300, 1000])
    hidden: int = 100
    epochs: int = 10
    batch_size: int = 32
    lr: float = 1e-3
    fisher: str = "mc"
    mc_samples: int = 1
    quick: bool = False


@dataclass
class Task:
    x_train: Tensor
    y_train: Tensor
    x_val: Tensor
    y_val: Tensor
    x_test: Tensor
    y_test: Tensor
    head: int  # index of the output head (always 0 for the permuted variant)


class MultiHeadMLP(nn.Module):
    """MLP trunk with ``n_heads`` heads of ``n_classes`` outputs stored as one ``nn.Linear``.

    ``forward`` returns the logits ``[B, n_classes]`` of the head :attr:`task` (set by the caller).
    """

    def __init__(self, d_in: int, hidden: int, n_classes: int, n_heads: int = 1):
        super().__init__()
        self.trunk = nn.Sequential(
            nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU()
        )
        self.head = nn.Linear(hidden, n_classes * n_heads)
        self.n_classes = n_classes
        self.task = 0

    def forward(self, x: Tensor) -> Tensor:
        out = self.head(self.trunk(x))
        c = self.n_classes
        return out[:, self.task * c : (self.task + 1) * c]


def make_tasks(variant: str, n_tasks: int, seed: int) -> list[Task]:
    """Digits scaled to [0, 1], split 60/20/20 (stratified, by ``seed``) into train/val/test."""
    X, y = load_digits(return_X_y=True)
    X = X.astype(np.float32) / 16.0
    idx = np.arange(len(y))
    tr, rest = train_test_split(idx, test_size=0.4, stratify=y, random_state=seed)
    va, te = train_test_split(rest, test_size=0.5, stratify=y[rest], random_state=seed)
    rng = np.random.default_rng(1000 + seed)
    tasks = []
    if variant == "permuted":
        for _ in range(n_tasks):
            perm = rng.permutation(X.shape[1])
            Xp = torch.from_numpy(X[:, perm])
            yt = torch.from_numpy(y).long()
            tasks.append(Task(Xp[tr], yt[tr], Xp[va], yt[va], Xp[te], yt[te], 0))
        return tasks
    if variant != "split":
        raise ValueError(f"unknown variant {variant!r}")
    if not 1 <= n_tasks <= 5:
        raise ValueError("split digits has at most 5 tasks (pairs of classes)")
    Xt, yt = torch.from_numpy(X), torch.from_numpy(y).long()
    for t in range(n_tasks):
        a, b = 2 * t, 2 * t + 1
        parts = []
        for split in (tr, va, te):
            s = torch.from_numpy(split)
            s = s[(yt[s] == a) | (yt[s] == b)]
            parts += [Xt[s], yt[s] - a]
        tasks.append(Task(*parts, head=t))
    return tasks


def accuracy(model: MultiHeadMLP, task: Task, split: str) -> float:
    x, y = getattr(task, f"x_{split}"), getattr(task, f"y_{split}")
    model.task = task.head
    with torch.no_grad():
        return float((model(x).argmax(-1) == y).float().mean())


def run_sequence(method: str, strength: float, tasks: list[Task], cfg: Config, seed: int) -> dict:
    """Train on ``tasks`` in order; return accuracy matrices ``acc[i][j]`` (task ``j <= i`` after
    training task ``i``) on the validation and test splits, and the wall-clock seconds."""
    curvature, extra = METHODS[method]
    torch.manual_seed(seed)
    n_heads = 1 if cfg.variant == "permuted" else len(tasks)
    n_classes = 10 if cfg.variant == "permuted" else 2
    model = MultiHeadMLP(tasks[0].x_train.shape[1], cfg.hidden, n_classes, n_heads).float()
    ol = None
    if curvature is not None:
        ol = OnlineLaplace(
            model,
            "classification",
            curvature=curvature,
            fisher=cfg.fisher,
            mc_samples=cfg.mc_samples,
            strength=strength,
            generator=torch.Generator().manual_seed(seed),
            **extra,
        )
    gen = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    val: list[list[float]] = []
    test: list[list[float]] = []
    for i, task in enumerate(tasks):
        model.task = task.head
        model.train()
        opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
        n = len(task.y_train)
        for _ in range(cfg.epochs):
            order = torch.randperm(n, generator=gen)
            for s in range(0, n, cfg.batch_size):
                b = order[s : s + cfg.batch_size]
                loss = F.cross_entropy(model(task.x_train[b]), task.y_train[b])
                if ol is not None and ol.num_tasks > 0:
                    loss = loss + ol.penalty(model) / n
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        model.eval()
        if ol is not None and i < len(tasks) - 1:
            batches = [
                (task.x_train[s : s + 256], task.y_train[s : s + 256]) for s in range(0, n, 256)
            ]
            ol.consolidate(batches)
        val.append([accuracy(model, tasks[j], "val") for j in range(i + 1)])
        test.append([accuracy(model, tasks[j], "test") for j in range(i + 1)])
    return {"val": val, "test": test, "seconds": time.perf_counter() - t0}


def _avg_curve(acc: list[list[float]]) -> list[float]:
    return [float(np.mean(row)) for row in acc]


def run(cfg: Config, log=print) -> dict:
    """All methods x strengths x seeds; choose strengths on validation; summarise test accuracy."""
    task_sets = {s: make_tasks(cfg.variant, cfg.n_tasks, s) for s in cfg.seeds}
    results: dict = {"config": asdict(cfg), "methods": {}}
    # Warm-up (lazy initialisation, allocator) so that the first timed sequence is not penalised.
    s0 = cfg.seeds[0]
    run_sequence("kfac", 1.0, task_sets[s0][:2], replace(cfg, epochs=1), s0)
    for method in cfg.methods:
        grid = [0.0] if METHODS[method][0] is None else [float(g) for g in cfg.grid]
        runs: dict[float, dict[int, dict]] = {}
        t0 = time.perf_counter()
        for strength in grid:
            runs[strength] = {
                s: run_sequence(method, strength, task_sets[s], cfg, s) for s in cfg.seeds
            }
            score = np.mean([_avg_curve(runs[strength][s]["val"])[-1] for s in cfg.seeds])
            log(f"[{cfg.variant}] {method:12s} strength={strength:<8g} val avg acc={score:.4f}")
        val_scores = {
            f"{st:g}": float(np.mean([_avg_curve(r[s]["val"])[-1] for s in cfg.seeds]))
            for st, r in runs.items()
        }
        best = max(runs, key=lambda st: val_scores[f"{st:g}"])
        curves = np.array([_avg_curve(runs[best][s]["test"]) for s in cfg.seeds])
        first = np.array([[row[0] for row in runs[best][s]["test"]] for s in cfg.seeds])
        results["methods"][method] = {
            "label": LABELS[method],
            "strength": best,
            "val_scores": val_scores,
            "avg_acc_mean": curves.mean(0).tolist(),
            "avg_acc_std": curves.std(0).tolist(),
            "task1_acc_mean": first.mean(0).tolist(),
            "task1_acc_std": first.std(0).tolist(),
            "test_acc_matrices": {str(s): runs[best][s]["test"] for s in cfg.seeds},
            "seconds": time.perf_counter() - t0,
            "seconds_per_sequence": float(np.mean([runs[best][s]["seconds"] for s in cfg.seeds])),
        }
    return results


def to_markdown(results: dict) -> str:
    cfg = results["config"]
    T = cfg["n_tasks"]
    seeds = len(cfg["seeds"])
    shown = list(range(T)) if T <= 6 else sorted({0, 1, T // 2 - 1, T - 1})
    head = "| method | strength | " + " | ".join(f"after task {t + 1}" for t in shown)
    head += " | task 1 at end | s / sequence |\n|---|---|" + "---|" * (len(shown) + 2) + "\n"
    rows = []
    for r in results["methods"].values():
        cells = [
            f"{100 * r['avg_acc_mean'][t]:.1f} ± {100 * r['avg_acc_std'][t]:.1f}" for t in shown
        ]
        t1 = f"{100 * r['task1_acc_mean'][-1]:.1f} ± {100 * r['task1_acc_std'][-1]:.1f}"
        strength = "–" if r["strength"] == 0.0 else f"{r['strength']:g}"
        sec = f"{r['seconds_per_sequence']:.1f}" if "seconds_per_sequence" in r else "–"
        rows.append(f"| {r['label']} | {strength} | " + " | ".join(cells) + f" | {t1} | {sec} |")
    title = (
        f"# Continual learning: {cfg['variant']} digits\n\n"
        + ("**Quick smoke mode: not a result.** " if cfg.get("quick") else "")
        + f"{T} tasks, {seeds} seeds: test accuracy (%) averaged over "
        f"the tasks seen so far (mean ± std over seeds); strength chosen on validation; "
        f"{cfg['epochs']} epochs per task, Adam lr {cfg['lr']}, MLP 64-{cfg['hidden']}-"
        f"{cfg['hidden']}-{'10' if cfg['variant'] == 'permuted' else '2 x heads'}, "
        f"fisher={cfg['fisher']!r}.\n\n"
    )
    finals = {
        m: np.array([np.mean(acc[-1]) for acc in r["test_acc_matrices"].values()])
        for m, r in results["methods"].items()
    }
    paired = ""
    for ref in ("finetune", "ewc"):
        if ref not in finals:
            continue
        paired += (
            f"\n\nFinal average accuracy minus {LABELS[ref]}'s, paired by seed (percentage points, "
            "mean ± std; seeds won / tied / lost):\n\n| method | difference | W / T / L |\n"
            "|---|---|---|"
        )
        for m, f in finals.items():
            if m == ref:
                continue
            d = 100 * (f - finals[ref])
            wtl = f"{(d > 1e-9).sum()} / {(abs(d) <= 1e-9).sum()} / {(d < -1e-9).sum()}"
            paired += f"\n| {LABELS[m]} | {d.mean():+.1f} ± {d.std():.1f} | {wtl} |"
    grid = sorted({float(k) for r in results["methods"].values() for k in r["val_scores"]} - {0.0})
    val = (
        "\n\nValidation accuracy (%) averaged over all tasks after the last one, per strength "
        "(mean over seeds; the selection criterion):\n\n| method | "
        + " | ".join(f"{g:g}" for g in grid)
        + " |\n|---|"
        + "---|" * len(grid)
        + "\n"
    )
    for r in results["methods"].values():
        if r["strength"] == 0.0:
            continue
        cells = [r["val_scores"].get(f"{g:g}") for g in grid]
        val += f"| {r['label']} | " + " | ".join(
            "" if c is None else f"{100 * c:.1f}" for c in cells
        )
        val += " |\n"
    return title + head + "\n".join(rows) + paired + val


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg = results["config"]
    fig, ax = plt.subplots(figsize=(6.0, 4.8))
    x = np.arange(1, cfg["n_tasks"] + 1)
    for r in results["methods"].values():
        m, s = 100 * np.array(r["avg_acc_mean"]), 100 * np.array(r["avg_acc_std"])
        strength = "" if r["strength"] == 0.0 else f" (λ={r['strength']:g})"
        ax.plot(x, m, marker="o", ms=3, label=r["label"] + strength)
        ax.fill_between(x, m - s, m + s, alpha=0.2)
    ax.set_xlabel("tasks seen")
    ax.set_ylabel("average test accuracy over seen tasks (%)")
    ax.set_title(f"{cfg['variant']} digits ({len(cfg['seeds'])} seeds)")
    ax.set_xticks(x)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def quick_config(variant: str) -> Config:
    return Config(
        variant=variant,
        n_tasks=3,
        seeds=[0],
        methods=["finetune", "ewc", "kfac", "ekfac"],
        grid=[10, 100],
        hidden=64,
        epochs=3,
        quick=True,
    )


def main(argv: list[str] | None = None) -> dict[str, dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--variant", choices=["permuted", "split", "both"], default="both")
    p.add_argument("--out", type=Path, default=Path("experiments/results/continual"))
    p.add_argument("--quick", action="store_true", help="smoke mode: 3 tasks, 1 seed, tiny grid")
    p.add_argument("--seeds", type=int, default=None, help="number of seeds (default 5)")
    p.add_argument("--tasks", type=int, default=None, help="tasks (default 10 permuted, 5 split)")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--grid", type=float, nargs="+", default=None, help="strength grid")
    p.add_argument("--methods", nargs="+", choices=list(METHODS), default=None)
    p.add_argument("--fisher", choices=["mc", "exact", "empirical"], default=None)
    p.add_argument("--threads", type=int, default=1, help="torch threads (small MLPs: 1 is best)")
    args = p.parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return _main(args)
    finally:
        torch.set_num_threads(threads)


def _main(args: argparse.Namespace) -> dict[str, dict]:
    variants = ["permuted", "split"] if args.variant == "both" else [args.variant]
    args.out.mkdir(parents=True, exist_ok=True)
    out = {}
    for variant in variants:
        cfg = quick_config(variant) if args.quick else Config(variant=variant)
        if not args.quick:
            cfg.n_tasks = 10 if variant == "permuted" else 5
        if args.seeds is not None:
            cfg.seeds = list(range(args.seeds))
        if args.tasks is not None:
            cfg.n_tasks = args.tasks
        if args.epochs is not None:
            cfg.epochs = args.epochs
        if args.grid is not None:
            cfg.grid = args.grid
        if args.methods is not None:
            cfg.methods = args.methods
        if args.fisher is not None:
            cfg.fisher = args.fisher
        if variant == "split":
            cfg.n_tasks = min(cfg.n_tasks, 5)
        t0 = time.perf_counter()
        res = run(cfg)
        res["seconds"] = time.perf_counter() - t0
        (args.out / f"{variant}.json").write_text(json.dumps(res, indent=1))
        md = to_markdown(res)
        (args.out / f"{variant}.md").write_text(md)
        plot(res, args.out / f"{variant}.png")
        print(md)
        print(f"[{variant}] {res['seconds']:.1f} s; wrote {args.out}/{variant}.{{json,md,png}}")
        out[variant] = res
    return out


if __name__ == "__main__":
    main()
