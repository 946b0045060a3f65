"""What a BayesDiffPipeline call returns: the stock pipeline's images plus their uncertainty."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import PIL.Image
import torch
from diffusers.utils import BaseOutput

__all__ = ["BayesDiffPipelineOutput"]


@dataclass
class BayesDiffPipelineOutput(BaseOutput):
    """Images as the wrapped pipeline returns them, and their per-pixel uncertainty.

    * ``images``: exactly what the stock pipeline returns for the same arguments (PIL images, a
      numpy array or a tensor, by ``output_type``).
    * ``variance`` (B, C, h, w): Var[x_0] in the space the diffusion runs in — latents for Stable
      Diffusion, pixels at model scale ([−1, 1]) for DDPM/DDIM — float32 or better, ≥ 0.
      ``mean``: E[x_0] from the same recurrence. ``scores`` (B,): Σ variance (BayesDiff's score).
    * ``pixel_variance`` (B, 3, H, W): Var of the decoded image in the VAE's output scale ([−1, 1];
      divide by 4 for [0, 1] images) from ``decode_samples`` Gaussian draws of z_0, and
      ``pixel_scores`` (B,) its sums; for pixel-space pipelines these are ``variance`` and
      ``scores``; None when no draws were decoded.
    * ``nsfw_content_detected``: the safety checker's verdicts (Stable Diffusion with a checker).
    * ``trace``, ``settings``, ``timings``: as in :class:`~bayesdiff_ext.BayesDiffOutput`.
    """

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor
    variance: torch.Tensor
    mean: torch.Tensor
    scores: torch.Tensor
    pixel_variance: torch.Tensor | None = None
    pixel_scores: torch.Tensor | None = None
    nsfw_content_detected: list[bool] | None = None
    trace: list[dict[str, Any]] | None = None
    settings: dict[str, Any] | None = None
    timings: dict[str, Any] | None = None
