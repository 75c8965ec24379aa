"""Training with curvature: KFAC and EKFAC gradient preconditioners (``torch.optim`` style).

``precond.step()`` after ``loss.backward()`` rewrites the covered parameters' ``.grad`` with the
preconditioned gradient; any ``torch.optim`` optimizer then steps with it.
"""

from .layer import LayerCurvature
from .precond import EKFAC, KFAC, KroneckerPreconditioner

__all__ = ["EKFAC", "KFAC", "KroneckerPreconditioner", "LayerCurvature"]
