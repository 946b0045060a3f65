"""Partial (head) ensembles: the trunk fixed, N heads re-initialised and trained (docs/MATH.md §10.3).

Each member starts from PyTorch's own initialisation of a Conv2d/Linear layer (every weight and
bias uniform in ±1/√D, D = the fan-in) and is trained by full-batch gradient descent on the MAP
objective of the fitting data, −log p(Θ | data) = s/2·Σ‖f_Θ − y‖² + δ/2·‖Θ‖² + const, with step
η = 1/λ_max(Λ), Λ = s·A + δ·I. The objective is a strictly convex quadratic, so k steps have the
closed form Θ_k = Θ* + (Θ_0 − Θ*)·(I − η·Λ)^k (computed through the eigendecomposition of Λ, no
loop), and every member trained to convergence (``steps=None``) reaches the same optimum Θ*
whatever its initialisation: a plain head ensemble collapses to one head, its spread is zero.

Two variants give a spread, and say different things:

* ``bootstrap=True``: member m is trained on a Poisson(1) bootstrap replicate of the fitting data
  (``linear_gaussian.HeadStatistics``). The members' spread estimates the sampling distribution
  of Θ*, approximately the sandwich Λ⁻¹·(s²·Σ_i r_i²·a_i·a_iᵀ)·Λ⁻¹, which matches the posterior
  covariance Λ⁻¹ when the residuals are homoscedastic with variance σ² and δ is small.
* ``steps=k``: early stopping from random initialisations; what is left of the initial spread
  after k steps, (I − η·Λ)^k, lives in the directions the data determine least. It depends on
  the initialisation scale and k, not only on the data: a heuristic, not a posterior.
"""

from __future__ import annotations

import math

import torch

from bayesdiff_ext.posterior.linear_gaussian import LinearGaussianHead


def initial_heads(members: int, channels: int, k: int, fan_in: int, generator=None) -> torch.Tensor:
    """(members, C, K) rows drawn as ``nn.Conv2d``/``nn.Linear.reset_parameters`` draws them:
    kaiming_uniform(a=√5) for the weights and the bias bound both give U(−1/√fan_in, 1/√fan_in)."""
    bound = 1.0 / math.sqrt(fan_in)
    return (torch.rand((members, channels, k), generator=generator, dtype=torch.float64) * 2 - 1) * bound


def gradient_descent(target: LinearGaussianHead, start: torch.Tensor, steps: int | None) -> torch.Tensor:
    """``steps`` full-batch gradient-descent steps of size 1/λ_max(Λ) on −log p(Θ | data) from
    ``start`` (..., C, K), in closed form; ``steps=None`` is the limit, the optimum Θ*."""
    optimum = target.posterior_mean()
    if steps is None:
        return optimum.expand_as(start).clone()
    values, vectors = torch.linalg.eigh(target.precision)
    contraction = (1 - values / values.max()).clamp_min(0) ** steps
    return optimum + ((start - optimum) @ vectors) * contraction @ vectors.T


def train_members(targets: list[LinearGaussianHead], start: torch.Tensor, steps: int | None) -> torch.Tensor:
    """Member m trained on ``targets[m]`` from ``start[m]``: (members, C, K)."""
    return torch.stack([gradient_descent(t, s, steps) for t, s in zip(targets, start)])
