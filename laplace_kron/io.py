"""Every file the library writes: posteriors, online-Laplace states and fit checkpoints.

One format for all of them: a ``dict`` of tensors and plain data (numbers, strings, lists, dicts,
``None``) with a ``"format"`` marker and a ``"version"`` (:data:`~laplace_kron.constants.FILE_FORMATS`),
written by :func:`save_file` atomically (temp file in the same directory, ``fsync``, ``os.replace``:
a crash leaves the old file or the new one, never half of one) and read by :func:`load_file` with
``torch.load(weights_only=True)`` (no pickled code is ever executed). A file that cannot be read,
is not a dict, has another format or version, or holds NaN / Inf anywhere is refused with a
``ValueError`` that names the file and the problem; :func:`reading` turns the errors of parsing a
loaded dict (a missing key, a wrong type) into the same kind of ``ValueError``.
"""

from __future__ import annotations

import glob
import os
import pickle
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor

from .constants import CHECKPOINT_FORMAT, FILE_FORMATS, ONLINE_FORMAT, POSTERIOR_FORMAT

__all__ = ["check_finite", "load_file", "reading", "remove_file", "save_file"]

PathLike = str | os.PathLike
# What each format holds, for error messages.
_NAMES = {
    POSTERIOR_FORMAT: "KronLaplace posterior (KronLaplace.save)",
    ONLINE_FORMAT: "OnlineLaplace state (OnlineLaplace.save)",
    CHECKPOINT_FORMAT: "fit checkpoint",
}


def save_file(path: PathLike, state: dict, format: str) -> None:
    """Write ``{"format": format, "version": ..., **state}`` to ``path`` atomically.

    The data go to ``<path>.tmp-<pid>`` in the same directory, are flushed and fsynced, and the
    temp file is renamed over ``path``; on any failure the temp file is removed and ``path`` keeps
    its previous content.
    """
    if format not in FILE_FORMATS:
        raise ValueError(f"unknown file format {format!r}; known: {sorted(FILE_FORMATS)}")
    path = os.fspath(path)
    if os.path.isdir(path):
        raise ValueError(f"{path!r} is a directory; give a file path")
    data = {"format": format, "version": FILE_FORMATS[format], **state}
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            torch.save(data, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def remove_file(path: PathLike) -> None:
    """Delete ``path`` and temp files left next to it by killed writers (``<path>.tmp-<pid>``)."""
    path = os.fspath(path)
    for f in [path, *glob.glob(glob.escape(path) + ".tmp-*")]:
        if os.path.exists(f):
            os.remove(f)


def load_file(path: PathLike, format: str) -> dict:
    """Read a file written by :func:`save_file` with ``format``; never executes pickled code.

    Raises ``FileNotFoundError`` if ``path`` does not exist and ``ValueError`` (naming the file) if
    it is unreadable, truncated, not a laplace_kron file, of another format or version, or holds
    NaN / Inf anywhere.
    """
    if format not in FILE_FORMATS:
        raise ValueError(f"unknown file format {format!r}; known: {sorted(FILE_FORMATS)}")
    name = os.fspath(path)
    if not os.path.exists(name):
        raise FileNotFoundError(f"no such file: {name!r}")
    if os.path.isdir(name):
        raise ValueError(f"{name!r} is a directory; give the path of a file")
    try:
        state = torch.load(name, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any decoding failure means a malformed file
        # Only an unpickling error about a global is weights_only refusing an object; random
        # bytes and truncated legacy files raise UnpicklingError too ("Unsupported operand").
        reason = _reason(e)
        refused = ("Unsupported global", "Unsupported class")  # torch >= 2.4, older torch
        if isinstance(e, pickle.UnpicklingError) and any(r in reason for r in refused):
            raise ValueError(
                f"refusing to load {name!r}: it holds objects other than tensors and plain data "
                f"({reason}; a tampered or foreign file); nothing was executed"
            ) from e
        raise ValueError(
            f"cannot read {name!r} as a laplace_kron file ({reason}); it is truncated or "
            "corrupted (nothing was executed)"
        ) from e
    if not isinstance(state, dict):
        raise ValueError(
            f"{name!r} is not a laplace_kron file: it holds a {type(state).__name__}, not a dict"
        )
    found = state.get("format")
    if found != format:
        other = f" but a {_NAMES[found]}" if found in _NAMES else f" (its 'format' is {found!r})"
        raise ValueError(f"{name!r} is not a laplace_kron {_NAMES[format]}{other}")
    version = state.get("version")
    if version != FILE_FORMATS[format]:
        raise ValueError(
            f"{name!r} has {format} format version {version!r}; this laplace_kron reads version "
            f"{FILE_FORMATS[format]}"
        )
    check_finite(state, name)
    return state


def check_finite(obj: object, name: str, where: str = "") -> None:
    """Raise ``ValueError`` if a tensor or float anywhere in ``obj`` (dicts, lists, tuples) is NaN
    or Inf, naming ``name`` and the key path, e.g. ``blocks[2].G``."""
    if isinstance(obj, Tensor):
        if (obj.is_floating_point() or obj.is_complex()) and not torch.isfinite(obj).all():
            raise ValueError(f"{name!r} is corrupted: {where or 'the state'} holds NaN or Inf")
    elif isinstance(obj, float):
        if obj != obj or obj in (float("inf"), float("-inf")):
            raise ValueError(f"{name!r} is corrupted: {where or 'the state'} is {obj}")
    elif isinstance(obj, dict):
        for k, v in obj.items():
            check_finite(v, name, f"{where}.{k}" if where else str(k))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            check_finite(v, name, f"{where}[{i}]")


def _reason(e: BaseException) -> str:
    """A one-line cause: torch's weights_only errors are long and advise unsafe loading, so keep
    only the first sentence after ``WeightsUnpickler error:`` (or of the message), <= 200 chars."""
    text = str(e).split("WeightsUnpickler error:", 1)[-1]
    first = next((line.strip() for line in text.splitlines() if line.strip()), "")
    first = first.split(". ", 1)[0]
    return f"{type(e).__name__}: {first[:200]}" if first else type(e).__name__


@contextmanager
def reading(name: str) -> Iterator[None]:
    """Turn errors of parsing a loaded state (a missing key, a wrong type or shape) into a
    ``ValueError`` that names ``name`` (a file path or a description of the state)."""
    try:
        yield
    except (KeyError, TypeError, IndexError, AttributeError, RuntimeError) as e:
        raise ValueError(f"{name!r} is malformed ({type(e).__name__}: {e})") from e
