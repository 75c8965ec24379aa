"""The state of a curvature fit, as one object: what the passes accumulate, where they stand, how
it is saved and restored (checkpoints), summed across data-parallel ranks and turned into blocks.

Every accumulated quantity is a sum over data, so the state of the union of disjoint shards is the
sum of the shards' states:

    A_sum = sum_n a_n a_n^T (1/T per position for KFAC-expand),   G_sum = sum_{k,n} g g^T,
    E_sum = sum_{k,n} (Q_G^T grad Q_A)^2,   num_data = N,   loss = sum_n nll_n,   sse,
    n_observed = number of observed scalar targets (ignore_index and padding excluded),
    D_sum = sum_{k,n} grad^2   (the diagonal blocks' parameters, :mod:`.diagonal`),

and the KFAC factors are ``A = A_sum / N`` and ``G = G_sum``; a diagonal block is ``D_sum``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from .. import distributed as dist_utils
from ..io import reading
from ..kron import DiagBlock, KronBlock, KronCurvature
from ..kron_groups import make_block
from .batches import fingerprint
from .capture import LayerSpec
from .gram import mirror_
from .per_output import OutputSums

__all__ = ["FitState", "PASSES"]

# The passes of a fit, in order (an EKFAC fit runs both).
PASSES = ("kfac", "ekfac")


class FitState:
    """Accumulated factor sums, counts, random-stream state and pass position of one fit.

    Attributes:
        A_sum, G_sum: per covered layer, ``[d_in (+1), d_in (+1)]`` and ``[d_out, d_out]`` sums
            (``None`` until the layer saw data; ``A_sum`` stays ``None`` for a bias-only layer;
            an embedding's ``A_sum`` is the diagonal ``[V]`` of token counts, :mod:`.embedding`).
            Wide factors hold only their lower block triangle until :meth:`mirror`.
        E_sum: per layer, one ``[d_out, d_in]`` EKFAC eigenvalue sum per block (second pass).
        num_data, loss, sse, n_outputs: data count (input examples), summed NLL, summed squared
            residuals (regression, ``sigma = 1``) and the number of outputs ``C`` per position.
        n_observed: observed scalar targets (the Gaussian evidence's count: ``N C`` without
            positions, ignored targets or padding).
        pass_name, next_batch, pass_data: the pass under way, the index of its next batch and the
            data points it has consumed (what a checkpoint resumes from).
        generator: the random stream of the MC Fisher (this rank's, when distributed).
        per_output, outputs: ``C`` and the per-output sums (:class:`.per_output.OutputSums`) when
            they are kept (per-output regression noise), else ``None``.
        distributed: whether the fit all-reduces across ranks.
    """

    def __init__(
        self,
        specs: Sequence[LayerSpec],
        dtype: torch.dtype,
        device: torch.device,
        generator: torch.Generator | None = None,
        distributed: bool = False,
        diag: Mapping[str, torch.Size] | None = None,
    ):
        self.specs = list(specs)
        self.diag = dict(diag or {})
        self.dtype, self.device = dtype, device
        self.generator = generator
        self.distributed = distributed
        # C when per-output sums are kept (per-output regression noise), else None.
        self.per_output: int | None = None
        self.reset()

    def reset(self) -> None:
        """Forget everything accumulated (the random stream is kept)."""
        n = len(self.specs)
        self.A_sum: list[Tensor | None] = [None] * n
        self.G_sum: list[Tensor | None] = [None] * n
        self.E_sum: list[list[Tensor] | None] = [None] * n
        self.D_sum: list[Tensor | None] = [None] * len(self.diag)
        self.outputs = None
        if self.per_output:
            args = (self.specs, self.diag, self.dtype, self.device)
            self.outputs = OutputSums(self.per_output, *args)
        self.num_data = 0
        self.loss = 0.0
        self.sse = 0.0
        self.n_outputs = 0
        self.n_observed = 0
        self.pass_name = "kfac"
        self.next_batch = 0
        self.pass_data = 0
        self.last_batch: tuple[Any, Any] | None = None
        self.resume_fingerprint: list[float] | None = None

    # ------------------------------------------------------------------------- bookkeeping
    def start_pass(self, pass_name: str) -> None:
        """Begin ``pass_name`` at its first batch."""
        self.pass_name, self.next_batch = pass_name, 0
        self.pass_data, self.last_batch = 0, None

    def record_batch(self, x: Any, y: Any, n: int, index: int) -> None:
        """Batch ``index`` with ``n`` data points was accumulated (kept by reference for the
        resume fingerprint)."""
        self.pass_data += n
        self.last_batch = (x, y)
        self.next_batch = index + 1

    def mirror(self) -> None:
        """Complete the factor sums from their accumulated lower block triangles (idempotent)."""
        for t in self.A_sum + self.G_sum:
            # an embedding's A_sum is a diagonal [V]; grouped [g, d, d] sums are accumulated whole
            if t is not None and t.ndim == 2:
                mirror_(t)
        if self.outputs is not None:
            self.outputs.mirror()

    # ------------------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Tensors and plain data of everything needed to resume the fit exactly."""
        self.mirror()
        return {
            "pass": self.pass_name,
            "next_batch": self.next_batch,
            "pass_data": self.pass_data,
            "fingerprint": None if self.last_batch is None else fingerprint(*self.last_batch),
            "A_sum": list(self.A_sum),
            "G_sum": list(self.G_sum),
            "E_sum": [None if e is None else list(e) for e in self.E_sum],
            "D_sum": list(self.D_sum),
            "num_data": self.num_data,
            "loss": self.loss,
            "sse": self.sse,
            "n_outputs": self.n_outputs,
            "n_observed": self.n_observed,
            "outputs": None if self.outputs is None else self.outputs.state_dict(),
            "generator_state": None if self.generator is None else self.generator.get_state(),
        }

    def load_state_dict(self, state: Mapping[str, Any], device: torch.device | None = None) -> None:
        """Restore a :meth:`state_dict` (tensors moved to ``device``, default this state's).

        Anything malformed (missing keys, wrong types, lists of the wrong length, factor sums of
        the wrong shape) is a ``ValueError``; the state is then reset.
        """
        dev = self.device if device is None else device
        try:
            with reading("the fit state"):
                self._load(state, dev)
        except ValueError:
            self.reset()
            raise

    def _load(self, state: Mapping[str, Any], dev: torch.device) -> None:
        n = len(self.specs)
        if state["pass"] not in PASSES:
            raise ValueError(f"unknown pass {state['pass']!r}")
        for key in ("A_sum", "G_sum", "E_sum"):
            if not isinstance(state[key], (list, tuple)) or len(state[key]) != n:
                raise ValueError(f"{key} must be a list of {n} entries (one per covered layer)")
        A = [_tensor(t, dev, "A_sum", a_shape(s)) for t, s in zip(state["A_sum"], self.specs)]
        G = [
            _tensor(t, dev, "G_sum", s.factor_shape(s.d_out))
            for t, s in zip(state["G_sum"], self.specs)
        ]
        E = [None if e is None else [_tensor(t, dev, "E_sum") for t in e] for e in state["E_sum"]]
        D = self._load_diag(state.get("D_sum", [] if not self.diag else None), dev)
        fp = state["fingerprint"]
        if fp is not None and not all(isinstance(v, float) for v in fp):
            raise ValueError("the batch fingerprint must be a list of floats")
        counts = {
            k: _count(state[k], k) for k in ("next_batch", "pass_data", "num_data", "n_outputs")
        }
        # Checkpoints written before n_observed existed: one observed target per output.
        n_obs = state.get("n_observed", counts["num_data"] * counts["n_outputs"])
        n_obs = _count(n_obs, "n_observed")
        loss, sse = float(state["loss"]), float(state["sse"])
        outputs = state.get("outputs")  # absent in checkpoints of earlier versions
        if (outputs is None) != (self.outputs is None):
            raise ValueError(
                "the checkpoint and this fit differ in keeping per-output sums (a sigma_noise "
                "tensor): resume with the same sigma_noise shape or delete the checkpoint"
            )
        if self.outputs is not None:
            self.outputs.load(outputs, dev)
        gen_state = state["generator_state"]
        if self.generator is not None:
            if not isinstance(gen_state, Tensor):
                raise ValueError("no generator state")
            self.generator.set_state(gen_state)
        self.pass_name, self.next_batch = state["pass"], counts["next_batch"]
        self.pass_data, self.num_data = counts["pass_data"], counts["num_data"]
        self.A_sum, self.G_sum, self.E_sum, self.D_sum = A, G, E, D
        self.loss, self.sse, self.n_outputs = loss, sse, counts["n_outputs"]
        self.n_observed = n_obs
        self.last_batch, self.resume_fingerprint = None, fp

    def _load_diag(self, sums: object, dev: torch.device) -> list[Tensor | None]:
        """The diagonal sums of a state: one tensor (or None) per diagonal-block parameter."""
        if not isinstance(sums, (list, tuple)) or len(sums) != len(self.diag):
            raise ValueError(
                f"D_sum must be a list of {len(self.diag)} entries (one per diagonal-block "
                f"parameter: {list(self.diag)})"
            )
        return [_tensor(t, dev, "D_sum", tuple(s)) for t, s in zip(sums, self.diag.values())]

    def add_diag(self, sums: Mapping[str, Tensor]) -> None:
        """Add one batch's squared per-example gradients (name -> tensor shaped like the
        parameter, for some or all of the diagonal-block parameters) to ``D_sum``."""
        for i, name in enumerate(self.diag):
            if name not in sums:  # parameters whose sums come from another path
                continue
            d = self.D_sum[i]
            self.D_sum[i] = sums[name].clone() if d is None else d.add_(sums[name])

    def diag_blocks(self) -> list[DiagBlock]:
        """One :class:`~laplace_kron.kron.DiagBlock` per diagonal-block parameter (``H = D_sum``)."""
        out = []
        for (name, shape), d in zip(self.diag.items(), self.D_sum, strict=True):
            if d is None:
                d = torch.zeros(shape, dtype=self.dtype, device=self.device)
            if not torch.isfinite(d).all():
                raise ValueError(
                    f"parameter {name!r}: its diagonal curvature contains NaN or Inf (overflow in "
                    "the activations or gradients); check the inputs' scale"
                )
            out.append(DiagBlock(d, [name], [shape]))
        return out

    # ------------------------------------------------------------------------- data parallel
    def all_reduce_kfac(self) -> None:
        """Sum ``A_sum``, ``G_sum``, ``N``, loss and sse over ranks (ranks without data add zeros;
        ``n_outputs`` is the maximum); nothing for a rank-local fit."""
        if not self.distributed:
            return
        kw = {"dtype": self.dtype, "device": self.device}
        for li, spec in enumerate(self.specs):
            if spec.has_weight and self.A_sum[li] is None:
                self.A_sum[li] = torch.zeros(a_shape(spec), **kw)
            if self.G_sum[li] is None:
                self.G_sum[li] = torch.zeros(spec.factor_shape(spec.d_out), **kw)
        for i, shape in enumerate(self.diag.values()):
            if self.D_sum[i] is None:
                self.D_sum[i] = torch.zeros(shape, **kw)
        n_out = torch.tensor([float(self.n_outputs)], dtype=torch.float64)
        dist_utils.all_reduce_max_([n_out])
        scalars = torch.tensor(
            [self.num_data, self.loss, self.sse, self.n_observed], dtype=torch.float64
        )
        factors = [t for t in self.A_sum if t is not None] + list(self.G_sum) + list(self.D_sum)
        if self.outputs is not None:
            factors += self.outputs.kfac_tensors()
        dist_utils.all_reduce_sum_([*factors, scalars])
        self.n_outputs = int(n_out.item())
        self.num_data = int(round(scalars[0].item()))
        self.loss, self.sse = scalars[1].item(), scalars[2].item()
        self.n_observed = int(round(scalars[3].item()))

    def all_reduce_ekfac(self, bases: list[list[KronBlock]]) -> None:
        """Sum ``E_sum`` over ranks and check the second pass saw the same ``N`` as the first."""
        count = torch.tensor([float(self.pass_data)], dtype=torch.float64)
        if self.distributed:
            for li, layer in enumerate(bases):
                if self.E_sum[li] is None:
                    self.E_sum[li] = [torch.zeros_like(b.eigvals()) for b in layer]
            extra = [] if self.outputs is None else self.outputs.ekfac_tensors(bases)
            dist_utils.all_reduce_sum_([e for es in self.E_sum for e in es] + extra + [count])
        n2 = int(round(count.item()))
        if n2 != self.num_data:
            raise ValueError(
                f"the EKFAC second pass saw {n2} data points but the KFAC pass {self.num_data}; "
                "data must be re-iterable and yield the same data twice (not a one-shot iterator)"
            )

    # ------------------------------------------------------------------------- results
    def kfac_blocks(self, shapes: Mapping[str, torch.Size]) -> list[list[KronBlock]]:
        """KFAC blocks per layer, ``G = G_sum``, ``A = A_sum / N`` (two blocks when weight and
        bias are separate); ``shapes``: parameter name -> shape."""
        self.mirror()
        if self.num_data == 0:
            raise ValueError(
                "no data was seen: the data iterable is empty (or yields only empty batches)"
            )
        out = []
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
                out.append([make_block(G, A, names, [shapes[n] for n in names], True)])
                continue
            layer = []
            if spec.has_weight:
                w = spec.weight_name
                # A weight stored [d_in, d_out]: A (x) G in its own p.flatten() order.
                F1, F2 = (A, G) if spec.transposed else (G, A)
                layer.append(make_block(F1, F2, [w], [shapes[w]]))
            if spec.has_bias:
                # The bias input is the constant 1, so its A factor is 1 (expand and reduce).
                b = spec.bias_name
                layer.append(make_block(G, None, [b], [shapes[b]]))
            out.append(layer)
        return out

    def ekfac_blocks(self, bases: list[list[KronBlock]]) -> list[list[KronBlock]]:
        """The KFAC ``bases`` with their eigenvalues replaced by ``E_sum``."""
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

    def curvature(
        self,
        blocks: list[list[KronBlock]],
        kind: str,
        param_names: list[str],
        likelihood: str,
        fisher: str,
    ) -> KronCurvature:
        """The fitted :class:`~laplace_kron.kron.KronCurvature` of ``blocks`` (per layer) and the
        diagonal blocks, ordered by their first parameter's position in ``param_names``."""
        pos = {n: i for i, n in enumerate(param_names)}
        every = [b for layer in blocks for b in layer] + self.diag_blocks()
        return KronCurvature(
            sorted(every, key=lambda b: min(pos[n] for n in b.param_names)),
            param_names,
            self.num_data,
            likelihood=likelihood,
            fisher=fisher,
            loss=self.loss,
            sse=self.sse,
            n_outputs=self.n_outputs,
            kind=kind,
            n_observed=self.n_observed,
        )


def a_shape(spec: LayerSpec) -> tuple[int, ...]:
    """Shape of a layer's ``A_sum``: ``[d_in (+1)]^2`` (per group ``[g, d, d]`` for a grouped
    convolution), or ``[V]`` (diagonal) for an embedding."""
    d = spec.d_in + int(spec.joint)
    return (d,) if spec.embedding else spec.factor_shape(d)


def _tensor(t: object, device: torch.device, key: str, shape: tuple[int, ...] | None = None):
    if t is None:
        return None
    if not isinstance(t, Tensor) or not t.is_floating_point():
        raise ValueError(f"{key} holds a {type(t).__name__}, not a floating-point tensor")
    if shape is not None and tuple(t.shape) != shape:
        raise ValueError(f"{key} holds a tensor of shape {tuple(t.shape)}, expected {shape}")
    return t.to(device)


def _count(v: object, key: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise ValueError(f"{key} must be a non-negative integer, got {v!r}")
    return v
