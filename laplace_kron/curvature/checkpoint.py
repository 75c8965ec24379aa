"""Checkpoint files of an interrupted curvature fit, and the fingerprints that tell whether a
resumed fit sees the same model, settings and data.

A checkpoint is a :mod:`laplace_kron.io` file of format
:data:`~laplace_kron.constants.CHECKPOINT_FORMAT` (atomic write with fsync, ``weights_only`` load,
NaN / Inf refused) holding the fit's ``settings`` and its
:meth:`~laplace_kron.curvature.state.FitState.state_dict`.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .. import distributed as dist_utils
from .. import io
from ..constants import CHECKPOINT_FORMAT, DEFAULT_CHECKPOINT_EVERY
from .batches import fingerprint, same_fingerprint
from .capture import LayerSpec
from .options import CurvatureOptions
from .state import FitState

__all__ = ["Checkpoint", "check_resumed_data", "fit_settings", "model_digest"]


@dataclass
class Checkpoint:
    """Where and how often a fit saves its state (one file per rank when distributed)."""

    path: str
    every: int

    @classmethod
    def make(cls, checkpoint: Any, every: int | None, distributed: bool) -> Checkpoint | None:
        """The checkpoint of ``fit(..., checkpoint=, checkpoint_every=)`` (validated), or ``None``."""
        if checkpoint is None:
            if every is not None:
                raise ValueError("checkpoint_every is given but checkpoint (a file path) is not")
            return None
        if not isinstance(checkpoint, (str, os.PathLike)):
            raise TypeError(f"checkpoint must be a file path, got {type(checkpoint).__name__}")
        every = DEFAULT_CHECKPOINT_EVERY if every is None else every
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"checkpoint_every must be a positive integer, got {every!r}")
        path = os.fspath(checkpoint)
        if distributed:
            root, ext = os.path.splitext(path)
            path = f"{root}.rank{dist_utils.get_rank()}{ext}"
        if os.path.isdir(path):
            raise ValueError(f"checkpoint {path!r} is a directory; give a file path")
        return cls(path, every)

    def load(self) -> dict | None:
        """The saved file, ``None`` if there is none; a file that is not a readable, finite fit
        checkpoint of this version is a ``ValueError`` (no pickled code is ever executed)."""
        if not os.path.exists(self.path):
            return None
        try:
            return io.load_file(self.path, CHECKPOINT_FORMAT)
        except ValueError as e:
            raise ValueError(f"{e}; delete the checkpoint or pass another checkpoint path") from e

    def save(self, settings: dict, state: FitState) -> None:
        """Write ``settings`` and ``state`` atomically (temp file, fsync, rename)."""
        io.save_file(self.path, {"settings": settings, **state.state_dict()}, CHECKPOINT_FORMAT)

    def restore(self, saved: dict, settings: dict, state: FitState) -> None:
        """Load a checkpoint ``saved`` (from :meth:`load`) into ``state`` after checking that it
        belongs to this fit (``settings``); ``ValueError`` otherwise."""
        found = saved.get("settings")
        if not isinstance(found, dict):
            raise ValueError(f"checkpoint {self.path!r} is corrupted: no settings")
        what = {
            "layers": "covered layers (names, weight/bias, sizes): it belongs to another model",
            "model_sha256": "model parameters: the model changed since the checkpoint was written",
        }
        for key, value in settings.items():
            if found.get(key) != value:
                reason = what.get(key, f"{key}: saved {found.get(key)!r}, now {value!r}")
                raise ValueError(
                    f"checkpoint {self.path!r} was written for a different fit ({reason}); "
                    "delete it or pass another checkpoint path"
                )
        try:
            state.load_state_dict(saved)
        except ValueError as e:
            raise ValueError(f"checkpoint {self.path!r} is corrupted: {e}; delete it") from e

    def remove(self) -> None:
        """Delete the checkpoint and temp files left by killed writers."""
        io.remove_file(self.path)


def check_resumed_data(
    saved_count: int, count: int, saved_fp: list[float] | None, x: Any, y: Any, start: int
) -> None:
    """The last of the ``start`` batches skipped on resume must be the one the checkpoint saw
    last (same data count so far, same :func:`~laplace_kron.curvature.batches.fingerprint`)."""
    if not (saved_count == count and same_fingerprint(fingerprint(x, y), saved_fp)):
        raise ValueError(
            f"resuming from a checkpoint after {start} batches, but the data does not yield the "
            "same batches in the same order (a shuffling DataLoader? use shuffle=False or a seeded "
            "sampler), or it is different data; delete the checkpoint to start over"
        )


def model_digest(model: nn.Module) -> str:
    """SHA-256 of the model's parameters and buffers (names, dtypes, shapes and values)."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        if not isinstance(t, Tensor):
            continue
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def fit_settings(
    model: nn.Module,
    specs: Sequence[LayerSpec],
    likelihood: str,
    options: CurvatureOptions,
    kind: str,
    dtype: torch.dtype,
    distributed: bool,
) -> dict:
    """What a checkpoint must match: the fit, the covered layers and the model's values."""
    return {
        "kind": kind,
        "layers": [[s.name, s.weight_name, s.bias_name, s.joint, s.d_in, s.d_out] for s in specs],
        "likelihood": likelihood,
        "fisher": options.fisher,
        "mc_samples": options.mc_samples,
        "weight_sharing": options.weight_sharing,
        "targets": [options.target_key, options.ignore_index, options.shift_labels],
        "dtype": str(dtype),
        "world_size": dist_utils.get_world_size() if distributed else 1,
        "rank": dist_utils.get_rank() if distributed else 0,
        "model_sha256": model_digest(model),
    }
