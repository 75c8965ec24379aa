"""Data-parallel coordination of a curvature fit: whether it runs across ranks, rank-local phases
that fail together, agreement on the resumed pass, and one shared EKFAC eigenbasis.

The sums themselves are all-reduced by :class:`~laplace_kron.curvature.state.FitState`
(``all_reduce_kfac`` / ``all_reduce_ekfac``); the collectives are in
:mod:`laplace_kron.distributed`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch

from .. import distributed as dist_utils
from ..kron import KronBlock

__all__ = ["check_same_pass", "resolve_distributed", "run_local", "share_bases"]

T = TypeVar("T")


def resolve_distributed(distributed: bool | None) -> bool:
    """Whether a fit with option ``distributed`` all-reduces: ``False`` never, ``None`` when
    ``torch.distributed`` is initialised with several ranks, ``True`` requires it initialised."""
    if distributed is False:
        return False
    if distributed is True and not (
        torch.distributed.is_available() and torch.distributed.is_initialized()
    ):
        raise ValueError(
            "distributed=True but torch.distributed is not initialised: call "
            "torch.distributed.init_process_group(...) first (e.g. launch with torchrun)"
        )
    return dist_utils.is_distributed()


def run_local(fn: Callable[[], T], distributed: bool) -> T:
    """Run a rank-local phase; if any rank fails, every rank raises (nobody hangs)."""
    if not distributed:
        return fn()
    try:
        out = fn()
    except BaseException:
        dist_utils.any_rank_failed(True)
        raise
    bad = dist_utils.any_rank_failed(False)
    if bad >= 0:
        raise RuntimeError(
            f"the curvature fit failed on rank {bad} (see that rank's error); stopping here too"
        )
    return out


def check_same_pass(pass_name: str) -> None:
    """Fail unless every rank resumed at the same pass."""
    code = 0.0 if pass_name == "kfac" else 1.0
    t = torch.tensor([code, -code], dtype=torch.float64)
    dist_utils.all_reduce_max_([t])
    if t[0] != -t[1]:
        raise ValueError(
            "the ranks' checkpoints are at different passes (some finished the KFAC pass, "
            "others did not); delete the checkpoints of all ranks and fit again"
        )


def share_bases(bases: list[list[KronBlock]], distributed: bool) -> None:
    """Give every rank rank 0's eigenbases, so EKFAC projections use one basis everywhere."""
    if not distributed:
        return
    tensors = []
    for layer in bases:
        for b in layer:
            eigens = [b.eig_G] if b.A is None else [b.eig_G, b.eig_A]
            # A diagonal factor's eigenvectors are the identity (None): nothing to send.
            tensors += [t for e in eigens for t in (e.values, e.vectors) if t is not None]
    dist_utils.broadcast_(tensors, src=0)
