"""Uncertainty methods behind one interface: ``sampler_for(method, ...)`` returns an object whose
``sample(...)`` gives a :class:`~bayesdiff_ext.BayesDiffOutput` (images, per-pixel variance and its
epistemic/aleatoric split, scores).

* ``'trajectories'``: :class:`~bayesdiff_ext.sampler.trajectories.TrajectorySampler`, trajectory Monte
  Carlo with the posterior as fitted (whatever the preset says).
* ``'laplace'``, ``'hfl'``, ``'isotropic'``: :class:`~bayesdiff_ext.BayesDiffSampler` with a
  :class:`~bayesdiff_ext.LastLayerLaplace` of that structure ('laplace' takes the posterior as
  fitted: diag, full or kron; 'hfl' is McInerney & Kallus's Hessian-free Laplace; 'isotropic' the
  reproduction's Σ = λ⁻¹·I).
* ``'mc-dropout'``: :class:`MCDropoutSampler`, T passes of a dropout-trained UNet.
* ``'ensemble'``: :class:`EnsembleSampler`, K independently trained UNets.
* ``'weight-samples'``: :class:`WeightSamplesSampler`, M head-weight draws fixed along whole
  trajectories (trajectory Monte Carlo around the draws' mean): their pixel variance and the
  feature-space entropy of the M final images.
* ``'x0-drift'``: :class:`X0DriftSampler`, the variance of the model's last L predictions of x̂₀
  along the stock loop (no posterior, no head; any scheduler whose noise schedule it reads).
"""

from bayesdiff_ext.methods.ensemble import EnsembleSampler
from bayesdiff_ext.methods.mc_dropout import MCDropoutSampler, active_dropout, image_dropout
from bayesdiff_ext.methods.point import PointPosterior
from bayesdiff_ext.methods.selection import LAPLACE_METHODS, METHODS, sampler_for
from bayesdiff_ext.methods.weight_samples import WeightSamplesSampler
from bayesdiff_ext.methods.x0_drift import X0DriftSampler

__all__ = [
    "EnsembleSampler",
    "LAPLACE_METHODS",
    "MCDropoutSampler",
    "METHODS",
    "PointPosterior",
    "WeightSamplesSampler",
    "X0DriftSampler",
    "active_dropout",
    "image_dropout",
    "sampler_for",
]
