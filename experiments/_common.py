"""Helpers shared by the experiment scripts: command line, seeding, result tables, small trainers.

Every study script builds its parser with :func:`make_parser` (``--quick``, ``--seeds``, ``--out``,
``--threads``), collects one ``dict`` per (seed, method, ...) row, aggregates the rows over seeds
with :func:`aggregate` and writes ``<name>.md`` and ``<name>.json`` with :func:`write_results`.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import random
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

RESULTS_DIR = Path(__file__).resolve().parent / "results"
REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # run as `python experiments/<study>.py` from a checkout
    sys.path.insert(0, str(REPO_ROOT))


# --------------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------------


def make_parser(
    study: str, description: str, default_seeds: Sequence[int]
) -> argparse.ArgumentParser:
    """Parser with the options every study shares; the study adds its own."""
    p = argparse.ArgumentParser(
        prog=f"python experiments/{study}.py",
        description=description,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--quick", action="store_true", help="smoke mode: tiny settings, one seed, < 30 s"
    )
    p.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=list(default_seeds),
        help="random seeds (data split, initialisation, MC draws); --quick keeps the first only",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=RESULTS_DIR / study,
        help="output folder for the tables (markdown + JSON) and figures",
    )
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    return p


def setup(args: argparse.Namespace) -> list[int]:
    """Apply ``--threads``, create ``--out`` and return the seeds to run."""
    torch.set_num_threads(max(1, args.threads))
    args.out = Path(args.out)
    args.out.mkdir(parents=True, exist_ok=True)
    return list(args.seeds[:1]) if args.quick else list(args.seeds)


def seed_everything(seed: int) -> torch.Generator:
    """Seed python, numpy and torch; return a fresh torch generator seeded with ``seed``."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


class Timer:
    """``with Timer() as t: ...; t.seconds``."""

    def __enter__(self) -> Timer:
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self.t0


def log(msg: str) -> None:
    print(msg, flush=True)


# --------------------------------------------------------------------------------------------------
# results
# --------------------------------------------------------------------------------------------------


def mean_std(values: Iterable[float]) -> tuple[float, float]:
    """Mean and (population, ``ddof=0``) standard deviation; NaNs ignored."""
    v = np.asarray([float(x) for x in values], dtype=np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return float("nan"), float("nan")
    return float(v.mean()), float(v.std()) if v.size > 1 else 0.0


def aggregate(
    rows: Sequence[dict[str, Any]], keys: Sequence[str], metrics: Sequence[str]
) -> list[dict[str, Any]]:
    """Group ``rows`` by ``keys`` (first-seen order) and give ``metric -> (mean, std, n)``."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(tuple(r[k] for k in keys), []).append(r)
    out = []
    for key, rs in groups.items():
        agg: dict[str, Any] = dict(zip(keys, key))
        for m in metrics:
            mu, sd = mean_std(r[m] for r in rs if m in r)
            agg[m] = {"mean": mu, "std": sd, "n": sum(1 for r in rs if m in r)}
        out.append(agg)
    return out


def fmt(cell: Any, digits: int = 3, scale: float = 1.0) -> str:
    """Format a table cell: aggregated ``{"mean", "std", "n"}`` as ``mean ± std``."""
    if isinstance(cell, dict) and "mean" in cell:
        mu, sd = cell["mean"] * scale, cell["std"] * scale
        if not math.isfinite(mu):
            return "–"
        return f"{mu:.{digits}f} ± {sd:.{digits}f}" if cell.get("n", 1) > 1 else f"{mu:.{digits}f}"
    if isinstance(cell, float):
        return f"{cell * scale:.{digits}f}"
    return str(cell)


def markdown_table(
    rows: Sequence[dict[str, Any]],
    columns: Sequence[str | tuple[str, str]],
    digits: int | dict[str, int] = 3,
) -> str:
    """A markdown table; ``columns`` are keys or ``(key, header)`` pairs."""
    cols = [(c, c) if isinstance(c, str) else c for c in columns]
    lines = [
        "| " + " | ".join(h for _, h in cols) + " |",
        "|" + "|".join("---" for _ in cols) + "|",
    ]
    for r in rows:
        cells = []
        for k, _ in cols:
            d = digits.get(k, 3) if isinstance(digits, dict) else digits
            cells.append(fmt(r.get(k, ""), d))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_jsonable(v) for v in x]
    if isinstance(x, Path):
        return str(x)
    if isinstance(x, Tensor):
        return _jsonable(x.detach().cpu().tolist())
    if isinstance(x, np.ndarray):
        return _jsonable(x.tolist())
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def write_results(
    out: Path,
    name: str,
    title: str,
    sections: Sequence[tuple[str, str]],
    data: dict[str, Any],
    config: dict[str, Any],
) -> tuple[Path, Path]:
    """Write ``out/<name>.md`` (title, settings, then ``(heading, markdown)`` sections) and
    ``out/<name>.json`` (``config`` plus ``data``); return both paths."""
    out.mkdir(parents=True, exist_ok=True)
    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    md = [f"# {title}", "", "Settings: `" + json.dumps(_jsonable(config)) + "`", ""]
    for heading, body in sections:
        md += [f"## {heading}" if heading else "", "", body.rstrip(), ""]
    md_path, json_path = out / f"{name}.md", out / f"{name}.json"
    md_path.write_text("\n".join(md))
    payload = {"title": title, "config": config, "environment": env, **data}
    json_path.write_text(json.dumps(_jsonable(payload), indent=1, allow_nan=False))
    return md_path, json_path


# --------------------------------------------------------------------------------------------------
# models and training
# --------------------------------------------------------------------------------------------------


def mlp(
    d_in: int, d_out: int, width: int = 50, depth: int = 2, act: type[nn.Module] = nn.Tanh
) -> nn.Sequential:
    """``depth`` hidden layers of ``width`` units."""
    layers: list[nn.Module] = []
    d = d_in
    for _ in range(depth):
        layers += [nn.Linear(d, width), act()]
        d = width
    layers.append(nn.Linear(d, d_out))
    return nn.Sequential(*layers)


def train_full_batch(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    loss: str,
    prior_precision: float,
    epochs: int,
    lr: float = 1e-2,
) -> nn.Module:
    """Full-batch Adam on the MAP objective ``sum_n NLL_n + delta/2 ||theta||^2``, divided by
    ``N`` for a well-scaled step (sigma = 1 for ``loss="mse"``); returns ``model.eval()``."""
    n = x.shape[0]
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    crit: Callable[[Tensor, Tensor], Tensor]
    if loss == "mse":

        def crit(f: Tensor, t: Tensor) -> Tensor:
            return 0.5 * ((f - t) ** 2).sum()

    elif loss == "ce":

        def crit(f: Tensor, t: Tensor) -> Tensor:
            return nn.functional.cross_entropy(f, t, reduction="sum")

    else:
        raise ValueError(f"loss must be 'mse' or 'ce', got {loss!r}")
    model.train()
    for _ in range(epochs):
        opt.zero_grad()
        sq = sum((p**2).sum() for p in model.parameters())
        obj = (crit(model(x), y) + 0.5 * prior_precision * sq) / n
        obj.backward()
        opt.step()
        sched.step()
    return model.eval()


def fit_temperature(logits: Tensor, targets: Tensor) -> float:
    """Temperature scaling (Guo et al. 2017) on held-out data: the demo's
    :func:`laplace_kron.demo.fit_temperature` (L-BFGS on ``log T``)."""
    from laplace_kron.demo import fit_temperature as fit

    return fit(logits, targets)


@torch.no_grad()
def predict_logits(model: nn.Module, x: Tensor, batch_size: int = 1024) -> Tensor:
    """Network outputs in eval mode, in chunks."""
    model.eval()
    return torch.cat([model(x[i : i + batch_size]) for i in range(0, x.shape[0], batch_size)])
