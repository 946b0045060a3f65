"""Weight samples: M head weights drawn from the posterior, each held fixed along a whole trajectory.

The 2025 successor of BayesDiff (Jazbec et al., "Generative Uncertainty in Diffusion Models") scores
an x_T by the spread of the images that M models drawn from the weight posterior make from it. With a
posterior on the head's weights that is trajectory Monte Carlo (docs/MATH.md §2.3, §11.2), and this
method runs exactly that computation — :class:`~bayesdiff_ext.sampler.trajectories.TrajectorySampler`
with M independent draws per image, their spread taken around their own mean — and reads two
per-image scores from the M final images:

* ``scores``: the pixel variance Σ_pixels Var_m(x_0^(m)), unbiased over the draws;
* ``feature_entropy``: the entropy of a diagonal Gaussian fitted to the M images' features in a
  pluggable feature space (:func:`~bayesdiff_ext.methods.feature_entropy.feature_entropy`).

Whose draws: by default (``weight_seed=0``) the same M head weights for every image — M models drawn
once, as in the successor paper — so that the scores of two images differ by the images, not by
their draws (with M = 4 the Monte Carlo error of one image's variance is large: a χ² with 3 degrees
of freedom, a relative standard deviation of √(2/3) ≈ 0.8). ``weight_seed=None`` draws each image's
weights from its own stream instead, as the trajectory estimator does for Var[x_0 | x_T].

The returned image is the stock one (the model's own weights), as for every trajectory estimator.
Any posterior that samples (``LastLayerLaplace.sample``: diag, full, kron, isotropic, HFL; VI, HMC,
head ensembles), conv and Linear heads, and every scheduler the trajectories run.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch

from bayesdiff_ext import latent
from bayesdiff_ext.guidance import ClassifierFreeGuidance
from bayesdiff_ext.methods.feature_entropy import DEFAULT_FLOOR, feature_entropy
from bayesdiff_ext.randomness import Generators
from bayesdiff_ext.sampler.results import BayesDiffOutput, TrajectoryDraws
from bayesdiff_ext.sampler.trajectories import TrajectorySampler
from bayesdiff_ext.sampler.trajectory_statistics import TrajectoryMoments, trajectory_moments
from bayesdiff_ext.validation import check_count

__all__ = ["DEFAULT_WEIGHT_SAMPLES", "WeightSamplesSampler", "weight_sample_spread"]

#: M of the successor paper's experiments and of the evaluation.
DEFAULT_WEIGHT_SAMPLES = 4
# M independent draws, their spread around their own mean (unbiased for independent draws).
_DRAWS, _CENTRE = "independent", "mean"


class WeightSamplesSampler:
    """Sample with M head-weight draws fixed per trajectory and score each image by their spread.

    Args:
        model (`nn.Module`): a diffusers UNet or transformer.
        scheduler: any diffusers scheduler (the trajectories run on copies of it).
        posterior: a posterior on the model's head with ``sample(n, generator)`` (e.g. a fitted
            :class:`~bayesdiff_ext.LastLayerLaplace` of any structure).
        samples (`int`, defaults to 4): M, the weight draws per image (≥ 2; even for a stochastic
            sampler, whose draws go two to a noise stream).
        features (callable, *optional*): the feature space of the entropy, images (N, C, H, W) at
            model scale → features (N, d), or a module with ``features(x)``; None: no entropy.
        floor (`float`, defaults to 1e-6): the entropy's variance floor τ relative to the image's mean
            squared feature (docs/MATH.md §11.2).
    """

    method = "weight-samples"

    def __init__(
        self,
        model,
        scheduler,
        posterior,
        samples: int = DEFAULT_WEIGHT_SAMPLES,
        features: Callable[[torch.Tensor], torch.Tensor] | None = None,
        floor: float = DEFAULT_FLOOR,
    ) -> None:
        check_count("samples", samples, minimum=2)
        if features is not None and not (callable(features) or callable(getattr(features, "features", None))):
            raise TypeError(f"features must map images to (N, d) features, got {type(features).__name__}")
        if not floor > 0:
            raise ValueError(f"floor must be > 0, got {floor!r}")
        self.trajectories = TrajectorySampler(model, scheduler, posterior)
        self.samples = samples
        self.features = features
        self.floor = floor

    @property
    def posterior(self):
        return self.trajectories.posterior

    @torch.no_grad()
    def sample(
        self,
        batch_size: int | None = None,
        noise: torch.Tensor | None = None,
        num_inference_steps: int = 50,
        generator: Generators = None,
        eta: float = 0.0,
        *,
        model_kwargs: dict[str, Any] | None = None,
        guidance: ClassifierFreeGuidance | None = None,
        scheduler_kwargs: dict[str, Any] | None = None,
        set_timesteps_kwargs: dict[str, Any] | None = None,
        noise_samples: int | None = None,
        chunk_size: int | None = None,
        progress: bool = True,
        return_draws: bool = False,
        weight_seed: int | None = 0,
    ) -> BayesDiffOutput:
        """Sample B images and score them by their M weight-sample trajectories.

        Args:
            batch_size, noise, num_inference_steps, generator, eta, model_kwargs, guidance,
                scheduler_kwargs, set_timesteps_kwargs, progress: as for
                :meth:`~bayesdiff_ext.sampler.trajectories.TrajectorySampler.sample`.
            noise_samples (`int`, *optional*), chunk_size (`int`, *optional*): the trajectories' noise
                streams (stochastic samplers only) and rows per model call.
            return_draws (`bool`): keep the M final images and weight deviations in ``draws``.
            weight_seed (`int`, *optional*, defaults to 0): the M draws shared by every image come from
                this seed; None: each image's own draws from its stream of ``generator``.

        Returns:
            :class:`~bayesdiff_ext.BayesDiffOutput`: ``images`` the stock sample (B, ...); ``variance``
            the per-element variance over the M final images (≥ 0; for a stochastic sampler the law of
            total variance with its ``aleatoric_variance``); ``mean`` their mean; ``scores`` (B,) its
            per-image sum; ``feature_entropy`` (B,) float64 when ``features`` is set.
        """
        out = self.trajectories.sample(
            batch_size,
            noise,
            num_inference_steps,
            generator,
            eta,
            samples=self.samples,
            draws=_DRAWS,
            centre=_CENTRE,
            control_variate=False,
            noise_samples=noise_samples,
            chunk_size=chunk_size,
            model_kwargs=model_kwargs,
            guidance=guidance,
            scheduler_kwargs=scheduler_kwargs,
            set_timesteps_kwargs=set_timesteps_kwargs,
            progress=progress,
            return_draws=True,
            shared_draws=weight_seed is not None,
            weight_seed=weight_seed,
        )
        entropy = weight_sample_spread(out.draws, features=self.features, floor=self.floor)[1]
        settings = dict(out.settings, method=self.method, weight_seed=weight_seed, feature_entropy=self.features is not None)
        return dataclasses.replace(
            out, settings=settings, feature_entropy=entropy, draws=out.draws if return_draws else None
        )


def weight_sample_spread(
    draws: TrajectoryDraws,
    decode: Callable[[torch.Tensor], torch.Tensor] | None = None,
    *,
    features=None,
    floor: float = DEFAULT_FLOOR,
    batch_size: int = 8,
) -> tuple[TrajectoryMoments, torch.Tensor | None]:
    """The method's map and entropy from :meth:`WeightSamplesSampler.sample`'s ``draws``.

    Args:
        draws (`TrajectoryDraws`): the M final samples of every image and each noise stream's MAP trajectory.
        decode (callable, *optional*): applied to every final sample and MAP trajectory first (a latent
            pipeline's VAE path, ``batch_size`` latents per call), so that map and entropy are those of the
            decoded images.
        features, floor: the entropy's feature space (None: no entropy) and variance floor τ.

    Returns:
        (:class:`~bayesdiff_ext.sampler.trajectory_statistics.TrajectoryMoments`, float64, (B, ...) each;
        the feature entropy (B,) of the M final images, or None without ``features``).
    """
    finals, maps = draws.finals, draws.maps
    if decode is not None:
        finals = latent.decode_each(decode, finals.flatten(0, 1), batch_size).unflatten(0, finals.shape[:2])
        maps = latent.decode_each(decode, maps, batch_size)
    moments = trajectory_moments(finals, maps, _DRAWS, _CENTRE)
    entropy = None if features is None else feature_entropy(finals.flatten(0, 1), features, floor=floor)
    return moments, entropy
