"""Kernel Inception Distance: unbiased MMD² with a polynomial kernel, averaged over random subsets."""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from bayesdiff_ext.metrics._inputs import feature_matrix, same_width
from bayesdiff_ext.metrics.results import MeanStd

#: clean-fid's and torchmetrics' default cap on the subset size.
DEFAULT_MAX_SUBSET_SIZE = 1000


def polynomial_mmd2_unbiased(x: np.ndarray, y: np.ndarray, degree: int, gamma: float, coef0: float) -> float:
    """Unbiased MMD² between equal-size samples x, y (m, d) with k(u, v) = (γ u·v + coef0)^degree."""
    m = x.shape[0]
    k_xx = (gamma * (x @ x.T) + coef0) ** degree
    k_yy = (gamma * (y @ y.T) + coef0) ** degree
    k_xy = (gamma * (x @ y.T) + coef0) ** degree
    within = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
    return float(within - 2.0 * k_xy.sum() / (m * m))


def _subset_generator(seed: Optional[int], generator: Optional[torch.Generator]) -> torch.Generator:
    if generator is not None and seed is not None:
        raise ValueError("pass either seed or generator, not both")
    if generator is not None:
        if generator.device.type != "cpu":
            raise ValueError(f"generator: expected a CPU torch.Generator, got one on {generator.device}")
        return generator
    return torch.Generator().manual_seed(0 if seed is None else int(seed))


def kid(
    a,
    b,
    subsets: int = 100,
    subset_size: Optional[int] = None,
    degree: int = 3,
    gamma: Optional[float] = None,
    coef0: float = 1.0,
    seed: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
) -> MeanStd:
    r"""
    The Kernel Inception Distance: the unbiased MMD² with a polynomial kernel, averaged over random subsets
    (docs/MATH.md §3). Statistics in float64.

    Each subset draws `subset_size` rows of `a` and of `b` without replacement from `torch.randperm` on a CPU
    generator, for `a` then `b` — the order torchmetrics' `KernelInceptionDistance` draws real then fake, so
    with `a` = real features and the same seed in `torch.manual_seed` the subsets are identical.

    Args:
        a (`numpy.ndarray` or `torch.Tensor` of shape `(num_samples_a, d)`):
            The first feature set (e.g. real), at least 2 rows.
        b (`numpy.ndarray` or `torch.Tensor` of shape `(num_samples_b, d)`):
            The second feature set (e.g. generated), at least 2 rows.
        subsets (`int`, *optional*, defaults to 100):
            How many random subsets.
        subset_size (`int`, *optional*):
            Rows per subset, in [2, min(N_a, N_b)]; defaults to min(1000, N_a, N_b), as in clean-fid.
        degree (`int`, *optional*, defaults to 3):
            The kernel's degree: k(x, y) = (γ·x·y + coef0)^degree.
        gamma (`float`, *optional*):
            The kernel's γ; defaults to 1/d.
        coef0 (`float`, *optional*, defaults to 1.0):
            The kernel's offset.
        seed (`int`, *optional*):
            Seeds the subset generator (default 0); pass either `seed` or `generator`.
        generator (`torch.Generator`, *optional*):
            A CPU generator for the subsets.

    Returns:
        `MeanStd`: the mean of the subsets' MMD² and their population std (as torchmetrics).
    """
    xa = feature_matrix(a, "a", min_rows=2)
    xb = feature_matrix(b, "b", min_rows=2)
    same_width(xa, xb, "a", "b")
    if not (isinstance(subsets, int) and subsets >= 1):
        raise ValueError(f"subsets: expected a positive int, got {subsets!r}")
    if subset_size is None:
        subset_size = min(DEFAULT_MAX_SUBSET_SIZE, xa.shape[0], xb.shape[0])
    if not (isinstance(subset_size, int) and 2 <= subset_size <= min(xa.shape[0], xb.shape[0])):
        raise ValueError(
            f"subset_size: expected an int in [2, min(N_a, N_b) = {min(xa.shape[0], xb.shape[0])}], "
            f"got {subset_size!r}"
        )
    if not (isinstance(degree, int) and degree >= 1):
        raise ValueError(f"degree: expected a positive int, got {degree!r}")
    if gamma is None:
        gamma = 1.0 / xa.shape[1]
    if not gamma > 0:
        raise ValueError(f"gamma: expected None or a positive float, got {gamma!r}")
    if not coef0 >= 0:
        raise ValueError(f"coef0: expected a non-negative float, got {coef0!r}")

    gen = _subset_generator(seed, generator)
    values = np.empty(subsets)
    for s in range(subsets):
        rows_a = torch.randperm(xa.shape[0], generator=gen)[:subset_size].numpy()
        rows_b = torch.randperm(xb.shape[0], generator=gen)[:subset_size].numpy()
        values[s] = polynomial_mmd2_unbiased(xa[rows_a], xb[rows_b], degree, float(gamma), float(coef0))
    return MeanStd(float(values.mean()), float(values.std()))
