"""The curvature options: one frozen dataclass, validated once and passed through every layer."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..constants import EMBEDDING_BLOCKS, WEIGHT_SHARING
from .likelihoods import check_fisher

__all__ = ["CurvatureOptions"]


@dataclass(frozen=True)
class CurvatureOptions:
    """How the curvature is computed (shared by :func:`~laplace_kron.kfac`,
    :func:`~laplace_kron.ekfac`, :class:`~laplace_kron.curvature.CurvatureFitter`,
    :class:`~laplace_kron.KronLaplace` and the diagonal fitter).

    Args:
        fisher: ``"exact"`` (type-2: columns of the loss-Hessian square root), ``"mc"``
            (``mc_samples`` sampled labels) or ``"empirical"`` (observed labels).
        mc_samples: sampled labels per datum for ``fisher="mc"`` (a positive integer).
        weight_sharing: ``"expand"`` or ``"reduce"`` for layers with shared positions.
        separate_bias: one block for the weight and one for the bias instead of ``[W | b]``.
        modules: ``None`` (all layers), ``"last_layer"`` or a list of names / modules.
        generator: random generator for the MC Fisher (default: the fitter seeds one with 0, so
            fits are reproducible).
        distributed: ``None`` (all-reduce across ranks when ``torch.distributed`` is initialised
            with several ranks), ``True`` (require it) or ``False`` (rank-local fit).
        target_key: the key of the targets in a mapping batch (a dict, ``UserDict`` or Hugging
            Face ``BatchEncoding``); the other entries are the model's inputs.
        ignore_index: target value that marks positions without a target (classification and
            binary): they add nothing to the curvature, the log-likelihood or any count.
        shift_labels: align the outputs at position ``t`` with the targets at ``t + 1``
            (``f[:, :-1]`` with ``y[:, 1:]``), as a causal language model's loss does.
        embeddings: the block of an ``nn.Embedding`` weight: ``"kron"`` (a Kronecker block
            whose input factor is the diagonal of token counts; with ``weight_sharing="expand"``
            only, else ``"diag"``) or ``"diag"`` (the exact GGN diagonal).

    See :mod:`laplace_kron.curvature.batches` for how batches, outputs, targets and padding
    (``attention_mask``) are read.
    """

    fisher: str = "mc"
    mc_samples: int = 1
    weight_sharing: str = "expand"
    separate_bias: bool = False
    modules: None | str | Sequence[str | nn.Module] = None
    generator: torch.Generator | None = None
    distributed: bool | None = None
    target_key: str = "labels"
    ignore_index: int = -100
    shift_labels: bool = False
    embeddings: str = "kron"

    def __post_init__(self) -> None:
        check_fisher(self.fisher, self.mc_samples)
        if self.weight_sharing not in WEIGHT_SHARING:
            raise ValueError(
                f"weight_sharing must be one of {WEIGHT_SHARING}, got {self.weight_sharing!r}"
            )
        if self.distributed not in (None, True, False):
            raise TypeError(f"distributed must be None, True or False, got {self.distributed!r}")
        if self.generator is not None and not isinstance(self.generator, torch.Generator):
            raise TypeError(
                f"generator must be a torch.Generator or None, got {type(self.generator).__name__}"
            )
        if not isinstance(self.target_key, str):
            raise TypeError(f"target_key must be a string, got {type(self.target_key).__name__}")
        if isinstance(self.ignore_index, bool) or not isinstance(self.ignore_index, int):
            raise TypeError(f"ignore_index must be an int, got {self.ignore_index!r}")
        if not isinstance(self.shift_labels, bool):
            raise TypeError(f"shift_labels must be True or False, got {self.shift_labels!r}")
        if self.embeddings not in EMBEDDING_BLOCKS:
            raise ValueError(
                f"embeddings must be one of {EMBEDDING_BLOCKS}, got {self.embeddings!r}"
            )

    @property
    def kron_embeddings(self) -> bool:
        """Whether ``nn.Embedding`` weights get Kronecker blocks: KFAC-reduce would make their
        input factor a dense ``[V, V]`` matrix, so only with ``weight_sharing="expand"``."""
        return self.embeddings == "kron" and self.weight_sharing == "expand"

    @classmethod
    def names(cls) -> tuple[str, ...]:
        """The option names, in declaration order."""
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_kwargs(cls, **options: Any) -> CurvatureOptions:
        """Options from keyword arguments; an unknown name is a ``TypeError`` listing the valid
        ones (a misspelt option is never silently ignored)."""
        cls._check_names(options)
        return cls(**options)

    def replace(self, **changes: Any) -> CurvatureOptions:
        """A copy with some options changed (validated like :meth:`from_kwargs`)."""
        self._check_names(changes)
        return dataclasses.replace(self, **changes)

    @classmethod
    def _check_names(cls, options: dict[str, Any]) -> None:
        unknown = sorted(set(options) - set(cls.names()))
        if unknown:
            raise TypeError(
                f"unknown curvature option(s) {', '.join(map(repr, unknown))}; valid options: "
                f"{', '.join(cls.names())}"
            )
