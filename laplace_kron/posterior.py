"""The Kronecker-factored Laplace posterior ``N(theta*, Lambda^{-1})``.

Per block ``l`` the posterior precision is

    Lambda_l = H_l / (T * sigma^2) + delta_l * I        (regression)
    Lambda_l = H_l / T + delta_l * I                    (classification, binary)

with ``H_l`` the KFAC / EKFAC curvature of the summed negative log-likelihood (stored for
``sigma = 1``), ``T`` the temperature and ``delta_l`` the prior precision (one scalar, or one per
block). All operations act on the eigenvalues ``c * lambda + delta`` (``c = 1 / (T sigma^2)``), so
changing ``delta`` or ``sigma`` never needs another pass over the data.
"""

from __future__ import annotations

import math
import os
import pickle
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .curvature import CurvatureFitter, CurvatureOptions
from .curvature.likelihoods import check_likelihood
from .kron import KronBlock, KronCurvature
from .spectrum import Spectrum

__all__ = ["KronLaplace", "DampedKron"]

FORMAT_NAME = "laplace_kron.KronLaplace"
FORMAT_VERSION = 1
CURVATURES = ("kfac", "ekfac")


@dataclass
class DampedKron:
    """``(c * H + delta I)^power`` for ``power`` in ``{1, -1}``: a lazily evaluated posterior
    precision (``power=1``) or covariance (``power=-1``)."""

    curvature: KronCurvature
    scale: Tensor
    delta: Tensor
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
        return self.power * self.curvature.logdet(self.scale, self.delta)

    def __matmul__(self, v: Tensor) -> Tensor:
        return self.matvec(v.T).T if v.ndim == 2 else self.matvec(v)


def _positive(name: str, value) -> Tensor:
    t = torch.as_tensor(value, dtype=torch.float64).detach().clone()
    if t.ndim > 1:
        raise ValueError(f"{name} must be a scalar or a 1-d tensor, got shape {tuple(t.shape)}")
    if not torch.isfinite(t).all() or (t <= 0).any():
        raise ValueError(f"{name} must be positive and finite, got {value!r}")
    return t


class KronLaplace:
    """Post-hoc Laplace approximation with KFAC / EKFAC curvature.

    Args:
        model: trained network (at the MAP); its current parameters are the posterior mean.
        likelihood: ``"classification"``, ``"regression"`` or ``"binary"``.
        curvature: ``"kfac"`` or ``"ekfac"``.
        fisher, mc_samples, weight_sharing, separate_bias, modules, generator: as in
            :func:`laplace_kron.kfac`; ``modules="last_layer"`` gives last-layer Laplace.
        distributed: ``None`` fits data-parallel when ``torch.distributed`` is initialised
            (each rank's data is a shard; see docs/distributed.md), ``False`` fits rank-locally.
        prior_precision: ``delta``, a positive scalar or one value per block.
        sigma_noise: observation noise (regression only).
        temperature: ``T``; the curvature (and the log-likelihood) are divided by it.

    Example:
        >>> la = KronLaplace(model, "classification").fit(train_loader)
        >>> la.optimize_prior_precision()
        >>> probs = la.predict(x_test)
    """

    def __init__(
        self,
        model: nn.Module,
        likelihood: str,
        curvature: str = "kfac",
        fisher: str = "mc",
        mc_samples: int = 1,
        prior_precision: float | Tensor | Sequence[float] = 1.0,
        sigma_noise: float | Tensor = 1.0,
        temperature: float = 1.0,
        modules: None | str | Sequence = None,
        weight_sharing: str = "expand",
        separate_bias: bool = False,
        generator: torch.Generator | None = None,
        distributed: bool | None = None,
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        check_likelihood(likelihood)
        if curvature not in CURVATURES:
            raise ValueError(f"curvature must be one of {CURVATURES}, got {curvature!r}")
        if likelihood != "regression" and float(torch.as_tensor(sigma_noise)) != 1.0:
            raise ValueError("sigma_noise is only used for likelihood='regression'; leave it at 1")
        self.model = model
        self.likelihood = likelihood
        self.curvature_type = curvature
        self.fisher = fisher
        self.mc_samples = mc_samples
        self.modules = modules
        self.weight_sharing = weight_sharing
        self.separate_bias = separate_bias
        self.generator = generator
        self.distributed = distributed
        self.prior_precision = prior_precision
        self.sigma_noise = sigma_noise
        self.temperature = temperature
        self.curvature: KronCurvature | None = None
        self.mean: Tensor | None = None
        # Validate the options (layers, fisher, ...) now rather than at fit time.
        self._make_fitter()

    # ------------------------------------------------------------------ hyperparameters
    @property
    def prior_precision(self) -> Tensor:
        """``delta``: a 0-d tensor or one value per block ``[n_blocks]`` (float64)."""
        return self._prior_precision

    @prior_precision.setter
    def prior_precision(self, value) -> None:
        t = _positive("prior_precision", value)
        if t.ndim == 1 and t.numel() == 1:
            t = t.reshape(())
        if t.ndim == 1 and getattr(self, "curvature", None) is not None:
            self._check_n_blocks(t)
        self._prior_precision = t

    def _check_n_blocks(self, t: Tensor) -> None:
        n = len(self.curvature.blocks)
        if t.shape != (n,):
            raise ValueError(
                f"prior_precision has {t.numel()} values but the posterior has {n} blocks; "
                "give a scalar or one value per block"
            )

    @property
    def sigma_noise(self) -> Tensor:
        """Observation noise ``sigma`` (regression), a 0-d float64 tensor."""
        return self._sigma_noise

    @sigma_noise.setter
    def sigma_noise(self, value) -> None:
        t = _positive("sigma_noise", value)
        if t.ndim != 0:
            raise ValueError("sigma_noise must be a scalar")
        self._sigma_noise = t

    @property
    def temperature(self) -> float:
        """Temperature ``T``: the curvature and log-likelihood are divided by it."""
        return self._temperature

    @temperature.setter
    def temperature(self, value: float) -> None:
        self._temperature = float(_positive("temperature", value))

    # ------------------------------------------------------------------ fitting
    def _make_fitter(self) -> CurvatureFitter:
        options = CurvatureOptions(
            fisher=self.fisher,
            mc_samples=self.mc_samples,
            weight_sharing=self.weight_sharing,
            separate_bias=self.separate_bias,
            modules=self.modules,
            generator=self.generator,
            distributed=self.distributed,
        )
        return CurvatureFitter(self.model, self.likelihood, options)

    def fit(
        self,
        data: Iterable,
        progress: bool = False,
        checkpoint: str | os.PathLike | None = None,
        checkpoint_every: int | None = None,
    ) -> KronLaplace:
        """Fit the curvature at the model's current parameters (the MAP) and return ``self``.

        ``data`` yields ``(inputs, targets)`` batches; EKFAC iterates it twice. With
        ``checkpoint`` the accumulation is saved every ``checkpoint_every`` batches and a call
        with the same path resumes an interrupted fit. On error the previous fit (if any) is kept.
        """
        fitter = self._make_fitter()
        # As before: checkpoint_every is ignored without a checkpoint path.
        every = None if checkpoint is None else checkpoint_every
        curv = fitter.fit(self.curvature_type, data, progress, checkpoint, every)
        params = dict(self.model.named_parameters())
        mean = torch.cat([params[n].detach().reshape(-1) for n in curv.param_names]).clone()
        if self.prior_precision.ndim == 1 and self.prior_precision.shape != (len(curv.blocks),):
            raise ValueError(
                f"prior_precision has {self.prior_precision.numel()} values but the fitted "
                f"posterior has {len(curv.blocks)} blocks"
            )
        self.curvature, self.mean = curv, mean
        self._cache = None
        return self

    def _require_fit(self) -> KronCurvature:
        if self.curvature is None:
            raise RuntimeError("the Laplace approximation is not fitted yet: call .fit(data) first")
        return self.curvature

    # ------------------------------------------------------------------ basic quantities
    @property
    def param_names(self) -> list[str]:
        """Covered parameter names; the order of :attr:`mean` and of samples."""
        return self._require_fit().param_names

    @property
    def n_params(self) -> int:
        """Number of covered parameters ``P``."""
        return self._require_fit().n_params

    @property
    def num_data(self) -> int:
        """Number of data points ``N`` the posterior was fitted on."""
        return self._require_fit().num_data

    @property
    def n_blocks(self) -> int:
        """Number of Kronecker blocks (the length of a per-layer prior precision)."""
        return len(self._require_fit().blocks)

    def precision_scale(self, sigma_noise: Tensor | None = None) -> Tensor:
        """``c = 1 / (T sigma^2)`` (regression) or ``1 / T``: the factor multiplying ``H``."""
        if self.likelihood != "regression":
            return torch.tensor(1.0 / self.temperature, dtype=torch.float64)
        sigma = self.sigma_noise if sigma_noise is None else sigma_noise
        return 1.0 / (self.temperature * sigma**2)

    def block_deltas(self, prior_precision: Tensor | None = None) -> list[Tensor]:
        """Prior precision broadcast to one 0-d tensor per block."""
        curv = self._require_fit()
        d = self.prior_precision if prior_precision is None else prior_precision
        if d.ndim == 0:
            return [d] * len(curv.blocks)
        if d.shape != (len(curv.blocks),):
            raise ValueError(f"prior precision must be a scalar or have {len(curv.blocks)} values")
        return list(d.unbind())

    def _spectrum(self) -> Spectrum:
        """Cached compressed spectrum (non-zero eigenvalues, zero counts, ``||theta*_l||^2``).

        All undamped eigenvalues are gathered once in float64 so that the evidence and its
        gradient are a pass over the non-zero ones: tuning never touches the data.
        """
        if self._cache is None:
            curv = self._require_fit()
            sq = []
            for b in curv.blocks:
                idx = curv.block_index(b).to(self.mean.device)
                sq.append(self.mean[idx].to(torch.float64).pow(2).sum())
            self._cache = Spectrum.from_blocks([b.eigvals() for b in curv.blocks], torch.stack(sq))
        return self._cache

    @property
    def posterior_precision(self) -> DampedKron:
        """``Lambda = c H + delta I`` as a lazy Kronecker object (``.to_dense()`` for small P)."""
        return DampedKron(self._require_fit(), self._scale_t(), self._delta_t(), 1)

    @property
    def posterior_covariance(self) -> DampedKron:
        """``Sigma = Lambda^{-1}`` as a lazy Kronecker object."""
        return DampedKron(self._require_fit(), self._scale_t(), self._delta_t(), -1)

    def _dtype(self) -> torch.dtype:
        return self._require_fit().blocks[0].dtype

    def _scale_t(self) -> Tensor:
        return self.precision_scale().to(self._dtype())

    def _delta_t(self) -> Tensor:
        return self.prior_precision.to(self._dtype())

    # ------------------------------------------------------------------ evidence
    def log_det_posterior_precision(self, prior_precision=None, sigma_noise=None) -> Tensor:
        """``log det Lambda = sum_l sum_ij log(c lambda_l,ij + delta_l)`` (float64), computed
        over the non-zero eigenvalues with the zero ones counted (:mod:`laplace_kron.spectrum`)."""
        c = torch.as_tensor(self.precision_scale(sigma_noise), dtype=torch.float64)
        d = self.prior_precision if prior_precision is None else prior_precision
        spec = self._spectrum()
        if d.ndim == 0:
            d = d.expand(spec.n_blocks)
        else:
            self.block_deltas(d)  # validates the length
        return spec.logdet(c, d.to(torch.float64))

    def log_det_prior_precision(self, prior_precision=None) -> Tensor:
        """``sum_l P_l log delta_l``."""
        deltas = self.block_deltas(prior_precision)
        sizes = self._require_fit().block_sizes
        return sum(n * torch.log(d) for n, d in zip(sizes, deltas, strict=True))

    def scatter(self, prior_precision=None) -> Tensor:
        """``sum_l delta_l ||theta*_l||^2`` (zero prior mean)."""
        d = self.prior_precision if prior_precision is None else prior_precision
        sq = self._spectrum().sq
        return (d * sq).sum() if d.ndim == 1 else d * sq.sum()

    def log_likelihood(self, sigma_noise=None) -> Tensor:
        """``log p(D | theta*)`` tempered by ``T`` (as laplace-torch): ``-NLL / T`` for
        classification; ``-sse / (2 sigma^2 T) - N D log(sigma sqrt(2 pi))`` for regression."""
        curv = self._require_fit()
        if self.likelihood != "regression":
            return torch.tensor(-curv.loss / self.temperature, dtype=torch.float64)
        sigma = self.sigma_noise if sigma_noise is None else sigma_noise
        nd = curv.num_data * curv.n_outputs
        return -0.5 * curv.sse / (sigma**2 * self.temperature) - nd * torch.log(
            sigma * math.sqrt(2 * math.pi)
        )

    def log_marginal_likelihood(
        self, prior_precision: Tensor | None = None, sigma_noise: Tensor | None = None
    ) -> Tensor:
        """Laplace evidence, differentiable in ``prior_precision`` and ``sigma_noise``:

        ``log p(D|theta*) - 1/2 sum_l delta_l ||theta*_l||^2 + 1/2 sum_l P_l log delta_l
        - 1/2 log det Lambda``. Only eigenvalues are touched: no pass over the data.
        """
        self._require_fit()
        if prior_precision is not None and not isinstance(prior_precision, Tensor):
            prior_precision = torch.as_tensor(prior_precision, dtype=torch.float64)
        if sigma_noise is not None and not isinstance(sigma_noise, Tensor):
            sigma_noise = torch.as_tensor(sigma_noise, dtype=torch.float64)
        for name, v in (("prior_precision", prior_precision), ("sigma_noise", sigma_noise)):
            if v is not None and (not torch.isfinite(v.detach()).all() or (v.detach() <= 0).any()):
                raise ValueError(f"{name} must be positive and finite, got {v.detach()}")
        return (
            self.log_likelihood(sigma_noise)
            - 0.5 * self.scatter(prior_precision)
            + 0.5 * self.log_det_prior_precision(prior_precision)
            - 0.5 * self.log_det_posterior_precision(prior_precision, sigma_noise)
        )

    def optimize_prior_precision(
        self,
        method: str = "marglik",
        granularity: str = "scalar",
        n_steps: int = 100,
        lr: float = 0.1,
        tune_sigma_noise: bool = False,
        val_loader: Iterable | None = None,
        grid: Sequence[float] | Tensor | None = None,
        tol: float = 1e-6,
        optimizer: str = "lbfgs",
        predict_kwargs: dict | None = None,
    ) -> dict:
        """Tune the prior precision (and ``sigma_noise``); see :mod:`laplace_kron.marglik`.

        Returns a report with the method, iterations, final evidence and chosen values.
        """
        from .marglik import optimize_prior_precision

        return optimize_prior_precision(
            self,
            method=method,
            granularity=granularity,
            n_steps=n_steps,
            lr=lr,
            tune_sigma_noise=tune_sigma_noise,
            val_loader=val_loader,
            grid=grid,
            tol=tol,
            optimizer=optimizer,
            predict_kwargs=predict_kwargs,
        )

    # ------------------------------------------------------------------ sampling
    def sample(self, n_samples: int = 100, generator: torch.Generator | None = None) -> Tensor:
        """Parameter samples ``theta* + Lambda^{-1/2} z``, ``z ~ N(0, I)``: ``[n_samples, P]``."""
        curv = self._require_fit()
        if not isinstance(n_samples, int) or n_samples < 1:
            raise ValueError(f"n_samples must be a positive integer, got {n_samples!r}")
        z = torch.randn(n_samples, curv.n_params, generator=generator, dtype=self.mean.dtype)
        z = z.to(self.mean.device)
        return self.mean + curv.inv_sqrt_matvec(z, self._scale_t(), self._delta_t())

    # ------------------------------------------------------------------ prediction
    def functional_covariance(self, x, **kw) -> Tensor:
        """``J(x) Sigma J(x)^T`` ``[B, C, C]``; see :func:`laplace_kron.predictive.functional_covariance`."""
        from .predictive import functional_covariance

        return functional_covariance(self, x, **kw)

    def functional_variance(self, x, **kw) -> Tensor:
        """Diagonal of :meth:`functional_covariance`, ``[B, C]``."""
        from .predictive import functional_variance

        return functional_variance(self, x, **kw)

    def predict(self, x, method: str = "glm", link: str = "probit", **kw):
        """Predictive distribution; see :func:`laplace_kron.predictive.predict`."""
        from .predictive import predict

        return predict(self, x, method=method, link=link, **kw)

    # ------------------------------------------------------------------ persistence
    def state_dict(self) -> dict:
        """Tensors and plain metadata only (loadable with ``torch.load(weights_only=True)``)."""
        curv = self._require_fit()
        params = dict(self.model.named_parameters())
        return {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "likelihood": self.likelihood,
            "curvature_type": self.curvature_type,
            "fisher": self.fisher,
            "mc_samples": self.mc_samples,
            "weight_sharing": self.weight_sharing,
            "separate_bias": self.separate_bias,
            "prior_precision": self.prior_precision.clone(),
            "sigma_noise": self.sigma_noise.clone(),
            "temperature": self.temperature,
            "mean": self.mean.clone(),
            "param_names": list(curv.param_names),
            "param_shapes": [list(params[n].shape) for n in curv.param_names],
            "num_data": curv.num_data,
            "loss": curv.loss,
            "sse": curv.sse,
            "n_outputs": curv.n_outputs,
            "kind": curv.kind,
            "blocks": [
                {
                    "G": b.G.clone(),
                    "A": None if b.A is None else b.A.clone(),
                    "eigenvalues": None if b.eigenvalues is None else b.eigenvalues.clone(),
                    "param_names": list(b.param_names),
                    "param_shapes": [list(s) for s in b.param_shapes],
                    "bias_joint": b.bias_joint,
                }
                for b in curv.blocks
            ],
        }

    def load_state_dict(self, state: dict) -> KronLaplace:
        """Restore a fit saved by :meth:`state_dict`; the model must have the same covered
        parameters (names and shapes) and the same likelihood."""
        if not isinstance(state, dict) or state.get("format") != FORMAT_NAME:
            raise ValueError("not a laplace_kron.KronLaplace state (missing or wrong 'format')")
        if state.get("version") != FORMAT_VERSION:
            raise ValueError(
                f"state has format version {state.get('version')!r}; this laplace_kron reads "
                f"version {FORMAT_VERSION}"
            )
        try:
            _validate_state(state, self)
            blocks = [
                KronBlock(
                    b["G"],
                    b["A"],
                    list(b["param_names"]),
                    [torch.Size(s) for s in b["param_shapes"]],
                    bool(b["bias_joint"]),
                    b["eigenvalues"],
                )
                for b in state["blocks"]
            ]
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
        except (KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"corrupted laplace_kron state: {e!r}") from e
        if curv.n_params != state["mean"].numel():
            raise ValueError("corrupted laplace_kron state: mean does not match the blocks")
        params = dict(self.model.named_parameters())
        current = torch.cat([params[n].detach().reshape(-1).cpu() for n in curv.param_names])
        if not torch.equal(current.to(state["mean"].dtype), state["mean"].cpu()):
            warnings.warn(
                "the model's current parameters differ from the saved posterior mean; the GLM "
                "predictive linearises at the model's parameters. Load the MAP weights into the "
                "model first (e.g. model.load_state_dict(...)).",
                stacklevel=2,
            )
        self.curvature_type = state["curvature_type"]
        self.fisher = state["fisher"]
        self.curvature = curv
        self.mean = state["mean"].clone()
        self._cache = None
        self.prior_precision = state["prior_precision"]
        self.sigma_noise = state["sigma_noise"]
        self.temperature = state["temperature"]
        return self

    def save(self, path: str | os.PathLike) -> None:
        """Save :meth:`state_dict` to ``path`` (atomically: temp file, then rename)."""
        path = os.fspath(path)
        tmp = f"{path}.tmp-{os.getpid()}"
        torch.save(self.state_dict(), tmp)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike, model: nn.Module, **kwargs) -> KronLaplace:
        """Load a posterior saved with :meth:`save` for ``model``; never executes pickled code."""
        state = _safe_load(path)
        if state.get("format") != FORMAT_NAME:
            raise ValueError(
                f"{os.fspath(path)!r} is not a laplace_kron.KronLaplace file (missing or wrong "
                "'format'); was it written by KronLaplace.save?"
            )
        if "likelihood" not in state:
            raise ValueError("corrupted laplace_kron state: missing 'likelihood'")
        kw = dict(
            curvature=state.get("curvature_type", "kfac"),
            fisher=state.get("fisher", "mc"),
            mc_samples=state.get("mc_samples", 1),
            weight_sharing=state.get("weight_sharing", "expand"),
            separate_bias=state.get("separate_bias", False),
            modules=[n.rsplit(".", 1)[0] for n in state.get("param_names", [])] or None,
        )
        kw.update(kwargs)
        try:
            la = cls(model, state["likelihood"], **kw)
        except ValueError as e:
            raise ValueError(f"the saved posterior does not fit this model: {e}") from e
        return la.load_state_dict(state)


def _safe_load(path) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(
            f"refusing to load {os.fspath(path)!r}: it contains objects other than tensors and "
            "plain data (a tampered or foreign file); nothing was executed"
        ) from e
    except (RuntimeError, EOFError, OSError) as e:
        if isinstance(e, FileNotFoundError):
            raise
        raise ValueError(f"cannot read {os.fspath(path)!r} as a laplace_kron file: {e}") from e
    if not isinstance(state, dict):
        raise ValueError(f"{os.fspath(path)!r} is not a laplace_kron.KronLaplace file")
    return state


def _validate_state(state: dict, la: KronLaplace) -> None:
    if state["likelihood"] != la.likelihood:
        raise ValueError(
            f"the state was fitted with likelihood={state['likelihood']!r}, this posterior "
            f"uses {la.likelihood!r}"
        )
    params = dict(la.model.named_parameters())
    missing = [n for n in state["param_names"] if n not in params]
    if missing:
        raise ValueError(f"the model has no parameters named {missing} that the state covers")
    wrong = [
        f"{n}: saved {tuple(s)} vs model {tuple(params[n].shape)}"
        for n, s in zip(state["param_names"], state["param_shapes"], strict=True)
        if tuple(params[n].shape) != tuple(s)
    ]
    if wrong:
        raise ValueError(
            "parameter shapes differ between the state and the model: " + "; ".join(wrong)
        )
    expected = la._make_fitter().param_names
    if list(state["param_names"]) != expected:
        raise ValueError(
            f"the state covers parameters {state['param_names']} but this posterior's settings "
            f"cover {expected}; pass matching modules= / separate_bias="
        )
    for b in state["blocks"]:
        for key in ("G", "A", "eigenvalues"):
            t = b[key]
            if t is not None and (not isinstance(t, Tensor) or not torch.isfinite(t).all()):
                raise ValueError(
                    f"corrupted laplace_kron state: block {key} is not a finite tensor"
                )


# Re-exported for type checkers of predictive code.
PredictFn = Callable[..., Tensor]
