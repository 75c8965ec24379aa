"""Data-parallel Laplace fit of a digits MLP, checked against a single-process fit.

Launch with torchrun (gloo on CPU; use ``--backend nccl`` on GPUs)::

    torchrun --nproc_per_node 2 experiments/distributed_fit.py
    torchrun --nproc_per_node 2 experiments/distributed_fit.py --curvature ekfac --fisher mc

Every rank trains the same MAP network (same seed, deterministic CPU training), then rank 0 fits
the reference posterior on the *full* training set before the process group exists. After
``init_process_group`` each rank fits on its shard ``train[rank::world_size]``; the library
all-reduces the Kronecker factor sums, ``N``, the loss and the EKFAC corrections, so every rank
holds the full-data posterior. Rank 0 prints the agreement (curvature, evidence, tuned prior
precision, predictive). With ``--fisher exact`` in float64 the differences are round-off
(~1e-15); with ``--fisher mc`` the ranks draw different labels, so the posterior agrees with the
reference only statistically (but is reproducible from ``--seed``).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout

from laplace_kron import KronLaplace  # noqa: E402
from laplace_kron import distributed as kdist  # noqa: E402
from laplace_kron.datasets import load_digits_split, make_loader, train_map  # noqa: E402


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--curvature", choices=["kfac", "ekfac"], default="kfac")
    p.add_argument("--fisher", choices=["exact", "mc", "empirical"], default="exact")
    p.add_argument("--dtype", choices=["float32", "float64"], default="float64")
    p.add_argument("--backend", choices=["gloo", "nccl"], default="gloo")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads per rank")
    p.add_argument("--checkpoint", type=Path, default=None, help="resumable fit (per-rank files)")
    return p.parse_args()


def make_model(dtype: torch.dtype) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10)).to(dtype)


def laplace(model: nn.Module, args) -> KronLaplace:
    gen = torch.Generator().manual_seed(args.seed)  # same seed on every rank
    return KronLaplace(
        model, "classification", curvature=args.curvature, fisher=args.fisher, generator=gen
    )


def fit_and_tune(la: KronLaplace, loader, checkpoint: Path | None = None):
    t0 = time.perf_counter()
    kw = {} if checkpoint is None else {"checkpoint": checkpoint}
    la.fit(loader, **kw)
    seconds = time.perf_counter() - t0
    la.optimize_prior_precision("marglik", n_steps=200)  # eigenvalues only: identical on all ranks
    return la, seconds


def summary(la: KronLaplace, x_test: torch.Tensor) -> dict:
    return {
        "curvature": la.curvature,
        "lml": float(la.log_marginal_likelihood()),
        "prior_precision": float(la.prior_precision),
        "probs": la.predict(x_test),
    }


def max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def main() -> None:
    args = parse()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))

    data = load_digits_split(seed=args.seed, image=False)
    x_train, y_train = data["x_train"].to(dtype), data["y_train"]
    x_test, y_test = data["x_test"].to(dtype), data["y_test"]
    torch.manual_seed(args.seed)
    model = make_model(dtype)
    train_map(model, make_loader(x_train, y_train, 64, seed=args.seed), epochs=args.epochs)

    ref = None
    if rank == 0:  # single-process reference on the full data (no process group yet)
        full = DataLoader(TensorDataset(x_train, y_train), batch_size=args.batch_size)
        la_ref, t_ref = fit_and_tune(laplace(model, args), full)
        ref = summary(la_ref, x_test)

    if world > 1:
        dist.init_process_group(args.backend)
        if args.backend == "nccl":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(device)
            model, x_test = model.to(device), x_test.to(device)
        # all replicas must hold the same MAP weights: compare with rank 0 and take its copy
        params = [p.data for p in model.parameters()]
        theirs = [p.clone() for p in params]
        kdist.broadcast_(theirs, src=0)
        same = all(torch.equal(a, b) for a, b in zip(params, theirs))
        for p, t in zip(params, theirs):
            p.copy_(t)
        if not same and rank == 0:
            print("note: replicas differed after training; all ranks now use rank 0's weights")

    shard = kdist.shard_dataset(TensorDataset(x_train, y_train))  # train[rank::world]
    loader = DataLoader(shard, batch_size=args.batch_size, shuffle=False)
    la, t_dist = fit_and_tune(laplace(model, args), loader, args.checkpoint)
    got = summary(la, x_test)
    print(
        f"[rank {rank}/{world}] shard N={len(shard)}, global N={la.num_data}, "
        f"fit {t_dist:.3f} s, log evidence {got['lml']:.6f}",
        flush=True,
    )
    if world > 1:
        dist.barrier()
    if rank == 0:
        dense_err = max_rel(got["curvature"].to_dense(), ref["curvature"].to_dense())
        acc = float((got["probs"].argmax(-1).cpu() == y_test).double().mean())
        print(f"\n{args.curvature.upper()} ({args.fisher} Fisher, {args.dtype}), {world} ranks")
        print(f"{'quantity':<34}{'1 process':>16}{f'{world} ranks':>16}{'max rel diff':>14}")
        rows = [
            ("num_data", ref["curvature"].num_data, la.num_data),
            ("log evidence (tuned prior)", ref["lml"], got["lml"]),
            ("tuned prior precision", ref["prior_precision"], got["prior_precision"]),
        ]
        for name, a, b in rows:
            print(f"{name:<34}{a:>16.6f}{b:>16.6f}{abs(a - b) / abs(a):>14.2e}")
        print(f"{'curvature (dense H)':<34}{'':>16}{'':>16}{dense_err:>14.2e}")
        p_err = float((got["probs"].cpu() - ref["probs"]).abs().max())
        print(f"{'predictive probabilities (abs)':<34}{'':>16}{'':>16}{p_err:>14.2e}")
        print(f"{'test accuracy (GLM probit)':<34}{acc:>16.4f}")
        print(f"fit time: 1 process {t_ref:.3f} s, {world} ranks {t_dist:.3f} s (rank 0)")
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
