"""KFAC and EKFAC curvature of a model's summed negative log-likelihood.

For a layer with inputs ``a [B, T, d_in]`` and output-gradients ``g [K, B, T, d_out]``
(``K`` output-gradient vectors, ``T`` shared positions), summed over the ``N`` data:

* KFAC-expand (positions as extra data):
  ``A = 1/(N T) sum_{n,t} a a^T``,  ``G = sum_{k,n,t} g g^T``;
* KFAC-reduce (positions pooled):
  ``A = 1/N sum_n abar abar^T`` with ``abar = mean_t a``,  ``G = sum_{k,n} gsum gsum^T`` with
  ``gsum = sum_t g``.

Without weight sharing (``T = 1``) both agree and, for a single datum with the exact Fisher, equal
the exact GGN block. EKFAC keeps the KFAC eigenbasis ``Q_G (x) Q_A`` and replaces its eigenvalues
by ``E[i, j] = sum_{k,n} (Q_G^T grad_{k,n} Q_A)[i, j]^2`` where ``grad_{k,n} = sum_t g a^T`` is the
per-example, per-vector weight gradient (summed over positions before squaring); this is the
Frobenius-closest matrix to ``sum grad grad^T`` that is diagonal in the KFAC eigenbasis.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable, Iterator, Sequence

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .. import distributed as dist_utils
from ..kron import KronBlock, KronCurvature
from .capture import (
    Capture,
    LayerSpec,
    Workspace,
    native_to_weight_order,
    select_layers,
)
from .checkpoint import (
    _batch_size,
    _check_resumed_data,
    _Checkpoint,
    checkpoint_state,
    fit_settings,
    restore,
)
from .gram import _gram_lower_, _mirror_, per_example_sq
from .likelihoods import (
    check_fisher,
    check_likelihood,
    iter_output_gradient_vectors,
    loss_hessian_diag_in_basis,
    loss_hessian_sum,
    nll_sum,
    prepare_targets,
)
from .parallel import check_same_pass, reduce_ekfac, reduce_kfac, share_bases

__all__ = ["kfac", "ekfac", "CurvatureFitter"]

WEIGHT_SHARING = ("expand", "reduce")


def _check_model_mode(model: nn.Module) -> None:
    stochastic = [
        n
        for n, m in model.named_modules()
        if m.training and isinstance(m, (nn.Dropout, nn.modules.batchnorm._BatchNorm))
    ]
    if stochastic:
        warnings.warn(
            f"model is in train mode with dropout/batch-norm layers ({', '.join(stochastic[:5])}); "
            "the curvature will be noisy and batch-dependent. Call model.eval() before fitting.",
            stacklevel=3,
        )


def _iter_batches(data: Iterable, progress: bool, desc: str):
    try:
        total = len(data)  # type: ignore[arg-type]
    except TypeError:
        total = None
    it = tqdm(data, total=total, desc=desc, disable=not progress, leave=False)
    for i, batch in enumerate(it):
        if not isinstance(batch, (tuple, list)) or len(batch) != 2:
            raise ValueError(
                f"batch {i}: data must yield (inputs, targets) pairs, got {type(batch).__name__}"
                + (f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else "")
            )
        yield i, batch


def _check_finite_inputs(x, i: int) -> None:
    tensors = x.values() if isinstance(x, dict) else [x]
    for t in tensors:
        if isinstance(t, Tensor) and t.is_floating_point() and not torch.isfinite(t).all():
            raise ValueError(f"batch {i}: inputs contain NaN or Inf; clean or impute the data")


def _is_empty(y) -> bool:
    return isinstance(y, Tensor) and y.ndim > 0 and y.shape[0] == 0


def _check_finite_targets(y, i: int) -> None:
    if isinstance(y, Tensor) and y.is_floating_point() and not torch.isfinite(y).all():
        raise ValueError(f"batch {i}: targets contain NaN or Inf; drop or impute those data points")


def _to_device(x, device):
    if isinstance(x, dict):
        return {k: (v.to(device) if isinstance(v, Tensor) else v) for k, v in x.items()}
    return x.to(device)


class CurvatureFitter:
    """Accumulates KFAC factors (and EKFAC corrections) over batches.

    The accumulation state (``A_sum``, ``G_sum``, ``E_sum``, ``num_data``, loss sums) is plain
    tensors so it can be checkpointed and all-reduced across data-parallel ranks.

    **Data-parallel fitting.** When ``torch.distributed`` is initialised with several ranks
    (``distributed=None``, the default; ``False`` keeps every rank local), each rank's data is a
    shard: after the KFAC pass ``A_sum``, ``G_sum``, ``N``, loss and sse are all-reduced (SUM), so
    ``A = A_sum / N`` uses the global ``N``; the EKFAC pass projects onto rank 0's eigenbasis and
    all-reduces ``E_sum``. MC labels are drawn from :func:`laplace_kron.distributed.rank_generator`
    (a per-rank stream derived from ``generator``). If a rank fails inside a pass, all ranks raise.

    **Checkpoints.** ``fit_kfac(data, checkpoint=path, checkpoint_every=k)`` saves the accumulated
    state every ``k`` batches (and at the end of the KFAC pass of an EKFAC fit) atomically (temp
    file in the same directory, then ``os.replace``): factor sums, EKFAC sums, pass, next batch
    index, counters and the MC generator state. A later call with the same path and the same model,
    settings and data order skips the consumed batches (they are still drawn from ``data`` but not
    processed) and gives exactly the uninterrupted result. The checkpoint is deleted after a
    successful fit. Under ``torch.distributed`` each rank uses ``<stem>.rank<r><suffix>``.
    Checkpoints are read with ``torch.load(weights_only=True)`` and must match the covered layers,
    likelihood, Fisher type, dtype, world size and the model's parameter values (ValueError
    otherwise); a changed batch order is detected on resume (ValueError).
    """

    def __init__(
        self,
        model: nn.Module,
        likelihood: str,
        fisher: str = "mc",
        mc_samples: int = 1,
        weight_sharing: str = "expand",
        separate_bias: bool = False,
        modules: None | str | Sequence = None,
        generator: torch.Generator | None = None,
        distributed: bool | None = None,
    ):
        check_likelihood(likelihood)
        check_fisher(fisher, mc_samples)
        if weight_sharing not in WEIGHT_SHARING:
            raise ValueError(
                f"weight_sharing must be one of {WEIGHT_SHARING}, got {weight_sharing!r}"
            )
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if distributed not in (None, True, False):
            raise TypeError(f"distributed must be None, True or False, got {distributed!r}")
        self.model = model
        self.likelihood = likelihood
        self.fisher = fisher
        self.mc_samples = mc_samples
        self.weight_sharing = weight_sharing
        self.specs: list[LayerSpec] = select_layers(model, modules, separate_bias)
        self._orders = [_order(s, model) for s in self.specs]
        self._work = Workspace()
        if generator is None and fisher == "mc":
            generator = torch.Generator().manual_seed(0)
        self.generator = generator
        self.distributed = distributed
        self._dist = False
        self._gen = generator
        p = next(iter(model.parameters()))
        self.dtype, self.device = p.dtype, p.device
        self.reset()

    # ------------------------------------------------------------------------- state
    def reset(self) -> None:
        self.A_sum: list[Tensor | None] = [None] * len(self.specs)
        self.G_sum: list[Tensor | None] = [None] * len(self.specs)
        self.E_sum: list[list[Tensor] | None] = [None] * len(self.specs)
        self.num_data = 0
        self.loss = 0.0
        self.sse = 0.0
        self.n_outputs = 0
        self._failed: str | None = None
        self._pass_data = 0
        self._last_batch = None
        self._resume_fingerprint = None

    @property
    def param_names(self) -> list[str]:
        covered = {n for s in self.specs for n in (s.weight_name, s.bias_name) if n}
        return [n for n, _ in self.model.named_parameters() if n in covered]

    # ------------------------------------------------------------------------- passes
    def _forward(self, x, y, i: int, cap: Capture) -> tuple[Tensor, Tensor]:
        """Forward pass with checks: prepared output ``[B, C]`` and targets."""
        _check_finite_inputs(x, i)
        _check_finite_targets(y, i)
        x = _to_device(x, self.device)
        y = y.to(self.device)
        cap.clear()
        f = self.model(x)
        if not isinstance(f, Tensor):
            raise TypeError(f"the model must return a tensor, got {type(f).__name__}")
        if not torch.isfinite(f).all():
            raise ValueError(
                f"batch {i}: the network output contains NaN or Inf although the inputs are "
                "finite (NaN produced inside the network); check the weights and the forward pass"
            )
        return prepare_targets(f, y, self.likelihood)

    def _output_gradients(self, cap: Capture, fc: Tensor, yc: Tensor) -> Iterator[list[Tensor]]:
        """Per output-gradient vector, the layers' output-gradients ``[1, B, T, d_out]``; the
        vectors are drawn in chunks (:func:`iter_output_gradient_vectors`)."""
        chunks = iter_output_gradient_vectors(
            fc, yc, self.likelihood, self.fisher, self.mc_samples, self._gen
        )
        vectors = next(chunks)
        for following in chunks:
            yield from cap.iter_output_gradients(fc, vectors, retain_graph=True)
            vectors = following
        yield from cap.iter_output_gradients(fc, vectors)

    def accumulate_kfac(self, x, y, i: int = 0) -> None:
        """Add one batch to the KFAC factors (first pass); an empty batch adds nothing."""
        if _is_empty(y):
            return
        with Capture(self.specs) as cap:
            fc, yc = self._forward(x, y, i, cap)
            with torch.no_grad():
                for li, spec in enumerate(self.specs):
                    if spec.has_weight:
                        a = cap.layer_inputs(spec, native=True, workspace=self._work)
                        self._add_A(li, spec, a)
            closed = self._closed_form_G(fc)
            # One output-gradient vector at a time: G needs only sums over vectors.
            for grads in self._output_gradients(cap, fc, yc):
                with torch.no_grad():
                    for li, g in enumerate(grads):
                        if li not in closed:
                            self._add_G(li, g)
        with torch.no_grad():
            nll, sse = nll_sum(fc, yc, self.likelihood)
            self.loss += float(nll)
            self.sse += float(sse)
            self.n_outputs = fc.shape[1]
            self.num_data += fc.shape[0]

    def _output_layers(self, f: Tensor) -> set[int]:
        """Layers whose output *is* the network output ``f``, when the exact Fisher makes their
        curvature the summed loss Hessian ``H_n`` (``diag(p_n) - p_n p_n^T`` for softmax
        cross-entropy, ``I`` for the Gaussian): those get closed forms instead of ``C`` vectors."""
        if self.fisher != "exact" or self.likelihood == "binary":
            return set()
        return {
            li
            for li, spec in enumerate(self.specs)
            if len(spec.outputs) == 1 and spec.outputs[0] is f
        }

    def _closed_form_G(self, f: Tensor) -> set[int]:
        """Add ``G = sum_n H_n`` of the :meth:`_output_layers` (:func:`loss_hessian_sum`,
        ``O(B C^2)`` per batch instead of ``O(B C^3)`` from ``C`` vectors); returns them."""
        done = self._output_layers(f)
        with torch.no_grad():
            for li in done:
                H = loss_hessian_sum(f.detach(), self.likelihood)
                self.G_sum[li] = H if self.G_sum[li] is None else self.G_sum[li].add_(H)
        return done

    def _add_A(self, li: int, spec: LayerSpec, a: Tensor) -> None:
        """Add ``sum a a^T`` (``1/T`` times for KFAC-expand) of one batch, ``a [B, T, d_in]``.

        ``a`` carries the ones column of a joint bias and its columns are in
        :func:`native_patches` order: the product is formed in that order and permuted to weight
        order afterwards (``d_in^2`` work instead of a copy of the ``B T x d_in`` patches).
        Dense products accumulate their lower block triangle only (:func:`_gram_lower_`);
        :meth:`_mirror` completes them.
        """
        T, d = a.shape[1], a.shape[2]
        idx = self._orders[li]
        if self.weight_sharing == "expand":
            rows = a.reshape(-1, d) if T == 1 or a.is_contiguous() else None
            scale = 1.0 / T
        else:
            rows, scale = a.mean(dim=1), 1.0
        if self.A_sum[li] is None:
            self.A_sum[li] = a.new_zeros(d, d)
        if rows is None:
            # Channel-first patches ([B, T, d] view of [B, d, T]): one batched product.
            self.A_sum[li].add_(torch.bmm(a.mT, a).sum(0), alpha=scale)
        elif idx is None:
            _gram_lower_(self.A_sum[li], rows, scale)
        else:
            S = self._work.get(("gram", li), (d, d), rows)
            _gram_lower_(S, rows, 1.0, beta=0.0)
            _mirror_(S)
            self.A_sum[li].add_(S[idx][:, idx], alpha=scale)

    def _add_G(self, li: int, g: Tensor) -> None:
        """Add ``sum g g^T`` of one batch, ``g [K, B, T, d_out]`` (summed over positions first
        for KFAC-reduce)."""
        T, d = g.shape[2], g.shape[3]
        if self.G_sum[li] is None:
            self.G_sum[li] = g.new_zeros(d, d)
        if self.weight_sharing == "reduce":
            _gram_lower_(self.G_sum[li], g.sum(dim=2).reshape(-1, d), 1.0)
        elif T == 1 or g.is_contiguous():
            _gram_lower_(self.G_sum[li], g.reshape(-1, d), 1.0)
        else:
            # Convolution output-gradients are [B, T, C] views of channel-first tensors: a batched
            # product over examples avoids the transposing copy a single [B T, C] GEMM needs.
            g3 = g.flatten(0, 1)
            self.G_sum[li].add_(torch.bmm(g3.mT, g3).sum(0))

    def _mirror(self) -> None:
        """Complete the factor sums from their accumulated lower block triangles (idempotent)."""
        for t in self.A_sum + self.G_sum:
            if t is not None:
                _mirror_(t)

    def accumulate_ekfac(self, x, y, bases: list[list[KronBlock]], i: int = 0) -> None:
        """Add one batch to the EKFAC eigenvalue corrections (second pass):
        ``E += sum_{k,n} (Q_G^T (sum_t g a^T) Q_A)^2`` per block."""
        if _is_empty(y):
            return
        with Capture(self.specs) as cap:
            fc, yc = self._forward(x, y, i, cap)
            with torch.no_grad():
                rotated = []  # a Q_A per block, computed once for all output-gradient vectors
                for li, spec in enumerate(self.specs):
                    a = cap.layer_inputs(spec, native=True, workspace=self._work)
                    rotated.append(
                        [self._rotate_inputs(li, j, a, b) for j, b in enumerate(bases[li])]
                    )
            corr: list[list[Tensor]] = [[0.0] * len(layer) for layer in bases]
            closed = self._output_layers(fc)
            with torch.no_grad():
                for li in closed:  # one position per datum: E = sum_n diag(Q^T H_n Q) (x) r_n^2
                    for j, b in enumerate(bases[li]):
                        u = loss_hessian_diag_in_basis(
                            fc.detach(), self.likelihood, b.eig_G.vectors
                        )
                        corr[li][j] = u.T @ rotated[li][j][:, 0].square()
            for grads in self._output_gradients(cap, fc, yc):
                with torch.no_grad():
                    for li, g in enumerate(grads):
                        if li in closed:
                            continue
                        for j, b in enumerate(bases[li]):
                            sq = per_example_sq(rotated[li][j], g @ b.eig_G.vectors)
                            corr[li][j] = corr[li][j] + sq
        for li in range(len(self.specs)):
            if self.E_sum[li] is None:
                self.E_sum[li] = corr[li]
            else:
                self.E_sum[li] = [e + c for e, c in zip(self.E_sum[li], corr[li], strict=True)]

    def _rotate_inputs(self, li: int, j: int, a: Tensor, block: KronBlock) -> Tensor:
        """``a Q_A`` for native-order inputs ``a [B, T, d]``: the eigenbasis rows are permuted to
        the native column order instead of the inputs to the weight order."""
        B, T, d = a.shape
        if block.A is None:  # a bias-only block sees the constant input 1 at every position
            return a.new_ones(B, T, 1)
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

    # ------------------------------------------------------------------------- results
    def blocks(self) -> list[list[KronBlock]]:
        """KFAC blocks per layer (a layer has two blocks when weight and bias are separate)."""
        self._mirror()
        if self.num_data == 0:
            if self._failed is not None:
                raise RuntimeError(
                    f"the last fit failed ({self._failed}); its partial state was discarded: fit again"
                )
            raise ValueError(
                "no data was seen: the data iterable is empty (or yields only empty batches)"
            )
        out = []
        params = dict(self.model.named_parameters())
        for li, spec in enumerate(self.specs):
            G = self.G_sum[li]
            A = None if self.A_sum[li] is None else self.A_sum[li] / self.num_data
            for name, fac in (("G", G), ("A", A)):
                if fac is not None and not torch.isfinite(fac).all():
                    raise ValueError(
                        f"layer {spec.name!r}: KFAC factor {name} contains NaN or Inf (overflow in "
                        "the activations or gradients); check the inputs' scale"
                    )
            if spec.joint:
                names = [spec.weight_name, spec.bias_name]
                out.append([KronBlock(G, A, names, [params[n].shape for n in names], True)])
                continue
            layer = []
            if spec.has_weight:
                w = spec.weight_name
                layer.append(KronBlock(G, A, [w], [params[w].shape]))
            if spec.has_bias:
                # The bias input is the constant 1, so its A factor is 1 (expand and reduce).
                b = spec.bias_name
                layer.append(KronBlock(G, None, [b], [params[b].shape]))
            out.append(layer)
        return out

    def curvature(self, blocks: list[list[KronBlock]], kind: str) -> KronCurvature:
        flat = [b for layer in blocks for b in layer]
        return KronCurvature(
            flat,
            self.param_names,
            self.num_data,
            likelihood=self.likelihood,
            fisher=self.fisher,
            loss=self.loss,
            sse=self.sse,
            n_outputs=self.n_outputs,
            kind=kind,
        )

    def fit_kfac(
        self,
        data: Iterable,
        progress: bool = False,
        checkpoint: str | os.PathLike | None = None,
        checkpoint_every: int | None = None,
    ) -> KronCurvature:
        """One pass over ``data``: KFAC factors ``A = A_sum / N`` and ``G = G_sum``.

        Distributed (see :mod:`laplace_kron.distributed`): each rank's ``data`` is a shard and the
        sums are all-reduced, so every rank returns the curvature of the union of the shards.
        ``checkpoint``: a file path; the accumulation is saved every ``checkpoint_every`` batches
        (default 100) and a new call with the same path resumes from it (see :class:`CurvatureFitter`).
        """
        return self._fit("kfac", data, progress, checkpoint, checkpoint_every)

    def fit_ekfac(
        self,
        data: Iterable,
        progress: bool = False,
        checkpoint: str | os.PathLike | None = None,
        checkpoint_every: int | None = None,
    ) -> KronCurvature:
        """KFAC pass, then a second pass over ``data`` for the eigenvalue corrections ``E``.

        Same arguments as :meth:`fit_kfac`; ``data`` must be re-iterable and yield the same data.
        """
        return self._fit("ekfac", data, progress, checkpoint, checkpoint_every)

    # ------------------------------------------------------------------------- fit driver
    def _fit(self, kind: str, data: Iterable, progress: bool, checkpoint, every) -> KronCurvature:
        self._dist = self._resolve_distributed()
        ckpt = _Checkpoint.make(checkpoint, every, self._dist)
        self.reset()
        _check_model_mode(self.model)
        try:
            curv = self._fit_passes(kind, data, progress, ckpt)
        except BaseException as exc:
            # Leave nothing that looks fitted: the next blocks() call explains what happened.
            self.reset()
            self._failed = f"{type(exc).__name__}: {exc}"
            raise
        if ckpt is not None:
            ckpt.remove()
        return curv

    def _resolve_distributed(self) -> bool:
        if self.distributed is False:
            return False
        on = dist_utils.is_distributed()
        if self.distributed is True and not (
            torch.distributed.is_available() and torch.distributed.is_initialized()
        ):
            raise ValueError(
                "distributed=True but torch.distributed is not initialised: call "
                "torch.distributed.init_process_group(...) first (e.g. launch with torchrun)"
            )
        return on

    def _local(self, fn):
        """Run a rank-local phase; if any rank fails, every rank raises (nobody hangs)."""
        if not self._dist:
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

    def _fit_passes(self, kind: str, data: Iterable, progress: bool, ckpt) -> KronCurvature:
        self._gen = dist_utils.rank_generator(self.generator) if self._dist else self.generator
        settings = fit_settings(self, kind) if ckpt is not None else None

        def first_phase() -> tuple[str, int]:
            state = ckpt.load() if ckpt is not None else None
            pass_name, start = "kfac", 0
            if state is not None:
                restore(self, state, settings, ckpt.path)
                pass_name, start = state["pass"], int(state["next_batch"])
            if pass_name == "kfac":
                try:
                    self._run_pass("kfac", data, progress, start, ckpt, settings)
                finally:
                    self._work.clear()
            return pass_name, start

        pass_name, start = self._local(first_phase)
        if self._dist:
            check_same_pass(pass_name)
        if pass_name == "kfac":
            reduce_kfac(self)
            start = 0
            if kind == "ekfac" and ckpt is not None:
                # The KFAC pass is final (and all-reduced): a crash in pass 2 restarts pass 2 only.
                self._pass_data, self._last_batch = 0, None
                ckpt.save(checkpoint_state(self, settings, "ekfac", 0))
        bases = self.blocks()
        if kind == "kfac":
            return self.curvature(bases, "kfac")
        share_bases(self, bases)
        try:
            self._local(
                lambda: self._run_pass("ekfac", data, progress, start, ckpt, settings, bases)
            )
        finally:
            self._work.clear()
        reduce_ekfac(self, bases)
        return self.curvature(self.ekfac_blocks(bases), "ekfac")

    def _run_pass(
        self,
        pass_name: str,
        data: Iterable,
        progress: bool,
        start: int,
        ckpt: _Checkpoint | None,
        settings: dict | None,
        bases: list[list[KronBlock]] | None = None,
    ) -> None:
        """Iterate over ``data``; the first ``start`` batches were consumed before a checkpoint."""
        if start == 0:
            self._pass_data, self._last_batch = 0, None
        saved_count, saved_fp = self._pass_data, self._resume_fingerprint
        self._pass_data = 0
        i = -1
        for i, (x, y) in _iter_batches(data, progress, pass_name.upper()):
            if i < start:
                self._pass_data += _batch_size(y)
                if i == start - 1:
                    _check_resumed_data(saved_count, self._pass_data, saved_fp, x, y, start)
                continue
            if bases is None:
                self.accumulate_kfac(x, y, i)
            else:
                self.accumulate_ekfac(x, y, bases, i)
            self._pass_data += _batch_size(y)
            self._last_batch = (x, y)
            if ckpt is not None and (i + 1) % ckpt.every == 0:
                ckpt.save(checkpoint_state(self, settings, pass_name, i + 1))
        if i + 1 < start:
            raise ValueError(
                f"the checkpoint says {start} batches of the {pass_name} pass were consumed but the "
                f"data yields only {i + 1}; resume with the same data or delete the checkpoint"
            )

    def ekfac_blocks(self, bases: list[list[KronBlock]]) -> list[list[KronBlock]]:
        out = []
        for li, layer in enumerate(bases):
            E = self.E_sum[li]
            if E is None:
                raise ValueError("EKFAC second pass saw no data: the data iterable is exhausted")
            for b, e in zip(layer, E, strict=True):
                if not torch.isfinite(e).all():
                    raise ValueError(
                        f"block {b.param_names}: EKFAC eigenvalues contain NaN or Inf (overflow in "
                        "the activations or gradients); check the inputs' scale"
                    )
            out.append([b.with_eigenvalues(e) for b, e in zip(layer, E, strict=True)])
        return out


def _order(spec: LayerSpec, model: nn.Module) -> Tensor | None:
    """Native-to-weight column order of a layer's inputs, with the ones column of a joint bias
    (always last) appended; ``None`` when the orders coincide."""
    idx = native_to_weight_order(spec.module)
    if idx is None:
        return None
    if spec.joint:
        idx = torch.cat([idx, idx.new_tensor([idx.numel()])])
    return idx.to(next(model.parameters()).device)


def _fit(kind: str, model, data, likelihood, **kw) -> KronCurvature:
    progress = kw.pop("progress", False)
    checkpoint = kw.pop("checkpoint", None)
    every = kw.pop("checkpoint_every", None)
    fitter = CurvatureFitter(model, likelihood, **kw)
    if kind == "kfac":
        return fitter.fit_kfac(data, progress, checkpoint, every)
    return fitter.fit_ekfac(data, progress, checkpoint, every)


def kfac(
    model: nn.Module,
    data: Iterable,
    likelihood: str,
    fisher: str = "mc",
    mc_samples: int = 1,
    weight_sharing: str = "expand",
    separate_bias: bool = False,
    modules: None | str | Sequence = None,
    progress: bool = False,
    generator: torch.Generator | None = None,
    checkpoint: str | os.PathLike | None = None,
    checkpoint_every: int | None = None,
    distributed: bool | None = None,
) -> KronCurvature:
    """KFAC approximation of the GGN / Fisher of the summed negative log-likelihood.

    Args:
        model: the network at its MAP parameters; outputs ``[B, C]`` (``[B]`` for binary or
            one-output regression).
        data: iterable of ``(inputs, targets)`` batches, e.g. a DataLoader.
        likelihood: ``"classification"`` (softmax cross-entropy, integer targets ``[B]``),
            ``"regression"`` (Gaussian, stored for ``sigma = 1``) or ``"binary"`` (sigmoid).
        fisher: ``"exact"`` (type-2: columns of the loss-Hessian square root), ``"mc"``
            (``mc_samples`` sampled labels) or ``"empirical"`` (observed labels).
        weight_sharing: ``"expand"`` or ``"reduce"`` for layers with shared positions.
        separate_bias: one block for the weight and one for the bias instead of ``[W | b]``.
        modules: ``None`` (all layers), ``"last_layer"`` or a list of names / modules.
        progress: show a tqdm progress bar.
        generator: random generator for the MC Fisher (default: seeded with 0, reproducible).
        checkpoint: file to save the accumulation to every ``checkpoint_every`` batches (default
            100) and to resume from; deleted after success (see :class:`CurvatureFitter`).
        distributed: ``None`` (all-reduce across ranks when ``torch.distributed`` is initialised
            with several ranks), ``True`` (require it) or ``False`` (rank-local fit).

    Returns:
        A :class:`~laplace_kron.kron.KronCurvature`; ``to_dense()`` orders rows by
        ``param_names`` (``model.named_parameters()`` order).
    """
    return _fit(
        "kfac",
        model,
        data,
        likelihood,
        fisher=fisher,
        mc_samples=mc_samples,
        weight_sharing=weight_sharing,
        separate_bias=separate_bias,
        modules=modules,
        progress=progress,
        generator=generator,
        checkpoint=checkpoint,
        checkpoint_every=checkpoint_every,
        distributed=distributed,
    )


def ekfac(
    model: nn.Module,
    data: Iterable,
    likelihood: str,
    fisher: str = "mc",
    mc_samples: int = 1,
    weight_sharing: str = "expand",
    separate_bias: bool = False,
    modules: None | str | Sequence = None,
    progress: bool = False,
    generator: torch.Generator | None = None,
    checkpoint: str | os.PathLike | None = None,
    checkpoint_every: int | None = None,
    distributed: bool | None = None,
) -> KronCurvature:
    """EKFAC: the KFAC eigenbasis with eigenvalues corrected by a second pass over ``data``.

    Same arguments as :func:`kfac`; ``data`` is iterated twice (it must be re-iterable).
    """
    return _fit(
        "ekfac",
        model,
        data,
        likelihood,
        fisher=fisher,
        mc_samples=mc_samples,
        weight_sharing=weight_sharing,
        separate_bias=separate_bias,
        modules=modules,
        progress=progress,
        generator=generator,
        checkpoint=checkpoint,
        checkpoint_every=checkpoint_every,
        distributed=distributed,
    )
