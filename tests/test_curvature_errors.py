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


def test_unsupported_layer_is_named_with_the_fix():
    model = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Linear(5, 3)).eval()
    with pytest.raises(ValueError, match=r"1 \(BatchNorm1d\).*modules="):
        lk.kfac(model, _data(), "classification")
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
    conv = nn.Sequential(nn.Conv2d(2, 2, 3, groups=2), nn.Flatten())
    with pytest.raises(ValueError, match="groups=2"):
        lk.kfac(conv, [(torch.randn(2, 2, 3, 3), torch.zeros(2, 2))], "regression")


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
