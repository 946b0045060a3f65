"""bayesdiff_ext: per-pixel uncertainty for diffusion models (BayesDiff, exact and fused).

Importing the package loads the compiled library, which registers the ops under
``torch.ops.bayesdiff_ext``; ``bayesdiff_ext.ops`` is their checked Python face and
``bayesdiff_ext.reference`` holds their float64 pure-PyTorch references.
"""

from bayesdiff_ext import _C
from bayesdiff_ext import aggregation, ops, reference
from bayesdiff_ext import metrics
from bayesdiff_ext.ops import mc_moments, moment_step
from bayesdiff_ext.posterior import (
    LastLayerHeadEnsemble,
    LastLayerLaplace,
    LastLayerMCMC,
    LastLayerVI,
    load_posterior,
)
from bayesdiff_ext.sampler import BayesDiffOutput, BayesDiffSampler
from bayesdiff_ext import guidance, latent, methods
from bayesdiff_ext.pipelines import BayesDiffPipeline, UncertaintyCallback

__version__ = "0.1.0"


def build_info() -> dict:
    """Facts about the compiled library: torch version built against, CUDA mode and architectures."""
    return dict(_C.build_info())


__all__ = [
    "BayesDiffOutput",
    "BayesDiffPipeline",
    "BayesDiffSampler",
    "LastLayerHeadEnsemble",
    "LastLayerLaplace",
    "LastLayerMCMC",
    "LastLayerVI",
    "UncertaintyCallback",
    "aggregation",
    "build_info",
    "guidance",
    "latent",
    "load_posterior",
    "mc_moments",
    "methods",
    "metrics",
    "moment_step",
    "ops",
    "reference",
]
