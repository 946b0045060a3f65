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
from bayesdiff_ext.randomness import ImageStreams
from bayesdiff_ext.sampler.eps_moments import (
    MonteCarloNormals,
    StepRecord,
    closed_form_moments,
    draw_normals,
    monte_carlo_moments,
    monte_carlo_samples,
)
from bayesdiff_ext.sampler.schedulers import AffineStep
from bayesdiff_ext.sampler.variance_split import aleatoric_step, has_sampler_noise, with_step_noise

__all__ = ["StepEngine", "StepKind", "step_kinds"]

HeadAt = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


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
        settings: the recurrence's resolved settings (``uq_every``, ``mc_samples``, ``covariance``,
            ``eps_variance``, ``skip``, ``clamp``, ``mode``: :mod:`~bayesdiff_ext.sampler.settings`).
        moment_dtype: float32, or float64 for a float64 model.
        generator: the Monte Carlo streams (never the scheduler's own generator).
        trace: keep one record per step (``index``, ``timestep``, ``uncertainty_step``,
            ``monte_carlo``, ``mean``, ``variance``, ``variance_sum``, ``aleatoric_variance``).
        learned_variance: the steps' noise variance is per element and comes with each step
            (``step_noise`` of :meth:`advance`: a learned-variance DDPM, docs/MATH.md §15).

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
        generator: ImageStreams,
        trace: bool = False,
        learned_variance: bool = False,
    ) -> None:
        self.plan = plan
        self.settings = settings
        self.kinds = step_kinds(plan, settings["uq_every"], settings["mc_samples"], settings["skip"])
        self.restarted = {s.origin for s in plan if s.origin != s.index}
        self.split_variance = learned_variance or has_sampler_noise(plan)
        # A Monte Carlo step then needs only the next moments and Var[ε]: one op, one pass over the
        # samples (ops.mc_moment_step), instead of the moments of ε written out and read back.
        self.one_pass_monte_carlo = (
            settings["covariance"] == "mc" and settings["eps_variance"] == "total" and not self.split_variance
        )
        self.moment_dtype = moment_dtype
        self.generator = generator
        self.trace: list[dict[str, Any]] | None = [] if trace else None
        self.monte_carlo_calls = 0
        self.mean = self.var = self.aleatoric = self.received = None

    def start(self, x: torch.Tensor) -> None:
        """E[x_T] = x_T, Var[x_T] = 0."""
        self.mean = x.to(self.moment_dtype, copy=True)
        self.var = torch.zeros_like(self.mean)
        self.aleatoric = self._previous_aleatoric = torch.zeros_like(self.mean)
        self.received = torch.zeros_like(self.mean, dtype=torch.bool)
        self._previous: StepRecord | None = None
        self.monte_carlo_calls = 0
        if self.trace is not None:
            self.trace.clear()

    def wants_head(self, index: int) -> bool:
        """Whether step ``index`` needs the head variance at the image sample."""
        kind = self.kinds[index]
        return kind.closed_form or (self.settings["mode"] == "bayesdiff" and kind.uncertain)

    def normals(self, step: AffineStep) -> MonteCarloNormals | None:
        """The standard normals a Monte Carlo ``step`` will use, drawn from the Monte Carlo streams
        (None for a step without Monte Carlo). Draw them outside a compiled or captured step."""
        if not self.kinds[step.index].monte_carlo:
            return None
        return draw_normals(step, self.mean, self.settings["mc_samples"], step.index in self.restarted, self.generator)

    def advance(
        self,
        step: AffineStep,
        timestep,
        prediction: torch.Tensor,
        head_var: torch.Tensor | None,
        head_at: HeadAt,
        normals: MonteCarloNormals | None = None,
        step_noise: torch.Tensor | None = None,
    ) -> None:
        """Move the moments over ``step`` given the model's ``prediction`` at the image sample.

        ``head_var`` is the head's variance there (needed where :meth:`wants_head`); ``head_at``
        maps Monte Carlo samples (S, B, ...) of the step's input to the head's (mean, var) there;
        ``normals`` are :meth:`normals` (drawn here when not given). ``step_noise``: the per-element
        variance of the step's fresh noise where it is learned (added to ``step.c2``). With the normals given, the
        step makes no host synchronisation and no random draw: it compiles with
        ``torch.compile(fullgraph=True)`` (tested) and can be captured in a CUDA graph.
        """
        settings = self.settings
        is_uncertain, monte_carlo, closed_form_var = self.kinds[step.index]
        eps = prediction.to(self.moment_dtype)
        head_var = None if head_var is None else head_var.to(self.moment_dtype)
        previous = self._previous
        restart = step.origin != step.index  # DPM-Solver-2's second stage starts from x_{k-1}
        origin_mean, origin_var = (previous.mean, previous.var) if restart else (self.mean, self.var)

        draws = moments = None
        step_args = dict(a=step.a, b=step.b[-1], c2=step.c2, clamp=settings["clamp"] and step_noise is None)
        if monte_carlo:
            samples = monte_carlo_samples(
                step,
                self.plan[step.origin],
                self.mean,
                self.var,
                previous,
                head_at,
                keep_eps=step.index in self.restarted,
                normals=self.normals(step) if normals is None else normals,
            )
            draws = samples.draws
            self.monte_carlo_calls += 1
        if monte_carlo and self.one_pass_monte_carlo:
            next_mean, next_var, eps_var = ops.mc_moment_step(
                samples.x, samples.eps, samples.head_var, origin_mean, origin_var, **step_args
            )
        else:
            if monte_carlo:
                moments = monte_carlo_moments(
                    step,
                    samples,
                    origin_mean,
                    origin_var,
                    previous,
                    eps_variance=settings["eps_variance"],
                    covariance=settings["covariance"],
                )
            else:
                moments = closed_form_moments(step, eps, head_var if closed_form_var else None, previous)
            next_mean, next_var = ops.moment_step(origin_mean, origin_var, moments.mean, moments.var, moments.cov, **step_args)
            eps_var = moments.var
        if step_noise is not None:
            step_noise = step_noise.to(self.moment_dtype)
            next_var = with_step_noise(next_var, step_noise, settings["clamp"])
        next_aleatoric = self.aleatoric
        if self.split_variance:
            origin_aleatoric = self._previous_aleatoric if restart else self.aleatoric
            next_aleatoric = aleatoric_step(
                step, origin_mean, origin_var, origin_aleatoric, moments, next_var, settings["clamp"], step_noise
            )

        self.received = self.received | (origin_var > 0)
        if eps_var is not None:
            self.received = self.received | (eps_var > 0)
        if step.c2 > 0:
            self.received = torch.ones_like(self.received)
        if step_noise is not None:
            self.received = self.received | (step_noise > 0)
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

    def clamped(self) -> torch.Tensor:
        """Per image (B,), the elements whose variance estimate is ≤ 0 although variance entered them:
        the negative estimates a clamp turned into exact zeros (or, with ``clamp=False``, would)."""
        return ((self.var <= 0) & self.received).flatten(1).sum(dim=1)

    def image_prediction(self, step: AffineStep, prediction: torch.Tensor, head_var: torch.Tensor | None) -> torch.Tensor:
        """The prediction the image path steps with: the model's, or in ``mode='bayesdiff'`` at an
        uncertainty step a draw from N(prediction, γ²) (the paper's sampled trajectory)."""
        if not (self.settings["mode"] == "bayesdiff" and self.kinds[step.index].uncertain):
            return prediction
        eps = prediction.to(self.moment_dtype)
        drawn = self.generator.randn((), eps)
        return (eps + head_var.to(self.moment_dtype).sqrt() * drawn).to(prediction.dtype)
