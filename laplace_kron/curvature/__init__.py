"""Turning a model and data into Kronecker factors (KFAC, EKFAC) or a diagonal (EWC)."""

from ..constants import FISHER_TYPES, LIKELIHOODS
from .diag import fit_diagonal
from .fitter import CurvatureFitter, ekfac, kfac
from .likelihoods import output_gradient_vectors
from .options import CurvatureOptions
from .selection import SUPPORTED_TYPES, LayerSpec, select_layers
from .state import FitState

__all__ = [
    "FISHER_TYPES",
    "LIKELIHOODS",
    "SUPPORTED_TYPES",
    "CurvatureFitter",
    "CurvatureOptions",
    "FitState",
    "LayerSpec",
    "ekfac",
    "fit_diagonal",
    "kfac",
    "output_gradient_vectors",
    "select_layers",
]
