"""Fit a posterior on a pipeline's denoiser head from images and their conditioning, the pipeline's way."""

from __future__ import annotations

from typing import Any

import torch

from bayesdiff_ext.pipelines.base import PER_IMAGE_ARGUMENTS, BayesDiffPipeline, per_image

__all__ = ["fit_pipeline_posterior"]


def fit_pipeline_posterior(
    pipe,
    images: torch.Tensor,
    posterior=None,
    *,
    structure: str = "diag",
    noise=None,
    batch_size: int = 8,
    timesteps_per_image: int = 1,
    generator: torch.Generator | None = None,
    progress: bool = True,
    **conditioning: Any,
):
    r"""Fit a last-layer posterior on ``pipe``'s denoiser from training images, as the model was trained.

    The images are encoded with the pipeline's VAE into model-scale latents in the pipeline's own
    layout (the inverse of its decode path: ``scaling_factor``, ``shift_factor``, SDXL's
    ``latents_mean``/``latents_std``, Flux's 2×2 packing); each batch's conditioning is made by the
    pipeline's own prompt encoding (the conditional branch only: no guidance in training), so the
    head sees the features it sees when sampling. The training noise is the pipeline scheduler's
    (DDPM-family: t uniform; SD3: flow matching with logit-normal σ; Flux: logit-normal σ shifted by
    the ``mu`` of the images' token count) unless ``noise`` is given.

    Args:
        pipe: a pipeline :class:`~bayesdiff_ext.BayesDiffPipeline` wraps (Stable Diffusion, SDXL, SD3,
            Flux, PixArt-Σ, DiT).
        images (`torch.Tensor` of shape `(N, 3, H, W)`): training images in [−1, 1].
        posterior (`LastLayerLaplace`, *optional*): the posterior to fit (e.g. with another curvature or
            prior); default ``LastLayerLaplace(denoiser, structure)``.
        structure (`str`, *optional*, defaults to `"diag"`): the structure of the default posterior.
        noise (`TrainingNoise` or scheduler, *optional*): the training noise (see ``LastLayerLaplace.fit``).
        batch_size (`int`, *optional*, defaults to 8): images per VAE encode and per model forward.
        timesteps_per_image (`int`, *optional*, defaults to 1): noise draws per image.
        generator (`torch.Generator`, *optional*): the source of the VAE's latent draws and of the fit's
            noise; a seeded one reproduces the fit.
        progress (`bool`, *optional*, defaults to `True`): show the fit's progress bar.
        conditioning: the stock call's conditioning arguments, one value for every image or one per
            image (a list or a tensor of N rows): ``prompt``, ``prompt_2``, ``prompt_embeds``,
            ``pooled_prompt_embeds``, ``prompt_attention_mask``, ... for text pipelines,
            ``class_labels`` for DiT. Text pipelines without any get the empty prompt.

    Returns:
        `LastLayerLaplace`: the fitted posterior, on the pipeline's denoiser head.
    """
    from bayesdiff_ext.posterior import LastLayerLaplace

    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        raise ValueError(f"images must be a tensor (N, C, H, W) in [-1, 1], got {type(images).__name__}")
    for cls in type(pipe).__mro__:
        wrapper_class = BayesDiffPipeline._wrappers.get(cls)
        if wrapper_class is not None:
            break
    else:
        raise TypeError(f"fit_pipeline_posterior takes a pipeline BayesDiffPipeline wraps, got {type(pipe).__name__}")
    if not wrapper_class.latent:
        raise TypeError(f"{type(pipe).__name__} is a pixel pipeline: fit LastLayerLaplace(pipe.unet).fit(images, ...)")
    denoiser = getattr(pipe, wrapper_class.denoiser_name)
    posterior = posterior if posterior is not None else LastLayerLaplace(denoiser, structure)
    wrapper = BayesDiffPipeline.from_pipe(pipe, posterior)
    count, height, width = len(images), images.shape[-2], images.shape[-1]
    with torch.no_grad():
        latents = torch.cat(
            [wrapper.encode_images(images[i : i + batch_size], generator) for i in range(0, count, batch_size)]
        )
    offset = 0

    def batch_conditioning(x0: torch.Tensor) -> dict[str, Any]:
        # The fit takes the latents' batches in order; the conditioning rows follow them.
        nonlocal offset
        rows = slice(offset, offset + len(x0))
        offset += len(x0)
        given = {}
        for name, value in conditioning.items():
            value = _rows(value, rows, count)
            given[name] = per_image(value, len(x0)) if name in PER_IMAGE_ARGUMENTS else value
        return wrapper.fit_conditioning(given, height, width, len(x0))

    return posterior.fit(
        latents,
        noise if noise is not None else wrapper.training_noise(latents),
        batch_size=batch_size,
        timesteps_per_image=timesteps_per_image,
        generator=generator,
        model_kwargs=batch_conditioning,
        progress=progress,
    )


def _rows(value, rows: slice, count: int):
    """The rows of a per-image value (a list or tensor of ``count``), or a shared value as it is."""
    if isinstance(value, torch.Tensor) and value.dim() > 0 and len(value) == count:
        return value[rows]
    if isinstance(value, (list, tuple)) and len(value) == count:
        return list(value[rows])
    return value
