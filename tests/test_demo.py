"""The ``laplace-kron demo`` end to end (quick mode), its command line and its helpers."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import laplace_kron
from laplace_kron import cli, demo

ROWS = ["MAP", "Temp. scaling", "KFAC Laplace", "EKFAC Laplace", "LL-KFAC Laplace"]
COLUMNS = [
    "method",
    "accuracy",
    "nll",
    "ece",
    "brier",
    "auroc_patches",
    "auroc_noise",
    "accuracy_rot30",
    "ece_rot30",
    "accuracy_rot60",
    "ece_rot60",
]
FIGURES = [
    "reliability.png",
    "reliability_rot60.png",
    "confidence_ood_patches.png",
    "confidence_ood_noise.png",
    "rotation_accuracy.png",
    "rotation_ece.png",
    "rotation_nll.png",
]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _check_outputs(results: dict, out: Path, rows: list[str]) -> None:
    """Table rows/columns, value ranges, JSON and figures of one demo run."""
    table = results["table"]
    assert table["columns"] == COLUMNS
    assert [r["method"] for r in table["rows"]] == rows
    for r in table["rows"]:
        assert list(r) == COLUMNS
        for key in COLUMNS[1:]:
            assert math.isfinite(r[key]), (r["method"], key)
        for key in ("accuracy", "ece", "auroc_patches", "auroc_noise", "accuracy_rot60"):
            assert 0.0 <= r[key] <= 1.0
        assert r["nll"] > 0 and 0.0 <= r["brier"] <= 2.0
    for name in rows:
        assert name in results["table_text"]
    saved = json.loads((out / "results.json").read_text())
    assert saved["table"] == table
    assert saved["config"]["seed"] == results["config"]["seed"]
    assert "| Method |" in (out / "results.md").read_text()
    for fname in FIGURES:
        data = (out / fname).read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 5000, fname
    assert set(FIGURES) <= set(results["files"])
    assert Path(results["out"]) == out.resolve()
    angles = results["rotation"]["angles"]
    assert angles[0] == 0 and {30, 60} <= set(angles)
    for curve in results["rotation"]["methods"].values():
        assert all(len(v) == len(angles) for v in curve.values())


# torch's thread count around the quick run: set to this (not the demo's 1) before, read after
THREADS_BEFORE_DEMO = 3


@pytest.fixture(scope="module")
def quick(tmp_path_factory) -> tuple[dict, Path, int]:
    """Results and output folder of one quick demo run, and torch's thread count after it."""
    out = tmp_path_factory.mktemp("demo") / "out"
    previous = torch.get_num_threads()
    torch.set_num_threads(THREADS_BEFORE_DEMO)
    try:
        results = demo.run_demo(quick=True, out=out, progress=False, verbose=False)
        threads_after = torch.get_num_threads()
    finally:
        torch.set_num_threads(previous)
    return results, out, threads_after


def test_quick_demo_end_to_end(quick):
    results, out, _ = quick
    _check_outputs(results, out, ROWS)
    rows = {r["method"]: r for r in results["table"]["rows"]}
    # accuracy at 0 degrees matches the first point of the rotation curve
    for name, row in rows.items():
        assert row["accuracy"] == results["rotation"]["methods"][name]["accuracy"][0]
    # the Laplace predictive keeps the MAP's accuracy (the GLM mean is the MAP)
    for name in ROWS[2:]:
        assert abs(rows[name]["accuracy"] - rows["MAP"]["accuracy"]) < 0.05
    # temperature scaling never changes the argmax
    assert rows["Temp. scaling"]["accuracy"] == rows["MAP"]["accuracy"]
    assert results["temperature"] > 0
    for key, v in results["laplace"].items():
        assert all(d > 0 for d in v["prior_precision"])
        assert len(v["prior_precision"]) == v["n_blocks"]
        assert math.isfinite(v["log_marglik"])
        assert v["modules"] == ("last_layer" if key.startswith("ll-") else "all")
    assert results["config"]["quick"] and results["config"]["epochs"] == 4
    assert results["timings"]["total"] > 0


def test_quick_demo_restores_threads(quick):
    # run_demo uses one thread by default and must leave torch's setting as it was
    results, _, threads_after = quick
    assert results["config"]["threads"] == 1
    assert threads_after == THREADS_BEFORE_DEMO


def test_format_table_aligns_columns(quick):
    text = demo.format_table(quick[0]["table"]["rows"])
    lines = text.splitlines()
    assert lines[0].startswith("Method") and "AUROC img" in lines[0] and "ECE@60°" in lines[0]
    assert len(lines) == 2 + len(ROWS)
    assert len({len(line) for line in lines}) == 1  # all lines padded to the same width


def test_cli_forwards_arguments(monkeypatch, tmp_path):
    seen = {}
    monkeypatch.setattr(demo, "run_demo", lambda **kw: seen.update(kw))
    code = cli.main(
        ["demo", "--quick", "--out", str(tmp_path), "--variants", "kfac, ll-ekfac", "--seed", "3"]
        + ["--epochs", "2", "--link", "bridge", "--no-progress", "--threads", "2"]
    )
    assert code == 0
    assert seen == {
        "seed": 3,
        "out": str(tmp_path),
        "variants": ["kfac", "ll-ekfac"],
        "quick": True,
        "epochs": 2,
        "method": "glm",
        "link": "bridge",
        "n_samples": 200,
        "progress": False,
        "threads": 2,
    }
    seen.clear()
    assert cli.main(["demo"]) == 0
    assert seen["variants"] == list(demo.DEFAULT_VARIANTS) and seen["out"] == "demo_output"
    assert seen["quick"] is False and seen["epochs"] is None and seen["threads"] == 1
    assert seen["method"] == "glm" and seen["link"] == "centered_probit"


def test_cli_demo_quick_runs(tmp_path, capsys):
    out = tmp_path / "cli_out"
    code = cli.main(
        ["demo", "--quick", "--out", str(out), "--variants", "ll-kfac", "--no-progress"]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "LL-KFAC Laplace" in printed and "AUROC img" in printed
    assert str(out.resolve()) in printed.splitlines()[-1]
    results = json.loads((out / "results.json").read_text())
    assert [r["method"] for r in results["table"]["rows"]] == [
        "MAP",
        "Temp. scaling",
        "LL-KFAC Laplace",
    ]
    assert all((out / f).is_file() for f in FIGURES)


def test_cli_version_help_and_errors(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0 and laplace_kron.__version__ in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        cli.main(["demo", "--help"])
    help_text = capsys.readouterr().out
    assert e.value.code == 0
    for option in ("--seed", "--out", "--variants", "--quick", "--epochs"):
        assert option in help_text
    with pytest.raises(SystemExit) as e:
        cli.main(["frobnicate"])
    assert e.value.code == 2 and "unknown command 'frobnicate'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        cli.main(["demo", "--variants", "kfac,diag"])
    assert e.value.code == 2 and "unknown variant" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        cli.main(["demo", "--epochs", "0"])
    assert e.value.code == 2
    assert cli.main([]) == 2 and "missing command" in capsys.readouterr().err


def test_python_m_entry_point():
    proc = subprocess.run(
        [sys.executable, "-m", "laplace_kron", "--version"], capture_output=True, text=True
    )
    assert (
        proc.returncode == 0 and proc.stdout.strip() == f"laplace-kron {laplace_kron.__version__}"
    )


def test_config_validation(tmp_path):
    with pytest.raises(ValueError, match="unknown Laplace variant"):
        demo.run_demo(variants=["kfac", "diag"], out=tmp_path)
    with pytest.raises(ValueError, match="link"):
        demo.run_demo(link="logit", out=tmp_path)
    with pytest.raises(ValueError, match="duplicates"):
        demo.DemoConfig(variants=("kfac", "kfac")).resolved()
    cfg = demo.DemoConfig(quick=True, angles=(45,)).resolved()
    assert cfg.angles == (0, 30, 45, 60) and cfg.fisher == "mc" and cfg.epochs == 4
    full = demo.DemoConfig().resolved()
    assert full.fisher == "exact" and full.epochs == 30 and full.angles[-1] == 180


def test_fit_temperature_recovers_known_temperature():
    g = torch.Generator().manual_seed(0)
    logits = 3.0 * torch.randn(20000, 5, generator=g)
    y = torch.multinomial(torch.softmax(logits / 2.5, -1), 1, generator=g).squeeze(1)
    assert demo.fit_temperature(logits, y) == pytest.approx(2.5, rel=0.05)


@pytest.mark.slow
def test_full_demo(tmp_path):
    """The default demo (what ``laplace-kron demo`` runs), with the effects the literature
    predicts that are robust on digits: Laplace raises OOD AUROC and lowers ECE under strong
    rotation while keeping accuracy."""
    out = tmp_path / "full"
    results = demo.run_demo(out=out, progress=False, verbose=False)
    _check_outputs(results, out, ROWS)
    assert results["config"]["epochs"] == 30 and results["config"]["fisher"] == "exact"
    rows = {r["method"]: r for r in results["table"]["rows"]}
    assert rows["MAP"]["accuracy"] > 0.95
    for name in ("KFAC Laplace", "EKFAC Laplace"):
        assert abs(rows[name]["accuracy"] - rows["MAP"]["accuracy"]) < 0.02
        assert rows[name]["auroc_patches"] > rows["MAP"]["auroc_patches"]
        assert rows[name]["auroc_noise"] > rows["MAP"]["auroc_noise"]
        assert rows[name]["ece_rot60"] < rows["MAP"]["ece_rot60"]
