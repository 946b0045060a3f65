"""The step engine: the moment recurrence of docs/MATH.md §2 over any described scheduler.

:class:`StepEngine` carries E[x_t], Var[x_t] (and the aleatoric part of Var) through the steps of a
:class:`~bayesdiff_ext.sampler.schedulers.SchedulerDescription`. At each step its caller hands it
the model's prediction at the image sample and, where the step wants it, the head's closed-form
variance there; at a Monte Carlo step the engine draws its samples and gets the head's moments at
them through ``head_at``. :class:`~bayesdiff_ext.BayesDiffSampler` (which also runs the model and
the scheduler's own step) and :class:`~bayesdiff_ext.UncertaintyCallback` (which reads both from
a stock pipeline's loop) drive the same engine, so the step body exists once.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from bayesdiff_ext import ops
from bayesdiff_ext.numerics import per_image_sum
from bayesdiff_ext.sampler.eps_moments import StepRecord, closed_form_moments, monte_carlo_moments
from bayesdiff_ext.sampler.schedulers import AffineStep
from bayesdiff_ext.sampler.variance_split import aleatoric_step, has_sampler_noise
from bayesdiff_ext.validation import check_count

__all__ = ["CHOICES", "StepEngine", "StepKind", "check_settings", "step_kinds"]

CHOICES = {
    "covariance": ("mc", "none"),
    "eps_variance": ("total", "bayesdiff"),
    "mode": ("deterministic", "bayesdiff"),
    "skip": ("all", "covariance"),
}

HeadAt = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def check_settings(settings: dict[str, Any]) -> None:
    """ValueError naming the first uncertainty setting that is not allowed."""
    for name, allowed in CHOICES.items():
        if settings[name] not in allowed:
            raise ValueError(f"{name} must be one of {allowed}, got {settings[name]!r}")
    check_count("uq_every", settings["uq_every"])
    mc_samples = check_count("mc_samples", settings["mc_samples"], minimum=0)
    if mc_samples == 0 and settings["covariance"] == "mc":
        raise ValueError("covariance='mc' needs mc_samples >= 1; pass covariance='none' for the closed form only")


class StepKind(NamedTuple):
    """What one scheduler step does for the variance."""

    uncertain: bool  # an uncertainty step (BayesDiff-Skip)
    monte_carlo: bool  # E[ε], Var[ε], Cov(x, ε) from S draws through the model
    closed_form: bool  # the head variance γ² at the image sample, no extra model call


def step_kinds(plan: list[AffineStep], uq_every: int, mc_samples: int, skip: str) -> list[StepKind]:
    """Per scheduler step of ``plan``: every ``uq_every``-th solver step (counted by origin) is an
    uncertainty step, with Monte Carlo when ``mc_samples`` > 0, otherwise the closed form;
    ``skip='covariance'`` puts the closed form on the other steps too.

    Var[x_T] = 0, so at the first step all S draws equal x_T and the Monte Carlo reduces to the
    closed form at the image sample (BayesDiff's code also starts it at the second uncertainty
    step). A DPM-Solver-2 first stage still draws: its second stage needs them.
    """
    origins = sorted({s.origin for s in plan})
    solver_step = {origin: n for n, origin in enumerate(origins)}
    restarted = {s.origin for s in plan if s.origin != s.index}
    kinds = []
    for s in plan:
        uncertain = solver_step[s.origin] % uq_every == 0
        monte_carlo = uncertain and mc_samples > 0 and not (s.index == 0 and s.index not in restarted)
        closed_form = (uncertain and not monte_carlo) or (not uncertain and skip == "covariance")
        kinds.append(StepKind(uncertain, monte_carlo, closed_form))
    return kinds


class StepEngine:
    """E[x], Var[x] and the aleatoric part of Var carried through ``plan`` (one :class:`AffineStep` per model call).

    Args:
        plan: the scheduler's steps (``SchedulerDescription.steps()``).
        settings: the checked uncertainty settings (``uq_every``, ``mc_samples``, ``covariance``,
            ``eps_variance``, ``skip``, ``clamp``, ``mode``).
        moment_dtype: float32, or float64 for a float64 model.
        generator: the Monte Carlo stream (never the scheduler's own generator).
        trace: keep one record per step (``index``, ``timestep``, ``uncertainty_step``,
            ``monte_carlo``, ``mean``, ``variance``, ``variance_sum``, ``aleatoric_variance``).

    Per step ``k``: :meth:`wants_head` says whether the caller must pass the head variance at the
    image sample; :meth:`advance` updates the moments; in ``mode='bayesdiff'``
    :meth:`image_prediction` gives the prediction the image path steps with.
    """

    def __init__(
        self,
        plan: list[AffineStep],
        settings: dict[str, Any],
        *,
        moment_dtype: torch.dtype,
        generator: torch.Generator,
        trace: bool = False,
    ) -> None:
        self.plan = plan
        self.settings = settings
        self.kinds = step_kinds(plan, settings["uq_every"], settings["mc_samples"], settings["skip"])
        self.restarted = {s.origin for s in plan if s.origin != s.index}
        self.split_variance = has_sampler_noise(plan)
        self.moment_dtype = moment_dtype
        self.generator = generator
        self.trace: list[dict[str, Any]] | None = [] if trace else None
        self.monte_carlo_calls = 0
        self.mean = self.var = self.aleatoric = None

    def start(self, x: torch.Tensor) -> None:
        """E[x_T] = x_T, Var[x_T] = 0."""
        self.mean = x.to(self.moment_dtype, copy=True)
        self.var = torch.zeros_like(self.mean)
        self.aleatoric = self._previous_aleatoric = torch.zeros_like(self.mean)
        self._previous: StepRecord | None = None
        self.monte_carlo_calls = 0
        if self.trace is not None:
            self.trace.clear()

    def wants_head(self, index: int) -> bool:
        """Whether step ``index`` needs the head variance at the image sample."""
        kind = self.kinds[index]
        return kind.closed_form or (self.settings["mode"] == "bayesdiff" and kind.uncertain)

    def advance(self, step: AffineStep, timestep, prediction: torch.Tensor, head_var: torch.Tensor | None, head_at: HeadAt) -> None:
        """Move the moments over ``step`` given the model's ``prediction`` at the image sample.

        ``head_var`` is the head's variance there (needed where :meth:`wants_head`); ``head_at``
        maps Monte Carlo samples (S, B, ...) of the step's input to the head's (mean, var) there.
        """
        settings = self.settings
        is_uncertain, monte_carlo, closed_form_var = self.kinds[step.index]
        eps = prediction.to(self.moment_dtype)
        head_var = None if head_var is None else head_var.to(self.moment_dtype)
        previous = self._previous
        restart = step.origin != step.index  # DPM-Solver-2's second stage starts from x_{k-1}
        origin_mean, origin_var = (previous.mean, previous.var) if restart else (self.mean, self.var)

        draws = None
        if monte_carlo:
            moments, draws = monte_carlo_moments(
                step,
                self.plan[step.origin],
                self.mean,
                self.var,
                previous,
                head_at,
                samples=settings["mc_samples"],
                keep_eps=step.index in self.restarted,
                eps_variance=settings["eps_variance"],
                covariance=settings["covariance"],
                generator=self.generator,
            )
            self.monte_carlo_calls += 1
        else:
            moments = closed_form_moments(step, eps, head_var if closed_form_var else None, previous)
        next_mean, next_var = ops.moment_step(
            origin_mean,
            origin_var,
            moments.mean,
            moments.var,
            moments.cov,
            a=step.a,
            b=step.b[-1],
            c2=step.c2,
            clamp=settings["clamp"],
        )
        next_aleatoric = self.aleatoric
        if self.split_variance:
            origin_aleatoric = self._previous_aleatoric if restart else self.aleatoric
            next_aleatoric = aleatoric_step(
                step, origin_mean, origin_var, origin_aleatoric, moments, next_var, settings["clamp"]
            )

        self._previous = StepRecord(self.mean, self.var, eps, head_var, draws)
        self._previous_aleatoric = self.aleatoric
        self.mean, self.var, self.aleatoric = next_mean, next_var, next_aleatoric
        if self.trace is not None:
            self.trace.append(
                dict(
                    index=step.index,
                    timestep=timestep.item() if torch.is_tensor(timestep) else timestep,
                    uncertainty_step=is_uncertain,
                    monte_carlo=monte_carlo,
                    mean=self.mean,
                    variance=self.var,
                    variance_sum=per_image_sum(self.var),
                    aleatoric_variance=self.aleatoric,
                )
            )

    def image_prediction(self, step: AffineStep, prediction: torch.Tensor, head_var: torch.Tensor | None) -> torch.Tensor:
        """The prediction the image path steps with: the model's, or in ``mode='bayesdiff'`` at an
        uncertainty step a draw from N(prediction, γ²) (the paper's sampled trajectory)."""
        if not (self.settings["mode"] == "bayesdiff" and self.kinds[step.index].uncertain):
            return prediction
        eps = prediction.to(self.moment_dtype)
        drawn = torch.randn(eps.shape, generator=self.generator, device=eps.device, dtype=self.moment_dtype)
        return (eps + head_var.to(self.moment_dtype).sqrt() * drawn).to(prediction.dtype)
