"""Two rules every layer shares: the dtype computations accumulate in, and the per-image sum."""

from __future__ import annotations

import torch

__all__ = ["accumulation_dtype", "per_image_sum"]


def accumulation_dtype(x: torch.Tensor | torch.dtype) -> torch.dtype:
    """The dtype to accumulate and return in for inputs of ``x``'s dtype.

    Args:
        x: a tensor or a dtype.

    Returns:
        ``torch.float64`` for float64, ``torch.float32`` for everything else: 16-bit inputs are
        accumulated in float32 (variances span many decades; float16 would flush small ones to 0).
    """
    dtype = x.dtype if isinstance(x, torch.Tensor) else x
    return torch.float64 if dtype == torch.float64 else torch.float32


def per_image_sum(values: torch.Tensor) -> torch.Tensor:
    """Σ over everything but the leading (image) dimension: BayesDiff's image score of a variance map.

    Args:
        values: a tensor of shape (B, ...), e.g. Var[x_0] (B, C, H, W).

    Returns:
        The per-image sums, shape (B,), in ``values``' dtype.
    """
    return values.flatten(1).sum(dim=1)
