"""Fréchet distance between Gaussians fitted to two feature sets (the FID formula)."""

from __future__ import annotations

import numpy as np

from bayesdiff_ext.metrics._inputs import feature_matrix, same_width


def feature_statistics(features) -> tuple[np.ndarray, np.ndarray]:
    """Mean (d,) and unbiased covariance (d, d) of a feature matrix (N, d), N >= 2, in float64."""
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
    """‖μ₁−μ₂‖² + tr(Σ₁ + Σ₂ − 2(Σ₁Σ₂)^{1/2}) in float64.

    tr((Σ₁Σ₂)^{1/2}) is computed as Σ √eig(Σ₁^{1/2} Σ₂ Σ₁^{1/2}): that matrix is symmetric PSD and
    similar to Σ₁Σ₂, so its eigenvalues are real and non-negative up to round-off. This avoids the
    complex ``sqrtm`` of the non-symmetric product (and pytorch-fid's eps-offset retry), and stays
    exact for singular covariances (fewer samples than features).
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
    """FID formula between feature sets ``a`` (N₁, d) and ``b`` (N₂, d), N ≥ 2 each.

    Means and unbiased covariances (ddof = 1, as pytorch-fid and torchmetrics) in float64.
    """
    xa = feature_matrix(a, "a", min_rows=2)
    xb = feature_matrix(b, "b", min_rows=2)
    same_width(xa, xb, "a", "b")
    return frechet_distance_from_statistics(*feature_statistics(xa), *feature_statistics(xb))
