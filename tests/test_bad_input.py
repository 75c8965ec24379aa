"""Bad input at the KronLaplace level (and what tests/test_curvature_errors.py does not cover).

Every case asserts a clear exception naming the problem, and that no partially fitted object is
left looking usable: a never-fitted :class:`KronLaplace` stays unfitted (``curvature is None``), a
fitted one keeps its previous posterior, and a :class:`CurvatureFitter` discards its sums.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from _dense import MLP, make_data
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from laplace_kron import KronLaplace
from laplace_kron.curvature import CurvatureFitter


@pytest.fixture(autouse=True)
def _float64():
    """float64 for this module's tests only (restored afterwards, nothing leaks)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


# --------------------------------------------------------------------------- helper models
class LogFirst(nn.Module):
    """``log`` of the first input feature: NaN inside the network for negative (finite) inputs."""

    def __init__(self):
        super().__init__()
        self.net = MLP(d_out=3)

    def forward(self, x):
        return self.net(torch.cat([x[:, :1].log(), x[:, 1:]], dim=1))


class SqrtAbs(nn.Module):
    def forward(self, z):
        return z.abs().sqrt()


def _sqrt_net():
    """Finite forward pass, but ``d sqrt|z| / dz`` is not finite at ``z = 0`` (all-zero inputs)."""
    return nn.Sequential(nn.Linear(4, 5, bias=False), SqrtAbs(), nn.Linear(5, 3))


class LSTMNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(4, 5, batch_first=True)
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        return self.head(self.lstm(x)[0][:, -1])


class Named(nn.Module):
    """Same shapes as ``MLP()`` but other parameter names."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(4, 5), nn.Linear(5, 5), nn.Linear(5, 3)

    def forward(self, x):
        return self.fc3(torch.tanh(self.fc2(torch.tanh(self.fc1(x)))))


def _good(n=12, lik="classification", d_out=3):
    x, y = make_data(lik, n, d_out)
    x[:, 0] = x[:, 0].abs() + 0.1  # positive first feature (LogFirst is finite)
    return x, y


def _with(x, i, j, value):
    x = x.clone()
    x[i, j] = value
    return x


def _one_shot(batches):
    yield from batches


# --------------------------------------------------------------------------- failed fits
# (model factory, likelihood, curvature, bad data builder, error message)
FAILURES = {
    "nan input": (MLP, "classification", "kfac", lambda x, y: [(_with(x, 2, 1, float("nan")), y)]),
    "inf input": (MLP, "classification", "ekfac", lambda x, y: [(_with(x, 0, 3, float("inf")), y)]),
    "nan inside network": (LogFirst, "classification", "kfac", lambda x, y: [(-x, y)]),
    "inf gradient in backward": (_sqrt_net, "classification", "kfac", lambda x, y: [(0 * x, y)]),
    "empty data": (MLP, "classification", "kfac", lambda x, y: []),
    "only empty batches": (MLP, "classification", "ekfac", lambda x, y: [(x[:0], y[:0])]),
    "class target too large": (MLP, "classification", "kfac", lambda x, y: [(x, y + 3)]),
    "negative class target": (MLP, "classification", "kfac", lambda x, y: [(x, y - 3)]),
    "float class targets": (MLP, "classification", "kfac", lambda x, y: [(x, y.double())]),
    "one-shot iterator for ekfac": (
        MLP,
        "classification",
        "ekfac",
        lambda x, y: _one_shot([(x, y)]),
    ),
    "not (x, y) pairs": (MLP, "classification", "kfac", lambda x, y: [x]),
    "regression target shape": (
        lambda: MLP(d_out=2),
        "regression",
        "kfac",
        lambda x, y: [(x, y[:, :1])],
    ),
    "regression nan target": (
        lambda: MLP(d_out=2),
        "regression",
        "ekfac",
        lambda x, y: [(x, _with(y, 1, 1, float("nan")))],
    ),
    "regression batch size mismatch": (
        lambda: MLP(d_out=2),
        "regression",
        "kfac",
        lambda x, y: [(x, y[:-1])],
    ),
    "binary target 2": (lambda: MLP(d_out=1), "binary", "kfac", lambda x, y: [(x, y + 2)]),
}
MESSAGES = {
    "nan input": "batch 0: inputs contain NaN or Inf",
    "inf input": "batch 0: inputs contain NaN or Inf",
    "nan inside network": "NaN produced inside the network",
    "inf gradient in backward": r"layer '0': KFAC factor G contains NaN or Inf",
    "empty data": "the data iterable is empty",
    "only empty batches": "the data iterable is empty",
    "class target too large": r"must lie in \[0, 2\].*\[3, 5\]",
    "negative class target": r"must lie in \[0, 2\].*\[-3, -1\]",
    "float class targets": "integer class indices",
    "one-shot iterator for ekfac": "second pass saw 0 data points.*re-iterable",
    "not (x, y) pairs": r"\(inputs, targets\) pairs",
    "regression target shape": r"targets of shape \(12, 1\) do not fit model outputs of shape",
    "regression nan target": "batch 0: targets contain NaN or Inf",
    "regression batch size mismatch": "batch size",
    "binary target 2": "0 or 1",
}


def _problem(name):
    factory, lik, curvature, bad = FAILURES[name]
    torch.manual_seed(0)
    model = factory().eval()
    d_out = {"classification": 3, "regression": 2, "binary": 1}[lik]
    x, y = _good(lik=lik, d_out=d_out)
    return model, lik, curvature, x, y, bad(x, y)


@pytest.mark.parametrize("name", list(FAILURES))
def test_failed_fit_leaves_nothing_usable(name):
    model, lik, curvature, x, y, bad = _problem(name)
    # a never-fitted posterior stays unfitted
    la = KronLaplace(model, lik, curvature=curvature)
    with pytest.raises(ValueError, match=MESSAGES[name]):
        la.fit(bad)
    assert la.curvature is None and la.mean is None
    with pytest.raises(RuntimeError, match="not fitted yet"):
        la.predict(x)
    with pytest.raises(RuntimeError, match="not fitted yet"):
        la.log_marginal_likelihood()
    # a fitted posterior keeps its previous fit, untouched
    _, _, _, _, _, bad = _problem(name)  # fresh (one-shot) data
    la.fit([(x, y)])
    curv, mean, lml = la.curvature, la.mean.clone(), la.log_marginal_likelihood()
    with pytest.raises(ValueError, match=MESSAGES[name]):
        la.fit(bad)
    assert la.curvature is curv
    assert torch.equal(la.mean, mean)
    assert torch.equal(la.log_marginal_likelihood(), lml)
    # a CurvatureFitter discards its partial sums after the failure
    _, _, _, _, _, bad = _problem(name)
    fitter = CurvatureFitter(model, lik)
    fitter.fit_kfac([(x, y)])
    with pytest.raises(ValueError, match=MESSAGES[name]):
        getattr(fitter, f"fit_{curvature}")(bad)
    assert fitter.num_data == 0 and all(a is None for a in fitter.A_sum + fitter.G_sum)
    with pytest.raises(RuntimeError, match="last fit failed.*fit again"):
        fitter.blocks()


def test_model_returning_a_tuple():
    class Pair(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            return self.fc(x), x

    x, y = _good()
    # A tuple gives its first element (issue 15); a set is not understood: refused, naming it.
    pair = Pair()
    la = KronLaplace(pair, "classification", fisher="exact").fit([(x, y)])
    ref = KronLaplace(pair.fc, "classification", fisher="exact").fit([(x, y)])
    torch.testing.assert_close(la.curvature.to_dense(), ref.curvature.to_dense())
    pair.forward = lambda x: {pair.fc(x)}
    with pytest.raises(TypeError, match="the model must return a tensor.*got set"):
        KronLaplace(pair, "classification").fit([(x, y)])


# --------------------------------------------------------------------------- layers and modes
@pytest.mark.parametrize(
    "factory,name",
    [
        (LSTMNet, r"lstm \(LSTM\)"),
        (
            # max_norm renormalises rows in the forward: no Kronecker block (tests/test_embedding.py)
            lambda: nn.Sequential(nn.Embedding(10, 4, max_norm=1.0), nn.Flatten(), nn.Linear(8, 3)),
            r"0 \(Embedding\)",
        ),
        (
            lambda: nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Linear(5, 3)),
            r"1 \(BatchNorm1d\)",
        ),
    ],
)
def test_other_layers_get_diagonal_blocks(factory, name):
    # Issue 15: layers without a Kronecker factorisation get diagonal blocks instead of a refusal.
    model = factory().eval()
    if isinstance(model, LSTMNet):
        x = torch.randn(6, 3, 4)
    elif isinstance(model[0], nn.Embedding):
        x = torch.randint(0, 10, (6, 2))
    else:
        x = torch.randn(6, 4)
    data = [(x, torch.tensor([0, 1, 2, 0, 1, 2]))]
    la = KronLaplace(model, "classification").fit(data)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert la.param_names == trainable
    kinds = {type(b).__name__ for b in la.curvature.blocks}
    assert kinds == {"KronBlock", "DiagBlock"}
    assert torch.isfinite(la.log_marginal_likelihood())
    # last-layer Laplace over the supported head still works
    la = KronLaplace(model, "classification", modules="last_layer").fit(data)
    assert la.param_names[-1].endswith("bias") and torch.isfinite(la.log_marginal_likelihood())
    if name.startswith("1"):  # batch-norm in train mode: refused for the diagonal blocks
        with pytest.raises(ValueError, match=r"batch-norm layers \['1'\] are in train mode"):
            KronLaplace(model.train(), "classification").fit(data)


def test_train_mode_dropout_and_batchnorm_warn():
    model = nn.Sequential(nn.Linear(4, 5), nn.Dropout(0.2), nn.Linear(5, 3)).train()
    x, y = _good()
    la = KronLaplace(model, "classification")
    with pytest.warns(UserWarning, match=r"train mode with dropout/batch-norm layers \(1\)"):
        la.fit([(x, y)])
    with pytest.warns(UserWarning, match="predictions will be stochastic"):
        la.predict(x)
    frozen_bn = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Linear(5, 3)).train()
    frozen_bn[1].requires_grad_(False)
    with pytest.warns(UserWarning, match="call model.eval|Call model.eval"):
        KronLaplace(frozen_bn, "classification").fit([(x, y)])
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        la.fit([(x, y)])
        la.predict(x)


# --------------------------------------------------------------------------- hyperparameters
NON_POSITIVE = [0.0, -1.0, float("nan"), float("inf"), -float("inf")]


@pytest.mark.parametrize("value", NON_POSITIVE)
def test_bad_hyperparameters_after_fit_keep_the_old_values(value):
    x, y = _good(lik="regression", d_out=2)
    la = KronLaplace(MLP(d_out=2), "regression", prior_precision=0.5, sigma_noise=0.7)
    la.fit([(x, y)])
    lml = la.log_marginal_likelihood()
    with pytest.raises(ValueError, match="prior_precision must be positive and finite"):
        la.prior_precision = value
    with pytest.raises(ValueError, match="prior_precision must be positive and finite"):
        la.prior_precision = [1.0, value, 1.0]  # per block
    with pytest.raises(ValueError, match="sigma_noise must be positive and finite"):
        la.sigma_noise = value
    with pytest.raises(ValueError, match="temperature must be positive and finite"):
        la.temperature = value
    with pytest.raises(ValueError, match="sigma_noise must be positive and finite"):
        KronLaplace(MLP(d_out=2), "regression", sigma_noise=value)
    with pytest.raises(ValueError, match="temperature must be positive and finite"):
        KronLaplace(MLP(d_out=2), "regression", temperature=value)
    assert float(la.prior_precision) == 0.5 and float(la.sigma_noise) == 0.7
    assert torch.equal(la.log_marginal_likelihood(), lml)
    with pytest.raises(ValueError, match="sigma_noise must be a scalar"):
        la.sigma_noise = [1.0, 2.0]
    with pytest.raises(ValueError, match="one value per block"):
        la.prior_precision = [1.0, 2.0]


@pytest.mark.parametrize("value", [0.0, -1.0])
def test_evidence_rejects_non_positive_arguments(value):
    x, y = _good(lik="regression", d_out=2)
    la = KronLaplace(MLP(d_out=2), "regression").fit([(x, y)])
    with pytest.raises(ValueError, match="prior_precision must be positive"):
        la.log_marginal_likelihood(prior_precision=value)
    with pytest.raises(ValueError, match="prior_precision must be positive"):
        la.log_marginal_likelihood(prior_precision=torch.tensor([1.0, value, 1.0]))
    with pytest.raises(ValueError, match="sigma_noise must be positive"):
        la.log_marginal_likelihood(sigma_noise=value)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_evidence_rejects_nan_and_inf_arguments(value):
    x, y = _good(lik="regression", d_out=2)
    la = KronLaplace(MLP(d_out=2), "regression").fit([(x, y)])
    with pytest.raises(ValueError, match="prior_precision must be positive"):
        la.log_marginal_likelihood(prior_precision=value)
    with pytest.raises(ValueError, match="sigma_noise must be positive"):
        la.log_marginal_likelihood(sigma_noise=value)


# --------------------------------------------------------------------------- use before fit
def test_everything_before_fit_says_fit_first(tmp_path):
    x, _ = _good()
    la = KronLaplace(MLP(), "classification")
    calls = {
        "predict": lambda: la.predict(x),
        "predict nn": lambda: la.predict(x, method="nn"),
        "functional_variance": lambda: la.functional_variance(x),
        "posterior_covariance": lambda: la.posterior_covariance,
        "posterior_precision": lambda: la.posterior_precision,
        "optimize_prior_precision": lambda: la.optimize_prior_precision(),
        "state_dict": lambda: la.state_dict(),
        "save": lambda: la.save(tmp_path / "la.pt"),
        "n_params": lambda: la.n_params,
        "scatter": lambda: la.scatter(),
        "log_det_posterior_precision": lambda: la.log_det_posterior_precision(),
        "spectrum": lambda: la.spectrum(),
        "sample": lambda: la.sample(2),
    }
    for what, call in calls.items():
        with pytest.raises(RuntimeError, match=r"not fitted yet: call \.fit\(data\) first"):
            call()
        assert la.curvature is None, what
    assert list(tmp_path.iterdir()) == []  # save wrote nothing


# --------------------------------------------------------------------------- loading
def _saved(tmp_path):
    x, y = _good()
    torch.manual_seed(0)
    model = MLP()
    la = KronLaplace(model, "classification").fit([(x, y)])
    path = tmp_path / "la.pt"
    la.save(path)
    return model, path, x, y


def test_loading_a_file_of_another_model_or_kind(tmp_path):
    model, path, x, y = _saved(tmp_path)
    with pytest.raises(ValueError, match="does not fit this model.*no submodule named '0'"):
        KronLaplace.load(path, Named())  # same shapes, other parameter names
    # a plain model state_dict, and a fit checkpoint, are not posteriors
    torch.save(model.state_dict(), tmp_path / "weights.pt")
    with pytest.raises(ValueError, match="laplace_kron"):
        KronLaplace.load(tmp_path / "weights.pt", model)
    ckpt = tmp_path / "ck.pt"

    class Crash:
        def __iter__(self):
            yield (x, y)
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        KronLaplace(model, "classification").fit(Crash(), checkpoint=ckpt, checkpoint_every=1)
    with pytest.raises(ValueError, match="laplace_kron"):
        KronLaplace.load(ckpt, model)
    # ... and a posterior file is not a fit checkpoint
    la = KronLaplace(model, "classification")
    with pytest.raises(ValueError, match="not a laplace_kron fit checkpoint"):
        la.fit([(x, y)], checkpoint=path)
    assert la.curvature is None
    # a checkpoint written for another model is refused and leaves the posterior unfitted
    other = KronLaplace(MLP(hidden=6), "classification")
    with pytest.raises(ValueError, match="belongs to another model"):
        other.fit([(x, y)], checkpoint=ckpt)
    assert other.curvature is None
    with pytest.raises(FileNotFoundError):
        KronLaplace.load(tmp_path / "missing.pt", model)


def _poison(state: dict, what: str) -> dict:
    """A copy of a posterior state with one problem planted."""
    bad = {k: v for k, v in state.items()}
    if what == "nan mean":
        bad["mean"] = state["mean"].clone()
        bad["mean"][3] = float("nan")
    elif what == "inf factor":
        blk = dict(state["blocks"][1])
        blk["G"] = blk["G"].clone()
        blk["G"][0, 0] = float("inf")
        bad["blocks"] = [state["blocks"][0], blk, *state["blocks"][2:]]
    elif what == "nan loss":
        bad["loss"] = float("nan")
    elif what == "missing blocks":
        del bad["blocks"]
    elif what == "short mean":
        bad["mean"] = state["mean"][:-1]
    elif what == "wrong factor shape":
        blk = dict(state["blocks"][0], G=torch.eye(2))
        bad["blocks"] = [blk, *state["blocks"][1:]]
    elif what == "block is a string":
        bad["blocks"] = ["G"]
    elif what == "negative prior":
        bad["prior_precision"] = torch.tensor(-1.0, dtype=torch.float64)
    elif what == "prior per block of wrong length":
        bad["prior_precision"] = torch.ones(7, dtype=torch.float64)
    elif what == "unknown kind":
        bad["kind"] = "diag"
    elif what == "short prior mean":
        bad["prior_mean"] = torch.zeros(3)
    return bad


POISONS = [
    "nan mean",
    "inf factor",
    "nan loss",
    "missing blocks",
    "short mean",
    "wrong factor shape",
    "block is a string",
    "negative prior",
    "prior per block of wrong length",
    "unknown kind",
    "short prior mean",
]


@pytest.mark.parametrize("what", POISONS)
def test_poisoned_or_malformed_posterior_files_are_refused(tmp_path, what):
    """Every poisoned file is refused with a ValueError naming the file, by ``load`` and by
    ``load_state_dict`` (which leaves a fitted posterior unchanged)."""
    from laplace_kron import io

    model, path, x, _ = _saved(tmp_path)
    state = io.load_file(path, "laplace_kron.KronLaplace")
    bad = _poison(state, what)
    bad_path = tmp_path / "bad.pt"
    torch.save(bad, bad_path)  # the raw format, bypassing save's checks
    with pytest.raises(ValueError, match="bad.pt"):
        KronLaplace.load(bad_path, model)
    la = KronLaplace.load(path, model)
    before = la.predict(x)
    with pytest.raises(ValueError):
        la.load_state_dict(bad)
    torch.testing.assert_close(la.predict(x), before, rtol=0, atol=0)


def test_truncated_random_and_foreign_posterior_files_are_refused(tmp_path):
    model, path, *_ = _saved(tmp_path)
    data = path.read_bytes()
    bad = tmp_path / "bad.pt"
    for cut in (0, 1, 10, len(data) // 3, len(data) // 2, len(data) - 1):
        bad.write_bytes(data[:cut])
        with pytest.raises(ValueError, match="bad.pt"):
            KronLaplace.load(bad, model)
    gen = torch.Generator().manual_seed(0)
    for _ in range(40):  # random bytes once raised a bare IndexError in about 1 case in 8
        n = int(torch.randint(0, 4096, (1,), generator=gen))
        bad.write_bytes(
            bytes(torch.randint(0, 256, (n,), generator=gen, dtype=torch.uint8).tolist())
        )
        with pytest.raises(ValueError, match="bad.pt"):
            KronLaplace.load(bad, model)
    state = torch.load(path, weights_only=True)
    torch.save(dict(state, version=2), bad)
    with pytest.raises(ValueError, match="version 2"):
        KronLaplace.load(bad, model)
    torch.save(dict(state, format="laplace_kron.OnlineLaplace"), bad)
    with pytest.raises(ValueError, match="not a laplace_kron KronLaplace posterior"):
        KronLaplace.load(bad, model)


class _Payload:
    """Unpickling this would create ``marker`` (a stand-in for arbitrary code execution)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_malicious_torch_save_payload_is_not_executed(tmp_path):
    # test_posterior covers a raw pickle; this is the zip format torch.save writes
    model, path, *_ = _saved(tmp_path)
    marker = tmp_path / "pwned"
    state = torch.load(path, weights_only=True)
    state["extra"] = _Payload(str(marker))
    torch.save(state, tmp_path / "evil.pt")
    assert not marker.exists()
    with pytest.raises(ValueError, match="refusing to load.*nothing was executed"):
        KronLaplace.load(tmp_path / "evil.pt", model)
    assert not marker.exists()


# --------------------------------------------------------------------------- float32 stability
@settings(max_examples=10, deadline=None)
@given(
    d_in=st.integers(2, 7),
    hidden=st.integers(2, 8),
    eps=st.sampled_from([0.0, 1e-7, 1e-4]),
    x_scale=st.sampled_from([1e-3, 1.0, 1e3]),
    delta=st.sampled_from([1e-8, 1e-4, 1.0, 1e3]),
    curvature=st.sampled_from(["kfac", "ekfac"]),
    seed=st.integers(0, 100),
)
def test_float32_nearly_singular_factors_stay_finite_and_psd(
    d_in, hidden, eps, x_scale, delta, curvature, seed
):
    """Rank-one (plus ``eps``) inputs and dead ReLUs make ``A`` (nearly) singular; ``G`` of the
    softmax output is always singular. Everything stays finite and PSD in float32."""
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, 3)).float()
    with torch.no_grad():
        model[0].bias[: hidden // 2] = -1e4  # dead units: zero rows / columns of the next A
    u = torch.randn(40, 1, generator=g)
    v = torch.randn(1, d_in, generator=g)
    x = (x_scale * (u @ v + eps * torch.randn(40, d_in, generator=g))).float()
    y = torch.randint(0, 3, (40,), generator=g)
    la = KronLaplace(model, "classification", curvature=curvature, fisher="exact")
    la.prior_precision = delta
    la.fit([(x[:20], y[:20]), (x[20:], y[20:])])
    curv = la.curvature
    assert all(b.dtype == torch.float32 for b in curv.blocks)
    for b in curv.blocks:
        lam = b.eigvals()
        assert torch.isfinite(lam).all() and (lam >= 0).all(), b.param_names
        assert (b.eig_G.values >= 0).all() and (b.eig_A.values >= 0).all()
    assert torch.isfinite(la.log_marginal_likelihood())
    assert torch.isfinite(la.log_det_posterior_precision())
    v = torch.randn(3, curv.n_params, generator=g).float()
    assert torch.isfinite(la.posterior_covariance.matvec(v)).all()
    assert torch.isfinite(la.sample(3, generator=g)).all()
    probs = la.predict(x[:5])
    assert torch.isfinite(probs).all() and torch.allclose(
        probs.sum(-1), probs.new_ones(5), atol=1e-5
    )
    cov = la.posterior_covariance.to_dense().double()
    assert torch.isfinite(cov).all()
    ev = torch.linalg.eigvalsh(cov)
    assert ev.min() >= -1e-5 * ev.max()  # PSD up to float32 round-off
