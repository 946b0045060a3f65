"""Turn user feature arrays (numpy or torch, any float dtype, any device) into float64 numpy."""

from __future__ import annotations

import numpy as np
import torch


def feature_matrix(x, name: str, min_rows: int = 1) -> np.ndarray:
    """``x`` as a C-contiguous float64 numpy array (N, d), checked for shape and finiteness.

    ``name`` is the argument name used in error messages. Statistics are always taken in float64,
    whatever precision the features were extracted in.
    """
    if isinstance(x, torch.Tensor):
        x = x.detach().to(device="cpu", dtype=torch.float64).numpy()
    try:
        arr = np.ascontiguousarray(np.asarray(x, dtype=np.float64))
    except (TypeError, ValueError) as err:
        raise TypeError(
            f"{name}: expected a numpy array or torch tensor of numbers, got {type(x).__name__}"
        ) from err
    if arr.ndim != 2:
        raise ValueError(f"{name}: expected a feature matrix of shape (N, d), got shape {arr.shape}")
    if arr.shape[0] < min_rows:
        raise ValueError(f"{name}: expected at least {min_rows} rows (samples), got {arr.shape[0]}")
    if arr.shape[1] < 1:
        raise ValueError(f"{name}: expected at least one feature column, got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{name}: contains NaN or infinite values")
    return arr


def same_width(a: np.ndarray, b: np.ndarray, name_a: str, name_b: str) -> None:
    """Both feature sets must live in the same feature space (same d)."""
    if a.shape[1] != b.shape[1]:
        raise ValueError(
            f"{name_a} and {name_b} must have the same feature dimension, got {a.shape[1]} and {b.shape[1]}"
        )
