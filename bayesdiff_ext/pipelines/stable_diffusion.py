"""BayesDiff wrappers of StableDiffusionPipeline (SD 1.x/2.x) and StableDiffusionXLPipeline.

Both encode the prompt, draw x_T and decode with the stock pipeline's own methods and arithmetic;
the loop is the sampler's, with both guidance branches in one UNet call as the stock loop does.
SD 1.5's default ``PNDMScheduler`` is multistep: the trajectory estimators (the default preset) run it,
the moment recurrence refuses it by name. SDXL's default ``EulerDiscreteScheduler`` (the model sees
x/√(σ²+1)) is followed by every estimator.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

from bayesdiff_ext import latent
from bayesdiff_ext.pipelines.base import (
    OWN_LOOP,
    BayesDiffPipeline,
    Conditioning,
    WrapperOptions,
    refuse_extra_kwargs,
    unit_noise,
    with_stock_arguments,
)

__all__ = ["BayesDiffStableDiffusionPipeline", "BayesDiffStableDiffusionXLPipeline"]

_NON_LINEAR_RESCALE = (
    "it rescales ε by its own per-image std, a non-linear map the moment recurrence does not model; "
    "pass guidance_rescale=0.0"
)
_TEXT_PIPELINE_UNSUPPORTED = {
    "timesteps": "custom timesteps are not supported; pass num_inference_steps",
    "sigmas": "custom sigmas are not supported; pass num_inference_steps",
    "guidance_rescale": _NON_LINEAR_RESCALE,
    "ip_adapter_image": "IP-Adapter inputs are not supported",
    "ip_adapter_image_embeds": "IP-Adapter inputs are not supported",
    "callback_on_step_end": OWN_LOOP,
}


class _TextToImage(BayesDiffPipeline):
    """What SD and SDXL share: the size default, x_T, the guidance, the step's η, the output."""

    unsupported = _TEXT_PIPELINE_UNSUPPORTED

    def _checked_size(self, call, extra) -> tuple[int, int]:
        """The image size, after refusing the stock ``**kwargs`` and a UNet with a guidance embedding."""
        refuse_extra_kwargs(extra)
        if self.pipe.unet.config.time_cond_proj_dim is not None:
            raise ValueError("UNets with a guidance-scale embedding (time_cond_proj_dim) are not supported")
        return self._size(call)

    def _run(self, call, options: WrapperOptions, conditioning: Conditioning, height: int, width: int):
        """x_T, guidance and the sampler's loop from the encoded conditioning; returns the sampler's result."""
        pipe, generator = self.pipe, call["generator"]
        # The unit-variance draw of prepare_latents; the sampler scales it by init_noise_sigma once
        # the timesteps are set, as the stock pipeline does after retrieve_timesteps.
        noise = unit_noise(
            pipe,
            (conditioning.batch, pipe.unet.config.in_channels, height, width),
            conditioning.dtype,
            pipe._execution_device,
            generator,
            call["latents"],
        )
        # The stock pipeline hands eta to the scheduler only where its step takes one (DDIM).
        step_eta = call["eta"] if "eta" in pipe.prepare_extra_step_kwargs(generator, call["eta"]) else 0.0
        return self._sample(
            noise,
            call["num_inference_steps"],
            generator,
            step_eta,
            options,
            model_kwargs=conditioning.cond,
            guidance=conditioning.guidance(call["guidance_scale"], options.guidance_variance),
            set_timesteps_kwargs={"device": pipe._execution_device},
        )


class BayesDiffStableDiffusionPipeline(_TextToImage, wraps=StableDiffusionPipeline):
    """``StableDiffusionPipeline``'s call with the variance of z_0 and pixel maps, images bitwise the stock call's.

    With guidance (``guidance_scale > 1``) the head's variance is evaluated at
    φ_cfg = (1−s)·φ_u + s·φ_c (``guidance_variance='exact'``) or, as in BayesDiff's code, as
    (1−s)²·V_u + s²·V_c (``'independent'``); Monte Carlo samples of z_t go through the UNet as one
    2·S·B batch. ``decode_samples`` Gaussian draws of z_0 ~ N(E[z_0], Var[z_0]) per image are decoded
    for the pixel variance. SD 1.5's default ``PNDMScheduler`` is multistep: the default preset
    (trajectory Monte Carlo) runs it; the moment recurrence (``preset='paper'``) refuses it (swap in
    ``DDIMScheduler.from_config(pipe.scheduler.config, clip_sample=False)`` for it). Not supported (ValueError): custom ``timesteps``/``sigmas``, ``guidance_rescale > 0``,
    IP-Adapter inputs, ``callback_on_step_end`` and UNets with a guidance embedding.
    """

    def _generate(self, call, extra, options: WrapperOptions):
        pipe = self.pipe
        height, width = self._checked_size(call, extra)
        pipe.check_inputs(
            call["prompt"], height, width, None, call["negative_prompt"], call["prompt_embeds"],
            call["negative_prompt_embeds"], None, None, call["callback_on_step_end_tensor_inputs"],
        )
        guided = call["guidance_scale"] > 1
        conditioning = self._encode(call, guided, height, width)
        result = self._run(call, options, conditioning, height, width)

        generator, output_type = call["generator"], call["output_type"]
        if output_type == "latent":
            image, nsfw = result.images, None
        else:
            image = latent.decode_latents(pipe.vae, result.images, generator)
            image, nsfw = pipe.run_safety_checker(image, pipe._execution_device, conditioning.dtype)
        denormalize = [True] * image.shape[0] if nsfw is None else [not flagged for flagged in nsfw]
        image = pipe.image_processor.postprocess(image, output_type=output_type, do_denormalize=denormalize)
        return self._output(
            result, image, options, generator,
            return_dict=call["return_dict"], stock_tuple=(image, nsfw),
            guidance_scale=call["guidance_scale"] if guided else None, nsfw=nsfw,
        )

    def default_size(self) -> tuple[int, int]:
        size = self.pipe.unet.config.sample_size * self.pipe.vae_scale_factor
        return size, size

    def _encode(self, call, guided: bool, height: int, width: int) -> Conditioning:
        attention = call["cross_attention_kwargs"]
        prompt_embeds, negative_prompt_embeds = with_stock_arguments(
            self.pipe.encode_prompt, call, **self._encoding(guided, attention)
        )
        cond: dict[str, Any] = {"encoder_hidden_states": prompt_embeds}
        if attention is not None:
            cond["cross_attention_kwargs"] = attention
        uncond = {"encoder_hidden_states": negative_prompt_embeds} if guided else None
        return Conditioning(cond, uncond, prompt_embeds.dtype, len(prompt_embeds))

    @torch.no_grad()
    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        return latent.decode_latents(self.pipe.vae, latents)


class BayesDiffStableDiffusionXLPipeline(_TextToImage, wraps=StableDiffusionXLPipeline):
    """``StableDiffusionXLPipeline``'s call with the variance of z_0 and pixel maps, images bitwise the stock call's.

    Both text encoders through the stock ``encode_prompt``; the micro-conditioning
    (``added_cond_kwargs``: pooled text embeddings and time ids) is the stock rows, tiled for the
    Monte Carlo batch. The default ``EulerDiscreteScheduler`` is followed (the model sees x/√(σ²+1),
    the moments stay in the scheduler's space). Guidance as for Stable Diffusion (exact variance at
    φ_cfg); the decode path is the stock one (``latents_mean``/``latents_std`` where the VAE has them,
    the fp16 upcast); the watermark is applied to the images, not to the pixel draws. Not supported
    (ValueError): ``denoising_end``, custom ``timesteps``/``sigmas``, ``guidance_rescale > 0``,
    IP-Adapter inputs, ``callback_on_step_end`` and UNets with a guidance embedding.
    """

    unsupported = {
        **_TEXT_PIPELINE_UNSUPPORTED,
        "denoising_end": "the sampler runs every step; leave denoising_end None",
    }

    def _generate(self, call, extra, options: WrapperOptions):
        pipe = self.pipe
        height, width = self._checked_size(call, extra)
        pipe.check_inputs(
            call["prompt"], call["prompt_2"], height, width, None, call["negative_prompt"], call["negative_prompt_2"],
            call["prompt_embeds"], call["negative_prompt_embeds"], call["pooled_prompt_embeds"],
            call["negative_pooled_prompt_embeds"], None, None, call["callback_on_step_end_tensor_inputs"],
        )
        guided = call["guidance_scale"] > 1
        result = self._run(call, options, self._encode(call, guided, height, width), height, width)

        watermark = None if pipe.watermark is None else pipe.watermark.apply_watermark  # the images only
        return self._finish(result, call, options, call["guidance_scale"] if guided else None, finish_image=watermark)

    def _encode(self, call, guided: bool, height: int, width: int) -> Conditioning:
        attention, device = call["cross_attention_kwargs"], self.pipe._execution_device
        prompt_embeds, negative_prompt_embeds, pooled, negative_pooled = with_stock_arguments(
            self.pipe.encode_prompt, call, **self._encoding(guided, attention)
        )
        batch = len(prompt_embeds)
        time_ids, uncond_time_ids = self._time_ids(call, height, width, pooled, prompt_embeds.dtype, batch, guided)
        cond: dict[str, Any] = {
            "encoder_hidden_states": prompt_embeds.to(device),
            "added_cond_kwargs": {"text_embeds": pooled.to(device), "time_ids": time_ids},
        }
        if attention is not None:
            cond["cross_attention_kwargs"] = attention
        uncond = None
        if guided:
            uncond = {
                "encoder_hidden_states": negative_prompt_embeds.to(device),
                "added_cond_kwargs": {"text_embeds": negative_pooled.to(device), "time_ids": uncond_time_ids},
            }
        return Conditioning(cond, uncond, prompt_embeds.dtype, batch)

    def _time_ids(self, call, height, width, pooled, dtype, batch: int, guided: bool):
        """The (conditional, unconditional) rows of the stock ``add_time_ids``.

        The stock pipeline concatenates one row per branch and repeats that pair for the 2·B rows
        (so rows alternate between the branches when the negative size conditioning differs);
        the rows are split back into the branches' halves here, so every UNet row gets the stock's.
        """
        pipe = self.pipe
        projection = (
            int(pooled.shape[-1]) if pipe.text_encoder_2 is None else pipe.text_encoder_2.config.projection_dim
        )
        original_size = call["original_size"] or (height, width)
        target_size = call["target_size"] or (height, width)
        time_ids = pipe._get_add_time_ids(
            original_size, call["crops_coords_top_left"], target_size, dtype=dtype, text_encoder_projection_dim=projection
        )
        uncond_ids = time_ids
        if call["negative_original_size"] is not None and call["negative_target_size"] is not None:
            uncond_ids = pipe._get_add_time_ids(
                call["negative_original_size"], call["negative_crops_coords_top_left"], call["negative_target_size"],
                dtype=dtype, text_encoder_projection_dim=projection,
            )
        device = pipe._execution_device
        if not guided:
            return time_ids.to(device).repeat(batch, 1), None
        rows = torch.cat([uncond_ids, time_ids], dim=0).to(device).repeat(batch, 1)
        uncond_rows, cond_rows = rows.chunk(2)
        return cond_rows, uncond_rows

    @torch.no_grad()
    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        """The stock decode: the fp16 VAE upcast, ``latents_mean``/``latents_std`` or 1/``scaling_factor``."""
        vae = self.pipe.vae
        upcast = vae.dtype == torch.float16 and vae.config.force_upcast
        if upcast:
            vae.to(dtype=torch.float32)
        z = latent.to_vae_latents(latents.to(vae.dtype), vae)
        image = vae.decode(z.to(vae.device), return_dict=False)[0]
        if upcast:
            vae.to(dtype=torch.float16)
        return image
