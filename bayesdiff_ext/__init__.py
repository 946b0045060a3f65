"""bayesdiff_ext: per-pixel uncertainty for diffusion models (BayesDiff, exact and fused).

The package root is light: the names below load their submodules on first use (PEP 562), so
``import bayesdiff_ext`` (and the ``bayesdiff`` command's ``--help``) imports neither torch nor
diffusers. The compiled ops register under ``torch.ops.bayesdiff_ext`` when ``bayesdiff_ext.ops``
is imported, which also registers their fake implementations for torch.compile; every module that
uses the ops imports it. ``bayesdiff_ext.reference`` holds their float64 pure-PyTorch references.
"""

from __future__ import annotations

import importlib

from bayesdiff_ext._lazy import lazy_names
from bayesdiff_ext._version import __version__

#: Public classes and functions, and the module that defines each.
_ATTRIBUTES = {
    "BayesDiffOutput": "bayesdiff_ext.sampler",
    "BayesDiffPipeline": "bayesdiff_ext.pipelines",
    "BayesDiffSampler": "bayesdiff_ext.sampler",
    "LastLayerHeadEnsemble": "bayesdiff_ext.posterior",
    "LastLayerLaplace": "bayesdiff_ext.posterior",
    "LastLayerMCMC": "bayesdiff_ext.posterior",
    "LastLayerVI": "bayesdiff_ext.posterior",
    "load_posterior": "bayesdiff_ext.posterior",
    "UncertaintyCallback": "bayesdiff_ext.pipelines",
    "TrajectorySampler": "bayesdiff_ext.sampler",
    "UncertaintySettings": "bayesdiff_ext.sampler",
    "resolve_settings": "bayesdiff_ext.sampler",
    "mc_moment_step": "bayesdiff_ext.ops",
    "mc_moments": "bayesdiff_ext.ops",
    "moment_step": "bayesdiff_ext.ops",
}
_SUBMODULES = (
    "aggregation",
    "cli",
    "digits",
    "distributed",
    "emulation",
    "evaluation",
    "guidance",
    "io",
    "latent",
    "methods",
    "metrics",
    "numerics",
    "ops",
    "photos",
    "pipelines",
    "posterior",
    "randomness",
    "reference",
    "sampler",
)

__all__ = [
    "BayesDiffOutput",
    "BayesDiffPipeline",
    "BayesDiffSampler",
    "LastLayerHeadEnsemble",
    "LastLayerLaplace",
    "LastLayerMCMC",
    "LastLayerVI",
    "TrajectorySampler",
    "UncertaintyCallback",
    "UncertaintySettings",
    "__version__",
    "aggregation",
    "build_info",
    "distributed",
    "guidance",
    "latent",
    "load_posterior",
    "mc_moment_step",
    "mc_moments",
    "methods",
    "metrics",
    "moment_step",
    "ops",
    "photos",
    "reference",
    "resolve_settings",
]


__getattr__, __dir__ = lazy_names(__name__, _ATTRIBUTES, _SUBMODULES)


def build_info() -> dict:
    """Facts about the compiled library: torch version built against, CUDA mode and architectures."""
    importlib.import_module(f"{__name__}.ops")  # loads _C, and the fake kernels with it
    return dict(importlib.import_module(f"{__name__}._C").build_info())
