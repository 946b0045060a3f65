"""BayesDiff wrapper of StableDiffusionPipeline: latent moments, exact guidance variance, pixel maps."""

from __future__ import annotations

import time
from typing import Any

import torch
from diffusers import StableDiffusionPipeline
from diffusers.utils.torch_utils import randn_tensor

from bayesdiff_ext import latent
from bayesdiff_ext.guidance import ClassifierFreeGuidance, check_guidance_variance
from bayesdiff_ext.pipelines.base import BayesDiffPipeline, uncertainty_arguments
from bayesdiff_ext.pipelines.outputs import BayesDiffPipelineOutput
from bayesdiff_ext.sampler.randomness import independent_generator

__all__ = ["BayesDiffStableDiffusionPipeline"]

# Separates the decode draws' stream from the sampler's Monte Carlo stream seeded from the same generator.
_DECODE_STREAM = 0x5DEECE66D


class BayesDiffStableDiffusionPipeline(BayesDiffPipeline, wraps=StableDiffusionPipeline):
    """``StableDiffusionPipeline.__call__``'s arguments plus the uncertainty arguments.

    The prompt is encoded, x_T drawn and the images decoded, checked and post-processed by the
    stock pipeline's own methods; the denoising loop is the sampler's, with both guidance branches
    in one UNet call as the stock loop does, so in ``mode='deterministic'`` the images are those of
    the stock call. With guidance (``guidance_scale > 1``) the head's variance is evaluated at
    φ_cfg = (1−s)·φ_u + s·φ_c (``guidance_variance='exact'``) or, as in BayesDiff's code, as
    (1−s)²·V_u + s²·V_c (``'independent'``); Monte Carlo samples of z_t go through the UNet as one
    2·S·B batch. ``decode_samples`` Gaussian draws of z_0 ~ N(E[z_0], Var[z_0]) per image are
    decoded, ``decode_batch_size`` per ``vae.decode`` call, for the pixel variance (0: none).

    Not supported (ValueError): custom ``timesteps``/``sigmas``, ``guidance_rescale > 0`` (a
    non-linear rescaling of ε), IP-Adapter inputs, ``callback_on_step_end`` (the loop is the
    sampler's; use :class:`~bayesdiff_ext.UncertaintyCallback` in a stock loop instead) and UNets
    with a guidance embedding (``time_cond_proj_dim``).
    """

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        timesteps: list[int] | None = None,
        sigmas: list[float] | None = None,
        guidance_scale: float = 7.5,
        negative_prompt: str | list[str] | None = None,
        num_images_per_prompt: int | None = 1,
        eta: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        ip_adapter_image=None,
        ip_adapter_image_embeds: list[torch.Tensor] | None = None,
        output_type: str | None = "pil",
        return_dict: bool = True,
        cross_attention_kwargs: dict[str, Any] | None = None,
        guidance_rescale: float = 0.0,
        clip_skip: int | None = None,
        callback_on_step_end=None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
        *,
        uq_every: int = 1,
        mc_samples: int = 10,
        covariance: str = "mc",
        eps_variance: str = "total",
        skip: str = "all",
        clamp: bool = True,
        mode: str = "deterministic",
        return_trace: bool = False,
        guidance_variance: str = "exact",
        decode_samples: int = 16,
        decode_batch_size: int = 8,
        decode_generator: torch.Generator | None = None,
        **kwargs,
    ) -> BayesDiffPipelineOutput | tuple:
        """Sample like ``StableDiffusionPipeline``; ``return_dict=False`` gives
        (images, nsfw_content_detected, variance, pixel_variance)."""
        pipe, unet = self.pipe, self.pipe.unet
        check_guidance_variance(guidance_variance)
        _refuse_unsupported(
            timesteps=timesteps,
            sigmas=sigmas,
            guidance_rescale=guidance_rescale,
            ip_adapter_image=ip_adapter_image,
            ip_adapter_image_embeds=ip_adapter_image_embeds,
            callback_on_step_end=callback_on_step_end,
            time_cond_proj_dim=unet.config.time_cond_proj_dim,
            **kwargs,
        )
        if not height or not width:
            size = unet.config.sample_size
            height, width = (size, size) if isinstance(size, int) else size
            height, width = height * pipe.vae_scale_factor, width * pipe.vae_scale_factor
        pipe.check_inputs(
            prompt,
            height,
            width,
            None,
            negative_prompt,
            prompt_embeds,
            negative_prompt_embeds,
            None,
            None,
            callback_on_step_end_tensor_inputs,
        )
        if prompt is not None:
            batch_size = 1 if isinstance(prompt, str) else len(prompt)
        else:
            batch_size = prompt_embeds.shape[0]
        device = pipe._execution_device
        guided = guidance_scale > 1
        lora_scale = cross_attention_kwargs.get("scale", None) if cross_attention_kwargs is not None else None
        prompt_embeds, negative_prompt_embeds = pipe.encode_prompt(
            prompt,
            device,
            num_images_per_prompt,
            guided,
            negative_prompt,
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds,
            lora_scale=lora_scale,
            clip_skip=clip_skip,
        )
        # The unit-variance draw of prepare_latents; the sampler scales it by init_noise_sigma once
        # the timesteps are set, as the stock pipeline does after retrieve_timesteps.
        noise = _unit_noise(
            pipe,
            (batch_size * num_images_per_prompt, unet.config.in_channels, height, width),
            prompt_embeds.dtype,
            device,
            generator,
            latents,
        )
        cond_kwargs: dict[str, Any] = {"encoder_hidden_states": prompt_embeds}
        if cross_attention_kwargs is not None:
            cond_kwargs["cross_attention_kwargs"] = cross_attention_kwargs
        guidance = None
        if guided:
            guidance = ClassifierFreeGuidance(
                guidance_scale, {"encoder_hidden_states": negative_prompt_embeds}, guidance_variance
            )
        uncertainty = uncertainty_arguments(locals())
        # The stock pipeline hands eta to the scheduler only where its step takes one (DDIM).
        step_eta = eta if "eta" in pipe.prepare_extra_step_kwargs(generator, eta) else 0.0
        result = self._sample(
            noise,
            num_inference_steps,
            generator,
            step_eta,
            uncertainty,
            unet_kwargs=cond_kwargs,
            guidance=guidance,
        )

        if output_type == "latent":
            image, nsfw = result.images, None
        else:
            image = latent.decode_latents(pipe.vae, result.images, generator)
            image, nsfw = pipe.run_safety_checker(image, device, prompt_embeds.dtype)
        do_denormalize = [True] * image.shape[0] if nsfw is None else [not flagged for flagged in nsfw]
        image = pipe.image_processor.postprocess(
            image, output_type=output_type, do_denormalize=do_denormalize
        )

        pixels = None
        decode_started = time.perf_counter()
        if decode_samples:
            if decode_generator is None:
                decode_generator = _decode_stream(generator, result.mean.device)
            pixels = latent.pixel_moments(
                pipe.vae,
                result.mean,
                result.variance,
                samples=decode_samples,
                batch_size=decode_batch_size,
                generator=decode_generator,
            )
        if result.mean.device.type == "cuda":
            torch.cuda.synchronize(result.mean.device)
        timings = dict(result.timings, pixel_decode_s=time.perf_counter() - decode_started)
        pipe.maybe_free_model_hooks()

        settings = dict(
            result.settings,
            guidance_scale=float(guidance_scale) if guided else None,
            guidance_variance=guidance_variance if guided else None,
            decode_samples=decode_samples,
        )
        pixel_variance = None if pixels is None else pixels.variance
        if not return_dict:
            return image, nsfw, result.variance, pixel_variance
        return BayesDiffPipelineOutput(
            images=image,
            variance=result.variance,
            mean=result.mean,
            scores=result.scores,
            pixel_variance=pixel_variance,
            pixel_scores=None if pixels is None else pixels.scores,
            nsfw_content_detected=nsfw,
            trace=result.trace,
            settings=settings,
            timings=timings,
        )


def _unit_noise(pipe, size, dtype, device, generator, latents) -> torch.Tensor:
    """``prepare_latents``' draw (or the given ``latents``) before its scaling by ``init_noise_sigma``."""
    batch, channels, height, width = size
    if isinstance(generator, list) and len(generator) != batch:
        raise ValueError(
            f"You have passed a list of generators of length {len(generator)}, but requested an effective batch"
            f" size of {batch}. Make sure the batch size matches the length of the generators."
        )
    if latents is not None:
        return latents.to(device)
    shape = (batch, channels, int(height) // pipe.vae_scale_factor, int(width) // pipe.vae_scale_factor)
    return randn_tensor(shape, generator=generator, device=device, dtype=dtype)


def _refuse_unsupported(
    *,
    timesteps,
    sigmas,
    guidance_rescale,
    ip_adapter_image,
    ip_adapter_image_embeds,
    callback_on_step_end,
    time_cond_proj_dim,
    **kwargs,
) -> None:
    if timesteps is not None or sigmas is not None:
        raise ValueError("custom timesteps/sigmas are not supported; pass num_inference_steps")
    if guidance_rescale:
        raise ValueError(
            f"guidance_rescale={guidance_rescale} rescales ε by its own per-image std, a non-linear map the "
            "moment "
            "recurrence does not model; pass guidance_rescale=0.0"
        )
    if ip_adapter_image is not None or ip_adapter_image_embeds is not None:
        raise ValueError("IP-Adapter inputs are not supported by BayesDiffPipeline")
    if callback_on_step_end is not None or "callback" in kwargs or "callback_steps" in kwargs:
        raise ValueError(
            "step callbacks are not supported by BayesDiffPipeline (its loop is the sampler's); "
            "to keep your own "
            "loop and callbacks, pass bayesdiff_ext.UncertaintyCallback to the stock pipeline instead"
        )
    if kwargs:
        raise TypeError(f"unexpected keyword arguments: {sorted(kwargs)}")
    if time_cond_proj_dim is not None:
        raise ValueError("UNets with a guidance-scale embedding (time_cond_proj_dim) are not supported")


def _decode_stream(generator, device: torch.device) -> torch.Generator:
    """A generator for the decode draws, seeded from ``generator`` without consuming it."""
    seed = independent_generator(generator, device).initial_seed() ^ _DECODE_STREAM
    return torch.Generator(device=device).manual_seed(seed % 2**63)
