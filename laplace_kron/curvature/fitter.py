"""The pass driver of a curvature fit (:class:`CurvatureFitter`) and the :func:`kfac` /
:func:`ekfac` entry points.

A KFAC fit is one pass over the data (:class:`~laplace_kron.curvature.accumulate.FactorAccumulator`
adds each batch to a :class:`~laplace_kron.curvature.state.FitState`); an EKFAC fit adds a second
pass for the eigenvalue corrections in the KFAC eigenbasis. Between and after the passes the state
is all-reduced across data-parallel ranks, and it is checkpointed every ``checkpoint_every``
batches when a checkpoint path is given.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from .. import distributed as dist_utils
from ..constants import POSTERIOR_CURVATURES
from ..kron import KronBlock, KronCurvature
from ..output_noise import OutputFactors
from .accumulate import FactorAccumulator
from .batches import fit_batch_size, iter_batches, warn_if_train_mode
from .capture import LayerSpec
from .checkpoint import Checkpoint, check_resumed_data, fit_settings
from .likelihoods import check_likelihood
from .options import CurvatureOptions
from .parallel import check_same_pass, resolve_distributed, run_local, share_bases
from .selection import select_coverage
from .state import FitState

__all__ = ["CurvatureFitter", "ekfac", "kfac"]


class CurvatureFitter:
    """Fits KFAC factors (and EKFAC corrections) of ``model`` over batches.

    ``CurvatureFitter(model, likelihood, options)`` or ``CurvatureFitter(model, likelihood,
    fisher=..., mc_samples=..., ...)`` (the :class:`CurvatureOptions` fields; keywords given with
    ``options`` override it). The covered layers are :attr:`specs`, their parameters
    :attr:`param_names`; the accumulation is :attr:`state` (a :class:`FitState`).

    **Data-parallel fitting.** When ``torch.distributed`` is initialised with several ranks
    (``distributed=None``, the default; ``False`` keeps every rank local), each rank's data is a
    shard: after the KFAC pass ``A_sum``, ``G_sum``, ``N``, loss and sse are all-reduced (SUM), so
    ``A = A_sum / N`` uses the global ``N``; the EKFAC pass projects onto rank 0's eigenbasis and
    all-reduces ``E_sum``. MC labels are drawn from :func:`laplace_kron.distributed.rank_generator`
    (a per-rank stream derived from ``generator``). If a rank fails inside a pass, all ranks raise.

    **Checkpoints.** ``fit(kind, data, checkpoint=path, checkpoint_every=k)`` saves the state every
    ``k`` batches (and at the end of the KFAC pass of an EKFAC fit) atomically (temp file in the
    same directory, fsync, then ``os.replace``): factor sums, EKFAC sums, pass, next batch index,
    counters and the MC generator state. A later call with the same path and the same model,
    settings and data order skips the consumed batches (they are still drawn from ``data`` but not
    processed) and gives exactly the uninterrupted result. The checkpoint is deleted after a
    successful fit. Under ``torch.distributed`` each rank uses ``<stem>.rank<r><suffix>``.
    Checkpoints are read with ``torch.load(weights_only=True)`` and must be finite and match the
    covered layers, likelihood, Fisher type, dtype, world size and the model's parameter values
    (ValueError otherwise); a changed batch order is detected on resume (ValueError).
    """

    def __init__(
        self,
        model: nn.Module,
        likelihood: str,
        options: CurvatureOptions | None = None,
        **option_kwargs: Any,
    ):
        check_likelihood(likelihood)
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if options is None:
            options = CurvatureOptions.from_kwargs(**option_kwargs)
        elif not isinstance(options, CurvatureOptions):
            raise TypeError(
                f"options must be a CurvatureOptions, got {type(options).__name__}; pass "
                "fisher=, mc_samples=, ... as keywords"
            )
        elif option_kwargs:
            options = options.replace(**option_kwargs)
        self.model = model
        self.likelihood = likelihood
        self.options = options
        coverage = select_coverage(
            model, options.modules, options.separate_bias, embeddings=options.kron_embeddings
        )
        self.specs: list[LayerSpec] = coverage.specs
        self.diag_names: list[str] = coverage.diag_names
        self._param_names = coverage.param_names
        generator = options.generator
        if generator is None and options.fisher == "mc":
            generator = torch.Generator().manual_seed(0)
        self.generator = generator
        p = next(iter(model.parameters()))
        self.dtype, self.device = p.dtype, p.device
        shapes = {n: p.shape for n, p in model.named_parameters()}
        diag = {n: shapes[n] for n in self.diag_names}
        self.state = FitState(self.specs, self.dtype, self.device, generator, diag=diag)
        self._accumulator = FactorAccumulator(model, self.specs, likelihood, options, self.state)
        self._failed: str | None = None

    # ------------------------------------------------------------------------- read-only views
    @property
    def param_names(self) -> list[str]:
        """Covered parameters in ``model.named_parameters()`` order (the curvature's order):
        the Kronecker layers' weights and biases and the diagonal-block parameters."""
        return list(self._param_names)

    fisher = property(lambda self: self.options.fisher)
    mc_samples = property(lambda self: self.options.mc_samples)
    weight_sharing = property(lambda self: self.options.weight_sharing)
    distributed = property(lambda self: self.options.distributed)
    A_sum = property(lambda self: self.state.A_sum, doc="The state's KFAC input-factor sums.")
    G_sum = property(lambda self: self.state.G_sum, doc="The state's KFAC output-factor sums.")
    E_sum = property(lambda self: self.state.E_sum, doc="The state's EKFAC eigenvalue sums.")
    num_data = property(lambda self: self.state.num_data, doc="Data points seen (all ranks).")
    loss = property(lambda self: self.state.loss, doc="Summed negative log-likelihood.")
    sse = property(lambda self: self.state.sse, doc="Summed squared residuals (regression).")
    n_outputs = property(lambda self: self.state.n_outputs, doc="Outputs per datum.")

    def keep_per_output(self, n_outputs: int | None) -> None:
        """Keep per-output sums of ``n_outputs`` regression outputs in the next fits (``None``:
        do not), for per-output observation noise (:mod:`laplace_kron.output_noise`); needs
        ``fisher="exact"``, whose vectors ``e_c`` separate the outputs."""
        if n_outputs is not None and (self.likelihood != "regression" or self.fisher != "exact"):
            raise ValueError(
                "per-output noise (a sigma_noise tensor [C]) needs likelihood='regression' and "
                f"fisher='exact', got likelihood={self.likelihood!r}, fisher={self.fisher!r}: the "
                "MC and empirical Fisher mix the outputs in every vector; pass fisher='exact'"
            )
        self.state.per_output = n_outputs
        self.reset()

    def output_factors(self, curv: KronCurvature) -> OutputFactors | None:
        """The per-output factors of the fit that gave ``curv`` (``None`` unless kept)."""
        outputs = self.state.outputs
        return None if outputs is None else outputs.factors(curv)

    def reset(self) -> None:
        """Forget the accumulation."""
        self.state.reset()
        self._failed = None

    # ------------------------------------------------------------------------- batches
    def accumulate_kfac(self, x, y, i: int = 0) -> None:
        """Add one batch to the KFAC factors (first pass); an empty batch adds nothing."""
        self._accumulator.add_kfac(x, y, i)

    def accumulate_ekfac(self, x, y, bases: list[list[KronBlock]], i: int = 0) -> None:
        """Add one batch to the EKFAC eigenvalue corrections in ``bases`` (second pass)."""
        self._accumulator.add_ekfac(x, y, bases, i)

    # ------------------------------------------------------------------------- results
    def blocks(self) -> list[list[KronBlock]]:
        """KFAC blocks per layer (a layer has two blocks when weight and bias are separate)."""
        if self.state.num_data == 0 and self._failed is not None:
            raise RuntimeError(
                f"the last fit failed ({self._failed}); its partial state was discarded: fit again"
            )
        shapes = {n: p.shape for n, p in self.model.named_parameters()}
        return self.state.kfac_blocks(shapes)

    def ekfac_blocks(self, bases: list[list[KronBlock]]) -> list[list[KronBlock]]:
        """``bases`` with the accumulated EKFAC eigenvalues."""
        return self.state.ekfac_blocks(bases)

    def curvature(self, blocks: list[list[KronBlock]], kind: str) -> KronCurvature:
        """The :class:`KronCurvature` of per-layer ``blocks``."""
        return self.state.curvature(blocks, kind, self.param_names, self.likelihood, self.fisher)

    def log_likelihood_terms(self, data: Iterable, progress: bool = False) -> FitState:
        """One forward pass over ``data`` without gradients: the state's loss, sse and counts
        (``num_data``, ``n_outputs``, ``n_observed``) at the model's parameters; no factors."""
        self.reset()
        for i, x, y in iter_batches(data, progress, "LOSS", self.options.target_key):
            self._accumulator.add_loss(x, y, i)
        if self.state.num_data == 0:
            raise ValueError("no data was seen: the data iterable is empty")
        return self.state

    # ------------------------------------------------------------------------- fits
    def fit(
        self,
        kind: str,
        data: Iterable,
        progress: bool = False,
        checkpoint: str | os.PathLike | None = None,
        checkpoint_every: int | None = None,
    ) -> KronCurvature:
        """Fit ``kind`` (``"kfac"`` or ``"ekfac"``) over ``data`` and return the curvature.

        KFAC: one pass, ``A = A_sum / N`` and ``G = G_sum``. EKFAC: then a second pass for the
        eigenvalue corrections ``E`` (``data`` must be re-iterable and yield the same data).
        Distributed (see :mod:`laplace_kron.distributed`): each rank's ``data`` is a shard and the
        sums are all-reduced, so every rank returns the curvature of the union of the shards.
        ``checkpoint``: a file path; the state is saved every ``checkpoint_every`` batches
        (default 100) and a new call with the same path resumes from it. On failure the state is
        discarded and :meth:`blocks` says why.
        """
        if kind not in POSTERIOR_CURVATURES:
            raise ValueError(f"kind must be one of {POSTERIOR_CURVATURES}, got {kind!r}")
        distributed = resolve_distributed(self.options.distributed)
        ckpt = Checkpoint.make(checkpoint, checkpoint_every, distributed)
        self.reset()
        self.state.distributed = distributed
        warn_if_train_mode(self.model, "fitting", stacklevel=2)
        try:
            curv = self._fit_passes(kind, data, progress, ckpt)
        except BaseException as exc:
            # Leave nothing that looks fitted: the next blocks() call explains what happened.
            self.state.reset()
            self._failed = f"{type(exc).__name__}: {exc}"
            raise
        if ckpt is not None:
            ckpt.remove()
        return curv

    def fit_kfac(self, data: Iterable, *args: Any, **kwargs: Any) -> KronCurvature:
        """``fit("kfac", data, ...)``: one pass over ``data``."""
        return self.fit("kfac", data, *args, **kwargs)

    def fit_ekfac(self, data: Iterable, *args: Any, **kwargs: Any) -> KronCurvature:
        """``fit("ekfac", data, ...)``: KFAC pass, then the eigenvalue-correction pass."""
        return self.fit("ekfac", data, *args, **kwargs)

    # ------------------------------------------------------------------------- pass driver
    def _fit_passes(
        self, kind: str, data: Iterable, progress: bool, ckpt: Checkpoint | None
    ) -> KronCurvature:
        st = self.state
        dist = st.distributed
        st.generator = dist_utils.rank_generator(self.generator) if dist else self.generator
        settings = None
        if ckpt is not None:
            settings = fit_settings(
                self.model, self.specs, self.likelihood, self.options, kind, self.dtype, dist
            )
            settings["diagonal_blocks"] = list(self.diag_names)

        def first_phase() -> tuple[str, int]:
            saved = ckpt.load() if ckpt is not None else None
            pass_name, start = "kfac", 0
            if saved is not None:
                ckpt.restore(saved, settings, st)
                pass_name, start = st.pass_name, st.next_batch
            if pass_name == "kfac":
                try:
                    self._run_pass("kfac", data, progress, start, ckpt, settings)
                finally:
                    self._accumulator.clear()
            return pass_name, start

        pass_name, start = run_local(first_phase, dist)
        if dist:
            check_same_pass(pass_name)
        if pass_name == "kfac":
            st.all_reduce_kfac()
            start = 0
            if kind == "ekfac" and ckpt is not None:
                # The KFAC pass is final (and all-reduced): a crash in pass 2 restarts pass 2 only.
                st.start_pass("ekfac")
                ckpt.save(settings, st)
        bases = self.blocks()
        if kind == "kfac":
            return self.curvature(bases, "kfac")
        share_bases(bases, dist)
        try:
            run_local(
                lambda: self._run_pass("ekfac", data, progress, start, ckpt, settings, bases), dist
            )
        finally:
            self._accumulator.clear()
        st.all_reduce_ekfac(bases)
        return self.curvature(st.ekfac_blocks(bases), "ekfac")

    def _run_pass(
        self,
        pass_name: str,
        data: Iterable,
        progress: bool,
        start: int,
        ckpt: Checkpoint | None,
        settings: dict | None,
        bases: list[list[KronBlock]] | None = None,
    ) -> None:
        """Iterate over ``data``; the first ``start`` batches were consumed before a checkpoint."""
        st = self.state
        saved_count, saved_fp = (st.pass_data, st.resume_fingerprint) if start else (0, None)
        st.start_pass(pass_name)
        i = -1
        batches = iter_batches(data, progress, pass_name.upper(), self.options.target_key)
        for i, x, y in batches:
            if i < start:
                st.pass_data += fit_batch_size(x, y)
                if i == start - 1:
                    check_resumed_data(saved_count, st.pass_data, saved_fp, x, y, start)
                continue
            if bases is None:
                self._accumulator.add_kfac(x, y, i)
            else:
                self._accumulator.add_ekfac(x, y, bases, i)
            st.record_batch(x, y, fit_batch_size(x, y), i)
            if ckpt is not None and (i + 1) % ckpt.every == 0:
                ckpt.save(settings, st)
        if i + 1 < start:
            raise ValueError(
                f"the checkpoint says {start} batches of the {pass_name} pass were consumed but the "
                f"data yields only {i + 1}; resume with the same data or delete the checkpoint"
            )


def _entry(kind: str, doc: str) -> Callable[..., KronCurvature]:
    """The function :func:`kfac` / :func:`ekfac` (one signature for both)."""

    def fit(
        model: nn.Module,
        data: Iterable,
        likelihood: str,
        fisher: str = "mc",
        mc_samples: int = 1,
        *,
        progress: bool = False,
        checkpoint: str | os.PathLike | None = None,
        checkpoint_every: int | None = None,
        **options: Any,
    ) -> KronCurvature:
        fitter = CurvatureFitter(model, likelihood, fisher=fisher, mc_samples=mc_samples, **options)
        return fitter.fit(kind, data, progress, checkpoint, checkpoint_every)

    fit.__name__ = fit.__qualname__ = kind
    fit.__doc__ = doc
    return fit


kfac = _entry(
    "kfac",
    """KFAC approximation of the GGN / Fisher of the summed negative log-likelihood.

    Args:
        model: the network at its MAP parameters; outputs ``[B, C]`` (``[B]`` for binary or
            one-output regression).
        data: iterable of ``(inputs, targets)`` batches or mappings holding the targets under
            ``target_key`` (e.g. a DataLoader of Hugging Face batches); see
            :mod:`laplace_kron.curvature.batches`.
        likelihood: ``"classification"`` (softmax cross-entropy, integer targets ``[B]``),
            ``"regression"`` (Gaussian, stored for ``sigma = 1``) or ``"binary"`` (sigmoid).
        fisher, mc_samples, **options: the curvature options (:class:`CurvatureOptions`:
            ``fisher``, ``mc_samples``, ``weight_sharing``, ``separate_bias``, ``modules``,
            ``generator``, ``distributed``, ``target_key``, ``ignore_index``,
            ``shift_labels``); an unknown option is a ``TypeError``.
        progress: show a tqdm progress bar.
        checkpoint: file to save the accumulation to every ``checkpoint_every`` batches (default
            100) and to resume from; deleted after success (see :class:`CurvatureFitter`).

    Returns:
        A :class:`~laplace_kron.kron.KronCurvature`; ``to_dense()`` orders rows by
        ``param_names`` (``model.named_parameters()`` order).
    """,
)
ekfac = _entry(
    "ekfac",
    """EKFAC: the KFAC eigenbasis with eigenvalues corrected by a second pass over ``data``.

    Same arguments as :func:`kfac`; ``data`` is iterated twice (it must be re-iterable).
    """,
)
