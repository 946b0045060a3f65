"""A weight draw's effect on x_0 without the feedback, the control variate of the trajectories (docs/MATH.md §14.5).

Were no model call fed back (the features φ_k of the stock trajectory fixed), a head deviation Δθ
would move x_0 by Σ_k β_k·head(φ_k; Δθ) = head(φ̃; Δθ) (bias weighted Σβ_k instead of 1, see below),
with β_k the coefficient of call k's output in x_0 through the affine steps and φ̃ = Σ_k β_k·φ_k.
Per draw m, L_m = head(φ̃; Δθ_m) is cheap (one head op) and its variance over the posterior is known
exactly, V = the head's closed-form variance at φ̃ (``posterior.predict``), so the trajectories'
squared deviations D_m² can be corrected by the part of their noise that L_m² explains:

    v̂ = mean_m D_m² − β·(mean_m L_m² − V),      β = the least-squares slope of D² on L² per image.

L_m uses the head's bias with weight 1 rather than Σβ_k: any linear function of Δθ with a known
variance is a valid control; this one has V from the posterior's own op. The control needs the
scheduler's affine description with one model output per step (DDIM, DDPM, Euler, Euler-A, flow
matching; not DPM-Solver-2's two stages nor the multistep solvers) and draws centred on the head's
weights (a Laplace posterior).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from bayesdiff_ext.sampler.schedulers import describe

__all__ = ["FeatureSum", "accumulate_features", "feedback_free_coefficients"]


def feedback_free_coefficients(scheduler, eta: float, scheduler_kwargs=None) -> list[float] | None:
    """β_k for every model call of ``scheduler.timesteps`` (set them first), or None where the
    scheduler is not described by single-output affine steps."""
    try:
        plan = describe(scheduler, eta, **(scheduler_kwargs or {})).steps()
    except (ValueError, TypeError):
        return None
    if any(step.origin != step.index or len(step.b) != 1 for step in plan):
        return None
    betas, carry = [], 1.0
    for step in reversed(plan):
        betas.append(carry * step.b[-1])
        carry *= step.a
    return betas[::-1]


class FeatureSum:
    """φ̃ = Σ_k β_k·φ_k over the head's forwards, in float64 (``total``), and how many there were."""

    def __init__(self, betas: list[float]) -> None:
        self.betas = betas
        self.calls = 0
        self.total: torch.Tensor | None = None

    def add(self, module: nn.Module, args: tuple) -> None:
        if self.calls < len(self.betas):
            term = self.betas[self.calls] * args[0].detach().to(torch.float64)
            self.total = term if self.total is None else self.total + term
        self.calls += 1


@contextlib.contextmanager
def accumulate_features(head: nn.Module, betas: list[float]) -> Iterator[FeatureSum]:
    """Inside the context, the k-th forward of ``head`` adds β_k·φ_k to the yielded sum."""
    features = FeatureSum(betas)
    handle = head.register_forward_pre_hook(features.add)
    try:
        yield features
    finally:
        handle.remove()
