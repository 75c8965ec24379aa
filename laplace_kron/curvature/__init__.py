"""Turning a model and data into Kronecker factors (KFAC, EKFAC)."""

from .capture import SUPPORTED_TYPES, LayerSpec, select_layers
from .kfac import CurvatureFitter, ekfac, kfac
from .likelihoods import FISHER_TYPES, LIKELIHOODS, output_gradient_vectors

__all__ = [
    "FISHER_TYPES",
    "LIKELIHOODS",
    "SUPPORTED_TYPES",
    "CurvatureFitter",
    "LayerSpec",
    "ekfac",
    "kfac",
    "output_gradient_vectors",
    "select_layers",
]
