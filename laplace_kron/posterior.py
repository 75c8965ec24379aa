"""The posterior core: a Kronecker-factored Laplace posterior ``N(theta*, Lambda^{-1})``.

Per block ``l`` the posterior precision is

    Lambda_l = H_l / (T * sigma^2) + delta_l * I        (regression)
    Lambda_l = H_l / T + delta_l * I                    (classification, binary)
    Lambda_l = H_l(w) / T + delta_l * I                 (regression, per-output noise sigma_c)

with ``H_l`` the KFAC / EKFAC curvature of the summed negative log-likelihood (stored for
``sigma = 1``), ``T`` the temperature and ``delta_l`` the prior precision (one scalar, or one per
block). All operations act on the eigenvalues ``c * lambda + delta`` (``c = 1 / (T sigma^2)``), so
changing ``delta`` or ``sigma`` never needs another pass over the data. With per-output noise
(``sigma_noise [C]``, :mod:`laplace_kron.output_noise`) the fit keeps per-output factors and
:attr:`curvature` is ``H(w) = sum_c w_c H_c``, ``w = sigma^-2``, rebuilt when ``sigma`` changes.

:class:`KronPosterior` holds the hyperparameters, fits the curvature, and gives the posterior
operators, the compressed spectrum and samples. The evidence and its tuning
(:mod:`laplace_kron.marglik`) and the predictives (:mod:`laplace_kron.predictive`) are functions
over it; :class:`laplace_kron.KronLaplace` combines the three for users.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from . import io
from .block_state import block_state, parse_block
from .constants import LIKELIHOODS, POSTERIOR_CURVATURES
from .curvature import CurvatureFitter, CurvatureOptions, LayerSpec
from .diagprior import block_dampings, block_values, check_prior_length
from .kron import KronCurvature
from .kron_sum import add_curvatures
from .output_noise import OutputFactors, noisy_curvature, set_sigma_noise
from .spectrum import Spectrum
from .validation import Checked, flat_vector, positive, positive_int

__all__ = ["DampedKron", "KronPosterior"]


@dataclass
class DampedKron:
    """``(c * H + delta I)^power`` for ``power`` in ``{1, -1}``: a lazily evaluated posterior
    precision (``power=1``) or covariance (``power=-1``)."""

    curvature: KronCurvature
    scale: Tensor
    delta: Tensor | list[Tensor]
    power: int = 1

    def to_dense(self) -> Tensor:
        """Dense ``[P, P]`` matrix in ``param_names`` order (small models only)."""
        fn = None if self.power == 1 else torch.reciprocal
        return self.curvature.to_dense(self.scale, self.delta, fn)

    def matvec(self, v: Tensor) -> Tensor:
        """``M v`` for flat vectors ``v [..., P]``."""
        if self.power == 1:
            return self.curvature.matvec(v, self.scale, self.delta)
        return self.curvature.inv_matvec(v, self.scale, self.delta)

    def logdet(self) -> Tensor:
        """``log det M`` (float64)."""
        return self.power * self.curvature.logdet(self.scale, self.delta)

    def __matmul__(self, v: Tensor) -> Tensor:
        return self.matvec(v.T).T if v.ndim == 2 else self.matvec(v)


class KronPosterior:
    """Laplace posterior with KFAC / EKFAC curvature: hyperparameters, fit, operators, samples.

    Args:
        model: trained network (at the MAP); its current parameters are the posterior mean.
        likelihood: ``"classification"``, ``"regression"`` or ``"binary"``.
        curvature: ``"kfac"`` or ``"ekfac"``.
        prior_precision: ``delta``, a positive scalar, one value per block, or one per covered
            parameter (a vector ``[P]`` in :attr:`param_names` order or a mapping name -> tensor
            shaped like the parameter; :mod:`~laplace_kron.diagprior` for Kronecker blocks).
        sigma_noise: observation noise (regression only): a scalar, or one value per output
            ``[C]`` (per-output noise, :mod:`~laplace_kron.output_noise`; given before
            :meth:`fit`, it makes the fit keep per-output factors; needs ``fisher="exact"``).
        temperature: ``T``; the curvature (and the log-likelihood) are divided by it.
        prior_mean: ``mu_0`` of the prior ``N(mu_0, delta^-1 I)``: ``None`` (zero), a number, a
            vector over the covered parameters (:attr:`param_names` order, each ``p.flatten()``)
            or a mapping name -> tensor. It enters the evidence through ``||theta* - mu_0||^2``
            (and MacKay's updates); the posterior itself is centred at the given MAP ``theta*``,
            so samples and predictives depend on ``mu_0`` only through the ``theta*`` the user
            trained with it.
        **options: the curvature options of :class:`~laplace_kron.curvature.CurvatureOptions`
            (``fisher``, ``mc_samples``, ``weight_sharing``, ``separate_bias``, ``modules``
            (``"last_layer"`` gives last-layer Laplace), ``generator``, ``distributed``).
    """

    def __init__(
        self,
        model: nn.Module,
        likelihood: str,
        curvature: str = "kfac",
        *,
        prior_precision: float | Tensor | Sequence[float] = 1.0,
        sigma_noise: float | Tensor = 1.0,
        temperature: float = 1.0,
        prior_mean: float | Tensor | dict[str, Tensor] | None = None,
        **options,
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if likelihood not in LIKELIHOODS:
            raise ValueError(f"likelihood must be one of {LIKELIHOODS}, got {likelihood!r}")
        if curvature not in POSTERIOR_CURVATURES:
            raise ValueError(f"curvature must be one of {POSTERIOR_CURVATURES}, got {curvature!r}")
        self.model = model
        self.likelihood = likelihood
        self.curvature_type = curvature
        self.options = CurvatureOptions.from_kwargs(**options)
        # Validates the layers now rather than at fit time; its specs serve the predictive.
        self.fitter = CurvatureFitter(model, likelihood, self.options)
        self.curvature: KronCurvature | None = None
        self.output_factors: OutputFactors | None = None  # per-output noise (regression)
        self.mean: Tensor | None = None
        self._spectrum: Spectrum | None = None
        self.prior_mean = prior_mean
        self.prior_precision = prior_precision
        self.sigma_noise = sigma_noise
        self.temperature = temperature

    # ------------------------------------------------------------------ hyperparameters
    @property
    def sigma_noise(self) -> Tensor:
        """Observation noise ``sigma`` (regression): 0-d, or ``[C]`` per output (float64)."""
        return self._sigma_noise

    @sigma_noise.setter
    def sigma_noise(self, value) -> None:
        self._sigma_noise, curv = set_sigma_noise(self, value)
        if curv is not None:  # per-output noise: H(w) rebuilt for the new w = 1 / sigma^2
            self.curvature, self._spectrum = curv, None

    temperature = Checked(
        lambda v: float(positive("temperature", v)),
        "Temperature ``T``: the curvature and log-likelihood are divided by it.",
    )

    @property
    def prior_mean(self) -> Tensor | None:
        """``mu_0`` as a vector over the covered parameters (``None``: zero)."""
        return self._prior_mean

    @prior_mean.setter
    def prior_mean(self, value) -> None:
        if value is not None:
            value = self._flat_vector("prior_mean", value, self.flat_parameters())
        self._prior_mean, self._spectrum = value, None

    def _flat_vector(self, name: str, value, like: Tensor) -> Tensor:
        shapes = dict((n, p.shape) for n, p in self.model.named_parameters())
        names = self.fitter.param_names
        return flat_vector(name, value, names, [shapes[n] for n in names], like)

    @property
    def prior_precision(self) -> Tensor:
        """``delta``: a 0-d tensor, one value per block ``[n_blocks]`` or one per parameter
        ``[P]`` (float64)."""
        return self._prior_precision

    @prior_precision.setter
    def prior_precision(self, value) -> None:
        if isinstance(value, Mapping):  # one precision per parameter, by name
            value = self._flat_vector("prior_precision", value, torch.zeros(0, dtype=torch.float64))
        t = positive("prior_precision", value)
        if t.ndim == 1 and t.numel() == 1:
            t = t.reshape(())
        if self.curvature is not None:
            check_prior_length(t, self.curvature)
        self._prior_precision = t

    # ------------------------------------------------------------------ fitting
    def fit(
        self,
        data: Iterable,
        progress: bool = False,
        checkpoint: str | os.PathLike | None = None,
        checkpoint_every: int | None = None,
        reset: bool = True,
    ) -> KronPosterior:
        """Fit the curvature at the model's current parameters (the MAP) and return ``self``.

        ``data`` yields ``(inputs, targets)`` batches; EKFAC iterates it twice. With
        ``checkpoint`` the accumulation is saved every ``checkpoint_every`` batches and a call
        with the same path resumes an interrupted fit. ``reset=False`` adds ``data`` to the
        curvature already fitted (KFAC: :func:`~laplace_kron.kron_sum.add_curvatures`), e.g. data
        that arrives in parts; the parameters should not have moved in between. On error the
        previous fit (if any) is kept.
        """
        if not reset and self.output_factors is not None:
            raise ValueError(
                "fit(reset=False) does not add per-output factors: fit all data at once"
            )
        if not reset and self.curvature_type == "ekfac":
            add_curvatures(self.require_fit(), self.require_fit())  # raises: not for EKFAC
        curv = self.fitter.fit(self.curvature_type, data, progress, checkpoint, checkpoint_every)
        if not reset and self.curvature is not None:
            if not torch.equal(self.flat_parameters(), self.mean):
                warnings.warn(
                    "fit(reset=False): the model's parameters moved since the previous fit; the "
                    "accumulated curvature mixes two linearisation points",
                    stacklevel=2,
                )
            swapped = {s.weight_name for s in self.specs if s.transposed and s.has_weight}
            curv = add_curvatures(self.curvature, curv, swapped)
        check_prior_length(self.prior_precision, curv)
        self._set_fit(curv, self.flat_parameters().clone(), self.fitter.output_factors(curv))
        return self

    def set_curvature(self, curvature: KronCurvature) -> KronPosterior:
        """Use a curvature computed elsewhere (e.g. by :func:`laplace_kron.kfac` or from a
        training preconditioner) with the model's current parameters as the mean. It must cover
        this posterior's parameters (``param_names``) for the same likelihood."""
        if not isinstance(curvature, KronCurvature):
            raise TypeError(f"expected a KronCurvature, got {type(curvature).__name__}")
        if curvature.likelihood != self.likelihood:
            raise ValueError(
                f"the curvature is for likelihood={curvature.likelihood!r}, this posterior "
                f"for {self.likelihood!r}"
            )
        if list(curvature.param_names) != self.fitter.param_names:
            raise ValueError(
                f"the curvature covers {curvature.param_names}, this posterior "
                f"{self.fitter.param_names}; pass matching modules= / separate_bias="
            )
        check_prior_length(self.prior_precision, curvature)
        self.curvature_type = curvature.kind
        self._set_fit(curvature, self.flat_parameters().clone())
        return self

    def _set_fit(self, curvature: KronCurvature, mean: Tensor, factors=None) -> None:
        """Install a fit; with per-output ``factors`` the curvature is ``H(w)`` of the noise."""
        curvature = noisy_curvature(self.sigma_noise, curvature, factors)
        self.output_factors, self._spectrum = factors, None
        self.curvature, self.mean = curvature, mean

    def require_fit(self) -> KronCurvature:
        """The fitted curvature; RuntimeError if :meth:`fit` (or a load) has not happened."""
        if self.curvature is None:
            raise RuntimeError("the Laplace approximation is not fitted yet: call .fit(data) first")
        return self.curvature

    # ------------------------------------------------------------------ basic quantities
    @property
    def specs(self) -> list[LayerSpec]:
        """The covered layers (kept from construction / the fit; used by the predictive)."""
        return self.fitter.specs

    @property
    def param_names(self) -> list[str]:
        """Covered parameter names; the order of :attr:`mean` and of samples."""
        return self.require_fit().param_names

    @property
    def n_params(self) -> int:
        """Number of covered parameters ``P``."""
        return self.require_fit().n_params

    @property
    def num_data(self) -> int:
        """Number of data points ``N`` the posterior was fitted on."""
        return self.require_fit().num_data

    @property
    def n_blocks(self) -> int:
        """Number of blocks, Kronecker and diagonal (the length of a per-block prior precision)."""
        return len(self.require_fit().blocks)

    def flat_parameters(self) -> Tensor:
        """The model's current covered parameters as one detached vector ``[P]`` (the fitter's
        :attr:`param_names` order)."""
        params = dict(self.model.named_parameters())
        return torch.cat([params[n].detach().reshape(-1) for n in self.fitter.param_names])

    def unflatten(self, vec: Tensor) -> dict[str, Tensor]:
        """A flat vector ``[P]`` as views shaped like the covered parameters, by name."""
        params = dict(self.model.named_parameters())
        out, start = {}, 0
        for n in self.param_names:
            p = params[n]
            out[n] = vec[start : start + p.numel()].view_as(p)
            start += p.numel()
        return out

    def precision_scale(self, sigma_noise: Tensor | None = None) -> Tensor:
        """``c = 1 / (T sigma^2)`` (regression) or ``1 / T``: the factor multiplying ``H``."""
        if self.likelihood != "regression" or self.output_factors is not None:
            if sigma_noise is not None and self.output_factors is not None:
                raise ValueError("per-output noise is in the curvature H(w), not in a scale")
            return torch.tensor(1.0 / self.temperature, dtype=torch.float64)
        sigma = self.sigma_noise if sigma_noise is None else sigma_noise
        return 1.0 / (self.temperature * sigma**2)

    def block_deltas(self, prior_precision: Tensor | None = None) -> Tensor:
        """The prior precision as one value per block, ``[n_blocks]`` (keeps autograd); a
        per-parameter one has none (ValueError)."""
        d = self.prior_precision if prior_precision is None else prior_precision
        return block_values(d, self.require_fit())

    def spectrum(self) -> Spectrum:
        """Cached compressed spectrum (non-zero eigenvalues, zero counts, ``||theta*_l||^2``).

        All undamped eigenvalues are gathered once in float64 so that the evidence and its
        gradient are a pass over the non-zero ones: tuning never touches the data.
        """
        if self._spectrum is None:
            curv = self.require_fit()
            sq = []
            for b in curv.blocks:
                idx = curv.block_index(b).to(self.mean.device)
                d = self.mean if self.prior_mean is None else self.mean - self.prior_mean
                sq.append(d[idx].to(torch.float64).pow(2).sum())
            self._spectrum = Spectrum.from_blocks(
                [b.eigvals() for b in curv.blocks], torch.stack(sq)
            )
        return self._spectrum

    def damping(self) -> tuple[Tensor, Tensor | list[Tensor]]:
        """``(c, delta)`` in the curvature's dtype: the scale of ``H`` and the prior precision
        (per parameter: each block's eigenvalue-shaped damping, :mod:`~laplace_kron.diagprior`)."""
        curv = self.require_fit()
        dtype = curv.blocks[0].dtype
        return self.precision_scale().to(dtype), block_dampings(self.prior_precision, curv, dtype)

    @property
    def posterior_precision(self) -> DampedKron:
        """``Lambda = c H + delta I`` as a lazy Kronecker object (``.to_dense()`` for small P)."""
        return DampedKron(self.require_fit(), *self.damping(), 1)

    @property
    def posterior_covariance(self) -> DampedKron:
        """``Sigma = Lambda^{-1}`` as a lazy Kronecker object."""
        return DampedKron(self.require_fit(), *self.damping(), -1)

    # ------------------------------------------------------------------ sampling
    def sample(self, n_samples: int = 100, generator: torch.Generator | None = None) -> Tensor:
        """Parameter samples ``theta* + Lambda^{-1/2} z``, ``z ~ N(0, I)``: ``[n_samples, P]``."""
        curv = self.require_fit()
        positive_int("n_samples", n_samples)
        z = torch.randn(n_samples, curv.n_params, generator=generator, dtype=self.mean.dtype)
        return self.mean + curv.inv_sqrt_matvec(z.to(self.mean.device), *self.damping())

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        """Tensors and plain metadata only (loadable with ``torch.load(weights_only=True)``)."""
        curv = self.require_fit()
        factors = self.output_factors
        curv = curv if factors is None else factors.base  # saved for sigma = 1
        params = dict(self.model.named_parameters())
        opts = self.options
        return {
            "likelihood": self.likelihood,
            "curvature_type": self.curvature_type,
            "fisher": opts.fisher,
            "mc_samples": opts.mc_samples,
            "weight_sharing": opts.weight_sharing,
            "separate_bias": opts.separate_bias,
            "prior_precision": self.prior_precision.clone(),
            "sigma_noise": self.sigma_noise.clone(),
            "temperature": self.temperature,
            "mean": self.mean.clone(),
            "prior_mean": None if self.prior_mean is None else self.prior_mean.clone(),
            "param_names": list(curv.param_names),
            "param_shapes": [list(params[n].shape) for n in curv.param_names],
            "num_data": curv.num_data,
            "loss": curv.loss,
            "sse": curv.sse,
            "n_outputs": curv.n_outputs,
            "kind": curv.kind,
            "blocks": [block_state(b) for b in curv.blocks],
            "output_factors": None if factors is None else factors.state_dict(),
        }

    def load_state_dict(self, state: dict, name: str = "the state") -> KronPosterior:
        """Restore a fit saved by :meth:`state_dict`; the model must have the same covered
        parameters (names and shapes) and the same likelihood. A malformed or poisoned state
        (NaN / Inf anywhere, missing keys, wrong types or sizes) is refused with ValueError and
        leaves this posterior unchanged; ``name`` (a file path) is quoted in the errors."""
        if not isinstance(state, dict):
            raise ValueError(f"{name} is not a laplace_kron.KronLaplace state (not a dict)")
        io.check_finite(state, name)
        with io.reading(name):
            self._check_state(state, name)
            try:
                curv, mean, hyper = _parse_state(state)
                factors = state.get("output_factors")  # absent in files of earlier versions
                factors = None if factors is None else OutputFactors.from_state(factors, curv)
                names, shapes = list(state["param_names"]), state["param_shapes"]
                saved_mean = state.get("prior_mean")  # absent in files of earlier versions
                if saved_mean is not None:
                    shapes = [torch.Size(s) for s in shapes]
                    saved_mean = flat_vector("prior_mean", saved_mean, names, shapes, mean)
            except ValueError as e:
                raise ValueError(f"{name} is malformed: {e}") from e
        if not torch.equal(self.flat_parameters().cpu().to(mean.dtype), mean.cpu()):
            warnings.warn(
                "the model's current parameters differ from the saved posterior mean; the GLM "
                "predictive linearises at the model's parameters. Load the MAP weights into the "
                "model first (e.g. model.load_state_dict(...)).",
                stacklevel=2,
            )
        self.curvature_type = state["kind"]
        if factors is not None:
            self.fitter.keep_per_output(factors.n_outputs)
        self._sigma_noise = hyper[1]  # before the fit: per-output factors are weighted by it
        self._set_fit(curv, mean.clone(), factors)
        self._prior_mean = None if saved_mean is None else saved_mean.to(self.flat_parameters())
        self.prior_precision, self.temperature = hyper[0], hyper[2]
        return self

    def _check_state(self, state: dict, name: str) -> None:
        """The state belongs to this model and these settings (ValueError otherwise)."""
        if state["likelihood"] != self.likelihood:
            raise ValueError(
                f"{name} was fitted with likelihood={state['likelihood']!r}, this posterior "
                f"uses {self.likelihood!r}"
            )
        params = dict(self.model.named_parameters())
        missing = [n for n in state["param_names"] if n not in params]
        if missing:
            raise ValueError(f"the model has no parameters named {missing} that {name} covers")
        wrong = [
            f"{n}: saved {tuple(s)} vs model {tuple(params[n].shape)}"
            for n, s in zip(state["param_names"], state["param_shapes"], strict=True)
            if tuple(params[n].shape) != tuple(s)
        ]
        if wrong:
            raise ValueError(
                "parameter shapes differ between the state and the model: " + "; ".join(wrong)
            )
        expected = self.fitter.param_names
        if list(state["param_names"]) != expected:
            raise ValueError(
                f"{name} covers parameters {state['param_names']} but this posterior's settings "
                f"cover {expected}; pass matching modules= / separate_bias="
            )
        if state["kind"] not in POSTERIOR_CURVATURES:
            raise ValueError(f"{name} is malformed: unknown curvature {state['kind']!r}")


def _parse_state(state: dict) -> tuple[KronCurvature, Tensor, tuple[Tensor, Tensor, float]]:
    """The curvature, mean and ``(prior_precision, sigma_noise, temperature)`` of a state."""
    blocks = [parse_block(b) for b in state["blocks"]]
    curv = KronCurvature(
        blocks,
        list(state["param_names"]),
        int(state["num_data"]),
        likelihood=state["likelihood"],
        fisher=state["fisher"],
        loss=float(state["loss"]),
        sse=float(state["sse"]),
        n_outputs=int(state["n_outputs"]),
        kind=state["kind"],
    )
    mean = state["mean"]
    if not isinstance(mean, Tensor) or mean.shape != (curv.n_params,):
        raise ValueError("its mean does not match its blocks")
    hyper = (
        positive("prior_precision", state["prior_precision"]),
        positive("sigma_noise", state["sigma_noise"]),
        float(positive("temperature", state["temperature"])),
    )
    check_prior_length(hyper[0], curv)
    return curv, mean, hyper
