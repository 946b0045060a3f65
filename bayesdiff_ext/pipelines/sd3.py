"""BayesDiff wrapper of StableDiffusion3Pipeline (SD3, SD3.5): flow matching on a patch transformer."""

from __future__ import annotations

from typing import Any

import torch
from diffusers import StableDiffusion3Pipeline
from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift

from bayesdiff_ext import latent
from bayesdiff_ext.pipelines.base import (
    OWN_LOOP,
    BayesDiffPipeline,
    Conditioning,
    WrapperOptions,
    with_stock_arguments,
)
from bayesdiff_ext.posterior.training_noise import FlowMatchingNoise

__all__ = ["BayesDiffStableDiffusion3Pipeline"]


class BayesDiffStableDiffusion3Pipeline(BayesDiffPipeline, wraps=StableDiffusion3Pipeline):
    """``StableDiffusion3Pipeline``'s call with the variance of z_0 and pixel maps, images bitwise the stock call's.

    The three text encoders through the stock ``encode_prompt``, x_T by the stock ``prepare_latents``,
    the stock timesteps (``sigmas``, and ``mu`` where the scheduler shifts dynamically); the
    ``FlowMatchEulerDiscreteScheduler`` steps x + (σ' − σ)·v are followed, guidance batched as
    [uncond; cond] with the exact variance at φ_cfg. Pixel draws decode through z/s + shift_factor.
    Not supported (ValueError): ``skip_guidance_layers`` (a third, layer-skipped forward), IP-Adapter
    inputs, ``callback_on_step_end``.
    """

    denoiser_name = "transformer"
    unsupported = {
        "skip_guidance_layers": "skip-layer guidance adds a layer-skipped forward; leave skip_guidance_layers None",
        "ip_adapter_image": "IP-Adapter inputs are not supported",
        "ip_adapter_image_embeds": "IP-Adapter inputs are not supported",
        "callback_on_step_end": OWN_LOOP,
    }

    def _generate(self, call, extra, options: WrapperOptions):
        pipe = self.pipe
        height, width = self._size(call)
        pipe.check_inputs(
            call["prompt"], call["prompt_2"], call["prompt_3"], height, width,
            negative_prompt=call["negative_prompt"], negative_prompt_2=call["negative_prompt_2"],
            negative_prompt_3=call["negative_prompt_3"], prompt_embeds=call["prompt_embeds"],
            negative_prompt_embeds=call["negative_prompt_embeds"], pooled_prompt_embeds=call["pooled_prompt_embeds"],
            negative_pooled_prompt_embeds=call["negative_pooled_prompt_embeds"],
            callback_on_step_end_tensor_inputs=call["callback_on_step_end_tensor_inputs"],
            max_sequence_length=call["max_sequence_length"],
        )
        guided = call["guidance_scale"] > 1
        conditioning = self._encode(call, guided, height, width)
        device, generator = pipe._execution_device, call["generator"]
        noise = pipe.prepare_latents(
            conditioning.batch, pipe.transformer.config.in_channels, height, width, conditioning.dtype, device,
            generator, call["latents"],
        )
        timesteps: dict[str, Any] = {"device": device, "sigmas": call["sigmas"]}
        mu = call["mu"]
        if pipe.scheduler.config.get("use_dynamic_shifting", None) and mu is None:
            patch = pipe.transformer.config.patch_size
            config = pipe.scheduler.config
            mu = calculate_shift(
                (noise.shape[-2] // patch) * (noise.shape[-1] // patch),
                config.get("base_image_seq_len", 256),
                config.get("max_image_seq_len", 4096),
                config.get("base_shift", 0.5),
                config.get("max_shift", 1.16),
            )
        if mu is not None:
            timesteps["mu"] = mu
        steps = call["num_inference_steps"] if call["sigmas"] is None else len(call["sigmas"])
        result = self._sample(
            noise, steps, generator, 0.0, options, model_kwargs=conditioning.cond,
            guidance=conditioning.guidance(call["guidance_scale"], options.guidance_variance),
            set_timesteps_kwargs=timesteps,
        )
        return self._finish(result, call, options, call["guidance_scale"] if guided else None)

    def _encode(self, call, guided: bool, height: int, width: int) -> Conditioning:
        attention = call["joint_attention_kwargs"]
        prompt_embeds, negative_prompt_embeds, pooled, negative_pooled = with_stock_arguments(
            self.pipe.encode_prompt, call, **self._encoding(guided, attention)
        )
        cond: dict[str, Any] = {"encoder_hidden_states": prompt_embeds, "pooled_projections": pooled}
        if attention is not None:
            cond["joint_attention_kwargs"] = attention
        uncond = {"encoder_hidden_states": negative_prompt_embeds, "pooled_projections": negative_pooled} if guided else None
        return Conditioning(cond, uncond, prompt_embeds.dtype, len(prompt_embeds))

    @torch.no_grad()
    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        return latent.decode_latents(self.pipe.vae, latents)

    def training_noise(self, latents: torch.Tensor):
        """Flow matching with σ logit-normal(0, 1), SD3's training distribution, shifted as the scheduler shifts."""
        return FlowMatchingNoise(self.pipe.scheduler, "logit_normal")
