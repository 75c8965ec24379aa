"""Calibration on real data: scikit-learn digits, an overfit MLP, KFAC Laplace with a marglik prior.

Finding (see docs/predictive.md): on the clean test split the MAP of this network is already well
calibrated (ECE ~0.02) and the post-hoc Laplace predictive with the evidence-optimal (marglik) prior
is *under*-confident (higher NLL / ECE; the dense GGN and laplace-torch give the same). Where the MAP
is overconfident -- inputs shifted away from the training distribution (pixel noise, a one-pixel
translation) -- the marglik-tuned GLM probit predictive has much lower NLL, ECE and Brier at the
same accuracy. With the prior tuned on held-out data instead, the Laplace predictive also beats the
MAP on the clean test split. The tests assert exactly these three statements.
"""

import contextlib

import pytest
import torch
from sklearn.datasets import load_digits
from torch import nn

import laplace_kron as lk
from laplace_kron import metrics


@contextlib.contextmanager
def single_thread():
    """Small problems: one intra-op thread is as fast when the machine is idle and avoids the
    100x slowdown of OpenMP spin-waiting when the cores are shared; also fixes the float32
    reduction order, so the trained network (and the numbers in docs/) are reproducible."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with single_thread():
        yield


def _shifted(x: torch.Tensor, kind: str, g: torch.Generator) -> torch.Tensor:
    if kind == "noise":
        return x + 0.5 * torch.randn(x.shape, generator=g)
    return torch.roll(x.reshape(-1, 8, 8), 1, dims=-1).reshape(-1, 64)  # one pixel to the right


def _setup(modules=None):
    X, y = load_digits(return_X_y=True)
    X = torch.tensor(X / 16.0, dtype=torch.float32)
    y = torch.tensor(y)
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(X), generator=g)
    tr, te = perm[:1000], perm[1000:]
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10)
    )
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)  # no weight decay: overfits
    for _ in range(100):
        for idx in torch.randperm(1000, generator=g).split(100):
            opt.zero_grad()
            nn.functional.cross_entropy(model(X[tr][idx]), y[tr][idx]).backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        train_loss = float(nn.functional.cross_entropy(model(X[tr]), y[tr]))
    loader = [(X[tr][i : i + 250], y[tr][i : i + 250]) for i in range(0, 1000, 250)]
    la = lk.KronLaplace(model, "classification", fisher="exact", modules=modules).fit(loader)
    report = la.optimize_prior_precision()
    return model, la, report, X[te], y[te], train_loss


@pytest.fixture(scope="module")
def digits_setup():
    return _setup()


def test_overfit_map_is_fixed_by_laplace_under_shift(digits_setup):
    model, la, report, x_te, y_te, train_loss = digits_setup
    assert train_loss < 1e-2  # the MAP interpolates the training data
    assert report["converged"]
    g = torch.Generator().manual_seed(1)
    for kind in ("noise", "shift"):
        xs = _shifted(x_te, kind, g)
        with torch.no_grad():
            p_map = torch.softmax(model(xs), -1)
        p_la = la.predict(xs)
        m_map = metrics.classification_report(p_map, y_te)
        m_la = metrics.classification_report(p_la, y_te)
        assert m_la["nll"] < 0.6 * m_map["nll"], (kind, m_map, m_la)
        assert m_la["ece"] < m_map["ece"] - 0.03, (kind, m_map, m_la)
        assert m_la["brier"] < m_map["brier"], (kind, m_map, m_la)
        assert abs(m_la["accuracy"] - m_map["accuracy"]) < 0.03, (kind, m_map, m_la)


def test_laplace_keeps_accuracy_and_lowers_confidence_in_distribution(digits_setup):
    model, la, _, x_te, y_te, _ = digits_setup
    with torch.no_grad():
        p_map = torch.softmax(model(x_te), -1)
    p_la = la.predict(x_te)
    assert abs(metrics.accuracy(p_la, y_te) - metrics.accuracy(p_map, y_te)) < 0.02
    assert metrics.confidence(p_la).mean() < metrics.confidence(p_map).mean()


def test_validation_tuned_prior_beats_map_in_distribution(digits_setup):
    """With the prior precision tuned on held-out data instead of by marglik, the GLM probit
    predictive beats the MAP on the clean test split too (NLL -15..20% for 6/6 initialisation
    seeds tried, ECE lower for 5/6; this is seed 0)."""
    model, la, _, x_te, y_te, _ = digits_setup
    x_val, y_val, x_test, y_test = x_te[:300], y_te[:300], x_te[300:], y_te[300:]
    marglik_delta = la.prior_precision
    try:
        grid = torch.logspace(0, 4, 17, dtype=torch.float64)
        la.optimize_prior_precision(method="gridsearch", val_loader=[(x_val, y_val)], grid=grid)
        with torch.no_grad():
            m_map = metrics.classification_report(torch.softmax(model(x_test), -1), y_test)
        m_la = metrics.classification_report(la.predict(x_test), y_test)
    finally:
        la.prior_precision = marglik_delta
    assert m_la["nll"] < 0.9 * m_map["nll"], (m_map, m_la)
    assert m_la["ece"] < m_map["ece"], (m_map, m_la)
    assert abs(m_la["accuracy"] - m_map["accuracy"]) < 0.01, (m_map, m_la)


if __name__ == "__main__":  # prints the table quoted in docs/predictive.md
    import time

    torch.set_num_threads(1)
    for modules in (None, "last_layer"):
        t0 = time.perf_counter()
        model, la, _, x_te, y_te, train_loss = _setup(modules)
        t1 = time.perf_counter()
        name = "full" if modules is None else "last-layer"
        print(
            f"\n{name} KFAC Laplace: train NLL {train_loss:.1e}, marglik prior precision "
            f"{float(la.prior_precision):.3g}, train+fit+tune {t1 - t0:.1f} s"
        )
        print("| test data | predictive | accuracy | NLL | ECE | Brier |")
        print("|---|---|---|---|---|---|")
        g = torch.Generator().manual_seed(1)
        for kind in ("clean", "noise", "shift"):
            xs = x_te if kind == "clean" else _shifted(x_te, kind, g)
            with torch.no_grad():
                p_map = torch.softmax(model(xs), -1)
            rows = [("MAP", p_map)] + [
                (f"Laplace GLM {link}", la.predict(xs, link=link, n_samples=1000))
                for link in ("probit", "mc", "bridge_norm", "bridge")
            ]
            for label, p in rows:
                m = metrics.classification_report(p, y_te)
                print(
                    f"| {kind} | {label} | {m['accuracy']:.3f} | {m['nll']:.3f} | "
                    f"{m['ece']:.3f} | {m['brier']:.3f} |"
                )
        # Prior tuned on the first 300 test digits, evaluated on the other 497.
        x_val, y_val, x_test, y_test = x_te[:300], y_te[:300], x_te[300:], y_te[300:]
        with torch.no_grad():
            rows = [("MAP", torch.softmax(model(x_test), -1))]
        rows.append((f"marglik prior {float(la.prior_precision):.3g}", la.predict(x_test)))
        grid = torch.logspace(0, 4, 17, dtype=torch.float64)
        la.optimize_prior_precision(method="gridsearch", val_loader=[(x_val, y_val)], grid=grid)
        rows.append((f"validation prior {float(la.prior_precision):.3g}", la.predict(x_test)))
        print("\n| clean test (497) | accuracy | NLL | ECE | Brier |\n|---|---|---|---|---|")
        for label, p in rows:
            m = metrics.classification_report(p, y_test)
            print(
                f"| {label} | {m['accuracy']:.3f} | {m['nll']:.3f} | {m['ece']:.3f} | "
                f"{m['brier']:.3f} |"
            )
