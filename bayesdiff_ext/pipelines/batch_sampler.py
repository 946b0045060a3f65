"""A pipeline wrapper with the sampler's batch interface, for the command line's run loop."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from bayesdiff_ext.pipelines.base import PER_IMAGE_ARGUMENTS, BayesDiffPipeline, per_image
from bayesdiff_ext.sampler import BayesDiffOutput

__all__ = ["PipelineBatchOutput", "PipelineSampler"]


@dataclass
class PipelineBatchOutput(BayesDiffOutput):
    """A :class:`~bayesdiff_ext.BayesDiffOutput` in pixels (``images``, ``mean``, ``variance`` of the decoded
    draws, (B, 3, H, W)) with the latent moments they were decoded from: ``latent_mean`` and
    ``latent_variance`` (E and Var of z_0 in the pipeline's latent layout, float32; Flux: packed tokens)."""

    latent_mean: torch.Tensor | None = None
    latent_variance: torch.Tensor | None = None


class PipelineSampler:
    """``sample(batch_size, num_inference_steps, generator, eta, progress, **uncertainty)`` as
    :meth:`BayesDiffSampler.sample`, through a :class:`~bayesdiff_ext.BayesDiffPipeline`: every image of
    a batch gets the same conditioning, and the result is in pixels — the decoded images at model scale
    [−1, 1], and the wrapper's pixel maps through the pipeline's own VAE path (its method's:
    ``decode_samples`` draws of z_0, or the decoded weight-sample finals or x̂₀ predictions), with the
    latent moments beside them (:class:`PipelineBatchOutput`) and weight-samples' ``feature_entropy``.
    The samplers this serves are deterministic (no aleatoric part).

    Args:
        wrapper (`BayesDiffPipeline`): the pipeline, its posterior and its method.
        conditioning (`dict`): the stock call's conditioning for one image (``prompt``, ``negative_prompt``,
            ``class_labels`` as one label, ...; each is repeated for the batch) and its other arguments
            (``guidance_scale``, ``height``, ``width``, ...).
        decode_samples (`int`): decoded draws of z_0 per image for the pixel moments (the Laplace method).
    """

    def __init__(self, wrapper: BayesDiffPipeline, conditioning: dict[str, Any], decode_samples: int = 16) -> None:
        self.wrapper = wrapper
        self.conditioning = conditioning
        self.decode_samples = decode_samples
        self.posterior = wrapper.posterior

    def sample(
        self,
        batch_size: int,
        num_inference_steps: int,
        generator: torch.Generator | None = None,
        eta: float = 0.0,
        progress: bool = True,
        **uncertainty: Any,
    ) -> PipelineBatchOutput:
        wrapper = self.wrapper
        wrapper.set_progress_bar_config(disable=not progress)
        call = {
            name: per_image(value, batch_size) if name in PER_IMAGE_ARGUMENTS else value
            for name, value in self.conditioning.items()
        }
        if eta:
            call["eta"] = eta
        out = wrapper(
            num_inference_steps=num_inference_steps, generator=generator, output_type="pt",
            decode_samples=self.decode_samples, **call, **uncertainty,
        )
        return PipelineBatchOutput(
            images=out.images.to(out.pixel_mean.dtype) * 2 - 1,
            variance=out.pixel_variance,
            mean=out.pixel_mean,
            settings=out.settings,
            timings=out.timings,
            clamped_pixels=out.clamped_pixels,  # of the latent estimate the pixels are decoded from
            feature_entropy=out.feature_entropy,
            latent_mean=out.mean,
            latent_variance=out.variance,
        )
