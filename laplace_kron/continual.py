"""Online Laplace penalty for continual learning (Kronecker-factored, EKFAC, and diagonal EWC).

After tasks ``1..t`` the (approximate) posterior is ``N(theta_t, Lambda_t^-1)`` with the online
precision

    Lambda_t = decay * Lambda_{t-1} + H_t(theta_t),          Lambda_0 = 0,

where ``H_t`` is the GGN / Fisher of task ``t``'s SUMMED negative log-likelihood at the parameters
``theta_t`` reached after training on it (the *anchor*). Training on task ``t + 1`` minimises

    loss_{t+1}(theta) + strength / 2 * (theta - theta_t)^T (Lambda_t + delta I) (theta - theta_t),

with ``delta`` an optional isotropic prior precision. ``strength = 1``, ``decay = 1`` is Bayesian
online learning with a Laplace approximation (Ritter, Botev & Barber, 2018); ``curvature="diag"``
with the diagonal Fisher is (online) EWC (Kirkpatrick et al., 2017; Schwarz et al., 2018).

The penalty is on the scale of the summed NLL. A training loop that minimises the *mean* loss
over a task of ``N`` points should add ``penalty(model) / N``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn

from . import io
from .constants import FILE_FORMATS, ONLINE_FORMAT
from .curvature import CurvatureFitter, CurvatureOptions, fit_diagonal
from .curvature.selection import select_coverage
from .kron import DiagBlock, KronCurvature
from .online_precision import BlockSum, DiagSum
from .online_state import (
    check_decay,
    check_max_terms,
    check_options,
    check_shapes,
    module_names,
    read_state,
    saved_options,
)
from .validation import Checked, check_number

__all__ = ["OnlineLaplace"]

# How error messages name an in-memory state (a file is named by its path).
_STATE_NAME = "OnlineLaplace state"
# Options that load_state_dict restores from a state (the rest must match or come from the model).
_RESTORED = frozenset(
    ("fisher", "mc_samples", "strength", "decay", "max_terms", "prior_precision", "weight_sharing")
)


class OnlineLaplace:
    """Online (Kronecker-factored) Laplace penalty across a sequence of tasks.

    Usage::

        ol = OnlineLaplace(model, "classification", curvature="kfac", strength=1.0)
        for task_loader in tasks:
            for x, y in task_loader:       # train
                loss = F.cross_entropy(model(x), y) + ol.penalty(model) / len(task_loader.dataset)
                ...
            model.eval()
            ol.consolidate(task_loader)    # fold this task's curvature into the precision
        ol.save("online.pt")               # later: OnlineLaplace.load("online.pt", model)

    Args:
        model: the network; the same object (or one with identical parameter names and shapes) is
            trained on every task.
        likelihood: ``"classification"``, ``"regression"`` or ``"binary"``.
        curvature: ``"kfac"`` / ``"ekfac"`` (per-layer Kronecker blocks, Ritter et al. 2018) or
            ``"diag"`` (diagonal Fisher/GGN: EWC); stored as :attr:`curvature_type`.
        fisher: ``"exact"``, ``"mc"`` or ``"empirical"`` (see :func:`laplace_kron.kfac`).
        mc_samples: sampled labels per datum for ``fisher="mc"``.
        strength: multiplier ``lambda >= 0`` of the penalty (1 = Bayesian online Laplace).
        decay: ``gamma in (0, 1]``; the old precision is multiplied by it before adding a new task.
        modules: layers to cover (``None``: all; ``"last_layer"``; names or modules). Uncovered
            parameters are not penalised.
        generator: random generator for the MC Fisher; default: one seeded with 0, shared across
            tasks so each task draws fresh labels.
        max_terms: ``None`` keeps the sum of Kronecker terms exact (one term per task and block).
            An integer ``m >= 1`` merges the oldest terms whenever there are more than ``m``
            (``m = 1``: one Kronecker product per layer, constant cost; see below).
        prior_precision: isotropic ``delta >= 0`` added to the precision in the penalty.
        separate_bias, weight_sharing: passed to :func:`laplace_kron.kfac`.
        target_key, ignore_index, shift_labels: how batches are read (mapping batches, ignored
            targets, causal-LM label shift; :class:`~laplace_kron.curvature.CurvatureOptions`).
            Not saved by :meth:`state_dict` (give them again to :meth:`load`).

    **Representation of the sum.** ``sum_t c_t G_t (x) A_t`` is not a Kronecker product; it is
    kept exactly, one term per task and block (:mod:`laplace_kron.online_precision`; cost linear
    in the tasks), unless ``max_terms`` merges the oldest terms into one Kronecker product of
    summed factors (Ritter et al. 2018; exact when the tasks share the input factor, trace-exact;
    EKFAC terms re-diagonalised). The diagonal curvature is summed exactly.

    **Before the first** :meth:`consolidate` the penalty is zero (a tensor), so one training loop
    serves every task; :attr:`num_tasks` tells whether anything was consolidated.

    **Files.** :meth:`save` writes the :meth:`state_dict` atomically in the library's versioned
    format (:mod:`laplace_kron.io`); :meth:`load` reads it back onto a model (construction options
    from the file, overridable by keyword) and, like :meth:`load_state_dict`, refuses NaN / Inf,
    missing or mistyped entries, block layouts that do not fit, and parameters the model lacks
    or has in other shapes, with a ``ValueError`` naming the problem. Nothing pickled is executed.
    """

    def __init__(
        self,
        model: nn.Module,
        likelihood: str,
        curvature: str = "kfac",
        fisher: str = "mc",
        mc_samples: int = 1,
        strength: float = 1.0,
        decay: float = 1.0,
        modules: None | str | Sequence = None,
        generator: torch.Generator | None = None,
        max_terms: int | None = None,
        prior_precision: float = 0.0,
        separate_bias: bool = False,
        weight_sharing: str = "expand",
        *,
        target_key: str = "labels",
        ignore_index: int = -100,
        shift_labels: bool = False,
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        check_options(likelihood, curvature, fisher, mc_samples, weight_sharing)
        self.model = model
        self.likelihood = likelihood
        self.curvature_type = curvature
        self.fisher = fisher
        self.mc_samples = mc_samples
        self.strength = strength
        self.decay = decay
        self.max_terms = check_max_terms(max_terms)
        self.prior_precision = prior_precision
        self.separate_bias = bool(separate_bias)
        self.weight_sharing = weight_sharing
        self.modules = modules
        # Validated now (CurvatureOptions refuses bad values), used by every consolidate.
        self.batch_options = dict(
            target_key=target_key, ignore_index=ignore_index, shift_labels=shift_labels
        )
        CurvatureOptions(**self.batch_options)
        if generator is None and fisher == "mc":
            generator = torch.Generator().manual_seed(0)
        self.generator = generator
        coverage = select_coverage(model, modules, separate_bias)
        named = dict(model.named_parameters())
        self.param_names: list[str] = coverage.param_names
        # Parameters with a diagonal precision: all for "diag", else those without a Kronecker
        # block (LayerNorm, embeddings, free parameters, ...), kept in the DiagSum.
        self.diag_names: list[str] = (
            list(coverage.param_names) if curvature == "diag" else coverage.diag_names
        )
        self.param_shapes: list[torch.Size] = [named[n].shape for n in self.param_names]
        self.num_tasks = 0
        self.task_sizes: list[int] = []
        self.anchor: dict[str, Tensor] = {}
        self._blocks: list[BlockSum] = []
        self._diag = DiagSum()

    # ------------------------------------------------------------------------- hyperparameters
    strength = Checked(
        lambda v: check_number("strength", v, 0.0), "Multiplier ``lambda >= 0`` of the penalty."
    )
    decay = Checked(
        check_decay, "Forgetting factor ``gamma in (0, 1]`` applied to the old precision per task."
    )
    prior_precision = Checked(
        lambda v: check_number("prior_precision", v, 0.0),
        "Isotropic ``delta >= 0`` added to the precision in the penalty.",
    )

    @property
    def n_terms(self) -> int:
        """Kronecker terms per block (0 for the diagonal curvature or before consolidating)."""
        return len(self._blocks[0].terms) if self._blocks else 0

    def __repr__(self) -> str:
        return (
            f"OnlineLaplace(curvature={self.curvature_type!r}, likelihood={self.likelihood!r}, "
            f"tasks={self.num_tasks}, terms={self.n_terms}, strength={self.strength}, "
            f"decay={self.decay}, P={sum(s.numel() for s in self.param_shapes)})"
        )

    # ------------------------------------------------------------------------- consolidation
    def consolidate(self, data: Iterable, progress: bool = False) -> None:
        """Fit the curvature of ``data`` (the task just learned) at the model's current parameters,
        fold it into the precision (``Lambda <- decay * Lambda + H``) and set the anchor.

        ``data`` yields ``(inputs, targets)`` batches; it is iterated twice for ``"ekfac"``.
        Put the model in eval mode first if it has dropout or batch-norm.
        """
        options = CurvatureOptions(
            fisher=self.fisher,
            mc_samples=self.mc_samples,
            weight_sharing=self.weight_sharing,
            separate_bias=self.separate_bias,
            modules=self.modules,
            generator=self.generator,
            # The online precision sums dense Kronecker factors: embeddings keep their exact
            # diagonal block (as the coverage above decided).
            embeddings="diag",
            **self.batch_options,
        )
        if self.curvature_type == "diag":
            diag, n = fit_diagonal(self.model, data, self.likelihood, options, progress)
            self.consolidate_curvature(diag, num_data=n)
            return
        fitter = CurvatureFitter(self.model, self.likelihood, options)
        curv = fitter.fit(self.curvature_type, data, progress)
        self.consolidate_curvature(curv)

    def consolidate_curvature(
        self, curv: KronCurvature | Mapping[str, Tensor], num_data: int | None = None
    ) -> None:
        """Fold a precomputed curvature into the precision and anchor at the current parameters.

        ``curv`` is a :class:`~laplace_kron.kron.KronCurvature` (``"kfac"`` / ``"ekfac"``, with the
        same blocks as this object's layers) or, for ``"diag"``, a dict ``name -> diagonal``
        shaped like the parameter.
        """
        named = dict(self.model.named_parameters())
        check_shapes(self.param_names, self.param_shapes, named, "the model")
        if self.curvature_type == "diag":
            if not isinstance(curv, Mapping):
                raise TypeError(
                    "curvature='diag' expects a dict mapping parameter names to diagonals"
                )
            self._diag.fold(curv, self.decay, {n: named[n] for n in self.param_names})
            n = num_data
        else:
            if not isinstance(curv, KronCurvature):
                raise TypeError(
                    f"curvature={self.curvature_type!r} expects a KronCurvature, "
                    f"got {type(curv).__name__}"
                )
            if (curv.kind == "ekfac") != (self.curvature_type == "ekfac"):
                raise ValueError(
                    f"a {curv.kind!r} curvature cannot be folded into an OnlineLaplace with "
                    f"curvature={self.curvature_type!r}"
                )
            self._fold_kron(curv)
            n = curv.num_data if num_data is None else num_data
        self.anchor = {n_: named[n_].detach().clone() for n_ in self.param_names}
        self.num_tasks += 1
        self.task_sizes.append(int(n) if n is not None else -1)

    def _fold_kron(self, curv: KronCurvature) -> None:
        if sorted(curv.param_names) != sorted(self.param_names):
            raise ValueError(
                f"the curvature covers parameters {curv.param_names} but this OnlineLaplace covers "
                f"{self.param_names}; use the same modules= for both"
            )
        diag = {
            b.param_names[0]: b.values.reshape(b.param_shapes[0])
            for b in curv.blocks
            if isinstance(b, DiagBlock)
        }
        if sorted(diag) != sorted(self.diag_names):
            raise ValueError(
                f"the curvature has diagonal blocks for {sorted(diag)} but this OnlineLaplace "
                f"expects them for {sorted(self.diag_names)}"
            )
        named = dict(self.model.named_parameters())
        kron_blocks = [b for b in curv.blocks if not isinstance(b, DiagBlock)]
        for b in kron_blocks:
            for name, t in (("G", b.G), ("A", b.A), ("eigenvalues", b.eigenvalues)):
                if t is not None and not torch.isfinite(t).all():
                    raise ValueError(f"block {b.param_names}: factor {name} contains NaN or Inf")
        ekfac_ = self.curvature_type == "ekfac"
        if not self._blocks:
            self._blocks = [
                BlockSum(list(b.param_names), list(b.param_shapes), b.bias_joint, ekfac_)
                for b in kron_blocks
            ]
        layout_old = [(bs.param_names, bs.bias_joint) for bs in self._blocks]
        layout_new = [(list(b.param_names), b.bias_joint) for b in kron_blocks]
        if layout_old != layout_new:
            raise ValueError(
                f"the new curvature's blocks {layout_new} differ from the consolidated ones "
                f"{layout_old}; fit every task with the same modules= and separate_bias="
            )
        for bs, b in zip(self._blocks, kron_blocks):
            bs.fold(b, self.decay, self.max_terms)
        self._diag.fold(diag, self.decay, {n: named[n] for n in self.diag_names})

    # ------------------------------------------------------------------------- penalty
    def penalty(self, model: nn.Module | Mapping[str, Tensor] | None = None) -> Tensor:
        """``strength / 2 * (theta - theta*)^T (Lambda + delta I) (theta - theta*)``, differentiable.

        ``model``: the network (default: the one given at construction) or a dict of parameters
        by name (e.g. for :func:`torch.func.functional_call`). Computed per block in matrix form:
        for a KFAC term ``c tr(D^T G D A)`` with ``D = mat(theta - theta*)`` ``[d_out, d_in]``, for
        an EKFAC term ``c sum(E * (Q_G^T D Q_A)^2)``, for the diagonal ``sum F * D^2``. Zero before
        the first :meth:`consolidate`.
        """
        if model is None:
            model = self.model
        named = dict(model.named_parameters()) if isinstance(model, nn.Module) else dict(model)
        check_shapes(self.param_names, self.param_shapes, named, "the model")
        ref = named[self.param_names[0]]
        if self.num_tasks == 0:
            return ref.new_zeros(())
        diffs = {n: named[n] - self.anchor[n] for n in self.param_names}
        total = self._diag.quadratic({n: diffs[n] for n in self.diag_names}) + ref.new_zeros(())
        for bs in self._blocks:
            total = total + bs.quadratic(bs.params_to_mat([diffs[n] for n in bs.param_names]))
        if self.prior_precision > 0:
            total = total + self.prior_precision * sum((d * d).sum() for d in diffs.values())
        return 0.5 * self.strength * total

    # ------------------------------------------------------------------------- dense (tests)
    def to_dense(self) -> Tensor:
        """Dense precision ``Lambda + delta I`` ``[P, P]`` in :attr:`param_names` order (tests)."""
        if self.num_tasks == 0:
            raise ValueError("nothing consolidated yet")
        sizes = [s.numel() for s in self.param_shapes]
        P = sum(sizes)
        offsets = dict(zip(self.param_names, [sum(sizes[:i]) for i in range(len(sizes))]))
        ref = next(iter(self.anchor.values()))
        out = torch.zeros(P, P, dtype=ref.dtype, device=ref.device)
        for n in self.diag_names:
            idx = torch.arange(offsets[n], offsets[n] + self._diag.values[n].numel())
            out[idx, idx] = self._diag.values[n].flatten()
        for bs in self._blocks:
            idx = torch.cat(
                [
                    torch.arange(offsets[n], offsets[n] + s.numel())
                    for n, s in zip(bs.param_names, bs.param_shapes)
                ]
            )
            out[idx.unsqueeze(1), idx.unsqueeze(0)] = bs.to_dense()
        return out + self.prior_precision * torch.eye(P, dtype=out.dtype, device=out.device)

    # ------------------------------------------------------------------------- state and files
    def state_dict(self) -> dict:
        """Plain tensors, numbers, strings and lists (``torch.load(..., weights_only=True)``).

        A snapshot (copies) of the options (``modules`` as names), the anchor, the per-block terms
        (EKFAC with their eigenbases: eigenvectors of repeated eigenvalues are not unique) or the
        diagonal, and the MC generator state, so a resumed run continues bit for bit.
        """
        return {
            "format": ONLINE_FORMAT,
            "version": FILE_FORMATS[ONLINE_FORMAT],
            "curvature": self.curvature_type,
            "likelihood": self.likelihood,
            "fisher": self.fisher,
            "mc_samples": self.mc_samples,
            "strength": self.strength,
            "decay": self.decay,
            "max_terms": self.max_terms,
            "prior_precision": self.prior_precision,
            "separate_bias": self.separate_bias,
            "weight_sharing": self.weight_sharing,
            "modules": module_names(self.model, self.modules),
            "num_tasks": self.num_tasks,
            "task_sizes": list(self.task_sizes),
            "param_names": list(self.param_names),
            "param_shapes": [list(s) for s in self.param_shapes],
            "anchor": {n: t.clone() for n, t in self.anchor.items()},
            "blocks": [bs.state_dict() for bs in self._blocks],
            "diag": {n: t.clone() for n, t in self._diag.values.items()},
            "generator_state": None if self.generator is None else self.generator.get_state(),
        }

    def load_state_dict(self, state: Mapping) -> None:
        """Restore a :meth:`state_dict` (hyperparameters included) onto this object's model.

        Raises ``ValueError`` naming the problem, leaving this object unchanged, if the state was
        made with another curvature or likelihood, covers parameters that this object's model lacks
        or that have other shapes, holds NaN / Inf, or is malformed (a missing key, a wrong type or
        list length, blocks that do not fit the parameters).
        """
        self._load(state, _STATE_NAME)

    def save(self, path: str | os.PathLike) -> None:
        """Write :meth:`state_dict` to ``path`` atomically (see :func:`laplace_kron.io.save_file`)."""
        io.save_file(path, self.state_dict(), ONLINE_FORMAT)

    @classmethod
    def load(cls, path: str | os.PathLike, model: nn.Module, **kwargs) -> OnlineLaplace:
        """Read a file written by :meth:`save` onto ``model`` (``torch.load(weights_only=True)``).

        The object is constructed with the likelihood and options saved in the file; keyword
        arguments of the constructor (e.g. ``strength=``, ``generator=``) override them. Raises
        ``FileNotFoundError`` for a missing file and ``ValueError`` naming the file for a
        corrupted, truncated, poisoned (NaN / Inf) or foreign file or one that does not fit
        ``model``.
        """
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        name = os.fspath(path)
        state = io.load_file(name, ONLINE_FORMAT)
        options = {**saved_options(state, name), **kwargs}
        try:
            ol = cls(model, **options)
        except (ValueError, TypeError) as e:
            raise ValueError(f"{name!r} holds options this OnlineLaplace refuses: {e}") from e
        ol._load(state, name)
        for key in kwargs.keys() & _RESTORED:  # the caller's choice wins over the saved one
            setattr(ol, key, kwargs[key])
        return ol

    def _load(self, state: Mapping, name: str) -> None:
        """Validate everything first, then assign, so a refused state changes nothing."""
        new = read_state(state, name, self)
        self._blocks, self._diag = new.pop("blocks"), DiagSum(new.pop("diag"))
        gen_state = new.pop("generator_state")
        for key, value in new.items():  # fisher, strength, ..., anchor (setters check again)
            setattr(self, key, value)
        if gen_state is not None:
            if self.generator is None:
                self.generator = torch.Generator()
            self.generator.set_state(gen_state)
