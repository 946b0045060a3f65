"""UncertaintyCallback: BayesDiff moments tracked alongside a stock pipeline's own denoising loop."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from diffusers.callbacks import PipelineCallback

from bayesdiff_ext import latent
from bayesdiff_ext.denoiser import Denoiser, model_prediction, stepped_prediction
from bayesdiff_ext.guidance import ClassifierFreeGuidance, check_guidance_variance, combine, split_branches
from bayesdiff_ext.numerics import accumulation_dtype, per_image_sum
from bayesdiff_ext.pipelines.base import BayesDiffPipeline
from bayesdiff_ext.pipelines.callback_tangents import StepTangents
from bayesdiff_ext.sampler import BayesDiffOutput
from bayesdiff_ext.sampler.engine import StepEngine
from bayesdiff_ext.sampler.learned_variance import aleatoric_source, uses_learned_variance
from bayesdiff_ext.sampler.model_call import ModelCall, head_moments
from bayesdiff_ext.randomness import ImageStreams
from bayesdiff_ext.sampler.schedulers import MULTISTEP, describe
from bayesdiff_ext.sampler.settings import UncertaintySettings, resolve_settings

__all__ = ["UncertaintyCallback"]


class UncertaintyCallback(PipelineCallback):
    """Pass as ``callback_on_step_end`` to a pipeline to track the moments of its own loop.

    ``pipe(..., callback_on_step_end=cb)`` — the pipeline picks up ``cb.tensor_inputs``
    (``["latents"]``), also inside ``MultiPipelineCallbacks``. After the call, ``cb.output`` is a
    :class:`~bayesdiff_ext.BayesDiffOutput` (the final latents as ``images``, ``mean``, ``variance``
    (Var[z_0], ≥ 0, in the pipeline's latent layout), ``scores``, the aleatoric/epistemic split,
    ``trace``, ``settings``, ``timings``); ``cb.mean``, ``cb.variance`` and ``cb.scores`` are the same
    moments, and ``cb.pixel_moments(pipe)`` decodes Gaussian draws of z_0 through the pipeline's own
    VAE path for a pixel map.

    What it can do: it follows the pipeline's own loop step by step with the same moment
    recurrence as :class:`~bayesdiff_ext.BayesDiffSampler` (``mode='deterministic'``), including
    classifier-free guidance with the exact variance (``guidance_variance``), Skip (``uq_every``,
    ``skip``) and the closed form only (``covariance='none'``). Its settings are the recurrence's
    (``preset='paper'`` when none are given, or the recurrence arguments of
    :func:`~bayesdiff_ext.sampler.settings.resolve_settings`) or, with ``estimator='linearised'``
    (``samples``, ``draws``, ``chunk_size``), the linearised estimator's: M weight directions carried
    as tangents of x_t through each step's model call (``torch.func.jvp``) and through a copy of the
    pipeline's scheduler (:mod:`~bayesdiff_ext.pipelines.callback_tangents`), for any deterministic
    scheduler, multistep ones included (SD 1.5's PNDM, PixArt-Σ's DPM-Solver++ 2M); its variance is
    the wrapper's ``estimator='linearised'``. A callback sees only the pipeline's one trajectory, so
    it cannot run trajectory Monte Carlo, the estimator of Var[x_0 | x_T] the other front doors
    default to (docs/MATH.md §2.3). It reads the denoiser calls of each step
    (their input, conditioning, output and the head's input φ) through forward hooks, so the mean
    path and the closed-form head variance cost nothing extra. Pipelines followed (with their
    default schedulers): ``StableDiffusionPipeline`` (its default PNDM is multistep: the linearised
    estimator, or the recurrence with DDIM/Euler swapped in), ``StableDiffusionXLPipeline`` (Euler: the Monte Carlo
    samples are scaled for the step's σ from the scheduler's table, not from its current state),
    ``StableDiffusion3Pipeline`` and ``FluxPipeline`` (flow matching; Flux's guidance-distilled single
    forward, and its ``true_cfg_scale`` as two forwards per step — pass that scale as
    ``guidance_scale``, the pipeline does not expose it to callbacks). ``PixArtSigmaPipeline`` takes
    only the older ``callback=``: pass ``cb.legacy(pipe)`` and ``guidance_scale`` (its default
    DPM-Solver++ 2M is multistep: the linearised estimator). ``DiTPipeline`` takes no callback:
    use :class:`~bayesdiff_ext.BayesDiffPipeline`.

    What it cannot do: change the images (it returns the callback tensors untouched, so the images
    are exactly the stock pipeline's); save model calls — its Monte Carlo passes (S samples, 2·S·B
    rows with guidance) are extra calls it makes itself at every uncertainty step, and the linearised
    estimator's tangent passes (M directions, vmapped, at every step). The recurrence refuses
    DPM-Solver-2's two-stage steps and multistep schedulers; the linearised estimator refuses steps
    that draw noise and ``eta > 0``; both refuse ``guidance_rescale > 0`` and SD3's
    ``skip_guidance_layers``; the recurrence needs ``eta`` to be the one given to the pipeline. At the first
    step of an Euler scheduler it recovers x_T from the model input x_T/√(σ²+1) (one rounding).

    One callback serves one pipeline call: the hooks are attached when it is created and removed
    after the last step, or by :meth:`close` (also on leaving a ``with`` block) if the run stops
    early. ``generator`` seeds the Monte Carlo draws and the linearised estimator's weight directions
    (without being consumed); passing the pipeline's own generator reproduces :class:`~bayesdiff_ext.BayesDiffPipeline`'s moments when
    the scheduler draws no step noise, since both then seed from the same state.

    Args:
        posterior (`LastLayerLaplace`): the posterior on the pipeline's denoiser head
            (``posterior.for_model(pipe.unet)`` for a copy of the model it was fitted on).
        eta (`float`, defaults to 0.0): the DDIM η given to the pipeline.
        preset (`str`, *optional*): ``'paper'`` (the default here; the only preset a callback follows).
        settings (`UncertaintySettings`, *optional*): recurrence or linearised settings instead of ``preset``.
        guidance_variance (`str`, defaults to ``"exact"``): ``"exact"`` (head variance at the guided
            feature) or ``"independent"`` (BayesDiff's independent branches).
        guidance_scale (`float`, *optional*): the pipeline's guidance scale, where the pipeline does
            not hand it to callbacks (PixArt-Σ's ``callback=``, Flux's ``true_cfg_scale``).
        generator (`torch.Generator` or a list of B of them, *optional*): seeds the Monte Carlo draws and
            the linearised estimator's weight directions.
        return_trace (`bool`, defaults to `False`): keep the per-step moments in ``output.trace`` (the
            recurrence).
        **uncertainty: the recurrence's arguments (``uq_every``, ``mc_samples``, ``covariance``, ``skip``,
            ``eps_variance``, ``clamp``), or ``estimator='linearised'`` with ``samples`` (M directions),
            ``draws`` and ``chunk_size`` (directions per tangent pass).

    Returns:
        After the pipeline call, ``cb.output`` is a [`BayesDiffOutput`]: ``images`` (the final latents),
        ``mean`` and ``variance`` `(B, C, h, w)` in the pipeline's latent layout (packed `(B, L, C)` for
        Flux), ``scores`` `(B,)`, the aleatoric/epistemic split, ``settings``, ``timings``.
    """

    tensor_inputs = ["latents"]

    def __init__(
        self,
        posterior,
        *,
        eta: float = 0.0,
        preset: str | None = None,
        settings: UncertaintySettings | None = None,
        guidance_variance: str = "exact",
        guidance_scale: float | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        return_trace: bool = False,
        **uncertainty: Any,
    ) -> None:
        super().__init__()
        if preset is None and settings is None and not uncertainty:
            preset = "paper"  # the only preset a callback can follow (see the class docstring)
        resolved = resolve_settings(preset, settings, **uncertainty)
        if resolved.estimator == "trajectories" or resolved.mode == "bayesdiff":
            raise ValueError(
                f"UncertaintyCallback follows the pipeline's own loop and leaves its images alone, so it carries the "
                f"moment recurrence with mode='deterministic' or the linearised estimator (got "
                f"estimator={resolved.estimator!r}{'' if resolved.mode is None else f', mode={resolved.mode!r}'}); "
                "for trajectory Monte Carlo use BayesDiffPipeline or BayesDiffSampler"
            )
        if resolved.estimator == "linearised" and (eta or return_trace):
            raise ValueError(
                "the linearised estimator of a callback follows deterministic steps (eta=0) and keeps no trace "
                f"(return_trace records the recurrence's steps); got eta={eta}, return_trace={return_trace}"
            )
        check_guidance_variance(guidance_variance)
        self._resolved = resolved
        self.settings = dict(resolved.describe(), eta=float(eta), guidance_variance=guidance_variance)
        self.posterior = posterior
        self.generator = generator
        self.guidance_scale = guidance_scale
        self.mean: torch.Tensor | None = None
        self.variance: torch.Tensor | None = None
        self.trace: list[dict[str, Any]] | None = [] if return_trace else None
        self.extra_unet_calls = 0
        self._latents: torch.Tensor | None = None
        self._tangents: StepTangents | None = None
        self._steps = 0
        self._started = time.perf_counter()
        self._recorder = _ModelCallRecorder(posterior)

    # ------------------------------------------------------------------ results
    def _tracked(self) -> None:
        if self.variance is None:
            raise RuntimeError("no step has been tracked yet: pass the callback to a pipeline call first")

    @property
    def scores(self) -> torch.Tensor:
        """Per-image sum of the latent variance (BayesDiff's score), (B,)."""
        self._tracked()
        return per_image_sum(self.variance)

    @property
    def output(self) -> BayesDiffOutput:
        """The moments as every front door returns them (``images``: the pipeline's latents after the last step seen)."""
        self._tracked()
        if self._tangents is not None:
            timings = dict(image_unet_calls=self._steps, tangent_passes=self._tangents.passes)
            aleatoric = None
        else:
            engine = self._engine
            timings = dict(image_unet_calls=len(engine.plan), mc_unet_calls=engine.monte_carlo_calls)
            aleatoric = engine.aleatoric
        return BayesDiffOutput(
            images=self._latents,
            variance=self.variance.clamp_min(0),
            mean=self.mean,
            aleatoric_variance=aleatoric,
            trace=self.trace,
            settings=dict(self.settings),
            timings=dict(total_s=time.perf_counter() - self._started, **timings),
        )

    def pixel_moments(
        self, decoder, *, samples: int = 16, batch_size: int = 8, generator=None, height=None, width=None
    ) -> latent.PixelMoments:
        """Pixel mean and variance from ``samples`` decoded Gaussian draws of z_0 per image.

        ``decoder`` is the pipeline (its own decode path: SD3/Flux ``shift_factor``, Flux's
        unpacking at ``height`` × ``width``, its default size when not given) or a VAE
        (``z / scaling_factor``).
        """
        self._tracked()
        if not isinstance(decoder, torch.nn.Module):
            decoder = BayesDiffPipeline.from_pipe(decoder, self.posterior).decoder(height, width)
        return latent.pixel_moments(
            decoder, self.mean, self.variance, samples=samples, batch_size=batch_size, generator=generator
        )

    def legacy(self, pipeline) -> Callable[[int, Any, torch.Tensor], None]:
        """This callback for ``pipeline``'s older ``callback(step, timestep, latents)`` argument (with
        ``callback_steps=1``), for pipelines without ``callback_on_step_end`` such as PixArt-Σ:
        ``pipe(..., callback=cb.legacy(pipe))``. Such a pipeline does not expose its guidance scale:
        pass it to the callback as ``guidance_scale``."""

        def callback(step: int, timestep, latents: torch.Tensor) -> None:
            self.callback_fn(pipeline, step, timestep, {"latents": latents})

        return callback

    # ------------------------------------------------------------------ lifecycle
    def close(self) -> None:
        """Remove the hooks from the denoiser (idempotent)."""
        self._recorder.close()

    def __enter__(self) -> UncertaintyCallback:
        return self

    def __exit__(self, *exc) -> bool:
        self.close()
        return False

    # ------------------------------------------------------------------ the step
    @torch.no_grad()
    def callback_fn(
        self, pipeline, step_index: int, timestep, callback_kwargs: dict[str, Any]
    ) -> dict[str, Any]:
        if "latents" not in callback_kwargs:
            raise ValueError("UncertaintyCallback needs 'latents' in callback_on_step_end_tensor_inputs")
        try:
            calls = self._recorder.take()
            batch = callback_kwargs["latents"].shape[0]
            if step_index == 0:
                self._start(pipeline, calls[0], batch)
            if self._tangents is not None:
                self._step_tangents(pipeline, timestep, calls, batch, callback_kwargs["latents"])
            else:
                self._step(pipeline, step_index, timestep, calls, batch)
        except BaseException:
            self.close()  # the pipeline stops here: leave its denoiser without our hooks
            raise
        self._latents = callback_kwargs["latents"]
        if step_index == self._steps - 1:
            self.close()
        return callback_kwargs

    def _start(self, pipeline, call: _ModelCall, batch: int) -> None:
        if getattr(pipeline, "guidance_rescale", 0.0):
            raise ValueError(
                "guidance_rescale > 0 rescales ε non-linearly; UncertaintyCallback cannot follow it"
            )
        if uses_learned_variance(pipeline.scheduler):
            raise ValueError(
                f"{type(pipeline.scheduler).__name__} has variance_type={pipeline.scheduler.config.variance_type!r}: "
                "UncertaintyCallback does not follow a learned step variance; use BayesDiffSampler"
            )
        if self._resolved.estimator == "linearised":
            self._steps = len(pipeline.scheduler.timesteps)
            self._tangents = StepTangents(self.posterior, self._resolved, pipeline.scheduler, call.sample[:batch], self.generator)
            self.settings["scheduler"] = type(pipeline.scheduler).__name__
            return
        try:
            self._description = description = describe(pipeline.scheduler, self.settings["eta"])
        except ValueError as error:
            if type(pipeline.scheduler).__name__ in MULTISTEP:  # the trajectories it names need the wrapper
                raise ValueError(
                    f"{error}. A callback sees the one stock trajectory, so it cannot run trajectory Monte Carlo: "
                    "pass UncertaintyCallback(..., estimator='linearised'), which follows any deterministic "
                    "scheduler's own steps, or run BayesDiffPipeline (trajectory Monte Carlo, the default preset)"
                ) from None
            raise
        plan = description.steps()
        self._steps = len(plan)
        restarts = [s.index for s in plan if s.origin != s.index]
        if restarts:
            raise ValueError(
                f"{type(pipeline.scheduler).__name__} has two-stage steps (at {restarts}); "
                "UncertaintyCallback follows one model call per step: use solver_order=1, "
                "or BayesDiffSampler/BayesDiffPipeline"
            )
        self._model_call = ModelCall(self._recorder.model, pipeline.scheduler, self.posterior)
        x_start = description.sample_from_model_input(call.sample[:batch], 0)
        dtype = accumulation_dtype(x_start)
        generator = ImageStreams.derived(self.generator, batch, x_start.device, "monte_carlo")
        self._engine = StepEngine(
            plan, self.settings, moment_dtype=dtype, generator=generator, trace=self.trace is not None
        )
        self._engine.start(x_start)
        self.settings["aleatoric_source"] = aleatoric_source(
            pipeline.scheduler, self._recorder.model, self._engine.split_variance
        )
        self._publish()

    def _guidance(self, pipeline, calls: list[_ModelCall], batch: int):
        """(guidance, conditional kwargs, combined output, φ stacked [uncond; cond] or plain) of a step's calls."""
        if any("skip_layers" in call.kwargs for call in calls):
            raise ValueError(
                "skip_guidance_layers adds a third, layer-skipped forward to the guidance; UncertaintyCallback "
                "does not follow it: leave skip_guidance_layers None"
            )
        variance = self.settings["guidance_variance"]
        rows = [call.sample.shape[0] for call in calls]
        if rows == [batch]:
            call = calls[0]
            return None, call.kwargs, call.output, call.phi
        if rows == [2 * batch]:
            call = calls[0]
            uncond, cond = split_branches(call.kwargs, batch)
            scale = self.guidance_scale if self.guidance_scale is not None else _guidance_scale(pipeline)
            guidance = ClassifierFreeGuidance(scale, uncond, variance)
            return guidance, guidance.branch_kwargs(cond), combine(*call.output.chunk(2), scale), call.phi
        if rows == [batch, batch]:  # Flux's true CFG: the conditional forward, then the unconditional one
            if self.guidance_scale is None:
                raise ValueError(
                    f"{type(pipeline).__name__} ran two forwards per step (true classifier-free guidance) but does "
                    "not hand its scale to callbacks: pass UncertaintyCallback(..., guidance_scale=true_cfg_scale)"
                )
            cond, uncond = calls
            guidance = ClassifierFreeGuidance(self.guidance_scale, uncond.kwargs, variance, layout="separate")
            out = combine(uncond.output, cond.output, guidance.scale)
            return guidance, guidance.branch_kwargs(cond.kwargs), out, torch.cat([uncond.phi, cond.phi])
        raise ValueError(f"the pipeline's denoiser calls of this step had {rows} rows for {batch} latents")

    def _step(self, pipeline, index: int, timestep, calls: list[_ModelCall], batch: int) -> None:
        guidance, kwargs, out, phi = self._guidance(pipeline, calls, batch)
        engine = self._engine
        step = engine.plan[index]
        head_var = head_moments(self.posterior, phi, guidance)[1] if engine.kinds[index].closed_form else None

        def head_at(samples):
            with self._recorder.paused():
                return self._model_call.head_at(samples, timestep, kwargs, engine.moment_dtype, guidance, index=index)

        before = engine.monte_carlo_calls
        engine.advance(step, timestep, stepped_prediction(out, self.mean), head_var, head_at)
        self.extra_unet_calls += engine.monte_carlo_calls - before
        self._publish()

    def _step_tangents(self, pipeline, timestep, calls: list[_ModelCall], batch: int, latents: torch.Tensor) -> None:
        """The linearised estimator's step: the tangents through this step's model input and the scheduler copy."""
        guidance, kwargs, _, _ = self._guidance(pipeline, calls, batch)
        with self._recorder.paused():
            self._tangents.advance(calls[0].sample[:batch], timestep, kwargs, guidance)
        self.mean, self.variance = latents.to(accumulation_dtype(latents)), self._tangents.variance

    def _publish(self) -> None:
        """The engine's moments (and trace) as this callback's results."""
        self.mean, self.variance = self._engine.mean, self._engine.var
        if self.trace is not None:
            self.trace[:] = self._engine.trace


def _guidance_scale(pipeline) -> float:
    scale = getattr(pipeline, "guidance_scale", None)
    if scale is None:
        raise ValueError(
            f"{type(pipeline).__name__} runs guidance but does not expose its scale to callbacks: pass "
            "UncertaintyCallback(..., guidance_scale=...)"
        )
    return float(scale)


@dataclass
class _ModelCall:
    """One recorded denoiser call of the pipeline: model input, conditioning, output, the head's input φ."""

    sample: torch.Tensor
    kwargs: dict[str, Any]
    output: torch.Tensor
    phi: torch.Tensor


class _ModelCallRecorder:
    """Forward hooks on the posterior's model (the UNet or transformer) and head that keep the
    pipeline's calls since the previous step."""

    def __init__(self, posterior) -> None:
        self.model = posterior.model
        self._sample_argument = Denoiser(self.model).sample_argument
        self._capture = posterior.capture()
        self._head_input = self._capture.__enter__()
        self._handle = self.model.register_forward_hook(self._record, with_kwargs=True)
        self._paused = False
        self._open = True
        self._calls: list[_ModelCall] = []

    def _record(self, module, args, kwargs, output) -> None:
        if self._paused:
            return
        kwargs = dict(kwargs)
        sample = args[0] if args else kwargs.pop(self._sample_argument)
        if len(args) < 2:  # the callback steps with the scheduler's timestep it is handed
            kwargs.pop("timestep")
        kwargs.pop("return_dict", None)
        self._calls.append(_ModelCall(sample, kwargs, model_prediction(output), self._head_input.phi))

    def take(self) -> list[_ModelCall]:
        """The pipeline's denoiser calls since the previous step; at least one is expected."""
        if not self._open:
            raise RuntimeError(
                "this UncertaintyCallback has finished (or was closed); create one per pipeline call"
            )
        if not self._calls:
            raise RuntimeError(
                "the pipeline did not call the posterior's model in this step: UncertaintyCallback follows "
                "pipelines that call it at every scheduler step"
            )
        calls, self._calls = self._calls, []
        return calls

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """The callback's own model calls are not the pipeline's: do not record them."""
        self._paused = True
        try:
            yield
        finally:
            self._paused = False

    def close(self) -> None:
        if self._open:
            self._handle.remove()
            self._capture.__exit__(None, None, None)
            self._open = False
