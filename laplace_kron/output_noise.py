"""Per-output observation noise for multi-output Gaussian regression: the curvature as a function
of the noise precisions ``w_c = 1 / sigma_c^2``.

With ``y_c = f_c(x) + eps_c``, ``eps_c ~ N(0, sigma_c^2)`` the loss Hessian w.r.t. the outputs is
``diag(w)``, whose exact square root has the columns ``sqrt(w_c) e_c``, so the GGN is
``sum_c w_c J_c^T J_c``. KFAC backpropagates each ``e_c`` to a layer's output-gradients
``g_{c,n}``; with the input factor ``A`` unchanged the output factor is

    G(w) = sum_c w_c G_c,     G_c = sum_n g_{c,n} g_{c,n}^T     (the sigma = 1 factor is sum_c G_c)

and EKFAC's corrected eigenvalues in the fixed basis ``Q_G (x) Q_A`` (the sigma = 1 fit's) are
``E(w) = sum_c w_c E_c`` with ``E_c`` the per-output corrections; a diagonal block is
``D(w) = sum_c w_c D_c``. :class:`OutputFactors` stores ``G_c`` / ``E_c`` / ``D_c`` (``C`` times a
block's output-side factor) and builds the curvature for any ``w`` (``G(w)`` is eigendecomposed
again; EKFAC and diagonal blocks only re-weight eigenvalues).

The evidence needs ``log det(s H(w) + delta)`` (``s = 1 / T``) and its gradient. Every block's
eigenvalues are ``lambda(w)``, and ``d/dw_c log det = s tr(Lambda^{-1} H_c)``: in the eigenbasis
of the weighted block only the diagonal of ``H_c`` enters, i.e. for a KFAC block with ``G(w) = Q
diag(l_G) Q^T``

    d/dw_c log det = s sum_ij (Q^T G_c Q)_ii l_A[j] / (s l_G[i] l_A[j] + delta),

exactly (also for repeated eigenvalues), and ``s sum_ij E_c[ij] / (s E(w)_ij + delta)`` for EKFAC.
The same sums give MacKay's per-output effective numbers of parameters ``gamma_c = w_c s tr(
Lambda^{-1} H_c)`` (``sum_c gamma_c = P - sum_l delta_l tr Sigma_l``).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .kron import DiagBlock, KronBlock, KronCurvature
from .validation import positive

__all__ = [
    "OutputFactors",
    "gaussian_log_likelihood",
    "mackay_noise",
    "noise_weights",
    "noisy_curvature",
    "per_output_logdet",
    "set_sigma_noise",
]

# Where a block keeps its output-side factor: G (the usual), A (a weight stored [d_in, d_out]:
# its block is A (x) G), EKFAC eigenvalues, or a diagonal block's values.
SLOTS = ("G", "A", "eigenvalues", "diag")


@dataclass
class OutputFactors:
    """Per-output curvature of a regression fit.

    Attributes:
        base: the curvature for ``sigma = 1`` (``w = 1``: ``sum_c`` of the per-output terms).
        factors: per block of ``base``, ``[C, ...]``: ``G_c`` stacked ``[C, d, d]`` (slot ``"G"``
            / ``"A"``), ``E_c`` ``[C, d_out, d_in]`` (``"eigenvalues"``) or ``D_c`` ``[C, P, 1]``.
        slots: per block, which of :data:`SLOTS` the factor replaces.
        sse: per-output summed squared residuals ``[C]`` (float64).
    """

    base: KronCurvature
    factors: list[Tensor]
    slots: list[str]
    sse: Tensor
    _cache: tuple[tuple[float, ...], KronCurvature] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if len(self.factors) != len(self.base.blocks) or len(self.slots) != len(self.factors):
            raise ValueError("per-output factors: one factor and one slot per block are needed")
        C = self.sse.numel()
        for b, f, s in zip(self.base.blocks, self.factors, self.slots, strict=True):
            if s not in SLOTS or f.shape[:1] != (C,) or not torch.isfinite(f).all():
                raise ValueError(f"per-output factor of block {b.param_names} is malformed")
            if f.shape[1:] != _output_side(b, s).shape:
                raise ValueError(f"per-output factor of block {b.param_names} has a wrong shape")

    @property
    def n_outputs(self) -> int:
        """``C``."""
        return self.sse.numel()

    @property
    def counts(self) -> Tensor:
        """Observed targets per output ``[C]`` (float64; regression rows observe all outputs)."""
        n = self.base.observed_targets / self.n_outputs
        return torch.full((self.n_outputs,), n, dtype=torch.float64)

    # ------------------------------------------------------------------------- curvature
    def curvature(self, w: Tensor) -> KronCurvature:
        """The curvature ``H(w) = sum_c w_c H_c`` (cached for the last ``w``)."""
        key = tuple(w.detach().double().tolist())
        if self._cache is None or self._cache[0] != key:
            blocks = [_weighted(b, f, s, w) for b, f, s in self._zip()]
            self._cache = (key, dataclasses.replace(self.base, blocks=blocks))
        return self._cache[1]

    def _zip(self):
        return zip(self.base.blocks, self.factors, self.slots, strict=True)

    def sums(self, w: Tensor, deltas: Tensor, scale: float) -> tuple[Tensor, Tensor, Tensor]:
        """One pass over the blocks of ``H(w)``: ``log [L]`` (``sum_ij log(s lambda + delta_l)``),
        ``r [L]`` (``sum_ij 1 / (s lambda + delta_l)``) and ``t [C]`` (``sum_l tr(Lambda_l^{-1}
        H_{l,c})``), all float64."""
        curv = self.curvature(w)
        C, L = self.n_outputs, len(self.factors)
        log, r = torch.zeros(L, dtype=torch.float64), torch.zeros(L, dtype=torch.float64)
        t = torch.zeros(C, dtype=torch.float64)
        for i, (b, f, s) in enumerate(zip(curv.blocks, self.factors, self.slots, strict=True)):
            lam = b.eigvals().to("cpu", torch.float64)
            damped = scale * lam + float(deltas[i])
            inv = damped.reciprocal()
            log[i] = damped.log().sum()
            r[i] = inv.sum()
            f = f.to("cpu", torch.float64)
            if s in ("eigenvalues", "diag"):
                t += (f * inv).flatten(1).sum(1)
                continue
            Q, other = (b.eig_G, b.eig_A) if s == "G" else (b.eig_A, b.eig_G)
            Q = Q.vectors.to("cpu", torch.float64)
            u = (Q * (f @ Q)).sum(1)  # diag(Q^T G_c Q) [C, d]
            l_other = other.values.to("cpu", torch.float64)
            t += u @ (inv @ l_other) if s == "G" else (inv.T @ l_other) @ u.T
        return log, r, t

    def effective_parameters(self, w: Tensor, deltas: Tensor, scale: float):
        """MacKay's ``gamma_l = P_l - delta_l tr(Sigma_l)`` per block ``[L]`` and ``gamma_c = w_c s
        tr(Sigma H_c)`` per output ``[C]``."""
        _, r, t = self.sums(w, deltas, scale)
        sizes = torch.tensor([b.n_params for b in self.base.blocks], dtype=torch.float64)
        return sizes - deltas.detach().double() * r, w.detach().double() * scale * t

    # ------------------------------------------------------------------------- files
    def state_dict(self) -> dict:
        """Plain data (the base blocks are saved with the posterior)."""
        return {"factors": [f.clone() for f in self.factors], "slots": list(self.slots),
                "sse": self.sse.clone()}  # fmt: skip

    @classmethod
    def from_state(cls, state: dict, base: KronCurvature) -> OutputFactors:
        """Inverse of :meth:`state_dict` for the saved ``base`` (ValueError if malformed)."""
        if not isinstance(state, dict) or set(state) != {"factors", "slots", "sse"}:
            raise ValueError("its per-output factors are malformed")
        factors, slots, sse = state["factors"], state["slots"], state["sse"]
        if not all(isinstance(f, Tensor) for f in factors) or not isinstance(sse, Tensor):
            raise ValueError("its per-output factors are not tensors")
        if sse.ndim != 1 or not torch.isfinite(sse).all() or bool((sse < 0).any()):
            raise ValueError("its per-output sse must be finite, >= 0 and one value per output")
        return cls(base, list(factors), list(slots), sse.to(torch.float64))


def _output_side(b: KronBlock | DiagBlock, slot: str) -> Tensor:
    """The block's own output-side factor (for shape checks)."""
    if slot == "diag":
        return b.values
    return {"G": b.G, "A": b.A, "eigenvalues": b.eigenvalues}[slot]


def _weighted(b: KronBlock | DiagBlock, f: Tensor, slot: str, w: Tensor) -> KronBlock | DiagBlock:
    """Block ``b`` with its output side replaced by ``sum_c w_c f[c]``."""
    wf = torch.tensordot(w.detach().to(f.dtype).to(f.device), f, dims=1)
    if slot == "diag":
        return DiagBlock(wf, list(b.param_names), list(b.param_shapes))
    if slot == "eigenvalues":
        return b.with_eigenvalues(wf)
    names, shapes = list(b.param_names), list(b.param_shapes)
    if slot == "G":  # A and its eigenbasis are unchanged
        return type(b)(wf, b.A, names, shapes, b.bias_joint, None, None, b.eig_A)
    return type(b)(b.G, wf, names, shapes, b.bias_joint, None, b.eig_G, None)


class _NoiseLogDet(torch.autograd.Function):
    """``log det(s H(w) + diag(delta_l))`` with ``d/dw_c = s t_c`` and ``d/ddelta_l = r_l``."""

    @staticmethod
    def forward(ctx, w: Tensor, deltas: Tensor, factors: OutputFactors, scale: float) -> Tensor:
        log, r, t = factors.sums(w, deltas.detach(), scale)
        ctx.save_for_backward(r, scale * t)
        return log.sum()

    @staticmethod
    def backward(ctx, grad: Tensor):
        r, t = ctx.saved_tensors
        gw = (grad * t) if ctx.needs_input_grad[0] else None
        gd = (grad * r) if ctx.needs_input_grad[1] else None
        return gw, gd, None, None


def per_output_logdet(factors: OutputFactors, w: Tensor, deltas: Tensor, scale: float) -> Tensor:
    """``log det(scale * H(w) + diag(delta_l))`` (float64), differentiable in ``w [C]`` and
    ``deltas [L]``. ``-inf`` never occurs for ``delta > 0``."""
    w = torch.as_tensor(w, dtype=torch.float64)
    if w.shape != (factors.n_outputs,):
        raise ValueError(f"expected {factors.n_outputs} noise precisions, got {tuple(w.shape)}")
    if not math.isfinite(scale) or scale <= 0:
        raise ValueError("the curvature scale must be positive")
    return _NoiseLogDet.apply(w, deltas, factors, scale)


# ------------------------------------------------------------------------------ noise hyperparameter
def noise_weights(sigma: Tensor) -> Tensor:
    """Noise precisions ``w = sigma^-2`` (float64, autograd kept)."""
    return torch.as_tensor(sigma, dtype=torch.float64) ** -2


def set_sigma_noise(post, value) -> tuple[Tensor, KronCurvature | None]:
    """Validate a new ``sigma_noise`` of the posterior ``post`` (duck-typed
    :class:`~laplace_kron.posterior.KronPosterior`); returns it (0-d, or ``[C]`` when per-output
    factors exist: a scalar is then broadcast) and, for a posterior with per-output factors, the
    curvature ``H(w)`` for it (``None`` otherwise). Before a fit a ``[C]`` tensor makes the next
    fit keep per-output factors (``fisher="exact"`` only, else ValueError)."""
    sigma = positive("sigma_noise", value)
    if sigma.ndim == 1 and sigma.numel() == 1:
        sigma = sigma.reshape(())
    if post.likelihood != "regression" and (sigma.ndim or float(sigma) != 1.0):
        raise ValueError("sigma_noise is only used for likelihood='regression'; leave it at 1")
    factors = post.output_factors
    if factors is not None:
        C = factors.n_outputs
        if sigma.ndim and sigma.numel() != C:
            raise ValueError(
                f"sigma_noise has {sigma.numel()} values but the posterior has {C} outputs; give "
                "one noise level per output (or a scalar)"
            )
        sigma = sigma.expand(C).clone()
        return sigma, factors.curvature(noise_weights(sigma))
    if post.curvature is None:
        post.fitter.keep_per_output(sigma.numel() if sigma.ndim else None)
    elif sigma.ndim:
        raise ValueError(
            "this posterior was fitted without per-output factors, so its sigma_noise must be a "
            "scalar; for per-output noise give the [C] tensor before fitting, e.g. "
            "KronLaplace(model, 'regression', fisher='exact', sigma_noise=torch.ones(C)).fit(data)"
        )
    return sigma, None


def noisy_curvature(
    sigma: Tensor, curvature: KronCurvature, factors: OutputFactors | None
) -> KronCurvature:
    """The curvature a posterior with noise ``sigma`` uses: ``curvature`` itself (scalar noise,
    applied as a scale), or ``H(w)`` of the per-output ``factors`` (ValueError when a ``[C]``
    noise has no factors: a curvature from ``set_curvature`` or an older file)."""
    if factors is None:
        if sigma.ndim:
            raise ValueError(
                "a per-output sigma_noise needs per-output factors, which this curvature lacks; "
                "set a scalar sigma_noise, or fit with the [C] sigma_noise set (fisher='exact')"
            )
        return curvature
    if sigma.shape != (factors.n_outputs,):
        raise ValueError(
            f"sigma_noise has shape {tuple(sigma.shape)} but the per-output factors have "
            f"{factors.n_outputs} outputs"
        )
    return factors.curvature(noise_weights(sigma))


def gaussian_log_likelihood(factors: OutputFactors, sigma: Tensor, temperature: float) -> Tensor:
    """``sum_c [-SSE_c / (2 sigma_c^2 T) - N_c log(sigma_c sqrt(2 pi))]`` (float64, autograd
    kept; ``sigma`` a scalar or ``[C]``)."""
    sigma = torch.as_tensor(sigma, dtype=torch.float64).expand(factors.n_outputs)
    n = factors.counts
    return (-0.5 * factors.sse / (sigma**2 * temperature) - n * torch.log(sigma)).sum() - (
        0.5 * math.log(2 * math.pi) * n.sum()
    )


def mackay_noise(factors: OutputFactors, gamma: Tensor, temperature: float) -> Tensor:
    """MacKay's noise update ``sigma_c^2 = SSE_c / (T (N_c - gamma_c))``, the stationarity
    condition of the evidence in ``w_c`` at fixed ``theta*`` (``gamma [C]``)."""
    dof = factors.counts - gamma
    if bool((dof <= 0).any()):
        bad = (dof <= 0).nonzero().flatten().tolist()
        raise ValueError(
            f"MacKay noise update undefined for outputs {bad}: more effective parameters than data"
        )
    return (factors.sse / (temperature * dof)).sqrt()
