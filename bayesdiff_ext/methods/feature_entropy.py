"""Feature-space entropy of M samples from the same x_T (the 2025 successor paper's generative uncertainty).

Jazbec et al., "Generative Uncertainty in Diffusion Models" (2025), score an x_T by the entropy of
the images that M models drawn from the weight posterior make from it, measured in a semantic feature
space rather than in pixels: a Gaussian is fitted to the M feature vectors and its entropy is the
score. With M (a handful) far below the feature dimension d, the covariance is taken diagonal:

    H = ½ Σ_d log(2πe · (s²_d + τ)),

with s²_d the unbiased variance of feature d over the M samples and τ a floor that keeps a feature
that does not move at all (a ReLU unit that is 0 for every sample) from sending H to −∞. τ is
relative — ``floor`` times the image's mean squared feature — so that rescaling the extractor
shifts every image's H by the same constant and leaves the ranking unchanged. The extractor is
pluggable: any module with ``features(x)`` or a forward giving (N, d) (see
:func:`~bayesdiff_ext.metrics.extract_features`).
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["DEFAULT_FLOOR", "ClampedFeatures", "feature_entropy", "gaussian_entropy"]

#: τ relative to the image's mean squared feature.
DEFAULT_FLOOR = 1e-6


def gaussian_entropy(features: torch.Tensor, floor: float = DEFAULT_FLOOR) -> torch.Tensor:
    """Entropy (B,) of the diagonal Gaussian fitted to ``features`` (M, B, d), M ≥ 2, in float64."""
    if features.dim() != 3 or features.shape[0] < 2:
        raise ValueError(f"features must have shape (M >= 2, B, d), got {tuple(features.shape)}")
    if not floor > 0:
        raise ValueError(f"floor must be > 0, got {floor}")
    f = features.to(torch.float64)
    variance = f.var(dim=0)
    tau = floor * f.pow(2).mean(dim=(0, 2)).clamp_min(torch.finfo(torch.float64).tiny)
    return 0.5 * torch.log(2 * math.pi * math.e * (variance + tau[:, None])).sum(dim=1)


def feature_entropy(samples: torch.Tensor, extractor, *, floor: float = DEFAULT_FLOOR, batch_size: int = 256) -> torch.Tensor:
    """Entropy (B,) of each image's M samples (M, B, ...) in ``extractor``'s feature space.

    Args:
        samples (`torch.Tensor` of shape `(M, B, ...)`): M ≥ 2 samples of each of B images, in the layout
            the extractor takes (e.g. (M, B, C, H, W) images).
        extractor (callable or module with ``features(x)``): maps (N, ...) samples to features (N, d).
        floor (`float`): τ relative to the image's mean squared feature.
        batch_size (`int`): samples per extractor call.

    Returns:
        `torch.Tensor` of shape `(B,)`, float64, on the CPU.
    """
    from bayesdiff_ext.metrics import extract_features

    if samples.dim() < 3 or samples.shape[0] < 2:
        raise ValueError(f"samples must have shape (M >= 2, B, ...), got {tuple(samples.shape)}")
    m, b = samples.shape[:2]
    features = torch.as_tensor(extract_features(extractor, samples.flatten(0, 1), batch_size=batch_size))
    return gaussian_entropy(features.reshape(m, b, -1), floor)


class ClampedFeatures(nn.Module):
    """A feature extractor that reads images as a pixel pipeline outputs them: clamped to [-1, 1] first.

    Args:
        extractor (callable or module with ``features(x)``): images (N, C, H, W) → features (N, d).
    """

    def __init__(self, extractor) -> None:
        super().__init__()
        from bayesdiff_ext.metrics.extraction import feature_function

        self.extractor = extractor
        self._features = feature_function(extractor)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self._features(x.clamp(-1, 1))
