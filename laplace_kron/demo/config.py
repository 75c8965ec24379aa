"""Settings of the demo: the Laplace variants it can run and one validated run configuration."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ..constants import LINKS, PREDICTIVE_METHODS

__all__ = [
    "DEFAULT_VARIANTS",
    "MAP_NAME",
    "TABLE_ANGLES",
    "TEMP_NAME",
    "VARIANTS",
    "DemoConfig",
]

# variant key -> (display name, curvature, modules)
VARIANTS: dict[str, tuple[str, str, str | None]] = {
    "kfac": ("KFAC Laplace", "kfac", None),
    "ekfac": ("EKFAC Laplace", "ekfac", None),
    "ll-kfac": ("LL-KFAC Laplace", "kfac", "last_layer"),
    "ll-ekfac": ("LL-EKFAC Laplace", "ekfac", "last_layer"),
}
DEFAULT_VARIANTS = ("kfac", "ekfac", "ll-kfac")
# Display names of the two baselines that always run.
MAP_NAME, TEMP_NAME = "MAP", "Temp. scaling"
# Rotation angles (degrees) reported in the table; every run evaluates them.
TABLE_ANGLES = (30, 60)


@dataclass
class DemoConfig:
    """Settings of one demo run (``quick=True`` shrinks everything to a smoke test)."""

    seed: int = 0
    out: str = "demo_output"
    variants: tuple[str, ...] = DEFAULT_VARIANTS
    quick: bool = False
    epochs: int | None = None  # default: 30 (quick: 4)
    method: str = "glm"
    link: str = "centered_probit"
    n_samples: int = 200  # samples of the mc link and of the sampling predictives
    progress: bool = True
    threads: int | None = 1  # torch CPU threads during the run (None: leave torch's setting)
    fisher: str | None = None  # default: "exact" (quick: "mc")
    weight_decay: float = 1e-2
    lr: float = 3e-3
    batch_size: int = 64
    n_ood: int | None = None  # default: 500 (quick: 100)
    angles: tuple[int, ...] | None = None  # rotation angles of the figures

    def resolved(self) -> DemoConfig:
        """A copy with the quick/full defaults filled in and the options validated."""
        unknown = [v for v in self.variants if v not in VARIANTS]
        if unknown:
            raise ValueError(
                f"unknown Laplace variant(s) {unknown}; choose from {sorted(VARIANTS)}"
            )
        if len(set(self.variants)) != len(self.variants):
            raise ValueError(f"variants contain duplicates: {list(self.variants)}")
        epochs = self.epochs if self.epochs is not None else (4 if self.quick else 30)
        if epochs < 1:
            raise ValueError(f"epochs must be a positive integer, got {epochs}")
        if self.method not in PREDICTIVE_METHODS:
            raise ValueError(f"method must be one of {PREDICTIVE_METHODS}, got {self.method!r}")
        if self.link not in LINKS:
            raise ValueError(f"link must be one of {LINKS}, got {self.link!r}")
        if self.n_samples < 1:
            raise ValueError(f"n_samples must be a positive integer, got {self.n_samples}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be a positive integer or None, got {self.threads}")
        n_ood = self.n_ood if self.n_ood is not None else (100 if self.quick else 500)
        fisher = self.fisher or ("mc" if self.quick else "exact")
        angles = self.angles
        if angles is None:
            angles = (0, 30, 60) if self.quick else tuple(range(0, 181, 15))
        angles = tuple(sorted(set(angles) | {0, *TABLE_ANGLES}))
        return DemoConfig(
            **{
                **asdict(self),
                "variants": tuple(self.variants),
                "epochs": epochs,
                "n_ood": n_ood,
                "angles": angles,
                "fisher": fisher,
            }
        )
