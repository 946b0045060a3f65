"""Latent diffusion: the VAE's latent conventions, and pixel-space variance by decoding samples of z_0.

The moments of a latent diffusion model live in latent space (docs/MATH.md §2): E[z_0] and Var[z_0] per
latent element, and the image score is the sum of the latent variance (BayesDiff). A pixel map
comes from decoding N Gaussian draws z ~ N(E[z_0], Var[z_0]) and taking the per-pixel variance of
the decoded images. The paper's published script drew *uniform* noise here by mistake; these draws
are Gaussian.

Latents are at "model scale", as the UNet sees them. The VAE sees ``z / scaling_factor``, plus
``shift_factor`` where the VAE's config has one (SD3/Flux-style VAEs; Stable Diffusion 1.x/2.x
have none), exactly as the diffusers pipelines decode.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers.utils.torch_utils import randn_tensor

from bayesdiff_ext.numerics import accumulation_dtype, per_image_sum

__all__ = [
    "PixelMoments",
    "decode_latents",
    "encode_images",
    "pixel_moments",
    "to_vae_latents",
    "to_model_latents",
]


def _scaling(vae) -> tuple[float, float | None]:
    config = vae.config
    return float(config.scaling_factor), getattr(config, "shift_factor", None)


def to_vae_latents(latents: torch.Tensor, vae) -> torch.Tensor:
    """Model-scale latents → what ``vae.decode`` takes: ``z / scaling_factor (+ shift_factor)``."""
    scaling, shift = _scaling(vae)
    z = latents / scaling
    return z if shift is None else z + shift


def to_model_latents(vae_latents: torch.Tensor, vae) -> torch.Tensor:
    """The inverse of :func:`to_vae_latents`: ``(z − shift_factor) · scaling_factor``."""
    scaling, shift = _scaling(vae)
    z = vae_latents if shift is None else vae_latents - shift
    return z * scaling


def decode_latents(vae, latents: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Decode model-scale latents to images in the VAE's output range (usually [−1, 1])."""
    z = to_vae_latents(latents, vae).to(vae.dtype)
    return vae.decode(z, return_dict=False, generator=generator)[0]


def encode_images(
    vae, images: torch.Tensor, generator: torch.Generator | None = None, *, sample: bool = True
) -> torch.Tensor:
    """Images in [−1, 1] → model-scale latents, as training latents for ``LastLayerLaplace.fit``.

    ``sample=True`` draws from the encoder's posterior (what latent diffusion models are trained
    on); ``False`` takes its mode.
    """
    dist = vae.encode(images.to(vae.device, vae.dtype)).latent_dist
    z = dist.sample(generator=generator) if sample else dist.mode()
    return to_model_latents(z, vae)


@dataclass
class PixelMoments:
    """Moments of the decoded image under z_0 ~ N(E[z_0], Var[z_0]), estimated from ``samples`` decodes.

    ``mean`` and ``variance`` are (B, C, H, W) in the VAE's output scale ([−1, 1] for Stable
    Diffusion: divide the variance by 4 for [0, 1] images), float32 or float64; ``variance`` is the
    unbiased per-pixel sample variance (≥ 0) and ``scores`` its per-image sum (B,).
    """

    mean: torch.Tensor
    variance: torch.Tensor
    samples: int

    @property
    def scores(self) -> torch.Tensor:
        return per_image_sum(self.variance)


@torch.no_grad()
def pixel_moments(
    vae,
    latent_mean: torch.Tensor,
    latent_variance: torch.Tensor,
    *,
    samples: int = 16,
    batch_size: int = 8,
    generator: torch.Generator | None = None,
) -> PixelMoments:
    """Decode ``samples`` Gaussian draws of every latent, ``batch_size`` latents per ``vae.decode`` call.

    The draws z = E[z_0] + √Var[z_0] ⊙ ξ, ξ ~ N(0, I), are laid out sample-major across the
    batch and decoded in ⌈samples·B / batch_size⌉ calls. Per-image moments are merged batch by
    batch (Chan et al.'s pairwise update, in float64), so memory stays at one decode batch.
    """
    if latent_mean.dim() != 4:
        raise ValueError(f"latent_mean must be (B, C, h, w), got shape {tuple(latent_mean.shape)}")
    if latent_variance.shape != latent_mean.shape:
        raise ValueError(
            f"latent_variance must have the shape of latent_mean {tuple(latent_mean.shape)}, "
            f"got {tuple(latent_variance.shape)}"
        )
    if not isinstance(samples, int) or samples < 2:
        raise ValueError(
            f"samples must be an integer >= 2 (a sample variance needs two draws), got {samples!r}"
        )
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    moment_dtype = accumulation_dtype(latent_mean)
    mean = latent_mean.to(moment_dtype)
    std = latent_variance.to(moment_dtype).clamp_min(0).sqrt()
    images = mean.shape[0]
    total = samples * images
    stats = _RunningMoments(images)
    for start in range(0, total, batch_size):
        rows = torch.arange(start, min(start + batch_size, total), device=mean.device)
        which = rows % images  # sample-major: row r is draw r // B of image r % B
        # randn_tensor draws on a CPU generator's device and moves the draws, as the pipelines do.
        noise = randn_tensor(
            (len(rows), *mean.shape[1:]), generator=generator, device=mean.device, dtype=moment_dtype
        )
        decoded = decode_latents(vae, mean[which] + std[which] * noise)
        stats.update(decoded, which)
    pixel_mean, pixel_var = stats.result()
    return PixelMoments(pixel_mean.to(moment_dtype), pixel_var.to(moment_dtype), samples)


class _RunningMoments:
    """Per-image count, mean and sum of squared deviations, merged one decode batch at a time."""

    def __init__(self, images: int):
        self.images = images
        self.count: torch.Tensor | None = None
        self.mean: torch.Tensor | None = None
        self.m2: torch.Tensor | None = None

    def update(self, values: torch.Tensor, which: torch.Tensor) -> None:
        values = values.to(torch.float64)
        shape = (self.images, *values.shape[1:])
        ones = torch.ones(len(which), dtype=torch.float64, device=values.device)
        count = torch.zeros(self.images, dtype=torch.float64, device=values.device).index_add_(0, which, ones)
        batch_mean = torch.zeros(shape, dtype=torch.float64, device=values.device).index_add_(
            0, which, values
        )
        batch_mean /= _expand(count.clamp_min(1), batch_mean)
        deviation = values - batch_mean[which]
        batch_m2 = torch.zeros_like(batch_mean).index_add_(0, which, deviation.square())
        if self.count is None:
            self.count, self.mean, self.m2 = count, batch_mean, batch_m2
            return
        total = self.count + count
        delta = batch_mean - self.mean
        weight = torch.where(total > 0, count / total.clamp_min(1), torch.zeros_like(total))
        self.mean = self.mean + delta * _expand(weight, delta)
        self.m2 = self.m2 + batch_m2 + delta.square() * _expand(self.count * weight, delta)
        self.count = total

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        variance = self.m2 / _expand(self.count - 1, self.m2)
        return self.mean, variance.clamp_min(0)


def _expand(per_image: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return per_image.reshape(-1, *([1] * (like.dim() - 1)))
