"""Pick an uncertainty method by name (the CLI's ``--method``) and build its sampler."""

from __future__ import annotations

from bayesdiff_ext.methods.ensemble import EnsembleSampler
from bayesdiff_ext.methods.mc_dropout import MCDropoutSampler
from bayesdiff_ext.methods.weight_samples import DEFAULT_WEIGHT_SAMPLES, WeightSamplesSampler
from bayesdiff_ext.methods.x0_drift import DEFAULT_LAST_STEPS, X0DriftSampler
from bayesdiff_ext.posterior.hfl import DEFAULT_PROBES, HessianFreePosterior
from bayesdiff_ext.posterior.isotropic import IsotropicPosterior
from bayesdiff_ext.sampler import BayesDiffSampler
from bayesdiff_ext.sampler.trajectories import TrajectorySampler

__all__ = ["LAPLACE_METHODS", "METHODS", "laplace_posterior_for", "sampler_for"]

METHODS = ("laplace", "trajectories", "hfl", "isotropic", "mc-dropout", "ensemble", "x0-drift", "weight-samples")
#: The methods that sample with a LastLayerLaplace, and the posterior structures each accepts.
LAPLACE_METHODS = {
    "laplace": ("diag", "full", "kron", "isotropic", "hfl"),
    "trajectories": ("diag", "full", "kron", "isotropic", "hfl"),
    "hfl": ("hfl", "full"),
    "isotropic": ("isotropic", "diag"),
}


def laplace_posterior_for(method: str, posterior, *, probes: int | None = None):
    """The posterior ``method`` samples with, derived from a fitted one without refitting.

    'hfl' reuses a 'full' posterior's Gram matrix (the same curvature), with ``probes`` Rademacher
    probes per image when given; 'isotropic' reduces a 'diag' posterior's curvature to its mean,
    then re-chooses σ and δ as ``fit`` would. 'laplace' takes any posterior as fitted, also the
    non-Laplace ones (``bayesdiff_ext.posterior.inference``).
    """
    if method not in LAPLACE_METHODS:
        raise ValueError(f"method must be one of {tuple(LAPLACE_METHODS)}, got {method!r}")
    inference = getattr(posterior, "inference", "laplace")
    if inference != "laplace":  # VI, MCMC, head ensembles: 'laplace' and 'trajectories' take them as fitted
        if method in ("laplace", "trajectories"):
            return posterior
        raise ValueError(f"method {method!r} derives its posterior from a Laplace one, got a {inference!r} posterior")
    accepted = LAPLACE_METHODS[method]
    if posterior.structure not in accepted:
        raise ValueError(
            f"method {method!r} needs a posterior of structure {' or '.join(accepted)}, got "
            f"{posterior.structure!r} (fit one with `bayesdiff fit --structure {accepted[0]}`)"
        )
    keep = method in ("laplace", "trajectories") or (
        posterior.structure == method and (method != "hfl" or probes is None)
    )
    if keep:
        return posterior
    if method == "hfl":
        structure = HessianFreePosterior(
            posterior.spec, posterior.posterior.gram, probes=DEFAULT_PROBES if probes is None else probes
        )
    else:
        structure = IsotropicPosterior.from_diag(posterior.posterior)
    return posterior.with_structure(structure)


def sampler_for(
    method: str,
    unet,
    scheduler,
    *,
    posterior=None,
    members=(),
    passes: int = 10,
    seed: int = 0,
    probes: int | None = None,
    last_steps: int = DEFAULT_LAST_STEPS,
    samples: int = DEFAULT_WEIGHT_SAMPLES,
    features=None,
):
    """A sampler for ``method`` whose ``sample(...)`` returns a ``BayesDiffOutput``.

    Laplace methods need ``posterior`` (a fitted LastLayerLaplace on ``unet``; 'hfl' takes
    ``probes`` per image, default that of the posterior or 64); 'mc-dropout' needs a
    UNet trained with dropout (``passes`` = T, mask seeds ``seed + k``); 'ensemble' uses ``unet``
    as member 0 and ``members`` as the others; 'x0-drift' needs nothing but the model (no
    posterior, no head: the variance of its last ``last_steps`` x̂₀ predictions); 'weight-samples'
    needs ``posterior`` (any that samples, as fitted) and takes ``samples`` = M draws per image and
    ``features``, the feature space of its entropy (a callable images → (N, d); None: no entropy).
    """
    if method in LAPLACE_METHODS:
        if posterior is None:
            raise ValueError(f"method {method!r} needs a fitted posterior (posterior=LastLayerLaplace(...))")
        laplace = laplace_posterior_for(method, posterior, probes=probes)
        if method == "trajectories":
            return TrajectorySampler(unet, scheduler, laplace)
        return BayesDiffSampler(unet, scheduler, laplace)
    if method == "mc-dropout":
        return MCDropoutSampler(unet, scheduler, passes=passes, seed=seed)
    if method == "ensemble":
        return EnsembleSampler([unet, *members], scheduler)
    if method == "weight-samples":
        if posterior is None:
            raise ValueError("method 'weight-samples' needs a fitted posterior (posterior=LastLayerLaplace(...))")
        return WeightSamplesSampler(unet, scheduler, posterior, samples=samples, features=features)
    if method == "x0-drift":
        return X0DriftSampler(unet, scheduler, last_steps=last_steps)
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")
