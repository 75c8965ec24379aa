r"""The linearised (GLM) predictive moments, Jacobian-free in the Kronecker eigenbasis.

**GLM (linearized) predictive.** Linearizing the network at the MAP ``theta*``,

    f(x; theta) ~= f(x; theta*) + J(x) (theta - theta*),   theta ~ N(theta*, Sigma)

gives ``f(x) ~ N(f(x; theta*), J(x) Sigma J(x)^T)`` with ``J(x) [C, P]``. ``Sigma`` is block
diagonal; a block of the layer ``y_t = W a_t (+ b)`` (``T`` shared positions ``t``) is

    Sigma_l = (Q_G (x) Q_A) diag(1 / (c lambda + delta_l)) (Q_G (x) Q_A)^T

(``c = 1 / (T_temp sigma^2)``, ``lambda`` the KFAC or EKFAC eigenvalues ``[d_out, d_in]``). The
Jacobian of output ``k`` w.r.t. ``W`` is ``J_k = sum_t g_{k,t} a_t^T`` with ``g_{k,t}`` the
gradient of ``f_k`` w.r.t. the layer output at position ``t``. In the eigenbasis
``Jhat_k = Q_G^T J_k Q_A = sum_t ghat_{k,t} ahat_t^T`` (``ghat = g Q_G``, ``ahat = a Q_A``), so

    (J Sigma J^T)_{kk'} = sum_l sum_{ij} Jhat_k[i, j] Jhat_k'[i, j] / (c lambda_ij + delta_l).

For ``T = 1`` (fully connected layers) ``Jhat_k = ghat_k ahat^T`` is rank one and

    (J Sigma J^T)_{kk'} = sum_i ghat_{k,i} ghat_{k',i} w_i,   w_i = sum_j ahat_j^2 / (c lambda_ij + delta)

costs ``O(d_in^2 + d_out d_in + C^2 d_out)`` per input and never forms a Jacobian. For ``T > 1``
(convolutions, sequences) the projected per-example Jacobian ``[b, k, d_out, d_in]`` is built in
tiles of inputs ``b`` and outputs ``k`` bounded by ``chunk_size`` elements. The output-gradients
``g`` come from one backward pass per output through the captured graph. A jointly treated bias is
the last input column (input 1); a separate bias block has ``A = [[1]]`` and input ``ahat = 1``.

Diagonal blocks (:class:`~laplace_kron.kron.DiagBlock`) contribute ``sum_i J_{k,i} J_{k',i} /
(c h_i + delta)`` from per-example Jacobians of their parameters
(:class:`~laplace_kron.curvature.diagonal.DiagonalGradients`), in chunks of examples.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .constants import DEFAULT_CHUNK
from .curvature.batches import (
    BatchSizeFn,
    Inputs,
    checked_forward,
    group_by_datum,
    input_batch_size,
    prediction_inputs,
    slice_inputs,
)
from .curvature.capture import Capture, LayerSpec, flatten_output, join_use_gradients
from .curvature.diagonal import DiagonalGradients
from .kron import DiagBlock, KronBlock
from .posterior import KronPosterior
from .sampling import check_differentiable, check_predictable
from .validation import positive_int

__all__ = ["functional_covariance", "functional_variance", "glm_moments", "glm_outputs"]


# --------------------------------------------------------------------------------------------------
# GLM moments in the Kronecker eigenbasis
# --------------------------------------------------------------------------------------------------


@dataclass
class _Plan:
    """A block, the index of its layer in the capture, and its damping."""

    block: KronBlock | DiagBlock
    layer: int  # -1 for a diagonal block (no layer: per-example Jacobians, _diag_moments)
    scale: Tensor
    delta: Tensor

    def inv_eigvals(self) -> Tensor:
        """``1 / (c lambda + delta)`` ``[d_out, d_in]`` (one temporary of the block's size)."""
        lam = self.block.eigvals()
        return (lam * self.scale).add_(self.delta).reciprocal_()


def _plans(la: KronPosterior) -> tuple[list[LayerSpec], list[_Plan]]:
    curv = la.require_fit()
    specs = la.specs
    owner = {}
    for i, s in enumerate(specs):
        for n in (s.weight_name, s.bias_name):
            if n is not None:
                owner[n] = i
    dtype = curv.blocks[0].dtype
    scale = la.precision_scale().to(dtype)
    plans = []
    for b, d in zip(curv.blocks, la.block_deltas(), strict=True):
        if isinstance(b, DiagBlock):
            plans.append(_Plan(b, -1, scale, d.to(dtype)))
            continue
        layers = {owner.get(n) for n in b.param_names}
        if len(layers) != 1 or None in layers:
            raise RuntimeError(
                f"block {b.param_names} does not match the layers this posterior covers; was the "
                "model changed after fitting?"
            )
        # The block with its output factor in G (a [d_in, d_out] weight's block is swapped).
        li = layers.pop()
        plans.append(_Plan(specs[li].standard_block(b), li, scale, d.to(dtype)))
    return specs, plans


def _check_at_mean(la: KronPosterior) -> None:
    params = dict(la.model.named_parameters())
    start = 0
    for n in la.param_names:
        p = params[n]
        k = p.numel()
        if not torch.equal(p.detach().reshape(-1), la.mean[start : start + k].to(p.device)):
            warnings.warn(
                f"the model's parameter {n!r} differs from the posterior mean it was fitted at; the "
                "predictive linearizes at the model's current parameters",
                stacklevel=4,
            )
            return
        start += k


def _per_example_elements(la: KronPosterior, specs: list[LayerSpec], x: Inputs, B: int) -> int:
    """Elements held per input: output-gradients of all outputs plus layer inputs (one probe)."""
    one = slice_inputs(x, 0, 1, B)
    with torch.no_grad(), Capture(specs) as cap:
        f = checked_forward(la.model, one, 1)
        C = f[0].numel()
        total = 0
        for s in specs:
            T = sum(flatten_output(s, o).shape[:2].numel() for o in s.outputs)
            total += T * (C * s.d_out + 2 * (s.d_in + 1)) + C * C
        cap.clear()
    return max(total, 1)


def _block_moments(
    plan: _Plan, a: Tensor, g: Tensor, diag: bool, chunk_size: int, linv: Tensor
) -> Tensor:
    """One block's contribution to ``J Sigma J^T``: ``[b, C]`` (``diag``) or ``[b, C, C]``.

    ``a [b, T, d_in]`` layer inputs (without a ones column unless the bias is joint),
    ``g [C, b, T, d_out]`` output-gradients, ``linv [d_out, d_in]`` inverse damped eigenvalues.
    """
    blk = plan.block
    QG = blk.eig_G.vectors.to(g.dtype)
    if g.shape[2] > 1 and g.mT.is_contiguous():
        # Channel-first convolution gradients: rotate them as [d_out, T] matrices (no copy).
        ghat = (QG.T @ g.mT).mT  # [C, b, T, d_out]
    else:
        ghat = g @ QG  # [C, b, T, d_out]
    C, b, T, d_out = ghat.shape
    if blk.A is None:
        ahat = a.new_ones(b, T, 1)
    else:
        ahat = a @ blk.eig_A.vectors.to(a.dtype)  # [b, T, d_in]
    d_in = ahat.shape[-1]
    if T == 1:
        gh = ghat[:, :, 0].transpose(0, 1)  # [b, C, d_out]
        w = ahat[:, 0].square() @ linv.T  # [b, d_out]
        if diag:
            return (gh.square() * w.unsqueeze(1)).sum(-1)
        return (gh * w.unsqueeze(1)) @ gh.transpose(1, 2)
    if d_in == 1:  # bias block (input 1): Jhat_k = sum_t ghat_{k,t}
        J = torch.einsum("cbti,bt->bci", ghat, ahat[..., 0])
        lv = linv[:, 0]
        if diag:
            return (J.square() * lv).sum(-1)
        return (J * lv) @ J.transpose(1, 2)
    k = max(1, min(C, chunk_size // max(1, b * d_out * d_in)))

    def tile(c0: int) -> Tensor:  # projected Jacobian [b, k, d_out, d_in]
        return torch.einsum("cbti,btj->bcij", ghat[c0 : c0 + k], ahat)

    if diag:
        out = ghat.new_empty(b, C)
        for c0 in range(0, C, k):
            J = tile(c0)
            out[:, c0 : c0 + k] = (J.square_() * linv).sum((-2, -1))
        return out
    out = ghat.new_empty(b, C, C)
    for c0 in range(0, C, k):
        J1 = tile(c0)
        Jw = (J1 * linv).flatten(2)
        for c1 in range(c0, C, k):
            J2 = J1 if c1 == c0 else tile(c1)
            blk_cov = Jw @ J2.flatten(2).transpose(1, 2)  # [b, k, k']
            out[:, c0 : c0 + k, c1 : c1 + k] = blk_cov
            if c1 != c0:
                out[:, c1 : c1 + k, c0 : c0 + k] = blk_cov.transpose(1, 2)
    return out


def _diag_moments(
    grads: DiagonalGradients, plans: list[_Plan], x: Inputs, C: int, diag: bool, linvs: dict
) -> Tensor:
    """The diagonal blocks' contribution to ``J Sigma J^T`` for inputs ``x``: ``[b, C]`` or
    ``[b, C, C]``, ``sum_i J_{k,i} J_{k',i} / (c h_i + delta)`` with the per-example Jacobians
    ``J [b', C, P_block]`` of the diagonal parameters, built for chunks of ``b'`` examples."""
    b = input_batch_size(x)
    eye = torch.eye(C, dtype=plans[0].block.dtype, device=plans[0].block.device)
    out = eye.new_zeros((b, C) if diag else (b, C, C))
    for start, jac in grads.per_example(x, eye.unsqueeze(1).expand(C, b, C)):
        with torch.no_grad():
            for plan in plans:
                J = jac[plan.block.param_names[0]].flatten(2)  # [b', C, P_block]
                w = linvs[id(plan)].reshape(-1)
                part = (J.square() * w).sum(-1) if diag else (J * w) @ J.mT
                out[start : start + J.shape[0]] += part
    return out


def _output_gradients(
    cap: Capture, specs: list[LayerSpec], f: Tensor, vectorize: bool
) -> tuple[list[Tensor], bool]:
    """Gradients of every output ``f[:, k]`` w.r.t. each layer's outputs: per layer
    ``[C, b, T, d_out]``. One vmapped backward pass (``is_grads_batched``) when ``vectorize``,
    else (or if vmap fails) one backward pass per output. Returns whether vmap worked."""
    b, C = f.shape
    if not specs:  # only diagonal blocks
        return [], vectorize
    vectors = torch.eye(C, dtype=f.dtype, device=f.device).unsqueeze(1).expand(C, b, C)
    if vectorize:
        outs = [o for s in specs for o in s.outputs]
        try:
            grads = torch.autograd.grad(
                f, outs, vectors, retain_graph=True, allow_unused=True, is_grads_batched=True
            )
        except (RuntimeError, NotImplementedError) as e:
            warnings.warn(
                f"batched backward (vmap) failed ({e}); using one backward pass per output. Pass "
                "vectorize=False to skip the attempt.",
                stacklevel=4,
            )
        else:
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
                for o in s.outputs:
                    g = grads[i]
                    g = o.new_zeros(C, *o.shape) if g is None else g
                    if isinstance(s.module, nn.Linear):
                        gs.append(flatten_output(s.module, g.flatten(0, 1)).unflatten(0, (C, -1)))
                    else:  # channel-first [C, b, d_out, T], returned as a transposed view
                        gs.append(g.flatten(3).mT if g.ndim == 5 else g.mT)
                    i += 1
                result.append(gs[0] if len(gs) == 1 else torch.cat(gs, dim=2))
            return result, True
    return cap.output_gradients(f, vectors), False


def glm_moments(
    la: KronPosterior,
    x: Inputs,
    diag: bool = False,
    chunk_size: int = DEFAULT_CHUNK,
    batch_size: int | None = None,
    batch_size_fn: BatchSizeFn | None = None,
    vectorize: bool = True,
) -> tuple[Tensor, Tensor]:
    """MAP outputs and their GLM covariance in one pass.

    Returns ``f [B, C]`` (the model output flattened per datum, ``C = 1`` for ``[B]`` outputs) and
    ``J Sigma J^T`` as ``[B, C, C]`` (or its diagonal ``[B, C]`` if ``diag``), detached.
    Inputs are processed in chunks of ``batch_size`` (default: as many as fit the budget
    ``chunk_size`` elements for the output-gradients of all ``C`` outputs); projected Jacobian
    tiles of convolutions / sequences are kept below ``chunk_size`` elements. ``vectorize``: one
    batched (vmapped) backward pass for all outputs instead of one per output.
    """
    f, S, _ = glm_outputs(la, x, diag, chunk_size, batch_size, batch_size_fn, vectorize)
    return f, S


def glm_outputs(
    la: KronPosterior,
    x: Inputs,
    diag: bool,
    chunk_size: int,
    batch_size: int | None,
    batch_size_fn: BatchSizeFn | None,
    vectorize: bool = True,
) -> tuple[Tensor, Tensor, torch.Size]:
    """:func:`glm_moments` plus the model output shape ``[B, ...]``."""
    check_predictable(la)
    check_differentiable("the GLM predictive")
    x = prediction_inputs(x, la.options.target_key)
    positive_int("chunk_size", chunk_size)
    B = input_batch_size(x, batch_size_fn)
    specs, plans = _plans(la)
    diag_plans = [p for p in plans if p.layer < 0]
    plans = [p for p in plans if p.layer >= 0]
    diag_grads = DiagonalGradients(
        la.model, [p.block.param_names[0] for p in diag_plans], chunk_size, vectorize
    )
    _check_at_mean(la)
    if batch_size is None:
        batch_size = max(1, chunk_size // _per_example_elements(la, specs, x, B))
    else:
        positive_int("batch_size", batch_size)
    fs, covs, tail = [], [], None
    linvs: dict[int, Tensor] = {}
    for start in range(0, B, batch_size):
        stop = min(B, start + batch_size)
        xb = slice_inputs(x, start, stop, B)
        with torch.enable_grad(), Capture(specs) as cap:
            f = checked_forward(la.model, xb, stop - start)
            tail = f.shape[1:]
            f2 = f.reshape(stop - start, -1)
            if not torch.isfinite(f2).all():
                raise ValueError("the network output contains NaN or Inf for finite inputs")
            grads, vectorize = _output_gradients(cap, specs, f2, vectorize)
            # Layers that see the positions flattened into the batch axis: per datum.
            b = stop - start
            grads = [group_by_datum(g, b, s.name, lead=1) for g, s in zip(grads, specs)]
            inputs = [group_by_datum(cap.layer_inputs(s), b, s.name) for s in specs]
            cap.clear()
        with torch.no_grad():
            acc = None
            for j, plan in enumerate(plans):
                # Layer inputs carry a ones column exactly when the block holds a joint bias.
                a, g = inputs[plan.layer], grads[plan.layer]
                if j not in linvs:  # once per call (P numbers in all), not once per chunk
                    linvs[j] = plan.inv_eigvals()
                part = _block_moments(plan, a, g, diag, chunk_size, linvs[j])
                acc = part if acc is None else acc.add_(part)
        if diag_plans:
            for plan in diag_plans:
                linvs.setdefault(id(plan), plan.inv_eigvals())
            part = _diag_moments(diag_grads, diag_plans, xb, f2.shape[1], diag, linvs)
            acc = part if acc is None else acc.add_(part)
        with torch.no_grad():
            fs.append(f2.detach())
            covs.append(acc)
            del grads, inputs
    return torch.cat(fs), torch.cat(covs), torch.Size((B, *tail))


def functional_covariance(la: KronPosterior, x: Inputs, **kw) -> Tensor:
    """GLM output covariance ``J(x) Sigma J(x)^T`` ``[B, C, C]``, layer by layer in the Kronecker
    eigenbasis without forming ``J`` (see the module docstring). Keywords: ``chunk_size``,
    ``batch_size``, ``batch_size_fn``, ``vectorize`` of :func:`glm_moments`."""
    return glm_moments(la, x, False, **kw)[1]


def functional_variance(la: KronPosterior, x: Inputs, **kw) -> Tensor:
    """Diagonal of :func:`functional_covariance`, ``[B, C]``: ``sum_ij Jhat_k[i,j]^2 / L_ij``."""
    return glm_moments(la, x, True, **kw)[1]
