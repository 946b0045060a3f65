"""BayesDiff wrapper of PixArtSigmaPipeline: a learned-σ patch transformer with T5 captions."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from diffusers import PixArtSigmaPipeline
from diffusers.pipelines.pixart_alpha.pipeline_pixart_sigma import (
    ASPECT_RATIO_256_BIN,
    ASPECT_RATIO_512_BIN,
    ASPECT_RATIO_1024_BIN,
    ASPECT_RATIO_2048_BIN,
)

from bayesdiff_ext.pipelines.base import (
    OWN_LOOP,
    BayesDiffPipeline,
    Conditioning,
    WrapperOptions,
    refuse_extra_kwargs,
    unit_noise,
    with_stock_arguments,
)

__all__ = ["BayesDiffPixArtSigmaPipeline"]

# The stock resolution bins by the transformer's sample size.
_BINS = {256: ASPECT_RATIO_2048_BIN, 128: ASPECT_RATIO_1024_BIN, 64: ASPECT_RATIO_512_BIN, 32: ASPECT_RATIO_256_BIN}


class BayesDiffPixArtSigmaPipeline(BayesDiffPipeline, wraps=PixArtSigmaPipeline):
    """``PixArtSigmaPipeline``'s call with the variance of z_0 and pixel maps, images bitwise the stock call's.

    The T5 captions through the stock ``encode_prompt`` (with their attention masks), the stock
    resolution binning (the images, and every pixel draw, resized back to the asked size), guidance
    as [uncond; cond] on all 2·C output channels of which the stepped ε channels get the exact
    variance at φ_cfg (the learned-σ rows are not the posterior's). The default
    ``DPMSolverMultistepScheduler`` (DPM-Solver++ 2M) is multistep: the default preset (trajectory
    Monte Carlo) runs it; the moment recurrence (``preset='paper'``) refuses it by name (swap in
    ``DDIMScheduler.from_config(pipe.scheduler.config, clip_sample=False)`` for it). Not supported (ValueError): custom ``timesteps``/``sigmas``, ``callback``.
    """

    denoiser_name = "transformer"
    unsupported = {
        "timesteps": "custom timesteps are not supported; pass num_inference_steps",
        "sigmas": "custom sigmas are not supported; pass num_inference_steps",
        "callback": OWN_LOOP,
    }

    def _generate(self, call, extra, options: WrapperOptions):
        refuse_extra_kwargs(extra)
        pipe = self.pipe
        sample_size = pipe.transformer.config.sample_size
        height, width = requested = self._size(call)
        if call["use_resolution_binning"]:
            if sample_size not in _BINS:
                raise ValueError("Invalid sample size")
            height, width = pipe.image_processor.classify_height_width_bin(height, width, ratios=_BINS[sample_size])
        pipe.check_inputs(
            call["prompt"], height, width, call["negative_prompt"], call["callback_steps"], call["prompt_embeds"],
            call["negative_prompt_embeds"], call["prompt_attention_mask"], call["negative_prompt_attention_mask"],
        )
        guided = call["guidance_scale"] > 1.0
        conditioning = self._encode(call, guided, height, width)
        device, generator = pipe._execution_device, call["generator"]
        noise = unit_noise(
            pipe, (conditioning.batch, pipe.transformer.config.in_channels, height, width), conditioning.dtype,
            device, generator, call["latents"],
        )
        step_eta = call["eta"] if "eta" in pipe.prepare_extra_step_kwargs(generator, call["eta"]) else 0.0
        result = self._sample(
            noise, call["num_inference_steps"], generator, step_eta, options, model_kwargs=conditioning.cond,
            guidance=conditioning.guidance(call["guidance_scale"], options.guidance_variance),
            set_timesteps_kwargs={"device": device},
        )
        decode = self.decoder(*requested) if call["use_resolution_binning"] else self._decode
        return self._finish(result, call, options, call["guidance_scale"] if guided else None, decode)

    def default_size(self) -> tuple[int, int]:
        size = self.pipe.transformer.config.sample_size * self.pipe.vae_scale_factor
        return size, size

    def command_line_arguments(self) -> dict[str, Any]:
        """No resolution binning for a transformer whose sample size has no bins (the stock call refuses it)."""
        return {} if self.pipe.transformer.config.sample_size in _BINS else {"use_resolution_binning": False}

    def _encode(self, call, guided: bool, height: int, width: int) -> Conditioning:
        prompt_embeds, mask, negative_embeds, negative_mask = with_stock_arguments(
            self.pipe.encode_prompt, call, device=self.pipe._execution_device, do_classifier_free_guidance=guided
        )
        no_micro_conditions: dict[str, Any] = {"resolution": None, "aspect_ratio": None}
        cond = {"encoder_hidden_states": prompt_embeds, "encoder_attention_mask": mask, "added_cond_kwargs": no_micro_conditions}
        uncond = None
        if guided:
            uncond = {"encoder_hidden_states": negative_embeds, "encoder_attention_mask": negative_mask}
        return Conditioning(cond, uncond, prompt_embeds.dtype, len(prompt_embeds))

    def decoder(self, height: int | None = None, width: int | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
        """The stock decode, then (resolution binning) the stock resize and crop to ``height`` × ``width``."""
        if height is None or width is None:
            return self._decode
        resize = self.pipe.image_processor.resize_and_crop_tensor
        return lambda latents: resize(self._decode(latents), width, height)

    @torch.no_grad()
    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        vae = self.pipe.vae
        return vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor, return_dict=False)[0]
