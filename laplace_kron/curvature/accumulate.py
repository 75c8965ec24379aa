"""KFAC and EKFAC curvature of a model's summed negative log-likelihood.

For a layer with inputs ``a [B, T, d_in]`` and output-gradients ``g [K, B, T, d_out]``
(``K`` output-gradient vectors, ``T`` shared positions), summed over the ``N`` data:

* KFAC-expand (positions as extra data):
  ``A = 1/(N T) sum_{n,t} a a^T``,  ``G = sum_{k,n,t} g g^T``;
* KFAC-reduce (positions pooled):
  ``A = 1/N sum_n abar abar^T`` with ``abar = mean_t a``,  ``G = sum_{k,n} gsum gsum^T`` with
  ``gsum = sum_t g``.

``N`` is the number of input examples (the inputs' leading dimension), whatever the output's
shape: a layer that sees ``N R`` rows (positions flattened into the batch axis) is read as ``N``
data of ``R T`` positions (:func:`~laplace_kron.curvature.batches.group_by_datum`), so a model
that flattens ``[N, T, C]`` logits to ``[N*T, C]`` gets the same curvature as the unflattened one.

**Padding.** With an ``attention_mask [N, T]`` in the inputs, a layer whose position count is
``T`` (the sequence axis) sees only the ``T_n`` valid positions of datum ``n``: KFAC-expand uses
``A = 1/N sum_n 1/T_n sum_{t valid} a a^T``, KFAC-reduce ``abar = 1/T_n sum_{t valid} a``, and the
output-gradients of padded positions are zeroed (for ``G`` and EKFAC). A padded batch therefore
gives the curvature of its sequences fitted unpadded. Layers with another position count (e.g. a
classifier head on a pooled ``[N, d]`` vector, or a strided layer) are left as they are.
Targets that are ``ignore_index`` or padding get zero output-gradient vectors (no ``G``, no
log-likelihood, no count); their positions' inputs still enter ``A`` (they feed later positions).

Without weight sharing (``T = 1``) both agree and, for a single datum with the exact Fisher, equal
the exact GGN block. EKFAC keeps the KFAC eigenbasis ``Q_G (x) Q_A`` and replaces its eigenvalues
by ``E[i, j] = sum_{k,n} (Q_G^T grad_{k,n} Q_A)[i, j]^2`` where ``grad_{k,n} = sum_t g a^T`` is the
per-example, per-vector weight gradient (summed over positions before squaring); this is the
Frobenius-closest matrix to ``sum grad grad^T`` that is diagonal in the KFAC eigenbasis.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor, nn

from ..kron import KronBlock
from .batches import (
    FitBatch,
    forward_batch,
    group_by_datum,
    is_empty,
    mask_padding,
)
from .capture import Capture, LayerSpec, Workspace, native_to_weight_order
from .convs import grouped_sq, rotate_groups
from .diag_sums import DiagonalSums
from .embedding import add_counts, token_mask, token_sq_sums
from .first_checks import batch_size, first_checks, recording
from .gram import gram_lower_, mirror_, per_example_sq
from .likelihoods import (
    iter_output_gradient_vectors,
    loss_hessian_diag_in_basis,
    loss_hessian_sum,
    nll_sum,
)
from .options import CurvatureOptions
from .state import FitState

__all__ = ["FactorAccumulator", "input_order", "shared_inputs"]


class FactorAccumulator:
    """Adds batches to a :class:`~laplace_kron.curvature.state.FitState`: the KFAC factor sums
    (first pass) and the EKFAC eigenvalue sums in given bases (second pass).

    MC labels are drawn from ``state.generator``. Scratch buffers are reused across batches
    (:class:`~laplace_kron.curvature.capture.Workspace`); :meth:`clear` frees them after a pass.
    """

    def __init__(
        self,
        model: nn.Module,
        specs: list[LayerSpec],
        likelihood: str,
        options: CurvatureOptions,
        state: FitState,
    ):
        self.model, self.specs, self.likelihood = model, specs, likelihood
        self.options, self.state = options, state
        self._orders = [input_order(s, state.device) for s in specs]
        self._work = Workspace()
        self._uses_checked = False
        # Diagonal blocks: per-example gradients from the same output-gradient vectors.
        self._diag = DiagonalSums(model, list(state.diag), options) if state.diag else None

    def clear(self) -> None:
        """Free the scratch buffers."""
        self._work.clear()

    # ------------------------------------------------------------------------- first pass
    def _forward(self, x, y, i: int) -> FitBatch:
        o = self.options
        return forward_batch(
            self.model,
            x,
            y,
            self.likelihood,
            self.state.device,
            i,
            ignore_index=o.ignore_index,
            shift_labels=o.shift_labels,
        )

    def _inputs(self, cap: Capture, spec: LayerSpec, N: int) -> Tensor:
        a = cap.layer_inputs(spec, native=True, workspace=self._work)
        return group_by_datum(a, N, spec.name)

    def add_kfac(self, x, y, i: int = 0) -> None:
        """Add one batch to the KFAC factors (first pass); an empty batch adds nothing."""
        if is_empty(y):
            return
        if not self._uses_checked:
            self._uses_checked = True
            first_checks(self.specs, lambda xs, ys: self._forward(xs, ys, i), self._diag, x, y)
        with Capture(self.specs, batch_size(x, y)) as cap:
            with recording(self._diag):
                b = self._forward(x, y, i)
            if self.state.outputs is not None:
                self.state.outputs.check_outputs(b.f)
            fast = [] if self._diag is None else self._diag.fast_names(b)
            shared = shared_inputs(self.specs, self._orders)
            with torch.no_grad():
                for li, spec in enumerate(self.specs):
                    if li in shared and shared[li][0] != li:
                        continue  # added with the first layer of its group
                    a = self._inputs(cap, spec, b.num_data) if spec.has_weight else None
                    if spec.embedding:  # token indices: a diagonal factor of counts
                        mask = token_mask(spec, a, b.positions)
                        st = self.state
                        st.A_sum[li] = add_counts(st.A_sum[li], a, mask, spec.d_in, st.dtype)
                    elif li in shared:
                        S = a.new_zeros(a.shape[-1], a.shape[-1])
                        self._add_A(li, a, b.positions, out=S)
                        A_sum = self.state.A_sum
                        for lj in shared[li]:
                            A_sum[lj] = S.clone() if A_sum[lj] is None else A_sum[lj].add_(S)
                    elif spec.has_weight:
                        self._add_A(li, a, b.positions)
            closed = self._closed_form_G(b)
            # One output-gradient vector at a time: G needs only sums over vectors.
            for k, grads in enumerate(self._output_gradients(cap, b, x, fast)):
                with torch.no_grad():
                    for li, g in enumerate(grads):
                        if li not in closed:
                            self._add_G(li, g, k)
        self._add_loss(b)

    def add_loss(self, x, y, i: int = 0) -> None:
        """Add one batch's log-likelihood terms and counts only (a forward pass, no gradients)."""
        if is_empty(y):
            return
        with torch.no_grad():
            self._add_loss(self._forward(x, y, i))

    def _add_loss(self, b: FitBatch) -> None:
        st = self.state
        with torch.no_grad():
            nll, sse = nll_sum(b.f, b.y, self.likelihood, b.keep)
            st.loss += float(nll)
            st.sse += float(sse)
            st.n_outputs = b.f.shape[1]
            st.num_data += b.num_data
            st.n_observed += b.observed()
            if st.outputs is not None:
                st.outputs.add_sse(b.f, b.y, b.keep)

    def _output_gradients(
        self, cap: Capture, b: FitBatch, x=None, fast: list[str] | None = None
    ) -> Iterator[list[Tensor]]:
        """Per output-gradient vector, the layers' output-gradients ``[1, N, T, d_out]`` (grouped
        by datum, padded positions zeroed); the vectors are drawn in chunks
        (:func:`iter_output_gradient_vectors`) and vanish at unobserved targets. With the inputs
        ``x``, each vector is also added to the diagonal blocks' sums: those of ``fast`` from the
        same backward pass, the others by a per-example pass."""
        o = self.options
        chunks = iter_output_gradient_vectors(
            b.f, b.y, self.likelihood, o.fisher, o.mc_samples, self.state.generator
        )

        # Embeddings: positions at padding_idx are no data of the layer (no gradient reaches W).
        tokens = [
            token_mask(s, self._inputs(cap, s, b.num_data)) if s.embedding else None
            for s in self.specs
        ]

        def grouped(vectors: Tensor, retain: bool, k0: int) -> Iterator[list[Tensor]]:
            if b.keep is not None:
                vectors = vectors * b.keep
            N, diag = b.num_data, self._diag if x is not None else None
            if diag is not None:
                # Per-output sums (per-output noise: vector k is e_k) need one call per vector.
                per_output = self.state.outputs is not None
                parts = (
                    [vectors[k : k + 1] for k in range(len(vectors))] if per_output else [vectors]
                )
                for k, v in enumerate(parts):
                    sums = diag.vmapped_sums(cap, x, v, N, exclude=fast or [])
                    self._add_diag_sums(k0 + k, sums)
            uses = diag.fast.uses(N, fast) if diag is not None and fast else []
            extra = [u.output for u in uses] or None
            for k, grads in enumerate(cap.iter_output_gradients(b.f, vectors, retain, extra)):
                if extra:
                    sums = diag.fast.squared_sums(uses, grads.pop(), N, fast)
                    self._add_diag_sums(k0 + k, sums)
                out = [
                    mask_padding(group_by_datum(g, b.num_data, s.name, lead=1), b.positions)
                    for g, s in zip(grads, self.specs, strict=True)
                ]
                yield [
                    g if m is None else g * m.to(g.dtype)[None, :, :, None]
                    for g, m in zip(out, tokens, strict=True)
                ]

        vectors, k0 = next(chunks), 0
        for following in chunks:
            yield from grouped(vectors, True, k0)
            vectors, k0 = following, k0 + len(vectors)
        yield from grouped(vectors, False, k0)

    def _add_diag_sums(self, k: int, sums: dict[str, Tensor]) -> None:
        """Add squared per-example gradient sums of vector ``k`` (per output too, when the
        noise is per output: vector ``k`` is then ``e_k``)."""
        self.state.add_diag(sums)
        if self.state.outputs is not None:
            self.state.outputs.add_D(k, sums)

    def _output_layers(self, f: Tensor) -> set[int]:
        """Layers whose output *is* the network output ``f``, when the exact Fisher makes their
        curvature the summed loss Hessian ``H_n`` (``diag(p_n) - p_n p_n^T`` for softmax
        cross-entropy, ``I`` for the Gaussian): those get closed forms instead of ``C`` vectors."""
        if self.options.fisher != "exact" or self.likelihood == "binary":
            return set()
        return {
            li
            for li, spec in enumerate(self.specs)
            if len(spec.outputs) == 1
            and spec.outputs[0] is f
            and (spec.kind == "linear_t" or not spec.transposed)  # no embedding, no conv_t
            and spec.groups == 1
        }

    def _closed_form_G(self, b: FitBatch) -> set[int]:
        """Add ``G = sum_n H_n`` over the observed rows of the :meth:`_output_layers`
        (:func:`loss_hessian_sum`, ``O(B C^2)`` per batch instead of ``O(B C^3)`` from ``C``
        vectors); returns them."""
        done = self._output_layers(b.f)
        G_sum = self.state.G_sum
        with torch.no_grad():
            f = b.f.detach() if b.keep is None else b.f.detach()[b.keep[:, 0] > 0]
            for li in done:
                H = loss_hessian_sum(f, self.likelihood)
                G_sum[li] = H if G_sum[li] is None else G_sum[li].add_(H)
                if self.state.outputs is not None:  # H = sum_c e_c e_c^T per row
                    self.state.outputs.add_identity(li, f.shape[0])
        return done

    def _add_A(
        self, li: int, a: Tensor, positions: Tensor | None = None, out: Tensor | None = None
    ) -> None:
        """Add ``sum a a^T`` (``1/T`` times for KFAC-expand) of one batch, ``a [N, T, d_in]``,
        to layer ``li``'s sum (or to ``out``); with padding (``positions [N, T]``, for layers
        with the mask's ``T``) ``1/T_n`` times the valid positions' products (expand) or the
        products of their means (reduce).

        ``a`` carries the ones column of a joint bias and its columns are in
        :func:`native_patches` order: the product is formed in that order and permuted to weight
        order afterwards (``d_in^2`` work instead of a copy of the ``B T x d_in`` patches).
        Dense products accumulate their lower block triangle only (:func:`gram_lower_`);
        :meth:`FitState.mirror` completes them.
        """
        A_sum = self.state.A_sum
        T, d = a.shape[1], a.shape[2]
        idx = self._orders[li]
        expand = self.options.weight_sharing == "expand"
        if positions is not None and positions.shape[1] == T:
            # w[n, t] = mask / T_n: expand sums w a a^T, reduce forms abar_n = sum_t w a.
            w = (positions / positions.sum(1, keepdim=True).clamp_min(1)).to(a.dtype)
            if expand:
                rows = (a * w.sqrt().unsqueeze(-1)).reshape(-1, d)
            else:
                rows = (a * w.unsqueeze(-1)).sum(1)
            scale = 1.0
        elif expand:
            rows = a.reshape(-1, d) if T == 1 or a.is_contiguous() else None
            scale = 1.0 / T
        else:
            rows, scale = a.mean(dim=1), 1.0
        groups = self.specs[li].groups
        if groups > 1:  # one factor per group: [g, i, i] (kron_groups.py)
            R = (a.reshape(-1, d) if rows is None else rows).unflatten(-1, (groups, -1))
            S = torch.einsum("mgi,mgj->gij", R, R)
            A_sum[li] = S.mul_(scale) if A_sum[li] is None else A_sum[li].add_(S, alpha=scale)
            return
        if out is None and A_sum[li] is None:
            A_sum[li] = a.new_zeros(d, d)
        target = A_sum[li] if out is None else out
        if rows is None:
            # Channel-first patches ([B, T, d] view of [B, d, T]): one batched product.
            target.add_(torch.bmm(a.mT, a).sum(0), alpha=scale)
        elif idx is None:
            gram_lower_(target, rows, scale)
        else:
            S = self._work.get(("gram", li), (d, d), rows)
            gram_lower_(S, rows, 1.0, beta=0.0)
            mirror_(S)
            target.add_(S[idx][:, idx], alpha=scale)

    def _add_G(self, li: int, g: Tensor, k: int = 0) -> None:
        """Add ``sum g g^T`` of one batch, ``g [K, B, T, d_out]`` (summed over positions first
        for KFAC-reduce), of output-gradient vector ``k`` (also to output ``k``'s per-output
        sum when those are kept)."""
        G_sum, spec = self.state.G_sum, self.specs[li]
        if G_sum[li] is None:
            G_sum[li] = g.new_zeros(spec.factor_shape(g.shape[3] // spec.groups))
        targets = [G_sum[li]]
        if self.state.outputs is not None:
            targets.append(self.state.outputs.G[li][k])
        for target in targets:
            self._gram_G(target, g, spec.groups)

    def _gram_G(self, target: Tensor, g: Tensor, groups: int = 1) -> None:
        T, d = g.shape[2], g.shape[3]
        if groups > 1:  # one factor per group [g, o, o], accumulated whole
            x = g.sum(dim=2) if self.options.weight_sharing == "reduce" else g
            R = x.reshape(-1, groups, d // groups)
            target.add_(torch.einsum("mgi,mgj->gij", R, R))
        elif self.options.weight_sharing == "reduce":
            gram_lower_(target, g.sum(dim=2).reshape(-1, d), 1.0)
        elif T == 1 or g.is_contiguous():
            gram_lower_(target, g.reshape(-1, d), 1.0)
        else:
            # Convolution output-gradients are [B, T, C] views of channel-first tensors: a batched
            # product over examples avoids the transposing copy a single [B T, C] GEMM needs.
            g3 = g.flatten(0, 1)
            target.add_(torch.bmm(g3.mT, g3).sum(0))

    # ------------------------------------------------------------------------- second pass
    def add_ekfac(self, x, y, bases: list[list[KronBlock]], i: int = 0) -> None:
        """Add one batch to the EKFAC eigenvalue corrections (second pass):
        ``E += sum_{k,n} (Q_G^T (sum_t g a^T) Q_A)^2`` per block (transposed for the weight
        block of a weight stored ``[d_in, d_out]``)."""
        if is_empty(y):
            return
        std = [[s.standard_block(b) for b in layer] for s, layer in zip(self.specs, bases)]
        corr = self._ekfac_sums(x, y, std, i)
        for li, (spec, layer) in enumerate(zip(self.specs, bases)):
            for j, b in enumerate(layer):
                if spec.transposed and b.A is not None:
                    corr[li][j] = corr[li][j].mT
        E_sum = self.state.E_sum
        for li in range(len(self.specs)):
            if E_sum[li] is None:
                E_sum[li] = corr[li]
            else:
                E_sum[li] = [e + c for e, c in zip(E_sum[li], corr[li], strict=True)]

    def _ekfac_sums(self, x, y, bases: list[list[KronBlock]], i: int) -> list[list[Tensor]]:
        """One batch's ``sum_{k,n} (Q_G^T (sum_t g a^T) Q_A)^2`` per block, ``bases`` with the
        output factor in ``G`` (:meth:`LayerSpec.standard_block`)."""
        with Capture(self.specs, batch_size(x, y)) as cap:
            fb = self._forward(x, y, i)
            fc = fb.f
            with torch.no_grad():
                rotated = []  # a Q_A per block, computed once for all output-gradient vectors
                for li, spec in enumerate(self.specs):
                    a = self._inputs(cap, spec, fb.num_data)
                    rotated.append(
                        [self._rotate_inputs(li, j, a, b) for j, b in enumerate(bases[li])]
                    )
            corr: list[list[Tensor]] = [[0.0] * len(layer) for layer in bases]
            spec_is_embedding = [s.embedding for s in self.specs]
            closed = self._output_layers(fc)
            outputs = self.state.outputs
            with torch.no_grad():
                for li in closed:  # one position per datum: E = sum_n diag(Q^T H_n Q) (x) r_n^2
                    for j, b in enumerate(bases[li]):
                        u = loss_hessian_diag_in_basis(
                            fc.detach(), self.likelihood, b.eig_G.vectors
                        )
                        if fb.keep is not None:  # unobserved rows add nothing
                            u = u * fb.keep
                        r2 = rotated[li][j][:, 0].square()
                        corr[li][j] = u.T @ r2
                        if outputs is not None:
                            r2 = r2 if fb.keep is None else r2 * fb.keep
                            n = len(bases[li])
                            outputs.add_E_closed(li, j, b.eig_G.vectors, r2.sum(0), n)
            for k, grads in enumerate(self._output_gradients(cap, fb)):
                with torch.no_grad():
                    for li, g in enumerate(grads):
                        if li in closed:
                            continue
                        groups = self.specs[li].groups
                        for j, b in enumerate(bases[li]):
                            r = rotated[li][j]
                            if spec_is_embedding[li]:  # r: the token indices (Q_A = I)
                                sq = token_sq_sums(r, g @ b.eig_G.vectors, b.d_in)
                            elif groups > 1:
                                gh = rotate_groups(g, b.eig_G.vectors)
                                sq = grouped_sq(r, gh, groups)
                            else:
                                sq = per_example_sq(r, g @ b.eig_G.vectors)
                            corr[li][j] = corr[li][j] + sq
                            if outputs is not None:
                                outputs.add_E(li, j, k, sq, len(bases[li]))
        return corr

    def _rotate_inputs(self, li: int, j: int, a: Tensor, block: KronBlock) -> Tensor:
        """``a Q_A`` for native-order inputs ``a [B, T, d]``: the eigenbasis rows are permuted to
        the native column order instead of the inputs to the weight order."""
        B, T, d = a.shape
        groups = self.specs[li].groups
        if block.A is None:  # a bias-only block sees the constant input 1 at every position
            return a.new_ones(B, T, groups)
        if self.specs[li].embedding:  # token indices in the basis Q_A = I: unchanged
            return a
        if groups > 1:  # weight-order rows, one run of columns per group
            return rotate_groups(a, block.eig_A.vectors)
        Q = block.eig_A.vectors
        idx = self._orders[li]
        if idx is not None:
            Qn = torch.empty_like(Q)
            Qn[idx] = Q
            Q = Qn
        if not a.is_contiguous():  # channel-first patches of a narrow convolution
            return a @ Q
        out = self._work.get(("rotated", li, j), (B, T, Q.shape[1]), a)
        torch.mm(a.reshape(B * T, d), Q, out=out.view(B * T, -1))
        return out


def shared_inputs(specs: list[LayerSpec], orders: list) -> dict[int, list[int]]:
    """Layers whose input factor sums of this batch are equal, as ``layer -> its group``
    (groups of two or more, in layer order).

    Linear maps called once on the same input tensor (the same memory, shape and strides; e.g.
    a transformer's query, key and value projections, or a gated MLP's gate and up
    projections), with or without a joint bias alike, have the same ``A``: it is formed once.
    """
    groups: dict[tuple, list[int]] = {}
    for li, s in enumerate(specs):
        if not s.has_weight or s.embedding or not s.linear_like or s.groups > 1:
            continue
        if len(s.inputs) != 1 or orders[li] is not None:
            continue
        x = s.inputs[0]
        key = (x.data_ptr(), tuple(x.shape), x.stride(), x.dtype, s.joint, s.by_use)
        groups.setdefault(key, []).append(li)
    return {li: g for g in groups.values() if len(g) > 1 for li in g}


def input_order(spec: LayerSpec, device: torch.device) -> Tensor | None:
    """Native-to-weight column order of a layer's inputs, with the ones column of a joint bias
    (always last) appended; ``None`` when the orders coincide."""
    idx = None if spec.linear_like else native_to_weight_order(spec.module)
    if idx is None:
        return None
    if spec.joint:
        idx = torch.cat([idx, idx.new_tensor([idx.numel()])])
    return idx.to(device)
