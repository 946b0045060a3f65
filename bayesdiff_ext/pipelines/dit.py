"""BayesDiff wrapper of DiTPipeline: a class-conditional, learned-σ transformer, guidance on the ε channels."""

from __future__ import annotations

import torch
from diffusers import DiTPipeline
from diffusers.utils.torch_utils import randn_tensor

from bayesdiff_ext.pipelines.base import BayesDiffPipeline, Conditioning, WrapperOptions

__all__ = ["BayesDiffDiTPipeline"]

# DiTPipeline's null class for the unconditional branch (ImageNet's 1000 classes, then the null one).
_NULL_CLASS = 1000


class BayesDiffDiTPipeline(BayesDiffPipeline, wraps=DiTPipeline):
    """``DiTPipeline``'s call with the variance of z_0 and pixel maps, images bitwise the stock call's.

    The stock loop runs [cond; uncond] (the class labels, then the null class 1000) in one forward
    and mixes only the ε channels, ε_u + s·(ε_c − ε_u); the learned-σ channels are not stepped.
    The head's posterior is on the ε rows, so the exact variance is the head's at φ_cfg. x_T is the
    stock draw (not scaled by ``init_noise_sigma``, as the stock pipeline does not); the default
    ``DDIMScheduler`` is followed. Pixel draws decode through the stock 1/s·z.
    """

    denoiser_name = "transformer"
    prompted = False

    def _generate(self, call, extra, options: WrapperOptions):
        pipe = self.pipe
        guided = call["guidance_scale"] > 1
        conditioning = self._encode(call, guided, None, None)
        config = pipe.transformer.config
        generator = call["generator"]
        noise = randn_tensor(
            (conditioning.batch, config.in_channels, config.sample_size, config.sample_size),
            generator=generator, device=pipe._execution_device, dtype=pipe.transformer.dtype,
        )
        result = self._sample(
            noise, call["num_inference_steps"], generator, 0.0, options, model_kwargs=conditioning.cond,
            guidance=conditioning.guidance(call["guidance_scale"], options.guidance_variance, "cond_first"),
        )
        image = (self._decode(result.images) / 2 + 0.5).clamp(0, 1)
        if call["output_type"] != "pt":
            image = image.cpu().permute(0, 2, 3, 1).float().numpy()
            if call["output_type"] == "pil":
                image = pipe.numpy_to_pil(image)
        return self._output(
            result, image, options, generator, return_dict=call["return_dict"], stock_tuple=(image,),
            guidance_scale=call["guidance_scale"] if guided else None,
        )

    def default_size(self) -> tuple[int, int]:
        """The transformer's sample size times the VAE's downsampling (DiTPipeline has no ``vae_scale_factor``)."""
        size = self.pipe.transformer.config.sample_size * 2 ** (len(self.pipe.vae.config.block_out_channels) - 1)
        return size, size

    def _encode(self, call, guided: bool, height, width) -> Conditioning:
        if call["class_labels"] is None:
            raise ValueError("DiT needs class_labels (ImageNet class indices, one per image)")
        device = self.pipe._execution_device
        labels = torch.as_tensor(call["class_labels"], device=device).reshape(-1)
        uncond = {"class_labels": torch.tensor([_NULL_CLASS] * len(labels), device=device)} if guided else None
        return Conditioning({"class_labels": labels}, uncond, self.pipe.transformer.dtype, len(labels))

    @torch.no_grad()
    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        vae = self.pipe.vae
        return vae.decode(1 / vae.config.scaling_factor * latents.to(vae.dtype)).sample
