"""The demo pipeline: data, MAP training, temperature scaling, the Laplace variants, evaluation.

:func:`run_demo` is what ``laplace-kron demo`` runs; the package docstring
(:mod:`laplace_kron.demo`) describes the steps and the choices behind the defaults.
"""

from __future__ import annotations

import platform
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .. import KronLaplace, __version__, metrics
from ..datasets import load_digits_split, make_loader, ood_digits_like, rotate_images, train_map
from .config import DEFAULT_VARIANTS, MAP_NAME, TABLE_ANGLES, TEMP_NAME, VARIANTS, DemoConfig
from .report import COLUMNS, format_table, save_results, summary_text, write_figures

__all__ = ["digits_cnn", "fit_temperature", "run_demo"]


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
        print(summary_text(results))
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
    files = write_figures(out_dir, probs, y_test, cfg.angles, curves)
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
    save_results(out_dir, results, files)
    return results
