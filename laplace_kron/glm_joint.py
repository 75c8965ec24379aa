r"""The joint GLM covariance across test inputs and functional samples, Jacobian-free.

**Joint covariance.** ``Cov(f_k(x_b), f_k'(x_b')) = sum_l J_l(x_b)_k Sigma_l J_l(x_b')_k'^T``:
the same eigenbasis formula as for one input, with the two projected Jacobians now from two
inputs. Both share the block's eigenbasis ``Q_G (x) Q_A``, so with ``Jhat_{b,k} = sum_t
ghat_{b,k,t} ahat_{b,t}^T`` and ``linv = 1 / (c lambda + delta)``

    Cov(f_k(x_b), f_k'(x_b')) = sum_l sum_ij Jhat_{b,k}[i,j] Jhat_{b',k'}[i,j] linv_ij.

For ``T = 1`` (dense layers) ``Jhat_{b,k} = ghat_{b,k} ahat_b^T`` is rank one, so

    = sum_i ghat_{b,k,i} ghat_{b',k',i} W_{bb',i},   W_{bb',i} = sum_j ahat_{b,j} ahat_{b',j} linv_ij:

the single-input weights ``w_i = sum_j ahat_j^2 linv_ij`` become pair weights through
``ahat_b * ahat_b'``, and no Jacobian is formed (``O(d_in d_out)`` per pair for ``W``, ``O(C^2
d_out)`` for the block). A bias with input 1 is the same with ``ahat = 1`` (``W_{bb',i} =
linv_i``) and ``ghat = sum_t ghat_t``; a layer whose outputs are the network's has ``ghat_{b,k} =
Q_G[k]`` for every input. Other layers (``T > 1``) form ``Jhat`` for tiles of inputs (``t C d_out
d_in <= chunk_size``), diagonal blocks use per-example Jacobians: ``(J_b * w) J_b'^T``.

Output order is input-major: row ``b C + k`` is output ``k`` of input ``b``. Memory: the result
``(B C)^2`` plus every input's rotated inputs and output-gradients (``B sum_l T_l (C d_out +
d_in)``) and diagonal-block Jacobians (``B C P_diag``), so this is for moderate ``B C``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .constants import DEFAULT_CHUNK
from .curvature.batches import BatchSizeFn, Inputs
from .glm import GLMPass, glm_reduce
from .glm_blocks import BlockFeatures
from .links import factor_samples, gaussian_samples
from .posterior import KronPosterior
from .validation import positive_int

__all__ = ["functional_samples", "joint_covariance"]


def _gathered(feats: list[BlockFeatures]) -> tuple[Tensor, Tensor, bool, Tensor]:
    """A block's ``(gh, a, rank_one, linv)`` over all inputs: rank one ``gh [B or 1, C, d_out]``,
    ``a [B, d_in]`` (``a = 1`` for a bias with ``T > 1``), or ``Jhat`` ingredients ``ghat [C, B,
    T, d_out]``, ``ahat [B, T, d_in]`` (``rank_one`` False)."""
    f0 = feats[0]
    if f0.rank_one is not None:  # an embedding: ahat holds token indices
        return _embedding_gathered(feats)
    ahat = torch.cat([f.ahat for f in feats])
    if f0.shared:
        if ahat.shape[1] != 1:
            raise RuntimeError("a shared (network-output) layer must see one position per input")
        return f0.ghat[:, :, 0].transpose(0, 1), ahat[:, 0], True, f0.linv
    ghat = torch.cat([f.ghat for f in feats], dim=1)
    if ghat.shape[2] == 1:
        return ghat[:, :, 0].transpose(0, 1), ahat[:, 0], True, f0.linv
    if ahat.shape[-1] == 1:  # bias: Jhat_k = sum_t ghat_{k,t}
        gh = torch.einsum("cbti,bt->bci", ghat, ahat[..., 0])
        return gh, ahat.new_ones(gh.shape[0], 1), True, f0.linv
    return ghat, ahat, False, f0.linv


def _embedding_gathered(feats: list[BlockFeatures]) -> tuple[Tensor, Tensor, bool, Tensor]:
    """An embedding block over all inputs, restricted to the ``U`` tokens they hold: ``Jhat``
    columns per token ``[C, B, U, d_out]`` (output-gradients summed over the positions holding
    it) with one-hot inputs ``I_U`` and ``linv [d_out, U]`` (nothing of size ``V``)."""
    idx = torch.cat([f.ahat for f in feats])[..., 0]  # [B, T]
    ghat = torch.cat([f.ghat for f in feats], dim=1)  # [C, B, T, D]
    uniq, inv = torch.unique(idx, return_inverse=True)
    C, B, T, D = ghat.shape
    U = uniq.numel()
    cols = ghat.new_zeros(C, B, U, D).scatter_add_(
        2, inv[None, :, :, None].expand(C, B, T, D), ghat
    )
    eye = torch.eye(U, dtype=ghat.dtype, device=ghat.device).expand(B, U, U)
    return cols, eye, False, feats[0].linv[:, uniq]


def _tiles(B: int, per_input: int, chunk_size: int) -> list[tuple[int, int]]:
    t = max(1, min(B, chunk_size // max(1, per_input)))
    return [(s, min(B, s + t)) for s in range(0, B, t)]


def _block_joint(out: Tensor, gh: Tensor, a: Tensor, rank_one: bool, linv: Tensor, chunk: int):
    """Add one block's cross-input covariance to ``out [B, C, B, C]``."""
    B, C = out.shape[0], out.shape[1]
    if rank_one:
        d_out = linv.shape[0]
        # Pair tiles of t x t inputs: W [t, t, d_out] and the [t, C, t, C] result.
        t = max(1, math.isqrt(max(1, chunk // max(1, d_out + C * C))))
        for i0, i1 in _tiles(B, 1, t):
            for j0, j1 in _tiles(B, 1, t):
                W = torch.einsum("bj,cj,ij->bci", a[i0:i1], a[j0:j1], linv)
                gi = gh[0] if gh.shape[0] == 1 else gh[i0:i1]
                gj = gh[0] if gh.shape[0] == 1 else gh[j0:j1]
                si = "ki" if gh.shape[0] == 1 else "bki"
                sj = "li" if gh.shape[0] == 1 else "cli"
                out[i0:i1, :, j0:j1] += torch.einsum(f"{si},bci,{sj}->bkcl", gi, W, gj)
        return
    ghat, ahat = gh, a
    P = linv.numel()
    tiles = _tiles(B, C * P, chunk)

    def jac(s0: int, s1: int) -> Tensor:  # [t C, P]
        return torch.einsum("cbti,btj->bcij", ghat[:, s0:s1], ahat[s0:s1]).reshape(-1, P)

    for i0, i1 in tiles:
        Jw = jac(i0, i1) * linv.reshape(-1)
        for j0, j1 in tiles:
            out[i0:i1, :, j0:j1] += (Jw @ jac(j0, j1).T).reshape(i1 - i0, C, j1 - j0, C)


def joint_covariance(
    la: KronPosterior,
    x: Inputs,
    chunk_size: int = DEFAULT_CHUNK,
    batch_size: int | None = None,
    batch_size_fn: BatchSizeFn | None = None,
    vectorize: bool = True,
) -> tuple[Tensor, Tensor]:
    """MAP outputs ``f [B, C]`` and the joint GLM covariance ``[B C, B C]`` (input-major) of all
    inputs, without Jacobians for dense layers (see the module docstring)."""
    run = GLMPass(la, x, "cov", chunk_size, batch_size, batch_size_fn, vectorize)
    chunks, diag = [], []
    for chunk in run.chunks():
        chunks.append(chunk)
        for start, parts in run.diag_jacobians(chunk):
            diag.append((chunk.start + start, parts))
    f = torch.cat([c.f for c in chunks])
    B, C = f.shape
    out = f.new_zeros(B, C, B, C)
    with torch.no_grad():
        for p in range(len(chunks[0].blocks)):  # a grouped block has one feature per group
            feats = [c.blocks[p] for c in chunks]
            gh, a, rank_one, linv = _gathered(feats)
            _block_joint(out, gh, a, rank_one, linv, chunk_size)
        for i, (si, parts_i) in enumerate(diag):
            for sj, parts_j in diag[i:]:
                for (Ji, w), (Jj, _) in zip(parts_i, parts_j, strict=True):
                    blk = torch.einsum("bkp,p,clp->bkcl", Ji, w, Jj)
                    out[si : si + Ji.shape[0], :, sj : sj + Jj.shape[0]] += blk
                    if sj != si:
                        out[sj : sj + Jj.shape[0], :, si : si + Ji.shape[0]] += blk.permute(
                            2, 3, 0, 1
                        )
    return f, out.reshape(B * C, B * C)


def functional_samples(
    la: KronPosterior,
    x: Inputs,
    n_samples: int = 100,
    joint: bool = False,
    generator: torch.Generator | None = None,
    **kw,
) -> Tensor:
    """Samples ``[n, B, C]`` of the GLM function values ``f(x) ~ N(f(x; theta*), J Sigma J^T)``.

    ``joint``: one draw from the joint covariance across the inputs (:func:`joint_covariance`,
    correlated inputs, ``(B C)^2`` memory); otherwise independent per input, chunk by chunk
    from a factor ``R`` of each input's covariance (``R R^T = J Sigma J^T``, ``[C, r]`` with
    ``r = sum_l d_out`` for dense layers), chunk by chunk (memory bounded by ``chunk_size``); the
    joint square root by ``eigh`` (robust to singular covariances). Keywords as :func:`~laplace_kron.glm.glm_moments`.
    """
    positive_int("n_samples", n_samples)
    if joint:
        f, S = joint_covariance(la, x, **kw)
        B, C = f.shape
        s = gaussian_samples(f.reshape(1, -1), S.unsqueeze(0), n_samples, generator)
        return s.reshape(n_samples, B, C)

    def draw(f: Tensor, R: Tensor, _: int) -> Tensor:  # [b, n, C]
        return factor_samples(f, R, n_samples, generator).transpose(0, 1)

    _, s, _ = glm_reduce(la, x, "root", draw, extra=n_samples, **kw)
    return s.transpose(0, 1)
