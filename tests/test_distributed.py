"""Data-parallel fitting: 2 gloo ranks on 127.0.0.1 reproduce the 1-process fit on the full data.

The workers are this file run as a script (``python test_distributed.py --worker ...``); each
writes its results with ``torch.save`` and the test compares them with in-process fits. The test
bounds its run time (one timeout for the whole launch) and always kills its worker processes.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
from _dense import CNN, MLP, make_data
from torch import nn

import laplace_kron as lk
from laplace_kron import KronLaplace
from laplace_kron import distributed as dist_utils
from laplace_kron.curvature import CurvatureFitter


@pytest.fixture(autouse=True)
def _float64():
    """float64 for this module's tests only (restored afterwards, nothing leaks)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


WORLD = 2
TIMEOUT = 120.0
N = 30
# Tolerances of the acceptance criterion (float64, exact Fisher).
TOL = 1e-10


# --------------------------------------------------------------------------- shared setup
def _mlp_problem():
    torch.manual_seed(0)
    model = MLP(d_in=4, hidden=5, d_out=3).eval()
    x, y = make_data("classification", N, 3, seed=1)
    return model, x, y


# Per-output noise of the CNN's two regression outputs.
SIG = torch.tensor([0.8, 0.3])


def _cnn_problem():
    torch.manual_seed(1)
    model = CNN(d_out=2).eval()
    x, y = make_data("regression", N, 2, x_shape=(2, 6, 6), seed=2)
    return model, x, y


def _emb_problem():
    """An embedding (padding_idx 0) gets a Kronecker block with a diagonal factor [V]."""
    torch.manual_seed(2)
    model = torch.nn.Sequential(
        torch.nn.Embedding(11, 3, padding_idx=0), torch.nn.Flatten(), torch.nn.Linear(12, 3)
    ).eval()
    g = torch.Generator().manual_seed(3)
    return model, torch.randint(0, 11, (N, 4), generator=g), torch.randint(0, 3, (N,), generator=g)


def _grouped_problem():
    """A depthwise convolution: one Kronecker block per group (factors [2, d, d])."""
    torch.manual_seed(2)
    model = nn.Sequential(
        nn.Conv2d(2, 2, 3, groups=2), nn.Tanh(), nn.Flatten(), nn.Linear(32, 2)
    ).eval()
    x, y = make_data("regression", N, 2, x_shape=(2, 6, 6), seed=4)
    return model, x, y


def _batches(x, y, size):
    return [(x[i : i + size], y[i : i + size]) for i in range(0, len(x), size)]


def _shard(x, y, rank):
    """Uneven contiguous shards (17 / 13) in batches of different sizes."""
    cut = 17
    if rank == 0:
        return _batches(x[:cut], y[:cut], 6)
    return _batches(x[cut:], y[cut:], 4)


def _summary(curv) -> dict:
    return {
        "dense": curv.to_dense(),
        "num_data": curv.num_data,
        "loss": curv.loss,
        "sse": curv.sse,
        "n_outputs": curv.n_outputs,
    }


def _laplace(model, data, likelihood, curvature, **kw) -> dict:
    la = KronLaplace(
        model, likelihood, curvature=curvature, fisher="exact", prior_precision=0.7, **kw
    )
    la.fit(data)
    samples = la.sample(4, generator=torch.Generator().manual_seed(11))
    x_test = make_data(likelihood, 6, 1, x_shape=tuple(data_x_shape(model)), seed=5)[0]
    pred = la.predict(x_test)  # GLM predictive: probabilities, or (mean, var) for regression
    pred = torch.cat([p.reshape(-1) for p in pred]) if isinstance(pred, tuple) else pred
    return {"lml": la.log_marginal_likelihood().detach(), "samples": samples, "pred": pred}


def data_x_shape(model) -> tuple[int, ...]:
    return (4,) if isinstance(model, MLP) else (2, 6, 6)


# --------------------------------------------------------------------------- worker
def _worker(rank: int, world: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float64)
    torch.distributed.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=60),
    )
    res: dict = {}
    try:
        model, x, y = _mlp_problem()
        shard = _shard(x, y, rank)
        for kind in ("kfac", "ekfac"):
            res[f"mlp_{kind}"] = _summary(
                getattr(lk, kind)(model, shard, "classification", "exact")
            )
            res[f"mlp_{kind}_la"] = _laplace(model, shard, "classification", kind)
        cnn, xc, yc = _cnn_problem()
        # strided shards of a Dataset through shard_dataset + DataLoader
        ds = torch.utils.data.TensorDataset(xc, yc)
        loader = torch.utils.data.DataLoader(dist_utils.shard_dataset(ds), batch_size=5)
        for kind in ("kfac", "ekfac"):
            res[f"cnn_{kind}"] = _summary(getattr(lk, kind)(cnn, loader, "regression", "exact"))
            res[f"cnn_{kind}_la"] = _laplace(cnn, loader, "regression", kind, sigma_noise=0.8)
            res[f"cnnpo_{kind}_la"] = _laplace(cnn, loader, "regression", kind, sigma_noise=SIG)
        res["cnn_ekfac_reduce_sep"] = _summary(
            lk.ekfac(
                cnn, loader, "regression", "exact", weight_sharing="reduce", separate_bias=True
            )
        )
        emb, xe, ye = _emb_problem()
        for kind in ("kfac", "ekfac"):
            res[f"emb_{kind}"] = _summary(
                getattr(lk, kind)(emb, _shard(xe, ye, rank), "classification", "exact")
            )
        res["emb_ekfac_empty_rank"] = _summary(
            lk.ekfac(emb, _batches(xe, ye, 7) if rank == 0 else [], "classification", "exact")
        )
        # rank 1 has no data at all
        empty = _batches(x, y, 7) if rank == 0 else []
        res["mlp_ekfac_empty_rank"] = _summary(lk.ekfac(model, empty, "classification", "exact"))
        gm, xg, yg = _grouped_problem()
        empty_g = _batches(xg, yg, 7) if rank == 0 else []
        res["grouped_ekfac_empty_rank"] = _summary(lk.ekfac(gm, empty_g, "regression", "exact"))
        # MC Fisher: per-rank streams, reproducible from the user's seed
        mc = [
            lk.ekfac(
                model, shard, "classification", "mc", generator=torch.Generator().manual_seed(5)
            )
            for _ in range(2)
        ]
        res["mc"] = [c.to_dense() for c in mc]
        res["rank_seed"] = dist_utils.rank_generator(
            torch.Generator().manual_seed(5)
        ).initial_seed()
        # a bad batch on rank 1 stops both ranks with an error (no hang)
        bad = [(b[0].clone(), b[1]) for b in shard]
        if rank == 1:
            bad[0][0][0, 0] = float("nan")
        try:
            lk.kfac(model, bad, "classification", "exact")
            res["error"] = "no error"
        except (ValueError, RuntimeError) as e:
            res["error"] = f"{type(e).__name__}: {e}"
        # checkpointed distributed fit interrupted on rank 0 only, then resumed on both ranks
        ckpt = os.path.join(os.path.dirname(out), "fit.pt")

        class Crash:
            def __iter__(self):
                for i, b in enumerate(shard):
                    if rank == 0 and i == 2:
                        raise KeyboardInterrupt("simulated crash")
                    yield b

        gen = torch.Generator().manual_seed(9)
        try:
            lk.ekfac(model, Crash(), "classification", "mc", generator=gen, checkpoint=ckpt,
                     checkpoint_every=1)  # fmt: skip
        except (KeyboardInterrupt, RuntimeError) as e:
            res["crash"] = type(e).__name__
        res["ckpt_files"] = sorted(p.name for p in Path(ckpt).parent.glob("fit*.pt"))
        gen = torch.Generator().manual_seed(9)
        resumed = lk.ekfac(
            model, shard, "classification", "mc", generator=gen, checkpoint=ckpt, checkpoint_every=1
        )
        gen = torch.Generator().manual_seed(9)
        plain = lk.ekfac(model, shard, "classification", "mc", generator=gen)
        res["resumed_equal"] = torch.equal(resumed.to_dense(), plain.to_dense())
        torch.distributed.barrier()
        res["ckpt_left"] = sorted(p.name for p in Path(ckpt).parent.glob("fit*.pt"))
    finally:
        torch.save(res, out)
        torch.distributed.destroy_process_group()


# --------------------------------------------------------------------------- launcher
def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(tmp: Path) -> list[dict]:
    """Run the workers (retrying on a port clash); always kill them before returning."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(
            [str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]
        ),
        "OMP_NUM_THREADS": "1",
        "GLOO_SOCKET_IFNAME": "lo",
    }
    deadline = time.monotonic() + TIMEOUT
    last_err = ""
    for attempt in range(3):
        port = _free_port()
        run = tmp / f"try{attempt}"
        run.mkdir()
        outs = [run / f"rank{r}.pt" for r in range(WORLD)]
        logs = [run / f"rank{r}.log" for r in range(WORLD)]
        procs = []
        try:
            for r in range(WORLD):
                with open(logs[r], "w") as log:
                    cmd = [sys.executable, __file__, "--worker", str(r), str(WORLD), str(port)]
                    procs.append(
                        subprocess.Popen(
                            [*cmd, str(outs[r])],
                            env=env,
                            stdout=log,
                            stderr=subprocess.STDOUT,
                            start_new_session=True,
                        )
                    )
            # wait for all; stop at the first failure or at the deadline
            while time.monotonic() < deadline:
                codes = [p.poll() for p in procs]
                if any(c not in (None, 0) for c in codes) or all(c == 0 for c in codes):
                    break
                time.sleep(0.05)
        finally:
            for p in procs:  # kill whatever is still running (a peer of a failed rank, a hang)
                if p.poll() is None:
                    p.kill()
                    p.wait(timeout=10)
        if all(p.returncode == 0 for p in procs):
            return [torch.load(o, weights_only=True) for o in outs]
        timed_out = time.monotonic() >= deadline
        last_err = "\n".join(f"--- rank {r}:\n{logs[r].read_text()}" for r in range(WORLD))
        if timed_out:
            last_err = f"workers did not finish within {TIMEOUT} s\n{last_err}"
        if timed_out or "address already in use" not in last_err.lower():
            break
    pytest.fail(f"distributed workers failed:\n{last_err[-4000:]}")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    return _launch(tmp_path_factory.mktemp("dist"))


def _max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def _check(res: dict, ref) -> float:
    assert res["num_data"] == ref.num_data
    assert res["n_outputs"] == ref.n_outputs
    assert res["loss"] == pytest.approx(ref.loss, rel=TOL)
    assert res["sse"] == pytest.approx(ref.sse, rel=TOL, abs=1e-12)
    err = _max_rel(res["dense"], ref.to_dense())
    assert err < TOL
    return err


# --------------------------------------------------------------------------- tests
def test_not_initialised_is_a_noop():
    assert not dist_utils.is_distributed()
    assert (dist_utils.get_rank(), dist_utils.get_world_size()) == (0, 1)
    t = torch.ones(3)
    dist_utils.all_reduce_sum_([t])
    dist_utils.broadcast_([t])
    assert torch.equal(t, torch.ones(3))
    g = torch.Generator().manual_seed(1)
    assert dist_utils.rank_generator(g) is g
    assert dist_utils.any_rank_failed(False) == -1
    shard = dist_utils.shard_dataset(list(range(7)), rank=1, world_size=3)
    assert list(shard) == [1, 4]
    with pytest.raises(ValueError, match="rank must lie"):
        dist_utils.shard_dataset(list(range(7)), rank=3, world_size=3)
    with pytest.raises(ValueError, match="not initialised"):
        CurvatureFitter(MLP(), "classification", distributed=True).fit_kfac([])


def test_two_ranks_equal_one_process(ranks):
    model, x, y = _mlp_problem()
    full = _batches(x, y, 8)
    cnn, xc, yc = _cnn_problem()
    full_c = _batches(xc, yc, 10)
    errs = {}
    for kind in ("kfac", "ekfac"):
        ref = getattr(lk, kind)(model, full, "classification", "exact")
        ref_c = getattr(lk, kind)(cnn, full_c, "regression", "exact")
        for r, res in enumerate(ranks):
            errs[f"mlp_{kind}_r{r}"] = _check(res[f"mlp_{kind}"], ref)
            errs[f"cnn_{kind}_r{r}"] = _check(res[f"cnn_{kind}"], ref_c)
    ref = lk.ekfac(cnn, full_c, "regression", "exact", weight_sharing="reduce", separate_bias=True)
    ref_e = lk.ekfac(model, full, "classification", "exact")
    emb, xe, ye = _emb_problem()
    for kind in ("kfac", "ekfac"):
        ref_emb = getattr(lk, kind)(emb, _batches(xe, ye, 8), "classification", "exact")
        for r, res in enumerate(ranks):
            errs[f"emb_{kind}_r{r}"] = _check(res[f"emb_{kind}"], ref_emb)
            if kind == "ekfac":
                errs[f"emb_empty_rank_r{r}"] = _check(res["emb_ekfac_empty_rank"], ref_emb)
    gm, xg, yg = _grouped_problem()
    ref_g = lk.ekfac(gm, _batches(xg, yg, 7), "regression", "exact")
    for r, res in enumerate(ranks):
        errs[f"cnn_ekfac_reduce_sep_r{r}"] = _check(res["cnn_ekfac_reduce_sep"], ref)
        errs[f"mlp_ekfac_empty_rank_r{r}"] = _check(res["mlp_ekfac_empty_rank"], ref_e)
        errs[f"grouped_ekfac_empty_rank_r{r}"] = _check(res["grouped_ekfac_empty_rank"], ref_g)
    print("max relative differences 2 ranks vs 1 process:", errs)


def test_two_ranks_laplace_evidence_samples_and_predictive_agree(ranks):
    cases = [("mlp", _mlp_problem, "classification"), ("cnn", _cnn_problem, "regression")]
    cases.append(("cnnpo", _cnn_problem, "regression"))  # per-output noise
    errs = {}
    for name, problem, lik in cases:
        model, x, y = problem()
        full = _batches(x, y, 10)
        for kind in ("kfac", "ekfac"):
            kw = {"sigma_noise": 0.8} if lik == "regression" else {}
            kw = {"sigma_noise": SIG} if name == "cnnpo" else kw
            ref = _laplace(model, full, lik, kind, **kw)
            for res in ranks:
                got = res[f"{name}_{kind}_la"]
                lml_err = abs(float(got["lml"] - ref["lml"])) / abs(float(ref["lml"]))
                assert lml_err < TOL, (name, kind, lml_err)
                s_err = _max_rel(got["samples"], ref["samples"])
                assert s_err < 1e-8, (name, kind)
                p_err = _max_rel(got["pred"], ref["pred"])
                assert p_err < TOL, (name, kind)
                errs[f"{name}_{kind}"] = {"lml": lml_err, "samples": s_err, "predict": p_err}
    print("evidence / sample / predictive relative differences 2 ranks vs 1 process:", errs)


def test_mc_streams_differ_per_rank_and_are_reproducible(ranks):
    seeds = [res["rank_seed"] for res in ranks]
    assert len(set(seeds)) == WORLD
    for res in ranks:
        assert torch.equal(res["mc"][0], res["mc"][1])  # same seed, same result
    # every rank ends with the same (all-reduced) MC posterior
    assert torch.equal(ranks[0]["mc"][0], ranks[1]["mc"][0])


def test_failure_on_one_rank_stops_every_rank(ranks):
    assert ranks[1]["error"].startswith("ValueError: batch 0: inputs contain NaN")
    assert ranks[0]["error"].startswith("RuntimeError: the curvature fit failed on rank 1")


def test_distributed_checkpoint_resume(ranks):
    assert [res["crash"] for res in ranks] == ["KeyboardInterrupt", "RuntimeError"]
    assert ranks[0]["ckpt_files"] == ["fit.rank0.pt", "fit.rank1.pt"]
    for res in ranks:
        assert res["resumed_equal"]
        assert res["ckpt_left"] == []


if __name__ == "__main__" and sys.argv[1:2] == ["--worker"]:
    _rank, _world, _port, _out = sys.argv[2:6]
    _worker(int(_rank), int(_world), int(_port), _out)
