"""Online Laplace / EWC penalty against dense quadratic forms, plus a small continual run."""

import copy
import importlib.util
import io
import os
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from _dense import CNN, MLP, exact_ggn, make_data
from torch import nn
from torch.func import functional_call

import laplace_kron as lk
from laplace_kron.continual import OnlineLaplace

DEFAULT_DTYPE = torch.float64  # applied per test by conftest.py

CURVS = ["kfac", "ekfac", "diag"]
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: one thread is fastest and immune to oversubscription on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _flat(model: nn.Module, names: list[str]) -> torch.Tensor:
    named = dict(model.named_parameters())
    return torch.cat([named[n].reshape(-1) for n in names])


def _perturb(model: nn.Module, scale: float = 0.3, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))


def _dense_curvature(kind: str, model, x, y, likelihood="classification", **kw) -> torch.Tensor:
    """Independent dense ``H`` at the model's current parameters (fisher="exact")."""
    data = [(x[: len(x) // 2], y[: len(y) // 2]), (x[len(x) // 2 :], y[len(y) // 2 :])]
    if kind == "kfac":
        return lk.kfac(model, data, likelihood, fisher="exact", **kw).to_dense()
    if kind == "ekfac":
        return lk.ekfac(model, data, likelihood, fisher="exact", **kw).to_dense()
    names = [n for n, _ in model.named_parameters()]
    return torch.diag(exact_ggn(model, x, names, likelihood).diagonal())


def _data(x, y):
    return [(x[: len(x) // 2], y[: len(y) // 2]), (x[len(x) // 2 :], y[len(y) // 2 :])]


@pytest.mark.parametrize("curvature", CURVS)
@pytest.mark.parametrize("separate_bias", [False, True])
def test_penalty_and_gradient_match_dense(curvature, separate_bias):
    model = MLP(d_out=3)
    x, y = make_data("classification", 24, 3)
    ol = OnlineLaplace(
        model,
        "classification",
        curvature=curvature,
        fisher="exact",
        strength=2.5,
        separate_bias=separate_bias,
    )
    ol.consolidate(_data(x, y))
    H = _dense_curvature(curvature, model, x, y, separate_bias=separate_bias)
    torch.testing.assert_close(ol.to_dense(), H)
    anchor = _flat(model, ol.param_names).detach()
    _perturb(model)
    theta = _flat(model, ol.param_names)
    d = (theta - anchor).detach()
    pen = ol.penalty(model)
    torch.testing.assert_close(pen, 0.5 * 2.5 * d @ H @ d)
    grads = torch.autograd.grad(pen, [dict(model.named_parameters())[n] for n in ol.param_names])
    torch.testing.assert_close(torch.cat([g.flatten() for g in grads]), 2.5 * H @ d)


@pytest.mark.parametrize("curvature", CURVS)
def test_penalty_conv_net_matches_dense(curvature):
    """Weight sharing (Conv2d) and bias handling go through the same params_to_mat layout."""
    model = CNN(d_out=3)
    x, y = make_data("classification", 6, 3, x_shape=(2, 6, 6))
    ol = OnlineLaplace(model, "classification", curvature=curvature, fisher="exact")
    ol.consolidate(_data(x, y))
    H = ol.to_dense()
    if curvature == "diag":  # per-example gradients are exact even with weight sharing
        torch.testing.assert_close(H, _dense_curvature("diag", model, x, y))
    anchor = _flat(model, ol.param_names).detach()
    _perturb(model, 0.1)
    d = (_flat(model, ol.param_names) - anchor).detach()
    torch.testing.assert_close(ol.penalty(), 0.5 * d @ H @ d)


@pytest.mark.parametrize("curvature", CURVS)
def test_penalty_is_zero_at_anchor_and_before_consolidate(curvature):
    model = MLP(d_out=3)
    x, y = make_data("classification", 10, 3)
    ol = OnlineLaplace(model, "classification", curvature=curvature)
    pen0 = ol.penalty(model)
    assert pen0.shape == () and float(pen0) == 0.0 and ol.num_tasks == 0
    ol.consolidate([(x, y)])
    pen = ol.penalty(model)
    assert float(pen.detach()) == 0.0
    grads = torch.autograd.grad(pen, list(model.parameters()), allow_unused=True)
    assert all(g is None or float(g.abs().max()) == 0.0 for g in grads)


@pytest.mark.parametrize(
    "likelihood,d_out", [("classification", 3), ("regression", 2), ("binary", 1)]
)
def test_diag_is_diagonal_of_exact_ggn(likelihood, d_out):
    model = MLP(d_out=d_out)
    x, y = make_data(likelihood, 15, d_out)
    ol = OnlineLaplace(model, likelihood, curvature="diag", fisher="exact")
    ol.consolidate(_data(x, y))
    ggn = exact_ggn(model, x, ol.param_names, likelihood)
    torch.testing.assert_close(ol.to_dense().diagonal(), ggn.diagonal())


def test_diag_mc_fisher_converges_to_exact():
    model = MLP(d_out=3)
    x, y = make_data("classification", 10, 3)
    ol = OnlineLaplace(model, "classification", curvature="diag", fisher="mc", mc_samples=4000)
    ol.consolidate([(x, y)])
    ref = exact_ggn(model, x, ol.param_names, "classification").diagonal()
    err = (ol.to_dense().diagonal() - ref).norm() / ref.norm()
    assert err < 0.05


@pytest.mark.parametrize("curvature", CURVS)
def test_online_accumulation_with_decay_matches_dense_sum(curvature):
    """Three tasks at three parameter points: Lambda = g^2 H_1 + g H_2 + H_3, anchor = theta_3."""
    gamma = 0.6
    model = MLP(d_out=3)
    ol = OnlineLaplace(model, "classification", curvature=curvature, fisher="exact", decay=gamma)
    expected = 0
    for t in range(3):
        x, y = make_data("classification", 12, 3, seed=10 + t)
        _perturb(model, 0.2, seed=t)
        ol.consolidate(_data(x, y))
        expected = gamma * expected + _dense_curvature(curvature, model, x, y)
    assert ol.num_tasks == 3 and ol.task_sizes == [12, 12, 12]
    if curvature != "diag":
        assert ol.n_terms == 3
    torch.testing.assert_close(ol.to_dense(), expected)
    anchor = _flat(model, ol.param_names).detach()
    _perturb(model, 0.2, seed=7)
    d = (_flat(model, ol.param_names) - anchor).detach()
    torch.testing.assert_close(ol.penalty(model), 0.5 * d @ expected @ d)


def test_prior_precision_and_functional_params():
    model = MLP(d_out=3)
    x, y = make_data("classification", 12, 3)
    ol = OnlineLaplace(model, "classification", fisher="exact", prior_precision=0.7, strength=3.0)
    ol.consolidate([(x, y)])
    H = lk.kfac(model, [(x, y)], "classification", fisher="exact").to_dense()
    anchor = _flat(model, ol.param_names).detach()
    params = {n: p.detach() + 0.1 * torch.randn_like(p) for n, p in model.named_parameters()}
    d = torch.cat([params[n].flatten() for n in ol.param_names]) - anchor
    Lam = H + 0.7 * torch.eye(len(d))
    torch.testing.assert_close(ol.to_dense(), Lam)
    torch.testing.assert_close(ol.penalty(params), 1.5 * d @ Lam @ d)  # dict of parameters
    # works inside torch.func transforms
    out = functional_call(model, params, (x,))
    assert out.shape == (12, 3)


# ----------------------------------------------------------------------------- merging (max_terms)
def _two_kfac_tasks(ekfac=False, same=False, max_terms=1, decay=1.0):
    model = MLP(d_out=3)
    ol = OnlineLaplace(
        model,
        "classification",
        curvature="ekfac" if ekfac else "kfac",
        fisher="exact",
        max_terms=max_terms,
        decay=decay,
    )
    curvs = []
    for t in range(2):
        x, y = make_data("classification", 12, 3, seed=0 if same else 20 + t)
        if not same:
            _perturb(model, 0.2, seed=t)
        fit = lk.ekfac if ekfac else lk.kfac
        curv = fit(model, _data(x, y), "classification", fisher="exact")
        curvs.append(curv)
        ol.consolidate_curvature(curv)
    return ol, curvs


@pytest.mark.parametrize("ekfac", [False, True])
def test_merge_exact_for_identical_tasks(ekfac):
    ol, curvs = _two_kfac_tasks(ekfac=ekfac, same=True)
    assert ol.n_terms == 1
    torch.testing.assert_close(ol.to_dense(), 2 * curvs[0].to_dense())


@pytest.mark.parametrize("ekfac", [False, True])
def test_merge_preserves_trace_and_is_kron_of_weighted_sums(ekfac):
    ol, curvs = _two_kfac_tasks(ekfac=ekfac, decay=0.5)
    exact = 0.5 * curvs[0].to_dense() + curvs[1].to_dense()
    merged = ol.to_dense()
    assert ol.n_terms == 1
    for b0, b1 in zip(curvs[0].blocks, curvs[1].blocks):
        idx = curvs[0].block_index(b0)
        torch.testing.assert_close(merged[idx][:, idx].trace(), exact[idx][:, idx].trace())
        if not ekfac:
            c0, c1 = 0.5 * b0.G.trace(), b1.G.trace()
            A = (c0 * b0.A + c1 * b1.A) / (c0 + c1)
            ref = lk.KronBlock(0.5 * b0.G + b1.G, A, b0.param_names, b0.param_shapes, True)
            torch.testing.assert_close(merged[idx][:, idx], ref.to_dense())
    assert (merged - exact).norm() / exact.norm() < 0.5  # an approximation, but a close one


def test_max_terms_keeps_recent_tasks_exact():
    model = MLP(d_out=3)
    ol = OnlineLaplace(model, "classification", fisher="exact", max_terms=2)
    dense = []
    for t in range(3):
        x, y = make_data("classification", 8, 3, seed=t)
        _perturb(model, 0.2, seed=t)
        ol.consolidate([(x, y)])
        dense.append(lk.kfac(model, [(x, y)], "classification", fisher="exact").to_dense())
    assert ol.n_terms == 2
    newest = ol._blocks[0].terms[-1].block
    curv = lk.kfac(model, [(x, y)], "classification", fisher="exact")
    torch.testing.assert_close(newest.G, curv.blocks[0].G)
    torch.testing.assert_close(ol.to_dense().trace(), sum(dense).trace())


# ----------------------------------------------------------------------------- state
@pytest.mark.parametrize("curvature", CURVS)
def test_state_dict_round_trip(curvature, tmp_path):
    model = MLP(d_out=3)
    ol = OnlineLaplace(model, "classification", curvature=curvature, strength=4.0, decay=0.9)
    for t in range(2):
        x, y = make_data("classification", 10, 3, seed=t)
        _perturb(model, 0.2, seed=t)
        ol.consolidate([(x, y)])
    path = tmp_path / "ol.pt"
    torch.save(ol.state_dict(), path)
    state = torch.load(path, weights_only=True)
    model2 = copy.deepcopy(model)
    ol2 = OnlineLaplace(model2, "classification", curvature=curvature)
    ol2.load_state_dict(state)
    assert (ol2.strength, ol2.decay, ol2.num_tasks) == (4.0, 0.9, 2)
    _perturb(model, 0.1, seed=5)
    _perturb(model2, 0.1, seed=5)
    torch.testing.assert_close(ol2.penalty(model2), ol.penalty(model))
    torch.testing.assert_close(ol2.to_dense(), ol.to_dense())
    # resuming continues identically (the MC generator state is restored too)
    x, y = make_data("classification", 10, 3, seed=9)
    ol.consolidate([(x, y)])
    ol2.consolidate([(x, y)])
    torch.testing.assert_close(ol2.to_dense(), ol.to_dense())


def test_load_state_dict_rejects_mismatches():
    model = MLP(d_out=3)
    x, y = make_data("classification", 10, 3)
    ol = OnlineLaplace(model, "classification")
    ol.consolidate([(x, y)])
    buf = io.BytesIO()
    torch.save(ol.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    with pytest.raises(ValueError, match="shape"):
        OnlineLaplace(MLP(hidden=6, d_out=3), "classification").load_state_dict(state)
    with pytest.raises(ValueError, match="curvature"):
        OnlineLaplace(MLP(d_out=3), "classification", curvature="diag").load_state_dict(state)
    with pytest.raises(ValueError, match="likelihood"):
        OnlineLaplace(MLP(d_out=3), "regression").load_state_dict(state)
    with pytest.raises(ValueError, match="covers parameters"):
        OnlineLaplace(MLP(d_out=3), "classification", modules=["4"]).load_state_dict(state)
    with pytest.raises(ValueError, match="format"):
        OnlineLaplace(MLP(d_out=3), "classification").load_state_dict({"anchor": {}})


# ----------------------------------------------------------------------------- files
def _fitted(curvature: str, **kw) -> tuple[OnlineLaplace, nn.Module]:
    model = MLP(d_out=3)
    ol = OnlineLaplace(model, "classification", curvature=curvature, **kw)
    for t in range(2):
        x, y = make_data("classification", 10, 3, seed=t)
        _perturb(model, 0.2, seed=t)
        ol.consolidate([(x, y)])
    return ol, model


@pytest.mark.parametrize("curvature", CURVS)
def test_save_load_round_trip(curvature, tmp_path):
    ol, model = _fitted(curvature, strength=4.0, decay=0.9, prior_precision=0.3, separate_bias=True)
    path = tmp_path / "online.pt"
    ol.save(path)
    assert os.listdir(tmp_path) == ["online.pt"]
    assert torch.load(path, weights_only=True)["format"] == "laplace_kron.OnlineLaplace"
    model2 = copy.deepcopy(model)
    ol2 = OnlineLaplace.load(path, model2)
    assert ol2.curvature_type == curvature and ol2.likelihood == "classification"
    assert (ol2.strength, ol2.decay, ol2.prior_precision) == (4.0, 0.9, 0.3)
    assert (ol2.num_tasks, ol2.task_sizes, ol2.separate_bias) == (2, [10, 10], True)
    assert ol2.param_names == ol.param_names and ol2.n_terms == ol.n_terms
    for m in (model, model2):
        _perturb(m, 0.1, seed=5)
    torch.testing.assert_close(ol2.penalty(model2), ol.penalty(model), rtol=0, atol=1e-12)
    # resuming continues identically (the MC generator state is restored too)
    x, y = make_data("classification", 10, 3, seed=9)
    ol.consolidate([(x, y)])
    ol2.consolidate([(x, y)])
    torch.testing.assert_close(ol2.to_dense(), ol.to_dense(), rtol=0, atol=1e-12)


def test_load_keywords_override_the_file_and_modules_by_object(tmp_path):
    model = MLP(d_out=3)
    ol = OnlineLaplace(model, "classification", modules=[model[4]], max_terms=1, strength=2.0)
    x, y = make_data("classification", 10, 3)
    ol.consolidate([(x, y)])
    ol.save(tmp_path / "ol.pt")
    g = torch.Generator()
    ol2 = OnlineLaplace.load(tmp_path / "ol.pt", copy.deepcopy(model), strength=5.0, generator=g)
    assert ol2.modules == ["4"] and ol2.param_names == ["4.weight", "4.bias"]
    assert (ol2.strength, ol2.max_terms, ol2.generator) == (5.0, 1, g)
    torch.testing.assert_close(ol2.penalty(), ol.penalty() * 0, rtol=0, atol=1e-12)
    with pytest.raises(TypeError, match="nn.Module"):
        OnlineLaplace.load(tmp_path / "ol.pt", "model")
    with pytest.raises(ValueError, match="ol.pt.*curvature must be one of"):
        OnlineLaplace.load(tmp_path / "ol.pt", model, curvature="full")
    with pytest.raises(FileNotFoundError):
        OnlineLaplace.load(tmp_path / "missing.pt", model)


def _poison(state: dict, curvature: str, what: str) -> None:
    if what == "anchor":
        next(iter(state["anchor"].values()))[0] = float("nan")
    elif curvature == "diag":
        next(iter(state["diag"].values())).view(-1)[1] = float("inf")
    else:
        key = "eigenvalues" if curvature == "ekfac" else "G"
        state["blocks"][1][key][0][0, 0] = float("nan")


@pytest.mark.parametrize("curvature", CURVS)
@pytest.mark.parametrize("what", ["anchor", "factor"])
def test_poisoned_state_and_file_refused(curvature, what, tmp_path):
    ol, model = _fitted(curvature)
    pen = ol.penalty()
    state = ol.state_dict()
    _poison(state, curvature, what)
    path = tmp_path / "poisoned.pt"
    torch.save(state, path)
    with pytest.raises(ValueError, match=f"{path}.*NaN or Inf"):
        OnlineLaplace.load(path, model)
    with pytest.raises(ValueError, match="OnlineLaplace state.*NaN or Inf"):
        ol.load_state_dict(state)
    torch.testing.assert_close(ol.penalty(), pen)  # a refused state changes nothing


@pytest.mark.parametrize("curvature", CURVS)
def test_truncated_random_and_foreign_files_refused(curvature, tmp_path):
    ol, model = _fitted(curvature)
    good = tmp_path / "ol.pt"
    ol.save(good)
    data = good.read_bytes()
    bad = tmp_path / "bad.pt"
    for cut in (0, 1, 100, len(data) // 2, len(data) - 1):
        bad.write_bytes(data[:cut])
        with pytest.raises(ValueError, match="bad.pt"):
            OnlineLaplace.load(bad, model)
    g = torch.Generator().manual_seed(0)
    for size in (1, 17, 300, 4096):
        bad.write_bytes(bytes(torch.randint(0, 256, (size,), generator=g, dtype=torch.uint8)))
        with pytest.raises(ValueError, match="bad.pt"):
            OnlineLaplace.load(bad, model)
    state = ol.state_dict()
    state["version"] = 2
    torch.save(state, bad)
    with pytest.raises(ValueError, match="version 2"):
        OnlineLaplace.load(bad, model)
    with pytest.raises(ValueError, match="version 2"):
        ol.load_state_dict(state)
    x, y = make_data("classification", 10, 3)
    lk.KronLaplace(model, "classification").fit([(x, y)]).save(bad)
    with pytest.raises(ValueError, match="bad.pt.*KronLaplace"):
        OnlineLaplace.load(bad, model)


def _drop_last_term_of_block_0(state: dict) -> None:
    for key, value in state["blocks"][0].items():
        if key not in ("param_names", "bias_joint"):
            value.pop()


def _malformed(curvature: str):
    """(what to break, a function that breaks a fresh state_dict in place, expected message)."""
    first = "0.weight"
    cases = [
        ("missing key", lambda s: s.pop("task_sizes"), "KeyError.*task_sizes"),
        ("wrong type", lambda s: s.update(num_tasks="2"), "num_tasks must be an integer"),
        ("task count", lambda s: s.update(task_sizes=[10]), "task_sizes must be a list"),
        ("anchor key", lambda s: s["anchor"].pop(first), "anchor must map exactly"),
        ("anchor shape", lambda s: s["anchor"].update({first: torch.zeros(2)}), "anchor"),
        ("names", lambda s: s["param_names"].reverse(), "covers parameters"),
        ("shapes", lambda s: s.update(param_shapes=[[1]]), "param_shapes has 1 entries"),
        ("strength", lambda s: s.update(strength=-1.0), "strength"),
        (
            "generator",
            lambda s: s.update(generator_state=torch.zeros(3, dtype=torch.uint8)),
            "malformed",
        ),
        ("fisher", lambda s: s.update(fisher="true"), "fisher must be one of"),
    ]
    if curvature == "diag":
        return cases + [
            ("diag key", lambda s: s["diag"].pop(first), "diag must map exactly"),
            ("diag < 0", lambda s: s["diag"][first].fill_(-1.0), ">= 0"),
            ("blocks", lambda s: s.update(blocks=[{}]), "blocks must be a list, empty"),
        ]
    return (
        cases
        + [
            ("no blocks", lambda s: s.update(blocks=[]), "blocks cover"),
            ("dup block", lambda s: s["blocks"].append(s["blocks"][0]), "blocks cover"),
            (
                "coefs type",
                lambda s: s["blocks"][0].update(coefs="1"),
                "must be lists of one length",
            ),
            ("G list", lambda s: s["blocks"][0]["G"].pop(), "must be lists of one length"),
            ("G shape", lambda s: s["blocks"][0]["G"].__setitem__(0, torch.eye(2)), "factor sizes"),
            ("G type", lambda s: s["blocks"][0]["G"].__setitem__(0, [[1.0]]), "floating-point"),
            ("coef < 0", lambda s: s["blocks"][0]["coefs"].__setitem__(0, -1.0), "coefficient"),
            ("unknown", lambda s: s["blocks"][0]["param_names"].append("x"), "lacks"),
            ("bias_joint", lambda s: s["blocks"][0].update(bias_joint=1), "bias_joint"),
            ("terms", _drop_last_term_of_block_0, r"blocks hold \[1, 2\] terms"),
            ("blocks type", lambda s: s.update(blocks={"0": 1}), "blocks must be a list"),
        ]
        + (
            [
                (
                    "eigvec",
                    lambda s: s["blocks"][0]["eig_A_vectors"].__setitem__(0, torch.eye(2)),
                    "EKFAC",
                )
            ]
            if curvature == "ekfac"
            else []
        )
    )


@pytest.mark.parametrize("curvature", CURVS)
def test_malformed_states_refused_without_change(curvature, tmp_path):
    ol, model = _fitted(curvature)
    pen, before = ol.penalty(), repr(ol)
    for what, breaks, match in _malformed(curvature):
        state = copy.deepcopy(ol.state_dict())
        breaks(state)
        with pytest.raises(ValueError, match=match) as info:
            ol.load_state_dict(state)
        assert "OnlineLaplace state" in str(info.value), what
        path = tmp_path / "malformed.pt"
        torch.save(state, path)
        with pytest.raises(ValueError, match=str(path)):
            OnlineLaplace.load(path, model)
        assert repr(ol) == before
        torch.testing.assert_close(ol.penalty(), pen)


def test_state_before_any_task_round_trips(tmp_path):
    model = MLP(d_out=3)
    OnlineLaplace(model, "regression", curvature="ekfac", fisher="exact").save(tmp_path / "e.pt")
    ol = OnlineLaplace.load(tmp_path / "e.pt", model)
    assert (ol.num_tasks, ol.fisher, ol.generator) == (0, "exact", None)
    assert float(ol.penalty()) == 0.0


# ----------------------------------------------------------------------------- bad input
def test_input_validation():
    model = MLP(d_out=3)
    with pytest.raises(ValueError, match="strength"):
        OnlineLaplace(model, "classification", strength=-1.0)
    for decay in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError, match="decay"):
            OnlineLaplace(model, "classification", decay=decay)
    with pytest.raises(ValueError, match="curvature"):
        OnlineLaplace(model, "classification", curvature="full")
    with pytest.raises(ValueError, match="max_terms"):
        OnlineLaplace(model, "classification", max_terms=0)
    with pytest.raises(ValueError, match="likelihood"):
        OnlineLaplace(model, "poisson")
    with pytest.raises(ValueError, match="fisher"):
        OnlineLaplace(model, "classification", fisher="true")
    with pytest.raises(ValueError, match="prior_precision"):
        OnlineLaplace(model, "classification", prior_precision=-1.0)
    with pytest.raises(TypeError, match="nn.Module"):
        OnlineLaplace("model", "classification")
    ol = OnlineLaplace(model, "classification", curvature="diag")
    with pytest.raises(ValueError, match="strength"):
        ol.strength = float("nan")
    with pytest.raises(ValueError, match="empty"):
        ol.consolidate([])
    x, y = make_data("classification", 10, 3)
    ol.consolidate([(x, y)])
    with pytest.raises(ValueError, match="no parameters"):
        ol.penalty(nn.Linear(4, 3))
    with pytest.raises(ValueError, match="shapes"):
        ol.penalty(MLP(hidden=6, d_out=3))
    with pytest.raises(ValueError, match="NaN"):
        ol.consolidate([(x * float("nan"), y)])
    kf = OnlineLaplace(model, "classification", curvature="kfac")
    with pytest.raises(ValueError, match="'ekfac'"):
        kf.consolidate_curvature(lk.ekfac(model, [(x, y)], "classification"))


# ----------------------------------------------------------------------------- continual run
def _permuted_digits(n_tasks: int, seed: int = 0):
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    X = torch.tensor(X / 16.0, dtype=torch.float32)
    y = torch.tensor(y)
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(y), generator=g)
    tr, te = idx[:1200], idx[1200:]
    perms = [torch.randperm(64, generator=g) for _ in range(n_tasks)]
    return [((X[tr][:, p], y[tr]), (X[te][:, p], y[te])) for p in perms]


def _train_sequence(tasks, curvature, strength, epochs=4):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10)).float()
    ol = None if curvature is None else OnlineLaplace(model, "classification", curvature=curvature)
    if ol is not None:
        ol.strength = strength
    g = torch.Generator().manual_seed(0)
    for (xtr, ytr), _ in tasks:
        opt = torch.optim.Adam(model.parameters(), lr=3e-3)
        n = len(ytr)
        for _ in range(epochs):
            for b in torch.randperm(n, generator=g).split(64):
                loss = F.cross_entropy(model(xtr[b]), ytr[b])
                if ol is not None:
                    loss = loss + ol.penalty(model) / n
                opt.zero_grad()
                loss.backward()
                opt.step()
        if ol is not None:
            ol.consolidate([(xtr, ytr)])
    xte, yte = tasks[0][1]
    with torch.no_grad():
        return float((model(xte).argmax(-1) == yte).float().mean())


def test_kfac_penalty_keeps_first_task_on_permuted_digits():
    tasks = _permuted_digits(3)
    finetune = _train_sequence(tasks, None, 0.0)
    laplace = _train_sequence(tasks, "kfac", 10.0)
    # fine-tuning forgets task 1; the online KFAC Laplace penalty retains most of it
    assert laplace > finetune + 0.15, (laplace, finetune)
    assert laplace > 0.75, laplace


def test_experiment_quick_mode(tmp_path):
    path = ROOT / "experiments" / "continual_permuted_digits.py"
    spec = importlib.util.spec_from_file_location("continual_permuted_digits", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    t0 = time.perf_counter()
    out = mod.main(["--quick", "--out", str(tmp_path), "--variant", "both"])
    assert time.perf_counter() - t0 < 60
    for variant in ("permuted", "split"):
        for ext in ("json", "md", "png"):
            assert (tmp_path / f"{variant}.{ext}").stat().st_size > 0
        res = out[variant]["methods"]
        assert set(res) == {"finetune", "ewc", "kfac", "ekfac"}
        assert len(res["kfac"]["avg_acc_mean"]) == 3
