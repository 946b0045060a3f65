"""Convergence diagnostics of several Markov chains: effective sample size and split-R̂.

Both follow Vehtari, Gelman, Simpson, Carpenter & Bürkner (2021), "Rank-normalization, folding,
and localization: an improved R̂", without the rank normalisation (the head's posterior is
Gaussian, so the draws need no transform): the ESS combines the chains' autocorrelations with the
between-chain variance and truncates the sum by Geyer's initial monotone sequence; R̂ compares the
within- and between-chain variances of the chains split in halves (values near 1 mean the chains
agree; Vehtari et al. recommend R̂ < 1.01).
"""

from __future__ import annotations

import math

import torch


def _check_draws(draws: torch.Tensor, min_draws: int) -> None:
    if draws.dim() < 2 or draws.shape[1] < min_draws:
        raise ValueError(f"draws must be (chains, n >= {min_draws}, ...), got {tuple(draws.shape)}")


def _chain_autocovariance(draws: torch.Tensor) -> torch.Tensor:
    """Biased autocovariance (÷n) of each chain along dim 1, lags 0..n−1, by FFT."""
    n = draws.shape[1]
    centred = draws - draws.mean(1, keepdim=True)
    spectrum = torch.fft.rfft(centred, n=2 * n, dim=1)
    return torch.fft.irfft(spectrum * spectrum.conj(), n=2 * n, dim=1)[:, :n] / n


def _variance_parts(draws: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(W, var⁺): the mean within-chain variance and the pooled estimate of the target variance."""
    n = draws.shape[1]
    within = draws.var(1).mean(0)
    between = draws.mean(1).var(0) if draws.shape[0] > 1 else torch.zeros_like(within)
    return within, within * (n - 1) / n + between


def effective_sample_size(draws: torch.Tensor) -> torch.Tensor:
    """ESS of every trailing-dimension entry of ``draws`` (chains, n, ...), float64, at most m·n·log10(m·n)."""
    _check_draws(draws, 4)
    draws = draws.to(torch.float64)
    chains, n = draws.shape[:2]
    within, var_plus = _variance_parts(draws)
    mean_autocovariance = _chain_autocovariance(draws).mean(0)
    safe = var_plus.clamp_min(torch.finfo(torch.float64).tiny)
    rho = 1 - (within - mean_autocovariance) / safe  # (n, ...), rho[0] ≈ 1
    pairs = rho[: 2 * (n // 2)].unflatten(0, (n // 2, 2)).sum(1)  # Geyer's Γ_k = ρ_2k + ρ_2k+1
    positive = torch.cumprod((pairs > 0).to(torch.float64), dim=0)  # up to the first negative pair
    monotone = torch.cummin(pairs, dim=0).values.clamp_min(0)
    tau = -1 + 2 * (monotone * positive).sum(0)
    total = chains * n
    tau = tau.clamp_min(1 / math.log10(total))
    ess = total / tau
    return torch.where(var_plus > 0, ess, torch.full_like(ess, float(total)))


def split_rhat(draws: torch.Tensor) -> torch.Tensor:
    """Split-R̂ of every trailing-dimension entry of ``draws`` (chains, n, ...)."""
    _check_draws(draws, 4)
    half = draws.shape[1] // 2
    split = torch.cat([draws[:, :half], draws[:, -half:]], dim=0).to(torch.float64)
    within, var_plus = _variance_parts(split)
    return (var_plus / within.clamp_min(torch.finfo(torch.float64).tiny)).sqrt()


def summary(draws: torch.Tensor) -> dict:
    """Minimum and median ESS and the largest split-R̂ over the entries of ``draws`` (chains, n, ...)."""
    ess = effective_sample_size(draws).flatten()
    rhat = split_rhat(draws).flatten()
    return {
        "ess_min": float(ess.min()),
        "ess_median": float(ess.median()),
        "rhat_max": float(rhat.max()),
    }
