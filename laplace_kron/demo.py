"""The ``laplace-kron demo``: MAP vs Kronecker-factored Laplace vs temperature scaling on digits.

Everything runs offline on data that ships with scikit-learn:

1. train a small CNN to the MAP on the 8x8 digits (Adam, L2 weight decay, cosine schedule);
2. fit KFAC and EKFAC Laplace over all weights and last-layer KFAC Laplace, and tune the prior
   precision by maximising the Laplace marginal likelihood (one value per layer);
3. fit a temperature on the validation split (NLL) as the non-Bayesian baseline;
4. evaluate the predictives (linearized GLM, Monte-Carlo link by default) on the test split:
   accuracy, NLL, ECE, Brier; OOD AUROC of digits against patches of scikit-learn's sample
   photographs and against uniform noise; accuracy, ECE and NLL under rotation of the test digits;
5. print one table and save it (markdown + JSON) with figures into the output folder.

Choices (see the docstring of :func:`run_demo`): the weight decay ``1e-2`` of the mean loss is the
prior precision ``delta = 1e-2 * N ~ 12.6`` of the summed loss, about where the evidence puts it,
so the MAP and the tuned posterior belong to the same model. The Fisher is the exact GGN
(``fisher="exact"``), so the curvature carries no Monte-Carlo noise. The GLM predictive uses the
``centered_probit`` link: the plain probit uses the per-class variances and so counts the part of
the logit covariance that is a shift common to all classes, to which the softmax is invariant; on
this model that makes it markedly less confident than the GLM predictive it approximates.
Projecting the logit Gaussian onto the sum-zero subspace first removes that part, is
deterministic, and matches the sampled ``mc`` link here (``--link probit`` / ``mc`` to compare).
"""

from __future__ import annotations

import json
import platform
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from . import __version__, metrics, plots
from .datasets import load_digits_split, make_loader, ood_digits_like, rotate_images, train_map
from .posterior import KronLaplace
from .predictive import LINKS

__all__ = [
    "DEFAULT_VARIANTS",
    "VARIANTS",
    "DemoConfig",
    "digits_cnn",
    "fit_temperature",
    "format_table",
    "run_demo",
]

# variant key -> (display name, curvature, modules)
VARIANTS: dict[str, tuple[str, str, str | None]] = {
    "kfac": ("KFAC Laplace", "kfac", None),
    "ekfac": ("EKFAC Laplace", "ekfac", None),
    "ll-kfac": ("LL-KFAC Laplace", "kfac", "last_layer"),
    "ll-ekfac": ("LL-EKFAC Laplace", "ekfac", "last_layer"),
}
DEFAULT_VARIANTS = ("kfac", "ekfac", "ll-kfac")
MAP_NAME, TEMP_NAME = "MAP", "Temp. scaling"
TABLE_ANGLES = (30, 60)
# (key, header, format) of the printed table's columns after the method name
COLUMNS: list[tuple[str, str, str]] = [
    ("accuracy", "Acc", ".3f"),
    ("nll", "NLL", ".3f"),
    ("ece", "ECE", ".3f"),
    ("brier", "Brier", ".3f"),
    ("auroc_patches", "AUROC img", ".3f"),
    ("auroc_noise", "AUROC noise", ".3f"),
] + [
    (f"{m}_rot{a}", f"{h}@{a}°", ".3f")
    for a in TABLE_ANGLES
    for m, h in (("accuracy", "Acc"), ("ece", "ECE"))
]


@dataclass
class DemoConfig:
    """Settings of one demo run (``quick=True`` shrinks everything to a smoke test)."""

    seed: int = 0
    out: str = "demo_output"
    variants: tuple[str, ...] = DEFAULT_VARIANTS
    quick: bool = False
    epochs: int | None = None  # default: 30 (quick: 4)
    method: str = "glm"
    link: str = "centered_probit"
    n_samples: int = 200  # samples of the mc link and of the sampling predictives
    progress: bool = True
    threads: int | None = 1  # torch CPU threads during the run (None: leave torch's setting)
    fisher: str | None = None  # default: "exact" (quick: "mc")
    weight_decay: float = 1e-2
    lr: float = 3e-3
    batch_size: int = 64
    n_ood: int | None = None  # default: 500 (quick: 100)
    angles: tuple[int, ...] | None = None  # rotation angles of the figures

    def resolved(self) -> DemoConfig:
        """A copy with the quick/full defaults filled in and the options validated."""
        unknown = [v for v in self.variants if v not in VARIANTS]
        if unknown:
            raise ValueError(
                f"unknown Laplace variant(s) {unknown}; choose from {sorted(VARIANTS)}"
            )
        if len(set(self.variants)) != len(self.variants):
            raise ValueError(f"variants contain duplicates: {list(self.variants)}")
        epochs = self.epochs if self.epochs is not None else (4 if self.quick else 30)
        if epochs < 1:
            raise ValueError(f"epochs must be a positive integer, got {epochs}")
        if self.method not in ("glm", "glm_mc", "nn"):
            raise ValueError(f"method must be 'glm', 'glm_mc' or 'nn', got {self.method!r}")
        if self.link not in LINKS:
            raise ValueError(f"link must be one of {LINKS}, got {self.link!r}")
        if self.n_samples < 1:
            raise ValueError(f"n_samples must be a positive integer, got {self.n_samples}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be a positive integer or None, got {self.threads}")
        n_ood = self.n_ood if self.n_ood is not None else (100 if self.quick else 500)
        fisher = self.fisher or ("mc" if self.quick else "exact")
        angles = self.angles
        if angles is None:
            angles = (0, 30, 60) if self.quick else tuple(range(0, 181, 15))
        angles = tuple(sorted(set(angles) | {0, *TABLE_ANGLES}))
        return DemoConfig(
            **{
                **asdict(self),
                "variants": tuple(self.variants),
                "epochs": epochs,
                "n_ood": n_ood,
                "angles": angles,
                "fisher": fisher,
            }
        )


def digits_cnn() -> nn.Sequential:
    """Small CNN for 8x8 digits: two 3x3 convolutions, max-pooling, two linear layers (151k
    parameters)."""
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(64 * 4 * 4, 128),
        nn.ReLU(),
        nn.Linear(128, 10),
    )


def fit_temperature(logits: Tensor, targets: Tensor, max_iter: int = 100) -> float:
    """Temperature ``T > 0`` minimising the NLL of ``softmax(logits / T)`` (Guo et al., 2017)."""
    z = logits.detach().to(torch.float64)
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        opt.zero_grad()
        loss = nn.functional.cross_entropy(z / log_t.exp(), targets)
        loss.backward()
        return loss

    opt.step(closure)
    return float(log_t.detach().exp())


def _evaluate(
    probs: dict[str, Tensor], y: Tensor, angles: Sequence[int]
) -> tuple[dict[str, float], dict[str, list[float]]]:
    """Table row and rotation curves of one method from its probabilities per input set."""
    row = metrics.classification_report(probs["test"], y)
    row.pop("mce")
    row["auroc_patches"] = metrics.ood_auroc(probs["test"], probs["patches"])
    row["auroc_noise"] = metrics.ood_auroc(probs["test"], probs["noise"])
    curves: dict[str, list[float]] = {"accuracy": [], "ece": [], "nll": []}
    for a in angles:
        p = probs[f"rot{a}"]
        curves["accuracy"].append(metrics.accuracy(p, y))
        curves["ece"].append(metrics.ece(p, y))
        curves["nll"].append(metrics.nll(p, y))
    for a in TABLE_ANGLES:
        i = list(angles).index(a)
        row[f"accuracy_rot{a}"] = curves["accuracy"][i]
        row[f"ece_rot{a}"] = curves["ece"][i]
    return row, curves


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """Plain-text table of the demo's result rows (one per method)."""
    headers = ["Method"] + [h for _, h, _ in COLUMNS]
    cells = [[r["method"]] + [format(r[k], f) for k, _, f in COLUMNS] for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(headers)]
    fmt = [str.ljust] + [str.rjust] * len(COLUMNS)
    lines = ["  ".join(f(h, w) for f, h, w in zip(fmt, headers, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(f(c, w) for f, c, w in zip(fmt, row, widths)) for row in cells]
    return "\n".join(lines)


def _markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    headers = ["Method"] + [h for _, h, _ in COLUMNS]
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for r in rows:
        vals = [r["method"]] + [format(r[k], f) for k, _, f in COLUMNS]
        lines.append("| " + " | ".join(vals) + " |")
    return "\n".join(lines)


def _split_probs(p: Tensor, sizes: dict[str, int]) -> dict[str, Tensor]:
    parts = torch.split(p.detach().to(torch.float64), list(sizes.values()))
    out = dict(zip(sizes, parts, strict=True))
    out["rot0"] = out["test"]
    return out


def run_demo(
    seed: int = 0,
    out: str | Path = "demo_output",
    variants: Sequence[str] = DEFAULT_VARIANTS,
    quick: bool = False,
    epochs: int | None = None,
    method: str = "glm",
    link: str = "centered_probit",
    progress: bool = True,
    verbose: bool = True,
    **options: Any,
) -> dict[str, Any]:
    """Run the demo and return its results (also written to ``out/results.json``).

    Args:
        seed: seeds the data split, the initialisation, the OOD sets and the curvature fit.
        out: output folder (created) for ``results.json``, ``results.md`` and the PNG figures.
        variants: Laplace variants among :data:`VARIANTS` (MAP and temperature scaling always run).
        quick: smoke-test settings (4 epochs, fewer angles and OOD points; well under 30 s).
        epochs: MAP training epochs (default 30, quick 4).
        method, link: predictive of :meth:`KronLaplace.predict` (default: linearized model, logits
            sampled from their full Gaussian; ``n_samples`` in ``options``, default 200).
        progress: tqdm progress bars (on stderr).
        threads: (in ``options``) torch CPU threads during the run, default 1: the tensors are
            tiny (8x8 images), and one thread avoids oversubscription on a busy machine.
        verbose: print the table and the output folder.
        **options: further :class:`DemoConfig` fields (``n_samples``, ``threads``, ``fisher``,
            ``weight_decay``, ``lr``, ``batch_size``, ``n_ood``, ``angles``).

    Returns:
        ``{"config", "table": {"columns", "rows"}, "table_text", "rotation": {"angles",
        "methods"}, "laplace", "temperature", "map_train_loss", "timings", "files", "out"}``;
        each table row is ``{"method", "accuracy", "nll", "ece", "brier", "auroc_patches",
        "auroc_noise", "accuracy_rot30", "ece_rot30", "accuracy_rot60", "ece_rot60"}``.
    """
    cfg = DemoConfig(
        seed=seed,
        out=str(out),
        variants=tuple(variants),
        quick=quick,
        epochs=epochs,
        method=method,
        link=link,
        progress=progress,
        **options,
    ).resolved()
    previous_threads = torch.get_num_threads()
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    try:
        results = _run(cfg)
    finally:
        torch.set_num_threads(previous_threads)
    if verbose:
        print(_summary(results))
    return results


def _run(cfg: DemoConfig) -> dict[str, Any]:
    """The body of :func:`run_demo` for a resolved configuration."""
    out_dir = Path(cfg.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    t_start = time.perf_counter()
    stages = 4 + len(cfg.variants)
    bar = tqdm(total=stages, desc="demo", disable=not cfg.progress, position=0)

    def stage(name: str) -> None:
        bar.set_description(f"demo: {name}")

    # ---------------------------------------------------------------- data
    stage("data")
    t0 = time.perf_counter()
    data = load_digits_split(seed=cfg.seed, val_fraction=0.1, test_fraction=0.2)
    ood = ood_digits_like(n=cfg.n_ood, seed=cfg.seed)
    x_test, y_test = data["x_test"], data["y_test"]
    # angle 0 is the test set itself ("rot0" is an alias of "test" after the predictions)
    inputs = {"test": x_test, **{f"rot{a}": rotate_images(x_test, a) for a in cfg.angles if a}}
    inputs.update(ood)
    order = list(inputs)
    sizes = {k: inputs[k].shape[0] for k in order}
    x_all = torch.cat([inputs[k] for k in order])
    timings["data"] = time.perf_counter() - t0
    bar.update()

    # ---------------------------------------------------------------- MAP training
    stage("train MAP")
    t0 = time.perf_counter()
    torch.manual_seed(cfg.seed)
    model = digits_cnn()
    loader = make_loader(data["x_train"], data["y_train"], cfg.batch_size, True, cfg.seed)
    history = train_map(
        model,
        loader,
        epochs=cfg.epochs,
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
        seed=cfg.seed,
        progress=cfg.progress,
    )
    timings["train_map"] = time.perf_counter() - t0
    bar.update()

    probs: dict[str, dict[str, Tensor]] = {}
    with torch.no_grad():
        logits_all = model(x_all)
        logits_val = model(data["x_val"])
    probs[MAP_NAME] = _split_probs(torch.softmax(logits_all, -1), sizes)

    # ---------------------------------------------------------------- temperature scaling
    stage("temperature")
    t0 = time.perf_counter()
    temperature = fit_temperature(logits_val, data["y_val"])
    probs[TEMP_NAME] = _split_probs(torch.softmax(logits_all / temperature, -1), sizes)
    timings["temperature"] = time.perf_counter() - t0
    bar.update()

    # ---------------------------------------------------------------- Laplace variants
    fit_loader = make_loader(data["x_train"], data["y_train"], 256, shuffle=False)
    laplace: dict[str, dict[str, Any]] = {}
    for key in cfg.variants:
        name, curvature, modules = VARIANTS[key]
        stage(name)
        t0 = time.perf_counter()
        la = KronLaplace(
            model,
            "classification",
            curvature=curvature,
            fisher=cfg.fisher,
            modules=modules,
            generator=torch.Generator().manual_seed(cfg.seed),
        )
        la.fit(fit_loader, progress=cfg.progress)
        t_fit = time.perf_counter() - t0
        report = la.optimize_prior_precision(method="marglik", granularity="layer")
        t_tune = time.perf_counter() - t0 - t_fit
        gen = torch.Generator().manual_seed(cfg.seed)
        with torch.no_grad():
            p = la.predict(
                x_all, method=cfg.method, link=cfg.link, n_samples=cfg.n_samples, generator=gen
            )
        probs[name] = _split_probs(p, sizes)
        t_all = time.perf_counter() - t0
        laplace[key] = {
            "name": name,
            "curvature": curvature,
            "modules": modules or "all",
            "n_params": la.n_params,
            "n_blocks": la.n_blocks,
            "prior_precision": la.prior_precision.reshape(-1).tolist(),
            "log_marglik": float(report["log_marglik"]),
            "seconds_fit": t_fit,
            "seconds_tune": t_tune,
            "seconds_predict": t_all - t_fit - t_tune,
        }
        timings[f"laplace_{key}"] = t_all
        bar.update()

    # ---------------------------------------------------------------- metrics and outputs
    stage("metrics and figures")
    t0 = time.perf_counter()
    rows, curves = [], {}
    for name, pr in probs.items():
        row, curve = _evaluate(pr, y_test, cfg.angles)
        rows.append({"method": name, **row})
        curves[name] = curve
    files = _figures(out_dir, probs, y_test, cfg.angles, curves)
    timings["metrics_figures"] = time.perf_counter() - t0
    bar.update()
    bar.close()
    timings["total"] = time.perf_counter() - t_start

    table_text = format_table(rows)
    results: dict[str, Any] = {
        "config": asdict(cfg),
        "versions": {
            "laplace_kron": __version__,
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
        "data": {
            "n_train": int(data["x_train"].shape[0]),
            "n_val": int(data["x_val"].shape[0]),
            "n_test": int(x_test.shape[0]),
            "n_ood": {k: int(v.shape[0]) for k, v in ood.items()},
        },
        "model": {"n_params": sum(p.numel() for p in model.parameters())},
        "table": {"columns": ["method"] + [k for k, _, _ in COLUMNS], "rows": rows},
        "table_text": table_text,
        "rotation": {"angles": list(cfg.angles), "methods": curves},
        "laplace": laplace,
        "temperature": temperature,
        "map_train_loss": history,
        "timings": timings,
        "out": str(out_dir.resolve()),
    }
    md = out_dir / "results.md"
    md.write_text(_markdown_text(results))
    files = [*files, md.name, "results.json"]
    results["files"] = files
    with open(out_dir / "results.json", "w") as fh:
        json.dump(results, fh, indent=2)
    return results


def _markdown_text(results: dict[str, Any]) -> str:
    cfg = results["config"]
    lines = [
        "# laplace-kron demo: scikit-learn digits",
        "",
        f"seed {cfg['seed']}, {cfg['epochs']} epochs, predictive `{cfg['method']}` "
        f"(link `{cfg['link']}`), {results['data']['n_test']} test digits, "
        f"{results['data']['n_ood']['patches']} OOD image patches and noise images.",
        "",
        _markdown_table(results["table"]["rows"]),
        "",
        f"Temperature: {results['temperature']:.3f}. Prior precision (per layer, marginal "
        "likelihood):",
        "",
    ]
    for v in results["laplace"].values():
        pp = ", ".join(f"{d:.3g}" for d in v["prior_precision"])
        lines.append(f"- {v['name']}: [{pp}] ({v['n_params']} parameters)")
    lines.append("")
    return "\n".join(lines)


def _summary(results: dict[str, Any]) -> str:
    cfg, t = results["config"], results["timings"]
    lines = [
        "",
        f"laplace-kron demo: digits CNN ({results['model']['n_params']} parameters, "
        f"{cfg['epochs']} epochs), predictive {cfg['method']}/{cfg['link']}, seed {cfg['seed']}",
        "Acc/NLL/ECE/Brier on the test digits; AUROC of max-probability: digits vs sample-image "
        "patches (img) and vs uniform noise; Acc/ECE@k°: test digits rotated by k degrees.",
        "",
        results["table_text"],
        "",
        f"temperature T = {results['temperature']:.3f}; prior precision (marginal likelihood):",
    ]
    for v in results["laplace"].values():
        pp = ", ".join(f"{d:.3g}" for d in v["prior_precision"])
        lines.append(f"  {v['name']:<18} [{pp}]")
    parts = ", ".join(f"{k} {v:.1f}s" for k, v in t.items() if k != "total")
    lines += [
        f"time: {t['total']:.1f}s ({parts})",
        f"results and figures saved in {results['out']}",
    ]
    return "\n".join(lines)


def _figures(
    out_dir: Path,
    probs: dict[str, dict[str, Tensor]],
    y: Tensor,
    angles: Sequence[int],
    curves: dict[str, dict[str, list[float]]],
) -> list[str]:
    """Write the PNG figures and return their file names."""
    files = []
    test = {name: p["test"] for name, p in probs.items()}
    plots.reliability_diagram(
        test, y, out_dir / "reliability.png", title="Reliability on the test digits"
    )
    files.append("reliability.png")
    a_max = max(TABLE_ANGLES)
    plots.reliability_diagram(
        {name: p[f"rot{a_max}"] for name, p in probs.items()},
        y,
        out_dir / f"reliability_rot{a_max}.png",
        title=f"Reliability on test digits rotated by {a_max}°",
    )
    files.append(f"reliability_rot{a_max}.png")
    for key, what in (("patches", "sample-image patches"), ("noise", "uniform noise")):
        fname = f"confidence_ood_{key}.png"
        plots.confidence_histogram(
            {name: (p["test"], p[key]) for name, p in probs.items()},
            None,
            out_dir / fname,
            title=f"Confidence: test digits vs {what}",
        )
        files.append(fname)
    for metric, label in (("accuracy", "accuracy"), ("ece", "ECE"), ("nll", "NLL")):
        fname = f"rotation_{metric}.png"
        plots.metric_vs_shift(
            list(angles),
            {name: c[metric] for name, c in curves.items()},
            out_dir / fname,
            ylabel=label,
            xlabel="rotation angle (degrees)",
            title=f"{label} under rotation",
        )
        files.append(fname)
    return files
