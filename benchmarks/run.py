#!/usr/bin/env python
"""Benchmark laplace_kron against laplace-torch 0.3 and curvlinops (time, peak memory, agreement).

    .venv/bin/python benchmarks/run.py            # full run, writes docs/benchmarks.md
    .venv/bin/python benchmarks/run.py --quick    # smoke run (small data, 1 repeat), no doc
    .venv/bin/python benchmarks/run.py --models cnn --only "fit|epoch"

Every measured item runs in a fresh worker process (``run.py --worker <task-json>``) that builds
the same model (cached MAP weights), data and loader, runs the item's setup (e.g. the fit a
predictive needs), then measures a warm-up plus the timed repeats: median wall time, and peak
RSS (``VmHWM`` after resetting it) minus the RSS before the warm-up. Agreement with the
references is checked in the same invocation, in float64 on a subset of the training data.
Not part of the test suite (no pytest).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common as C  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
DOC = os.path.join(ROOT, "docs", "benchmarks.md")
BEGIN, END = "<!-- BEGIN GENERATED (benchmarks/run.py) -->", "<!-- END GENERATED -->"

# --------------------------------------------------------------------------------------------
# settings
# --------------------------------------------------------------------------------------------

FULL = {
    "mlp": {"model": "mlp", "n": 1797, "batch_size": 128, "epochs": 30},
    "cnn": {"model": "cnn", "n": 2048, "batch_size": 128, "epochs": 3},
    "wide": {"model": "wide", "n": 2048, "batch_size": 128, "epochs": 2},
}
QUICK_N = 256
# laplace-torch predictive batch sizes (never above 64: its memory grows with the square)
LT_PRED = {"mlp": [32, 64], "cnn": [32, 64], "wide": [8, 64]}
LK_PRED = [32, 64, 1024]
CHECK_N = {"mlp": 512, "cnn": 512, "wide": 128}
LT_BACKENDS = ["AsdlGGN", "CurvlinopsGGN", "BackPackGGN"]
LT_EF = ["AsdlEF", "CurvlinopsEF", "BackPackEF"]


# --------------------------------------------------------------------------------------------
# worker side
# --------------------------------------------------------------------------------------------


def _problem(task):
    return C.build_problem(task["spec"], task["cache_dir"])


def _subset_loader(p, n_batches: int):
    """The first ``n_batches`` batches of the training data (for warm-ups)."""
    n = min(p.n_data, n_batches * p.batch_size)
    return C.make_loader(p.x[:n], p.y[:n], p.batch_size)


def _epoch_fn(p):
    import torch.nn.functional as F

    def epoch():
        for x, y in p.loader:
            p.model.zero_grad(set_to_none=True)
            F.cross_entropy(p.model(x), y, reduction="sum").backward()
        p.model.zero_grad(set_to_none=True)

    return epoch


def _paired_epoch(m, p, repeats: int = 3):
    """Time one fwd+bwd epoch in the same worker, after the item (its peak memory is already
    recorded): the per-process floor for the item's ``× epoch`` ratio."""
    import time as _t

    epoch = _epoch_fn(p)
    epoch()
    ts = []
    for _ in range(repeats):
        t = _t.perf_counter()
        epoch()
        ts.append(_t.perf_counter() - t)
    m.info["epoch_s"] = sorted(ts)[len(ts) // 2]
    return m


def w_epoch(task):
    import torch.nn.functional as F

    p = _problem(task)
    model = p.model

    def epoch(loader=p.loader):
        for x, y in loader:
            model.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y, reduction="sum").backward()
        model.zero_grad(set_to_none=True)

    return C.measure(epoch, epoch, task["repeats"], task["budget_s"])


def w_lk_fit(task):
    import laplace_kron as lk

    p = _problem(task)
    kw = dict(curvature=task["curvature"], fisher=task["fisher"], modules=task.get("modules"))
    kw["separate_bias"] = task.get("separate_bias", False)
    kw["weight_sharing"] = task.get("weight_sharing", "expand")

    def run(loader=p.loader):
        import time as _t

        t0 = _t.perf_counter()
        la = lk.KronLaplace(p.model, "classification", **kw).fit(loader)
        t1 = _t.perf_counter()
        la.log_marginal_likelihood()  # forces the eigendecomposition of every factor
        t2 = _t.perf_counter()
        return {"fit": t1 - t0, "eigh": t2 - t1}

    warm = _subset_loader(p, 2)
    m = C.measure(run, lambda: run(warm), task["repeats"], task["budget_s"])
    return _paired_epoch(m, p)


def _lt_backend(name):
    import laplace.curvature as lc

    return getattr(lc, name)


def _lt_laplace(model, backend, stochastic, prior=1.0):
    from laplace import Laplace

    kw = {"backend_kwargs": {"stochastic": True}} if stochastic else {}
    return Laplace(
        model,
        "classification",
        subset_of_weights="all",
        hessian_structure="kron",
        backend=_lt_backend(backend),
        prior_precision=prior,
        **kw,
    )


def w_lt_fit(task):
    p = _problem(task)

    def run(loader=p.loader):
        ref = _lt_laplace(p.model, task["backend"], task.get("stochastic", False))
        ref.fit(loader)

    warm = _subset_loader(p, 2)
    m = C.measure(run, lambda: run(warm), task["repeats"], task["budget_s"])
    return _paired_epoch(m, p)


def w_cl_kfac(task):
    import torch
    from curvlinops import KFACLinearOperator

    p = _problem(task)
    params = [q for q in p.model.parameters() if q.requires_grad]

    def run(loader=p.loader, n=p.n_data):
        op = KFACLinearOperator(
            p.model,
            torch.nn.CrossEntropyLoss(reduction="sum"),
            params,
            loader,
            fisher_type=task.get("fisher_type", "mc"),
            mc_samples=1,
            check_deterministic=False,
            num_data=n,
            num_per_example_loss_terms=1,
            separate_weight_and_bias=True,
        )
        op.compute_kronecker_factors()

    warm = _subset_loader(p, 2)
    n_warm = min(p.n_data, 2 * p.batch_size)
    m = C.measure(run, lambda: run(warm, n_warm), task["repeats"], task["budget_s"])
    return _paired_epoch(m, p)


def w_lk_tune(task):
    import laplace_kron as lk

    p = _problem(task)
    la = lk.KronLaplace(p.model, "classification", fisher="mc").fit(p.loader)
    la.log_marginal_likelihood()  # eigendecomposition happens once, outside the timing
    rep = {}

    def run():
        la.prior_precision = 1.0
        kw = {"optimizer": task["optimizer"]} if task.get("optimizer") else {}
        rep.update(
            la.optimize_prior_precision(
                method=task.get("method", "marglik"), n_steps=task["n_steps"], **kw
            )
        )

    m = C.measure(run, run, task["repeats"], task["budget_s"])
    m.info.update(
        prior_precision=float(rep["prior_precision"]),
        log_marglik=rep["log_marglik"],
        iterations=rep["iterations"],
        evaluations=rep.get("evaluations"),
    )
    return m


def w_lt_tune(task):
    p = _problem(task)
    ref = _lt_laplace(p.model, task.get("backend", "AsdlGGN"), True)
    ref.fit(p.loader)

    def run():
        ref.optimize_prior_precision(
            method="marglik",
            n_steps=task["n_steps"],
            pred_type="glm",
            init_prior_prec=1.0,
            prior_structure="scalar",
        )

    m = C.measure(run, run, task["repeats"], task["budget_s"])
    m.info.update(prior_precision=float(ref.prior_precision))
    return m


def w_lk_pred(task):
    import torch

    import laplace_kron as lk

    p = _problem(task)
    la = lk.KronLaplace(p.model, "classification", fisher="mc").fit(p.loader)
    la.log_marginal_likelihood()
    x = p.x_test[: task["n_test"]]

    def run():
        with torch.no_grad():
            probs = la.predict(x, method="glm", link="probit")
        assert probs.shape[0] == x.shape[0]

    return C.measure(run, run, task["repeats"], task["budget_s"])


def w_lt_pred(task):
    import torch

    p = _problem(task)
    ref = _lt_laplace(p.model, task.get("backend", "AsdlGGN"), True)
    ref.fit(p.loader)
    x = p.x_test[: task["n_test"]]
    C.cap_address_space(task.get("mem_cap_gb"))

    def run(x=x):
        probs = ref(x, pred_type="glm", link_approx="probit")
        assert probs.shape[0] == x.shape[0]
        del probs
        torch.cuda.empty_cache() if torch.cuda.is_available() else None

    return C.measure(run, lambda: run(x[:2]), task["repeats"], task["budget_s"])


def w_check(task):
    """float64 agreement checks on the first ``n`` training points (not timed)."""
    import torch
    from curvlinops import EKFACLinearOperator, KFACLinearOperator

    import laplace_kron as lk

    torch.set_default_dtype(torch.float64)
    p = _problem(task)
    model = p.model.double()
    n = min(task["n_check"], p.n_data)
    loader = C.make_loader(p.x[:n].double(), p.y[:n], p.batch_size)
    info = {"n_check": n}
    params = list(model.parameters())
    P = sum(q.numel() for q in params)

    def rel(a, b):
        return float((a - b).norm() / b.norm().clamp_min(1e-300))

    clock = {"t": time.perf_counter()}

    def lap(name):
        now = time.perf_counter()
        info.setdefault("check_seconds", {})[name] = round(now - clock["t"], 2)
        clock["t"] = now

    # 1) evidence: fisher="exact", separate_bias=True == laplace-torch's GGN kron
    la = lk.KronLaplace(model, "classification", fisher="exact", separate_bias=True).fit(loader)
    for backend in task["evidence_backends"]:
        try:
            ref = _lt_laplace(model, backend, False)
            ref.fit(loader)
            for d in (1.0, 2.5):
                dt = torch.tensor(d)
                ev_ref = float(ref.log_marginal_likelihood(prior_precision=dt))
                ev = float(la.log_marginal_likelihood(dt))
                info[f"evidence_{backend}_delta{d}"] = [ev, ev_ref, abs(ev - ev_ref) / abs(ev_ref)]
        except Exception as e:  # noqa: BLE001
            info[f"evidence_{backend}_error"] = f"{type(e).__name__}: {str(e)[:200]}"

    lap("evidence")
    # 2) KFAC / EKFAC matvecs against curvlinops (type-2 = our fisher="exact")
    g = torch.Generator().manual_seed(0)
    V = torch.randn(P, 4, generator=g)
    loss = torch.nn.CrossEntropyLoss(reduction="sum")
    for name, Op, fit, sep in (
        ("kfac_separate", KFACLinearOperator, lk.kfac, True),
        ("kfac_joint", KFACLinearOperator, lk.kfac, False),
        ("ekfac_separate", EKFACLinearOperator, lk.ekfac, True),
    ):
        op = Op(
            model,
            loss,
            params,
            loader,
            fisher_type="type-2",
            check_deterministic=False,
            separate_weight_and_bias=sep,
            num_data=n,
            num_per_example_loss_terms=1,
        )
        ref_mv = op @ V
        curv = fit(model, loader, "classification", fisher="exact", separate_bias=sep)
        ours_mv = curv.matvec(V.T).T
        info[f"matvec_{name}"] = rel(ours_mv, ref_mv)

    lap("matvecs")
    # 3) tuned prior precision: 100 Adam steps from 1 (both), and our default optimizer's optimum
    ref = _lt_laplace(model, "AsdlGGN", False)
    ref.fit(loader)
    ref.optimize_prior_precision(
        method="marglik", n_steps=100, pred_type="glm", init_prior_prec=1.0,
        prior_structure="scalar",
    )  # fmt: skip
    d_ref = float(ref.prior_precision)
    ev_ref = float(ref.log_marginal_likelihood())
    la.prior_precision = 1.0
    la.optimize_prior_precision(method="marglik", optimizer="adam", n_steps=100)
    d_adam, ev_adam = float(la.prior_precision), float(la.log_marginal_likelihood())
    la.prior_precision = 1.0
    la.optimize_prior_precision(method="marglik")  # the default optimizer
    d_lbfgs, ev_lbfgs = float(la.prior_precision), float(la.log_marginal_likelihood())
    info["tune"] = {
        "lt_adam": [d_ref, ev_ref],
        "lk_adam": [d_adam, ev_adam],
        "lk_lbfgs": [d_lbfgs, ev_lbfgs],
        "rel_delta_adam": abs(d_adam - d_ref) / d_ref,
    }

    lap("tuning")
    # 4) GLM probit predictive against laplace-torch at the same prior precision
    la.prior_precision = 1.0
    ref.prior_precision = 1.0
    xt = p.x_test[: task["n_pred"]].double()
    ours = la.predict(xt, method="glm", link="probit")
    theirs = ref(xt, pred_type="glm", link_approx="probit")
    info["predictive_max_abs_diff"] = float((ours - theirs).abs().max())
    _, var = lk.predictive.glm_moments(la, xt, diag=True)
    f_mu, f_var = ref._glm_predictive_distribution(xt)
    info["functional_variance_rel"] = rel(var, f_var.diagonal(dim1=-2, dim2=-1))
    lap("predictive")
    # 5) BackPACK after ASDL has hooked the same model in the same process
    try:
        _lt_laplace(model, "BackPackGGN", False).fit(loader)
        info["backpack_after_asdl"] = "ok"
    except Exception as e:  # noqa: BLE001
        info["backpack_after_asdl"] = f"{type(e).__name__}: {str(e)[:200]}"
    lap("backpack")
    return C.Measured(times=[], info=info)


REGISTRY = {
    "epoch": w_epoch,
    "lk_fit": w_lk_fit,
    "lt_fit": w_lt_fit,
    "cl_kfac": w_cl_kfac,
    "lk_tune": w_lk_tune,
    "lt_tune": w_lt_tune,
    "lk_pred": w_lk_pred,
    "lt_pred": w_lt_pred,
    "check": w_check,
}


# --------------------------------------------------------------------------------------------
# parent side: task list
# --------------------------------------------------------------------------------------------


def make_tasks(model: str, args) -> list[dict]:
    spec = dict(FULL[model])
    if args.quick:
        spec.update(n=QUICK_N, epochs=1)
    base = {
        "spec": spec,
        "cache_dir": args.cache_dir,
        "threads": args.threads,
        "repeats": args.repeats,
        "budget_s": args.budget,
    }
    T = []

    def add(name, group, kind, **kw):
        T.append({**base, "name": name, "group": group, "model": model, "kind": kind, **kw})

    add("one epoch fwd+bwd", "floor", "epoch", repeats=max(5, args.repeats))
    for modules, tag in ((None, ""), ("last_layer", " (last layer)")):
        add(f"KFAC mc{tag}", "lk_fit", "lk_fit", curvature="kfac", fisher="mc", modules=modules)
        add(f"KFAC exact{tag}", "lk_fit", "lk_fit", curvature="kfac", fisher="exact",
            modules=modules)  # fmt: skip
        add(f"EKFAC mc{tag}", "lk_fit", "lk_fit", curvature="ekfac", fisher="mc", modules=modules)
    if model != "mlp":  # KFAC-reduce differs from expand only with weight sharing (convolutions)
        add("KFAC mc (reduce)", "lk_fit", "lk_fit", curvature="kfac", fisher="mc",
            weight_sharing="reduce")  # fmt: skip
    if args.ef:
        add("KFAC empirical", "lk_fit", "lk_fit", curvature="kfac", fisher="empirical")
    for b in LT_BACKENDS:
        add(f"{b} exact", "lt_fit", "lt_fit", backend=b, stochastic=False, ours="KFAC exact")
        add(f"{b} mc", "lt_fit", "lt_fit", backend=b, stochastic=True, ours="KFAC mc")
    if args.ef:
        for b in LT_EF:
            add(f"{b}", "lt_fit", "lt_fit", backend=b, stochastic=False, ours="KFAC empirical")
    add("curvlinops KFACLinearOperator mc", "cl_fit", "cl_kfac", fisher_type="mc", ours="KFAC mc")
    n_steps = 100
    add("marglik Adam 100 steps", "lk_tune", "lk_tune", optimizer="adam", n_steps=n_steps,
        repeats=max(3, args.repeats))  # fmt: skip
    add("marglik, default optimizer", "lk_tune", "lk_tune", optimizer=None, n_steps=n_steps,
        repeats=max(3, args.repeats))  # fmt: skip
    add("MacKay fixed point", "lk_tune", "lk_tune", optimizer=None, method="mackay",
        n_steps=n_steps, repeats=max(3, args.repeats))  # fmt: skip
    add("marglik Adam 100 steps", "lt_tune", "lt_tune", n_steps=n_steps,
        repeats=max(3, args.repeats), ours="marglik Adam 100 steps")  # fmt: skip
    lk_sizes = [16, 64] if args.quick else LK_PRED
    lt_sizes = [4] if args.quick else LT_PRED[model]
    for n in sorted(set(lk_sizes + [s for s in lt_sizes if s <= 64])):
        add(f"GLM probit, {n} inputs", "lk_pred", "lk_pred", n_test=n)
    for n in lt_sizes:
        add(f"GLM probit, {n} inputs", "lt_pred", "lt_pred", n_test=n, repeats=1,
            mem_cap_gb=args.mem_cap, timeout=args.lt_pred_timeout,
            ours=f"GLM probit, {n} inputs")  # fmt: skip
    add("agreement checks (float64)", "check", "check", n_check=64 if args.quick else CHECK_N[model],
        n_pred=2 if model == "wide" else 8,
        evidence_backends=["AsdlGGN", "CurvlinopsGGN"], timeout=900)  # fmt: skip
    if args.only:
        rx = re.compile(args.only)
        T = [t for t in T if rx.search(f"{t['group']} {t['name']}")]
    return T


# --------------------------------------------------------------------------------------------
# parent side: formatting
# --------------------------------------------------------------------------------------------


def fmt_t(s):
    if s is None:
        return "–"
    if s < 1e-3:
        return f"{s * 1e6:.0f} µs"
    if s < 1:
        return f"{s * 1e3:.1f} ms"
    return f"{s:.2f} s"


def fmt_x(r):
    if r is None:
        return "–"
    return f"{r:.2f}x" if r < 10 else f"{r:.1f}x"


def fmt_mb(m):
    return "–" if m is None else f"{m:.0f}"


def fmt_load(x):
    """Cores kept busy by other processes while the worker ran (flagged above 0.25)."""
    if x is None:
        return "–"
    return f"**{x:.2f}** †" if x > 0.25 else f"{x:.2f}"


def fmt_e(e):
    return "–" if e is None else f"{e:.1e}"


def summarize(res: dict) -> dict:
    """Medians of a worker result: ``t`` (user-facing call), ``t_full`` (incl. eigh)."""
    out = {"status": res.get("status"), "error": res.get("error")}
    if res.get("status") != "ok":
        return out
    ph = res.get("phases") or {}
    total = C.median(res["times"])
    out["t_full"] = total
    out["t"] = C.median(ph["fit"]) if "fit" in ph else total
    out["t_eigh"] = C.median(ph["eigh"]) if "eigh" in ph else None
    out["n"] = len(res["times"])
    out["mem"] = res.get("peak_extra_mb")
    out["info"] = res.get("info", {})
    out["spread"] = (min(res["times"]), max(res["times"])) if res["times"] else None
    out["foreign"] = res.get("foreign_cores")
    out["epoch"] = out["info"].get("epoch_s")
    return out


GROUP_LABEL = {
    "floor": "floor",
    "lk_fit": "laplace_kron fit",
    "lt_fit": "laplace-torch fit",
    "cl_fit": "curvlinops",
    "lk_tune": "laplace_kron prior",
    "lt_tune": "laplace-torch prior",
    "lk_pred": "laplace_kron predictive",
    "lt_pred": "laplace-torch predictive",
}


def model_table(model: str, rows: list[dict], n_params: int | None) -> tuple[str, dict]:
    """Markdown table of one model and the numbers the goals need."""
    by = {(r["task"]["group"], r["task"]["name"]): summarize(r) for r in rows}
    epoch = by.get(("floor", "one epoch fwd+bwd"), {}).get("t")
    lines = [
        "| what | item | time (median) | incl. eigh | epoch in the same worker | × epoch | "
        "× epoch incl. eigh | peak extra MB | laplace-torch or curvlinops ÷ laplace_kron | reps | "
        "other CPU load |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        t = r["task"]
        g, name = t["group"], t["name"]
        if g == "check":
            continue
        s = by[(g, name)]
        if s["status"] != "ok":
            err = (s.get("error") or "")[:160].replace("|", "/").replace("\n", " ")
            lines.append(f"| {GROUP_LABEL[g]} | {name} | **{s['status']}** | | | | | | | | {err} |")
            continue
        ep = s.get("epoch") or epoch  # the epoch timed in the same worker, if any
        xe = s["t"] / ep if ep else None
        xe_full = s["t_full"] / ep if ep and g in ("lk_fit", "lt_fit") else None
        ratio = None
        if g in ("lt_fit", "lt_tune", "lt_pred", "cl_fit") and t.get("ours"):
            og = {"lt_fit": "lk_fit", "cl_fit": "lk_fit", "lt_tune": "lk_tune"}.get(g, "lk_pred")
            o = by.get((og, t["ours"]), {})
            if o.get("status") == "ok":
                # laplace-torch's fit eigendecomposes the factors: compare with ours incl. eigh;
                # curvlinops only accumulates factors: compare with our fit alone.
                ours_t = o["t_full"] if g == "lt_fit" else o["t"]
                ratio = s["t"] / ours_t
        full = fmt_t(s["t_full"]) if g in ("lk_fit", "lt_fit") else ""
        xe_s = fmt_x(xe) if g not in ("lk_tune", "lt_tune", "lk_pred", "lt_pred") else ""
        lines.append(
            f"| {GROUP_LABEL[g]} | {name} | {fmt_t(s['t'])} | {full} | "
            f"{fmt_t(s['epoch']) if s.get('epoch') else ''} | {xe_s} | "
            f"{fmt_x(xe_full) if xe_full else ''} | {fmt_mb(s['mem'])} | "
            f"{fmt_x(ratio) if ratio else ''} | {s['n']} | {fmt_load(s.get('foreign'))} |"
        )
    return "\n".join(lines), by


def check_table(checks: dict[str, dict]) -> str:
    lines = [
        "| model | data (float64) | log evidence rel. err. vs AsdlGGN (δ=1 / 2.5) | "
        "vs CurvlinopsGGN | KFAC matvec rel. err. vs curvlinops (separate / joint bias) | "
        "EKFAC matvec rel. err. | GLM probit max abs diff | functional variance rel. err. | "
        "tuned δ, 100 Adam steps: ours / laplace-torch (rel. diff) | δ by our default optimizer "
        "(evidence gain over Adam) | "
        "BackPackGGN after AsdlGGN in one process |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for model, res in checks.items():
        if res.get("status") != "ok":
            lines.append(f"| {model} | **{res.get('status')}**: {res.get('error', '')[:150]} |")
            continue
        i = res["info"]

        def ev(b, i=i):
            if f"evidence_{b}_error" in i:
                return "error: " + i[f"evidence_{b}_error"][:60]
            vals = [i.get(f"evidence_{b}_delta{d}") for d in (1.0, 2.5)]
            return " / ".join(fmt_e(v[2]) if v else "–" for v in vals)

        tune = i["tune"]
        gain = tune["lk_lbfgs"][1] - tune["lk_adam"][1]
        lines.append(
            f"| {model} | {i['n_check']} | {ev('AsdlGGN')} | {ev('CurvlinopsGGN')} | "
            f"{fmt_e(i['matvec_kfac_separate'])} / {fmt_e(i['matvec_kfac_joint'])} | "
            f"{fmt_e(i['matvec_ekfac_separate'])} | {fmt_e(i['predictive_max_abs_diff'])} | "
            f"{fmt_e(i['functional_variance_rel'])} | "
            f"{tune['lk_adam'][0]:.4g} / {tune['lt_adam'][0]:.4g} ({fmt_e(tune['rel_delta_adam'])}) | "
            f"{tune['lk_lbfgs'][0]:.4g} ({gain:+.2g} nats) | "
            f"{i.get('backpack_after_asdl', '–')[:110]} |"
        )
    return "\n".join(lines)


def goals(by_model: dict[str, dict]) -> str:
    def get(model, g, name, key="t"):
        s = by_model.get(model, {}).get((g, name), {})
        return s.get(key) if s.get("status") == "ok" else None

    def status(model, g, name):
        s = by_model.get(model, {}).get((g, name), {})
        return s.get("status", "not run")

    lines = ["| goal | model | target | measured | met |", "|---|---|---|---|---|"]

    def row(goal, model, target, measured, ok):
        mark = "–" if ok is None else ("yes" if ok else "**no**")
        lines.append(f"| {goal} | {model} | {target} | {measured} | {mark} |")

    variants = (("KFAC mc", ""), ("KFAC mc (reduce)", " — KFAC-reduce"))
    for item, tag in variants:
        for model in by_model:
            ep = get(model, "lk_fit", item, "epoch") or get(model, "floor", "one epoch fwd+bwd")
            fit = get(model, "lk_fit", item)
            full = get(model, "lk_fit", item, "t_full")
            if ep and fit:
                row(f"KFAC fit (mc, 1 sample) ≤ 1.5× one fwd+bwd epoch{tag}", model, "≤ 1.5x",
                    f"{fit / ep:.2f}x ({fmt_t(fit)} vs an epoch of {fmt_t(ep)} in the same "
                    f"worker); incl. eigh {full / ep:.2f}x", fit / ep <= 1.5)  # fmt: skip
    for item, tag in variants:
        for model in by_model:
            if model == "mlp":
                continue
            full = get(model, "lk_fit", item, "t_full")
            lt = [
                (get(model, "lt_fit", f"{b} {v}"), f"{b} {v}")
                for b in LT_BACKENDS
                for v in ("exact", "mc")
            ]
            lt = [(t, n) for t, n in lt if t]
            if full and lt:
                t, n = min(lt)
                row(f"KFAC fit ≥ 3× faster than laplace-torch's fastest backend{tag}", model,
                    "≥ 3x", f"{t / full:.2f}x (fastest: {n} {fmt_t(t)} vs {item} incl. eigh "
                    f"{fmt_t(full)})", t / full >= 3)  # fmt: skip
    for model in by_model:
        t = get(model, "lk_pred", "GLM probit, 1024 inputs")
        mem = get(model, "lk_pred", "GLM probit, 1024 inputs", "mem")
        if t is not None:
            row("GLM predictive 1,024 inputs < 5 s and < 500 MB extra", model, "< 5 s, < 500 MB",
                f"{fmt_t(t)}, {fmt_mb(mem)} MB", t < 5 and mem < 500)  # fmt: skip
    for model in by_model:
        ours = get(model, "lk_pred", "GLM probit, 64 inputs")
        lt = get(model, "lt_pred", "GLM probit, 64 inputs")
        st = status(model, "lt_pred", "GLM probit, 64 inputs")
        if ours and lt:
            row("GLM predictive ≥ 10× faster than laplace-torch at 64 inputs", model, "≥ 10x",
                f"{lt / ours:.0f}x ({fmt_t(lt)} vs {fmt_t(ours)})", lt / ours >= 10)  # fmt: skip
        elif ours and st != "not run":
            row("GLM predictive ≥ 10× faster than laplace-torch at 64 inputs", model, "≥ 10x",
                f"laplace-torch: {st} (ours {fmt_t(ours)})", True)  # fmt: skip
    for model in by_model:
        for name in ("marglik, default optimizer", "marglik Adam 100 steps"):
            t = get(model, "lk_tune", name)
            if t is not None and model == "wide":
                row(f"prior tuning ≤ 50 ms ({name})", model, "≤ 50 ms", fmt_t(t), t <= 0.05)
    return "\n".join(lines)


def machine_info(args) -> str:
    cpu = "?"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    import torch

    vers = {}
    for mod in ("laplace", "curvlinops", "asdfghjkl", "backpack"):
        try:
            from importlib.metadata import version

            dist = {
                "laplace": "laplace-torch",
                "curvlinops": "curvlinops-for-pytorch",
                "asdfghjkl": "asdfghjkl",
                "backpack": "backpack-for-pytorch",
            }[mod]
            vers[dist] = version(dist)
        except Exception:  # noqa: BLE001
            vers[mod] = "not installed"
    v = ", ".join(f"{k} {x}" for k, x in vers.items())
    return (
        f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} "
        f"({args.threads} threads per worker), Python {platform.python_version()}; {v}"
    )


def git_state() -> str:
    """The last commit touching ``laplace_kron/`` (the measured code), with ``+uncommitted`` if
    the working tree of ``laplace_kron/`` differs from it."""
    import subprocess

    def git(*a):
        return subprocess.run(["git", "-C", ROOT, *a], capture_output=True, text=True).stdout

    try:
        head = git("log", "-1", "--format=%h", "--", "laplace_kron").strip() or "unknown"
        dirty = git("status", "--porcelain", "--", "laplace_kron").strip()
        return head + (" +uncommitted changes" if dirty else "")
    except OSError:
        return "unknown"


def write_doc(path: str, generated: str) -> None:
    body = f"{BEGIN}\n{generated.rstrip()}\n{END}\n"
    if os.path.exists(path):
        with open(path) as f:
            old = f.read()
        if BEGIN in old and END in old:
            pre, rest = old.split(BEGIN, 1)
            post = rest.split(END, 1)[1]
            new = pre + body + "\n" + post.lstrip("\n")
        else:
            new = old.rstrip() + "\n\n" + body
    else:
        new = "# Benchmarks\n\n" + body
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(new)
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--quick", action="store_true", help="smoke run: 256 data, 1 repeat, no doc")
    ap.add_argument("--models", default="mlp,cnn,wide")
    ap.add_argument("--only", help="regex on '<group> <item name>' to run a subset")
    ap.add_argument("--repeats", type=int, default=None, help="timed repeats (default 3; quick 1)")
    ap.add_argument("--budget", type=float, default=60.0, help="max seconds of timed repeats")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ef", action="store_true", help="also the empirical-Fisher variants")
    ap.add_argument("--mem-cap", type=float, default=12.0, help="GB cap (RLIMIT_AS) for "
                    "laplace-torch predictive workers")  # fmt: skip
    ap.add_argument("--lt-pred-timeout", type=float, default=240.0)
    ap.add_argument("--timeout", type=float, default=900.0, help="per-worker timeout (s)")
    ap.add_argument("--cache-dir", default=None, help="where MAP weights are cached")
    ap.add_argument("--doc", default=None, help=f"markdown output (default {DOC}; quick: none)")
    ap.add_argument("--json", default=None, help="raw results (default benchmarks/results/)")
    ap.add_argument("--wait-load", type=float, default=None,
                    help="wait until the 1-min load average is below this before starting")  # fmt: skip
    ap.add_argument("--max-wait", type=float, default=2400.0)
    ap.add_argument(
        "--retries",
        type=int,
        default=2,
        help="re-run an item (after waiting for a quiet CPU) if other processes used > 0.25 "
        "cores during it",
    )
    args = ap.parse_args(argv)
    if args.repeats is None:
        args.repeats = 1 if args.quick else 3
    return args


def main(argv=None) -> int:
    args = parse(argv)
    if args.worker:
        C.worker_main(args.worker, REGISTRY)
        return 0
    import torch

    torch.set_num_threads(args.threads)
    tmp = None
    if args.cache_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="lk-bench-")
        args.cache_dir = tmp.name
    if args.wait_load:
        C.wait_for_quiet(args.wait_load, args.max_wait)
    load_start = C.load_average()
    t_start = time.time()
    foreign_all = C.ForeignLoad()
    git_start = git_state()
    print(f"# load average at start: {load_start[0]:.2f} {load_start[1]:.2f} {load_start[2]:.2f}")
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    results: dict[str, list[dict]] = {}
    n_params: dict[str, int] = {}
    for model in models:
        tasks = make_tasks(model, args)
        # build (and train) once in the parent so that workers share the cached MAP weights
        t = time.time()
        prob = C.build_problem(tasks[0]["spec"] if tasks else FULL[model], args.cache_dir)
        n_params[model] = prob.n_params
        print(f"## {model}: {prob.n_params:,} parameters, {prob.n_data} data "
              f"(MAP weights ready in {time.time() - t:.1f} s)", flush=True)  # fmt: skip
        del prob
        results[model] = []
        for task in tasks:
            timeout = task.get("timeout", args.timeout)
            res = C.run_worker_retry(
                os.path.abspath(__file__), task, timeout, retries=args.retries, log=print
            )
            results[model].append(res)
            s = summarize(res)
            if s["status"] == "ok":
                extra = f" (incl. eigh {fmt_t(s['t_full'])})" if s.get("t_eigh") is not None else ""
                msg = f"{fmt_t(s['t'])}{extra}, +{fmt_mb(s['mem'])} MB, n={s['n']}"
                if task["kind"] == "check":
                    msg = json.dumps(s["info"], default=float)[:600]
            else:
                msg = f"{s['status']}: {(s.get('error') or '')[:200]}"
            print(f"  [{task['group']}] {task['name']}: {msg}  "
                  f"(worker {res.get('process_s', 0):.1f} s)", flush=True)  # fmt: skip
    load_end = C.load_average()
    elapsed = time.time() - t_start
    foreign_mean = foreign_all.stop()
    git_end = git_state()
    code = (
        f"`{git_start}`" if git_start == git_end else f"`{git_start}` at start, `{git_end}` at end"
    )

    # ---------------------------------------------------------------- report
    by_model = {}
    parts = []
    checks = {}
    for model in models:
        table, by = model_table(model, results[model], n_params.get(model))
        by_model[model] = by
        spec = dict(FULL[model])
        if args.quick:
            spec["n"] = QUICK_N
        parts.append(
            f"### {model}: {C.MODEL_INFO[model]}\n\n{n_params[model]:,} parameters; "
            f"{min(spec['n'], 1797) if model == 'mlp' else spec['n']} training inputs, "
            f"batch {spec['batch_size']}.\n\n{table}\n"
        )
        for r in results[model]:
            if r["task"]["kind"] == "check":
                checks[model] = r
    cmd = "make benchmarks" if not args.quick else "benchmarks/run.py --quick"
    gen = [
        f"_Generated by `{cmd}` (`.venv/bin/python benchmarks/run.py"
        f"{' --quick' if args.quick else ''}`) on {time.strftime('%Y-%m-%d %H:%M')}; "
        f"{elapsed / 60:.1f} min._\n",
        f"Measured code: laplace_kron/ at {code} (last commit touching it).  ",
        f"Machine: {machine_info(args)}.  ",
        f"Load average (1/5/15 min) at start: {load_start[0]:.2f} / {load_start[1]:.2f} / "
        f"{load_start[2]:.2f}; at end: {load_end[0]:.2f} / {load_end[1]:.2f} / {load_end[2]:.2f} "
        f"(the load average includes the benchmark's own worker, 2 threads). CPU used by other "
        f"processes during the run (from `/proc/stat` minus the benchmark's own CPU time): "
        f"{foreign_mean:.2f} cores on average; per item in the last column (†: > 0.25 cores, "
        f"timing less reliable).\n",
        "### Goals (issue 8)\n",
        goals(by_model) + "\n",
        "### Agreement with the references (same run)\n",
        check_table(checks) + "\n",
        *parts,
    ]
    generated = "\n".join(gen)
    print()
    print(generated)
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    jpath = args.json or os.path.join(
        HERE, "results", "quick.json" if args.quick else "latest.json"
    )
    with open(jpath, "w") as f:
        json.dump(
            {
                "args": vars(args),
                "load_start": load_start,
                "load_end": load_end,
                "elapsed_s": elapsed,
                "n_params": n_params,
                "results": results,
            },
            f,
            indent=1,
            default=float,
        )
    doc = args.doc or (None if args.quick else DOC)
    if doc:
        write_doc(doc, generated)
        print(f"\nwrote {doc} and {jpath}")
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
