"""Running S Monte Carlo copies of a batch through the UNet in one call."""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["repeat_batch"]


def repeat_batch(value: Any, batch: int, repeats: int) -> Any:
    """Tile every tensor whose leading dimension is ``batch`` ``repeats`` times along it.

    The Monte Carlo samples are laid out sample-major, (S·B, ...) with row s·B + b, so conditioning
    (``encoder_hidden_states``, ``class_labels``, nested ``added_cond_kwargs``) is tiled, not
    interleaved. Anything else (scalars, broadcast tensors, flags) passes through unchanged.
    """
    if isinstance(value, torch.Tensor):
        if value.dim() > 0 and value.shape[0] == batch:
            return value.repeat(repeats, *([1] * (value.dim() - 1)))
        return value
    if isinstance(value, dict):
        return {key: repeat_batch(item, batch, repeats) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(repeat_batch(item, batch, repeats) for item in value)
    return value
