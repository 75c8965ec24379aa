"""Smoke tests: every experiment script runs end to end in ``--quick`` mode and writes its table
(markdown + JSON) and figures."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

EXPERIMENTS = Path(__file__).resolve().parent.parent / "experiments"


def _load(study: str):
    """Import ``experiments/<study>.py`` under a private name (its helpers via ``sys.path``)."""
    if str(EXPERIMENTS) not in sys.path:
        sys.path.insert(0, str(EXPERIMENTS))
    spec = importlib.util.spec_from_file_location(
        f"_experiment_{study}", EXPERIMENTS / f"{study}.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def _run(study: str, tmp_path: Path, figures: list[str], extra: list[str] | None = None) -> dict:
    out = tmp_path / study
    result = _load(study).main(["--quick", "--out", str(out), *(extra or [])])
    md = (out / f"{study}.md").read_text()
    assert md.startswith("# ") and "|---" in md
    data = json.loads((out / f"{study}.json").read_text())
    assert data["config"]["quick"] is True
    for name in figures:
        png = out / name
        assert png.exists() and png.stat().st_size > 1000, name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return {"result": result, "json": data, "md": md}


def _means(summary: list[dict], key: str, **where) -> list[float]:
    return [r[key]["mean"] for r in summary if all(r[k] == v for k, v in where.items())]


def test_regression_quick(tmp_path):
    run = _run("regression", tmp_path, ["toy_band.png"])
    summary = run["json"]["summary"]
    methods = {r["method"] for r in summary}
    assert {"MAP (sigma: val)", "LA KFAC"} <= methods
    for r in summary:
        assert math.isfinite(r["nll"]["mean"]), r["method"]
        assert 0.0 <= r["cov95"]["mean"] <= 1.0
    # the Laplace band widens in the gap: better gap NLL than MAP with a training-fit noise
    gap_map = _means(summary, "nll_gap", data="toy", method="MAP (sigma: train)")[0]
    gap_la = _means(summary, "nll_gap", data="toy", method="LA KFAC")[0]
    assert gap_la < gap_map


def test_two_moons_quick(tmp_path):
    run = _run("two_moons", tmp_path, ["confidence_map.png"])
    summary = run["json"]["summary"]
    far_map = _means(summary, "conf_r20", method="MAP")[0]
    far_la = _means(summary, "conf_r20", method="LA KFAC (GLM)")[0]
    assert far_la < far_map


def test_model_selection_quick(tmp_path):
    run = _run("model_selection", tmp_path, ["evidence_grid.png", "evidence_vs_nll.png"])
    sel = run["json"]["selection"]
    assert -1.0 <= sel["spearman_nll_la"]["mean"] <= 1.0
    assert len(run["json"]["summary"]) == 4  # 2 widths x 2 priors


def test_calibration_shift_quick(tmp_path):
    figs = ["accuracy_vs_angle.png", "ece_vs_angle.png", "nll_vs_angle.png", "reliability_0deg.png"]
    run = _run("calibration_shift", tmp_path, figs)
    angles = {r["angle"] for r in run["json"]["summary"]}
    assert angles == {0.0, 90.0}
    assert "Temp. scaling" in run["md"] and "KFAC GLM" in run["md"]


def test_ood_detection_quick(tmp_path):
    figs = ["confidence_hist_patches.png", "confidence_hist_heldout.png"]
    run = _run("ood_detection", tmp_path, figs)
    sets = {r["ood"] for r in run["json"]["summary"]}
    assert sets == {"patches", "noise", "held-out classes"}
    for r in run["json"]["summary"]:
        assert 0.0 <= r["auroc_maxprob"]["mean"] <= 1.0


def test_marglik_training_quick(tmp_path):
    run = _run("marglik_training", tmp_path, [], ["--no-laplace-torch"])
    summary = run["json"]["summary"]
    assert {r["method"] for r in summary} == {"MAP", "post-hoc KFAC", "marglik KFAC"}
    for r in summary:
        assert math.isfinite(r["nll"]["mean"]) and math.isfinite(r["nll_rot60"]["mean"])
        assert 0.0 <= r["auroc_permuted"]["mean"] <= 1.0


def test_transformer_digits_quick(tmp_path):
    run = _run("transformer_digits", tmp_path, ["accuracy_vs_angle.png", "ece_vs_angle.png"])
    summary = {r["method"]: r for r in run["json"]["summary"]}
    assert {"MAP", "KFAC Laplace (probit)", "LL-KFAC Laplace (probit)"} <= set(summary)
    assert "LoRA Laplace (probit)" in summary
    for r in summary.values():
        assert math.isfinite(r["nll"]["mean"]) and 0.0 <= r["auroc_noise"]["mean"] <= 1.0


def test_optimizers_quick(tmp_path):
    run = _run("optimizers", tmp_path, ["test_loss_vs_epoch.png", "test_loss_vs_time.png"])
    summary = run["json"]["summary"]
    names = {(r["arch"], r["optimizer"]) for r in summary}
    assert {("mlp", n) for n in ("SGD", "Adam", "KFAC", "EKFAC", "EKFAC-RA")} <= names
    assert {("cnn", "KFAC-SUA"), ("cnn", "EKFAC-SUA")} <= names
    for r in run["json"]["rows"]:
        assert not r["diverged"], (r["arch"], r["optimizer"])
        assert len(r["curve_test_loss"]) == len(r["curve_seconds"]) == 2
        assert all(math.isfinite(v) and v > 0 for v in r["curve_test_loss"])
        # cumulative wall time per epoch
        assert 0.0 < r["curve_seconds"][0] <= r["curve_seconds"][1]
        assert 0.0 <= r["test_accuracy"] <= 1.0


def test_architectures_quick(tmp_path):
    """Every architecture's blocks equal the exact GGN (Kronecker: one datum, one position;
    diagonal: several data), the GLM covariance equals dense J Sigma J^T, tuning raises the
    evidence and the predictive runs; the refusal table names each case."""
    import pytest

    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    run = _run("architectures", tmp_path, [])
    rows = run["json"]["rows"]
    assert len(rows) == 10
    for r in rows:
        for key in ("kron_err", "diag_err", "glm_err"):
            v = r[key]
            assert v is None or v < 1e-8, (r["architecture"], key, v)  # None: no such block
        # EKFAC's squared rotations: round-off up to ~1e-13 of the whole GGN on blocks that are
        # ~1e-7 of it or zero (measured against 1e-6 of the GGN's norm there)
        assert r["ekfac_err"] is None or r["ekfac_err"] < 1e-6, (r["architecture"], r["ekfac_err"])
        assert r["evidence_after"] > r["evidence_before"], r["architecture"]
        assert "NO" not in r["predict"] and "False" not in r["predict"]
        assert r["fit_over_epoch"] > 0
    refused = {r["case"]: r["result"] for r in run["json"]["refusals"]}
    assert refused["nn.Embedding(max_norm=1.0)"] == "0.weight: DiagBlock"
    assert refused["MC Fisher with a tensor sigma_noise"].startswith("refused")
    assert (
        "module's own call"
        in refused["nn.Linear weight also used outside its module call (x * W.sum(0))"]
    )
