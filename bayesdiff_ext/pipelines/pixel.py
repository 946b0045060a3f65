"""BayesDiff wrappers of the pixel-space pipelines DDPMPipeline and DDIMPipeline."""

from __future__ import annotations

import torch
from diffusers import DDIMPipeline, DDPMPipeline
from diffusers.utils.torch_utils import randn_tensor

from bayesdiff_ext.pipelines.base import BayesDiffPipeline, uncertainty_arguments
from bayesdiff_ext.pipelines.outputs import BayesDiffPipelineOutput
from bayesdiff_ext.validation import check_count

__all__ = ["BayesDiffDDIMPipeline", "BayesDiffDDPMPipeline"]


class _PixelPipeline(BayesDiffPipeline):
    def _run(self, batch_size, generator, eta, num_inference_steps, output_type, return_dict, uncertainty):
        pipe, config = self.pipe, self.pipe.unet.config
        size = config.sample_size
        batch_size = check_count("batch_size", batch_size)
        shape = (batch_size, config.in_channels, *((size, size) if isinstance(size, int) else size))
        if isinstance(generator, list) and len(generator) != batch_size:
            raise ValueError(
                f"generator is a list of {len(generator)} generators but batch_size is {batch_size}: "
                "pass one generator per image"
            )
        device = pipe._execution_device
        # x_T drawn exactly as the stock pipelines draw it (DDPMPipeline draws on the CPU for mps).
        draw_device = None if device.type == "mps" else device
        noise = randn_tensor(shape, generator=generator, device=draw_device, dtype=pipe.unet.dtype).to(device)
        result = self._sample(noise, num_inference_steps, generator, eta, uncertainty)

        image = (result.images / 2 + 0.5).clamp(0, 1)
        if output_type != "pt":
            image = image.cpu().permute(0, 2, 3, 1).numpy()
            if output_type == "pil":
                image = pipe.numpy_to_pil(image)
        pipe.maybe_free_model_hooks()
        if not return_dict:
            return image, result.variance, result.variance
        return BayesDiffPipelineOutput(
            images=image,
            variance=result.variance,
            mean=result.mean,
            scores=result.scores,
            pixel_variance=result.variance,
            pixel_scores=result.scores,
            trace=result.trace,
            settings=result.settings,
            timings=result.timings,
        )


class BayesDiffDDPMPipeline(_PixelPipeline, wraps=DDPMPipeline):
    """``DDPMPipeline.__call__``'s arguments plus the sampler's uncertainty arguments."""

    @torch.no_grad()
    def __call__(
        self,
        batch_size: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        num_inference_steps: int = 1000,
        output_type: str | None = "pil",
        return_dict: bool = True,
        *,
        uq_every: int = 1,
        mc_samples: int = 10,
        covariance: str = "mc",
        eps_variance: str = "total",
        skip: str = "all",
        clamp: bool = True,
        mode: str = "deterministic",
        return_trace: bool = False,
    ) -> BayesDiffPipelineOutput | tuple:
        """Sample like ``DDPMPipeline``; ``return_dict=False`` gives (images, variance, pixel_variance)."""
        uncertainty = uncertainty_arguments(locals())
        return self._run(
            batch_size, generator, 0.0, num_inference_steps, output_type, return_dict, uncertainty
        )


class BayesDiffDDIMPipeline(_PixelPipeline, wraps=DDIMPipeline):
    """``DDIMPipeline.__call__``'s arguments plus the sampler's uncertainty arguments."""

    @torch.no_grad()
    def __call__(
        self,
        batch_size: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        eta: float = 0.0,
        num_inference_steps: int = 50,
        use_clipped_model_output: bool | None = None,
        output_type: str | None = "pil",
        return_dict: bool = True,
        *,
        uq_every: int = 1,
        mc_samples: int = 10,
        covariance: str = "mc",
        eps_variance: str = "total",
        skip: str = "all",
        clamp: bool = True,
        mode: str = "deterministic",
        return_trace: bool = False,
    ) -> BayesDiffPipelineOutput | tuple:
        """Sample like ``DDIMPipeline``; ``return_dict=False`` gives (images, variance, pixel_variance)."""
        if use_clipped_model_output:
            raise ValueError(
                "use_clipped_model_output=True re-derives ε from a clipped x̂_0, which the moment "
                "recurrence does not model; leave it None (the scheduler needs clip_sample=False anyway)"
            )
        uncertainty = uncertainty_arguments(locals())
        return self._run(
            batch_size, generator, eta, num_inference_steps, output_type, return_dict, uncertainty
        )
