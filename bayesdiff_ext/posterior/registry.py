"""The posterior structures by name: what ``LastLayerLaplace(structure=...)`` builds and a saved file restores."""

from __future__ import annotations

import torch

from bayesdiff_ext.posterior.diag import DiagPosterior
from bayesdiff_ext.posterior.full import FullPosterior
from bayesdiff_ext.posterior.heads import HeadSpec
from bayesdiff_ext.posterior.hfl import HessianFreePosterior
from bayesdiff_ext.posterior.isotropic import IsotropicPosterior
from bayesdiff_ext.posterior.kron import KronPosterior
from bayesdiff_ext.posterior.structure import PosteriorStructure

__all__ = ["STRUCTURES", "check_structure", "restore_structure"]

STRUCTURES: dict[str, type[PosteriorStructure]] = {
    cls.name: cls for cls in (DiagPosterior, FullPosterior, KronPosterior, IsotropicPosterior, HessianFreePosterior)
}


def check_structure(structure: str, curvature: str) -> type[PosteriorStructure]:
    """The class of ``structure``; ValueError unless it exists and can be fitted with ``curvature``."""
    if structure not in STRUCTURES:
        raise ValueError(f"structure must be one of {sorted(STRUCTURES)}, got {structure!r}")
    cls = STRUCTURES[structure]
    if curvature not in cls.curvatures:
        raise ValueError(
            f"curvature {curvature!r} is not available for structure {structure!r}; choose one of {cls.curvatures}"
        )
    return cls


def restore_structure(structure: str, spec: HeadSpec, tensors: dict[str, torch.Tensor]) -> PosteriorStructure:
    """The structure named ``structure`` from its saved curvature tensors (its ``from_tensors``)."""
    if structure not in STRUCTURES:
        raise ValueError(f"unknown posterior structure {structure!r}; known: {sorted(STRUCTURES)}")
    return STRUCTURES[structure].from_tensors(spec, tensors)
