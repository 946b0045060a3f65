"""CMMD: the biased MMD² with a Gaussian RBF kernel on L2-normalised embeddings (Jayasumana et al. 2024)."""

from __future__ import annotations

import numpy as np

from bayesdiff_ext.metrics._inputs import feature_matrix, same_width

# Rows per block of the kernel matrix: bounds memory at ~block × N doubles for large sets.
_BLOCK_ROWS = 1024


def l2_normalise(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length; an all-zero row stays zero (as ``torch.nn.functional.normalize``)."""
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


def rbf_kernel_mean(x: np.ndarray, y: np.ndarray, gamma: float) -> float:
    """Mean of exp(−γ‖x_i − y_j‖²) over all pairs (i, j), diagonal included."""
    y_sq = np.einsum("ij,ij->i", y, y)
    total = 0.0
    for start in range(0, x.shape[0], _BLOCK_ROWS):
        xb = x[start : start + _BLOCK_ROWS]
        sq_dist = np.einsum("ij,ij->i", xb, xb)[:, None] + y_sq[None, :] - 2.0 * (xb @ y.T)
        total += np.exp(-gamma * np.clip(sq_dist, 0.0, None)).sum()
    return total / (x.shape[0] * y.shape[0])


def cmmd(a, b, sigma: float = 10.0, scale: float = 1000.0) -> float:
    r"""
    CMMD between two embedding sets, the google-research/cmmd formula (docs/MATH.md §3), in float64.

    Embeddings are L2-normalised (the reference normalises its CLIP embeddings), the kernel is
    k(x, y) = exp(−‖x − y‖² / (2σ²)), and the biased V-statistic mean k(a, a) + mean k(b, b) − 2·mean k(a, b)
    (means include the diagonal) is multiplied by `scale`.

    Args:
        a (`numpy.ndarray` or `torch.Tensor` of shape `(num_samples_a, d)`):
            The first embedding set.
        b (`numpy.ndarray` or `torch.Tensor` of shape `(num_samples_b, d)`):
            The second embedding set.
        sigma (`float`, *optional*, defaults to 10.0):
            The RBF bandwidth σ.
        scale (`float`, *optional*, defaults to 1000.0):
            The factor of the reference's reported numbers.

    Returns:
        `float`: scale × the MMD², ≥ 0.
    """
    xa = l2_normalise(feature_matrix(a, "a"))
    xb = l2_normalise(feature_matrix(b, "b"))
    same_width(xa, xb, "a", "b")
    if not sigma > 0:
        raise ValueError(f"sigma: expected a positive kernel bandwidth, got {sigma!r}")
    gamma = 1.0 / (2.0 * float(sigma) ** 2)
    mmd2 = (
        rbf_kernel_mean(xa, xa, gamma)
        + rbf_kernel_mean(xb, xb, gamma)
        - 2.0 * rbf_kernel_mean(xa, xb, gamma)
    )
    # The V-statistic is a squared RKHS norm (>= 0); only round-off makes it negative.
    return float(scale) * max(mmd2, 0.0)
