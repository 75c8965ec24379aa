#!/usr/bin/env python
"""How the KFAC fit (and the GLM predictive) grow with data size, width and number of classes.

    .venv/bin/python benchmarks/scaling.py           # writes the generated part of docs/scaling.md
    .venv/bin/python benchmarks/scaling.py --quick   # fewer, smaller points; no doc

Every point runs in a fresh worker (``scaling.py --worker``), exactly as in ``benchmarks/run.py``
(same task implementations): median wall time over repeats after a warm-up, and the peak RSS
above the RSS after building model and data. Slopes are least-squares fits of log(time) and
log(memory) against log(size).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common as C  # noqa: E402
import run as R  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
DOC = os.path.join(os.path.dirname(HERE), "docs", "scaling.md")
BEGIN, END = "<!-- BEGIN GENERATED (benchmarks/scaling.py) -->", "<!-- END GENERATED -->"


def studies(quick: bool) -> list[dict]:
    """Each study: a varied quantity, its values, and a spec builder."""
    if quick:
        ns, widths, classes, preds, lt_preds = [256, 512], [64, 128], [10, 40], [64, 256], [4, 8]
    else:
        ns = [256, 512, 1024, 2048, 4096, 8192]
        widths = [128, 256, 512, 1024, 2048]
        classes = [10, 30, 100, 300, 1000]
        preds = [64, 256, 1024, 4096]
        lt_preds = [8, 16, 32]
    return [
        {
            "key": "data",
            "label": "training inputs N (CNN of the benchmark, batch 128)",
            "values": ns,
            "spec": lambda n: {"model": "cnn", "n": n, "batch_size": 128, "epochs": 1},
            "items": ["epoch", "kfac_mc"],
        },
        {
            "key": "width",
            "label": "hidden width w (MLP 256-w-w-10, N = 2048, batch 128)",
            "values": widths,
            "spec": lambda w: {
                "model": "smlp",
                "n": 2048,
                "batch_size": 128,
                "epochs": 1,
                "width": w,
                "classes": 10,
                "d_in": 256,
            },  # fmt: skip
            "items": ["epoch", "kfac_mc"],
        },
        {
            "key": "classes",
            "label": "classes C (MLP 256-256-256-C, N = 2048, batch 128)",
            "values": classes,
            "spec": lambda c: {
                "model": "smlp",
                "n": 2048,
                "batch_size": 128,
                "epochs": 1,
                "width": 256,
                "classes": c,
                "d_in": 256,
            },  # fmt: skip
            "items": ["epoch", "kfac_mc", "kfac_exact"],
        },
        {
            "key": "test",
            "label": "test inputs B of the GLM probit predictive (CNN)",
            "values": preds,
            "spec": lambda b: {"model": "cnn", "n": 2048, "batch_size": 128, "epochs": 3},
            "items": ["lk_pred"],
        },
        {
            "key": "lt_test",
            "label": "test inputs B of laplace-torch's GLM probit predictive (CNN, ASDL)",
            "values": lt_preds,
            "spec": lambda b: {"model": "cnn", "n": 2048, "batch_size": 128, "epochs": 3},
            "items": ["lt_pred"],
        },
    ]


ITEM = {
    "epoch": ("one epoch fwd+bwd", {"kind": "epoch"}),
    "kfac_mc": ("KFAC mc fit", {"kind": "lk_fit", "curvature": "kfac", "fisher": "mc"}),
    "kfac_exact": ("KFAC exact fit", {"kind": "lk_fit", "curvature": "kfac", "fisher": "exact"}),
    "lk_pred": ("laplace_kron GLM probit", {"kind": "lk_pred"}),
    "lt_pred": ("laplace-torch GLM probit", {"kind": "lt_pred", "repeats": 1}),
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", default=None, help="comma-separated study keys")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cache-dir", default=None)
    ap.add_argument("--doc", default=None)
    ap.add_argument("--mem-cap", type=float, default=12.0)
    ap.add_argument("--retries", type=int, default=2)
    args = ap.parse_args(argv)
    if args.worker:
        C.worker_main(args.worker, R.REGISTRY)
        return 0
    repeats = args.repeats or (1 if args.quick else 3)
    tmp = None
    if args.cache_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="lk-scaling-")
        args.cache_dir = tmp.name
    load_start = C.load_average()
    git_start = R.git_state()
    t0 = time.time()
    keys = set(args.only.split(",")) if args.only else None
    out = {}
    for st in studies(args.quick):
        if keys and st["key"] not in keys:
            continue
        print(f"## {st['label']}", flush=True)
        rows = []
        for v in st["values"]:
            spec = st["spec"](v)
            C.build_problem(spec, args.cache_dir)  # train / cache once
            row = {"x": v}
            for item in st["items"]:
                name, kw = ITEM[item]
                task = {
                    "spec": spec,
                    "cache_dir": args.cache_dir,
                    "threads": args.threads,
                    "repeats": repeats,
                    "budget_s": 30.0,
                    "name": name,
                    **kw,
                }
                if item in ("lk_pred", "lt_pred"):
                    task["n_test"] = v
                    task["spec"] = {**spec, "n_test": max(1024, v)}
                if item == "lt_pred":
                    task["mem_cap_gb"] = args.mem_cap
                res = C.run_worker_retry(
                    os.path.abspath(__file__),
                    task,
                    300 if item == "lt_pred" else 900,
                    retries=args.retries,
                    log=print,
                )
                s = R.summarize(res)
                row[item] = s
                msg = (
                    f"{R.fmt_t(s['t'])} (incl. eigh {R.fmt_t(s['t_full'])}), +{R.fmt_mb(s['mem'])} MB"
                    if s["status"] == "ok"
                    else f"{s['status']}: {(s.get('error') or '')[:150]}"
                )
                print(f"  {st['key']}={v} {name}: {msg}", flush=True)
            rows.append(row)
        out[st["key"]] = {"label": st["label"], "items": st["items"], "rows": rows}
    load_end = C.load_average()
    args.code = git_start if git_start == R.git_state() else f"{git_start} (changed during the run)"
    gen = render(out, load_start, load_end, time.time() - t0, args)
    print()
    print(gen)
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    with open(os.path.join(HERE, "results", "scaling_quick.json" if args.quick else "scaling.json"),
              "w") as f:  # fmt: skip
        json.dump({"studies": out, "load": [load_start, load_end]}, f, indent=1, default=float)
    doc = args.doc or (None if args.quick else DOC)
    if doc:
        R.BEGIN, R.END = BEGIN, END
        R.write_doc(doc, gen)
        print(f"wrote {doc}")
    if tmp is not None:
        tmp.cleanup()
    return 0


def flag(s: dict) -> str:
    """Mark points during which other processes kept more than 0.25 cores busy."""
    f = s.get("foreign")
    return f" †({f:.1f})" if f is not None and f > 0.25 else ""


def render(out: dict, load_start, load_end, elapsed: float, args) -> str:
    parts = [
        f"_Generated by `.venv/bin/python benchmarks/scaling.py{' --quick' if args.quick else ''}` "
        f"on {time.strftime('%Y-%m-%d %H:%M')} ({elapsed / 60:.1f} min, {args.threads} threads per "
        f"worker). Load average (1/5/15 min) at start: {load_start[0]:.2f} / {load_start[1]:.2f} / "
        f"{load_start[2]:.2f}; at end: {load_end[0]:.2f} / {load_end[1]:.2f} / "
        f"{load_end[2]:.2f}"
        f" (the load average includes the benchmark's own 2-thread worker). † (x): other "
        f"processes kept x cores busy while that point ran (after up to {args.retries} retries), "
        f"so its time is less reliable. Measured code: laplace_kron at `{args.code}`._\n"
    ]
    for st in out.values():
        items = st["items"]
        head = ["x"]
        for it in items:
            name = ITEM[it][0]
            if it in ("kfac_mc", "kfac_exact"):
                head += [f"{name} (s)", "incl. eigh (s)", "× epoch", "peak extra MB"]
            elif it == "epoch":
                head += ["epoch (s)", "epoch peak MB"]
            else:
                head += [f"{name} (s)", "peak extra MB"]
        lines = [f"### {st['label']}\n", "| " + " | ".join(head) + " |",
                 "|" + "---:|" * len(head)]  # fmt: skip
        series: dict[str, list] = {}
        for row in st["rows"]:
            cells = [f"{row['x']:,}"]
            ep = row.get("epoch", {}).get("t")
            for it in items:
                s = row[it]
                ok = s.get("status") == "ok"
                if it in ("kfac_mc", "kfac_exact"):
                    if ok:
                        cells += [f"{s['t']:.3f}{flag(s)}", f"{s['t_full']:.3f}",
                                  R.fmt_x(s["t"] / ep) if ep else "–", R.fmt_mb(s["mem"])]  # fmt: skip
                    else:
                        cells += [f"**{s.get('status')}**", "", "", ""]
                else:
                    cells += (
                        [f"{s['t']:.3f}{flag(s)}", R.fmt_mb(s["mem"])]
                        if ok
                        else [f"**{s['status']}**", ""]
                    )
                if ok:
                    series.setdefault(f"{it}:t", []).append((row["x"], s["t"]))
                    series.setdefault(f"{it}:mem", []).append((row["x"], s["mem"]))
                    if it in ("kfac_mc", "kfac_exact"):
                        series.setdefault(f"{it}:t_full", []).append((row["x"], s["t_full"]))
            lines.append("| " + " | ".join(cells) + " |")
        slopes = []
        for k, pts in series.items():
            it, what = k.split(":")
            sl = C.loglog_slope([p[0] for p in pts], [p[1] for p in pts])
            label = {"t": "time", "t_full": "time incl. eigh", "mem": "peak extra memory"}[what]
            if sl is not None:
                slopes.append(f"{ITEM[it][0]} {label}: **{sl:.2f}**")
        lines.append("")
        lines.append("Fitted log-log slopes: " + "; ".join(slopes) + ".\n")
        parts.append("\n".join(lines))
    return "\n".join(parts)


if __name__ == "__main__":
    sys.exit(main())
