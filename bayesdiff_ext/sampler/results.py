"""What every front door returns: images and their per-element uncertainty, one diffusers ``BaseOutput``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import PIL.Image
import torch
from diffusers.utils import BaseOutput

from bayesdiff_ext.numerics import per_image_sum

__all__ = ["BayesDiffOutput", "TrajectoryDraws"]


@dataclass
class TrajectoryDraws:
    """What trajectory Monte Carlo ran, kept with ``return_draws=True`` (for estimators built on it).

    * ``finals`` (J, K, B, ...): x_0 of weight draw k in noise stream j.
    * ``maps`` (J, B, ...): x_0 of each noise stream's MAP trajectory (the image for a deterministic sampler).
    * ``deviations`` (J, K, B, P): the weight deviations Δθ of the draws, float64.
    """

    finals: torch.Tensor
    maps: torch.Tensor
    deviations: torch.Tensor


@dataclass
class BayesDiffOutput(BaseOutput):
    """Images and their uncertainty, from :meth:`BayesDiffSampler.sample`, a
    :class:`~bayesdiff_ext.BayesDiffPipeline` call or :attr:`UncertaintyCallback.output`.

    Args:
        images (`torch.Tensor`, `np.ndarray` or `list[PIL.Image.Image]`):
            The sampler: x_0 at model scale, in the model's dtype and sample layout. A pipeline
            wrapper: exactly what the stock pipeline returns for the same arguments (by
            ``output_type``). The callback: the pipeline's final latents.
        variance (`torch.Tensor`):
            Var[x_0] per element in the space the diffusion runs in (latents for latent pipelines,
            in the pipeline's own latent layout — Flux's packed tokens (B, N, 64) —, pixels at model
            scale for pixel pipelines), float32 or better, ≥ 0.
        mean (`torch.Tensor`): E[x_0] from the same estimator, shaped like ``variance``.
        scores (`torch.Tensor` of shape `(B,)`): the per-image sum of ``variance`` (BayesDiff's score);
            computed when not given.
        aleatoric_variance (`torch.Tensor`): the part of ``variance`` from the sampler's own noise (DDPM,
            DDIM with η > 0, Euler-Ancestral, stochastic flow matching; the model's learned variance with
            DDPM ``variance_type='learned_range'``; zero for deterministic samplers and when not given);
            ``epistemic_variance``: the rest, from the weight posterior. Both ≥ 0 and they add up to
            ``variance``. ``settings['aleatoric_source']`` says which source a run had (docs/MATH.md §15).
        pixel_variance (`torch.Tensor` of shape `(B, 3, H, W)`, *optional*): the variance of the decoded
            image in the VAE's output scale ([−1, 1]; divide by 4 for [0, 1] images), from Gaussian draws
            of z_0 decoded through the pipeline's own VAE path (weight-samples and x0-drift: the spread of
            their own decoded final images or x̂₀ predictions); ``pixel_scores`` (B,) its sums and
            ``pixel_mean`` the decoded images' mean. For pixel pipelines these are ``variance``,
            ``scores`` and ``mean``; None when nothing was decoded.
        nsfw_content_detected (`list[bool]`, *optional*): the safety checker's verdicts (Stable Diffusion).
        trace (`list[dict]`, *optional*): one record per scheduler step (``return_trace=True``).
        settings (`dict`): the settings the run used. timings (`dict`): wall times and model call counts.
        draws (`TrajectoryDraws` or `torch.Tensor`, *optional*): what an estimate is the spread of, when asked
            for (``return_draws=True``): the trajectories of a trajectory estimate; x0-drift's last L
            predictions x̂₀, (L, B, ...).
        feature_entropy (`torch.Tensor` of shape `(B,)`, *optional*): the weight-samples method's
            feature-space entropy of each image's M final images (docs/MATH.md §11.2), float64; None
            for the other methods.
        clamped_pixels (`torch.Tensor` of shape `(B,)`): per image, the elements whose variance estimate came
            out ≤ 0 and were set to 0 (an exact zero that means "clamped", not "certain"); zeros where nothing
            was clamped (the trajectory estimators never clamp).
    """

    images: torch.Tensor | np.ndarray | list[PIL.Image.Image]
    variance: torch.Tensor
    mean: torch.Tensor
    scores: torch.Tensor | None = None
    aleatoric_variance: torch.Tensor | None = None
    epistemic_variance: torch.Tensor | None = None
    pixel_variance: torch.Tensor | None = None
    pixel_scores: torch.Tensor | None = None
    nsfw_content_detected: list[bool] | None = None
    trace: list[dict[str, Any]] | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, Any] = field(default_factory=dict)
    draws: TrajectoryDraws | torch.Tensor | None = None
    feature_entropy: torch.Tensor | None = None
    clamped_pixels: torch.Tensor | None = None
    pixel_mean: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.scores is None:
            self.scores = per_image_sum(self.variance)
        aleatoric = torch.zeros_like(self.variance) if self.aleatoric_variance is None else self.aleatoric_variance
        self.aleatoric_variance = torch.minimum(aleatoric.clamp_min(0), self.variance)
        self.epistemic_variance = self.variance - self.aleatoric_variance
        if self.clamped_pixels is None:
            self.clamped_pixels = torch.zeros(self.variance.shape[0], dtype=torch.int64, device=self.variance.device)
        super().__post_init__()
