"""Data-parallel reduction of a :class:`~laplace_kron.curvature.CurvatureFitter`'s accumulation.

Every accumulated quantity is a sum over data, so after a pass over its shard each rank
all-reduces (sums) its factor sums, data count, loss and sse; EKFAC projects onto rank 0's
eigenbases (broadcast) and all-reduces its eigenvalue sums. The collectives themselves are in
:mod:`laplace_kron.distributed`. For a rank-local fit the reductions do nothing (``reduce_ekfac``
still checks that the second pass saw as many data as the first).
"""

from __future__ import annotations

import torch

from .. import distributed as dist_utils
from ..kron import KronBlock

__all__ = ["check_same_pass", "reduce_kfac", "share_bases", "reduce_ekfac"]


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


def reduce_kfac(fitter) -> None:
    """All-reduce ``A_sum``, ``G_sum``, ``N``, loss and sse (ranks without data add zeros)."""
    if not fitter._dist:
        return
    for li, spec in enumerate(fitter.specs):
        kw = {"dtype": fitter.dtype, "device": fitter.device}
        if spec.has_weight and fitter.A_sum[li] is None:
            d = spec.d_in + int(spec.joint)
            fitter.A_sum[li] = torch.zeros(d, d, **kw)
        if fitter.G_sum[li] is None:
            fitter.G_sum[li] = torch.zeros(spec.d_out, spec.d_out, **kw)
    n_out = torch.tensor([float(fitter.n_outputs)], dtype=torch.float64)
    dist_utils.all_reduce_max_([n_out])
    scalars = torch.tensor([fitter.num_data, fitter.loss, fitter.sse], dtype=torch.float64)
    factors = [t for t in fitter.A_sum if t is not None] + list(fitter.G_sum)
    dist_utils.all_reduce_sum_([*factors, scalars])
    fitter.n_outputs = int(n_out.item())
    fitter.num_data = int(round(scalars[0].item()))
    fitter.loss, fitter.sse = scalars[1].item(), scalars[2].item()


def share_bases(fitter, bases: list[list[KronBlock]]) -> None:
    """Give every rank rank 0's eigenbases, so EKFAC projections use one basis everywhere."""
    if not fitter._dist:
        return
    tensors = []
    for layer in bases:
        for b in layer:
            tensors += [b.eig_G.values, b.eig_G.vectors]
            if b.A is not None:
                tensors += [b.eig_A.values, b.eig_A.vectors]
    dist_utils.broadcast_(tensors, src=0)


def reduce_ekfac(fitter, bases: list[list[KronBlock]]) -> None:
    """All-reduce ``E_sum`` and check the second pass saw the same ``N`` as the first."""
    count = torch.tensor([float(fitter._pass_data)], dtype=torch.float64)
    if fitter._dist:
        for li, layer in enumerate(bases):
            if fitter.E_sum[li] is None:
                fitter.E_sum[li] = [
                    torch.zeros(b.d_out, b.d_in, dtype=b.dtype, device=b.device) for b in layer
                ]
        dist_utils.all_reduce_sum_([e for es in fitter.E_sum for e in es] + [count])
    n2 = int(round(count.item()))
    if n2 != fitter.num_data:
        raise ValueError(
            f"the EKFAC second pass saw {n2} data points but the KFAC pass {fitter.num_data}; "
            "data must be re-iterable and yield the same data twice (not a one-shot iterator)"
        )
