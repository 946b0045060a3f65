"""BayesDiffSampler: the scheduler's own loop with E[x_t] and Var[x_t] alongside (docs/MATH.md §2)."""

from __future__ import annotations

import time
from typing import Any, NamedTuple

import torch
from diffusers import DDIMScheduler
from diffusers.utils.torch_utils import randn_tensor
from tqdm.auto import tqdm

from bayesdiff_ext import ops
from bayesdiff_ext.denoiser import repeat_batch
from bayesdiff_ext.guidance import ClassifierFreeGuidance
from bayesdiff_ext.numerics import accumulation_dtype, per_image_sum
from bayesdiff_ext.sampler.coefficients import AffineStep, check_supported, step_coefficients
from bayesdiff_ext.sampler.eps_moments import StepRecord, closed_form_moments, monte_carlo_moments
from bayesdiff_ext.sampler.randomness import independent_generator
from bayesdiff_ext.sampler.results import BayesDiffOutput
from bayesdiff_ext.sampler.variance_split import aleatoric_step, has_sampler_noise

__all__ = ["BayesDiffSampler"]

_CHOICES = {
    "covariance": ("mc", "none"),
    "eps_variance": ("total", "bayesdiff"),
    "mode": ("deterministic", "bayesdiff"),
    "skip": ("all", "covariance"),
}


class BayesDiffSampler:
    """Sample with a diffusers UNet and scheduler, and carry per-pixel moments of x_t alongside.

    ``posterior`` is a :class:`~bayesdiff_ext.LastLayerLaplace` on the UNet's head; the sampler
    uses only its ``capture()``, ``predict(phi)`` and ``eps_channels``. Supported schedulers:
    ``DDIMScheduler`` (any η), ``DDPMScheduler`` (fixed variances) and
    ``DPMSolverSinglestepScheduler`` (orders 1–2, 'dpmsolver'/'dpmsolver++'), all with
    ``clip_sample=False`` and no thresholding; ε-, v- or x̂_0-prediction.
    """

    def __init__(self, unet, scheduler, posterior) -> None:
        check_supported(scheduler)
        self.unet = unet
        self.scheduler = scheduler
        self.posterior = posterior

    @torch.no_grad()
    def sample(
        self,
        batch_size: int | None = None,
        noise: torch.Tensor | None = None,
        num_inference_steps: int = 50,
        generator: torch.Generator | list[torch.Generator] | None = None,
        eta: float = 0.0,
        uq_every: int = 1,
        mc_samples: int = 10,
        covariance: str = "mc",
        eps_variance: str = "total",
        clamp: bool = True,
        mode: str = "deterministic",
        skip: str = "all",
        return_trace: bool = False,
        unet_kwargs: dict[str, Any] | None = None,
        guidance: ClassifierFreeGuidance | None = None,
        progress: bool = True,
    ) -> BayesDiffOutput:
        """Run the scheduler loop from x_T and propagate E[x_t], Var[x_t] to x_0.

        * The image path is exactly ``x = scheduler.step(unet(x, t).sample, t, x, ...)`` from x_T =
          ``noise`` or ``randn_tensor`` with ``generator`` (as ``DDIMPipeline``/``DDPMPipeline`` draw
          it), so in ``mode='deterministic'`` the images are bit-identical to the plain loop. The
          Monte Carlo draws use their own stream, seeded from ``generator`` without consuming it.
        * Moments start at E[x_T] = x_T, Var[x_T] = 0 and follow each step's affine form
          (:mod:`~bayesdiff_ext.sampler.coefficients`) through ``ops.moment_step``.
        * Uncertainty steps (BayesDiff-Skip): every ``uq_every``-th solver step from the first (a
          DPM-Solver-2 step counts once, both of its UNet calls belong to it). There, ``mc_samples``
          = S draws x^i ~ N(E[x_t], Var[x_t]) (antithetic pairs, see ``randomness.antithetic_randn``)
          go through the UNet in one batched call and the
          head's closed-form (m^i, γ²^i) give E[ε], Var[ε] and Cov(x_t, ε) (``ops.mc_moments``).
          At the first step Var[x_T] = 0, the draws would all be x_T, and the closed form at x_T
          (γ², no covariance) takes their place: no Monte Carlo call (except for a DPM-Solver-2
          first stage, whose draws its second stage reuses).
          ``eps_variance='bayesdiff'`` keeps only mean γ² (drops the spread of the m^i),
          ``covariance='none'`` drops the covariance. ``mc_samples=0`` (with ``covariance='none'``)
          replaces the Monte Carlo by γ² at the image sample: no extra UNet calls.
        * Between uncertainty steps, E ← a·E + b·ε with ε the UNet output at the image sample
          (already computed, so free), and Var ← a²·Var + c² (c² the scheduler's own noise variance,
          DDPM and DDIM η > 0), i.e. the ε variance and covariance are skipped; ``skip='covariance'``
          skips only the covariance and adds b²·γ² at the image sample (closed form, no extra
          UNet calls).
        * DPM-Solver-2 second stages restart from the sample x_s of the first stage: the Monte
          Carlo carries the samples x_s^i through the intermediate point with ε drawn from the head
          (mean + noise), evaluates the UNet there in a second batched call, and the covariance
          used is Cov(x_s, ε_eff) with ε_eff the stage's combination of both outputs.
        * ``mode='bayesdiff'``: at uncertainty steps the image step uses ε ~ N(out, γ²) at the
          image sample (the paper's sampled trajectory); images then differ from the plain loop
          but are reproducible with ``generator``.
        * ``clamp`` clamps Var at 0 after every step; the returned variance is ≥ 0 always.
        * Var[x_0] is also split into ``aleatoric_variance`` (the sampler's own noise c², DDPM and
          DDIM η > 0; zero for deterministic samplers) and ``epistemic_variance`` (the weight
          posterior), which add up to ``variance`` (see :mod:`~bayesdiff_ext.sampler.variance_split`).
        * ``unet_kwargs`` go to every UNet call; tensors with the batch as leading dimension are
          tiled for the Monte Carlo batch. Moments are float32 (float64 for a float64 UNet).
        * ``guidance`` (:class:`~bayesdiff_ext.guidance.ClassifierFreeGuidance`): every UNet call
          runs both branches, [uncond; cond], in one batch (2·S·B rows for the Monte Carlo), ε is
          combined as the diffusers pipelines combine it, and the head's variance is that of the
          guided ε (exact, or BayesDiff's independent-branch formula). ``unet_kwargs`` are then the
          conditional branch's.
        * ``return_trace``: one dict per scheduler step with ``index``, ``timestep``,
          ``uncertainty_step``, ``monte_carlo`` and the moments after the step (``mean``,
          ``variance`` tensors and the per-image ``variance_sum``).
        """
        settings = dict(
            num_inference_steps=num_inference_steps,
            eta=float(eta),
            uq_every=uq_every,
            mc_samples=mc_samples,
            covariance=covariance,
            eps_variance=eps_variance,
            clamp=bool(clamp),
            mode=mode,
            skip=skip,
        )
        _check_settings(settings)
        started = time.perf_counter()
        scheduler, posterior = self.scheduler, self.posterior
        kwargs = dict(unet_kwargs or {})
        if guidance is not None:
            kwargs = guidance.branch_kwargs(kwargs)
        x = self._initial_noise(batch_size, noise, generator)
        batch, channels = x.shape[0], x.shape[1]
        if posterior.eps_channels != channels:
            raise ValueError(
                f"posterior.eps_channels = {posterior.eps_channels} but the UNet's samples have {channels} channels"
            )
        moment_dtype = accumulation_dtype(x)
        mc_generator = independent_generator(generator, x.device)

        scheduler.set_timesteps(num_inference_steps)
        plan = step_coefficients(scheduler, eta)
        kinds = step_kinds(plan, uq_every, mc_samples, skip)
        restarted = {s.origin for s in plan if s.origin != s.index}
        step_kwargs = {"eta": eta} if isinstance(scheduler, DDIMScheduler) else {}

        mean = x.to(moment_dtype, copy=True)
        var = torch.zeros_like(mean)
        split_variance = has_sampler_noise(plan)
        aleatoric = previous_aleatoric = torch.zeros_like(mean)
        previous: StepRecord | None = None
        trace: list[dict[str, Any]] | None = [] if return_trace else None
        image_calls = mc_calls = 0

        for step in tqdm(plan, desc="BayesDiff", disable=not progress):
            t = scheduler.timesteps[step.index]
            is_uncertain, monte_carlo, closed_form_var = kinds[step.index]
            out, _, head_var = self._forward(
                scheduler.scale_model_input(x, t),
                t,
                kwargs,
                want_head=closed_form_var or (mode == "bayesdiff" and is_uncertain),
                guidance=guidance,
            )
            image_calls += 1
            eps = out[:, :channels].to(moment_dtype)
            head_var = None if head_var is None else head_var.to(moment_dtype)
            restart = step.origin != step.index  # DPM-Solver-2's second stage starts from x_{k-1}
            origin_mean, origin_var = (previous.mean, previous.var) if restart else (mean, var)

            draws = None
            if monte_carlo:
                moments, draws = monte_carlo_moments(
                    step,
                    plan[step.origin],
                    mean,
                    var,
                    previous,
                    lambda samples: self.head_at_samples(samples, t, kwargs, moment_dtype, guidance),
                    samples=mc_samples,
                    keep_eps=step.index in restarted,
                    eps_variance=eps_variance,
                    covariance=covariance,
                    generator=mc_generator,
                )
                mc_calls += 1
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
                clamp=clamp,
            )
            if split_variance:
                next_aleatoric = aleatoric_step(
                    step,
                    origin_mean,
                    origin_var,
                    previous_aleatoric if restart else aleatoric,
                    moments,
                    next_var,
                    clamp,
                )
            else:
                next_aleatoric = aleatoric

            # A learned-variance head's extra channels are not ε; no supported step consumes them.
            model_output = out[:, :channels]
            if mode == "bayesdiff" and is_uncertain:
                drawn = torch.randn(eps.shape, generator=mc_generator, device=eps.device, dtype=moment_dtype)
                model_output = (eps + head_var.sqrt() * drawn).to(out.dtype)
            x = scheduler.step(model_output, t, x, generator=generator, **step_kwargs).prev_sample

            previous = StepRecord(mean, var, eps, head_var, draws)
            previous_aleatoric = aleatoric
            mean, var, aleatoric = next_mean, next_var, next_aleatoric
            if trace is not None:
                trace.append(
                    dict(
                        index=step.index,
                        timestep=int(t),
                        uncertainty_step=is_uncertain,
                        monte_carlo=monte_carlo,
                        mean=mean,
                        variance=var,
                        variance_sum=per_image_sum(var),
                        aleatoric_variance=aleatoric,
                    )
                )

        if x.device.type == "cuda":
            torch.cuda.synchronize(x.device)
        settings.update(
            scheduler=type(scheduler).__name__,
            timesteps=scheduler.timesteps.tolist(),
            posterior_structure=getattr(posterior, "structure", None),
            guidance=None if guidance is None else dict(scale=guidance.scale, variance=guidance.variance),
        )
        timings = dict(
            total_s=time.perf_counter() - started,
            image_unet_calls=image_calls,
            mc_unet_calls=mc_calls,
            mc_unet_batch=mc_samples * batch * (1 if guidance is None else 2),
        )
        return BayesDiffOutput(
            images=x,
            variance=var.clamp_min(0),
            mean=mean,
            trace=trace,
            settings=settings,
            timings=timings,
            aleatoric_variance=aleatoric,
        )

    def _initial_noise(self, batch_size, noise, generator) -> torch.Tensor:
        """x_T: ``noise`` as given, or drawn exactly as DDIMPipeline/DDPMPipeline draw it."""
        config = self.unet.config
        size = config.sample_size
        shape = (config.in_channels, size, size) if isinstance(size, int) else (config.in_channels, *size)
        if noise is None:
            if batch_size is None:
                raise ValueError("pass batch_size or the initial noise x_T as noise")
            return randn_tensor(
                (batch_size, *shape), generator=generator, device=self.unet.device, dtype=self.unet.dtype
            )
        if noise.dim() != 4 or noise.shape[1] != config.in_channels:
            raise ValueError(
                f"noise must have shape (B, {config.in_channels}, H, W) for this UNet, got {tuple(noise.shape)}"
            )
        if batch_size is not None and batch_size != noise.shape[0]:
            raise ValueError(f"batch_size={batch_size} but noise holds {noise.shape[0]} images")
        return noise.to(device=self.unet.device, dtype=self.unet.dtype)

    def _forward(self, x, t, kwargs, want_head: bool, guidance: ClassifierFreeGuidance | None = None):
        """One UNet call (both guidance branches in it): its output and, with ``want_head``, the
        head's closed-form (mean, var) at φ (at φ_cfg under guidance)."""
        if guidance is not None:
            return guidance.forward(self.unet, self.posterior, x, t, kwargs, want_head)
        if not want_head:
            return self.unet(x, t, **kwargs).sample, None, None
        with self.posterior.capture() as cap:
            out = self.unet(x, t, **kwargs).sample
        return (out, *self.posterior.predict(cap.phi))

    def head_at_samples(
        self, x_samples, t, kwargs, moment_dtype, guidance: ClassifierFreeGuidance | None = None
    ):
        """Head (mean, var) at S samples of x, (S, B, ...), through one UNet call on S·B (2·S·B guided) images.

        ``kwargs`` are for the B images (with guidance: ``guidance.branch_kwargs(...)``); they are
        tiled here. Also used by :class:`~bayesdiff_ext.UncertaintyCallback` for its Monte Carlo.
        """
        repeats, batch = x_samples.shape[:2]
        flat = self.scheduler.scale_model_input(x_samples.flatten(0, 1).to(self.unet.dtype), t)
        tiled = repeat_batch(kwargs, batch, repeats)
        _, head_mean, head_var = self._forward(flat, t, tiled, want_head=True, guidance=guidance)
        return (
            head_mean.to(moment_dtype).unflatten(0, (repeats, batch)),
            head_var.to(moment_dtype).unflatten(0, (repeats, batch)),
        )


def _check_settings(settings: dict[str, Any]) -> None:
    for name, allowed in _CHOICES.items():
        if settings[name] not in allowed:
            raise ValueError(f"{name} must be one of {allowed}, got {settings[name]!r}")
    uq_every, mc_samples = settings["uq_every"], settings["mc_samples"]
    if not isinstance(uq_every, int) or uq_every < 1:
        raise ValueError(
            f"uq_every must be an integer >= 1 (1 = uncertainty at every step), got {uq_every!r}"
        )
    if not isinstance(mc_samples, int) or mc_samples < 0:
        raise ValueError(f"mc_samples must be an integer >= 0, got {mc_samples!r}")
    if mc_samples == 0 and settings["covariance"] == "mc":
        raise ValueError(
            "covariance='mc' needs mc_samples >= 1; pass covariance='none' for the closed form only"
        )


class StepKind(NamedTuple):
    """What one scheduler step does for the variance."""

    uncertain: bool  # an uncertainty step (BayesDiff-Skip)
    monte_carlo: bool  # E[ε], Var[ε], Cov(x, ε) from S draws through the UNet
    closed_form: bool  # the head variance γ² at the image sample, no extra UNet call


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
