from dataclasses import dataclass

from .curvature import CurvatureFitter as _Old
from .curvature import LayerSpec

__all__ = ["CurvatureFitter", "CurvatureOptions", "LayerSpec"]


@dataclass(frozen=True)
class CurvatureOptions:
    fisher: str = "mc"
    mc_samples: int = 1
    weight_sharing: str = "expand"
    separate_bias: bool = False
    modules: object = None
    generator: object = None
    distributed: object = None

    @classmethod
    def from_kwargs(cls, **kw):
        return cls(**kw)


class CurvatureFitter(_Old):
    def __init__(self, model, lik, options=None, **kw):
        super().__init__(model, lik, **(dict(options.__dict__) if options else kw))

    def fit(self, kind, data, progress=False, checkpoint=None, every=None):
        return self._fit(kind, data, progress, checkpoint, every)
