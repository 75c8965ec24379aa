#!/usr/bin/env python
"""Profiles behind the hot spots named in docs/benchmarks.md (run on a quiet machine).

    .venv/bin/python benchmarks/profile_hotspots.py fit --model cnn [--fisher mc|exact]
    .venv/bin/python benchmarks/profile_hotspots.py eigh --model wide
    .venv/bin/python benchmarks/profile_hotspots.py tune --model wide
    .venv/bin/python benchmarks/profile_hotspots.py predict --model cnn --n 1024

* ``fit``: torch.profiler operator table (grouped by input shape) and cProfile callers of
  ``torch.cat`` / ``torch.stack`` for one KFAC fit, next to one fwd+bwd epoch.
* ``eigh``: per-factor ``eigh`` time in float64 (what laplace_kron does) and float32 (what
  laplace-torch does), 1 and 2 threads, and the fraction of (clamped) zero eigenvalues.
* ``tune``: the default (Newton on ``log delta``) and Adam tuning, one evidence + gradient
  evaluation, and one pass over the compressed spectrum per kind of sum.
* ``predict``: operator table of the GLM probit predictive.

Same models, data and cached MAP weights as ``benchmarks/run.py`` (``--cache-dir``).
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import sys
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common as C  # noqa: E402
import run as R  # noqa: E402


def _median_time(fn, n=5):
    fn()
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return sorted(ts)[n // 2]


def prof_fit(p, args):
    import torch
    import torch.nn.functional as F
    from torch.profiler import ProfilerActivity, profile

    import laplace_kron as lk

    def epoch():
        for x, y in p.loader:
            p.model.zero_grad(set_to_none=True)
            F.cross_entropy(p.model(x), y, reduction="sum").backward()

    def fit():
        return lk.KronLaplace(p.model, "classification", fisher=args.fisher).fit(p.loader)

    te, tf = _median_time(epoch), _median_time(fit)
    print(f"epoch {te * 1e3:.1f} ms, KFAC {args.fisher} fit {tf * 1e3:.1f} ms ({tf / te:.2f}x)")
    for name, fn in (("epoch", epoch), ("fit", fit)):
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            fn()
        print(f"\n===== torch.profiler: {name} (grouped by input shape)")
        print(
            prof.key_averages(group_by_input_shape=True).table(
                sort_by="self_cpu_time_total",
                row_limit=args.rows,
                max_name_column_width=26,
                max_shapes_column_width=60,
            )
        )
    pr = cProfile.Profile()
    pr.enable()
    fit()
    pr.disable()
    print("\n===== cProfile: fit")
    st = pstats.Stats(pr)
    st.sort_stats("tottime").print_stats(args.rows)
    st.print_callers("cat|stack")
    del torch


def prof_eigh(p, args):
    import torch

    import laplace_kron as lk

    la = lk.KronLaplace(p.model, "classification", fisher="mc").fit(p.loader)
    total = {"f64 2t": 0.0, "f32 2t": 0.0, "f64 1t": 0.0}
    n_threads = torch.get_num_threads()
    for b in la.curvature.blocks:
        for fname, Fm in (("G", b.G), ("A", b.A)):
            if Fm is None:
                continue
            row = {}
            for key, dt, th in (
                ("f64 2t", torch.float64, n_threads),
                ("f32 2t", torch.float32, n_threads),
                ("f64 1t", torch.float64, 1),
            ):
                torch.set_num_threads(th)
                M = Fm.to(dt)
                row[key] = _median_time(lambda M=M: torch.linalg.eigh(M), 3)
                total[key] += row[key]
            torch.set_num_threads(n_threads)
            ev = torch.linalg.eigvalsh(Fm.double())
            zero = float((ev < 1e-12 * ev.abs().max()).double().mean())
            times = ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in row.items())
            print(f"{b.param_names[0]:>12} {fname} {tuple(Fm.shape)}: {times}; zero eig {zero:.0%}")
    print("total:", ", ".join(f"{k} {v:.3f} s" for k, v in total.items()))


def prof_tune(p, args):
    import torch

    import laplace_kron as lk

    la = lk.KronLaplace(p.model, "classification", fisher="mc").fit(p.loader)
    la.log_marginal_likelihood()
    for opt in ("newton", "lbfgs", "adam"):

        def run(opt=opt):
            la.prior_precision = 1.0
            return la.optimize_prior_precision(optimizer=opt)

        rep = run()
        print(
            f"marglik {opt}: {_median_time(run, 3) * 1e3:.1f} ms, {rep['iterations']} iterations, "
            f"{rep.get('evaluations')} evaluations, delta {float(rep['prior_precision']):.6g}"
        )
    d = torch.tensor(1.0, dtype=torch.float64, requires_grad=True)

    def one():
        la.log_marginal_likelihood(d).backward()

    print(f"one evidence + gradient: {_median_time(one, 10) * 1e3:.1f} ms")
    spec = la.spectrum()
    P, n0 = spec.n_params, spec.n_params - spec.eigs.numel()
    print(f"spectrum: {P:,} eigenvalues, {n0:,} exactly zero ({n0 / P:.0%}), kept {P - n0:,}")
    deltas = torch.ones(spec.n_blocks, dtype=torch.float64)
    c = float(la.precision_scale())
    for powers in (("r", "r2"), ("log", "r"), ("log",)):
        t = _median_time(lambda powers=powers: spec.sums(c, deltas, powers), 10)
        print(f"one pass over the spectrum for {powers}: {t * 1e3:.1f} ms")
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(10):
        one()
    pr.disable()
    pstats.Stats(pr).sort_stats("tottime").print_stats(6)


def prof_predict(p, args):
    import torch
    from torch.profiler import ProfilerActivity, profile

    import laplace_kron as lk

    la = lk.KronLaplace(p.model, "classification", fisher="mc").fit(p.loader)
    la.log_marginal_likelihood()
    x = p.x_test[: args.n]

    def run():
        with torch.no_grad():
            la.predict(x)

    print(f"GLM probit, {args.n} inputs: {_median_time(run, 3) * 1e3:.1f} ms")
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        run()
    print(
        prof.key_averages(group_by_input_shape=True).table(
            sort_by="self_cpu_time_total",
            row_limit=args.rows,
            max_name_column_width=26,
            max_shapes_column_width=60,
        )
    )


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("what", choices=["fit", "eigh", "tune", "predict"])
    ap.add_argument("--model", default="cnn", choices=list(R.FULL))
    ap.add_argument("--fisher", default="mc")
    ap.add_argument("--n", type=int, default=1024)
    ap.add_argument("--rows", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--cache-dir", default=os.path.join(os.path.expanduser("~"), ".cache", "lk-bench")
    )
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    import torch

    torch.set_num_threads(args.threads)
    p = C.build_problem(R.FULL[args.model], args.cache_dir)
    {"fit": prof_fit, "eigh": prof_eigh, "tune": prof_tune, "predict": prof_predict}[args.what](
        p, args
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
