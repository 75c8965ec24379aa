"""Per-example gradients of the diagonal-block parameters, for their GGN diagonal and the GLM.

A parameter without a Kronecker block (:func:`~laplace_kron.curvature.capture.select_coverage`)
gets the diagonal block

    h = sum_{n,k} (d (s_k[n] . f(x_n)) / d theta)^2

from the same output-gradient vectors ``s_k`` as the Kronecker blocks (exact / MC / empirical).
The per-example gradients are formed generically with :mod:`torch.func`: each example is a batch
of one, ``functional_call`` of the model with the diagonal parameters swapped in, ``vjp`` with
the example's ``K`` vectors, ``vmap`` over the examples (a loop over examples, with one warning,
when the model cannot be vmapped). Any use of a parameter (custom modules, free parameters,
attention's packed projections, tied uses within the model) is therefore counted exactly. The
GLM predictive uses the same gradients with the unit vectors ``e_c`` (per-example Jacobians of
the diagonal parameters, ``[b, C, P_diag]`` for a chunk of ``b`` examples only).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Mapping

import torch
from torch import Tensor, nn
from torch.func import functional_call, vjp, vmap

from .batches import Inputs, model_arguments, model_output

__all__ = ["DiagonalGradients", "example_cotangents", "example_rows", "slice_examples"]

# Batch-norm layers: per-example (batch of one) gradients are those of the full batch only in
# eval mode, where the running statistics are used.
_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


class DiagonalGradients:
    """Per-example gradients of ``s . f(x_n)`` w.r.t. the parameters ``names`` of ``model``.

    ``f(x_n)`` is the example's output as the fit sees it (:func:`example_rows`: the model called as
    :func:`~laplace_kron.curvature.batches.model_arguments` says, ``.logits`` / tuple outputs
    unwrapped, the last position dropped when ``shift_labels``), flattened.
    ``chunk``: element budget of the per-example gradients held at once (``b * K * P_diag``).
    ``vectorize``: try ``torch.func.vmap`` over examples first.
    """

    def __init__(
        self,
        model: nn.Module,
        names: list[str],
        chunk: int = 2**23,
        vectorize: bool = True,
        shift_labels: bool = False,
    ):
        self.model, self.names, self.chunk = model, list(names), chunk
        self.vectorize, self.shift_labels = vectorize, shift_labels
        named = dict(model.named_parameters())
        self.shapes = {n: named[n].shape for n in self.names}
        self.n_params = sum(s.numel() for s in self.shapes.values())

    def _params(self) -> dict[str, Tensor]:
        named = dict(self.model.named_parameters())
        return {n: named[n].detach() for n in self.names}

    def check_mode(self) -> None:
        """Refuse batch-norm in train mode (the batch-of-one gradients would be another
        function's, and the running statistics would be updated)."""
        bad = [
            n for n, m in self.model.named_modules() if isinstance(m, _BATCH_NORMS) and m.training
        ]
        if bad:
            raise ValueError(
                f"batch-norm layers {bad} are in train mode: the diagonal blocks need per-example "
                "gradients with the running statistics; call model.eval() before fitting"
            )

    def per_example(self, x: Inputs, cot: Tensor) -> Iterator[tuple[int, dict[str, Tensor]]]:
        """Per-example gradients for cotangents ``cot [K, B, C]`` (``C`` outputs per example).

        Yields ``(start, grads)`` per chunk of examples ``start:start+b``, ``grads[name]`` of shape
        ``[b, K, *param_shape]``: the gradient of ``cot[k, n] . f(x_n)``.
        """
        K, B = cot.shape[0], cot.shape[1]
        b = max(1, self.chunk // max(1, K * self.n_params))
        params = self._params()
        for start in range(0, B, b):
            stop = min(B, start + b)
            xs = slice_examples(x, start, stop)
            s = cot[:, start:stop]
            if self.vectorize:
                try:
                    yield start, self._vmapped(params, xs, s)
                    continue
                except (RuntimeError, NotImplementedError) as e:
                    warnings.warn(
                        f"torch.func.vmap over examples failed for the diagonal blocks ({e}); "
                        "using one forward pass per example",
                        stacklevel=3,
                    )
                    self.vectorize = False
            yield start, self._looped(params, xs, s)

    def squared_sums(self, x: Inputs, cot: Tensor) -> dict[str, Tensor]:
        """``sum_{n,k} (d (cot[k, n] . f(x_n)) / d theta)^2`` per parameter, shaped like it."""
        out = {
            n: torch.zeros(s, dtype=cot.dtype, device=cot.device) for n, s in self.shapes.items()
        }
        for _, grads in self.per_example(x, cot):
            with torch.no_grad():
                for n, g in grads.items():
                    out[n] += g.detach().square().sum(dim=(0, 1))
        return out

    def _vmapped(self, params: dict[str, Tensor], xs: Inputs, s: Tensor) -> dict[str, Tensor]:
        tensors, rebuild = _split(xs)
        model = self.model

        def one(t_n: dict[str, Tensor], s_n: Tensor) -> dict[str, Tensor]:
            batch = rebuild({k: v.unsqueeze(0) for k, v in t_n.items()})

            def f(p: dict[str, Tensor]) -> Tensor:
                return example_rows(model, p, batch, self.shift_labels)

            _, pull = vjp(f, params)
            return vmap(pull)(s_n)[0]  # [K, *shape] per parameter

        with torch.enable_grad(), warnings.catch_warnings():
            # torch warns that some attention kernels have no batching rule (slower, still exact).
            warnings.filterwarnings("ignore", message="There is a performance drop")
            return vmap(one, in_dims=(0, 1))(tensors, s)

    def _looped(self, params: dict[str, Tensor], xs: Inputs, s: Tensor) -> dict[str, Tensor]:
        K, b = s.shape[0], s.shape[1]
        leaves = {n: p.clone().requires_grad_(True) for n, p in params.items()}
        out = {n: s.new_zeros(b, K, *sh) for n, sh in self.shapes.items()}
        with torch.enable_grad():
            for i in range(b):
                f = example_rows(
                    self.model, leaves, slice_examples(xs, i, i + 1), self.shift_labels
                )
                for k in range(K):
                    grads = torch.autograd.grad(
                        f, list(leaves.values()), s[k, i], retain_graph=k < K - 1, allow_unused=True
                    )
                    for n, g in zip(leaves, grads):
                        if g is not None:
                            out[n][i, k] = g
        return out


def example_cotangents(vectors: Tensor, num_data: int, separate_rows: bool) -> Tensor:
    """Output-gradient vectors ``[K, M, C]`` over the ``M = N R`` output rows as per-example
    cotangents ``[K', N, R C]`` for :meth:`DiagonalGradients.squared_sums`.

    The GGN of a datum with ``R`` output rows (positions) is ``sum_r J_r^T H_r J_r``: one vector
    applied to all rows at once adds the cross terms ``J_r^T s_r s_r'^T J_r'``. They vanish in
    expectation for MC vectors (independent per row) and belong to the empirical Fisher of the
    datum's summed loss, but not to the exact GGN: with ``separate_rows`` every vector is split
    into ``R`` vectors, each non-zero on one row (``K' = K R``).
    """
    K, M, C = vectors.shape
    R = M // num_data
    if not separate_rows or R == 1:
        return vectors.reshape(K, num_data, R * C)
    v = vectors.reshape(K, 1, num_data, R, C)
    eye = torch.eye(R, dtype=vectors.dtype, device=vectors.device).reshape(1, R, 1, R, 1)
    return (v * eye).reshape(K * R, num_data, R * C)


def example_rows(model: nn.Module, params: dict[str, Tensor], x1: Inputs, shift: bool) -> Tensor:
    """The output of one example (a batch of one) with ``params`` swapped in, as the flattened
    rows the fit's likelihood sees: ``[R * C]`` (positions kept per datum; without the last one
    when ``shift`` pairs logits at t with labels at t + 1)."""
    args, kwargs = model_arguments(model, x1)
    f = model_output(functional_call(model, params, args, kwargs))
    if f.ndim and f.shape[0] != 1:  # a model that flattens its positions into the batch axis
        f = f.unflatten(0, (1, -1))
    if shift:
        f = f[:, :-1]
    return f.reshape(-1)


def slice_examples(x: Inputs, start: int, stop: int) -> Inputs:
    """Examples ``start:stop`` of a tensor or of each tensor of a mapping (others unchanged)."""
    if isinstance(x, Mapping):
        return {k: v[start:stop] if isinstance(v, Tensor) else v for k, v in x.items()}
    return x[start:stop]


def _split(x: Inputs):
    """``(tensors, rebuild)``: the tensors of the inputs by key and a function putting them back."""
    if isinstance(x, Mapping):
        rest = {k: v for k, v in x.items() if not isinstance(v, Tensor)}
        return {k: v for k, v in x.items() if isinstance(v, Tensor)}, lambda t: {**rest, **t}
    return {"x": x}, lambda t: t["x"]
