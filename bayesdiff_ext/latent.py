"""Latent diffusion: the VAE's latent conventions, and pixel-space variance by decoding samples of z_0.

The moments of a latent diffusion model live in latent space (docs/MATH.md §2): E[z_0] and Var[z_0] per
latent element, and the image score is the sum of the latent variance (BayesDiff). A pixel map
comes from decoding N Gaussian draws z ~ N(E[z_0], Var[z_0]) and taking the per-pixel variance of
the decoded images. The paper's published script drew *uniform* noise here by mistake; these draws
are Gaussian.

Latents are at "model scale", as the UNet sees them. The VAE sees ``z / scaling_factor``, plus
``shift_factor`` where the VAE's config has one (SD3/Flux-style VAEs; Stable Diffusion 1.x/2.x
have none), or ``z·latents_std/scaling_factor + latents_mean`` where it has per-channel statistics
(SDXL-style VAEs), exactly as the diffusers pipelines decode.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
from diffusers.utils.torch_utils import randn_tensor

from bayesdiff_ext.numerics import accumulation_dtype, per_image_sum

__all__ = [
    "PixelMoments",
    "decode_each",
    "decode_latents",
    "encode_images",
    "pixel_moments",
    "to_vae_latents",
    "to_model_latents",
]


def _latent_statistics(vae, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The VAE config's per-channel ``latents_mean``/``latents_std`` (SDXL-style VAEs that have them), as
    ``like``'s (B, C, 1, 1) broadcast, or None."""
    config = vae.config
    mean, std = getattr(config, "latents_mean", None), getattr(config, "latents_std", None)
    if mean is None or std is None:
        return None
    channels = len(mean)
    return (
        torch.tensor(mean).view(1, channels, 1, 1).to(like.device, like.dtype),
        torch.tensor(std).view(1, channels, 1, 1).to(like.device, like.dtype),
    )


def to_vae_latents(latents: torch.Tensor, vae) -> torch.Tensor:
    """Model-scale latents → what ``vae.decode`` takes, as the pipelines compute it: ``z·std/s + mean``
    where the config has ``latents_mean``/``latents_std`` (SDXL), else ``z / s (+ shift_factor)``."""
    config = vae.config
    statistics = _latent_statistics(vae, latents)
    if statistics is not None:
        mean, std = statistics
        return latents * std / config.scaling_factor + mean
    z = latents / config.scaling_factor
    shift = getattr(config, "shift_factor", None)
    return z if shift is None else z + shift


def to_model_latents(vae_latents: torch.Tensor, vae) -> torch.Tensor:
    """The inverse of :func:`to_vae_latents`: ``(z − mean)·s/std``, else ``(z − shift_factor) · s``."""
    config = vae.config
    statistics = _latent_statistics(vae, vae_latents)
    if statistics is not None:
        mean, std = statistics
        return (vae_latents - mean) * config.scaling_factor / std
    shift = getattr(config, "shift_factor", None)
    z = vae_latents if shift is None else vae_latents - shift
    return z * config.scaling_factor


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
    decoder,
    latent_mean: torch.Tensor,
    latent_variance: torch.Tensor,
    *,
    samples: int = 16,
    batch_size: int = 8,
    generator: torch.Generator | list[torch.Generator] | None = None,
) -> PixelMoments:
    """Decode ``samples`` Gaussian draws of every latent, ``batch_size`` latents per decode call.

    ``generator`` is one generator for all draws, or one per image: image b's draws then come from
    ``generator[b]`` alone, in draw order, so its pixel moments do not depend on the batch.

    ``decoder`` is a VAE (model-scale latents (B, C, h, w) decoded by :func:`decode_latents`) or a
    function from a batch of latents in the layout of ``latent_mean`` to images — a pipeline's own
    decode path (Flux's unpacking, SD3's ``shift_factor``, DiT's ``1/s·z``, PixArt's resize). The
    draws z = E[z_0] + √Var[z_0] ⊙ ξ, ξ ~ N(0, I), are laid out sample-major across the batch and
    decoded in ⌈samples·B / batch_size⌉ calls. Per-image moments are merged batch by batch (Chan et
    al.'s pairwise update, in float64), so memory stays at one decode batch.
    """
    decode = partial(decode_latents, decoder) if isinstance(decoder, torch.nn.Module) else decoder
    if decode is decoder and not callable(decoder):
        raise TypeError(f"decoder must be a VAE or a function of a batch of latents, got {type(decoder).__name__}")
    if latent_mean.dim() != 4 and (decode is not decoder or latent_mean.dim() < 2):
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
    if isinstance(generator, list) and len(generator) != latent_mean.shape[0]:
        raise ValueError(f"generator is a list of {len(generator)} generators for {latent_mean.shape[0]} images")
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
        row_generators = [generator[int(b)] for b in which] if isinstance(generator, list) else generator
        noise = randn_tensor(
            (len(rows), *mean.shape[1:]), generator=row_generators, device=mean.device, dtype=moment_dtype
        )
        decoded = decode(mean[which] + std[which] * noise)
        stats.update(decoded, which)
    pixel_mean, pixel_var = stats.result()
    return PixelMoments(pixel_mean.to(moment_dtype), pixel_var.to(moment_dtype), samples)


@torch.no_grad()
def decode_each(decode, samples: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
    """``decode`` applied to each of N samples of B images, ``batch_size`` of them per call.

    Args:
        decode (callable): a batch of latents in the layout of ``samples[0]`` → images (a pipeline's
            own decode path, as for :func:`pixel_moments`).
        samples (`torch.Tensor` of shape `(N, B, ...)`): N latents of each image (weight-sample finals,
            x̂₀ predictions, ...).
        batch_size (`int`): latents per decode call.

    Returns:
        `torch.Tensor` of shape `(N, B, C, H, W)`: the decoded images, in the decoder's dtype.
    """
    if samples.dim() < 3:
        raise ValueError(f"samples must have shape (N, B, ...), got {tuple(samples.shape)}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    rows = samples.flatten(0, 1)
    decoded = torch.cat([decode(rows[start : start + batch_size]) for start in range(0, len(rows), batch_size)])
    return decoded.reshape(*samples.shape[:2], *decoded.shape[1:])


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
