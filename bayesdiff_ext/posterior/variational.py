"""Variational inference on the head's ε rows by the reparameterised ELBO (docs/MATH.md §8.1).

    ELBO(q) = E_q[log p(data | Θ)^(1/T) + log p(Θ)] + H(q),   Θ = μ + noise·Lᵀ, noise ~ N(0, I),

estimated with ``samples`` draws per step (the expectation by Monte Carlo, the entropy exactly) and
maximised with Adam; the data enter through the linear-Gaussian statistics (``LinearGaussianHead``),
so a step costs a few (C, K)×(K, K) products whatever the number of fitting images. Two families:

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
from bayesdiff_ext.posterior.weight_distributions import DiagGaussian, FactoredGaussian

FAMILIES = ("diag", "full")


def elbo_scale(target: LinearGaussianHead) -> float:
    """The one width the variational parameters are measured in."""
    return 1.0 / math.sqrt(target.s * float(target.gram.diagonal().mean()) + target.delta)


def fit_variational(
    target: LinearGaussianHead,
    family: str = "diag",
    *,
    steps: int = 3000,
    samples: int = 16,
    lr: float = 0.05,
    generator: torch.Generator | None = None,
    progress: bool = False,
):
    """Maximise the ELBO of ``family`` over q; returns (DiagGaussian or FactoredGaussian, record).

    ``record`` holds the settings and the ELBO estimate of every 10th step (``elbo_trace``) and the
    ELBO of the returned q estimated with 256 draws (``final_elbo``).
    """
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    for name, value, low in (("steps", steps, 4), ("samples", samples, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    scale = elbo_scale(target)
    channels, k = target.theta_hat.shape
    std_shape = (k,) if family == "full" else (channels, k)
    params = {
        "mean": torch.zeros(channels, k, dtype=torch.float64),
        "log_std": torch.zeros(std_shape, dtype=torch.float64),
    }
    if family == "full":
        params["lower"] = torch.zeros(k, k, dtype=torch.float64)
    for p in params.values():
        p.requires_grad_(True)

    def distribution(p):
        mean = target.theta_hat + scale * p["mean"]
        if family == "diag":
            return mean, scale * p["log_std"].exp()
        return mean, scale * (torch.tril(p["lower"], -1) + torch.diag(p["log_std"].exp()))

    def elbo(p, draws: int):
        mean, spread = distribution(p)
        noise = torch.randn((draws, channels, k), generator=generator, dtype=torch.float64)
        rows = mean + (noise * spread if family == "diag" else noise @ spread.T)
        log_std = p["log_std"] + math.log(scale)
        entropy = (channels if family == "full" else 1) * log_std.sum() + 0.5 * target.num_params * math.log(
            2 * math.pi * math.e
        )
        return target.log_density(rows).mean() + entropy

    optimiser = torch.optim.Adam(list(params.values()), lr=lr)
    half, tail_start = steps // 2, steps - steps // 4
    averaged = {name: torch.zeros_like(p) for name, p in params.items()}
    trace = []
    for step in tqdm(range(steps), disable=not progress, desc="Variational inference", unit="step"):
        for group in optimiser.param_groups:
            group["lr"] = lr if step < half else lr * (steps - step) / (steps - half)
        optimiser.zero_grad()
        value = elbo(params, samples)
        (-value).backward()
        optimiser.step()
        if step % 10 == 0:
            trace.append(float(value.detach()))
        if step >= tail_start:
            for name, p in params.items():
                averaged[name] += p.detach() / (steps - tail_start)
    with torch.no_grad():
        mean, spread = distribution(averaged)
        final = float(elbo(averaged, 256))
    if family == "diag":
        result = DiagGaussian(target.spec, mean, spread.square())
    else:
        result = FactoredGaussian.tied(target.spec, mean, spread @ spread.T)
    record = dict(family=family, steps=steps, samples=samples, lr=lr, final_elbo=final, elbo_trace=trace)
    return result, record
