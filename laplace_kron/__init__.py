"""laplace_kron: scalable Kronecker-factored Laplace approximations for PyTorch."""

from .continual import OnlineLaplace
from .curvature import ekfac, kfac
from .kron import KronBlock, KronCurvature
from .laplace import KronLaplace
from .training import marglik_training

__version__ = "0.1.0"

__all__ = [
    "KronBlock",
    "KronCurvature",
    "KronLaplace",
    "OnlineLaplace",
    "ekfac",
    "kfac",
    "marglik_training",
    "__version__",
]
