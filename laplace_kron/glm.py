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

costs ``O(d_in^2 + d_out d_in + C^2 d_out)`` per input and never forms a Jacobian; for
``T > 1`` (convolutions, sequences) the projected Jacobian is built in tiles bounded by
``chunk_size`` (:mod:`laplace_kron.glm_blocks`, also the ``O(C)`` moments the links need). The
output-gradients ``g`` come from one batched backward pass over the outputs; a layer whose outputs
are the network's needs none (``g_k = e_k``). Diagonal blocks contribute ``sum_i J_{k,i} J_{k',i}
/ (c h_i + delta)`` from per-example Jacobians (:class:`DiagonalGradients`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
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
from .curvature.capture import (
    Capture,
    LayerSpec,
    flatten_output,
)
from .glm_blocks import (
    KINDS,
    BlockFeatures,
    block_moments,
    block_root,
    diag_block_moments,
    embedding_features,
    kind_pairs,
    layer_output_gradients,
    rotate_block,
)
from .glm_diag import DiagJacobians, FastState
from .kron import DiagBlock, KronBlock, per_block
from .posterior import KronPosterior
from .sampling import check_at_mean, check_differentiable, check_predictable
from .validation import positive_int

__all__ = [
    "KINDS",
    "GLMPass",
    "functional_covariance",
    "functional_variance",
    "glm_moments",
    "glm_outputs",
    "glm_reduce",
]


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
    scale, deltas = la.damping()
    plans = []
    for b, d in zip(curv.blocks, per_block(deltas, len(curv.blocks)), strict=True):
        if isinstance(b, DiagBlock):
            plans.append(_Plan(b, -1, scale, d))
            continue
        layers = {owner.get(n) for n in b.param_names}
        if len(layers) != 1 or None in layers:
            raise RuntimeError(
                f"block {b.param_names} does not match the layers this posterior covers; was the "
                "model changed after fitting?"
            )
        # The block with its output factor in G (a [d_in, d_out] weight's block is swapped).
        li = layers.pop()
        std = specs[li].standard_block(b)  # a per-parameter damping [d_out, d_in] swaps with it
        plans.append(_Plan(std, li, scale, d.mT if std is not b and d.ndim == 2 else d))
    return specs, plans


# --------------------------------------------------------------------------------------------------
# Numbers one input may need before the GLM predictive refuses it (8 GB in float32): beyond that
# the moments of even a single input cannot be formed (e.g. a language model's [T V] outputs).
MAX_INPUT_ELEMENTS = 2**31

# One pass over the test inputs in chunks
# --------------------------------------------------------------------------------------------------

# autograd nodes of a linear map of a [B, d_in] input: the output is the layer's own result,
# not modified in place afterwards (an in-place op would change the node).
_LINEAR_NODES = ("AddmmBackward0", "MmBackward0")


def _identity_layers(specs: list[LayerSpec], f: Tensor) -> set[int]:
    """Layers whose single call returned the network output ``f [B, C]`` itself: their
    output-gradient of output ``k`` is ``e_k`` and needs no backward pass."""
    if f.ndim != 2 or f.grad_fn is None or type(f.grad_fn).__name__ not in _LINEAR_NODES:
        return set()
    return {
        i
        for i, s in enumerate(specs)
        if isinstance(s.module, nn.Linear) and len(s.outputs) == 1 and s.outputs[0] is f
    }


@dataclass
class ChunkFeatures:
    """Inputs ``start:stop`` (``x``), their MAP outputs ``f [b, C]`` and each Kronecker block's
    :class:`BlockFeatures` (in the order of ``GLMPass.plans``)."""

    start: int
    stop: int
    x: Inputs
    f: Tensor
    blocks: list[BlockFeatures]
    diag: FastState | None = None  # the diagonal blocks' closed-form path (glm_diag.py)


class GLMPass:
    """The GLM predictive's pass over inputs ``x`` in chunks of ``batch_size`` inputs.

    ``kind`` (one of ``KINDS``) and ``extra`` (elements the caller holds per input) only size
    the default chunk, ``batch_size = chunk_size // e`` with ``e`` the elements held per input:

        e = extra + sum_l 2 T_l (d_in + 1)                      rotated and raw layer inputs
            + (C^2 if cov else 3 C)                              the moments
            + sum_{l not shared} m T_l C d_out                   rotated output-gradients
            + sum_{l shared} d_out (+ C d_out if cov)            w (and the [C, d_out] product)
            + [C^2 + 2 C sum_l T_l d_out if a backward is needed] cotangents, autograd's grads
            + 2 C sum_u n_u                                       the diagonal blocks' uses

    (``m`` = 1 + the number of output maps of ``kind`` other than the identity; a layer is
    *shared* when its outputs are the network's; ``n_u`` the output size per input of a use of a
    diagonal-block parameter whose Jacobians come from the backward pass, glm_diag.py). So a
    chunk holds about ``chunk_size`` elements; one input is the floor (``e`` itself when
    ``e > chunk_size``).
    """

    def __init__(
        self,
        la: KronPosterior,
        x: Inputs,
        kind: str,
        chunk_size: int,
        batch_size: int | None,
        batch_size_fn: BatchSizeFn | None,
        vectorize: bool,
        extra: int = 0,
    ) -> None:
        check_predictable(la)
        check_differentiable("the GLM predictive")
        self.x = prediction_inputs(x, la.options.target_key)
        positive_int("chunk_size", chunk_size)
        self.la, self.chunk_size, self.vectorize = la, chunk_size, vectorize
        self.B = input_batch_size(self.x, batch_size_fn)
        self.specs, plans = _plans(la)
        self.diag_plans = [p for p in plans if p.layer < 0]
        self.plans = [p for p in plans if p.layer >= 0]
        names = [p.block.param_names[0] for p in self.diag_plans]
        first = self.diag_plans[0].block if self.diag_plans else None
        self.diag = DiagJacobians(
            la.model,
            names,
            chunk_size,
            vectorize,
            first.dtype if first is not None else torch.float32,
            first.device if first is not None else torch.device("cpu"),
        )
        check_at_mean(la)
        self.tail: torch.Size | None = None
        self.C, shared, sizes = self._probe()
        self._check_feasible(self._per_input(kind, shared, sizes, extra))
        if batch_size is None:
            batch_size = max(1, chunk_size // self._per_input(kind, shared, sizes, extra))
        else:
            positive_int("batch_size", batch_size)
        self.batch_size = batch_size
        self._linvs: dict[int, Tensor] = {}

    def _check_feasible(self, per_input: int) -> None:
        """Refuse an input whose moments cannot be formed at all: one input is the floor of the
        chunking, and the diagonal blocks need its Jacobian ``[C, P_diag]``."""
        need = per_input + self.C * self.diag.n_params
        if need > MAX_INPUT_ELEMENTS:
            raise ValueError(
                f"the GLM predictive needs about {need:,} numbers for a single input "
                f"({self.C:,} outputs per input, {self.diag.n_params:,} diagonal-block "
                f"parameters), more than {MAX_INPUT_ELEMENTS:,}: use method='glm_mc' "
                "(linearised samples by forward-mode JVPs, memory independent of the number of "
                "outputs) or method='nn', or cover fewer parameters or outputs (e.g. "
                "modules='last_layer', shorter sequences)"
            )

    def _per_input(self, kind: str, shared: set[int], sizes: list, extra: int) -> int:
        """Elements held per input (see the class docstring)."""
        C = self.C
        per = sum(T * 2 * (d_in + 1) for T, _, d_in in sizes) + extra
        per += C * C if kind == "cov" else 3 * C
        if kind == "root":  # the factor [C, r]: r = d_out (T = 1) or d_out d_in per layer
            per += C * sum(d_out * (1 if T == 1 else d_in + 1) for T, d_out, d_in in sizes)
        if len(shared) < len(sizes) or self._diag_out:
            # The batched backward of all C outputs: the cotangents [C, b, C] and the
            # output-gradients of every layer on the way (x 2: a nonlinearity's in and out).
            per += C * C + 2 * C * sum(T * d_out for T, d_out, _ in sizes)
        per += 2 * C * self._diag_out  # the diagonal blocks' uses likewise (glm_diag.py)
        mult = 1 if kind == "cov" else 1 + len({h for p in kind_pairs(kind) for h in p} - {"id"})
        for i, (T, d_out, _) in enumerate(sizes):
            if i in shared:
                per += d_out + (C * d_out if kind in ("cov", "root") else 0)
            else:
                per += T * C * d_out * mult
        return max(per, 1)

    def _probe(self) -> tuple[int, set[int], list[tuple[int, int, int]]]:
        """One single-datum forward: ``C``, the shared layers, ``(T, d_out, d_in)`` per layer."""
        one = slice_inputs(self.x, 0, 1, self.B)
        with torch.enable_grad(), Capture(self.specs) as cap:
            with self.diag.recording():
                f = checked_forward(self.la.model, one, 1)
            # The diagonal blocks' recorded uses: their output-gradients are held per input.
            self._diag_out = sum(u.output.numel() for u in self.diag.uses(1))
            shared = _identity_layers(self.specs, f)
            sizes = [
                (
                    sum(flatten_output(s, o).shape[:2].numel() for o in s.outputs),
                    s.d_out * s.groups,  # a grouped block: all its groups
                    s.d_in * s.groups,
                )
                for s in self.specs
            ]
            C = f[0].numel()
            # Class axis of a classifier's output (the groups of the centering / bridge maps).
            self.classes = f.shape[-1] if f.ndim > 1 else 1
            cap.clear()
        return C, shared, sizes

    def linv(self, plan: _Plan) -> Tensor:
        """``1 / (c lambda + delta)`` of a block, once per pass (``P`` numbers in all)."""
        if id(plan) not in self._linvs:
            self._linvs[id(plan)] = plan.inv_eigvals()
        return self._linvs[id(plan)]

    def chunks(self) -> Iterator[ChunkFeatures]:
        """The chunks' features, one chunk alive at a time."""
        specs, B = self.specs, self.B
        for start in range(0, B, self.batch_size):
            stop = min(B, start + self.batch_size)
            b = stop - start
            xb = slice_inputs(self.x, start, stop, B)
            with torch.enable_grad(), Capture(specs, b) as cap:
                with self.diag.recording():
                    f = checked_forward(self.la.model, xb, b)
                self.tail = f.shape[1:]
                f2 = f.reshape(b, -1)
                if not torch.isfinite(f2).all():
                    raise ValueError("the network output contains NaN or Inf for finite inputs")
                shared = _identity_layers(specs, f)
                rest = [s for i, s in enumerate(specs) if i not in shared]
                uses = self.diag.uses(b)
                g_rest, dys, self.vectorize = layer_output_gradients(
                    Capture(rest), rest, f2, self.vectorize, [u.output for u in uses]
                )
                grads: list[Tensor | None] = [None] * len(specs)
                for s, g in zip([i for i in range(len(specs)) if i not in shared], g_rest):
                    grads[s] = group_by_datum(g, b, specs[s].name, lead=1)
                inputs = [group_by_datum(cap.layer_inputs(s), b, s.name) for s in specs]
                cap.clear()
            with torch.no_grad():
                blocks = [
                    f for p in self.plans for f in self._rotate(p, inputs[p.layer], grads[p.layer])
                ]
            del grads, inputs, g_rest
            diag = self.diag.state(xb, b, uses, dys)
            yield ChunkFeatures(start, stop, xb, f2.detach(), blocks, diag)

    def _rotate(self, plan: _Plan, a: Tensor, g: Tensor | None) -> list[BlockFeatures]:
        """The block's features: one, or one per group of a grouped convolution."""
        spec = self.specs[plan.layer]
        if spec.embedding:  # a: token indices
            return [embedding_features(spec, a, g, plan.block, self.linv(plan))]
        return rotate_block(plan.block, spec.groups, a, g, self.linv(plan))

    def diag_jacobians(
        self, chunk: ChunkFeatures
    ) -> Iterator[tuple[int, list[tuple[Tensor, Tensor]]]]:
        """Per-example Jacobians of the diagonal blocks for a chunk: ``(start, [(J [b', C, P],
        w [P])])`` per sub-chunk of its inputs (sized by ``chunk_size``; glm_diag.py)."""
        if not self.diag_plans:
            return
        b = chunk.stop - chunk.start
        for start, jac in self.diag.jacobians(chunk.x, b, self.C, chunk.diag):
            yield (
                start,
                [(jac[p.block.param_names[0]], self.linv(p).reshape(-1)) for p in self.diag_plans],
            )

    def _root(self, chunk: ChunkFeatures, b: int) -> Tensor:
        """``[b, C, r]``: the blocks' factors side by side (``R R^T = J Sigma J^T``)."""
        with torch.no_grad():
            parts = [block_root(feat) for feat in chunk.blocks]
            if parts:
                parts = [p.expand(b, -1, -1) for p in parts]
        diag = [[] for _ in self.diag_plans]
        for _, ps in self.diag_jacobians(chunk):
            with torch.no_grad():
                for i, (J, w) in enumerate(ps):
                    diag[i].append(diag_block_moments(J, w, "root", self.classes))
        parts += [torch.cat(d) for d in diag]
        if not parts:
            raise RuntimeError("the posterior covers no parameters")
        return torch.cat(parts, dim=-1)

    def moments(self, chunk: ChunkFeatures, kind: str) -> Tensor:
        """``J Sigma J^T`` of a chunk: ``[b, C, C]`` (``cov``) or ``[b, C, p]`` (pairs of
        ``kind``; the output maps act on each group of ``classes`` outputs: the last axis)."""
        group = self.classes
        b = chunk.stop - chunk.start
        if kind == "root":
            return self._root(chunk, b)
        with torch.no_grad():
            acc = None
            for feat in chunk.blocks:
                part = block_moments(feat, kind, group, self.chunk_size)
                acc = part if acc is None else acc.add_(part)
        for start, parts in self.diag_jacobians(chunk):
            with torch.no_grad():
                if acc is None:
                    shape = (b, self.C, self.C if kind == "cov" else len(kind_pairs(kind)))
                    acc = chunk.f.new_zeros(shape)
                for J, w in parts:
                    acc[start : start + J.shape[0]] += diag_block_moments(J, w, kind, group)
        if acc is None:
            raise RuntimeError("the posterior covers no parameters")
        return acc


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
    ``chunk_size``, see :class:`GLMPass`); projected Jacobian tiles of convolutions / sequences
    are kept below ``chunk_size`` elements. ``vectorize``: one batched (vmapped) backward pass
    for all outputs instead of one per output.
    """
    f, S, _ = glm_outputs(la, x, diag, chunk_size, batch_size, batch_size_fn, vectorize)
    return f, S


def glm_reduce(
    la: KronPosterior,
    x: Inputs,
    kind: str,
    reduce: Callable[[Tensor, Tensor, int], Tensor],
    chunk_size: int = DEFAULT_CHUNK,
    batch_size: int | None = None,
    batch_size_fn: BatchSizeFn | None = None,
    vectorize: bool = True,
    extra: int = 0,
) -> tuple[Tensor, Tensor, torch.Size]:
    """``reduce(f_chunk [b, C], moments_chunk, classes)`` per input chunk, concatenated: only one chunk's
    moments (``kind``, see :data:`KINDS`) are alive at a time. Returns ``(f [B, C], reduced,
    output shape [B, ...])``."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    run = GLMPass(la, x, kind, chunk_size, batch_size, batch_size_fn, vectorize, extra)
    fs, outs = [], []
    for chunk in run.chunks():
        m = run.moments(chunk, kind)
        with torch.no_grad():
            outs.append(reduce(chunk.f, m, run.classes))
        fs.append(chunk.f)
        del chunk, m
    return torch.cat(fs), torch.cat(outs), torch.Size((run.B, *run.tail))


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
    kind = "var" if diag else "cov"
    keep = (lambda f, m, c: m[..., 0]) if diag else (lambda f, m, c: m)
    return glm_reduce(la, x, kind, keep, chunk_size, batch_size, batch_size_fn, vectorize)


def functional_covariance(la: KronPosterior, x: Inputs, **kw) -> Tensor:
    """GLM output covariance ``J(x) Sigma J(x)^T`` ``[B, C, C]``, layer by layer in the Kronecker
    eigenbasis without forming ``J`` (see the module docstring). Keywords: ``chunk_size``,
    ``batch_size``, ``batch_size_fn``, ``vectorize`` of :func:`glm_moments`."""
    return glm_moments(la, x, False, **kw)[1]


def functional_variance(la: KronPosterior, x: Inputs, **kw) -> Tensor:
    """Diagonal of :func:`functional_covariance`, ``[B, C]``: ``sum_ij Jhat_k[i,j]^2 / L_ij``."""
    return glm_moments(la, x, True, **kw)[1]
