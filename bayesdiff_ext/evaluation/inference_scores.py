"""VI, HMC and head ensembles as methods of the evaluation (docs/MATH.md §10): a posterior and a score each.

Each posterior is fitted on the same fitting features as the Laplace posteriors (one pass of noised
real images, ``posteriors.fitting_features``), with σ and δ chosen as the full-GGN Laplace chooses
them, and its fit time (the inference on the head's statistics, after that shared pass) goes into
the report's posterior notes (``Posteriors.descriptions``). The scores sample as the other closed-form
rows do: the posterior's per-pixel head variance at every step, no covariance (``CLOSED_FORM``, no
model calls beyond the image path), replayed on the recorded image path; reported as the per-image
sum of Var[x_0].
"""

from __future__ import annotations

from bayesdiff_ext.evaluation.posteriors import PosteriorSpec
from bayesdiff_ext.evaluation.registry import Score, register
from bayesdiff_ext.evaluation.sources import CLOSED_FORM, SamplerRun
from bayesdiff_ext.posterior import LastLayerHeadEnsemble, LastLayerMCMC, LastLayerVI
from bayesdiff_ext.posterior.settings import EnsembleSettings, HMCSettings, VISettings

__all__ = ["HEAD_ENSEMBLE", "MCMC", "VI"]


def _inferred(name: str, posterior_class, seed_offset: int) -> PosteriorSpec:
    """``posterior_class`` with its default settings, fitted on the shared fitting features."""

    def build(p):
        posterior = posterior_class(p.subject.unet, seed=p.config.seed + seed_offset)
        return posterior.fit_features(p.features(), progress=p.config.progress)

    return PosteriorSpec(name, build)


VI = _inferred("vi", LastLayerVI, 10)
MCMC = _inferred("mcmc", LastLayerMCMC, 11)
HEAD_ENSEMBLE = _inferred("head_ensemble", LastLayerHeadEnsemble, 12)

_VI, _HMC, _ENSEMBLE = VISettings(), HMCSettings(), EnsembleSettings()

register(
    Score(
        "vi",
        lambda c: f"VI, mean-field Gaussian ({_VI.steps} ELBO steps, {_VI.samples} draws each), closed form, "
        "every step",
        SamplerRun("vi_closed", VI, lambda c: CLOSED_FORM),
    )
)
register(
    Score(
        "mcmc",
        lambda c: f"HMC ({_HMC.chains} chains, {_HMC.warmup} warm-up + {_HMC.draws} draws), sample "
        "covariance, closed form, every step",
        SamplerRun("mcmc_closed", MCMC, lambda c: CLOSED_FORM),
    )
)
register(
    Score(
        "head_ensemble",
        lambda c: f"head ensemble ({_ENSEMBLE.members} bootstrap-refitted heads, trunk fixed), their spread, "
        "closed form, every step",
        SamplerRun("head_ensemble_closed", HEAD_ENSEMBLE, lambda c: CLOSED_FORM),
    )
)
