#!/usr/bin/env python
"""The GLM predictive with many classes: a 1,000-class last layer on 128 features.

    .venv/bin/python benchmarks/many_classes.py [--classes 1000] [--features 128]
        [--test 10000] [--threads 1] [--lt-inputs 50] [--repeats 3]

Model: features ``Linear(64, 128) + ReLU`` (random, fixed) and a trained ``Linear(128, C)`` head
on synthetic Gaussian classes (``C`` prototypes in 64 dimensions, noise 1), float32.
``KronLaplace(model, "classification", modules="last_layer")`` (KFAC, exact Fisher), prior by
grid search on 1,000 validation inputs. Reported per link: time for all ``--test`` inputs
(median of ``--repeats`` after a warm-up), accuracy, and the peak extra memory during one call:
the high-water mark of live CPU tensor allocations (torch profiler allocation events, as in
``glm_predictive_memory.py``; the tensors the call returns count, the inputs do not).

laplace-torch's ``KronLLLaplace`` (``Laplace(model, "classification",
subset_of_weights="last_layer", hessian_structure="kron")``) is run on the same model and data:
its GLM predictive forms the last-layer Jacobians ``[B, C, P]`` (P = 129,000 here: 516 MB per
input in float32), so it is timed on ``--lt-inputs`` inputs and extrapolated linearly (marked
``*``); its ``diagonal_output=True`` variance path is timed on all inputs where it runs. Its fit
uses the first ``--lt-train`` training inputs (its fit of all 20,000 takes over 10 minutes here;
the predictive's cost does not depend on it).
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from glm_predictive_memory import median_time, peak_cpu_bytes  # noqa: E402

import laplace_kron as lk  # noqa: E402
from laplace_kron.constants import LINKS  # noqa: E402


def synthetic(C: int, D: int, n_train: int, n_test: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(C, 64, generator=g)

    def draw(n):
        y = torch.randint(0, C, (n,), generator=g)
        return means[y] + torch.randn(n, 64, generator=g), y

    torch.manual_seed(seed)
    feats = nn.Sequential(nn.Linear(64, D), nn.ReLU())
    head = nn.Linear(D, C)
    xtr, ytr = draw(n_train)
    with torch.no_grad():
        ftr = feats(xtr)
    opt = torch.optim.Adam(head.parameters(), 1e-2, weight_decay=1e-4)
    for _ in range(30):
        for i in range(0, n_train, 1000):
            loss = nn.functional.cross_entropy(head(ftr[i : i + 1000]), ytr[i : i + 1000])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model = nn.Sequential(feats, head).eval()
    return model, (xtr, ytr), draw(1000), draw(n_test)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--features", type=int, default=128)
    ap.add_argument("--test", type=int, default=10000)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--lt-inputs", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--mc-samples", type=int, default=100)
    ap.add_argument("--no-laplace-torch", action="store_true")
    # laplace-torch's fit of 20 C inputs takes > 10 min here; its predictive cost does not
    # depend on how many inputs the curvature was fitted on.
    ap.add_argument("--lt-train", type=int, default=1000)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    C, D = args.classes, args.features
    model, (xtr, ytr), (xv, yv), (xt, yt) = synthetic(C, D, 20 * C, args.test)
    print(f"torch {torch.__version__}, {args.threads} threads, C={C}, features={D}, test={len(xt)}")
    with torch.no_grad():
        map_acc = float((model(xt).argmax(-1) == yt).float().mean())
    print(f"MAP accuracy {map_acc:.3f}")
    loader = [(xtr[i : i + 1000], ytr[i : i + 1000]) for i in range(0, len(xtr), 1000)]
    la = lk.KronLaplace(model, "classification", modules="last_layer").fit(loader)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        la.optimize_prior_precision(
            method="gridsearch", val_loader=[(xv, yv)], grid=torch.logspace(-2, 6, 17)
        )
    prior = float(la.prior_precision)
    print(f"prior precision (grid search on validation) {prior:.3g}")
    print("\n| predictive | inputs | time | per 10k inputs | peak extra memory | accuracy |")
    print("|---|---|---|---|---|---|")
    for link in LINKS:
        kw = dict(link=link, n_samples=args.mc_samples, generator=torch.Generator().manual_seed(0))
        t = median_time(lambda kw=kw: la.predict(xt, **kw), args.repeats)
        peak = peak_cpu_bytes(lambda kw=kw: la.predict(xt, **kw))
        acc = float((la.predict(xt, **kw).argmax(-1) == yt).float().mean())
        per = t * 10000 / len(xt)
        print(
            f"| laplace_kron {link} | {len(xt)} | {t:.2f} s | {per:.2f} s | {peak / 1e6:.0f} MB "
            f"| {acc:.3f} |"
        )
    if args.no_laplace_torch:
        return
    try:
        import laplace
    except ImportError:
        print("laplace-torch not installed: skipped")
        return
    sub = torch.utils.data.TensorDataset(xtr[: args.lt_train], ytr[: args.lt_train])
    tl = torch.utils.data.DataLoader(sub, batch_size=100)
    lt = laplace.Laplace(
        model, "classification", subset_of_weights="last_layer", hessian_structure="kron"
    )
    t0 = time.perf_counter()
    lt.fit(tl)
    print(f"laplace-torch fit {time.perf_counter() - t0:.1f} s", flush=True)
    lt.prior_precision = prior
    n = min(args.lt_inputs, len(xt))
    for link in ("probit", "bridge", "bridge_norm"):
        fn = lambda link=link: lt(xt[:n], pred_type="glm", link_approx=link)  # noqa: E731
        t = median_time(fn, 1)
        peak = peak_cpu_bytes(fn)
        acc = float((fn().argmax(-1) == yt[:n]).float().mean())
        print(
            f"| laplace-torch KronLLLaplace {link} | {n} | {t:.2f} s | {t * 10000 / n:.0f} s* "
            f"| {peak / 1e6:.0f} MB | {acc:.3f} |"
        )
    try:
        fn = lambda: lt(xt, pred_type="glm", link_approx="probit", diagonal_output=True)  # noqa: E731
        t = median_time(fn, 1)
        peak = peak_cpu_bytes(fn)
        acc = float((fn().argmax(-1) == yt).float().mean())
        print(
            f"| laplace-torch KronLLLaplace probit, diagonal_output=True | {len(xt)} | {t:.2f} s "
            f"| {t * 10000 / len(xt):.2f} s | {peak / 1e6:.0f} MB | {acc:.3f} |"
        )
    except Exception as e:  # noqa: BLE001
        print(f"laplace-torch diagonal_output: {type(e).__name__}: {e}")


if __name__ == "__main__":
    main()
