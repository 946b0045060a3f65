"""UncertaintyCallback: BayesDiff moments tracked alongside a stock pipeline's own denoising loop."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from diffusers.callbacks import PipelineCallback

from bayesdiff_ext import latent, ops
from bayesdiff_ext.guidance import (
    ClassifierFreeGuidance,
    check_guidance_variance,
    combine,
    guided_head_moments,
    split_branches,
)
from bayesdiff_ext.numerics import accumulation_dtype, per_image_sum
from bayesdiff_ext.sampler.coefficients import step_coefficients
from bayesdiff_ext.sampler.eps_moments import closed_form_moments, monte_carlo_moments
from bayesdiff_ext.sampler.randomness import independent_generator
from bayesdiff_ext.sampler.sampler import BayesDiffSampler, _check_settings, step_kinds

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
    one UNet call per step (DDIM, DDPM, first-order DPM-Solver; not DPM-Solver-2's two-stage
    steps), needs ``eta`` to be the one given to the pipeline, and rejects ``guidance_rescale``.

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
        _check_settings(self.settings)
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
            self._step(pipeline, step_index, call, batch)
        except BaseException:
            self.close()  # the pipeline stops here: leave its UNet without our hooks
            raise
        if step_index == len(self._plan) - 1:
            self.close()
        return callback_kwargs

    def _start(self, pipeline, call: _UNetCall, batch: int) -> None:
        if getattr(pipeline, "guidance_rescale", 0.0):
            raise ValueError(
                "guidance_rescale > 0 rescales ε non-linearly; UncertaintyCallback cannot follow it"
            )
        self._plan = step_coefficients(pipeline.scheduler, self.settings["eta"])
        restarts = [s.index for s in self._plan if s.origin != s.index]
        if restarts:
            raise ValueError(
                f"{type(pipeline.scheduler).__name__} has two-stage steps (at {restarts}); "
                "UncertaintyCallback follows one UNet call per step: use solver_order=1, "
                "or BayesDiffSampler/BayesDiffPipeline"
            )
        self._kinds = step_kinds(
            self._plan, self.settings["uq_every"], self.settings["mc_samples"], self.settings["skip"]
        )
        self._sampler = BayesDiffSampler(self._recorder.unet, pipeline.scheduler, self.posterior)
        x_start = call.sample[:batch]
        self._dtype = accumulation_dtype(x_start)
        self._mc_generator = independent_generator(self.generator, x_start.device)
        self.mean = x_start.to(self._dtype, copy=True)
        self.variance = torch.zeros_like(self.mean)
        if self.trace is not None:
            self.trace.clear()

    def _step(self, pipeline, index: int, call: _UNetCall, batch: int) -> None:
        settings, posterior = self.settings, self.posterior
        step = self._plan[index]
        guidance, kwargs, out = None, call.kwargs, call.output
        if call.sample.shape[0] == 2 * batch:
            uncond, cond = split_branches(call.kwargs, batch)
            guidance = ClassifierFreeGuidance(
                float(pipeline.guidance_scale), uncond, settings["guidance_variance"]
            )
            kwargs, out = guidance.branch_kwargs(cond), combine(*call.output.chunk(2), guidance.scale)
        elif call.sample.shape[0] != batch:
            raise ValueError(f"the pipeline's UNet call had {call.sample.shape[0]} rows for {batch} latents")
        is_uncertain, monte_carlo, closed_form = self._kinds[index]

        if monte_carlo:

            def head_at(samples):
                with self._recorder.paused():
                    return self._sampler.head_at_samples(
                        samples, call.timestep, kwargs, self._dtype, guidance
                    )

            moments, _ = monte_carlo_moments(
                step,
                step,
                self.mean,
                self.variance,
                None,
                head_at,
                samples=settings["mc_samples"],
                keep_eps=False,
                eps_variance=settings["eps_variance"],
                covariance=settings["covariance"],
                generator=self._mc_generator,
            )
            self.extra_unet_calls += 1
        else:
            head_var = None
            if closed_form:
                if guidance is None:
                    head_var = posterior.predict(call.phi)[1]
                else:
                    head_var = guided_head_moments(posterior, call.phi, guidance.scale, guidance.variance)[1]
                head_var = head_var.to(self._dtype)
            eps = out[:, : posterior.eps_channels].to(self._dtype)
            moments = closed_form_moments(step, eps, head_var, None)
        self.mean, self.variance = ops.moment_step(
            self.mean,
            self.variance,
            moments.mean,
            moments.var,
            moments.cov,
            a=step.a,
            b=step.b[-1],
            c2=step.c2,
            clamp=settings["clamp"],
        )
        if self.trace is not None:
            self.trace.append(
                dict(
                    index=index,
                    timestep=int(call.timestep),
                    uncertainty_step=is_uncertain,
                    monte_carlo=monte_carlo,
                    mean=self.mean,
                    variance=self.variance,
                    variance_sum=per_image_sum(self.variance),
                )
            )


@dataclass
class _UNetCall:
    """One recorded UNet call of the pipeline: model input, timestep, kwargs, output, the head's input φ."""

    sample: torch.Tensor
    timestep: Any
    kwargs: dict[str, Any]
    output: torch.Tensor
    phi: torch.Tensor


class _UNetCallRecorder:
    """Forward hooks on the posterior's model (the UNet) and head that keep the pipeline's latest call."""

    def __init__(self, posterior) -> None:
        self.unet = posterior.model
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
        sample = args[0] if args else kwargs.pop("sample")
        timestep = args[1] if len(args) > 1 else kwargs.pop("timestep")
        kwargs.pop("return_dict", None)
        out = output.sample if hasattr(output, "sample") else output[0]
        self._latest = _UNetCall(sample, timestep, kwargs, out, self._head_input.phi)
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
                "follows pipelines that call the posterior's UNet once per scheduler step"
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
