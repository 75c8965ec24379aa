r"""Sampling predictives: the network, or its linearisation, at posterior parameter samples.

``glm_mc``: ``f(x; theta*) + J(x) (theta_s - theta*)`` with ``theta_s`` from
:meth:`KronPosterior.sample`, one forward-mode JVP (``torch.func.jvp``) per sample; ``nn``:
``f(x; theta_s)`` via ``torch.func.functional_call`` (the model's parameters are never modified).
Samples are drawn in chunks whose size the element budget ``chunk_size`` bounds, and evaluated
with ``torch.func.vmap`` where the model allows it (one call per sample otherwise).

The closed-form GLM predictive (and the ``glm`` sampling method) is in
:mod:`laplace_kron.predictive`, which also checks the method names.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor
from torch.func import functional_call, jvp, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel

from .curvature import batches
from .curvature.batches import BatchSizeFn, Inputs
from .posterior import KronPosterior

__all__ = [
    "check_at_mean",
    "check_differentiable",
    "check_predictable",
    "parameter_sample_outputs",
]


def check_at_mean(la: KronPosterior) -> None:
    """Warn when the model's parameters are not the posterior mean (the GLM linearises at the
    model's current parameters)."""
    params = dict(la.model.named_parameters())
    start = 0
    for n in la.param_names:
        p = params[n]
        k = p.numel()
        if not torch.equal(p.detach().reshape(-1), la.mean[start : start + k].to(p.device)):
            warnings.warn(
                f"the model's parameter {n!r} differs from the posterior mean it was fitted at; the "
                "predictive linearizes at the model's current parameters",
                stacklevel=4,
            )
            return
        start += k


def check_predictable(post: KronPosterior) -> None:
    """The posterior is fitted; warn if the model is in train mode (stochastic predictions)."""
    post.require_fit()
    batches.warn_if_train_mode(post.model, "predicting", stacklevel=4)


def check_differentiable(what: str) -> None:
    """RuntimeError inside ``torch.inference_mode()``, where ``what`` cannot differentiate the
    network."""
    if torch.is_inference_mode_enabled():
        raise RuntimeError(
            f"{what} differentiates the network and cannot run inside torch.inference_mode(); "
            "call it outside (torch.no_grad() is fine) or use method='nn'"
        )


@contextmanager
def _mha_fastpath(enabled: bool) -> Iterator[None]:
    """Unless ``enabled``, use the unfused attention paths inside (``glm_mc``): the fused
    ``nn.MultiheadAttention`` kernel and the flash / memory-efficient attention kernels have no
    forward-mode derivative; the math kernel computes the same function and has one."""
    before = torch.backends.mha.get_fastpath_enabled()
    if enabled:
        yield
        return
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with sdpa_kernel([SDPBackend.MATH]):
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(before)


def parameter_sample_outputs(
    post: KronPosterior,
    x: Inputs,
    method: str,
    n_samples: int,
    generator: torch.Generator | None,
    chunk_size: int,
    batch_size_fn: BatchSizeFn | None,
    vectorize: bool = True,
) -> tuple[Tensor, torch.Size]:
    """Outputs at ``n_samples`` posterior samples, ``[n_samples, B, C]`` (``method``: ``"glm_mc"``
    or ``"nn"``), and the model's output shape ``[B, ...]``."""
    check_predictable(post)
    if method == "glm_mc":
        check_differentiable("method='glm_mc'")
    x = batches.prediction_inputs(x, post.options.target_key)
    B = batches.input_batch_size(x, batch_size_fn)
    model = post.model
    params = dict(model.named_parameters())
    mean_params = {n: params[n].detach() for n in post.param_names}
    args, kwargs = batches.model_arguments(model, x)

    def call(p: dict[str, Tensor]) -> Tensor:
        return batches.model_output(functional_call(model, p, args, kwargs))

    def one(theta: Tensor) -> Tensor:  # theta [P] -> output of one sample
        if method == "glm_mc":
            f0, jv = jvp(call, (mean_params,), (post.unflatten(theta - post.mean),))
            return f0 + jv
        return call(post.unflatten(theta))

    with torch.no_grad(), _mha_fastpath(method != "glm_mc"):
        f = batches.checked_forward(
            model, batches.slice_inputs(x, 0, 1, B), 1
        )  # validates, gives the shape
        shape = torch.Size((B, *f.shape[1:]))
        per_sample = max(post.n_params, B * f[0].numel())
        k = max(1, min(n_samples, chunk_size // per_sample))
        outs, batched = [], vectorize
        for s in range(0, n_samples, k):
            thetas = post.sample(min(k, n_samples - s), generator=generator)
            if batched:
                try:
                    outs.append(vmap(one)(thetas).reshape(len(thetas), B, -1))
                    continue
                except (RuntimeError, NotImplementedError) as e:
                    warnings.warn(
                        f"torch.func.vmap over posterior samples failed ({e}); falling back to one "
                        "forward pass per sample. Pass vectorize=False to skip the attempt.",
                        stacklevel=3,
                    )
                    batched = False
            outs.extend(one(theta).reshape(1, B, -1) for theta in thetas)
    return torch.cat(outs), shape
