"""Per-output sums of a regression fit with the exact Fisher, for per-output observation noise
(:mod:`laplace_kron.output_noise`).

The exact Gaussian Fisher backpropagates the vectors ``e_1 .. e_C`` (``sigma = 1``); vector ``c``
contributes ``G_c = sum_n g_{c,n} g_{c,n}^T`` to a layer's output factor, ``E_c`` to its EKFAC
eigenvalues and ``D_c`` to a diagonal block. The usual sums are ``sum_c`` of these, so keeping
them apart costs ``C`` times the output-side memory and no extra backward pass (diagonal blocks:
one per-example gradient call per output instead of one for all).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from ..kron import KronCurvature
from ..output_noise import OutputFactors
from .capture import LayerSpec
from .gram import mirror_

__all__ = ["OutputSums"]


class OutputSums:
    """``G_c`` per layer ``[C, d_out, d_out]``, ``E_c`` per block ``[C, d_out, d_in]`` (the
    block's standard orientation, output side first), ``D_c`` per diagonal-block parameter
    ``[C, *shape]`` and the per-output squared residuals ``sse [C]`` (float64)."""

    def __init__(
        self,
        n_outputs: int,
        specs: Sequence[LayerSpec],
        diag: Mapping[str, torch.Size],
        dtype: torch.dtype,
        device: torch.device,
    ):
        grouped = [s.name for s in specs if s.groups > 1]
        if grouped:
            raise ValueError(
                f"per-output noise (a tensor sigma_noise) is not supported with grouped "
                f"convolutions ({grouped}): give a scalar sigma_noise, or leave them out of "
                "modules=[...]"
            )
        C, kw = n_outputs, {"dtype": dtype, "device": device}
        self.n_outputs, self.specs = C, list(specs)
        self.G = [torch.zeros(C, s.d_out, s.d_out, **kw) for s in specs]
        self.E: list[list[Tensor] | None] = [None] * len(self.specs)
        self.D = [torch.zeros(C, *shape, **kw) for shape in diag.values()]
        self.diag_names = list(diag)
        self.sse = torch.zeros(C, dtype=torch.float64)

    def check_outputs(self, f: Tensor) -> None:
        """The model's output rows ``f [M, C]`` have the ``C`` outputs ``sigma_noise`` has."""
        if f.shape[1] != self.n_outputs:
            raise ValueError(
                f"sigma_noise has {self.n_outputs} values (one per output) but the model has "
                f"{f.shape[1]} outputs; give one noise level per output"
            )

    def add_sse(self, f: Tensor, y: Tensor, keep: Tensor | None) -> None:
        """Add ``sum_n (f_nc - y_nc)^2`` of the observed rows."""
        sq = (f.detach() - y) ** 2
        self.sse += (sq if keep is None else sq * keep).sum(0).to("cpu", torch.float64)

    def add_identity(self, li: int, rows: int) -> None:
        """A layer whose output is the network's: ``G_c += rows e_c e_c^T``."""
        c = torch.arange(self.n_outputs)
        self.G[li][c, c, c] += rows

    def add_E(self, li: int, j: int, k: int, sq: Tensor, n_blocks: int) -> None:
        """Add output ``k``'s squared projected gradients ``sq [d_out, d_in]`` to block ``j``."""
        if self.E[li] is None:
            self.E[li] = [None] * n_blocks
        e = self.E[li]
        if e[j] is None:
            e[j] = sq.new_zeros(self.n_outputs, *sq.shape)
        e[j][k] += sq

    def add_E_closed(self, li: int, j: int, Q: Tensor, r2: Tensor, n_blocks: int) -> None:
        """Output layer: ``E_c[i, j] = Q[c, i]^2 sum_n r_n[j]^2`` (``H_c = e_c e_c^T``), ``r2``
        the summed squared rotated inputs ``[d_in]``."""
        for k in range(self.n_outputs):
            self.add_E(li, j, k, torch.outer(Q[k].square(), r2), n_blocks)

    def add_D(self, k: int, sums: Mapping[str, Tensor]) -> None:
        """Add output ``k``'s squared per-example gradients (name -> parameter-shaped)."""
        for i, name in enumerate(self.diag_names):
            if name in sums:  # (the other parameters' sums come from another path)
                self.D[i][k] += sums[name]

    def mirror(self) -> None:
        """Complete the ``G_c`` from their accumulated lower block triangles (idempotent)."""
        for G in self.G:
            for g in G:
                mirror_(g)

    # ------------------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict:
        """The sums as lists of tensors (a checkpoint's ``"outputs"`` entry)."""
        self.mirror()
        E = [None if e is None else list(e) for e in self.E]
        return {"G": list(self.G), "E": E, "D": list(self.D), "sse": self.sse.clone()}

    def load(self, state: object, device: torch.device) -> None:
        """Restore :meth:`state_dict` in place (ValueError if it does not fit these sums)."""
        if not isinstance(state, Mapping) or set(state) != {"G", "E", "D", "sse"}:
            raise ValueError("the per-output sums are malformed")
        G, E, D, sse = state["G"], state["E"], state["D"], state["sse"]
        if [tuple(t.shape) for t in G] != [tuple(t.shape) for t in self.G] or len(E) != len(self.E):
            raise ValueError("the per-output sums do not match the covered layers / outputs")
        if [tuple(t.shape) for t in D] != [tuple(t.shape) for t in self.D]:
            raise ValueError("the per-output diagonal sums do not match the parameters")
        if not isinstance(sse, Tensor) or sse.shape != (self.n_outputs,):
            raise ValueError("the per-output sse does not match the outputs")
        self.G = [t.to(device) for t in G]
        self.E = [None if e is None else [t.to(device) for t in e] for e in E]
        self.D = [t.to(device) for t in D]
        self.sse = sse.to("cpu", torch.float64)

    # ------------------------------------------------------------------------- data parallel
    def kfac_tensors(self) -> list[Tensor]:
        """What the KFAC pass all-reduces (SUM): ``G_c``, ``D_c`` and ``sse``."""
        return [*self.G, *self.D, self.sse]

    def ekfac_tensors(self, bases: Sequence[Sequence]) -> list[Tensor]:
        """What the EKFAC pass all-reduces: ``E_c`` (zeros for a rank that saw no data)."""
        for li, layer in enumerate(bases):
            if self.E[li] is None:
                self.E[li] = [None] * len(layer)
            for j, b in enumerate(layer):
                if self.E[li][j] is None:
                    shape = (self.n_outputs, b.d_out, b.d_in)  # standard orientation
                    if self.specs[li].transposed and b.A is not None:
                        shape = (self.n_outputs, b.d_in, b.d_out)
                    self.E[li][j] = torch.zeros(shape, dtype=b.dtype, device=b.device)
        return [e for es in self.E for e in es]

    def factors(self, curv: KronCurvature) -> OutputFactors:
        """The :class:`~laplace_kron.output_noise.OutputFactors` of the fitted ``curv``."""
        self.mirror()
        by_block: dict[tuple[str, ...], tuple[Tensor, str]] = {}
        for li, spec in enumerate(self.specs):
            E = self.E[li]
            if spec.joint:
                names = [[spec.weight_name, spec.bias_name]]
            else:
                names = [[spec.weight_name]] if spec.has_weight else []
                names += [[spec.bias_name]] if spec.has_bias else []
            for j, ns in enumerate(names):
                weight_t = spec.transposed and ns == [spec.weight_name]
                if curv.kind == "ekfac":
                    by_block[tuple(ns)] = (E[j].mT if weight_t else E[j], "eigenvalues")
                else:
                    by_block[tuple(ns)] = (self.G[li], "A" if weight_t else "G")
        for name, D in zip(self.diag_names, self.D, strict=True):
            by_block[(name,)] = (D.reshape(self.n_outputs, -1, 1), "diag")
        pairs = [by_block[tuple(b.param_names)] for b in curv.blocks]
        return OutputFactors(curv, [p[0] for p in pairs], [p[1] for p in pairs], self.sse.clone())
