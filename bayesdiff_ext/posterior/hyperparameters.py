"""Observation noise σ and prior precision δ of a last-layer Laplace posterior (docs/MATH.md §1.2).

Everything here works on the curvature's spectrum: eigenvalues h_i of H over the P posterior
parameters with multiplicities n_i (a diag posterior: its entries; full: eig(A_aug), each C times;
kron: g_i·a_j and eig(G_b)). With s = 1/(σ²·T) and θ the MAP weights (prior mean 0):

    log Z(δ) = −s·RSS/2 − n_out·log(σ√(2π)) − ½[Σ n_i log(s·h_i + δ) − P·log δ] − ½·δ·‖θ‖²

(laplace-torch's ``log_marginal_likelihood``). Its derivative in δ vanishes exactly where
δ·‖θ‖² = γ(δ) = Σ n_i·s·h_i/(s·h_i + δ), MacKay's fixed point, and δ·‖θ‖² − γ(δ) is increasing in δ,
so the evidence has a single maximum. 'mackay' reaches it by MacKay's iteration δ ← γ(δ)/‖θ‖²
(a contraction near the fixed point), 'marglik' by bisection on the sign of the derivative.
"""

from __future__ import annotations

import math

import torch

SIGMA_CHOICES = ("ml",)
PRIOR_CHOICES = ("mackay", "marglik")


def sigma_ml(residual_sum_squares: float, residual_elements: int) -> float:
    """σ̂ = √(mean residual²): the maximum-likelihood noise of the fitting residuals."""
    if residual_elements <= 0:
        raise ValueError("σ by maximum likelihood needs fitting residuals; fit the posterior first")
    return math.sqrt(residual_sum_squares / residual_elements)


def effective_parameters(values: torch.Tensor, counts: torch.Tensor, s: float, delta: float) -> float:
    """γ = Σ n_i·s·h_i/(s·h_i + δ): how many parameters the data determine."""
    sh = s * values
    return float((counts * sh / (sh + delta)).sum())


def mackay_prior_precision(
    values: torch.Tensor,
    counts: torch.Tensor,
    theta_norm2: float,
    s: float,
    *,
    initial: float = 1.0,
    rtol: float = 1e-12,
    max_iter: int = 10_000,
) -> float:
    """MacKay's fixed point δ = γ(δ)/‖θ‖², by iterating the update until it stops moving."""
    _check_evidence_inputs(values, theta_norm2)
    delta = float(initial)
    for _ in range(max_iter):
        updated = effective_parameters(values, counts, s, delta) / theta_norm2
        if abs(updated - delta) <= rtol * updated:
            return updated
        delta = updated
    raise RuntimeError(f"MacKay's prior-precision iteration did not converge in {max_iter} steps (δ = {delta:.6g})")


def marglik_prior_precision(
    values: torch.Tensor, counts: torch.Tensor, theta_norm2: float, s: float, *, rtol: float = 1e-13
) -> float:
    """The δ that maximises the Laplace evidence, by bisection on the sign of d log Z/dδ in log δ."""
    _check_evidence_inputs(values, theta_norm2)

    def ascending(delta: float) -> bool:  # d log Z / dδ > 0  ⇔  γ(δ) > δ·‖θ‖²
        return effective_parameters(values, counts, s, delta) > delta * theta_norm2

    # γ ≤ P bounds the root above by P/‖θ‖²; halve from there until the derivative turns positive.
    high = float(counts.sum()) / theta_norm2
    low = high
    while not ascending(low):
        low /= 2.0
        if low < 1e-300:
            raise RuntimeError("the Laplace evidence has no maximum in δ > 0 (is the curvature zero?)")
    while high - low > rtol * high:
        mid = math.sqrt(low * high)
        low, high = (mid, high) if ascending(mid) else (low, mid)
    return math.sqrt(low * high)


def log_marginal_likelihood(
    values: torch.Tensor,
    counts: torch.Tensor,
    theta_norm2: float,
    *,
    residual_sum_squares: float,
    residual_elements: int,
    sigma: float,
    delta: float,
    temperature: float = 1.0,
) -> float:
    s = 1.0 / (sigma * sigma * temperature)
    log_likelihood = -s * residual_sum_squares / 2 - residual_elements * math.log(sigma * math.sqrt(2 * math.pi))
    log_det_ratio = float((counts * torch.log(s * values + delta)).sum()) - float(counts.sum()) * math.log(delta)
    return log_likelihood - 0.5 * (log_det_ratio + delta * theta_norm2)


def _check_evidence_inputs(values: torch.Tensor, theta_norm2: float) -> None:
    if theta_norm2 <= 0:
        raise ValueError("choosing δ from the evidence needs nonzero MAP weights (‖θ‖² = 0)")
    if not bool((values > 0).any()):
        raise ValueError("choosing δ from the evidence needs a nonzero curvature; fit the posterior first")
