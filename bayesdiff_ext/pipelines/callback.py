"""UncertaintyCallback: BayesDiff moments tracked alongside a stock pipeline's own denoising loop."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from diffusers.callbacks import PipelineCallback

from bayesdiff_ext import latent
from bayesdiff_ext.denoiser import Denoiser, model_prediction, stepped_prediction
from bayesdiff_ext.guidance import ClassifierFreeGuidance, check_guidance_variance, combine, split_branches
from bayesdiff_ext.sampler.engine import StepEngine, check_settings
from bayesdiff_ext.numerics import accumulation_dtype, per_image_sum
from bayesdiff_ext.sampler.model_call import ModelCall, head_moments
from bayesdiff_ext.sampler.randomness import independent_generator
from bayesdiff_ext.sampler.schedulers import describe

__all__ = ["UncertaintyCallback"]


class UncertaintyCallback(PipelineCallback):
    """Pass as ``callback_on_step_end`` to a StableDiffusionPipeline-like pipeline to track its moments.

    ``pipe(..., callback_on_step_end=cb)`` — the pipeline picks up ``cb.tensor_inputs``
    (``["latents"]``), also inside ``MultiPipelineCallbacks``. After the call,
    ``cb.mean``, ``cb.variance`` (Var[z_0], ≥ 0) and ``cb.scores`` hold the latent moments, and
    ``cb.pixel_moments(pipe.vae)`` decodes Gaussian draws of z_0 for a pixel map.

    What it can do: it follows the pipeline's own loop step by step with the same moment
    recurrence as :class:`~bayesdiff_ext.BayesDiffSampler` (``mode='deterministic'``), including
    classifier-free guidance with the exact variance (``guidance_variance``), Skip (``uq_every``,
    ``skip``) and the closed form only (``mc_samples=0``). It reads the pipeline's UNet call of each
    step (its input, conditioning, output and the head's input φ) through forward hooks, so the
    mean path and the closed-form head variance cost nothing extra.

    What it cannot do: change the images (it returns the callback tensors untouched, so the images
    are exactly the stock pipeline's); see x_T or the step's ε other than through those hooks;
    save UNet calls — its Monte Carlo passes (S samples, 2·S·B rows with guidance) are extra UNet
    calls it makes itself at every uncertainty step. It supports the sampler's schedulers with
    one UNet call per step and an unscaled model input (DDIM, DDPM, first-order DPM-Solver; not
    DPM-Solver-2's two-stage steps, nor the Euler family, whose model input is scaled by a σ the
    scheduler has already moved past when the callback runs), needs ``eta`` to be the one given
    to the pipeline, and rejects ``guidance_rescale``.

    One callback serves one pipeline call: the hooks are attached when it is created and removed
    after the last step, or by :meth:`close` (also on leaving a ``with`` block) if the run stops
    early. ``generator`` seeds the Monte Carlo draws (without being consumed); passing the
    pipeline's own generator reproduces :class:`~bayesdiff_ext.BayesDiffPipeline`'s moments when
    the scheduler draws no step noise (DDIM with η = 0), since both then seed from the same state.
    """

    tensor_inputs = ["latents"]

    def __init__(
        self,
        posterior,
        *,
        eta: float = 0.0,
        uq_every: int = 1,
        mc_samples: int = 10,
        covariance: str = "mc",
        eps_variance: str = "total",
        skip: str = "all",
        clamp: bool = True,
        guidance_variance: str = "exact",
        generator: torch.Generator | list[torch.Generator] | None = None,
        return_trace: bool = False,
    ) -> None:
        super().__init__()
        self.settings = dict(
            eta=float(eta),
            uq_every=uq_every,
            mc_samples=mc_samples,
            covariance=covariance,
            eps_variance=eps_variance,
            clamp=bool(clamp),
            mode="deterministic",
            skip=skip,
            guidance_variance=guidance_variance,
        )
        check_settings(self.settings)
        check_guidance_variance(guidance_variance)
        self.posterior = posterior
        self.generator = generator
        self.mean: torch.Tensor | None = None
        self.variance: torch.Tensor | None = None
        self.trace: list[dict[str, Any]] | None = [] if return_trace else None
        self.extra_unet_calls = 0
        self._recorder = _UNetCallRecorder(posterior)

    # ------------------------------------------------------------------ results
    @property
    def scores(self) -> torch.Tensor:
        """Per-image sum of the latent variance (BayesDiff's score), (B,)."""
        if self.variance is None:
            raise RuntimeError("no step has been tracked yet: pass the callback to a pipeline call first")
        return per_image_sum(self.variance)

    def pixel_moments(
        self, vae, *, samples: int = 16, batch_size: int = 8, generator=None
    ) -> latent.PixelMoments:
        """Pixel mean and variance from ``samples`` decoded Gaussian draws of z_0 per image."""
        if self.variance is None:
            raise RuntimeError("no step has been tracked yet: pass the callback to a pipeline call first")
        return latent.pixel_moments(
            vae, self.mean, self.variance, samples=samples, batch_size=batch_size, generator=generator
        )

    # ------------------------------------------------------------------ lifecycle
    def close(self) -> None:
        """Remove the hooks from the UNet (idempotent)."""
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
            call = self._recorder.take()
            batch = callback_kwargs["latents"].shape[0]
            if step_index == 0:
                self._start(pipeline, call, batch)
            self._step(pipeline, step_index, timestep, call, batch)
        except BaseException:
            self.close()  # the pipeline stops here: leave its UNet without our hooks
            raise
        if step_index == len(self._engine.plan) - 1:
            self.close()
        return callback_kwargs

    def _start(self, pipeline, call: _UNetCall, batch: int) -> None:
        if getattr(pipeline, "guidance_rescale", 0.0):
            raise ValueError(
                "guidance_rescale > 0 rescales ε non-linearly; UncertaintyCallback cannot follow it"
            )
        description = describe(pipeline.scheduler, self.settings["eta"])
        if description.scales_model_input:
            raise ValueError(
                f"{description.name} scales the model input by its current σ, and a step-end callback runs "
                "after the scheduler has moved to the next one (its model input is not x_T either): "
                "use BayesDiffSampler for this scheduler"
            )
        plan = description.steps()
        restarts = [s.index for s in plan if s.origin != s.index]
        if restarts:
            raise ValueError(
                f"{type(pipeline.scheduler).__name__} has two-stage steps (at {restarts}); "
                "UncertaintyCallback follows one UNet call per step: use solver_order=1, "
                "or BayesDiffSampler/BayesDiffPipeline"
            )
        self._model_call = ModelCall(self._recorder.unet, pipeline.scheduler, self.posterior)
        x_start = call.sample[:batch]
        dtype = accumulation_dtype(x_start)
        generator = independent_generator(self.generator, x_start.device)
        self._engine = StepEngine(
            plan, self.settings, moment_dtype=dtype, generator=generator, trace=self.trace is not None
        )
        self._engine.start(x_start)
        self._publish()

    def _step(self, pipeline, index: int, timestep, call: _UNetCall, batch: int) -> None:
        guidance, kwargs, out = None, call.kwargs, call.output
        if call.sample.shape[0] == 2 * batch:
            uncond, cond = split_branches(call.kwargs, batch)
            guidance = ClassifierFreeGuidance(
                float(pipeline.guidance_scale), uncond, self.settings["guidance_variance"]
            )
            kwargs, out = guidance.branch_kwargs(cond), combine(*call.output.chunk(2), guidance.scale)
        elif call.sample.shape[0] != batch:
            raise ValueError(f"the pipeline's UNet call had {call.sample.shape[0]} rows for {batch} latents")
        engine = self._engine
        step = engine.plan[index]
        head_var = head_moments(self.posterior, call.phi, guidance)[1] if engine.kinds[index].closed_form else None

        def head_at(samples):
            with self._recorder.paused():
                return self._model_call.head_at(samples, timestep, kwargs, engine.moment_dtype, guidance)

        calls = engine.monte_carlo_calls
        engine.advance(step, timestep, stepped_prediction(out, self.mean), head_var, head_at)
        self.extra_unet_calls += engine.monte_carlo_calls - calls
        self._publish()

    def _publish(self) -> None:
        """The engine's moments (and trace) as this callback's results."""
        self.mean, self.variance = self._engine.mean, self._engine.var
        if self.trace is not None:
            self.trace[:] = self._engine.trace


@dataclass
class _UNetCall:
    """One recorded UNet call of the pipeline: model input, conditioning, output, the head's input φ."""

    sample: torch.Tensor
    kwargs: dict[str, Any]
    output: torch.Tensor
    phi: torch.Tensor


class _UNetCallRecorder:
    """Forward hooks on the posterior's model (the UNet) and head that keep the pipeline's latest call."""

    def __init__(self, posterior) -> None:
        self.unet = posterior.model
        self._sample_argument = Denoiser(self.unet).sample_argument
        self._capture = posterior.capture()
        self._head_input = self._capture.__enter__()
        self._handle = self.unet.register_forward_hook(self._record, with_kwargs=True)
        self._paused = False
        self._open = True
        self._latest: _UNetCall | None = None
        self._calls = 0

    def _record(self, module, args, kwargs, output) -> None:
        if self._paused:
            return
        kwargs = dict(kwargs)
        sample = args[0] if args else kwargs.pop(self._sample_argument)
        if len(args) < 2:  # the callback steps with the scheduler's timestep it is handed
            kwargs.pop("timestep")
        kwargs.pop("return_dict", None)
        self._latest = _UNetCall(sample, kwargs, model_prediction(output), self._head_input.phi)
        self._calls += 1

    def take(self) -> _UNetCall:
        """The pipeline's UNet call since the previous step; exactly one is expected."""
        if not self._open:
            raise RuntimeError(
                "this UncertaintyCallback has finished (or was closed); create one per pipeline call"
            )
        if self._calls != 1 or self._latest is None:
            raise RuntimeError(
                f"expected one UNet call of the pipeline per step, saw {self._calls}: UncertaintyCallback "
                "follows pipelines that call the posterior's UNet once per scheduler step (for a pipeline with a "
                "copy of that UNet, build the callback with posterior.for_model(pipe.unet))"
            )
        call, self._latest, self._calls = self._latest, None, 0
        return call

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """The callback's own UNet calls are not the pipeline's: do not record them."""
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
