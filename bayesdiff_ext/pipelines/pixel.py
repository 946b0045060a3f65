"""BayesDiff wrappers of the pixel-space pipelines DDPMPipeline and DDIMPipeline."""

from __future__ import annotations

from diffusers import DDIMPipeline, DDPMPipeline
from diffusers.utils.torch_utils import randn_tensor

from bayesdiff_ext.pipelines.base import BayesDiffPipeline, WrapperOptions
from bayesdiff_ext.validation import check_count

__all__ = ["BayesDiffDDIMPipeline", "BayesDiffDDPMPipeline"]


class _PixelPipeline(BayesDiffPipeline):
    guided = False
    latent = False
    prompted = False

    def _generate(self, call, extra, options: WrapperOptions):
        pipe, config = self.pipe, self.pipe.unet.config
        batch_size, generator = check_count("batch_size", call["batch_size"]), call["generator"]
        size = config.sample_size
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
        result = self._sample(noise, call["num_inference_steps"], generator, call.get("eta", 0.0), options)

        image = (result.images / 2 + 0.5).clamp(0, 1)
        if call["output_type"] != "pt":
            image = image.cpu().permute(0, 2, 3, 1).numpy()
            if call["output_type"] == "pil":
                image = pipe.numpy_to_pil(image)
        return self._output(result, image, options, generator, return_dict=call["return_dict"], stock_tuple=(image,))


class BayesDiffDDPMPipeline(_PixelPipeline, wraps=DDPMPipeline):
    """``DDPMPipeline``'s call with the per-pixel variance of x_0, images bitwise the stock call's."""


class BayesDiffDDIMPipeline(_PixelPipeline, wraps=DDIMPipeline):
    """``DDIMPipeline``'s call with the per-pixel variance of x_0, images bitwise the stock call's.

    ``use_clipped_model_output=True`` is refused (it re-derives ε from a clipped x̂_0).
    """

    unsupported = {
        "use_clipped_model_output": (
            "it re-derives ε from a clipped x̂_0, which the moment recurrence does not model; leave it None "
            "(the scheduler needs clip_sample=False anyway)"
        ),
    }
