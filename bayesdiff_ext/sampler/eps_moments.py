"""The moments of a step's ε term: closed form at the image sample, or Monte Carlo over x_t (docs/MATH.md §2).

A step x' = a·x_origin + Σ_j b_j·out_j + c·z is written a·x_origin + b·ε_eff + c·z with b = b_last
and ε_eff = out_last + (b_first/b_last)·out_first for DPM-Solver-2's second stage (ε_eff = out
otherwise), so that ``ops.moment_step`` takes E[ε_eff], Var[ε_eff] and Cov(x_origin, ε_eff).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from bayesdiff_ext import ops
from bayesdiff_ext.sampler.schedulers import AffineStep
from bayesdiff_ext.sampler.randomness import antithetic_randn

__all__ = ["EpsMoments", "MonteCarloDraws", "StepRecord", "closed_form_moments", "monte_carlo_moments"]

HeadAt = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


@dataclass
class EpsMoments:
    mean: torch.Tensor
    var: torch.Tensor | None
    cov: torch.Tensor | None
    # The part of ``var`` that is the spread of the head means over the samples of x_t (driven by
    # Var[x_t], not by the weight posterior); None where ``var`` is the head variance alone.
    spread: torch.Tensor | None = None


@dataclass
class MonteCarloDraws:
    """Samples x^i of a step's input, (S, B, ...), the head variance there and, when a second stage
    restarts from this step, ε^i drawn from the head (mean + noise) to move x^i to its input."""

    x: torch.Tensor
    head_var: torch.Tensor
    eps: torch.Tensor | None


@dataclass
class StepRecord:
    """A step's input moments and ε, kept for a second stage that restarts from it."""

    mean: torch.Tensor
    var: torch.Tensor
    eps: torch.Tensor  # the UNet's output (ε channels) at the image sample
    head_var: torch.Tensor | None  # the head's closed-form variance there
    draws: MonteCarloDraws | None


def first_output_weight(step: AffineStep) -> float:
    """Weight of the first stage's output in ε_eff (0 for a single-output step)."""
    return step.b[0] / step.b[-1] if step.origin != step.index else 0.0


def closed_form_moments(
    step: AffineStep, eps: torch.Tensor, head_var: torch.Tensor | None, previous: StepRecord | None
) -> EpsMoments:
    """ε_eff at the image sample, with the head variance γ² there when given (no covariance).

    For a second stage the two outputs' head variances are added as if independent.
    """
    weight = first_output_weight(step)
    if step.origin == step.index:
        return EpsMoments(eps, head_var, None)
    var = None if head_var is None else head_var + weight**2 * previous.head_var
    return EpsMoments(eps + weight * previous.eps, var, None)


def monte_carlo_moments(
    step: AffineStep,
    first_stage: AffineStep,
    mean: torch.Tensor,
    var: torch.Tensor,
    previous: StepRecord | None,
    head_at: HeadAt,
    *,
    samples: int,
    keep_eps: bool,
    eps_variance: str,
    covariance: str,
    generator: torch.Generator,
) -> tuple[EpsMoments, MonteCarloDraws]:
    """E[ε_eff], Var[ε_eff], Cov(x_origin, ε_eff) from S samples through one batched head call.

    ``head_at(x)`` maps samples (S, B, ...) to the head's (mean, var) there. A first step or
    single-output step draws x^i ~ N(mean, var) (antithetic pairs). A second stage instead moves
    its first stage's samples x_s^i to the intermediate point with their drawn ε_s^i, so that
    ε_eff^i = m^i + w·ε_s^i keeps its dependence on x_s^i and the covariance is taken against
    x_s. ``eps_variance='bayesdiff'`` keeps only the head variances (mean γ², plus w²·mean γ_s²
    for a second stage), dropping the spread of the head means over the samples.
    """
    weight = first_output_weight(step)
    if step.origin != step.index:
        origin_x, origin_mean = previous.draws.x, previous.mean
        x = first_stage.a * origin_x + first_stage.b[0] * previous.draws.eps
    else:
        x = mean + var.clamp_min(0).sqrt() * antithetic_randn(samples, mean, generator)
        origin_x, origin_mean = x, mean
    head_mean, head_var = head_at(x)
    drawn = head_mean + head_var.sqrt() * antithetic_randn(samples, mean, generator) if keep_eps else None
    eff = head_mean + weight * previous.draws.eps if weight else head_mean
    eps_mean, eps_var, cov = ops.mc_moments(origin_x, eff, head_var, origin_mean)
    posterior_var = head_var.mean(dim=0)
    if weight:
        posterior_var = posterior_var + weight**2 * previous.draws.head_var.mean(dim=0)
    spread = None
    if eps_variance == "bayesdiff":
        eps_var = posterior_var
    else:
        spread = (eps_var - posterior_var).clamp_min(0)
    if covariance == "none":
        cov = None
    return EpsMoments(eps_mean, eps_var, cov, spread), MonteCarloDraws(x, head_var, drawn)
