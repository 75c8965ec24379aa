"""Small real data sets that ship with scikit-learn, and helpers to train on them (no downloads).

* :func:`load_digits_split`: scikit-learn's 8x8 handwritten digits (1797 images, 10 classes) split
  into stratified train / validation / test sets, as float32 tensors in ``[0, 1]`` (or
  standardized), either as images ``[N, 1, 8, 8]`` or flat ``[N, 64]``.
* :func:`rotate_images`: bilinear rotation (dataset shift) with ``affine_grid`` / ``grid_sample``.
* :func:`ood_digits_like`: out-of-distribution inputs shaped and scaled like the digits: 8x8
  grayscale patches of scikit-learn's sample photographs (``china.jpg``, ``flower.jpg``) and
  uniform noise.
* :func:`make_loader`, :func:`train_map`: a seeded ``DataLoader`` and a small MAP trainer.

Pixel scale: the digits' raw values are integers 0..16; ``"unit"`` scaling divides by 16 (values
in ``[0, 1]``, background 0). ``standardize=True`` further applies ``(x - mean) / std`` with the
scalar mean and standard deviation of the *training* pixels (returned in the split as
``"mean"``/``"std"``); pass the same ``stats=(mean, std)`` to :func:`ood_digits_like` and
``fill=-mean / std`` to :func:`rotate_images` so every set is on the same scale.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset
from tqdm.auto import tqdm

__all__ = [
    "DIGITS_LEVELS",
    "load_digits_split",
    "make_loader",
    "ood_digits_like",
    "rotate_images",
    "sample_image_patches",
    "train_map",
    "uniform_noise",
]

DIGITS_LEVELS = 16  # raw digit pixels are integers 0..16


def _check_fraction(name: str, value: float) -> float:
    value = float(value)
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must lie in [0, 1), got {value!r}")
    return value


def _to_layout(x: Tensor, image: bool) -> Tensor:
    return x.reshape(-1, 1, 8, 8) if image else x.reshape(-1, 64)


def load_digits_split(
    seed: int = 0,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    image: bool = True,
    standardize: bool = False,
) -> dict[str, Tensor | float]:
    """Stratified train / val / test split of scikit-learn's digits.

    Returns a dict with ``x_train, y_train, x_val, y_val, x_test, y_test`` (inputs float32
    ``[N, 1, 8, 8]`` if ``image`` else ``[N, 64]``; labels int64 ``[N]``) and the scalars
    ``mean``, ``std`` used for standardization (``0.0`` and ``1.0`` if ``standardize=False``).
    The split depends only on ``seed``. With ``val_fraction=0`` the validation tensors are empty.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    val_fraction = _check_fraction("val_fraction", val_fraction)
    test_fraction = _check_fraction("test_fraction", test_fraction)
    if val_fraction + test_fraction >= 0.9:
        raise ValueError(
            f"val_fraction + test_fraction = {val_fraction + test_fraction:.2f} leaves too little "
            "training data; keep the sum below 0.9"
        )
    digits = load_digits()
    x = digits.data.astype(np.float32) / DIGITS_LEVELS
    y = digits.target.astype(np.int64)
    idx = np.arange(len(y))
    rest, test = (idx, idx[:0])
    if test_fraction > 0:
        rest, test = train_test_split(idx, test_size=test_fraction, random_state=seed, stratify=y)
    train, val = rest, idx[:0]
    if val_fraction > 0:
        train, val = train_test_split(
            rest,
            test_size=val_fraction / (1.0 - test_fraction),
            random_state=seed + 1,
            stratify=y[rest],
        )
    mean, std = 0.0, 1.0
    if standardize:
        mean, std = float(x[train].mean()), float(x[train].std())
    out: dict[str, Tensor | float] = {"mean": mean, "std": std}
    for name, part in (("train", train), ("val", val), ("test", test)):
        xs = torch.from_numpy((x[np.sort(part)] - mean) / std)
        out[f"x_{name}"] = _to_layout(xs, image)
        out[f"y_{name}"] = torch.from_numpy(y[np.sort(part)])
    return out


def rotate_images(x: Tensor, degrees: float, fill: float = 0.0) -> Tensor:
    """Rotate images counter-clockwise by ``degrees`` about their centre (bilinear).

    ``x``: ``[N, C, H, W]``, or flat ``[N, H*W]`` square single-channel images (returned in the
    same layout). Pixels that come from outside the image are set to ``fill`` (the background
    value: 0 for unit-scaled digits). A rotation by a multiple of 90 degrees equals
    ``torch.rot90(x, k, dims=(-2, -1))``, and 0 degrees returns ``x`` unchanged.
    """
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise TypeError("x must be a floating-point tensor of images")
    flat = x.ndim == 2
    if flat:
        side = math.isqrt(x.shape[1])
        if side * side != x.shape[1]:
            raise ValueError(f"flat inputs must be square images [N, H*W], got {list(x.shape)}")
        img = x.reshape(x.shape[0], 1, side, side)
    elif x.ndim == 4:
        img = x
    else:
        raise ValueError(f"x must be [N, C, H, W] or [N, H*W], got shape {list(x.shape)}")
    if float(degrees) % 360.0 == 0.0:
        return x.clone()
    h, w = img.shape[-2:]
    a = math.radians(float(degrees))
    cos, sin = math.cos(a), math.sin(a)
    # affine_grid maps output coordinates (x right, y down, in [-1, 1]) to input coordinates.
    # Rotating the picture counter-clockwise on screen samples input = R(-a) output in these
    # y-down coordinates; the aspect ratio is corrected for non-square images.
    theta = torch.tensor(
        [[cos, -sin * h / w, 0.0], [sin * w / h, cos, 0.0]], dtype=img.dtype, device=img.device
    )
    grid = F.affine_grid(theta.expand(img.shape[0], 2, 3), list(img.shape), align_corners=False)
    out = F.grid_sample(
        img - fill, grid, mode="bilinear", padding_mode="zeros", align_corners=False
    )
    out = out + fill
    return out.reshape(x.shape) if flat else out


def _quantize(x: Tensor) -> Tensor:
    """Round to the digits' 17 intensity levels ``k / 16``."""
    return torch.round(x * DIGITS_LEVELS) / DIGITS_LEVELS


def sample_image_patches(
    n: int, seed: int = 0, min_size: int = 16, max_size: int = 64, min_std: float = 0.03
) -> Tensor:
    """``n`` 8x8 grayscale patches of scikit-learn's sample photographs, scaled like the digits.

    Square windows of random size in ``[min_size, max_size]`` pixels at random positions of
    ``china.jpg`` and ``flower.jpg`` are converted to grayscale, average-pooled to 8x8, min-max
    scaled per patch to ``[0, 1]`` and quantized to the digits' levels ``k / 16``. Nearly flat
    windows (std below ``min_std`` before scaling) are skipped. Returns float32 ``[n, 1, 8, 8]``.
    """
    from sklearn.datasets import load_sample_images

    if n < 0:
        raise ValueError(f"n must be non-negative, got {n}")
    try:
        images = load_sample_images().images
    except ImportError as e:  # pragma: no cover - pillow comes with matplotlib
        raise ImportError(
            "sklearn.datasets.load_sample_images needs pillow; pip install pillow"
        ) from e
    weights = torch.tensor([0.299, 0.587, 0.114])
    grays = [torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0) @ weights for im in images]
    g = torch.Generator().manual_seed(int(seed))
    patches: list[Tensor] = []
    tries = 0
    while len(patches) < n:
        tries += 1
        if tries > 100 * max(n, 1):
            raise RuntimeError("could not find enough textured patches; lower min_std")
        gray = grays[int(torch.randint(len(grays), (1,), generator=g))]
        size = int(torch.randint(min_size, max_size + 1, (1,), generator=g))
        i = int(torch.randint(gray.shape[0] - size + 1, (1,), generator=g))
        j = int(torch.randint(gray.shape[1] - size + 1, (1,), generator=g))
        win = gray[i : i + size, j : j + size]
        if float(win.std()) < min_std:
            continue
        p = F.adaptive_avg_pool2d(win[None, None], 8)[0]
        p = (p - p.min()) / (p.max() - p.min()).clamp_min(1e-6)
        patches.append(_quantize(p))
    if not patches:
        return torch.zeros(0, 1, 8, 8)
    return torch.stack(patches).to(torch.float32)


def uniform_noise(n: int, seed: int = 0) -> Tensor:
    """``n`` images of i.i.d. uniform pixels on the digits' levels ``k / 16``: ``[n, 1, 8, 8]``."""
    g = torch.Generator().manual_seed(int(seed))
    return torch.randint(0, DIGITS_LEVELS + 1, (n, 1, 8, 8), generator=g).float() / DIGITS_LEVELS


def ood_digits_like(
    n: int = 500,
    seed: int = 0,
    image: bool = True,
    stats: tuple[float, float] = (0.0, 1.0),
) -> dict[str, Tensor]:
    """Out-of-distribution sets for digits models: ``{"patches": ..., "noise": ...}``.

    ``"patches"``: :func:`sample_image_patches` (real photographs: natural-image OOD);
    ``"noise"``: :func:`uniform_noise`. Both float32 ``[n, 1, 8, 8]`` (``[n, 64]`` if not
    ``image``), in ``[0, 1]``, then ``(x - mean) / std`` with ``stats = (mean, std)`` (pass the
    split's ``mean`` and ``std`` for standardized digits). Deterministic given ``seed``.
    """
    mean, std = stats
    sets = {
        "patches": sample_image_patches(n, seed=seed),
        "noise": uniform_noise(n, seed=seed + 1),
    }
    return {k: _to_layout((v - mean) / std, image) for k, v in sets.items()}


def make_loader(
    x: Tensor, y: Tensor, batch_size: int = 64, shuffle: bool = True, seed: int = 0
) -> DataLoader:
    """A ``DataLoader`` over ``(x, y)`` whose shuffling order depends only on ``seed``."""
    if len(x) != len(y):
        raise ValueError(f"x has {len(x)} rows but y has {len(y)}")
    if len(x) == 0:
        raise ValueError("cannot make a loader over empty data")
    g = torch.Generator().manual_seed(int(seed))
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=shuffle, generator=g)


def train_map(
    model: nn.Module,
    loader: DataLoader,
    epochs: int = 30,
    lr: float = 3e-3,
    weight_decay: float = 5e-4,
    seed: int = 0,
    progress: bool = False,
    loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
) -> list[float]:
    """Train ``model`` to a MAP estimate with Adam, L2 weight decay and a cosine schedule.

    ``loss_fn`` defaults to the mean cross-entropy. The model is left in ``eval()`` mode.
    Returns the mean training loss of each epoch.
    """
    if epochs < 1:
        raise ValueError(f"epochs must be a positive integer, got {epochs!r}")
    torch.manual_seed(int(seed))
    loss_fn = loss_fn or nn.functional.cross_entropy
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * len(loader))
    history: list[float] = []
    model.train()
    bar = tqdm(range(epochs), desc="train MAP", disable=not progress, leave=False)
    for _ in bar:
        total, count = 0.0, 0
        for xb, yb in loader:
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(xb), yb)
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(xb)
            count += len(xb)
        history.append(total / count)
        bar.set_postfix(loss=f"{history[-1]:.4f}")
    model.eval()
    return history
