"""What the demo shows and writes: the printed table and summary, ``results.md``,
``results.json`` and the PNG figures."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import Tensor

from .. import plots
from .config import TABLE_ANGLES

__all__ = ["COLUMNS", "format_table", "save_results", "summary_text", "write_figures"]

# (key, header, format) of the table's columns after the method name
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


def _cells(rows: Sequence[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """Headers and formatted cells (one list per row) of the table."""
    headers = ["Method"] + [h for _, h, _ in COLUMNS]
    cells = [[r["method"]] + [format(r[k], f) for k, _, f in COLUMNS] for r in rows]
    return headers, cells


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """Plain-text table of the demo's result rows (one per method)."""
    headers, cells = _cells(rows)
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(headers)]
    fmt = [str.ljust] + [str.rjust] * len(COLUMNS)
    lines = ["  ".join(f(h, w) for f, h, w in zip(fmt, headers, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(f(c, w) for f, c, w in zip(fmt, row, widths)) for row in cells]
    return "\n".join(lines)


def _markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    headers, cells = _cells(rows)
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(row) + " |" for row in cells]
    return "\n".join(lines)


def _priors(results: dict[str, Any]) -> list[tuple[str, str, int]]:
    """(variant name, formatted per-layer prior precisions, parameter count) of each variant."""
    return [
        (v["name"], ", ".join(f"{d:.3g}" for d in v["prior_precision"]), v["n_params"])
        for v in results["laplace"].values()
    ]


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
    lines += [f"- {name}: [{pp}] ({n} parameters)" for name, pp, n in _priors(results)]
    lines.append("")
    return "\n".join(lines)


def save_results(out_dir: Path, results: dict[str, Any], figures: Sequence[str]) -> None:
    """Write ``results.md`` and ``results.json`` into ``out_dir``; sets ``results["files"]`` to
    the figures' and these two files' names."""
    md = out_dir / "results.md"
    md.write_text(_markdown_text(results))
    results["files"] = [*figures, md.name, "results.json"]
    with open(out_dir / "results.json", "w") as fh:
        json.dump(results, fh, indent=2)


def summary_text(results: dict[str, Any]) -> str:
    """What ``laplace-kron demo`` prints: the settings, the table, the tuned hyperparameters,
    the timings and the output folder (last line)."""
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
    lines += [f"  {name:<18} [{pp}]" for name, pp, _ in _priors(results)]
    parts = ", ".join(f"{k} {v:.1f}s" for k, v in t.items() if k != "total")
    lines += [
        f"time: {t['total']:.1f}s ({parts})",
        f"results and figures saved in {results['out']}",
    ]
    return "\n".join(lines)


def write_figures(
    out_dir: Path,
    probs: dict[str, dict[str, Tensor]],
    y: Tensor,
    angles: Sequence[int],
    curves: dict[str, dict[str, list[float]]],
) -> list[str]:
    """Write the PNG figures and return their file names.

    ``probs[method][input set]``: probabilities ``[N, C]`` per input set (``"test"``,
    ``"rot<angle>"``, ``"patches"``, ``"noise"``); ``y``: test labels ``[N]``;
    ``curves[method][metric]``: one value per angle of ``angles``.
    """
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
