"""x_T as the pixel pipelines draw it, shared by every sampler of the package."""

from __future__ import annotations

import torch
from diffusers.utils.torch_utils import randn_tensor

from bayesdiff_ext.denoiser import Denoiser
from bayesdiff_ext.validation import check_count, check_noise, sample_shape

__all__ = ["initial_noise"]


def initial_noise(denoiser: Denoiser, batch_size: int | None, noise: torch.Tensor | None, generator) -> torch.Tensor:
    """The unit-variance initial noise: ``noise`` as given (checked against the model), or
    ``randn_tensor`` with ``generator``.

    A list of per-image generators draws each image from its own (see :mod:`bayesdiff_ext.randomness`).
    The scheduler's ``init_noise_sigma`` is applied by the caller after ``set_timesteps``.
    """
    shape = sample_shape(denoiser.model)
    if batch_size is not None:
        batch_size = check_count("batch_size", batch_size)
    if noise is None:
        if batch_size is None:
            raise ValueError("pass batch_size or the initial noise x_T as noise")
        if shape.full is None:
            raise ValueError(
                f"{type(denoiser.model).__name__}'s config gives no sample size: pass the initial noise as noise"
            )
        return randn_tensor((batch_size, *shape.full), generator=generator, device=denoiser.device, dtype=denoiser.dtype)
    check_noise(noise, shape)
    if batch_size is not None and batch_size != noise.shape[0]:
        raise ValueError(f"batch_size={batch_size} but noise holds {noise.shape[0]} images")
    return noise.to(device=denoiser.device, dtype=denoiser.dtype)
