"""Every bad input of the curvature entry points fails with a message naming the problem."""

import warnings

import pytest
import torch
from _dense import MLP, make_data
from torch import nn

import laplace_kron as lk

DEFAULT_DTYPE = torch.float64  # applied per test by conftest.py


def _data(lik="classification", d_out=3, n=6):
    x, y = make_data(lik, n, d_out)
    return [(x, y)]


def test_other_layers_get_diagonal_blocks():
    model = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Linear(5, 3)).eval()
    curv = lk.kfac(model, _data(), "classification")
    assert [type(b).__name__ for b in curv.blocks] == [
        "KronBlock",
        "DiagBlock",
        "DiagBlock",
        "KronBlock",
    ]
    # choosing the supported modules works; frozen parameters are skipped
    curv = lk.kfac(model, _data(), "classification", modules=["0", "2"])
    assert curv.param_names == ["0.weight", "0.bias", "2.weight", "2.bias"]
    model[1].requires_grad_(False)
    assert lk.kfac(model, _data(), "classification").n_params == 25 + 18


def test_last_layer_and_frozen_bias():
    model = MLP(d_out=3)
    curv = lk.kfac(model, _data(), "classification", modules="last_layer")
    assert curv.param_names == ["4.weight", "4.bias"]
    model[4].bias.requires_grad_(False)
    curv = lk.kfac(model, _data(), "classification", modules="last_layer")
    assert curv.param_names == ["4.weight"]


def test_empty_data():
    with pytest.raises(ValueError, match="empty"):
        lk.kfac(MLP(), [], "classification")


def test_nan_inputs():
    x, y = make_data("classification", 4, 3)
    x[1, 2] = float("nan")
    with pytest.raises(ValueError, match="batch 0: inputs contain NaN"):
        lk.kfac(MLP(), [(x, y)], "classification")


def test_nan_inside_network():
    model = MLP()
    with torch.no_grad():
        model[2].weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN produced inside the network"):
        lk.kfac(model, _data(), "classification")


def test_overflowing_factors_name_the_layer():
    model = MLP()
    x, y = make_data("classification", 4, 3)
    with pytest.raises(ValueError, match=r"layer '0'.*factor A"):
        lk.kfac(model, [(x * 1e200, y)], "classification")


@pytest.mark.parametrize(
    "lik,y,match",
    [
        ("classification", torch.tensor([0, 1, 3, 0, 1, 2]), r"must lie in \[0, 2\]"),
        ("classification", torch.zeros(6, 3), "integer class indices"),
        ("regression", torch.zeros(6, 2), "do not fit model outputs"),
        ("binary", torch.tensor([0.0, 1, 2, 0, 1, 0]), "0 or 1"),
        ("classification", torch.zeros(5, dtype=torch.long), "batch size"),
    ],
)
def test_targets_that_do_not_fit_the_likelihood(lik, y, match):
    d_out = 1 if lik == "binary" else 3
    x, _ = make_data(lik, 6, d_out)
    with pytest.raises(ValueError, match=match):
        lk.kfac(MLP(d_out=d_out), [(x, y)], lik)


def test_bad_options():
    with pytest.raises(ValueError, match="likelihood must be one of"):
        lk.kfac(MLP(), _data(), "poisson")
    with pytest.raises(ValueError, match="fisher must be one of"):
        lk.kfac(MLP(), _data(), "classification", fisher="type-3")
    with pytest.raises(ValueError, match="mc_samples"):
        lk.kfac(MLP(), _data(), "classification", mc_samples=0)
    with pytest.raises(ValueError, match="weight_sharing"):
        lk.kfac(MLP(), _data(), "classification", weight_sharing="mean")
    with pytest.raises(ValueError, match="no submodule named 'nope'"):
        lk.kfac(MLP(), _data(), "classification", modules=["nope"])
    with pytest.raises(ValueError, match="not understood"):
        lk.kfac(MLP(), _data(), "classification", modules="first_layer")
    with pytest.raises(ValueError, match=r"\(inputs, targets\) pairs"):
        lk.kfac(MLP(), [torch.randn(3, 4)], "classification")
    conv = nn.Sequential(nn.Conv2d(2, 2, 3, groups=2), nn.Flatten())  # a block per group
    curv = lk.kfac(conv, [(torch.randn(2, 2, 3, 3), torch.zeros(2, 2))], "regression")
    assert [type(b).__name__ for b in curv.blocks] == ["GroupedKronBlock"]
    conv = nn.Sequential(nn.Conv2d(2, 2, 3, padding=1, padding_mode="reflect"), nn.Flatten())
    curv = lk.kfac(conv, [(torch.randn(2, 2, 3, 3), torch.zeros(2, 18))], "regression")
    assert [type(b).__name__ for b in curv.blocks] == ["DiagBlock"] * 2  # diagonal blocks


def test_train_mode_dropout_warns():
    model = nn.Sequential(nn.Linear(4, 5), nn.Dropout(0.1), nn.Linear(5, 3)).train()
    with pytest.warns(UserWarning, match="train mode"):
        lk.kfac(model, _data(), "classification")
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lk.kfac(model, _data(), "classification")


def test_conv1d_and_dataloader_and_progress():
    model = nn.Sequential(nn.Conv1d(2, 3, 3, padding=2, dilation=2), nn.Flatten(), nn.Linear(24, 2))
    x = torch.randn(10, 2, 8)
    y = torch.randint(0, 2, (10,))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=4)
    curv = lk.ekfac(model, loader, "classification", progress=True)
    assert curv.num_data == 10
    assert curv.to_dense().shape == (curv.n_params, curv.n_params)


# --------------------------------------------------------------------------- options, state, batches
def test_unknown_option_is_a_type_error_listing_the_valid_ones():
    from laplace_kron.curvature import CurvatureOptions

    with pytest.raises(
        TypeError, match=r"unknown curvature option\(s\) 'fishr'.*fisher, mc_samples"
    ):
        CurvatureOptions.from_kwargs(fishr="mc")
    with pytest.raises(TypeError, match="unknown curvature option.*'sampels'"):
        lk.kfac(MLP(), _data(), "classification", sampels=3)
    with pytest.raises(TypeError, match="unknown curvature option"):
        lk.curvature.CurvatureFitter(MLP(), "classification", damping=1.0)
    with pytest.raises(TypeError, match="options must be a CurvatureOptions"):
        lk.curvature.CurvatureFitter(MLP(), "classification", "exact")
    with pytest.raises(TypeError, match="generator must be a torch.Generator"):
        CurvatureOptions(generator=0)
    opts = CurvatureOptions(fisher="exact", separate_bias=True)
    with pytest.raises(ValueError, match="mc_samples must be a positive integer"):
        opts.replace(mc_samples=0)
    assert opts.replace(fisher="mc").fisher == "mc" and opts.fisher == "exact"
    with pytest.raises(AttributeError):
        opts.fisher = "mc"  # frozen


def test_fitter_with_options_object_equals_keywords_and_fit_dispatches():
    from laplace_kron.curvature import CurvatureFitter, CurvatureOptions

    torch.manual_seed(0)
    model = MLP().eval()
    data = _data(n=8)
    opts = CurvatureOptions(fisher="mc", mc_samples=3, separate_bias=True)
    a = CurvatureFitter(model, "classification", opts).fit("ekfac", data)
    b = CurvatureFitter(model, "classification", fisher="mc", mc_samples=3, separate_bias=True)
    torch.testing.assert_close(a.to_dense(), b.fit_ekfac(data).to_dense(), rtol=0, atol=0)
    # keywords given with an options object override it
    c = CurvatureFitter(model, "classification", opts, separate_bias=False)
    assert c.options.separate_bias is False and c.options.mc_samples == 3
    assert [s.name for s in c.specs] == ["0", "2", "4"] and c.param_names[0] == "0.weight"
    with pytest.raises(ValueError, match="kind must be one of"):
        c.fit("diag", data)


def test_fit_state_round_trips_and_refuses_malformed_dicts():
    from laplace_kron.curvature import CurvatureFitter

    torch.manual_seed(0)
    model = MLP().eval()
    f1 = CurvatureFitter(model, "classification", fisher="exact")
    curv = f1.fit_kfac(_data(n=8))
    sd = f1.state.state_dict()
    f2 = CurvatureFitter(model, "classification", fisher="exact")
    f2.state.load_state_dict(sd)
    torch.testing.assert_close(f2.curvature(f2.blocks(), "kfac").to_dense(), curv.to_dense())
    assert (f2.num_data, f2.loss, f2.n_outputs) == (curv.num_data, curv.loss, curv.n_outputs)
    for bad, match in [
        (dict(sd, A_sum=sd["A_sum"][:2]), "A_sum must be a list of 3"),
        (dict(sd, G_sum=[torch.ones(2, 2)] * 3), "shape"),
        (dict(sd, num_data=1.5), "num_data"),
        ({k: v for k, v in sd.items() if k != "loss"}, "KeyError"),
        ({**sd, "pass": 3}, "unknown pass"),
    ]:
        with pytest.raises(ValueError, match=match):
            f2.state.load_state_dict(bad)
        assert f2.num_data == 0 and f2.A_sum == [None] * 3  # reset after a refusal


@pytest.mark.parametrize(
    "layer", [nn.Dropout2d(0.1), nn.AlphaDropout(0.1), nn.BatchNorm1d(5), nn.SyncBatchNorm(5)]
)
def test_every_train_mode_stochastic_layer_warns(layer):
    from laplace_kron.curvature.batches import warn_if_train_mode

    model = nn.Sequential(nn.Linear(4, 5), layer).train()
    with pytest.warns(UserWarning, match=r"layers \(1\).*Call model.eval\(\) before fitting"):
        warn_if_train_mode(model, "fitting")
    with pytest.warns(UserWarning, match="predictions will be stochastic"):
        warn_if_train_mode(model, "predicting")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn_if_train_mode(model.eval(), "fitting")


def test_checked_forward_and_predict_inputs():
    from laplace_kron.curvature import batches

    model = nn.Linear(3, 2)
    with torch.no_grad():
        model.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="batch 4: the network output contains NaN"):
        batches.checked_forward(model, torch.ones(5, 3), i=4)
    with pytest.raises(ValueError, match="output has shape \\(5, 2\\) but the inputs hold 4"):
        batches.checked_forward(nn.Linear(3, 2), torch.ones(5, 3), num_data=4)
    # Tuples give their first element (Hugging Face return_dict=False); a mapping needs 'logits'.
    assert batches.checked_forward(lambda x: (x + 1, x), torch.ones(1, 3)).sum() == 6
    with pytest.raises(TypeError, match="must return a tensor.*'logits'.*got dict"):
        batches.checked_forward(lambda x: {"out": x}, torch.ones(1, 3))
    with pytest.raises(TypeError, match="mapping of tensors"):
        batches.check_inputs([torch.ones(2)])
    with pytest.raises(ValueError, match="inputs contain NaN or Inf"):
        batches.check_inputs({"a": torch.tensor([float("inf")])})
    x = {"a": torch.arange(6.0).reshape(3, 2), "n": 7}
    assert batches.input_batch_size(x) == 3
    assert batches.slice_inputs(x, 1, 2, 3)["a"].tolist() == [[2.0, 3.0]]
    with pytest.raises(
        ValueError, match="not an \\(inputs, targets\\)|\\(inputs, targets\\) pairs"
    ):
        list(batches.iter_batches([(1, 2, 3)]))


@pytest.mark.parametrize("separate_bias", [False, True])
def test_fit_diagonal_is_the_diagonal_of_per_example_gradients(separate_bias):
    from laplace_kron.curvature import CurvatureOptions, fit_diagonal

    torch.manual_seed(0)
    model = MLP().eval()
    x, y = make_data("classification", 7, 3)
    opts = CurvatureOptions(fisher="empirical", separate_bias=separate_bias)
    diag, n = fit_diagonal(
        model, [(x[:4], y[:4]), (x[4:4], y[4:4]), (x[4:], y[4:])], "classification", opts
    )
    assert n == 7
    ref = {k: torch.zeros_like(p) for k, p in model.named_parameters()}
    for i in range(7):
        model.zero_grad()
        torch.nn.functional.cross_entropy(
            model(x[i : i + 1]), y[i : i + 1], reduction="sum"
        ).backward()
        for k, p in model.named_parameters():
            ref[k] += p.grad**2
    assert set(diag) == set(ref)
    for k in ref:
        torch.testing.assert_close(diag[k], ref[k])
    with pytest.raises(ValueError, match="batch 0: inputs contain NaN"):
        fit_diagonal(model, [(x * float("nan"), y)], "classification", opts)
    with pytest.raises(ValueError, match="no data was seen"):
        fit_diagonal(model, [], "classification", opts)
