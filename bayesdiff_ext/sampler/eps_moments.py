"""The moments of a step's ε term: closed form at the image sample, or Monte Carlo over x_t (docs/MATH.md §2).

A step x' = a·x_origin + Σ_j b_j·out_j + c·z is written a·x_origin + b·ε_eff + c·z with b = b_last
and ε_eff = out_last + (b_first/b_last)·out_first for DPM-Solver-2's second stage (ε_eff = out
otherwise), so that ``ops.moment_step`` takes E[ε_eff], Var[ε_eff] and Cov(x_origin, ε_eff).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch

from bayesdiff_ext import ops
from bayesdiff_ext.sampler.schedulers import AffineStep
from bayesdiff_ext.randomness import ImageStreams, antithetic_randn

__all__ = [
    "EpsMoments",
    "MonteCarloDraws",
    "MonteCarloNormals",
    "MonteCarloSamples",
    "StepRecord",
    "closed_form_moments",
    "draw_normals",
    "monte_carlo_moments",
    "monte_carlo_samples",
    "regression_moments",
]

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


class MonteCarloNormals(NamedTuple):
    """The standard normals a Monte Carlo step uses, (S, B, ...) antithetic pairs: for the samples of x_t
    (None where a second stage reuses its first stage's samples) and for the head noise ε^i a second
    stage needs (None otherwise)."""

    x: torch.Tensor | None
    eps: torch.Tensor | None


def draw_normals(step: AffineStep, like: torch.Tensor, samples: int, keep_eps: bool, streams: ImageStreams) -> MonteCarloNormals:
    """The draws of :func:`monte_carlo_samples` for ``step``, in the order it always made them."""
    x = None if step.origin != step.index else antithetic_randn(samples, like, streams)
    eps = antithetic_randn(samples, like, streams) if keep_eps else None
    return MonteCarloNormals(x, eps)


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


def regression_moments(x: torch.Tensor, eps: torch.Tensor, var_x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The spread of ε over the samples and Cov(x, ε) in the regression (Stein) form (docs/MATH.md §2).

    The draws x^i have a known variance v = ``var_x``, so per element the least-squares slope
    β = Σ_i d^i·(ε^i − ε̄) / Σ_i (d^i)², d^i = x^i − x̄, gives Cov(x, ε) = β·v (Stein's lemma,
    Cov(x, f(x)) = E[f′]·Var(x) for Gaussian x) and the spread β²·v + mean_i (r^i)² with the
    residuals r^i = ε^i − ε̄ − β·d^i. The plain estimator's covariance is β times the draws' own
    spread, whose noise it carries; here v is exact. Samples (S, B, ...).
    """
    deviation = x - x.mean(dim=0)
    centred = eps - eps.mean(dim=0)
    energy = deviation.square().sum(dim=0)
    slope = torch.where(energy > 0, (deviation * centred).sum(dim=0) / energy.clamp_min(torch.finfo(energy.dtype).tiny), 0.0)
    residual = centred - slope * deviation
    return slope.square() * var_x + residual.square().mean(dim=0), slope * var_x


@dataclass
class MonteCarloSamples:
    """What a Monte Carlo step reduces over its S samples, each (S, B, ...): ``x``, the samples of
    the step's origin; ``eps``, ε_eff at each (the head mean, plus w·ε_s^i for a second stage);
    ``head_var``, the head variance γ²^i there; and the draws a later stage may need."""

    x: torch.Tensor
    eps: torch.Tensor
    head_var: torch.Tensor
    draws: MonteCarloDraws


def monte_carlo_samples(
    step: AffineStep,
    first_stage: AffineStep,
    mean: torch.Tensor,
    var: torch.Tensor,
    previous: StepRecord | None,
    head_at: HeadAt,
    *,
    keep_eps: bool,
    normals: MonteCarloNormals,
) -> MonteCarloSamples:
    """The S samples of a Monte Carlo step through one batched head call.

    ``head_at(x)`` maps samples (S, B, ...) to the head's (mean, var) there. A first step or
    single-output step draws x^i ~ N(mean, var) (antithetic pairs). A second stage instead moves
    its first stage's samples x_s^i to the intermediate point with their drawn ε_s^i, so that
    ε_eff^i = m^i + w·ε_s^i keeps its dependence on x_s^i and the covariance is taken against
    x_s. The standard normals come drawn (:func:`draw_normals`), so this function makes no random
    draw of its own: a compiled or graph-captured step takes them as inputs.
    """
    weight = first_output_weight(step)
    if step.origin != step.index:
        origin_x = previous.draws.x
        x = first_stage.a * origin_x + first_stage.b[0] * previous.draws.eps
    else:
        x = origin_x = mean + var.clamp_min(0).sqrt() * normals.x
    head_mean, head_var = head_at(x)
    drawn = head_mean + head_var.sqrt() * normals.eps if keep_eps else None
    eff = head_mean + weight * previous.draws.eps if weight else head_mean
    return MonteCarloSamples(origin_x, eff, head_var, MonteCarloDraws(x, head_var, drawn))


def monte_carlo_moments(
    step: AffineStep,
    samples: MonteCarloSamples,
    origin_mean: torch.Tensor,
    origin_var: torch.Tensor,
    previous: StepRecord | None,
    *,
    eps_variance: str,
    covariance: str,
) -> EpsMoments:
    """E[ε_eff], Var[ε_eff], Cov(x_origin, ε_eff) from the S ``samples`` about E[x_origin] =
    ``origin_mean`` (Var[x_origin] = ``origin_var``).

    ``covariance='regression'`` takes the spread and the covariance in the regression form
    (:func:`regression_moments`). ``eps_variance='bayesdiff'`` keeps only the head variances (mean γ²,
    plus w²·mean γ_s² for a second stage), dropping the spread of the head means over the samples.
    With ``covariance='mc'`` and ``eps_variance='total'`` the step needs only what
    ``ops.mc_moment_step`` computes in one pass (the engine uses it where it needs no more).
    """
    weight = first_output_weight(step)
    eps_mean, eps_var, cov = ops.mc_moments(samples.x, samples.eps, samples.head_var, origin_mean)
    posterior_var = samples.head_var.mean(dim=0)
    if weight:
        posterior_var = posterior_var + weight**2 * previous.draws.head_var.mean(dim=0)
    if covariance == "regression":
        regression_spread, cov = regression_moments(samples.x, samples.eps, origin_var)
        eps_var = posterior_var + regression_spread
    spread = None
    if eps_variance == "bayesdiff":
        eps_var = posterior_var
    else:
        spread = (eps_var - posterior_var).clamp_min(0)
    if covariance == "none":
        cov = None
    return EpsMoments(eps_mean, eps_var, cov, spread)
