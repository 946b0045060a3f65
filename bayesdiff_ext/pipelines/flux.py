"""BayesDiff wrapper of FluxPipeline: flow matching on packed latent tokens, dynamic shift, two kinds of guidance."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from diffusers import FluxPipeline
from diffusers.pipelines.flux.pipeline_flux import calculate_shift

from bayesdiff_ext import latent
from bayesdiff_ext.pipelines.base import (
    OWN_LOOP,
    BayesDiffPipeline,
    Conditioning,
    WrapperOptions,
    with_stock_arguments,
)
from bayesdiff_ext.posterior.training_noise import FlowMatchingNoise

__all__ = ["BayesDiffFluxPipeline"]

_IP_ADAPTER = "IP-Adapter inputs are not supported"


class BayesDiffFluxPipeline(BayesDiffPipeline, wraps=FluxPipeline):
    """``FluxPipeline``'s call with the variance of z_0 and pixel maps, images bitwise the stock call's.

    The latents are the stock packed tokens (B, h/2·w/2, 4·C): the sampler's moments, ``.variance``
    and ``.mean`` are in that layout, as ``output_type='latent'`` returns the latents
    (``pipe._unpack_latents(out.variance, height, width, pipe.vae_scale_factor)`` gives the
    (B, C, h, w) map: the unpacking is a permutation). The model gets ``timestep / 1000`` and the
    stock σ grid with its dynamic shift ``mu``. A guidance-distilled model (``guidance_embeds``: the
    scale is an input, one forward per step) has the plain head variance; ``true_cfg_scale > 1``
    with a negative prompt runs the stock two forwards per step (the conditional, then the
    unconditional) and gets the exact variance at φ_cfg. Pixel draws are unpacked and decoded
    through z/s + shift_factor. Not supported (ValueError): IP-Adapter inputs, ``callback_on_step_end``.
    """

    denoiser_name = "transformer"
    unsupported = {
        "ip_adapter_image": _IP_ADAPTER,
        "ip_adapter_image_embeds": _IP_ADAPTER,
        "negative_ip_adapter_image": _IP_ADAPTER,
        "negative_ip_adapter_image_embeds": _IP_ADAPTER,
        "callback_on_step_end": OWN_LOOP,
    }

    def _generate(self, call, extra, options: WrapperOptions):
        pipe = self.pipe
        height, width = self._size(call)
        pipe.check_inputs(
            call["prompt"], call["prompt_2"], height, width,
            negative_prompt=call["negative_prompt"], negative_prompt_2=call["negative_prompt_2"],
            prompt_embeds=call["prompt_embeds"], negative_prompt_embeds=call["negative_prompt_embeds"],
            pooled_prompt_embeds=call["pooled_prompt_embeds"],
            negative_pooled_prompt_embeds=call["negative_pooled_prompt_embeds"],
            callback_on_step_end_tensor_inputs=call["callback_on_step_end_tensor_inputs"],
            max_sequence_length=call["max_sequence_length"],
        )
        has_negative = call["negative_prompt"] is not None or (
            call["negative_prompt_embeds"] is not None and call["negative_pooled_prompt_embeds"] is not None
        )
        true_cfg = call["true_cfg_scale"] > 1 and has_negative
        if true_cfg and call["prompt_embeds"] is not None and call["negative_prompt_embeds"] is not None:
            if call["prompt_embeds"].shape != call["negative_prompt_embeds"].shape:
                raise ValueError(
                    "`prompt_embeds` and `negative_prompt_embeds` must have the same shape when passed directly, "
                    f"but got: `prompt_embeds` {call['prompt_embeds'].shape} != `negative_prompt_embeds` "
                    f"{call['negative_prompt_embeds'].shape}."
                )
        conditioning = self._encode(call, true_cfg, height, width)
        device, generator = pipe._execution_device, call["generator"]
        noise, _ = pipe.prepare_latents(
            conditioning.batch, pipe.transformer.config.in_channels // 4, height, width, conditioning.dtype, device,
            generator, call["latents"],
        )
        steps, sigmas = call["num_inference_steps"], call["sigmas"]
        sigmas = np.linspace(1.0, 1 / steps, steps) if sigmas is None else sigmas
        if getattr(pipe.scheduler.config, "use_flow_sigmas", False):
            sigmas = None
        timesteps = {"device": device, "sigmas": sigmas, "mu": self._shift(noise.shape[1])}
        guidance = None
        if true_cfg:
            guidance = conditioning.guidance(call["true_cfg_scale"], options.guidance_variance, "separate")
        result = self._sample(
            noise, steps if sigmas is None else len(sigmas), generator, 0.0, options,
            model_kwargs=conditioning.cond, guidance=guidance, set_timesteps_kwargs=timesteps,
        )
        return self._finish(
            result, call, options, call["true_cfg_scale"] if true_cfg else None, self.decoder(height, width)
        )

    def _shift(self, tokens: int) -> float:
        """The stock dynamic shift ``mu`` for ``tokens`` image tokens."""
        config = self.pipe.scheduler.config
        return calculate_shift(
            tokens,
            config.get("base_image_seq_len", 256),
            config.get("max_image_seq_len", 4096),
            config.get("base_shift", 0.5),
            config.get("max_shift", 1.15),
        )

    def _encode(self, call, guided: bool, height: int, width: int) -> Conditioning:
        pipe, device, attention = self.pipe, self.pipe._execution_device, call["joint_attention_kwargs"]
        encoding = self._encoding(guided, attention)
        del encoding["do_classifier_free_guidance"]  # Flux encodes each branch in its own call

        def encoded(prefix: str):
            branch = {name: call[prefix + name] for name in ("prompt", "prompt_2", "prompt_embeds", "pooled_prompt_embeds")}
            return with_stock_arguments(pipe.encode_prompt, call, **branch, **encoding)

        prompt_embeds, pooled, text_ids = encoded("")
        batch = len(prompt_embeds)
        size = 2 * (int(height) // (pipe.vae_scale_factor * 2)), 2 * (int(width) // (pipe.vae_scale_factor * 2))
        cond: dict[str, Any] = {
            "pooled_projections": pooled,
            "encoder_hidden_states": prompt_embeds,
            "txt_ids": text_ids,
            "img_ids": pipe._prepare_latent_image_ids(batch, size[0] // 2, size[1] // 2, device, prompt_embeds.dtype),
        }
        if pipe.transformer.config.guidance_embeds:
            scale = torch.full([1], call["guidance_scale"], device=device, dtype=torch.float32)
            cond["guidance"] = scale.expand(batch)
        if attention is not None:
            cond["joint_attention_kwargs"] = attention
        uncond = None
        if guided:
            negative_embeds, negative_pooled, negative_text_ids = encoded("negative_")
            uncond = {
                "pooled_projections": negative_pooled,
                "encoder_hidden_states": negative_embeds,
                "txt_ids": negative_text_ids,
            }
        return Conditioning(cond, uncond, prompt_embeds.dtype, batch)

    def decoder(self, height: int | None = None, width: int | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
        """The stock decode of packed latents for ``height`` × ``width`` images (the pipeline's default size
        when not given): unpack, z/s + shift_factor, ``vae.decode``."""
        height, width = self._size({"height": height, "width": width})
        pipe = self.pipe

        @torch.no_grad()
        def decode(latents: torch.Tensor) -> torch.Tensor:
            unpacked = pipe._unpack_latents(latents, height, width, pipe.vae_scale_factor)
            return latent.decode_latents(pipe.vae, unpacked.to(pipe.vae.device))

        return decode

    def encode_images(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        latents = latent.encode_images(self.pipe.vae, images, generator)
        return self.pipe._pack_latents(latents, *latents.shape)

    def training_noise(self, latents: torch.Tensor):
        """Flow matching with σ logit-normal(0, 1), shifted by the stock ``mu`` of the latents' token count."""
        scheduler = self.pipe.scheduler
        mu = self._shift(latents.shape[1]) if scheduler.config.use_dynamic_shifting else None
        return FlowMatchingNoise(scheduler, "logit_normal", mu=mu)
