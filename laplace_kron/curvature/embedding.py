"""The Kronecker block of an ``nn.Embedding`` weight from token indices, never from one-hots.

An embedding is the linear map ``y_t = W^T onehot(i_t)`` with ``W [V, D]`` stored ``[d_in,
d_out]``. Its per-position input is the one-hot ``a_t = onehot(i_t)``, so the KFAC-expand input
factor is diagonal,

    A = 1/N sum_n 1/T_n sum_{t valid} onehot(i_nt) onehot(i_nt)^T = diag(c),
    c_v = 1/N sum_n (number of valid positions t of datum n with i_nt = v) / T_n,

(the normalisation of every other layer: ``1/T_n`` per datum, ``T_n`` its valid positions), and
``G = sum_{k,n,t valid} g g^T`` as for any layer. A position is *valid* unless the batch's
``attention_mask`` marks it as padding or its index is the module's ``padding_idx`` (that row
receives no gradient: the position is no datum of this layer). The block of ``W`` in its own
``p.flatten()`` order is ``diag(c) (x) G`` (stored with the slots swapped, the counts ``[V]`` as
a 1-d diagonal factor, :mod:`~laplace_kron.factors`).

The per-example weight gradient is ``grad_{k,n} = sum_t g_{k,n,t} onehot(i_nt)^T``: column ``v``
is the sum of the output-gradients at the positions holding ``v``. EKFAC (eigenbasis
``Q_G (x) I``) and the GLM's projected Jacobians are formed from these per-token sums, with at
most one column per distinct (datum, token) pair: nothing ``[V, V]`` or ``[.., T, V]``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .selection import LayerSpec

__all__ = ["add_counts", "token_mask", "token_rank_one", "token_sq_sums"]


def token_mask(spec: LayerSpec, idx: Tensor, positions: Tensor | None = None) -> Tensor | None:
    """``[N, T]`` weights (1 valid, 0 not) of the positions of token indices ``idx [N, T, 1]``:
    ``padding_idx`` tokens and attention padding (``positions [N, T]``, when the layer's ``T`` is
    the mask's) are not valid; ``None`` when every position is."""
    mask = None
    if spec.padding_idx is not None:
        mask = idx[..., 0] != spec.padding_idx
    if positions is not None and positions.shape[1] == idx.shape[1]:
        p = positions > 0
        mask = p if mask is None else mask & p
    return mask


def add_counts(A_sum: Tensor | None, idx: Tensor, mask: Tensor | None, V: int, dtype) -> Tensor:
    """``A_sum [V] + sum_n 1/T_n sum_{t valid} onehot(i_nt)`` (KFAC-expand, see the module)."""
    N, T = idx.shape[:2]
    if mask is None:
        w = torch.full((N, T), 1.0 / T, dtype=dtype, device=idx.device)
    else:
        w = mask.to(dtype)
        w = w / w.sum(1, keepdim=True).clamp_min(1)
    out = torch.zeros(V, dtype=dtype, device=idx.device) if A_sum is None else A_sum
    return out.index_add_(0, idx.reshape(-1), w.reshape(-1))


def _token_sums(idx: Tensor, g: Tensor, V: int) -> tuple[Tensor, Tensor]:
    """Per distinct (datum, token) pair ``u``: ``sum_{t: i_nt = v} g[:, n, t]`` ``[K, U, D]`` and
    the token ``v`` of each pair ``[U]`` (``g [K, N, T, D]``, ``idx [N, T, 1]``)."""
    K, N, T, D = g.shape
    keys = torch.arange(N, device=idx.device).unsqueeze(1) * V + idx[..., 0]
    uniq, inv = torch.unique(keys.reshape(-1), return_inverse=True)
    sums = g.new_zeros(K, uniq.numel(), D).index_add_(1, inv, g.reshape(K, N * T, D))
    return sums, uniq % V


def token_sq_sums(idx: Tensor, g: Tensor, V: int) -> Tensor:
    """``[D, V]``: ``sum_{k,n} (sum_t g[k,n,t] onehot(i_nt)^T)^2``, the squared per-example
    gradients of ``W^T`` (EKFAC in the basis ``Q_G (x) I`` when ``g`` is rotated by ``Q_G``;
    ``g`` zero at the positions that are not valid)."""
    sums, tokens = _token_sums(idx, g, V)
    sq = sums.square().sum(0)  # [U, D]
    return sq.new_zeros(V, sq.shape[1]).index_add_(0, tokens, sq).T


def token_rank_one(idx: Tensor, ghat: Tensor, linv: Tensor) -> tuple[Tensor, Tensor]:
    """The GLM moments of an embedding block as a sum of rank-one terms: ``(gh [b, C, r],
    w [b, r])`` with ``(J Sigma J^T)_kk' = sum_r gh_kr gh_k'r w_r`` per input.

    ``ghat [C, b, T, D]``: output-gradients rotated by ``Q_G`` (zero at positions that are not
    valid), ``linv [D, V]``: ``1 / (c lambda + delta)``. The projected Jacobian of output ``k``
    has the column ``sum_{t: i_t = v} ghat_{k,t}`` for each token ``v`` of the input: it is
    written at the first position holding ``v`` (zeros at repeats), so ``r = T D``.
    """
    C, b, T, D = ghat.shape
    tok = idx[..., 0]  # [b, T]
    first = (tok.unsqueeze(2) == tok.unsqueeze(1)).to(torch.int8).argmax(2)  # [b, T]
    gh = torch.zeros_like(ghat).scatter_add_(2, first[None, :, :, None].expand_as(ghat), ghat)
    w = linv.T[tok]  # [b, T, D]
    return gh.permute(1, 0, 2, 3).reshape(b, C, T * D), w.reshape(b, T * D)
