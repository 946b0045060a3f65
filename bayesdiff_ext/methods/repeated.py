"""Uncertainty from repeated sampling: the same x_T and sampler noise through several models.

MC dropout (one model, T dropout masks) and deep ensembles (K models) both estimate the epistemic
variance of x_0 as the spread of the samples that different plausible models make from the same
start: every pass starts at the same x_T and, for stochastic samplers, draws the same noise z
(its generator restarts from the same state), so the spread is Var_θ(x_0 | x_T, z), the
model's part alone. Its unbiased sample variance over the passes is ``epistemic_variance``;
the ``aleatoric_variance`` is the sampler's noise c² propagated by the moment recurrence of
:class:`~bayesdiff_ext.BayesDiffSampler` with a zero-variance posterior on the reference model:
with ``mc_samples`` = S > 0 every ``uq_every``-th step carries Var[x_t] through the UNet by Monte
Carlo (its response to x_t contracts or grows the variance: S·B extra images per such step),
with S = 0 it is Var' = a²·Var + c² alone (no extra calls; an upper bound when the UNet
contracts). Deterministic samplers have no c², so no Monte Carlo is run for them and the part
is 0. ``variance`` is the sum of both parts. Every pass is the
sampler's own image path (:class:`~bayesdiff_ext.methods.point.PointPosterior`), so the loop
exists once.
"""

from __future__ import annotations

import abc
import contextlib
import time
from collections.abc import Iterable
from typing import Any

import torch

from bayesdiff_ext.methods.point import PointPosterior
from bayesdiff_ext.randomness import restartable
from bayesdiff_ext.sampler import BayesDiffOutput, BayesDiffSampler
from bayesdiff_ext.sampler.schedulers import step_coefficients
from bayesdiff_ext.sampler.variance_split import has_sampler_noise

__all__ = ["RepeatedSampler"]


class RepeatedSampler(abc.ABC):
    """Sample the same x_T with every pass's model; subclasses say what the passes are."""

    method: str

    def __init__(self, reference_unet, scheduler) -> None:
        self.reference_unet = reference_unet
        self.scheduler = scheduler
        self.eps_channels = PointPosterior(reference_unet).eps_channels

    @abc.abstractmethod
    def passes(self, generator, batch: int) -> Iterable[contextlib.AbstractContextManager]:
        """One context per pass for the B = ``batch`` images drawn from ``generator`` (the run's, not
        consumed); inside it, the pass's UNet is what the context yields."""

    def settings(self) -> dict[str, Any]:
        return {}

    @torch.no_grad()
    def sample(
        self,
        batch_size: int | None = None,
        noise: torch.Tensor | None = None,
        num_inference_steps: int = 50,
        generator: torch.Generator | list[torch.Generator] | None = None,
        eta: float = 0.0,
        unet_kwargs: dict[str, Any] | None = None,
        progress: bool = True,
        uq_every: int = 1,
        mc_samples: int = 0,
    ) -> BayesDiffOutput:
        """``images``: the reference model's sample (the plain loop, bit-identical to it);
        ``mean``: the mean over the passes; ``variance`` = epistemic + aleatoric (see the module)."""
        started = time.perf_counter()
        reference = BayesDiffSampler(self.reference_unet, self.scheduler, PointPosterior(self.reference_unet))
        x_t = reference.draw_noise(batch_size, noise, generator)
        restart = restartable(generator, x_t.device)
        self.scheduler.set_timesteps(num_inference_steps)
        if not has_sampler_noise(step_coefficients(self.scheduler, eta)):
            mc_samples = 0

        def run(unet, samples: int = 0) -> BayesDiffOutput:
            return BayesDiffSampler(unet, self.scheduler, PointPosterior(unet)).sample(
                noise=x_t,
                num_inference_steps=num_inference_steps,
                generator=restart(),
                eta=eta,
                uq_every=uq_every,
                mc_samples=samples,
                covariance="mc" if samples else "none",
                unet_kwargs=unet_kwargs,
                progress=False,
            )

        passes = self.passes(generator, x_t.shape[0])  # before the base run draws from the generator
        base = run(self.reference_unet, mc_samples)
        samples = []
        for context in _progress(passes, progress, self.method):
            with context as unet:
                samples.append(run(unet).images.to(base.variance.dtype))
        if len(samples) < 2:
            raise ValueError(
                f"{self.method} needs at least 2 passes to estimate a variance, got {len(samples)}"
            )
        stacked = torch.stack(samples)
        epistemic = stacked.var(dim=0, unbiased=True)
        settings = dict(
            method=self.method,
            passes=len(samples),
            aleatoric_mc_samples=mc_samples,
            uq_every=uq_every,
            num_inference_steps=num_inference_steps,
            eta=float(eta),
            scheduler=type(self.scheduler).__name__,
            timesteps=base.settings["timesteps"],
            **self.settings(),
        )
        timings = dict(
            total_s=time.perf_counter() - started,
            image_unet_calls=base.timings["image_unet_calls"] * (len(samples) + 1),
            model_forwards_per_image=base.timings["model_forwards_per_image"]
            + len(samples) * base.timings["image_unet_calls"],
            mc_unet_calls=base.timings["mc_unet_calls"],
            mc_unet_batch=base.timings["mc_unet_batch"],
        )
        return BayesDiffOutput(
            images=base.images,
            variance=epistemic + base.variance,
            mean=stacked.mean(dim=0),
            settings=settings,
            timings=timings,
            aleatoric_variance=base.variance,
        )


def _progress(passes, enabled: bool, name: str):
    from tqdm.auto import tqdm

    return tqdm(passes, desc=name, disable=not enabled)
