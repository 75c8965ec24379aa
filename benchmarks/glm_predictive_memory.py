#!/usr/bin/env python
"""Peak memory and time of the Jacobian-free GLM predictive against a full-Jacobian computation.

    .venv/bin/python benchmarks/glm_predictive_memory.py [--widths 256 512 1024 2048] [--batch 32]
        [--repeats 3] [--threads 1] [--max-jacobian-gb 1.0]

Model: MLP 784 -> w -> w -> 10 (float32, all layers KFAC, joint bias), B test inputs, C = 10.

* ``kron``: :func:`laplace_kron.predictive.functional_variance` / ``functional_covariance``
  (per-layer eigenbasis formula, rank-one per example, never forms a Jacobian);
* ``full-J``: the textbook route, ``J = jacrev(f)(theta)`` ``[B, C, P]`` (torch.func, vmapped
  reverse mode) followed by ``diag(J Sigma J^T)`` with ``Sigma J^T`` applied block-wise in the
  Kronecker eigenbasis. Skipped when ``J`` alone would exceed ``--max-jacobian-gb``.

Peak memory is the high-water mark of live CPU tensor allocations during the call (torch profiler
allocation events); time is the median of ``--repeats`` calls after a warm-up. Eigendecompositions
of the factors are done before measuring (both routes share them).
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time

import torch
from torch import nn
from torch._C._profiler import _EventType
from torch.func import functional_call, jacrev
from torch.profiler import ProfilerActivity, profile

import laplace_kron as lk
from laplace_kron.predictive import functional_covariance, functional_variance


def peak_cpu_bytes(fn) -> int:
    """High-water mark of live CPU tensor memory allocated while ``fn()`` runs."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = []

    def walk(node):
        if node.tag == _EventType.Allocation:
            events.append((node.start_time_ns, node.extra_fields.alloc_size))
        for child in node.children:
            walk(child)

    for root in prof.profiler.kineto_results.experimental_event_tree():
        walk(root)
    events.sort()
    return max(itertools.accumulate(s for _, s in events), default=0)


def median_time(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def full_jacobian_variance(la: lk.KronLaplace, x: torch.Tensor) -> torch.Tensor:
    """``diag(J Sigma J^T)`` through the dense Jacobian ``[B, C, P]``."""
    model = la.model
    names = la.param_names
    params = {n: p.detach() for n, p in model.named_parameters()}
    jac = jacrev(lambda p: functional_call(model, p, (x,)))({n: params[n] for n in names})
    B, C = x.shape[0], jac[names[0]].shape[1]
    J = torch.cat([jac[n].reshape(B, C, -1) for n in names], dim=2)  # [B, C, P]
    del jac
    SJ = la.curvature.inv_matvec(J.reshape(B * C, -1), *la.damping())
    return (J.reshape(B * C, -1) * SJ).sum(-1).reshape(B, C)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--widths", type=int, nargs="+", default=[256, 512, 1024, 2048])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--max-jacobian-gb", type=float, default=1.0)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    B, C = args.batch, 10
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, B={B}, C={C}, float32\n")
    print(
        "| width | P | [B,C,P] Jacobian | kron variance: peak / time | kron covariance: peak / time "
        "| full-J variance: peak / time | max abs diff |"
    )
    print("|---|---|---|---|---|---|---|")
    for w in args.widths:
        model = nn.Sequential(
            nn.Linear(784, w), nn.ReLU(), nn.Linear(w, w), nn.ReLU(), nn.Linear(w, C)
        ).eval()
        x_fit, y_fit = torch.randn(256, 784), torch.randint(0, C, (256,))
        la = lk.KronLaplace(model, "classification", prior_precision=1.0).fit([(x_fit, y_fit)])
        x = torch.randn(B, 784)
        functional_variance(la, x[:1])  # eigendecompositions (shared by both routes)
        P = la.n_params
        jac_mb = B * C * P * 4 / 2**20

        var = functional_variance(la, x)
        pv = peak_cpu_bytes(lambda: functional_variance(la, x)) / 2**20  # noqa: B023
        tv = median_time(lambda: functional_variance(la, x), args.repeats)  # noqa: B023
        pc = peak_cpu_bytes(lambda: functional_covariance(la, x)) / 2**20  # noqa: B023
        tc = median_time(lambda: functional_covariance(la, x), args.repeats)  # noqa: B023
        if jac_mb / 1024 <= args.max_jacobian_gb:
            ref = full_jacobian_variance(la, x)
            pf = peak_cpu_bytes(lambda: full_jacobian_variance(la, x)) / 2**20  # noqa: B023
            tf = median_time(lambda: full_jacobian_variance(la, x), args.repeats)  # noqa: B023
            full = f"{pf:,.0f} MB / {tf:.3f} s"
            diff = f"{float((ref - var).abs().max() / ref.abs().max()):.1e} (rel)"
        else:
            full, diff = f"skipped (J alone {jac_mb / 1024:.1f} GB)", "-"
        print(
            f"| {w} | {P:,} | {jac_mb:,.0f} MB | {pv:,.1f} MB / {tv:.3f} s | "
            f"{pc:,.1f} MB / {tc:.3f} s | {full} | {diff} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
