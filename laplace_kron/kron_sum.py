"""The KFAC curvature of the union of two data sets from the curvatures fitted on each
(``fit(data, reset=False)``)."""

from __future__ import annotations

from collections.abc import Collection

from torch import Tensor

from .kron import Block, DiagBlock, KronCurvature

__all__ = ["add_curvatures"]


def add_curvatures(
    old: KronCurvature, new: KronCurvature, swapped: Collection[str] = ()
) -> KronCurvature:
    """The KFAC curvature of the union of two data sets from the curvatures of each: ``G`` and
    diagonal values add, ``A = (N_1 A_1 + N_2 A_2) / (N_1 + N_2)`` (a mean over data), losses
    and counts add. ``swapped``: names of weights stored ``[d_in, d_out]`` whose blocks hold the
    input factor in the ``G`` slot (:meth:`LayerSpec.standard_block`). Both must have the same
    blocks; EKFAC is refused (its eigenvalue corrections live in a basis that changes with the
    data: fit it on all data at once)."""
    if "ekfac" in (old.kind, new.kind):
        raise ValueError(
            "EKFAC curvatures cannot be accumulated over separate fits (the eigenbasis changes "
            "with the data): fit EKFAC on all the data at once, or use curvature='kfac'"
        )
    layout = [(type(b).__name__, b.param_names, b.bias_joint) for b in old.blocks]
    if layout != [(type(b).__name__, b.param_names, b.bias_joint) for b in new.blocks]:
        raise ValueError("the curvatures cover different blocks; fit with the same settings")
    if (old.likelihood, old.fisher) != (new.likelihood, new.fisher):
        raise ValueError("the curvatures differ in likelihood or Fisher type")
    n1, n2 = old.num_data, new.num_data

    def mean(f1: Tensor | None, f2: Tensor | None) -> Tensor | None:
        return None if f1 is None else (n1 * f1 + n2 * f2) / (n1 + n2)

    blocks: list[Block] = []
    for b1, b2 in zip(old.blocks, new.blocks, strict=True):
        if isinstance(b1, DiagBlock):
            blocks.append(DiagBlock(b1.values + b2.values, b1.param_names, b1.param_shapes))
            continue
        if b1.param_names[0] in swapped and b1.A is not None:
            G, A = mean(b1.G, b2.G), b1.A + b2.A
        else:
            G, A = b1.G + b2.G, mean(b1.A, b2.A)
        blocks.append(type(b1)(G, A, b1.param_names, b1.param_shapes, b1.bias_joint))
    return KronCurvature(
        blocks,
        list(old.param_names),
        n1 + n2,
        likelihood=old.likelihood,
        fisher=old.fisher,
        loss=old.loss + new.loss,
        sse=old.sse + new.sse,
        n_outputs=old.n_outputs,
        kind="kfac",
        n_observed=old.observed_targets + new.observed_targets,
    )
