"""Fréchet distance between Gaussians fitted to two feature sets (the FID formula)."""

from __future__ import annotations

import numpy as np

from bayesdiff_ext.metrics._inputs import feature_matrix, same_width


def feature_statistics(features) -> tuple[np.ndarray, np.ndarray]:
    r"""
    Args:
        features (`numpy.ndarray` or `torch.Tensor` of shape `(num_samples, num_features)`):
            At least 2 rows, any float dtype and device.

    Returns:
        `tuple[numpy.ndarray, numpy.ndarray]`: the mean `(num_features,)` and the unbiased covariance
        `(num_features, num_features)` (ddof = 1), in float64.
    """
    x = feature_matrix(features, "features", min_rows=2)
    return x.mean(axis=0), np.cov(x, rowvar=False, ddof=1).reshape(x.shape[1], x.shape[1])


def _psd_sqrt(sigma: np.ndarray) -> np.ndarray:
    """Symmetric square root of a covariance; round-off negative eigenvalues count as 0."""
    eigvals, eigvecs = np.linalg.eigh(sigma)
    return (eigvecs * np.sqrt(np.clip(eigvals, 0.0, None))) @ eigvecs.T


def _check_statistics(mu: np.ndarray, sigma: np.ndarray, name: str) -> tuple[np.ndarray, np.ndarray]:
    mu = np.asarray(mu, dtype=np.float64)
    sigma = np.asarray(sigma, dtype=np.float64)
    if mu.ndim != 1:
        raise ValueError(f"mu{name}: expected a mean vector of shape (d,), got shape {mu.shape}")
    d = mu.shape[0]
    if sigma.shape != (d, d):
        raise ValueError(
            f"sigma{name}: expected a covariance of shape ({d}, {d}) to match mu{name}, got {sigma.shape}"
        )
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise ValueError(f"mu{name}/sigma{name}: contain NaN or infinite values")
    # eigh reads one triangle only; symmetrising makes the result independent of which.
    return mu, 0.5 * (sigma + sigma.T)


def frechet_distance_from_statistics(mu1, sigma1, mu2, sigma2) -> float:
    r"""
    The Fréchet distance ‖μ₁−μ₂‖² + tr(Σ₁ + Σ₂ − 2(Σ₁Σ₂)^{1/2}) between two Gaussians, in float64
    (docs/MATH.md §3).

    tr((Σ₁Σ₂)^{1/2}) is computed as Σ √eig(Σ₁^{1/2} Σ₂ Σ₁^{1/2}): that matrix is symmetric PSD and
    similar to Σ₁Σ₂, so its eigenvalues are real and non-negative up to round-off. This avoids the
    complex ``sqrtm`` of the non-symmetric product (and pytorch-fid's eps-offset retry), and stays
    exact for singular covariances (fewer samples than features).

    Args:
        mu1, mu2 (`numpy.ndarray` of shape `(d,)`):
            The means.
        sigma1, sigma2 (`numpy.ndarray` of shape `(d, d)`):
            The covariances (symmetrised before use).

    Returns:
        `float`: the distance, ≥ 0.

    Raises:
        `ValueError`: mismatched shapes, or NaN/inf entries.
    """
    mu1, sigma1 = _check_statistics(mu1, sigma1, "1")
    mu2, sigma2 = _check_statistics(mu2, sigma2, "2")
    if mu1.shape != mu2.shape:
        raise ValueError(f"mu1 and mu2 must have the same dimension, got {mu1.shape[0]} and {mu2.shape[0]}")
    root1 = _psd_sqrt(sigma1)
    middle = root1 @ sigma2 @ root1
    tr_sqrt_product = np.sqrt(np.clip(np.linalg.eigvalsh(0.5 * (middle + middle.T)), 0.0, None)).sum()
    diff = mu1 - mu2
    value = float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_sqrt_product)
    # The distance is a squared 2-Wasserstein distance (>= 0); only round-off makes it negative.
    return max(value, 0.0)


def frechet_distance(a, b) -> float:
    r"""
    The FID formula between two feature sets (docs/MATH.md §3).

    Args:
        a (`numpy.ndarray` or `torch.Tensor` of shape `(num_samples_a, d)`):
            The first feature set, at least 2 rows, any float dtype and device.
        b (`numpy.ndarray` or `torch.Tensor` of shape `(num_samples_b, d)`):
            The second feature set, at least 2 rows.

    Returns:
        `float`: the Fréchet distance between Gaussians with the sets' means and unbiased covariances
        (ddof = 1, as pytorch-fid and torchmetrics), computed in float64.
    """
    xa = feature_matrix(a, "a", min_rows=2)
    xb = feature_matrix(b, "b", min_rows=2)
    same_width(xa, xb, "a", "b")
    return frechet_distance_from_statistics(*feature_statistics(xa), *feature_statistics(xb))
