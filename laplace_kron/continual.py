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

import math
import numbers
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .curvature import ekfac, kfac
from .curvature.capture import select_layers
from .curvature.diag import fit_diagonal
from .curvature.likelihoods import (
    check_fisher,
    check_likelihood,
)
from .curvature.options import CurvatureOptions
from .kron import Eigen, KronBlock, KronCurvature

__all__ = ["OnlineLaplace", "CURVATURES"]

CURVATURES = ("kfac", "ekfac", "diag")
_STATE_FORMAT = "laplace_kron.OnlineLaplace"
_STATE_VERSION = 1


@dataclass
class _Term:
    """One Kronecker term ``coef * K`` of a block's precision (``K``: KFAC or EKFAC block)."""

    coef: float
    block: KronBlock


@dataclass
class _BlockSum:
    """Precision of one parameter block: ``sum_k coef_k * (G_k (x) A_k)`` (or EKFAC terms)."""

    param_names: list[str]
    param_shapes: list[torch.Size]
    bias_joint: bool
    terms: list[_Term] = field(default_factory=list)
    _stack: tuple | None = field(default=None, repr=False)

    def invalidate(self) -> None:
        self._stack = None

    def stacked(self, ekfac: bool) -> tuple:
        """Batched factors for the penalty (cached until the terms change).

        KFAC: ``(coefs [T], G [T, o, o], A [T, i, i] or None)``.
        EKFAC: ``(Q_G^T [T, o, o], Q_A [T, i, i], coef * E [T, o, i])``.
        """
        if self._stack is None:
            blocks = [t.block for t in self.terms]
            if ekfac:
                self._stack = (
                    torch.stack([b.eig_G.vectors.T for b in blocks]).contiguous(),
                    torch.stack([b.eig_A.vectors for b in blocks]),
                    torch.stack([t.coef * t.block.eigvals() for t in self.terms]),
                )
            else:
                coefs = torch.tensor([t.coef for t in self.terms], dtype=blocks[0].dtype)
                A = None if blocks[0].A is None else torch.stack([b.A for b in blocks])
                self._stack = (coefs.to(blocks[0].device), torch.stack([b.G for b in blocks]), A)
        return self._stack


def _merge_terms(terms: Sequence[_Term], ekfac: bool) -> _Term:
    """Merge ``sum_k c_k G_k (x) A_k`` into one Kronecker term (Ritter et al. style).

    KFAC: ``(sum_k c_k G_k) (x) (sum_k w_k A_k)`` with ``w_k = c_k tr(G_k) / sum_j c_j tr(G_j)``.
    This is the Kronecker product of the summed factors, normalised so that it is exact whenever
    all ``A_k`` (or, up to scale, all ``G_k``) coincide, and so that the trace is preserved
    (``A`` is an average over data, ``G`` a sum, see :mod:`laplace_kron.curvature.kfac`).

    EKFAC: the merged factors above give a new eigenbasis ``Q_G (x) Q_A``; the eigenvalues are the
    diagonal of the exact sum in that basis, ``E[i, j] = sum_k c_k (R_G,k^2 E_k R_A,k^2^T)[i, j]``
    with ``R_k = Q^T Q_k``, the Frobenius-closest matrix diagonal in the new basis (trace-exact).
    """
    blocks = [t.block for t in terms]
    first = blocks[0]
    G = sum(t.coef * t.block.G for t in terms)
    A = None
    if first.A is not None:
        tr = torch.stack([t.coef * t.block.G.diagonal().sum() for t in terms])
        w = tr / tr.sum() if float(tr.sum()) > 0 else torch.full_like(tr, 1.0 / len(terms))
        A = sum(wk * b.A for wk, b in zip(w, blocks))
    merged = KronBlock(G, A, list(first.param_names), list(first.param_shapes), first.bias_joint)
    if ekfac:
        QG, QA = merged.eig_G.vectors, merged.eig_A.vectors
        E = torch.zeros(merged.d_out, merged.d_in, dtype=G.dtype, device=G.device)
        for t in terms:
            RG = (QG.T @ t.block.eig_G.vectors) ** 2
            RA = (QA.T @ t.block.eig_A.vectors) ** 2
            E = E + t.coef * (RG @ t.block.eigvals() @ RA.T)
        merged = merged.with_eigenvalues(E)
    return _Term(1.0, merged)


def _check_number(name: str, value: object, low: float, high: float = math.inf) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if not low <= value <= high:
        raise ValueError(f"{name} must lie in [{low}, {high}], got {value!r}")
    return float(value)


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

    Args:
        model: the network; the same object (or one with identical parameter names and shapes) is
            trained on every task.
        likelihood: ``"classification"``, ``"regression"`` or ``"binary"``.
        curvature: ``"kfac"`` / ``"ekfac"`` (per-layer Kronecker blocks, Ritter et al. 2018) or
            ``"diag"`` (diagonal Fisher/GGN: EWC).
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

    **Representation of the sum.** ``sum_t c_t G_t (x) A_t`` is not a Kronecker product. We keep
    it exactly as a list of per-task terms per block, so the penalty is exact for the chosen
    curvature; its cost (memory and one pair of small GEMMs per term and block and step, batched)
    grows linearly with the number of tasks. With ``max_terms`` the two oldest terms are merged
    into one Kronecker product of summed factors, ``(sum c G) (x) (sum w A)`` with trace weights
    ``w`` (Ritter et al. 2018 approximate the online sum by summing factors), which is exact when
    the tasks share the input factor and preserves the trace; EKFAC terms are re-diagonalised in
    the merged basis. Keeping the recent tasks exact and merging only old ones is a middle ground.
    The diagonal curvature is summed exactly.

    **Before the first** :meth:`consolidate` the penalty is zero (a tensor), so one training loop
    serves every task; :attr:`num_tasks` tells whether anything was consolidated.
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
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        check_likelihood(likelihood)
        check_fisher(fisher, mc_samples)
        if curvature not in CURVATURES:
            raise ValueError(f"curvature must be one of {CURVATURES}, got {curvature!r}")
        if max_terms is not None and (
            isinstance(max_terms, bool) or not isinstance(max_terms, int) or max_terms < 1
        ):
            raise ValueError(f"max_terms must be None or a positive integer, got {max_terms!r}")
        self.model = model
        self.likelihood = likelihood
        self.curvature = curvature
        self.fisher = fisher
        self.mc_samples = mc_samples
        self.strength = strength
        self.decay = decay
        self.max_terms = max_terms
        self.prior_precision = prior_precision
        self.separate_bias = separate_bias
        self.weight_sharing = weight_sharing
        self.modules = modules
        if generator is None and fisher == "mc":
            generator = torch.Generator().manual_seed(0)
        self.generator = generator
        specs = select_layers(model, modules, separate_bias)
        covered = {n for s in specs for n in (s.weight_name, s.bias_name) if n}
        named = dict(model.named_parameters())
        self.param_names: list[str] = [n for n in named if n in covered]
        self.param_shapes: list[torch.Size] = [named[n].shape for n in self.param_names]
        self.num_tasks = 0
        self.task_sizes: list[int] = []
        self.anchor: dict[str, Tensor] = {}
        self._blocks: list[_BlockSum] = []
        self._diag: dict[str, Tensor] = {}

    # ------------------------------------------------------------------------- hyperparameters
    @property
    def strength(self) -> float:
        return self._strength

    @strength.setter
    def strength(self, value: float) -> None:
        self._strength = _check_number("strength", value, 0.0)

    @property
    def decay(self) -> float:
        return self._decay

    @decay.setter
    def decay(self, value: float) -> None:
        value = _check_number("decay", value, 0.0, 1.0)
        if value == 0:
            raise ValueError("decay must lie in (0, 1] (1 = no forgetting), got 0")
        self._decay = value

    @property
    def prior_precision(self) -> float:
        return self._prior_precision

    @prior_precision.setter
    def prior_precision(self, value: float) -> None:
        self._prior_precision = _check_number("prior_precision", value, 0.0)

    @property
    def n_terms(self) -> int:
        """Kronecker terms per block (0 for the diagonal curvature or before consolidating)."""
        return len(self._blocks[0].terms) if self._blocks else 0

    def __repr__(self) -> str:
        return (
            f"OnlineLaplace(curvature={self.curvature!r}, likelihood={self.likelihood!r}, "
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
        if self.curvature == "diag":
            diag, n = self._fit_diag(data, progress)
            self.consolidate_curvature(diag, num_data=n)
            return
        fit = kfac if self.curvature == "kfac" else ekfac
        curv = fit(
            self.model,
            data,
            self.likelihood,
            fisher=self.fisher,
            mc_samples=self.mc_samples,
            weight_sharing=self.weight_sharing,
            separate_bias=self.separate_bias,
            modules=self.modules,
            progress=progress,
            generator=self.generator,
        )
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
        self._check_params(named, "the model")
        if self.curvature == "diag":
            if not isinstance(curv, Mapping):
                raise TypeError(
                    "curvature='diag' expects a dict mapping parameter names to diagonals"
                )
            self._fold_diag(curv)
            n = num_data
        else:
            if not isinstance(curv, KronCurvature):
                raise TypeError(
                    f"curvature={self.curvature!r} expects a KronCurvature, got {type(curv).__name__}"
                )
            if (curv.kind == "ekfac") != (self.curvature == "ekfac"):
                raise ValueError(
                    f"a {curv.kind!r} curvature cannot be folded into an OnlineLaplace with "
                    f"curvature={self.curvature!r}"
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
        for b in curv.blocks:
            for name, t in (("G", b.G), ("A", b.A), ("eigenvalues", b.eigenvalues)):
                if t is not None and not torch.isfinite(t).all():
                    raise ValueError(f"block {b.param_names}: factor {name} contains NaN or Inf")
        if not self._blocks:
            self._blocks = [
                _BlockSum(list(b.param_names), list(b.param_shapes), b.bias_joint)
                for b in curv.blocks
            ]
        layout_old = [(bs.param_names, bs.bias_joint) for bs in self._blocks]
        layout_new = [(list(b.param_names), b.bias_joint) for b in curv.blocks]
        if layout_old != layout_new:
            raise ValueError(
                f"the new curvature's blocks {layout_new} differ from the consolidated ones "
                f"{layout_old}; fit every task with the same modules= and separate_bias="
            )
        ekfac_ = self.curvature == "ekfac"
        for bs, b in zip(self._blocks, curv.blocks):
            for t in bs.terms:
                t.coef *= self.decay
            bs.terms.append(_Term(1.0, b))
            if self.max_terms is not None:
                while len(bs.terms) > self.max_terms:
                    bs.terms[:2] = [_merge_terms(bs.terms[:2], ekfac_)]
            bs.invalidate()

    def _fold_diag(self, diag: Mapping[str, Tensor]) -> None:
        named = dict(self.model.named_parameters())
        missing = [n for n in self.param_names if n not in diag]
        if missing:
            raise ValueError(f"the diagonal curvature lacks parameters {missing}")
        for n in self.param_names:
            d = diag[n].detach()
            if d.shape != named[n].shape:
                raise ValueError(
                    f"diagonal for {n!r} has shape {tuple(d.shape)}, the parameter "
                    f"{tuple(named[n].shape)}"
                )
            if not torch.isfinite(d).all():
                raise ValueError(f"diagonal curvature of {n!r} contains NaN or Inf")
            old = self._diag.get(n)
            self._diag[n] = d.clone() if old is None else self.decay * old + d

    def _fit_diag(self, data: Iterable, progress: bool = False) -> tuple[dict[str, Tensor], int]:
        """Diagonal GGN / Fisher of ``data`` (:func:`~laplace_kron.curvature.diag.fit_diagonal`)."""
        options = CurvatureOptions(
            fisher=self.fisher,
            mc_samples=self.mc_samples,
            separate_bias=self.separate_bias,
            modules=self.modules,
            generator=self.generator,
        )
        return fit_diagonal(self.model, data, self.likelihood, options, progress)

    # ------------------------------------------------------------------------- penalty
    def _check_params(self, named: Mapping[str, Tensor], what: str) -> None:
        missing = [n for n in self.param_names if n not in named]
        if missing:
            raise ValueError(f"{what} has no parameters {missing}; is it the consolidated model?")
        bad = [
            f"{n}: {tuple(named[n].shape)} vs {tuple(s)}"
            for n, s in zip(self.param_names, self.param_shapes)
            if named[n].shape != s
        ]
        if bad:
            raise ValueError(f"{what}'s parameter shapes differ from the consolidated ones: {bad}")

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
        self._check_params(named, "the model")
        ref = named[self.param_names[0]]
        if self.num_tasks == 0:
            return ref.new_zeros(())
        diffs = {n: named[n] - self.anchor[n] for n in self.param_names}
        total = ref.new_zeros(())
        if self.curvature == "diag":
            for n, d in diffs.items():
                total = total + (self._diag[n] * d * d).sum()
        else:
            for bs in self._blocks:
                D = _params_to_mat(bs, [diffs[n] for n in bs.param_names])
                total = total + self._block_quadratic(bs, D)
        if self.prior_precision > 0:
            total = total + self.prior_precision * sum((d * d).sum() for d in diffs.values())
        return 0.5 * self.strength * total

    def _block_quadratic(self, bs: _BlockSum, D: Tensor) -> Tensor:
        """``vec(D)^T (sum_k c_k K_k) vec(D)`` for ``D [d_out, d_in]``, batched over terms."""
        if self.curvature == "ekfac":
            QGt, QA, E = bs.stacked(ekfac=True)
            rot = QGt @ D @ QA  # [T, o, i]
            return (E * rot * rot).sum()
        coefs, G, A = bs.stacked(ekfac=False)
        GD = G @ D  # [T, o, i]
        if A is not None:
            GD = GD @ A
        return (coefs[:, None, None] * GD * D).sum()

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
        if self.curvature == "diag":
            out += torch.diag(torch.cat([self._diag[n].flatten() for n in self.param_names]))
        else:
            for bs in self._blocks:
                idx = torch.cat(
                    [
                        torch.arange(offsets[n], offsets[n] + s.numel())
                        for n, s in zip(bs.param_names, bs.param_shapes)
                    ]
                )
                dense = sum(t.coef * t.block.to_dense() for t in bs.terms)
                out[idx.unsqueeze(1), idx.unsqueeze(0)] = dense
        return out + self.prior_precision * torch.eye(P, dtype=out.dtype, device=out.device)

    # ------------------------------------------------------------------------- state
    def state_dict(self) -> dict:
        """Plain tensors, numbers, strings and lists (``torch.load(..., weights_only=True)``)."""
        blocks = []
        for bs in self._blocks:
            entry: dict = {
                "param_names": list(bs.param_names),
                "bias_joint": bs.bias_joint,
                "coefs": [t.coef for t in bs.terms],
                "G": [t.block.G for t in bs.terms],
                "A": [t.block.A for t in bs.terms],
            }
            if self.curvature == "ekfac":
                # Store the eigenbases: eigenvectors of repeated eigenvalues are not unique.
                entry["eigenvalues"] = [t.block.eigenvalues for t in bs.terms]
                entry["eig_G_values"] = [t.block.eig_G.values for t in bs.terms]
                entry["eig_G_vectors"] = [t.block.eig_G.vectors for t in bs.terms]
                entry["eig_A_values"] = [t.block.eig_A.values for t in bs.terms]
                entry["eig_A_vectors"] = [t.block.eig_A.vectors for t in bs.terms]
            blocks.append(entry)
        return {
            "format": _STATE_FORMAT,
            "version": _STATE_VERSION,
            "curvature": self.curvature,
            "likelihood": self.likelihood,
            "fisher": self.fisher,
            "mc_samples": self.mc_samples,
            "strength": self.strength,
            "decay": self.decay,
            "max_terms": self.max_terms,
            "prior_precision": self.prior_precision,
            "num_tasks": self.num_tasks,
            "task_sizes": list(self.task_sizes),
            "param_names": list(self.param_names),
            "param_shapes": [list(s) for s in self.param_shapes],
            "anchor": {n: t for n, t in self.anchor.items()},
            "blocks": blocks,
            "diag": dict(self._diag),
            "generator_state": None if self.generator is None else self.generator.get_state(),
        }

    def load_state_dict(self, state: Mapping) -> None:
        """Restore a :meth:`state_dict` (hyperparameters included) onto this object's model.

        Fails if the state was made with another curvature or likelihood, or covers parameters
        that this object's model lacks or that have other shapes.
        """
        if not isinstance(state, Mapping) or state.get("format") != _STATE_FORMAT:
            raise ValueError("not an OnlineLaplace state_dict (missing format marker)")
        if state.get("version") != _STATE_VERSION:
            raise ValueError(f"unsupported state version {state.get('version')!r}")
        for key in ("curvature", "likelihood"):
            if state[key] != getattr(self, key):
                raise ValueError(
                    f"state has {key}={state[key]!r} but this OnlineLaplace has "
                    f"{key}={getattr(self, key)!r}; construct it with the same {key}"
                )
        names = list(state["param_names"])
        shapes = [torch.Size(s) for s in state["param_shapes"]]
        if names != self.param_names:
            raise ValueError(
                f"state covers parameters {names} but this OnlineLaplace covers "
                f"{self.param_names}; use the same model and modules="
            )
        named = dict(self.model.named_parameters())
        bad = [
            f"{n}: state {tuple(s)} vs model {tuple(named[n].shape)}"
            for n, s in zip(names, shapes)
            if named[n].shape != s
        ]
        if bad:
            raise ValueError(f"state does not match the model's parameter shapes: {bad}")
        ref = named[names[0]]
        dev, dt = ref.device, ref.dtype

        def cast(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.to(device=dev, dtype=dt)

        blocks = []
        for entry in state["blocks"]:
            bshapes = [named[n].shape for n in entry["param_names"]]
            bs = _BlockSum(list(entry["param_names"]), bshapes, bool(entry["bias_joint"]))
            for k, coef in enumerate(entry["coefs"]):
                blk = KronBlock(
                    cast(entry["G"][k]),
                    cast(entry["A"][k]),
                    list(entry["param_names"]),
                    bshapes,
                    bool(entry["bias_joint"]),
                )
                if self.curvature == "ekfac":
                    blk = KronBlock(
                        blk.G,
                        blk.A,
                        blk.param_names,
                        blk.param_shapes,
                        blk.bias_joint,
                        cast(entry["eigenvalues"][k]),
                        Eigen(cast(entry["eig_G_values"][k]), cast(entry["eig_G_vectors"][k])),
                        Eigen(cast(entry["eig_A_values"][k]), cast(entry["eig_A_vectors"][k])),
                    )
                bs.terms.append(_Term(float(coef), blk))
            blocks.append(bs)
        self.fisher = state["fisher"]
        self.mc_samples = int(state["mc_samples"])
        self.strength = float(state["strength"])
        self.decay = float(state["decay"])
        self.max_terms = state["max_terms"]
        self.prior_precision = float(state["prior_precision"])
        self.num_tasks = int(state["num_tasks"])
        self.task_sizes = [int(s) for s in state["task_sizes"]]
        self.anchor = {n: cast(state["anchor"][n]) for n in names}
        self._blocks = blocks
        self._diag = {n: cast(t) for n, t in state["diag"].items()}
        gen_state = state.get("generator_state")
        if gen_state is not None:
            if self.generator is None:
                self.generator = torch.Generator()
            self.generator.set_state(gen_state)


def _params_to_mat(bs: _BlockSum, params: list[Tensor]) -> Tensor:
    """Parameter tensors of a block -> ``[d_out, d_in]`` (as :meth:`KronBlock.params_to_mat`)."""
    return bs.terms[0].block.params_to_mat(params)
