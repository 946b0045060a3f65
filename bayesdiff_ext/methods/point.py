"""A point estimate of the head's weights, in the posterior interface the sampler uses.

With it, :class:`~bayesdiff_ext.BayesDiffSampler` runs the plain image path and carries only the
sampler's own noise c² through the moment recurrence (Var' = a²·Var + c²): the aleatoric part
for the estimators whose epistemic part comes from repeated sampling (MC dropout, ensembles).
"""

from __future__ import annotations

import torch
from torch import nn

from bayesdiff_ext.numerics import accumulation_dtype
from bayesdiff_ext.posterior.capture import capture_head_input
from bayesdiff_ext.posterior.heads import default_eps_channels, locate_head

__all__ = ["PointPosterior"]


class PointPosterior:
    """Zero weight variance: ``predict(phi)`` is the head's own output (ε channels) and 0."""

    structure = "point"

    def __init__(self, model: nn.Module, head: nn.Module | None = None):
        self.head = locate_head(model, head)
        self.eps_channels = default_eps_channels(model, self.head)

    def capture(self):
        return capture_head_input(self.head)

    def predict(self, phi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean = self.head(phi)[:, : self.eps_channels]
        mean = mean.to(accumulation_dtype(mean))
        return mean, torch.zeros_like(mean)
