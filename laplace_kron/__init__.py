"""laplace_kron: scalable Kronecker-factored Laplace approximations for PyTorch."""

from .continual import OnlineLaplace
from .curvature import ekfac, kfac
from .kron import DiagBlock, KronBlock, KronCurvature
from .laplace import KronLaplace

__version__ = "0.1.0"

__all__ = [
    "DiagBlock",
    "KronBlock",
    "KronCurvature",
    "KronLaplace",
    "OnlineLaplace",
    "ekfac",
    "kfac",
    "__version__",
]
