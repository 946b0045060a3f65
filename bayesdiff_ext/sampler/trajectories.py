"""Trajectory Monte Carlo: Var[x_0 | x_T] from whole trajectories with drawn head weights (docs/MATH.md §2.3).

The quantity the package reports is the spread of the final image over the posterior of the head's
weights and over the sampler's own noise. Its ground truth needs nothing from a scheduler but its
``step``: draw θ ~ q (and fresh sampler noise where the sampler is stochastic), run the scheduler's
own loop from the same x_T with those weights, take the spread. So every diffusers scheduler works —
multistep (DPM-Solver++ 2M, UniPC, PNDM), ancestral, flow matching, ``clip_sample``, thresholding —
and any model the :class:`~bayesdiff_ext.denoiser.Denoiser` calls.

How it runs:

* The returned image is the stock one: the model's own weights and the seeded noise, the same loop
  and the same pixels as the plain pipeline (its own B-row loop, bit-identical).
* The trajectories are copies of the batch (M·B rows and more), sent through the model in chunks of
  whole copies (``chunk_size`` rows at most per model call; each chunk has its own deep copy of the
  scheduler, so multistep state never mixes). Row r's head weights differ by a forward hook
  (:func:`~bayesdiff_ext.posterior.perturbation.perturbed_head`).
* Weight draws per image come from the image's own stream (``'weights'``, one sub-stream per noise
  stream), so each image's result is the same in any batch (:mod:`bayesdiff_ext.randomness`).
* Deterministic samplers (no draw from the generator during the stock loop): one noise stream, the
  stock trajectory is the MAP trajectory, M weight draws. Stochastic samplers: J noise streams
  (``noise_samples``, default M or M/2 pairs), each with its own MAP trajectory and M/J weight draws that share
  its noise, so the law of total variance splits epistemic and aleatoric parts
  (:mod:`~bayesdiff_ext.sampler.trajectory_statistics` says how).
"""

from __future__ import annotations

import copy
import time
from typing import Any

import torch
from tqdm.auto import tqdm

from bayesdiff_ext.denoiser import Denoiser
from bayesdiff_ext.guidance import ClassifierFreeGuidance
from bayesdiff_ext.posterior.draws import check_draws, weight_deviations
from bayesdiff_ext.randomness import Generators, ImageStreams
from bayesdiff_ext.sampler.initial_noise import initial_noise
from bayesdiff_ext.sampler.results import BayesDiffOutput, TrajectoryDraws
from bayesdiff_ext.sampler.scheduler_loop import SchedulerLoop, generator_device, generator_states
from bayesdiff_ext.sampler.trajectory_statistics import CENTRES, trajectory_moments

__all__ = ["TrajectorySampler"]



class TrajectorySampler:
    """Trajectory Monte Carlo with a posterior over a model's head.

    Args:
        model (`nn.Module`): a diffusers UNet or transformer (called through ``Denoiser``).
        scheduler: any diffusers scheduler; the stock loop runs on it, the trajectories on copies.
        posterior: a posterior on the model's head with ``head``, ``spec`` and ``sample(n, generator)``
            (e.g. :class:`~bayesdiff_ext.LastLayerLaplace`); antithetic and Sobol draws also need
            ``sample_from_normal(z)``.
    """

    def __init__(self, model, scheduler, posterior) -> None:
        for needed in ("head", "spec", "sample"):
            if not hasattr(posterior, needed):
                raise TypeError(f"the posterior needs `{needed}` for trajectory Monte Carlo; got {type(posterior).__name__}")
        self.model = model
        self.scheduler = scheduler
        self.posterior = posterior
        self.denoiser = Denoiser(model)

    @torch.no_grad()
    def sample(
        self,
        batch_size: int | None = None,
        noise: torch.Tensor | None = None,
        num_inference_steps: int = 50,
        generator: Generators = None,
        eta: float = 0.0,
        samples: int = 8,
        draws: str = "antithetic",
        centre: str = "map",
        noise_samples: int | None = None,
        chunk_size: int | None = None,
        model_kwargs: dict[str, Any] | None = None,
        guidance: ClassifierFreeGuidance | None = None,
        scheduler_kwargs: dict[str, Any] | None = None,
        set_timesteps_kwargs: dict[str, Any] | None = None,
        progress: bool = True,
        return_draws: bool = False,
    ) -> BayesDiffOutput:
        """Sample B images and the variance of their final images over M weight draws.

        Args:
            batch_size, noise, num_inference_steps, generator, eta: as for
                :meth:`~bayesdiff_ext.BayesDiffSampler.sample` (``eta`` only where ``scheduler.step``
                takes it). A list of per-image generators makes every result independent of the batch.
            samples (`int`): M, the weight draws per image (for a stochastic sampler, in all noise streams).
            draws (`str`): ``'independent'``, ``'antithetic'`` (± pairs, M even) or ``'sobol'``.
            centre (`str`): ``'map'`` (spread around each stream's MAP trajectory, the returned image for a
                deterministic sampler) or ``'mean'`` (around the draws' own mean, unbiased for
                independent draws; needs M/J ≥ 2).
            noise_samples (`int`, *optional*): J noise streams of a stochastic sampler (must divide M; default
                M, or M/2 for antithetic draws or ``centre='mean'``: two draws per stream). A deterministic
                sampler has one.
            chunk_size (`int`, *optional*): rows per model call (default 256), rounded down to whole
                copies of the batch (at least one).
            model_kwargs, guidance, scheduler_kwargs, set_timesteps_kwargs, progress: as for the sampler.
            return_draws (`bool`): keep every trajectory's x_0 and weight deviation in ``draws``.

        Returns:
            :class:`~bayesdiff_ext.BayesDiffOutput`: ``images`` the stock sample, ``variance`` Var[x_0]
            (B, ...) ≥ 0 with its ``aleatoric_variance`` and ``epistemic_variance``, ``mean`` the draws'
            mean, ``timings`` with ``model_forwards_per_image``.
        """
        if centre not in CENTRES:
            raise ValueError(f"centre must be one of {CENTRES}, got {centre!r}")
        check_draws(draws, samples, self.posterior)
        started = time.perf_counter()
        kwargs = dict(model_kwargs or {})
        if guidance is not None:
            kwargs = guidance.branch_kwargs(kwargs)
        x_unit = initial_noise(self.denoiser, batch_size, noise, generator)
        batch = x_unit.shape[0]
        template = copy.deepcopy(self.scheduler)
        loop = SchedulerLoop(self, template, num_inference_steps, eta, kwargs, guidance, scheduler_kwargs, set_timesteps_kwargs)
        draw_device = generator_device(generator, x_unit.device)
        before = generator_states(generator, x_unit.device)

        with tqdm(desc="trajectories", disable=not progress, unit="step") as bar:
            loop.bar = bar
            images = loop.run(self.scheduler, x_unit, generator, copies=1)
            stochastic = not all(map(torch.equal, generator_states(generator, x_unit.device), before))
            streams = _check_streams(samples, noise_samples, stochastic, draws, centre)
            per_stream = samples // streams
            deviations = torch.stack(
                [
                    weight_deviations(
                        self.posterior,
                        draws,
                        per_stream,
                        ImageStreams.derived(generator, batch, draw_device, "weights", j).generators,
                    )
                    for j in range(streams)
                ]
            )  # (J, K, B, P)
            copies = [(j, k) for j in range(streams) for k in ([None] if stochastic else []) + list(range(per_stream))]
            finals = loop.run_copies(copies, x_unit, deviations, generator, draw_device, chunk_size, stochastic)

        shape = images.shape[1:]
        draws_final = torch.stack([finals[(j, k)] for j in range(streams) for k in range(per_stream)])
        draws_final = draws_final.reshape(streams, per_stream, batch, *shape)
        maps = torch.stack([finals[(j, None)] for j in range(streams)]) if stochastic else images[None]
        moments = trajectory_moments(draws_final, maps, draws, centre)
        moment_dtype = torch.float64 if images.dtype == torch.float64 else torch.float32
        if x_unit.device.type == "cuda":
            torch.cuda.synchronize(x_unit.device)
        settings = dict(
            method="trajectories",
            num_inference_steps=num_inference_steps,
            eta=float(eta),
            samples=samples,
            draws=draws,
            centre=centre,
            noise_samples=streams,
            stochastic_sampler=stochastic,
            scheduler=type(self.scheduler).__name__,
            timesteps=template.timesteps.tolist() if template.timesteps is not None else None,
            posterior_structure=getattr(self.posterior, "structure", None),
            guidance=None if guidance is None else dict(scale=guidance.scale),
        )
        timings = dict(
            total_s=time.perf_counter() - started,
            model_forwards_per_image=loop.model_rows / batch,
            chunks=loop.chunks,
            clamped_pixels=0,
        )
        return BayesDiffOutput(
            images=images,
            variance=moments.variance.to(moment_dtype),
            mean=moments.mean.to(moment_dtype),
            settings=settings,
            timings=timings,
            aleatoric_variance=moments.aleatoric.to(moment_dtype),
            draws=TrajectoryDraws(draws_final, maps, deviations) if return_draws else None,
        )


def _check_streams(samples: int, noise_samples: int | None, stochastic: bool, draws: str, centre: str) -> int:
    """J, the noise streams, after checking it against the sampler and the draws."""
    if not stochastic:
        if noise_samples not in (None, 1):
            raise ValueError(
                f"noise_samples={noise_samples} but the sampler drew no noise (deterministic): it has one noise stream"
            )
        streams = 1
    else:
        default = samples // 2 if draws == "antithetic" or centre == "mean" else samples
        streams = default if noise_samples is None else noise_samples
        if not isinstance(streams, int) or streams < 2 or samples % streams:
            raise ValueError(
                f"noise_samples must be an integer >= 2 that divides samples={samples} for a stochastic "
                f"sampler (the law of total variance needs 2 noise streams or more), got {noise_samples!r}"
            )
    per_stream = samples // streams
    if draws == "antithetic" and per_stream % 2:
        raise ValueError(
            f"draws='antithetic' pairs the draws of each noise stream: samples/noise_samples = {per_stream} must be even"
        )
    if centre == "mean" and per_stream < 2:
        raise ValueError(
            f"centre='mean' needs 2 or more weight draws per noise stream (samples/noise_samples = {per_stream}); "
            "use centre='map' or fewer noise_samples"
        )
    return streams
