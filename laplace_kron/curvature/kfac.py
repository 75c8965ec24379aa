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

import warnings
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..kron import KronBlock, KronCurvature
from .capture import Capture, LayerSpec, select_layers
from .likelihoods import (
    check_fisher,
    check_likelihood,
    nll_sum,
    output_gradient_vectors,
    prepare_targets,
)

__all__ = ["kfac", "ekfac", "CurvatureFitter"]

WEIGHT_SHARING = ("expand", "reduce")
# Per-example EKFAC projections are built in chunks of at most this many entries.
_EKFAC_CHUNK = 2**24


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


def _to_device(x, device):
    if isinstance(x, dict):
        return {k: (v.to(device) if isinstance(v, Tensor) else v) for k, v in x.items()}
    return x.to(device)


class CurvatureFitter:
    """Accumulates KFAC factors (and EKFAC corrections) over batches.

    The accumulation state (``A_sum``, ``G_sum``, ``E_sum``, ``num_data``, loss sums) is plain
    tensors so it can be checkpointed and all-reduced across data-parallel ranks.
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
    ):
        check_likelihood(likelihood)
        check_fisher(fisher, mc_samples)
        if weight_sharing not in WEIGHT_SHARING:
            raise ValueError(
                f"weight_sharing must be one of {WEIGHT_SHARING}, got {weight_sharing!r}"
            )
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.model = model
        self.likelihood = likelihood
        self.fisher = fisher
        self.mc_samples = mc_samples
        self.weight_sharing = weight_sharing
        self.specs: list[LayerSpec] = select_layers(model, modules, separate_bias)
        if generator is None and fisher == "mc":
            generator = torch.Generator().manual_seed(0)
        self.generator = generator
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

    @property
    def param_names(self) -> list[str]:
        covered = {n for s in self.specs for n in (s.weight_name, s.bias_name) if n}
        return [n for n, _ in self.model.named_parameters() if n in covered]

    # ------------------------------------------------------------------------- passes
    def _forward(self, x, y, i: int, cap: Capture):
        _check_finite_inputs(x, i)
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
        fc, yc = prepare_targets(f, y, self.likelihood)
        vectors = output_gradient_vectors(
            fc, yc, self.likelihood, self.fisher, self.mc_samples, self.generator
        )
        grads = cap.output_gradients(fc, vectors)
        inputs = [cap.layer_inputs(s) for s in self.specs]
        return fc, yc, inputs, grads

    def accumulate_kfac(self, x, y, i: int = 0) -> None:
        """Add one batch to the KFAC factors (first pass)."""
        with Capture(self.specs) as cap:
            fc, yc, inputs, grads = self._forward(x, y, i, cap)
        with torch.no_grad():
            nll, sse = nll_sum(fc, yc, self.likelihood)
            self.loss += float(nll)
            self.sse += float(sse)
            self.n_outputs = fc.shape[1]
            self.num_data += fc.shape[0]
            for li, (spec, a, g) in enumerate(zip(self.specs, inputs, grads, strict=True)):
                self._add_factors(li, spec, a, g)

    def _add_factors(self, li: int, spec: LayerSpec, a: Tensor, g: Tensor) -> None:
        T = a.shape[1]
        if self.weight_sharing == "expand":
            a2 = a.reshape(-1, a.shape[-1])
            A = (a2.T @ a2) / T
            g2 = g.reshape(-1, g.shape[-1])
        else:
            ab = a.mean(dim=1)
            A = ab.T @ ab
            g2 = g.sum(dim=2).reshape(-1, g.shape[-1])
        G = g2.T @ g2
        if spec.has_weight:
            self.A_sum[li] = A if self.A_sum[li] is None else self.A_sum[li] + A
        self.G_sum[li] = G if self.G_sum[li] is None else self.G_sum[li] + G

    def accumulate_ekfac(self, x, y, bases: list[list[KronBlock]], i: int = 0) -> None:
        """Add one batch to the EKFAC eigenvalue corrections (second pass)."""
        with Capture(self.specs) as cap:
            _, _, inputs, grads = self._forward(x, y, i, cap)
        with torch.no_grad():
            for li, (a, g) in enumerate(zip(inputs, grads, strict=True)):
                corr = []
                for block in bases[li]:
                    # A bias-only block sees the constant input 1 at every position.
                    aa = a if block.A is not None else a.new_ones(*a.shape[:2], 1)
                    corr.append(_ekfac_corrections(aa, g, block))
                if self.E_sum[li] is None:
                    self.E_sum[li] = corr
                else:
                    self.E_sum[li] = [e + c for e, c in zip(self.E_sum[li], corr, strict=True)]

    # ------------------------------------------------------------------------- results
    def blocks(self) -> list[list[KronBlock]]:
        """KFAC blocks per layer (a layer has two blocks when weight and bias are separate)."""
        if self.num_data == 0:
            raise ValueError("no data was seen: the data iterable is empty")
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

    def fit_kfac(self, data: Iterable, progress: bool = False) -> KronCurvature:
        self.reset()
        _check_model_mode(self.model)
        for i, (x, y) in _iter_batches(data, progress, "KFAC"):
            self.accumulate_kfac(x, y, i)
        return self.curvature(self.blocks(), "kfac")

    def fit_ekfac(self, data: Iterable, progress: bool = False) -> KronCurvature:
        self.fit_kfac(data, progress)
        bases = self.blocks()
        for i, (x, y) in _iter_batches(data, progress, "EKFAC"):
            self.accumulate_ekfac(x, y, bases, i)
        return self.curvature(self.ekfac_blocks(bases), "ekfac")

    def ekfac_blocks(self, bases: list[list[KronBlock]]) -> list[list[KronBlock]]:
        out = []
        for li, layer in enumerate(bases):
            E = self.E_sum[li]
            if E is None:
                raise ValueError("EKFAC second pass saw no data: the data iterable is exhausted")
            out.append([b.with_eigenvalues(e) for b, e in zip(layer, E, strict=True)])
        return out


def _ekfac_corrections(a: Tensor, g: Tensor, block: KronBlock) -> Tensor:
    """``sum_{k,n} (Q_G^T (sum_t g a^T) Q_A)^2`` for ``a [B, T, d_in]``, ``g [K, B, T, d_out]``."""
    QG, QA = block.eig_G.vectors, block.eig_A.vectors
    gh = g @ QG  # [K, B, T, d_out]
    ah = a @ QA  # [B, T, d_in]
    K, B, T, d_out = gh.shape
    d_in = ah.shape[-1]
    if T == 1:
        return torch.einsum("kbo,bi->oi", gh[:, :, 0] ** 2, ah[:, 0] ** 2)
    out = gh.new_zeros(d_out, d_in)
    step = max(1, _EKFAC_CHUNK // max(1, K * d_out * d_in))
    for s in range(0, B, step):
        per = torch.einsum("kbto,bti->kboi", gh[:, s : s + step], ah[s : s + step])
        out += (per**2).sum(dim=(0, 1))
    return out


def _fit(kind: str, model, data, likelihood, **kw) -> KronCurvature:
    progress = kw.pop("progress", False)
    fitter = CurvatureFitter(model, likelihood, **kw)
    if kind == "kfac":
        return fitter.fit_kfac(data, progress)
    return fitter.fit_ekfac(data, progress)


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
    )
