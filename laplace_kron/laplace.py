"""The user-facing :class:`KronLaplace`: the posterior core with its evidence, tuning, predictives
and files in one object.

It adds no mathematics of its own: every method delegates to :mod:`laplace_kron.marglik`,
:mod:`laplace_kron.predictive` or :mod:`laplace_kron.io`, whose functions take the posterior
(:class:`~laplace_kron.posterior.KronPosterior`) as their first argument.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor, nn

from . import io, marglik, predictive
from .constants import POSTERIOR_FORMAT
from .diagprior import DiagPrior, is_per_parameter, param_deltas
from .kron import KronBlock, KronCurvature
from .optim import EKFAC, KroneckerPreconditioner
from .output_noise import noise_weights, per_output_logdet
from .posterior import KronPosterior

__all__ = ["KronLaplace"]

# How mapping batches are read; saved with the posterior so that a loaded one reads them alike.
_BATCH_OPTIONS = ("target_key", "ignore_index", "shift_labels")


class KronLaplace(KronPosterior):
    """Post-hoc Laplace approximation with KFAC / EKFAC curvature.

    Constructed like :class:`~laplace_kron.posterior.KronPosterior`: ``KronLaplace(model,
    likelihood, curvature="kfac", prior_precision=1.0, sigma_noise=1.0, temperature=1.0,
    **options)`` with the curvature options of :class:`~laplace_kron.curvature.CurvatureOptions`
    (``fisher``, ``mc_samples``, ``weight_sharing``, ``separate_bias``, ``modules``,
    ``generator``, ``distributed``, ``target_key``, ``ignore_index``, ``shift_labels``).

    Example:
        >>> la = KronLaplace(model, "classification").fit(train_loader)
        >>> la.optimize_prior_precision()
        >>> probs = la.predict(x_test)
    """

    # ------------------------------------------------------------------ evidence
    def log_likelihood(self, sigma_noise: Tensor | None = None) -> Tensor:
        """``log p(D | theta*)``; see :func:`laplace_kron.marglik.log_likelihood`."""
        return marglik.log_likelihood(self, sigma_noise)

    def log_det_posterior_precision(self, prior_precision=None, sigma_noise=None) -> Tensor:
        """``log det Lambda = sum_l sum_ij log(c lambda_l,ij + delta_l)`` (float64; per
        parameter: ``sum log(c E + D~)``, :mod:`~laplace_kron.diagprior`)."""
        if self.output_factors is not None:  # per-output noise: the eigenvalues depend on it
            sigma = self.sigma_noise if sigma_noise is None else sigma_noise
            w = noise_weights(sigma).expand(self.output_factors.n_outputs)
            deltas = self.block_deltas(prior_precision).double()
            return per_output_logdet(self.output_factors, w, deltas, 1.0 / self.temperature)
        c = self.precision_scale(sigma_noise)
        d = self._prior(prior_precision)
        if is_per_parameter(d, self.require_fit()):
            return DiagPrior.of(self.curvature).logdet(c, d.to(c.dtype))
        return self.spectrum().logdet(c, self.block_deltas(d))

    def log_det_prior_precision(self, prior_precision=None) -> Tensor:
        """``sum_i log delta_i`` over the parameters (``sum_l P_l log delta_l`` per block)."""
        d = self._prior(prior_precision)
        return param_deltas(d, self.require_fit()).to(torch.float64).log().sum()

    def _prior(self, value) -> Tensor:
        """The posterior's prior precision, or ``value`` as a float64 tensor (autograd kept)."""
        return self.prior_precision if value is None else torch.as_tensor(value).double()

    def scatter(self, prior_precision=None) -> Tensor:
        """``sum_i delta_i (theta*_i - mu_i)^2``."""
        deltas = param_deltas(self._prior(prior_precision), self.require_fit())
        sq = self.mean if self.prior_mean is None else self.mean - self.prior_mean
        return (deltas * sq.to(deltas.device, torch.float64).square()).sum()

    def log_marginal_likelihood(
        self, prior_precision: Tensor | None = None, sigma_noise: Tensor | None = None
    ) -> Tensor:
        """Laplace evidence, differentiable in ``prior_precision`` and ``sigma_noise``; see
        :func:`laplace_kron.marglik.log_marginal_likelihood`."""
        return marglik.log_marginal_likelihood(self, prior_precision, sigma_noise)

    def optimize_prior_precision(self, *args, **kwargs) -> dict:
        """Tune the prior precision (and ``sigma_noise``) and return the report; the arguments
        (``method``, ``granularity``, ``n_steps``, ``lr``, ``tune_sigma_noise``, ``val_loader``,
        ``grid``, ``tol``, ``optimizer``, ``predict_kwargs``) are those of
        :func:`laplace_kron.marglik.optimize_prior_precision`."""
        return marglik.optimize_prior_precision(self, *args, **kwargs)

    # ------------------------------------------------------------------ prediction
    def functional_covariance(self, x, joint: bool = False, **kw) -> Tensor:
        """``J(x) Sigma J(x)^T``: ``[B, C, C]``, or ``[B C, B C]`` across inputs with ``joint``;
        see :func:`laplace_kron.predictive.functional_covariance`."""
        return predictive.functional_covariance(self, x, joint=joint, **kw)

    def functional_samples(self, x, n_samples: int = 100, joint: bool = False, **kw) -> Tensor:
        """GLM function samples ``[n, B, C]``; see
        :func:`laplace_kron.glm_joint.functional_samples`."""
        return predictive.functional_samples(self, x, n_samples, joint=joint, **kw)

    def functional_variance(self, x, **kw) -> Tensor:
        """Diagonal of :meth:`functional_covariance`, ``[B, C]``."""
        return predictive.functional_variance(self, x, **kw)

    def predict(self, x, method: str = "glm", link: str = "probit", **kw):
        """Predictive distribution; see :func:`laplace_kron.predictive.predict`."""
        return predictive.predict(self, x, method=method, link=link, **kw)

    # ------------------------------------------------------------------ files
    def state_dict(self) -> dict:
        """:meth:`KronPosterior.state_dict` plus the batch options (``target_key``,
        ``ignore_index``, ``shift_labels``: a loaded posterior reads mapping batches as the fitted
        one did) and the observed-target count of the Gaussian evidence (``n_observed``)."""
        state = super().state_dict()
        opts = self.options
        state.update(
            target_key=opts.target_key,
            ignore_index=opts.ignore_index,
            shift_labels=opts.shift_labels,
            n_observed=self.require_fit().observed_targets,
        )
        return state

    def load_state_dict(self, state: dict, name: str = "the state") -> KronLaplace:
        """:meth:`KronPosterior.load_state_dict` and the observed-target count (states without
        one: ``num_data * n_outputs``, the count before sequence outputs existed)."""
        n_observed = state.get("n_observed") if isinstance(state, dict) else None
        if n_observed is not None and (
            isinstance(n_observed, bool) or not isinstance(n_observed, int) or n_observed < 0
        ):
            raise ValueError(f"{name} is malformed: n_observed must be a non-negative integer")
        super().load_state_dict(state, name)
        self.curvature.n_observed = n_observed
        if self.output_factors is not None:  # the per-output counts and later rebuilds use it
            self.output_factors.base.n_observed = n_observed
        return self

    def save(self, path: str | os.PathLike) -> None:
        """Save :meth:`state_dict` to ``path`` (atomically, see :mod:`laplace_kron.io`)."""
        io.save_file(path, self.state_dict(), POSTERIOR_FORMAT)

    @classmethod
    def load(cls, path: str | os.PathLike, model: nn.Module, **kwargs) -> KronLaplace:
        """Load a posterior saved with :meth:`save` for ``model``; never executes pickled code.
        ``kwargs`` override the saved constructor options. Malformed or poisoned files (NaN /
        Inf, truncated, foreign, another version) are refused with a ValueError naming the file.
        """
        state = io.load_file(path, POSTERIOR_FORMAT)
        name = repr(os.fspath(path))
        with io.reading(name):
            kw = dict(
                curvature=state["curvature_type"],
                fisher=state["fisher"],
                mc_samples=state["mc_samples"],
                weight_sharing=state["weight_sharing"],
                separate_bias=state["separate_bias"],
                modules=_owners(state["param_names"]) or None,
            )
            # Batch options (files written before they existed hold the defaults).
            kw.update({k: state[k] for k in _BATCH_OPTIONS if k in state})
            kw.update(kwargs)
            likelihood = state["likelihood"]
        try:
            la = cls(model, likelihood, **kw)
        except (ValueError, TypeError) as e:
            raise ValueError(f"the saved posterior {name} does not fit this model: {e}") from e
        return la.load_state_dict(state, name)

    @classmethod
    def from_optimizer(
        cls,
        model: nn.Module,
        precond: KroneckerPreconditioner,
        likelihood: str,
        data,
        **kwargs,
    ) -> KronLaplace:
        """A posterior over the layers of a KFAC / EKFAC preconditioner
        (:mod:`laplace_kron.optim`) from the factors it kept while training ``model``.

        The preconditioner's factors are means over its last refresh batch of ``B`` examples
        and ``L`` positions with the observed labels (the empirical Fisher of a mean loss);
        scaled to the summed loss of the ``N`` data in ``data`` they are ``A = A_opt``,
        ``G = N L G_opt`` (KFAC) and ``E = N s`` in the same eigenbasis (EKFAC). ``data`` is
        passed once, forward only, for ``N`` and the log-likelihood. These are estimates from
        one batch gathered while the weights moved: a fresh :meth:`fit` (the default, one pass
        with gradients) is the better posterior; this one costs no backward pass. Layers with
        ``sua=True`` are refused (their factors are not Kronecker over ``[W | b]``).
        ``kwargs``: as for the constructor (prior precision, ...; not the curvature options).
        """
        if not isinstance(precond, KroneckerPreconditioner):
            raise TypeError(f"precond must be laplace_kron.optim.KFAC / EKFAC, got {precond!r}")
        layers = precond.curvature()
        if not layers:
            raise ValueError("the preconditioner has no factors yet: call it after step()")
        if precond.sua:
            raise ValueError("a preconditioner with sua=True has no [W | b] Kronecker factors")
        kind = "ekfac" if isinstance(precond, EKFAC) else "kfac"
        modules = [c.spec.name for c in layers]
        la = cls(model, likelihood, kind, fisher="empirical", modules=modules, **kwargs)
        stats = la.fitter.log_likelihood_terms(data)
        N, shapes = stats.num_data, {n: p.shape for n, p in model.named_parameters()}
        blocks = []
        for c in layers:
            names = [n for n in (c.spec.weight_name, c.spec.bias_name) if n]
            scale = N * c.positions
            eig_G = type(c.eig_G)(c.eig_G.values * scale, c.eig_G.vectors)
            E = None if kind == "kfac" else N * c.eigenvalues
            blocks.append(
                KronBlock(
                    c.G * scale,
                    c.A,
                    names,
                    [shapes[n] for n in names],
                    len(names) == 2,  # the preconditioner keeps a bias jointly, [W | b]
                    E,
                    eig_G,
                    c.eig_A,
                )
            )
        pos = {n: i for i, n in enumerate(la.fitter.param_names)}
        blocks.sort(key=lambda b: pos[b.param_names[0]])
        curv = KronCurvature(
            blocks,
            la.fitter.param_names,
            N,
            likelihood=likelihood,
            fisher="empirical",
            loss=stats.loss,
            sse=stats.sse,
            n_outputs=stats.n_outputs,
            kind=kind,
            n_observed=stats.n_observed,
        )
        return la.set_curvature(curv)


def _owners(names: list[str]) -> list[str]:
    """The modules owning the parameters ``names`` (``""``: the model itself), without repeats;
    as ``modules=`` they cover exactly these parameters again."""
    return list(dict.fromkeys(n.rsplit(".", 1)[0] if "." in n else "" for n in names))
