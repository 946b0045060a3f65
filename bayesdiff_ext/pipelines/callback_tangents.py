"""The linearised estimator followed step by step inside a pipeline's own loop (UncertaintyCallback).

:class:`~bayesdiff_ext.sampler.linearised.LinearisedSampler` carries M weight directions v_m as
forward-mode tangents of one whole trajectory. A step-end callback sees the same trajectory one
step at a time, so it carries the tangents by the chain rule instead (docs/MATH.md §14.5): with
dx_m the tangent of x_t,

    dε_m = ∂ε/∂x · dx_m + ∂ε/∂θ · v_m     (one ``torch.func.jvp`` at the pipeline's own model input),
    dx_m ← scheduler.step(dε_m, t, dx_m)   (a copy of the pipeline's scheduler, run on tangents only).

A deterministic scheduler's step is linear in (sample, model output, its stored history), so the
copy, fed only tangents from its first step, maps them exactly as the derivative of the stock step —
multistep schedulers included (PNDM's PLMS, DPM-Solver++ 2M, UniPC): their history is kept in the
copy. What makes a step non-linear is refused: noise drawn in the step (checked: the copy must map
zero to zero), clipping and thresholding. Var[x_0] ≈ mean_m dx_m(0)², the linearised estimator's.
"""

from __future__ import annotations

import copy
import inspect

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from bayesdiff_ext.denoiser import Denoiser, stepped_prediction
from bayesdiff_ext.numerics import accumulation_dtype
from bayesdiff_ext.posterior.draws import image_weight_deviations
from bayesdiff_ext.posterior.perturbation import perturbed_head
from bayesdiff_ext.sampler.linearised import DEFAULT_TANGENTS
from bayesdiff_ext.sampler.model_call import scaled_model_input
from bayesdiff_ext.sampler.scheduler_loop import generator_device
from bayesdiff_ext.sampler.schedulers import describe
from bayesdiff_ext.sampler.settings import UncertaintySettings
from bayesdiff_ext.validation import nonlinear_scheduler_settings

__all__ = ["StepTangents"]


class StepTangents:
    """M weight-direction tangents of x_t, advanced at each step of a pipeline's loop.

    Args:
        posterior: the posterior on the denoiser's head (``head``, ``spec``, ``model``).
        settings (`UncertaintySettings`): the linearised estimator's (``samples``, ``draws``, ``chunk_size``,
            ``shared_draws`` and ``weight_seed``: the same directions for every image, or each image's own).
        scheduler: the pipeline's scheduler after its first step; a copy is reset to its first step.
        x_start (`torch.Tensor`): the pipeline's first model input for the B images, (B, ...): its shape
            and device give the tangents' (kept in float32 or better whatever the model's dtype).
        generator: the pipeline's generator (each image's own directions come from its ``'weights'``
            stream, as :class:`~bayesdiff_ext.sampler.linearised.LinearisedSampler` draws them).
    """

    def __init__(self, posterior, settings: UncertaintySettings, scheduler, x_start: torch.Tensor, generator) -> None:
        nonlinear = nonlinear_scheduler_settings(scheduler.config)
        if nonlinear:
            setting, effect = next(iter(nonlinear.items()))
            raise ValueError(f"the scheduler has {setting}=True, which {effect}: its step is not linear in the tangents")
        self.posterior = posterior
        self.denoiser = Denoiser(posterior.model)
        self.per_pass = settings.chunk_size or DEFAULT_TANGENTS
        self.scheduler = _reset(scheduler)
        batch = x_start.shape[0]
        self.directions = image_weight_deviations(
            posterior, settings.draws, settings.samples, generator, batch, generator_device(generator, x_start.device),
            settings.weight_seed, 0,
        ).to(x_start.device)
        dtype = accumulation_dtype(x_start)
        self.tangents = torch.zeros((settings.samples, *x_start.shape), dtype=dtype, device=x_start.device)
        _check_linear(self.scheduler, self.tangents.flatten(0, 1))
        self.passes = 0

    def advance(self, x_in: torch.Tensor, timestep, kwargs, guidance) -> None:
        """One step: ``x_in`` is the pipeline's model input for the B images (after
        ``scale_model_input``), ``kwargs``/``guidance`` its conditioning as the callback reads it."""
        samples = self.tangents.shape[0]
        scheduler = self.scheduler
        tangents_in = scaled_model_input(scheduler, self.tangents.flatten(0, 1), timestep).view_as(self.tangents)
        tangents_in = tangents_in.to(x_in.dtype)  # a jvp's tangent has its primal's dtype
        head, spec = self.posterior.head, self.posterior.spec

        def prediction(x, deviation):
            with perturbed_head(head, spec, deviation):
                if guidance is None:
                    out = self.denoiser(x, timestep, kwargs)
                else:
                    out = guidance.forward(self.denoiser, None, x, timestep, kwargs, want_head=False)[0]
            return stepped_prediction(out, x)

        def tangent(tangent_in, direction):
            return torch.func.jvp(prediction, (x_in, torch.zeros_like(direction)), (tangent_in, direction))[1]

        parts = []
        with sdpa_kernel(SDPBackend.MATH):
            for first in range(0, samples, self.per_pass):
                chunk = slice(first, first + self.per_pass)
                parts.append(torch.func.vmap(tangent)(tangents_in[chunk], self.directions[chunk]))
                self.passes += 1
        eps_tangents = torch.cat(parts).flatten(0, 1)
        stepped = scheduler.step(eps_tangents.to(self.tangents.dtype), timestep, self.tangents.flatten(0, 1))
        self.tangents = stepped.prev_sample.view_as(self.tangents)

    @property
    def variance(self) -> torch.Tensor:
        """mean_m dx_m², (B, ...) in the tangents' dtype (float64 accumulation)."""
        return self.tangents.to(torch.float64).square().mean(dim=0).to(self.tangents.dtype)


def _reset(scheduler):
    """A copy of ``scheduler`` at its first step.

    Its timesteps set again by ``num_inference_steps`` where that gives the same ones (every state,
    a multistep history included, is reset); else, for a scheduler whose steps are single-output
    affine maps of (x_t, ε_t) (:mod:`~bayesdiff_ext.sampler.schedulers`, e.g. Flux's flow matching
    with its custom sigmas and shift), whose only state is the step index, that index rewound.
    """
    fresh = copy.deepcopy(scheduler)
    try:
        fresh.set_timesteps(scheduler.num_inference_steps, device=scheduler.timesteps.device)
        if torch.equal(fresh.timesteps, scheduler.timesteps):
            return fresh
    except (ValueError, TypeError, AttributeError):
        pass
    try:
        stateless = all(step.origin == step.index for step in describe(scheduler).steps())
    except ValueError:
        stateless = False
    if not stateless or not hasattr(scheduler, "_step_index"):
        raise ValueError(
            f"the pipeline set {type(scheduler).__name__}'s timesteps otherwise than by num_inference_steps (custom "
            "timesteps, sigmas or shift) and its steps keep a history: the callback's tangents cannot restart it; "
            "run BayesDiffPipeline"
        )
    fresh = copy.deepcopy(scheduler)
    fresh._step_index = None
    return fresh


def _check_linear(scheduler, like: torch.Tensor) -> None:
    """A copy of ``scheduler`` at its first step must map (zero output, zero sample) to zero: a step that
    draws noise does not."""
    probe = copy.deepcopy(scheduler)
    takes_generator = "generator" in inspect.signature(probe.step).parameters
    kwargs = {"generator": torch.Generator(like.device).manual_seed(0)} if takes_generator else {}
    timestep = probe.timesteps[0]
    zero = scaled_model_input(probe, torch.zeros_like(like), timestep)
    if probe.step(zero, timestep, zero, **kwargs).prev_sample.abs().max() > 0:
        raise ValueError(
            f"{type(scheduler).__name__} draws noise in its step (or adds a constant): the linearised estimator "
            "of a callback follows deterministic steps; run BayesDiffPipeline for a stochastic sampler"
        )
