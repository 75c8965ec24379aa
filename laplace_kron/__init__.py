"""laplace_kron: scalable Kronecker-factored Laplace approximations for PyTorch."""

# The KFAC / EKFAC training preconditioners live in their own namespace, laplace_kron.optim
# (a top-level KFAC class would sit confusingly beside the kfac() fitting function).
from . import optim
from .continual import OnlineLaplace
from .curvature import ekfac, kfac
from .kron import DiagBlock, KronBlock, KronCurvature
from .laplace import KronLaplace
from .training import marglik_training

__version__ = "0.1.0"

__all__ = [
    "DiagBlock",
    "KronBlock",
    "KronCurvature",
    "KronLaplace",
    "OnlineLaplace",
    "ekfac",
    "kfac",
    "marglik_training",
    "optim",
    "__version__",
]
