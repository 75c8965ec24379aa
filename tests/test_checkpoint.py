"""Checkpointed fitting: a fit killed mid-run resumes to exactly the uninterrupted result.

The crash test runs this file as a script (``python test_checkpoint.py --fit ...``) in a
subprocess with a slow data iterator, SIGKILLs it once a checkpoint appears, and resumes in-process.
"""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from _dense import MLP, Crash, make_data

from laplace_kron import KronLaplace
from laplace_kron.curvature import CurvatureFitter


@pytest.fixture(autouse=True)
def _float64():
    """float64 for this module's tests only (restored afterwards, nothing leaks)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


N_BATCHES = 10
TIMEOUT = 60.0


def _problem(likelihood="classification", d_out=3):
    torch.manual_seed(0)
    model = MLP(d_out=d_out).eval()
    x, y = make_data(likelihood, 5 * N_BATCHES, d_out, seed=3)
    return model, [(x[i : i + 5], y[i : i + 5]) for i in range(0, len(x), 5)]


def _fitter(model, likelihood="classification", fisher="mc", **kw):
    gen = torch.Generator().manual_seed(7)
    return CurvatureFitter(model, likelihood, fisher=fisher, mc_samples=2, generator=gen, **kw)


class Slow:
    """Yields the batches with a delay (so a checkpoint can be caught mid-run)."""

    def __init__(self, batches, delay):
        self.batches, self.delay = batches, delay

    def __iter__(self):
        for b in self.batches:
            time.sleep(self.delay)
            yield b


def _same(a, b) -> None:
    assert torch.equal(a.to_dense(), b.to_dense())
    assert (a.num_data, a.loss, a.sse, a.n_outputs) == (b.num_data, b.loss, b.sse, b.n_outputs)


# --------------------------------------------------------------------------- killed subprocess
def _kill_when(path: Path, ready, tmp: Path) -> dict:
    """Start a fitting subprocess, SIGKILL it when ``ready(checkpoint)``; return that checkpoint."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, __file__, "--fit", str(path)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + TIMEOUT
        state = None
        while time.monotonic() < deadline and proc.poll() is None:
            if path.exists():
                state = torch.load(path, weights_only=True)
                if ready(state):
                    break
            time.sleep(0.01)
        assert proc.poll() is None, f"the fit ended before being killed: {proc.stderr.read()}"
        assert state is not None and ready(state), "no suitable checkpoint before the timeout"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        assert proc.returncode == -signal.SIGKILL
        return torch.load(path, weights_only=True)  # the checkpoint now on disk
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        proc.stderr.close()


@pytest.mark.parametrize(
    "where,ready",
    [
        ("kfac pass", lambda s: s["pass"] == "kfac"),
        ("ekfac pass", lambda s: s["pass"] == "ekfac" and s["next_batch"] >= 2),
    ],
)
def test_sigkilled_fit_resumes_exactly(tmp_path, where, ready):
    path = tmp_path / "fit.pt"
    state = _kill_when(path, ready, tmp_path)
    assert state["pass"] == where.split()[0] and 0 <= state["next_batch"] < N_BATCHES
    model, batches = _problem()
    resumed = _fitter(model).fit_ekfac(batches, checkpoint=path, checkpoint_every=2)
    uninterrupted = _fitter(model).fit_ekfac(batches)
    _same(resumed, uninterrupted)
    assert not path.exists()  # deleted after a successful fit
    assert list(tmp_path.iterdir()) == []  # temp files of the killed writer are gone too


# --------------------------------------------------------------------------- in-process crashes
@pytest.mark.parametrize("kind", ["kfac", "ekfac"])
@pytest.mark.parametrize(
    "likelihood,fisher",
    [("classification", "mc"), ("regression", "exact"), ("binary", "empirical")],
)
@pytest.mark.parametrize("at", [1, 5, 13])
def test_resume_after_crash_equals_uninterrupted(tmp_path, kind, likelihood, fisher, at):
    model, batches = _problem(likelihood, 1 if likelihood == "binary" else 2)
    path = tmp_path / "ck.pt"
    first = _fitter(model, likelihood, fisher)
    fit = getattr(first, f"fit_{kind}")
    if kind == "kfac" and at > N_BATCHES:
        at = N_BATCHES - 1
    with pytest.raises(KeyboardInterrupt):
        fit(Crash(batches, at), checkpoint=path, checkpoint_every=3)
    # nothing usable is left in the crashed fitter
    with pytest.raises(RuntimeError, match="last fit failed"):
        first.blocks()
    f_res, f_ref = _fitter(model, likelihood, fisher), _fitter(model, likelihood, fisher)
    resumed = getattr(f_res, f"fit_{kind}")(batches, checkpoint=path, checkpoint_every=3)
    _same(resumed, getattr(f_ref, f"fit_{kind}")(batches))
    if fisher == "mc":  # the user's generator ends in the same state too
        assert torch.equal(f_res.generator.get_state(), f_ref.generator.get_state())
    assert not path.exists()


def test_laplace_fit_with_checkpoint(tmp_path):
    model, batches = _problem()
    path = tmp_path / "la.pt"

    def la():
        return KronLaplace(
            model, "classification", "ekfac", generator=torch.Generator().manual_seed(1)
        )

    with pytest.raises(KeyboardInterrupt):
        la().fit(Crash(batches, 12), checkpoint=path, checkpoint_every=4)
    assert path.exists()
    resumed = la().fit(batches, checkpoint=path, checkpoint_every=4)
    ref = la().fit(batches)
    assert torch.equal(resumed.log_marginal_likelihood(), ref.log_marginal_likelihood())
    assert not path.exists()


def test_default_interval_and_arguments(tmp_path):
    model, batches = _problem()
    with pytest.raises(ValueError, match="checkpoint_every is given but checkpoint"):
        _fitter(model).fit_kfac(batches, checkpoint_every=2)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="positive integer"):
            _fitter(model).fit_kfac(batches, checkpoint=tmp_path / "c.pt", checkpoint_every=bad)
    with pytest.raises(ValueError, match="is a directory"):
        _fitter(model).fit_kfac(batches, checkpoint=tmp_path)
    with pytest.raises(TypeError, match="file path"):
        _fitter(model).fit_kfac(batches, checkpoint=3)
    # default interval (100 batches): a short EKFAC fit still saves at the pass boundary
    path = tmp_path / "d.pt"
    with pytest.raises(KeyboardInterrupt):
        _fitter(model).fit_ekfac(Crash(batches, N_BATCHES + 1), checkpoint=str(path))
    assert torch.load(path, weights_only=True)["pass"] == "ekfac"


# --------------------------------------------------------------------------- validation
def _crashed_checkpoint(tmp_path, model, batches, **kw) -> Path:
    path = tmp_path / "ck.pt"
    with pytest.raises(KeyboardInterrupt):
        _fitter(model, **kw).fit_ekfac(Crash(batches, 4), checkpoint=path, checkpoint_every=2)
    return path


def test_checkpoint_of_another_model_or_setting_is_refused(tmp_path):
    model, batches = _problem()
    path = _crashed_checkpoint(tmp_path, model, batches)
    other = MLP(d_in=4, hidden=6, d_out=3)
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    with pytest.raises(ValueError, match="belongs to another model"):
        _fitter(other).fit_ekfac([(x, y)], checkpoint=path)
    changed = MLP(d_out=3)  # same architecture, other weights
    with pytest.raises(ValueError, match="model changed"):
        _fitter(changed).fit_ekfac(batches, checkpoint=path)
    with pytest.raises(ValueError, match="fisher: saved 'mc', now 'exact'"):
        _fitter(model, fisher="exact").fit_ekfac(batches, checkpoint=path)
    with pytest.raises(ValueError, match="kind: saved 'ekfac', now 'kfac'"):
        _fitter(model).fit_kfac(batches, checkpoint=path)
    with pytest.raises(ValueError, match="weight_sharing"):
        _fitter(model, weight_sharing="reduce").fit_ekfac(batches, checkpoint=path)
    with pytest.raises(ValueError, match="another model"):
        _fitter(model, separate_bias=True).fit_ekfac(batches, checkpoint=path)
    # the refused checkpoint is left alone and still resumes the right fit
    assert path.exists()
    _same(
        _fitter(model).fit_ekfac(batches, checkpoint=path, checkpoint_every=2),
        _fitter(model).fit_ekfac(batches),
    )


def test_changed_data_order_is_detected(tmp_path):
    model, batches = _problem()
    path = _crashed_checkpoint(tmp_path, model, batches)
    with pytest.raises(ValueError, match="same batches in the same order"):
        _fitter(model).fit_ekfac(batches[::-1], checkpoint=path)
    with pytest.raises(ValueError, match="yields only 2"):
        _fitter(model).fit_ekfac(batches[:2], checkpoint=path)
    # a shuffling DataLoader is caught too
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x, y),
        batch_size=5,
        shuffle=True,
        generator=torch.Generator().manual_seed(0),
    )
    with pytest.raises(ValueError, match="shuffle=False"):
        _fitter(model).fit_ekfac(loader, checkpoint=path)


class _Payload:
    """Unpickling this would create ``marker`` (a stand-in for arbitrary code execution)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("writer", ["torch.save", "pickle"])
def test_malicious_or_foreign_checkpoint_is_refused(tmp_path, writer):
    model, batches = _problem()
    path, marker = tmp_path / "ck.pt", tmp_path / "pwned"
    obj = {"format": "laplace_kron.fit_checkpoint", "version": 1, "x": _Payload(str(marker))}
    if writer == "pickle":
        with open(path, "wb") as f:
            pickle.dump(obj, f)
    else:
        torch.save(obj, path)
    assert not marker.exists()
    fitter = _fitter(model)
    with pytest.raises(ValueError, match="refusing to load|cannot read"):
        fitter.fit_kfac(batches, checkpoint=path)
    assert not marker.exists()
    with pytest.raises(RuntimeError, match="last fit failed"):
        fitter.blocks()
    # foreign but harmless files
    torch.save({"weights": torch.ones(2)}, path)
    with pytest.raises(ValueError, match="not a laplace_kron fit checkpoint"):
        _fitter(model).fit_kfac(batches, checkpoint=path)
    path.write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="refusing to load|cannot read"):
        _fitter(model).fit_kfac(batches, checkpoint=path)
    torch.save({"format": "laplace_kron.fit_checkpoint", "version": 99}, path)
    with pytest.raises(ValueError, match="version 99"):
        _fitter(model).fit_kfac(batches, checkpoint=path)


def test_corrupted_checkpoint_contents(tmp_path):
    model, batches = _problem()
    path = _crashed_checkpoint(tmp_path, model, batches)
    state = torch.load(path, weights_only=True)
    del state["G_sum"]
    torch.save(state, path)
    with pytest.raises(ValueError, match="is corrupted"):
        _fitter(model).fit_ekfac(batches, checkpoint=path)


# --------------------------------------------------------------------------- poisoned / malformed
def _refused(model, batches, path, match) -> None:
    """The checkpoint at ``path`` is refused with a ValueError naming it, nothing is fitted, and
    the file is left for the user to inspect."""
    fitter = _fitter(model)
    with pytest.raises(ValueError, match=match) as err:
        fitter.fit_ekfac(batches, checkpoint=path)
    assert str(path) in str(err.value)
    assert fitter.num_data == 0 and all(a is None for a in fitter.A_sum + fitter.G_sum)
    with pytest.raises(RuntimeError, match="last fit failed"):
        fitter.blocks()
    assert path.exists()


@pytest.mark.parametrize("key", ["A_sum", "G_sum"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_checkpoint_with_nan_factor_sum_is_refused(tmp_path, key, value):
    model, batches = _problem()
    path = _crashed_checkpoint(tmp_path, model, batches)
    state = torch.load(path, weights_only=True)
    state[key][1][0, 0] = value
    torch.save(state, path)
    _refused(model, batches, path, rf"{key}\[1\] holds NaN or Inf")


def test_checkpoint_with_nan_scalar_or_eigenvalue_sum_is_refused(tmp_path):
    model, batches = _problem()
    path = _crashed_checkpoint(tmp_path, model, batches)
    good = torch.load(path, weights_only=True)
    state = dict(good, loss=float("nan"))
    torch.save(state, path)
    _refused(model, batches, path, "loss is nan")
    # an EKFAC-pass checkpoint with eigenvalue sums
    path2 = tmp_path / "e.pt"
    with pytest.raises(KeyboardInterrupt):
        _fitter(model).fit_ekfac(
            Crash(batches, N_BATCHES + 4), checkpoint=path2, checkpoint_every=2
        )
    state = torch.load(path2, weights_only=True)
    assert state["pass"] == "ekfac" and state["E_sum"][0] is not None
    state["E_sum"][0][0][0, 0] = float("-inf")
    torch.save(state, path2)
    _refused(model, batches, path2, r"E_sum\[0\]\[0\] holds NaN or Inf")


@pytest.mark.parametrize("fraction", [0.0, 0.1, 0.5, 0.9, 0.999])
def test_truncated_checkpoint_is_refused(tmp_path, fraction):
    model, batches = _problem()
    path = _crashed_checkpoint(tmp_path, model, batches)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])
    _refused(model, batches, path, "refusing to load|cannot read")


@pytest.mark.parametrize("seed", range(8))
def test_random_bytes_checkpoint_is_refused(tmp_path, seed):
    model, batches = _problem()
    path = tmp_path / "ck.pt"
    n = int(torch.randint(1, 4096, (1,), generator=torch.Generator().manual_seed(seed)))
    noise = torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(seed))
    path.write_bytes(bytes(noise.to(torch.uint8).tolist()))
    _refused(model, batches, path, "refusing to load|cannot read")


def test_checkpoint_of_another_version_or_format_is_refused(tmp_path):
    model, batches = _problem()
    path = _crashed_checkpoint(tmp_path, model, batches)
    good = torch.load(path, weights_only=True)
    torch.save(dict(good, version=2), path)
    _refused(model, batches, path, "version 2.*reads version 1")
    torch.save(dict(good, version="1"), path)
    _refused(model, batches, path, "version '1'")
    torch.save(dict(good, format="laplace_kron.KronLaplace"), path)
    _refused(model, batches, path, "not a laplace_kron fit checkpoint but a KronLaplace posterior")
    torch.save(dict(good, format="laplace_kron.OnlineLaplace"), path)
    _refused(model, batches, path, "not a laplace_kron fit checkpoint but an? OnlineLaplace")
    torch.save([good], path)
    _refused(model, batches, path, "holds a list, not a dict")


@pytest.mark.parametrize(
    "name,corrupt,match",
    [
        ("short factor list", lambda s: s["A_sum"].pop(), "A_sum must be a list of 3 entries"),
        ("factor list a dict", lambda s: s.update(G_sum={}), "G_sum must be a list"),
        ("wrong shape", lambda s: s["A_sum"].__setitem__(0, torch.ones(2, 2)), "shape"),
        ("integer tensor", lambda s: s["G_sum"].__setitem__(0, torch.ones(5, 5).long()), "tensor"),
        ("string count", lambda s: s.update(num_data="10"), "num_data"),
        ("negative count", lambda s: s.update(pass_data=-1), "pass_data"),
        ("unknown pass", lambda s: s.update({"pass": "sgd"}), "unknown pass"),
        ("missing key", lambda s: s.pop("n_outputs"), "n_outputs"),
        ("no generator state", lambda s: s.update(generator_state=None), "generator state"),
        ("bad fingerprint", lambda s: s.update(fingerprint=["a"]), "fingerprint"),
        ("no settings", lambda s: s.pop("settings"), "no settings"),
    ],
)
def test_malformed_checkpoint_contents_are_refused(tmp_path, name, corrupt, match):
    model, batches = _problem()
    path = _crashed_checkpoint(tmp_path, model, batches)
    state = torch.load(path, weights_only=True)
    corrupt(state)
    torch.save(state, path)
    _refused(model, batches, path, f"is corrupted.*{match}")


if __name__ == "__main__" and sys.argv[1:2] == ["--fit"]:
    torch.set_default_dtype(torch.float64)
    _model, _batches = _problem()
    _fitter(_model).fit_ekfac(Slow(_batches, 0.08), checkpoint=sys.argv[2], checkpoint_every=2)
