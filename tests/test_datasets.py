"""Tests of the scikit-learn data helpers in :mod:`laplace_kron.datasets`."""

from __future__ import annotations

import pytest
import torch
from sklearn.datasets import load_digits
from torch import nn

from laplace_kron import datasets as ds


@pytest.fixture(scope="module")
def split() -> dict:
    return ds.load_digits_split(seed=0, val_fraction=0.1, test_fraction=0.2)


def test_digits_split_shapes_ranges_and_disjointness(split):
    n = {k: split[f"x_{k}"].shape[0] for k in ("train", "val", "test")}
    assert sum(n.values()) == 1797
    assert n["test"] == 360 and n["val"] == 180
    for k in ("train", "val", "test"):
        x, y = split[f"x_{k}"], split[f"y_{k}"]
        assert x.dtype == torch.float32 and x.shape[1:] == (1, 8, 8)
        assert y.dtype == torch.int64 and y.shape == (x.shape[0],)
        assert float(x.min()) == 0.0 and float(x.max()) == 1.0
        assert set(y.tolist()) == set(range(10))  # stratified: every class everywhere
    # the parts partition the data: every (image, label) row occurs in them together exactly as
    # often as in the data set (digits has a few exact duplicates, so compare counts, not sets)
    parts = [
        torch.cat([split[f"x_{k}"].reshape(-1, 64) * 16, split[f"y_{k}"][:, None]], 1)
        for k in ("train", "val", "test")
    ]
    digits = load_digits()
    full = torch.cat([torch.tensor(digits.data), torch.tensor(digits.target)[:, None]], 1)
    rows, counts = torch.unique(torch.cat(parts).round().long(), dim=0, return_counts=True)
    rows_ref, counts_ref = torch.unique(full.long(), dim=0, return_counts=True)
    assert torch.equal(rows, rows_ref) and torch.equal(counts, counts_ref)
    assert split["mean"] == 0.0 and split["std"] == 1.0


def test_digits_split_flat_standardized_and_deterministic(split):
    flat = ds.load_digits_split(seed=0, image=False)
    assert flat["x_train"].shape == (1257, 64)
    torch.testing.assert_close(flat["x_train"].reshape(-1, 1, 8, 8), split["x_train"])
    again = ds.load_digits_split(seed=0)
    for k in ("x_train", "y_train", "x_val", "y_test"):
        assert torch.equal(again[k], split[k])
    other = ds.load_digits_split(seed=1)
    assert not torch.equal(other["y_train"], split["y_train"])
    std = ds.load_digits_split(seed=0, standardize=True)
    assert abs(float(std["x_train"].mean())) < 1e-5
    assert abs(float(std["x_train"].std()) - 1.0) < 1e-3
    torch.testing.assert_close(
        std["x_test"], (split["x_test"] - std["mean"]) / std["std"], rtol=0, atol=1e-6
    )
    no_val = ds.load_digits_split(seed=0, val_fraction=0.0)
    assert no_val["x_val"].shape == (0, 1, 8, 8)


@pytest.mark.parametrize(
    "bad",
    [{"val_fraction": -0.1}, {"test_fraction": 1.0}, {"val_fraction": 0.5, "test_fraction": 0.5}],
)
def test_digits_split_rejects_bad_fractions(bad):
    with pytest.raises(ValueError, match="fraction"):
        ds.load_digits_split(**bad)


def test_rotation_identity_and_rot90(split):
    x = split["x_test"][:32]
    assert torch.equal(ds.rotate_images(x, 0.0), x)
    assert torch.equal(ds.rotate_images(x, 360.0), x)
    for k in (1, 2, 3, -1):
        rot = ds.rotate_images(x, 90.0 * k)
        ref = torch.rot90(x, k, dims=(-2, -1))
        # interior pixels exactly; with align_corners=False the border also matches here
        torch.testing.assert_close(rot[..., 1:-1, 1:-1], ref[..., 1:-1, 1:-1], atol=1e-6, rtol=0)
        torch.testing.assert_close(rot, ref, atol=1e-6, rtol=0)
    # flat layout round trip, and a non-trivial angle keeps the range and changes the image
    flat = ds.rotate_images(x.reshape(-1, 64), 90.0)
    torch.testing.assert_close(flat.reshape(-1, 1, 8, 8), torch.rot90(x, 1, dims=(-2, -1)))
    r30 = ds.rotate_images(x, 30.0)
    assert r30.shape == x.shape and float(r30.min()) >= 0.0 and float(r30.max()) <= 1.0 + 1e-6
    assert (r30 - x).abs().max() > 0.1
    # fill value: a constant image stays constant under rotation when fill equals that constant
    c = torch.full((2, 1, 8, 8), -0.8)
    torch.testing.assert_close(ds.rotate_images(c, 45.0, fill=-0.8), c)


def test_rotation_rejects_bad_shapes():
    with pytest.raises(ValueError, match="square"):
        ds.rotate_images(torch.zeros(2, 63), 10.0)
    with pytest.raises(ValueError, match="shape"):
        ds.rotate_images(torch.zeros(2, 8, 8), 10.0)


def test_ood_sets_shapes_ranges_and_determinism():
    ood = ds.ood_digits_like(n=64, seed=3)
    assert set(ood) == {"patches", "noise"}
    for v in ood.values():
        assert v.shape == (64, 1, 8, 8) and v.dtype == torch.float32
        assert float(v.min()) >= 0.0 and float(v.max()) <= 1.0
        # quantized to the digits' 17 levels
        torch.testing.assert_close(v * 16, torch.round(v * 16))
    # each patch is min-max scaled: uses the full range
    p = ood["patches"].reshape(64, -1)
    assert torch.all(p.min(1).values == 0.0) and torch.all(p.max(1).values == 1.0)
    again = ds.ood_digits_like(n=64, seed=3)
    assert all(torch.equal(again[k], ood[k]) for k in ood)
    other = ds.ood_digits_like(n=64, seed=4)
    assert not torch.equal(other["patches"], ood["patches"])
    flat = ds.ood_digits_like(n=8, seed=0, image=False, stats=(0.3, 0.4))
    assert flat["noise"].shape == (8, 64)
    torch.testing.assert_close(
        flat["patches"], (ds.sample_image_patches(8, seed=0).reshape(8, 64) - 0.3) / 0.4
    )


def test_make_loader_is_seeded():
    x, y = torch.arange(20.0)[:, None], torch.arange(20)
    order = [torch.cat([b[1] for b in ds.make_loader(x, y, 4, True, seed=s)]) for s in (0, 0, 1)]
    assert torch.equal(order[0], order[1]) and not torch.equal(order[0], order[2])
    assert sorted(order[0].tolist()) == list(range(20))
    ordered = torch.cat([b[1] for b in ds.make_loader(x, y, 4, shuffle=False)])
    assert torch.equal(ordered, y)
    with pytest.raises(ValueError, match="rows"):
        ds.make_loader(x, y[:3])


@pytest.fixture
def one_thread():
    """Tiny models train fastest on one thread (and do not fight parallel test runs)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_train_map_learns_and_is_deterministic(one_thread):
    data = ds.load_digits_split(seed=0, image=False)

    def run() -> tuple[nn.Module, list[float]]:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
        loader = ds.make_loader(data["x_train"], data["y_train"], 128, seed=0)
        return model, ds.train_map(model, loader, epochs=5, lr=1e-2, seed=0)

    model, hist = run()
    model2, hist2 = run()
    assert len(hist) == 5 and hist[-1] < hist[0]
    assert hist == hist2
    assert not model.training
    with torch.no_grad():
        acc = (model(data["x_test"]).argmax(1) == data["y_test"]).float().mean()
    assert acc > 0.85
