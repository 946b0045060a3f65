"""x_T as the pixel pipelines draw it, shared by every sampler of the package."""

from __future__ import annotations

import torch
from diffusers.utils.torch_utils import randn_tensor

from bayesdiff_ext.denoiser import Denoiser

__all__ = ["initial_noise"]


def initial_noise(denoiser: Denoiser, batch_size: int | None, noise: torch.Tensor | None, generator) -> torch.Tensor:
    """The unit-variance initial noise: ``noise`` as given, or ``randn_tensor`` with ``generator``.

    A list of per-image generators draws each image from its own (see :mod:`bayesdiff_ext.randomness`).
    The scheduler's ``init_noise_sigma`` is applied by the caller after ``set_timesteps``.
    """
    shape = _sample_shape(denoiser.config)
    if noise is None:
        if batch_size is None:
            raise ValueError("pass batch_size or the initial noise x_T as noise")
        if shape is None:
            raise ValueError(
                f"{type(denoiser.model).__name__}'s config gives no sample size: pass the initial noise as noise"
            )
        return randn_tensor((batch_size, *shape), generator=generator, device=denoiser.device, dtype=denoiser.dtype)
    if shape is not None and (noise.dim() != 1 + len(shape) or noise.shape[1] != shape[0]):
        raise ValueError(f"noise must have shape (B, {shape[0]}, H, W) for this model, got {tuple(noise.shape)}")
    if batch_size is not None and batch_size != noise.shape[0]:
        raise ValueError(f"batch_size={batch_size} but noise holds {noise.shape[0]} images")
    return noise.to(device=denoiser.device, dtype=denoiser.dtype)


def _sample_shape(config) -> tuple[int, ...] | None:
    """(C, H, W) of the model's samples from its config, or None where the config does not say (Flux)."""
    size = getattr(config, "sample_size", None)
    channels = getattr(config, "in_channels", None)
    if size is None or channels is None:
        return None
    return (channels, size, size) if isinstance(size, int) else (channels, *size)
