"""BayesDiffSampler: the scheduler's own loop with E[x_t] and Var[x_t] alongside (docs/MATH.md §2)."""

from __future__ import annotations

import time
from typing import Any

import torch
from tqdm.auto import tqdm

from bayesdiff_ext.guidance import ClassifierFreeGuidance
from bayesdiff_ext.numerics import accumulation_dtype
from bayesdiff_ext.randomness import ImageStreams
from bayesdiff_ext.sampler.engine import StepEngine
from bayesdiff_ext.sampler.initial_noise import initial_noise
from bayesdiff_ext.sampler.learned_variance import (
    aleatoric_source,
    check_learned_variance,
    learned_step_variance,
    uses_learned_variance,
)
from bayesdiff_ext.sampler.linearised import LinearisedSampler
from bayesdiff_ext.sampler.model_call import ModelCall
from bayesdiff_ext.sampler.results import BayesDiffOutput
from bayesdiff_ext.sampler.schedulers import describe
from bayesdiff_ext.sampler.settings import UncertaintySettings, resolve_settings
from bayesdiff_ext.sampler.trajectories import TrajectorySampler
from bayesdiff_ext.validation import check_count, check_number

__all__ = ["BayesDiffSampler"]


class BayesDiffSampler:
    """Sample with a diffusers denoiser and scheduler, and carry per-element moments of x_t alongside.

    Args:
        model (`nn.Module`): a diffusers UNet (``UNet2DModel``, ``UNet2DConditionModel``) or
            transformer (``DiTTransformer2DModel``, ``PixArtTransformer2DModel``,
            ``SD3Transformer2DModel``, ``FluxTransformer2DModel``), called through
            :class:`~bayesdiff_ext.denoiser.Denoiser`.
        scheduler: any diffusers scheduler for the trajectory estimators (they run its own
            ``step``); for the moment recurrence (``preset='paper'``) one of those described in
            :mod:`bayesdiff_ext.sampler.schedulers`: ``DDIMScheduler`` (any η), ``DDPMScheduler``
            (fixed or learned variances), ``DPMSolverSinglestepScheduler`` (orders 1–2),
            ``EulerDiscreteScheduler``, ``EulerAncestralDiscreteScheduler`` and
            ``FlowMatchEulerDiscreteScheduler`` (deterministic or ``stochastic_sampling``); no
            ``clip_sample`` or thresholding.
        posterior: a :class:`~bayesdiff_ext.LastLayerLaplace` on the model's head (the sampler uses
            its ``capture()`` and ``predict(phi)``).
    """

    def __init__(self, model, scheduler, posterior) -> None:
        self.model = model
        self.scheduler = scheduler
        self.model_call = ModelCall(model, scheduler, posterior)
        self.posterior = self.model_call.posterior

    @torch.no_grad()
    def sample(
        self,
        batch_size: int | None = None,
        noise: torch.Tensor | None = None,
        num_inference_steps: int = 50,
        generator: torch.Generator | list[torch.Generator] | None = None,
        eta: float = 0.0,
        *,
        preset: str | None = None,
        settings: UncertaintySettings | None = None,
        return_trace: bool = False,
        model_kwargs: dict[str, Any] | None = None,
        guidance: ClassifierFreeGuidance | None = None,
        progress: bool = True,
        unet_kwargs: dict[str, Any] | None = None,
        scheduler_kwargs: dict[str, Any] | None = None,
        set_timesteps_kwargs: dict[str, Any] | None = None,
        **uncertainty: Any,
    ) -> BayesDiffOutput:
        """Sample from x_T and estimate the per-pixel Var[x_0 | x_T] with the estimator the settings name.

        The uncertainty comes from ``preset`` (``'accurate'``, ``'fast'``, ``'paper'``), ``settings``
        (an :class:`~bayesdiff_ext.sampler.settings.UncertaintySettings`) and the keyword arguments
        ``uncertainty`` (``estimator``; ``samples``, ``draws``, ``centre``, ``noise_samples``,
        ``chunk_size`` for the trajectory estimators; ``uq_every``, ``mc_samples``, ``covariance``,
        ``eps_variance``, ``skip``, ``mode``, ``clamp`` for the recurrence), resolved by
        :func:`~bayesdiff_ext.sampler.settings.resolve_settings`: explicit arguments override the
        preset; recurrence arguments alone select the recurrence; nothing selects
        :data:`~bayesdiff_ext.sampler.settings.DEFAULT_PRESET`. ``'trajectories'`` and
        ``'linearised'`` run :class:`~bayesdiff_ext.sampler.trajectories.TrajectorySampler` and
        :class:`~bayesdiff_ext.sampler.linearised.LinearisedSampler` (any diffusers scheduler); the
        rest of this docstring is the recurrence (the schedulers of :mod:`~bayesdiff_ext.sampler.schedulers`):

        * The image path is exactly ``x = scheduler.step(model(scale_model_input(x, t), t), t, x, ...)``
          from x_T = ``noise``·``scheduler.init_noise_sigma`` (where the scheduler has one, as the
          pipelines scale it), ``noise`` being the unit-variance draw, given or drawn with
          ``generator`` as ``randn_tensor`` draws it (as ``DDIMPipeline``/``DDPMPipeline`` do), so in
          ``mode='deterministic'`` the images are bit-identical to the plain loop. The Monte Carlo
          draws use their own stream, seeded from ``generator`` without consuming it.
        * Moments start at E[x_T] = x_T, Var[x_T] = 0 and follow each step's affine form
          (:mod:`~bayesdiff_ext.sampler.schedulers`) through ``ops.moment_step``, in the
          scheduler's own space: the model sees the scaled input, the moments are of the sample.
        * Uncertainty steps (BayesDiff-Skip): every ``uq_every``-th solver step from the first (a
          DPM-Solver-2 step counts once, both of its model calls belong to it). There, ``mc_samples``
          = S draws x^i ~ N(E[x_t], Var[x_t]) (antithetic pairs, see ``randomness.antithetic_randn``)
          go through the model in one batched call and the head's closed-form (m^i, γ²^i) give
          E[ε], Var[ε] and Cov(x_t, ε) (``ops.mc_moments``; with ``covariance='mc'``,
          ``eps_variance='total'`` and no aleatoric split, ``ops.mc_moment_step`` takes the step in
          the same pass).
          At the first step Var[x_T] = 0, the draws would all be x_T, and the closed form at x_T
          (γ², no covariance) takes their place: no Monte Carlo call (except for a DPM-Solver-2
          first stage, whose draws its second stage reuses).
          ``eps_variance='bayesdiff'`` keeps only mean γ² (drops the spread of the m^i),
          ``covariance='none'`` drops the covariance. ``mc_samples=0`` (with ``covariance='none'``)
          replaces the Monte Carlo by γ² at the image sample: no extra model calls.
        * Between uncertainty steps, E ← a·E + b·ε with ε the model output at the image sample
          (already computed, so free), and Var ← a²·Var + c² (c² the scheduler's own noise
          variance), i.e. the ε variance and covariance are skipped; ``skip='covariance'``
          skips only the covariance and adds b²·γ² at the image sample (closed form, no extra
          model calls).
        * DPM-Solver-2 second stages restart from the sample x_s of the first stage: the Monte
          Carlo carries the samples x_s^i through the intermediate point with ε drawn from the head
          (mean + noise), evaluates the model there in a second batched call, and the covariance
          used is Cov(x_s, ε_eff) with ε_eff the stage's combination of both outputs.
        * ``mode='bayesdiff'``: at uncertainty steps the image step uses ε ~ N(out, γ²) at the
          image sample (the paper's sampled trajectory); images then differ from the plain loop
          but are reproducible with ``generator``.
        * ``clamp`` clamps Var at 0 after every step; the returned variance is ≥ 0 always.
        * A learned variance (``DDPMScheduler(variance_type='learned_range'|'learned')`` with a model of
          2·C output channels): each step's c² is the per-element variance the scheduler computes from
          the model's variance channels at the image sample (docs/MATH.md §15), and the image path
          steps with the full output, as ``DDPMPipeline`` does. Not with ``guidance``.
          ``settings['aleatoric_source']`` says where a run's aleatoric part comes from (the learned
          variance, the scheduler's fixed noise, or none) and whether the model's variance went unused.
        * Var[x_0] is also split into ``aleatoric_variance`` (the sampler's own noise c²: DDPM,
          DDIM η > 0, Euler-Ancestral, stochastic flow matching, Euler's churn; zero for
          deterministic samplers) and ``epistemic_variance`` (the weight posterior), which add up
          to ``variance`` (see :mod:`~bayesdiff_ext.sampler.variance_split`).
        * ``model_kwargs`` (``unet_kwargs`` is the same argument under its former name) go to every
          model call; tensors with the batch as leading dimension (nested ``added_cond_kwargs``
          included) are tiled for the Monte Carlo batch. Moments are float32 (float64 for a
          float64 model).
        * ``guidance`` (:class:`~bayesdiff_ext.guidance.ClassifierFreeGuidance`): every model call
          runs both branches, [uncond; cond], in one batch (2·S·B rows for the Monte Carlo), ε is
          combined as the diffusers pipelines combine it, and the head's variance is that of the
          guided ε (exact, or BayesDiff's independent-branch formula). ``model_kwargs`` are then the
          conditional branch's.
        * ``scheduler_kwargs``: further keyword arguments of ``scheduler.step`` the scheduler's
          description follows (Euler: ``s_churn``, ``s_tmin``, ``s_tmax``, ``s_noise``; DDIM's is
          ``eta``). ``set_timesteps_kwargs`` go to ``scheduler.set_timesteps`` (e.g. Flux's ``mu``).
        * ``return_trace``: one dict per scheduler step with ``index``, ``timestep``,
          ``uncertainty_step``, ``monte_carlo`` and the moments after the step (``mean``,
          ``variance`` tensors and the per-image ``variance_sum``).

        Args:
            batch_size (`int`, *optional*): images B; needed when ``noise`` is not given.
            noise (`torch.Tensor` of shape `(B, C, H, W)`, *optional*): the unit-variance x_T draw
                (latents in the model's layout); drawn from ``generator`` when omitted.
            num_inference_steps (`int`, defaults to 50): the scheduler's steps.
            generator (`torch.Generator` or a list of B of them, *optional*): a list gives image k
                its own stream (``randomness.image_generators(seed, indices)``), so results do not
                depend on the batch size.
            eta (`float`, defaults to 0.0): DDIM's η (the sampler's own noise for η > 0).
            preset (`str`, *optional*): ``'accurate'``, ``'fast'`` or ``'paper'``.
            settings (`UncertaintySettings`, *optional*): a resolved settings object instead of
                ``preset`` and the keyword arguments.
            return_trace (`bool`, defaults to `False`): keep the per-step moments (recurrence).
            model_kwargs (`dict`, *optional*): extra keyword arguments of every model call.
            guidance (`ClassifierFreeGuidance`, *optional*): classifier-free guidance.
            progress (`bool`, defaults to `True`): show a progress bar.
            unet_kwargs (`dict`, *optional*): the former name of ``model_kwargs``.
            scheduler_kwargs (`dict`, *optional*): extra keyword arguments of ``scheduler.step``.
            set_timesteps_kwargs (`dict`, *optional*): extra keyword arguments of
                ``scheduler.set_timesteps``.
            **uncertainty: the estimator's arguments listed above.

        Returns:
            [`BayesDiffOutput`]: ``images`` `(B, C, H, W)` (the stock loop's), ``mean`` and
            ``variance`` `(B, C, H, W)` (Var[x_0 | x_T] ≥ 0 in the sampler's space, float32 or
            better), ``aleatoric_variance`` and ``epistemic_variance`` `(B, C, H, W)` adding up to
            ``variance``, ``scores`` `(B,)` (the per-image sum), ``clamped_pixels``, ``settings``,
            ``timings`` and, with ``return_trace``, ``trace``.
        """
        resolved = resolve_settings(preset, settings, **uncertainty)
        num_inference_steps = check_count("num_inference_steps", num_inference_steps)
        eta = check_number("eta", eta, minimum=0.0)
        if resolved.estimator != "recurrence":
            if return_trace:
                raise ValueError(f"return_trace records the moment recurrence's steps; estimator={resolved.estimator!r} has none")
            estimator = TrajectorySampler if resolved.estimator == "trajectories" else LinearisedSampler
            return estimator(self.model, self.scheduler, self.posterior).sample(
                batch_size, noise, num_inference_steps, generator, eta, settings=resolved,
                model_kwargs=_conditioning(model_kwargs, unet_kwargs), guidance=guidance,
                scheduler_kwargs=scheduler_kwargs, set_timesteps_kwargs=set_timesteps_kwargs, progress=progress,
            )
        settings = dict(
            resolved.describe(),
            num_inference_steps=num_inference_steps,
            eta=eta,
        )
        description = describe(self.scheduler, settings["eta"], **(scheduler_kwargs or {}))
        started = time.perf_counter()
        scheduler, model_call = self.scheduler, self.model_call
        kwargs = _conditioning(model_kwargs, unet_kwargs)
        if guidance is not None:
            kwargs = guidance.branch_kwargs(kwargs)
        learned_variance = uses_learned_variance(scheduler)
        check_learned_variance(scheduler, self.model, guidance)
        x = self.draw_noise(batch_size, noise, generator)
        moment_dtype = accumulation_dtype(x)
        mc_generator = ImageStreams.derived(generator, x.shape[0], x.device, "monte_carlo")

        scheduler.set_timesteps(num_inference_steps, **(set_timesteps_kwargs or {}))
        if hasattr(scheduler, "init_noise_sigma"):
            x = x * scheduler.init_noise_sigma
        engine = StepEngine(
            description.steps(),
            settings,
            moment_dtype=moment_dtype,
            generator=mc_generator,
            trace=return_trace,
            learned_variance=learned_variance,
        )
        engine.start(x)
        step_kwargs = description.step_kwargs()

        with model_call.capturing():
            for step in tqdm(engine.plan, desc="BayesDiff", disable=not progress):
                t = scheduler.timesteps[step.index]
                out, prediction, head_var = model_call.outputs(
                    x, t, kwargs, want_head=engine.wants_head(step.index), guidance=guidance
                )
                engine.advance(
                    step,
                    t,
                    prediction,
                    head_var,
                    lambda samples: model_call.head_at(samples, t, kwargs, moment_dtype, guidance, index=step.index),
                    step_noise=learned_step_variance(scheduler, t, out, x.shape[1]) if learned_variance else None,
                )
                image_prediction = engine.image_prediction(step, prediction, head_var)
                if learned_variance:  # the scheduler reads its noise variance from the channels after ε
                    image_prediction = torch.cat([image_prediction, out[:, x.shape[1] :]], dim=1)
                x = scheduler.step(image_prediction, t, x, generator=generator, **step_kwargs).prev_sample
                _check_step_index(scheduler, step.index)

        if x.device.type == "cuda":
            torch.cuda.synchronize(x.device)
        settings.update(
            scheduler=type(scheduler).__name__,
            timesteps=scheduler.timesteps.tolist(),
            posterior_structure=getattr(self.posterior, "structure", None),
            guidance=None if guidance is None else dict(scale=guidance.scale, variance=guidance.variance),
            aleatoric_source=aleatoric_source(scheduler, self.model, engine.split_variance),
        )
        timings = dict(
            total_s=time.perf_counter() - started,
            image_unet_calls=len(engine.plan),
            mc_unet_calls=engine.monte_carlo_calls,
            mc_unet_batch=resolved.mc_samples * x.shape[0] * (1 if guidance is None else 2),
            model_forwards_per_image=(len(engine.plan) + engine.monte_carlo_calls * resolved.mc_samples)
            * (1 if guidance is None else 2),
        )
        return BayesDiffOutput(
            images=x,
            variance=engine.var.clamp_min(0),
            mean=engine.mean,
            trace=engine.trace,
            settings=settings,
            timings=timings,
            aleatoric_variance=engine.aleatoric,
            clamped_pixels=engine.clamped(),
        )

    def draw_noise(self, batch_size, noise, generator) -> torch.Tensor:
        """The unit-variance initial noise: ``noise`` as given, or drawn as the pixel pipelines draw it."""
        return initial_noise(self.model_call.denoiser, batch_size, noise, generator)


def _conditioning(model_kwargs, unet_kwargs) -> dict[str, Any]:
    if model_kwargs is not None and unet_kwargs is not None:
        raise ValueError("pass the conditioning as model_kwargs or as unet_kwargs (its former name), not both")
    return dict(model_kwargs if model_kwargs is not None else unet_kwargs or {})


def _check_step_index(scheduler, index: int) -> None:
    """A scheduler that counts its steps must have taken the step the coefficients describe."""
    step_index = getattr(scheduler, "step_index", None)
    if step_index is not None and step_index != index + 1:
        raise RuntimeError(
            f"{type(scheduler).__name__} moved to step {step_index} after step {index}: its timesteps repeat "
            "(it starts at the second index then), so the moments would follow other coefficients"
        )
