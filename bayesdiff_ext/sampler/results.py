"""What a BayesDiff sampling run returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from bayesdiff_ext.numerics import per_image_sum
__all__ = ["BayesDiffOutput"]


@dataclass
class BayesDiffOutput:
    """Images and their per-pixel uncertainty from :meth:`BayesDiffSampler.sample`.

    * ``images``   (B, C, H, W): x_0 at model scale (usually [-1, 1]), the scheduler's own sample,
      in the UNet's dtype.
    * ``variance`` (B, C, H, W): Var[x_0] from the moment recurrence, float32 or better, ≥ 0.
    * ``mean``     (B, C, H, W): E[x_0] from the same recurrence.
    * ``scores``   (B,): per-image sum of ``variance`` (BayesDiff's image score).
    * ``aleatoric_variance`` (B, C, H, W): the part of ``variance`` from the sampler's own noise
      (zero for deterministic samplers; zero when not given); ``epistemic_variance``: the rest, the
      part from the model's uncertainty, so that the two add up to ``variance``. Both ≥ 0.
    * ``trace``: None, or one dict per scheduler step (see :meth:`BayesDiffSampler.sample`).
    * ``settings``: the settings the run used; ``timings``: wall time and UNet call counts.
    """

    images: torch.Tensor
    variance: torch.Tensor
    mean: torch.Tensor
    scores: torch.Tensor = field(init=False)
    trace: list[dict[str, Any]] | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, Any] = field(default_factory=dict)
    aleatoric_variance: torch.Tensor | None = None
    epistemic_variance: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        self.scores = per_image_sum(self.variance)
        if self.aleatoric_variance is None:
            self.aleatoric_variance = torch.zeros_like(self.variance)
        self.aleatoric_variance = torch.minimum(self.aleatoric_variance.clamp_min(0), self.variance)
        self.epistemic_variance = self.variance - self.aleatoric_variance
