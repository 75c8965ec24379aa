"""Every option set and file-format marker of the library, in one place and with distinct names.

Modules import their choices from here (never define a tuple of option names of their own), so a
name means one thing everywhere: ``POSTERIOR_CURVATURES`` are what :class:`KronLaplace` fits,
``ONLINE_CURVATURES`` what :class:`OnlineLaplace` accumulates, ``TUNING_METHODS`` how the prior
precision is tuned and ``PREDICTIVE_METHODS`` how a predictive is formed.
"""

from __future__ import annotations

__all__ = [
    "CHECKPOINT_FORMAT",
    "DEFAULT_CHECKPOINT_EVERY",
    "DEFAULT_CHUNK",
    "EMBEDDING_BLOCKS",
    "FILE_FORMATS",
    "FISHER_TYPES",
    "LIKELIHOODS",
    "LINKS",
    "ONLINE_CURVATURES",
    "ONLINE_FORMAT",
    "POSTERIOR_CURVATURES",
    "POSTERIOR_FORMAT",
    "PREDICTIVE_METHODS",
    "PRIOR_GRANULARITIES",
    "TUNING_METHODS",
    "TUNING_OPTIMIZERS",
    "WEIGHT_SHARING",
]

# ------------------------------------------------------------------------------------ curvature
LIKELIHOODS = ("classification", "regression", "binary")
FISHER_TYPES = ("exact", "mc", "empirical")
WEIGHT_SHARING = ("expand", "reduce")
# The block of an nn.Embedding weight: Kronecker with a diagonal input factor, or exact diagonal.
EMBEDDING_BLOCKS = ("kron", "diag")
# What KronLaplace fits, and what OnlineLaplace accumulates across tasks ("diag": EWC).
POSTERIOR_CURVATURES = ("kfac", "ekfac")
ONLINE_CURVATURES = ("kfac", "ekfac", "diag")

# ------------------------------------------------------------------------------------ tuning
TUNING_METHODS = ("marglik", "mackay", "gridsearch")
# "diag": one prior precision per parameter (laplace_kron.diagprior).
PRIOR_GRANULARITIES = ("scalar", "layer", "diag")
# "newton": analytic Newton steps on log delta (a scalar prior without noise tuning only).
TUNING_OPTIMIZERS = ("newton", "lbfgs", "adam")

# ------------------------------------------------------------------------------------ prediction
PREDICTIVE_METHODS = ("glm", "glm_mc", "nn")
# "bridge" is the unnormalised Laplace bridge, "bridge_norm" the normalised one (laplace-torch's).
LINKS = ("probit", "centered_probit", "mc", "bridge", "bridge_norm")
# Default budget (number of tensor elements) for the largest intermediate of one predictive tile.
DEFAULT_CHUNK = 2**22

# ------------------------------------------------------------------------------------ files
POSTERIOR_FORMAT = "laplace_kron.KronLaplace"
ONLINE_FORMAT = "laplace_kron.OnlineLaplace"
CHECKPOINT_FORMAT = "laplace_kron.fit_checkpoint"
# The version each format is written with and the only one read.
FILE_FORMATS = {POSTERIOR_FORMAT: 1, ONLINE_FORMAT: 1, CHECKPOINT_FORMAT: 1}
DEFAULT_CHECKPOINT_EVERY = 100
