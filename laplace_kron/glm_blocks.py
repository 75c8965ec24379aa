r"""Per-block GLM moments in the Kronecker eigenbasis, from rotated inputs and output-gradients.

For a block with rotated inputs ``ahat = a Q_A`` ``[b, T, d_in]`` and output-gradients ``ghat =
g Q_G`` ``[C, b, T, d_out]``, the projected Jacobian of output ``k`` is ``Jhat_k = sum_t
ghat_{k,t} ahat_t^T`` and ``(J Sigma J^T)_{kk'} = sum_ij Jhat_k[i,j] Jhat_k'[i,j] linv_ij`` with
``linv = 1 / (c lambda + delta)``. For ``T = 1`` it is ``sum_i ghat_{k,i} ghat_{k',i} w_i``,
``w = ahat^2 linv^T``: no Jacobian is formed. A layer whose outputs are the network outputs has
``g_k = e_k``, so ``ghat_k = Q_G[k]`` is the same for every input (``shared``): the variance of all
inputs is one GEMM ``(Q_G * Q_G) w^T``.

Besides the covariance (``cov``), a ``kind`` asks for diagonals of ``(M1 J) Sigma (M2 J)^T`` for
pairs of output maps ``M`` applied to the output-gradients: ``var`` (``M = I``), ``centered``
(``P = I - 1 1^T / C``: the probit of the projected logits) and ``bridge`` (``S_kk``, ``(S 1)_k``,
``1^T S 1``: what the Laplace bridge conditions on). They cost ``O(C)`` per input and block
instead of the ``O(C^2)`` of the covariance.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import Tensor

from .curvature.capture import Capture, LayerSpec, join_use_gradients, output_rows
from .curvature.convs import rotate_groups
from .curvature.embedding import token_mask, token_rank_one
from .kron import KronBlock

__all__ = [
    "KINDS",
    "BlockFeatures",
    "block_moments",
    "block_root",
    "diag_block_moments",
    "embedding_features",
    "kind_pairs",
    "layer_output_gradients",
    "rotate_block",
]


# --------------------------------------------------------------------------------------------------
# What is computed per input: the covariance, or diagonals of pairs of transformed outputs
# --------------------------------------------------------------------------------------------------

# "var": S_kk; "centered": (P S P)_kk with P = I - 1 1^T / C (per group of C classes); "bridge":
# S_kk, (S 1)_k and 1^T S 1 (the moments the Laplace bridge conditions on). Each pair (h1, h2)
# is the diagonal of (M1 J) Sigma (M2 J)^T: the output-gradients are transformed by M1, M2 first,
# so none of them needs the C x C covariance (O(C) per input instead of O(C^2)).
_PAIRS = {
    "var": (("id", "id"),),
    "centered": (("center", "center"),),
    "bridge": (("id", "id"), ("id", "sum"), ("sum", "sum")),
}
# "root": a factor R [b, C, r] with R R^T = J Sigma J^T (sampling without an eigh of C x C).
KINDS = ("cov", "root", *_PAIRS)


def kind_pairs(kind: str) -> tuple[tuple[str, str], ...]:
    """The pairs of output maps of a diagonal ``kind`` (empty for ``cov``)."""
    return _PAIRS.get(kind, ())


def _transform(g: Tensor, how: str, dim: int, group: int) -> Tensor:
    """Output-gradients ``g`` with output axis ``dim`` (``R group`` outputs) mapped by ``M``:
    ``id``; ``center``: minus the mean of each group; ``sum``: every row the group's sum."""
    if how == "id":
        return g
    gg = g.unflatten(dim, (-1, group))
    if how == "center":
        return (gg - gg.mean(dim + 1, keepdim=True)).flatten(dim, dim + 1)
    return gg.sum(dim + 1, keepdim=True).expand_as(gg).flatten(dim, dim + 1)


def _pairwise(rows: Tensor, dim: int, kind: str, group: int, weigh) -> Tensor:
    """``[..., p]``: for each pair of ``kind``, ``weigh(M1 rows * M2 rows)`` (``rows``' output
    axis ``dim``); ``weigh`` contracts the parameter axes with the inverse damped eigenvalues."""
    cache = {h: _transform(rows, h, dim, group) for pair in _PAIRS[kind] for h in pair}
    return torch.stack([weigh(cache[h1] * cache[h2]) for h1, h2 in _PAIRS[kind]], -1)


@dataclass
class BlockFeatures:
    """One Kronecker block's rotated quantities for a chunk of ``b`` inputs.

    ``ahat [b, T, d_in]`` (inputs times ``Q_A``; ones for a separate bias), ``ghat [C, b, T,
    d_out]`` (output-gradients times ``Q_G``) or, for a layer whose outputs are the network's
    outputs (``shared``), ``ghat [C, 1, 1, d_out] = Q_G`` itself (``g_k = e_k``, no backward
    pass). ``linv [d_out, d_in] = 1 / (c lambda + delta)``. ``rank_one``: the moments already
    as rank-one terms ``(gh [b, C, r], w [b, r])`` (an embedding, whose inputs are token
    indices: :func:`~laplace_kron.curvature.embedding.token_rank_one`), used instead of the rest.
    """

    ahat: Tensor
    ghat: Tensor
    linv: Tensor
    shared: bool
    rank_one: tuple[Tensor, Tensor] | None = None


def embedding_features(
    spec: LayerSpec, idx: Tensor, g: Tensor, block: KronBlock, linv: Tensor
) -> BlockFeatures:
    """An embedding block's features from its token indices ``idx [b, T, 1]`` and
    output-gradients ``g [C, b, T, D]`` (``block`` with ``G`` in the ``G`` slot): the padding
    row has no Jacobian, so positions holding ``padding_idx`` are zeroed first."""
    mask = token_mask(spec, idx)
    g = g if mask is None else g * mask.to(g.dtype)[None, :, :, None]
    ghat = g @ block.eig_G.vectors.to(g.dtype)
    return BlockFeatures(idx, ghat, linv, False, token_rank_one(idx, ghat, linv))


def rotate_block(
    blk: KronBlock, groups: int, a: Tensor, g: Tensor | None, linv: Tensor
) -> list[BlockFeatures]:
    """A block's :class:`BlockFeatures` from its layer's inputs ``a [b, T, d_in]`` and
    output-gradients ``g [C, b, T, d_out]`` (``None``: the layer's outputs are the network's,
    ``g_k = e_k``); ``blk`` has its output factor in ``G``. A grouped convolution's block
    (``groups > 1``, factors ``[g, d, d]``) gives one feature per group (its columns of ``a`` and
    ``g`` are one run per group)."""
    QG = blk.eig_G.vectors.to(a.dtype)
    if groups > 1:  # the groups' features: inputs [b, T, g, i], gradients [C, b, T, g, o]
        if blk.A is None:
            ahat = a.new_ones(*a.shape[:2], groups, 1)
        else:
            ahat = rotate_groups(a, blk.eig_A.vectors.to(a.dtype)).unflatten(-1, (groups, -1))
        ghat = rotate_groups(g, QG).unflatten(-1, (groups, -1))
        return [
            BlockFeatures(ahat[..., j, :], ghat[..., j, :], linv[j], False) for j in range(groups)
        ]
    if blk.A is None:
        ahat = a.new_ones(a.shape[0], a.shape[1], 1)
    else:
        ahat = a @ blk.eig_A.vectors.to(a.dtype)  # [b, T, d_in]
    if g is None:  # ghat_k = Q_G[k] for every input
        return [BlockFeatures(ahat, QG[:, None, None, :], linv, True)]
    if g.shape[2] > 1 and g.mT.is_contiguous():
        # Channel-first convolution gradients: rotate them as [d_out, T] matrices (no copy).
        ghat = (QG.T @ g.mT).mT  # [C, b, T, d_out]
    else:
        ghat = g @ QG
    return [BlockFeatures(ahat, ghat, linv, False)]


def _rank_one(feat: BlockFeatures) -> tuple[Tensor, Tensor] | None:
    """``(gh [b or 1, C, d_out], w [b, d_out])`` with ``(J Sigma J^T)_kk' = sum_i gh_ki gh_k'i
    w_i`` when every ``Jhat_k`` is rank one (``T = 1``, or a bias with input 1), else None."""
    if feat.rank_one is not None:
        return feat.rank_one
    ahat, ghat, linv = feat.ahat, feat.ghat, feat.linv
    if ghat.shape[2] == 1:
        return ghat[:, :, 0].transpose(0, 1), ahat[:, 0].square() @ linv.T
    if ahat.shape[-1] == 1:  # Jhat_k = sum_t ghat_{k,t} ahat_t, ahat_t = 1
        gh = torch.einsum("cbti,bt->bci", ghat, ahat[..., 0])
        return gh, linv[:, 0].expand(gh.shape[0], -1)
    return None


def block_moments(feat: BlockFeatures, kind: str, group: int, chunk_size: int) -> Tensor:
    """One block's contribution for ``b`` inputs: ``[b, C, C]`` (``cov``) or ``[b, C, p]``."""
    ahat, ghat, linv = feat.ahat, feat.ghat, feat.linv
    ro = _rank_one(feat)
    if ro is not None:
        gh, w = ro
        if feat.shared:  # gh [1, C, d_out] = Q_G for every input: one GEMM for all of them
            G = gh[0]
            if kind == "cov":
                return (G * w.unsqueeze(1)) @ G.T
            return _pairwise(G, 0, kind, group, lambda m: m @ w.T).transpose(0, 1)
        if kind == "cov":
            return (gh * w.unsqueeze(1)) @ gh.transpose(1, 2)
        return _pairwise(gh, 1, kind, group, lambda m: (m * w.unsqueeze(1)).sum(-1))
    C, b, _, d_out = ghat.shape
    d_in = ahat.shape[-1]
    k = max(1, min(C, chunk_size // max(1, b * d_out * d_in)))

    def tile(gh: Tensor, c0: int) -> Tensor:  # projected Jacobian [b, k, d_out, d_in]
        return torch.einsum("cbti,btj->bcij", gh[c0 : c0 + k], ahat)

    if kind != "cov":
        hs = {h: _transform(ghat, h, 0, group) for pair in _PAIRS[kind] for h in pair}
        out = ghat.new_empty(b, C, len(_PAIRS[kind]))
        for p, (h1, h2) in enumerate(_PAIRS[kind]):
            for c0 in range(0, C, k):
                J1 = tile(hs[h1], c0)
                J2 = J1 if h1 == h2 else tile(hs[h2], c0)
                out[:, c0 : c0 + k, p] = (J1 * J2 * linv).sum((-2, -1))
        return out
    out = ghat.new_empty(b, C, C)
    for c0 in range(0, C, k):
        J1 = tile(ghat, c0)
        Jw = (J1 * linv).flatten(2)
        for c1 in range(c0, C, k):
            J2 = J1 if c1 == c0 else tile(ghat, c1)
            blk_cov = Jw @ J2.flatten(2).transpose(1, 2)  # [b, k, k']
            out[:, c0 : c0 + k, c1 : c1 + k] = blk_cov
            if c1 != c0:
                out[:, c1 : c1 + k, c0 : c0 + k] = blk_cov.transpose(1, 2)
    return out


def block_root(feat: BlockFeatures) -> Tensor:
    """A factor ``[b, C, r]`` of one block's ``J Sigma J^T``: ``gh sqrt(w)`` (``r = d_out``)
    when every ``Jhat_k`` is rank one, else ``Jhat sqrt(linv)`` flattened (``r = d_out d_in``)."""
    ro = _rank_one(feat)
    if ro is not None:
        gh, w = ro
        return gh * w.sqrt().unsqueeze(1)
    J = torch.einsum("cbti,btj->bcij", feat.ghat, feat.ahat)
    return (J * feat.linv.sqrt()).flatten(2)


def diag_block_moments(J: Tensor, w: Tensor, kind: str, group: int) -> Tensor:
    """A diagonal block's contribution from per-example Jacobians ``J [b, C, P_block]`` and
    ``w = 1 / (c h + delta)`` ``[P_block]``: ``[b, C, C]`` (``cov``) or ``[b, C, p]``."""
    if kind == "cov":
        return (J * w) @ J.mT
    if kind == "root":
        return J * w.sqrt()
    return _pairwise(J, 1, kind, group, lambda m: (m * w).sum(-1))


def layer_output_gradients(
    cap: Capture,
    specs: list[LayerSpec],
    f: Tensor,
    vectorize: bool,
    extra: list[Tensor] | None = None,
) -> tuple[list[Tensor], list[Tensor], bool]:
    """Gradients of every output ``f[:, k]`` w.r.t. each layer's outputs: per layer
    ``[C, b, T, d_out]``, and w.r.t. each ``extra`` tensor ``t``: ``[C, *t.shape]`` (zeros where
    unused). One vmapped backward pass (``is_grads_batched``) when ``vectorize``, else (or if
    vmap fails) one backward pass per output. Returns whether vmap worked."""
    b, C = f.shape
    extra = list(extra or [])
    if not specs and not extra:  # only diagonal blocks by per-example passes
        return [], [], vectorize
    vectors = torch.eye(C, dtype=f.dtype, device=f.device).unsqueeze(1).expand(C, b, C)
    if vectorize:
        outs = [o for s in specs for o in s.outputs]
        try:
            grads = torch.autograd.grad(
                f,
                outs + extra,
                vectors,
                retain_graph=True,
                allow_unused=True,
                is_grads_batched=True,
            )
        except (RuntimeError, NotImplementedError) as e:
            warnings.warn(
                f"batched backward (vmap) failed ({e}); using one backward pass per output. Pass "
                "vectorize=False to skip the attempt.",
                stacklevel=4,
            )
        else:
            ex = [
                t.new_zeros(C, *t.shape) if g is None else g
                for t, g in zip(extra, grads[len(outs) :], strict=True)
            ]
            result, i = [], 0
            for s in specs:
                if s.by_use:  # uses of one weight (row slices, flattened positions) joined
                    c = len(s.outputs)
                    parts = [
                        o.new_zeros(C, *o.shape) if g is None else g
                        for o, g in zip(s.outputs, grads[i : i + c])
                    ]
                    result.append(join_use_gradients(s, parts, lead=1))
                    i += c
                    continue
                gs = []
                for o, x in zip(s.outputs, s.inputs, strict=True):
                    g = grads[i]
                    g = o.new_zeros(C, *o.shape) if g is None else g
                    # Convolutions: channel-first [C, b, d_out, T], returned as a transposed view.
                    gs.append(output_rows(s.module, g.flatten(0, 1), x).unflatten(0, (C, -1)))
                    i += 1
                result.append(gs[0] if len(gs) == 1 else torch.cat(gs, dim=2))
            return result, ex, True
    per_vec = list(cap.iter_output_gradients(f, vectors, extra=extra))
    ex = [torch.stack(gs) for gs in zip(*[r.pop() for r in per_vec])] if extra else []
    return [torch.cat(gs, dim=0) for gs in zip(*per_vec)], ex, False
