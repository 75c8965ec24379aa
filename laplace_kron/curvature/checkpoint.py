"""Checkpoint files of an interrupted curvature fit: atomic writes, safe loads, and the
fingerprints that tell whether a resumed fit sees the same model and data."""

from __future__ import annotations

import glob
import hashlib
import math
import os
import pickle
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .. import distributed as dist_utils

__all__ = [
    "CHECKPOINT_FORMAT",
    "CHECKPOINT_VERSION",
    "DEFAULT_CHECKPOINT_EVERY",
    "checkpoint_state",
    "fit_settings",
    "restore",
]

CHECKPOINT_FORMAT = "laplace_kron.fit_checkpoint"
CHECKPOINT_VERSION = 1
DEFAULT_CHECKPOINT_EVERY = 100


@dataclass
class _Checkpoint:
    """Where and how often a fit saves its accumulation (one file per rank when distributed)."""

    path: str
    every: int

    @classmethod
    def make(cls, checkpoint, every: int | None, distributed: bool) -> _Checkpoint | None:
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
        """The saved state, ``None`` if there is no file; never executes pickled code."""
        if not os.path.exists(self.path):
            return None
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            raise ValueError(
                f"refusing to load checkpoint {self.path!r}: it is not made of tensors and plain "
                f"data only (a foreign, tampered or corrupted file: {e}); nothing was executed"
            ) from e
        except (RuntimeError, EOFError, OSError, ValueError) as e:
            raise ValueError(f"cannot read checkpoint {self.path!r}: {e}") from e
        if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"{self.path!r} is not a laplace_kron fit checkpoint")
        if state.get("version") != CHECKPOINT_VERSION:
            raise ValueError(
                f"checkpoint {self.path!r} has version {state.get('version')!r}, this "
                f"laplace_kron reads version {CHECKPOINT_VERSION}"
            )
        return state

    def save(self, state: dict) -> None:
        """Write to a temp file next to the target, fsync, then atomically rename."""
        tmp = f"{self.path}.tmp-{os.getpid()}"
        try:
            with open(tmp, "wb") as f:
                torch.save(state, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)

    def remove(self) -> None:
        """Delete the checkpoint and temp files left by killed writers (``<path>.tmp-<pid>``)."""
        for f in [self.path, *glob.glob(glob.escape(self.path) + ".tmp-*")]:
            if os.path.exists(f):
                os.remove(f)


def _batch_size(y) -> int:
    return int(y.shape[0]) if isinstance(y, Tensor) and y.ndim else len(y)


def _fingerprint(x, y) -> list[float]:
    """Sizes and float64 sums of a batch's tensors: detects a changed batch order on resume."""
    tensors = [*(x.values() if isinstance(x, dict) else [x]), y]
    out = []
    for t in tensors:
        if isinstance(t, Tensor):
            d = t.detach().to(torch.float64)
            out += [float(t.numel()), float(d.sum()), float(d.abs().sum())]
    return out


def _check_resumed_data(
    saved_count: int, count: int, saved_fp: list[float] | None, x, y, start: int
) -> None:
    fp = _fingerprint(x, y)
    same = (
        saved_count == count
        and saved_fp is not None
        and len(fp) == len(saved_fp)
        and all(math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12) for a, b in zip(fp, saved_fp))
    )
    if not same:
        raise ValueError(
            f"resuming from a checkpoint after {start} batches, but the data does not yield the "
            "same batches in the same order (a shuffling DataLoader? use shuffle=False or a seeded "
            "sampler), or it is different data; delete the checkpoint to start over"
        )


def _model_digest(model: nn.Module) -> str:
    """SHA-256 of the model's parameters and buffers (names, dtypes, shapes and values)."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        if not isinstance(t, Tensor):
            continue
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def fit_settings(fitter, kind: str) -> dict:
    """What a checkpoint must match: the fit, the covered layers and the model's values."""
    return {
        "kind": kind,
        "layers": [
            [s.name, s.weight_name, s.bias_name, s.joint, s.d_in, s.d_out] for s in fitter.specs
        ],
        "likelihood": fitter.likelihood,
        "fisher": fitter.fisher,
        "mc_samples": fitter.mc_samples,
        "weight_sharing": fitter.weight_sharing,
        "dtype": str(fitter.dtype),
        "world_size": dist_utils.get_world_size() if fitter._dist else 1,
        "rank": dist_utils.get_rank() if fitter._dist else 0,
        "model_sha256": _model_digest(fitter.model),
    }


def checkpoint_state(fitter, settings: dict, pass_name: str, next_batch: int) -> dict:
    """The accumulation of a :class:`~laplace_kron.curvature.CurvatureFitter` as a checkpoint."""
    fitter._mirror()
    fp = None if fitter._last_batch is None else _fingerprint(*fitter._last_batch)
    return {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "settings": settings,
        "pass": pass_name,
        "next_batch": next_batch,
        "pass_data": fitter._pass_data,
        "fingerprint": fp,
        "A_sum": list(fitter.A_sum),
        "G_sum": list(fitter.G_sum),
        "E_sum": [None if e is None else list(e) for e in fitter.E_sum],
        "num_data": fitter.num_data,
        "loss": fitter.loss,
        "sse": fitter.sse,
        "n_outputs": fitter.n_outputs,
        "generator_state": None if fitter._gen is None else fitter._gen.get_state(),
    }


def restore(fitter, state: dict, settings: dict, path: str) -> None:
    """Load a checkpoint's accumulation after checking it belongs to this fit."""
    saved = state.get("settings")
    if not isinstance(saved, dict):
        raise ValueError(f"checkpoint {path!r} is corrupted: no settings")
    what = {
        "layers": "covered layers (names, weight/bias, sizes): it belongs to another model",
        "model_sha256": "model parameters: the model changed since the checkpoint was written",
    }
    for key, value in settings.items():
        if saved.get(key) != value:
            reason = what.get(key, f"{key}: saved {saved.get(key)!r}, now {value!r}")
            raise ValueError(
                f"checkpoint {path!r} was written for a different fit ({reason}); delete it "
                "or pass another checkpoint path"
            )
    try:
        n = len(fitter.specs)
        if state["pass"] not in ("kfac", "ekfac") or not all(
            len(state[k]) == n for k in ("A_sum", "G_sum", "E_sum")
        ):
            raise ValueError("inconsistent layer lists")
        dev = fitter.device
        fitter.A_sum = [None if t is None else t.to(dev) for t in state["A_sum"]]
        fitter.G_sum = [None if t is None else t.to(dev) for t in state["G_sum"]]
        fitter.E_sum = [None if e is None else [t.to(dev) for t in e] for e in state["E_sum"]]
        fitter.num_data = int(state["num_data"])
        fitter.loss, fitter.sse = float(state["loss"]), float(state["sse"])
        fitter.n_outputs = int(state["n_outputs"])
        fitter._pass_data = int(state["pass_data"])
        fitter._resume_fingerprint = state["fingerprint"]
        gen_state = state["generator_state"]
        if fitter._gen is not None:
            if gen_state is None:
                raise ValueError("no generator state")
            fitter._gen.set_state(gen_state)
    except (KeyError, TypeError, AttributeError, ValueError, RuntimeError) as e:
        fitter.reset()
        raise ValueError(f"checkpoint {path!r} is corrupted ({e}); delete it") from e
