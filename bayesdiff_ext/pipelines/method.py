"""Which uncertainty method a pipeline wrapper runs in its loop, and how its pixel maps are made.

The wrapper's conditioning (prompts, guidance, SDXL's added conditions, Flux's packed latents and
shift, DiT's class labels), x_T, timesteps and decode path are the same for every method; only the
loop's sampler and the source of the pixel maps differ:

* ``'laplace'``: :class:`~bayesdiff_ext.BayesDiffSampler` with the call's uncertainty arguments;
  pixel maps from ``decode_samples`` Gaussian draws of z_0 (:func:`~bayesdiff_ext.latent.pixel_moments`).
* ``'weight-samples'``: :class:`~bayesdiff_ext.methods.WeightSamplesSampler` (M head-weight draws
  fixed per trajectory); the pixel map is the spread of the M final latents *decoded*, and the
  feature entropy is that of the M decoded images (docs/MATH.md §11.2).
* ``'x0-drift'``: :class:`~bayesdiff_ext.methods.X0DriftSampler` (no posterior); the pixel map is
  the variance of the last L predictions x̂₀ decoded (docs/MATH.md §11), x̂₀ read from the
  pipeline's scheduler and prediction type (flow matching included).
"""

from __future__ import annotations

from typing import Any

import torch

from bayesdiff_ext import latent
from bayesdiff_ext.methods import sampler_for
from bayesdiff_ext.methods.weight_samples import DEFAULT_WEIGHT_SAMPLES, weight_sample_spread
from bayesdiff_ext.methods.x0_drift import DEFAULT_LAST_STEPS, drift_variance
from bayesdiff_ext.numerics import accumulation_dtype
from bayesdiff_ext.sampler import BayesDiffOutput, BayesDiffSampler
from bayesdiff_ext.validation import check_count

__all__ = ["PIPELINE_METHODS", "PipelineMethod"]

#: The methods a pipeline wrapper runs, with the options each takes (``BayesDiffPipeline.from_pipe``).
PIPELINE_METHODS = {
    "laplace": (),
    "weight-samples": ("samples", "features", "weight_seed"),
    "x0-drift": ("last_steps",),
}
# The wrapper call's uncertainty arguments weight-samples follows (its trajectories' chunks and noise
# streams); every other one chooses a Laplace estimator.
_WEIGHT_SAMPLES_ARGUMENTS = ("chunk_size", "noise_samples")


class PipelineMethod:
    """The method of a :class:`~bayesdiff_ext.BayesDiffPipeline`, from ``from_pipe``'s ``method`` and options.

    Args:
        name (`str`): ``'laplace'`` (default), ``'weight-samples'`` or ``'x0-drift'``.
        latent (`bool`): whether the pipeline decodes latents (then weight-samples' entropy is taken on the
            decoded images, not on latents).
        samples (`int`, defaults to 4), features (callable, *optional*), weight_seed (`int` or None, defaults
            to 0): weight-samples' M, the feature space of its entropy (images (N, 3, H, W) in the VAE's
            output range → (N, d); None: no entropy) and the seed of the M draws shared by every image.
        last_steps (`int`, defaults to 5): x0-drift's L.
    """

    def __init__(self, name: str = "laplace", *, latent: bool = True, **options: Any) -> None:
        if name not in PIPELINE_METHODS:
            raise ValueError(f"method must be one of {tuple(PIPELINE_METHODS)} for a pipeline, got {name!r}")
        unknown = sorted(set(options) - set(PIPELINE_METHODS[name]))
        if unknown:
            takes = ", ".join(PIPELINE_METHODS[name]) or "no options"
            raise TypeError(f"method {name!r} takes {takes}; got {', '.join(unknown)}")
        self.name, self.latent = name, latent
        self.samples = options.get("samples", DEFAULT_WEIGHT_SAMPLES)
        self.features = options.get("features")
        self.weight_seed = options.get("weight_seed", 0)
        self.last_steps = options.get("last_steps", DEFAULT_LAST_STEPS)
        if name == "weight-samples" and self.weight_seed is not None:
            check_count("weight_seed", self.weight_seed, minimum=0)

    @property
    def needs_posterior(self) -> bool:
        return self.name != "x0-drift"

    def sampler(self, model, scheduler, posterior):
        """The loop's sampler on ``model`` (the pipeline's denoiser) and ``scheduler``."""
        if self.name == "laplace":
            return BayesDiffSampler(model, scheduler, posterior)
        # A latent pipeline's entropy is taken on decoded images (pixels), never on the latents.
        features = None if self.latent else self.features
        return sampler_for(
            self.name, model, scheduler, posterior=posterior, samples=self.samples, features=features,
            last_steps=self.last_steps,
        )

    def run(self, sampler, options, **call: Any) -> BayesDiffOutput:
        """``sampler.sample(**call)`` with the wrapper call's uncertainty ``options`` (``WrapperOptions``),
        refused with a ValueError naming them where the method takes none."""
        uncertainty = dict(options.uncertainty)
        if self.name == "laplace":
            return sampler.sample(return_trace=options.return_trace, **uncertainty, **call)
        followed = _WEIGHT_SAMPLES_ARGUMENTS if self.name == "weight-samples" else ()
        refused = sorted(k for k in uncertainty if k not in followed) + (["return_trace"] if options.return_trace else [])
        if refused:
            raise ValueError(
                f"{', '.join(refused)} choose(s) the Laplace estimators; method {self.name!r} takes none"
            )
        if self.name == "weight-samples":
            return sampler.sample(return_draws=True, weight_seed=self.weight_seed, **uncertainty, **call)
        return sampler.sample(return_draws=True, **call)

    def pixels(
        self, result: BayesDiffOutput, decode, samples: int, batch_size: int, generator
    ) -> tuple[latent.PixelMoments, torch.Tensor | None]:
        """The pixel moments of a latent run through ``decode`` and weight-samples' feature entropy on the
        decoded images (None for the other methods): ``samples`` Gaussian draws of z_0 per image from
        ``generator`` (laplace), or the method's own M final latents or L predictions, decoded."""
        if self.name == "laplace":
            pixels = latent.pixel_moments(
                decode, result.mean, result.variance, samples=samples, batch_size=batch_size, generator=generator
            )
            return pixels, None
        dtype = accumulation_dtype(result.images)
        if self.name == "weight-samples":
            moments, entropy = weight_sample_spread(result.draws, decode, features=self.features, batch_size=batch_size)
            return latent.PixelMoments(moments.mean.to(dtype), moments.variance.to(dtype), self.samples), entropy
        variance, mean = drift_variance(list(latent.decode_each(decode, result.draws, batch_size)), self.last_steps)
        return latent.PixelMoments(mean.to(dtype), variance.to(dtype), self.last_steps), None

    def settings(self, decode_samples: int) -> dict[str, Any]:
        """What a run records of the method and of its pixel maps."""
        if self.name == "laplace":
            return dict(decode_samples=decode_samples)
        if self.name == "x0-drift":
            return dict(pixel_maps_from="the last L predictions of x0" if decode_samples else None)
        decoded = bool(decode_samples)
        return dict(
            pixel_maps_from="the M final latents" if decoded else None,
            feature_entropy=self.features is not None and decoded,  # on the decoded images
        )
