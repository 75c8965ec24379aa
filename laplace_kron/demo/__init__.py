"""The ``laplace-kron demo``: MAP vs Kronecker-factored Laplace vs temperature scaling on digits.

Everything runs offline on data that ships with scikit-learn:

1. train a small CNN to the MAP on the 8x8 digits (Adam, L2 weight decay, cosine schedule);
2. fit KFAC and EKFAC Laplace over all weights and last-layer KFAC Laplace, and tune the prior
   precision by maximising the Laplace marginal likelihood (one value per layer);
3. fit a temperature on the validation split (NLL) as the non-Bayesian baseline;
4. evaluate the predictives (linearized GLM, ``centered_probit`` link by default) on the test
   split: accuracy, NLL, ECE, Brier; OOD AUROC of digits against patches of scikit-learn's sample
   photographs and against uniform noise; accuracy, ECE and NLL under rotation of the test digits;
5. print one table and save it (markdown + JSON) with figures into the output folder.

Modules: :mod:`.config` (the variants and :class:`DemoConfig`), :mod:`.run` (the pipeline,
:func:`run_demo`), :mod:`.report` (printed table and summary, ``results.md``, ``results.json``,
figures).

Choices (see the docstring of :func:`run_demo`): the weight decay ``1e-2`` of the mean loss is the
prior precision ``delta = 1e-2 * N ~ 12.6`` of the summed loss, about where the evidence puts it,
so the MAP and the tuned posterior belong to the same model. The Fisher is the exact GGN
(``fisher="exact"``), so the curvature carries no Monte-Carlo noise. The GLM predictive uses the
``centered_probit`` link: the plain probit uses the per-class variances and so counts the part of
the logit covariance that is a shift common to all classes, to which the softmax is invariant; on
this model that makes it markedly less confident than the GLM predictive it approximates.
Projecting the logit Gaussian onto the sum-zero subspace first removes that part, is
deterministic, and matches the sampled ``mc`` link here (``--link probit`` / ``mc`` to compare).

Where the demo wing lives: the demo (with :mod:`laplace_kron.datasets` and
:mod:`laplace_kron.plots`, which the demo and the experiments share) stays inside the package.
``laplace-kron demo`` is the README's main job and a console script that ``pip install`` puts on
the path; a script beside the package would not be installed, so the command would fail outside a
source checkout. It is kept apart from the library by layering instead: these modules are the top
layer, they import the library and never the reverse, and ``import laplace_kron`` imports none of
them, nor matplotlib or scikit-learn (``tests/test_imports_light.py`` checks this).
"""

from .config import DEFAULT_VARIANTS, VARIANTS, DemoConfig
from .report import format_table
from .run import digits_cnn, fit_temperature, run_demo

__all__ = [
    "DEFAULT_VARIANTS",
    "VARIANTS",
    "DemoConfig",
    "digits_cnn",
    "fit_temperature",
    "format_table",
    "run_demo",
]
