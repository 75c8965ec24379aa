"""``torch.distributed`` helpers for data-parallel curvature fitting.

With ``R`` ranks each holding a shard ``D_r`` of the data, every quantity KFAC accumulates is a sum
over data, so the curvature of the full data set is the all-reduced (summed) local state:

    A_sum = sum_r A_sum^(r),   G_sum = sum_r G_sum^(r),   E_sum = sum_r E_sum^(r),
    N = sum_r N_r,             loss = sum_r loss_r,       sse = sum_r sse_r,

and ``A = A_sum / N`` uses the global ``N``. The functions here take plain tensors and are no-ops
when ``torch.distributed`` is unavailable, not initialised, or has a single rank. They work with
the ``gloo`` backend (CPU tensors) and ``nccl`` (CUDA tensors: CPU tensors are moved to the current
CUDA device for the collective and back).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = [
    "is_distributed",
    "get_rank",
    "get_world_size",
    "all_reduce_sum_",
    "all_reduce_max_",
    "broadcast_",
    "any_rank_failed",
    "rank_generator",
    "shard_dataset",
]

# Tensors are coalesced into flat buffers of at most this many elements per collective.
_BUCKET = 2**25
# Odd 64-bit constant (golden ratio) that spreads rank seeds apart.
_SEED_MIX = 0x9E3779B97F4A7C15


def is_distributed(group: dist.ProcessGroup | None = None) -> bool:
    """``True`` when ``torch.distributed`` is initialised with more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def get_rank(group: dist.ProcessGroup | None = None) -> int:
    """This process's rank (0 when not distributed)."""
    return dist.get_rank(group) if dist.is_available() and dist.is_initialized() else 0


def get_world_size(group: dist.ProcessGroup | None = None) -> int:
    """Number of ranks (1 when not distributed)."""
    return dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1


def _comm_device(device: torch.device, group) -> torch.device:
    """Device a tensor must live on for the group's backend (nccl needs CUDA)."""
    if device.type == "cpu" and dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return device


def _collective_(tensors: Sequence[Tensor], group, op: str, src: int = 0) -> None:
    """Run a collective in place on ``tensors``, coalescing same-device, same-dtype tensors."""
    groups: dict[tuple, list[Tensor]] = {}
    for t in tensors:
        groups.setdefault((t.device, t.dtype), []).append(t)
    for (device, _), ts in groups.items():
        comm = _comm_device(device, group)
        buckets: list[list[Tensor]] = [[]]
        size = 0
        for t in ts:
            if buckets[-1] and size + t.numel() > _BUCKET:
                buckets.append([])
                size = 0
            buckets[-1].append(t)
            size += t.numel()
        for bucket in buckets:
            flat = torch.cat([t.detach().reshape(-1) for t in bucket]).to(comm)
            if op == "broadcast":
                dist.broadcast(flat, src=src, group=group)
            else:
                red = dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX
                dist.all_reduce(flat, op=red, group=group)
            flat = flat.to(device)
            start = 0
            for t in bucket:
                t.copy_(flat[start : start + t.numel()].view_as(t))
                start += t.numel()


def all_reduce_sum_(tensors: Sequence[Tensor], group: dist.ProcessGroup | None = None) -> None:
    """In place: each tensor becomes its sum over ranks (one collective per dtype and bucket)."""
    if is_distributed(group) and len(tensors):
        _collective_(tensors, group, "sum")


def all_reduce_max_(tensors: Sequence[Tensor], group: dist.ProcessGroup | None = None) -> None:
    """In place: each tensor becomes its elementwise maximum over ranks."""
    if is_distributed(group) and len(tensors):
        _collective_(tensors, group, "max")


def broadcast_(
    tensors: Sequence[Tensor], src: int = 0, group: dist.ProcessGroup | None = None
) -> None:
    """In place: every rank receives rank ``src``'s values (e.g. to share one eigenbasis)."""
    if is_distributed(group) and len(tensors):
        _collective_(tensors, group, "broadcast", src)


def any_rank_failed(
    failed: bool, device: torch.device | str = "cpu", group: dist.ProcessGroup | None = None
) -> int:
    """Agree across ranks on whether a local phase failed.

    Every rank must call this at the same point; it returns the lowest failing rank (``-1`` if none)
    so that a rank whose data was bad does not leave the others hanging in the next collective.
    """
    if not is_distributed(group):
        return get_rank(group) if failed else -1
    world = get_world_size(group)
    flag = torch.tensor([float(world - get_rank(group)) if failed else 0.0], device=device)
    all_reduce_max_([flag], group)
    top = int(flag.item())
    return world - top if top > 0 else -1


def rank_generator(
    generator: torch.Generator | None, group: dist.ProcessGroup | None = None
) -> torch.Generator | None:
    """A per-rank random stream derived from ``generator``.

    Not distributed: ``generator`` itself. Otherwise a base seed ``s`` is drawn from ``generator``
    (identical on every rank when every rank seeds it identically) and rank ``r`` gets a new
    generator seeded with ``(s + (r + 1) * 0x9E3779B97F4A7C15) mod 2^63``: the ranks sample
    different labels, and the whole run is reproducible from the user's seed.
    """
    if generator is None or not is_distributed(group):
        return generator
    base = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))
    seed = (base + (get_rank(group) + 1) * _SEED_MIX) % 2**63
    return torch.Generator(device=generator.device).manual_seed(seed)


def shard_dataset(
    dataset: torch.utils.data.Dataset,
    rank: int | None = None,
    world_size: int | None = None,
) -> torch.utils.data.Subset:
    """This rank's shard ``dataset[rank::world_size]`` (no padding, no duplicates).

    Unlike ``DistributedSampler`` (which pads the last shard by repeating samples when ``N`` is not
    divisible by the world size, and so would count them twice in the curvature), the shards
    partition the data exactly.
    """
    rank = get_rank() if rank is None else rank
    world_size = get_world_size() if world_size is None else world_size
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must lie in [0, {world_size - 1}], got {rank}")
    return torch.utils.data.Subset(dataset, range(rank, len(dataset), world_size))
