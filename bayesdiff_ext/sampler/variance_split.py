"""Split Var[x_t] into the part from the sampler's own noise and the part from the weight posterior.

By the law of total variance over the head weights θ,
Var[x_t] = E_θ[Var(x_t | θ)] + Var_θ(E[x_t | θ]): the first term is *aleatoric* (the sampler's
noise c·z of DDPM and DDIM with η > 0), the second *epistemic* (the weight posterior). A step

    Var' = a²·Var + b²·(S + G) + 2ab·Cov(x, ε) + c²

has two fresh sources, c² (aleatoric) and G = E[γ²], the head's posterior variance (epistemic),
and three terms that carry the variance already in x_t forward: a²·Var, the spread S of the head
means over the samples of x_t and the covariance Cov(x_t, ε). Those three would be a per-pixel
gain g·Var if the UNet were linear in x_t with a diagonal Jacobian; under that approximation each
source keeps its share of Var, so the aleatoric part follows

    A' = a²·A + b²·(r·S) + 2ab·(r·Cov) + c²,        r = A / Var (0 where Var = 0),

which is one more ``moment_step`` with the ε variance and covariance scaled by r. The epistemic
part is the rest, E = Var − A. Cross-pixel mixing through the UNet is attributed in the same
proportion, which is the approximation. A deterministic sampler (c² = 0) has A = 0 exactly; with a
zero-variance posterior G = 0 and A = Var exactly.
"""

from __future__ import annotations

import torch

from bayesdiff_ext import ops
from bayesdiff_ext.sampler.schedulers import AffineStep
from bayesdiff_ext.sampler.eps_moments import EpsMoments

__all__ = ["aleatoric_step", "has_sampler_noise", "with_step_noise"]


def has_sampler_noise(plan: list[AffineStep]) -> bool:
    return any(step.c2 > 0 for step in plan)


def aleatoric_step(
    step: AffineStep,
    origin_mean: torch.Tensor,
    origin_var: torch.Tensor,
    origin_aleatoric: torch.Tensor,
    moments: EpsMoments,
    next_var: torch.Tensor,
    clamp: bool,
    step_noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """The aleatoric part after ``step``, within [0, next_var] so that the epistemic rest is ≥ 0;
    ``step_noise`` is a learned per-element c² added to ``step.c2`` (docs/MATH.md §15)."""
    zero = torch.zeros_like(origin_var)
    share = torch.where(origin_var > 0, origin_aleatoric / origin_var, zero).clamp(0, 1)
    spread = None if moments.spread is None else share * moments.spread
    cov = None if moments.cov is None else share * moments.cov
    _, aleatoric = ops.moment_step(
        origin_mean,
        origin_aleatoric,
        moments.mean,
        spread,
        cov,
        a=step.a,
        b=step.b[-1],
        c2=step.c2,
        clamp=clamp and step_noise is None,
    )
    if step_noise is not None:
        aleatoric = with_step_noise(aleatoric, step_noise, clamp)
    return torch.minimum(aleatoric.clamp_min(0), next_var.clamp_min(0))


def with_step_noise(var: torch.Tensor, step_noise: torch.Tensor, clamp: bool) -> torch.Tensor:
    """``var`` (a ``moment_step`` result taken without its clamp) plus a per-element c², then clamped at 0
    where ``clamp``: the same value ``moment_step`` gives for a scalar c²."""
    total = var + step_noise
    return total.clamp_min(0) if clamp else total
