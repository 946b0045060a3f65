"""Variational inference on the head's ε rows by the reparameterised ELBO (docs/MATH.md §10.1).

    ELBO(q) = E_q[log p(data | Θ)^(1/T) + log p(Θ)] + H(q),   Θ = μ + noise·Lᵀ, noise ~ N(0, I),

estimated with ``samples`` draws per step (the expectation by Monte Carlo, the entropy exactly) and
maximised with Adam. Its gradients are written out rather than taped: with g = ∇ log density at
the draws, ∂/∂μ = E[g] and ∂/∂L = E[g·noiseᵀ] (lower triangle) plus the entropy's ∂/∂log L_jj = C
(1 for 'diag'), which is what autograd would give, at a third of the cost. The data enter through
the linear-Gaussian statistics (``LinearGaussianHead``), so a step costs a few (C, K)×(K, K)
products whatever the number of fitting images. Two families:

* ``'diag'`` (mean-field): q = N(μ, diag(v)). For a Gaussian posterior N(Θ*, Λ⁻¹) the optimum is
  μ = Θ* and v = 1/diag(Λ) = 1/(s·diag(A) + δ): the diagonal GGN-Laplace variances, which
  underestimate the marginal variances diag(Λ⁻¹) wherever the weights are correlated.
* ``'full'``: q = N(μ, I_C ⊗ L·Lᵀ), one K×K Cholesky factor shared by the channels, the family of
  the exact posterior (whose channels share Λ⁻¹): its optimum is the posterior itself.

Parameters are optimised in units of one scale, 1/√(s·mean(diag A) + δ), so that Adam's steps
(about ``lr`` per step in those units) suit posterior widths of any size. The means start at the
head's weights and the standard deviations at that scale. The learning rate is constant for the
first half of the steps and decays linearly to 0 over the second half, and the returned
parameters are the average of the iterates over the last quarter (Polyak–Ruppert averaging
removes most of the Monte Carlo jitter that Adam leaves in the final iterate).
"""

from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm

from bayesdiff_ext.posterior.linear_gaussian import LinearGaussianHead
from bayesdiff_ext.posterior.settings import VISettings
from bayesdiff_ext.posterior.weight_distributions import DiagGaussian, FactoredGaussian


def elbo_scale(target: LinearGaussianHead) -> float:
    """The one width the variational parameters are measured in."""
    return 1.0 / math.sqrt(target.s * float(target.gram.diagonal().mean()) + target.delta)


def fit_variational(
    target: LinearGaussianHead,
    settings: VISettings = VISettings(),
    *,
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> tuple[DiagGaussian | FactoredGaussian, dict]:
    """Maximise the ELBO of ``settings.family`` over q; returns (DiagGaussian or FactoredGaussian, record).

    ``record`` holds the settings, the ELBO estimate of every 10th step (``elbo_trace``), and for the
    returned q its exact ELBO (``elbo``), the exact log evidence and their difference
    ``kl_to_posterior`` = KL(q ‖ posterior) ≥ 0 (what the family or the optimisation leaves out).
    """
    family, steps, samples, lr = settings.family, settings.steps, settings.samples, settings.lr
    scale = elbo_scale(target)
    channels, k = target.theta_hat.shape
    mean = torch.zeros(channels, k, dtype=torch.float64)  # μ = Θ̂ + scale·mean
    log_std = torch.zeros((k,) if family == "full" else (channels, k), dtype=torch.float64)
    lower = torch.zeros(k, k, dtype=torch.float64)  # strictly lower part of L/scale ('full')
    params = [mean, log_std] + ([lower] if family == "full" else [])
    optimiser = torch.optim.Adam(params, lr=lr)
    half, tail_start = steps // 2, steps - steps // 4
    averaged = [torch.zeros_like(p) for p in params]
    log_volume = 0.5 * target.num_params * math.log(2 * math.pi * math.e)
    trace = []
    for step in tqdm(range(steps), disable=not progress, desc="Variational inference", unit="step"):
        for group in optimiser.param_groups:
            group["lr"] = lr if step < half else lr * (steps - step) / (steps - half)
        noise = torch.randn((samples, channels, k), generator=generator, dtype=torch.float64)
        spread = _spread(family, scale, log_std, lower)
        rows = target.theta_hat + scale * mean + (noise * spread if family == "diag" else noise @ spread.T)
        # reparameterised gradients of the ELBO: ∂/∂μ = E[g], ∂/∂L = E[g·noiseᵀ], g = ∇ log density
        g = target.gradient(rows)
        mean.grad = -scale * g.mean(0)
        if family == "diag":
            log_std.grad = -((g * noise).mean(0) * spread + 1)
        else:
            outer = torch.einsum("nck,ncl->kl", g, noise) / samples
            lower.grad = -scale * torch.tril(outer, -1)
            log_std.grad = -(scale * outer.diagonal() * log_std.exp() + channels)
        if step % 10 == 0:
            entropy = _entropy(family, scale, log_std, channels) + log_volume
            trace.append(float(target.log_density(rows).mean()) + entropy)
        optimiser.step()
        if step >= tail_start:
            for total, p in zip(averaged, params):
                total += p / (steps - tail_start)
    final_mean = target.theta_hat + scale * averaged[0]
    spread = _spread(family, scale, averaged[1], averaged[2] if family == "full" else None)
    if family == "diag":
        result = DiagGaussian(target.spec, final_mean, spread.square())
    else:
        result = FactoredGaussian.tied(target.spec, final_mean, spread @ spread.T)
    final, evidence = target.elbo(result.mean_rows, result.covariance()), target.log_evidence()
    record = dict(elbo=final, log_evidence=evidence, kl_to_posterior=evidence - final, elbo_trace=trace)
    return result, record


def _spread(family: str, scale: float, log_std: torch.Tensor, lower: torch.Tensor | None) -> torch.Tensor:
    """The standard deviations (C, K) ('diag') or the Cholesky factor L (K, K) ('full')."""
    if family == "diag":
        return scale * log_std.exp()
    return scale * (torch.tril(lower, -1) + torch.diag(log_std.exp()))


def _entropy(family: str, scale: float, log_std: torch.Tensor, channels: int) -> float:
    """Σ log σ_j ('diag') or C·Σ log L_jj ('full'), without the constant ½·P·log(2πe)."""
    per_channel = float(log_std.sum()) + log_std.numel() * math.log(scale)
    return channels * per_channel if family == "full" else per_channel
