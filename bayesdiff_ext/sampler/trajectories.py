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
import inspect
import time
from typing import Any

import torch
from tqdm.auto import tqdm

from bayesdiff_ext.denoiser import Denoiser, stepped_prediction
from bayesdiff_ext.guidance import ClassifierFreeGuidance
from bayesdiff_ext.posterior.draws import check_draws, weight_deviations
from bayesdiff_ext.posterior.perturbation import perturbed_head
from bayesdiff_ext.randomness import ImageStreams, Generators
from bayesdiff_ext.sampler.initial_noise import initial_noise
from bayesdiff_ext.sampler.results import BayesDiffOutput
from bayesdiff_ext.sampler.trajectory_statistics import CENTRES, trajectory_moments

__all__ = ["TrajectorySampler"]

#: Rows per model call when ``chunk_size`` is not given (rounded down to whole copies of the batch).
DEFAULT_CHUNK_ROWS = 256
_LEARNED_VARIANCE = ("learned", "learned_range")


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
        loop = _Loop(self, template, num_inference_steps, eta, kwargs, guidance, scheduler_kwargs, set_timesteps_kwargs)
        draw_device = _generator_device(generator, x_unit.device)
        before = _states(generator, x_unit.device)

        with tqdm(desc="trajectories", disable=not progress, unit="step") as bar:
            loop.bar = bar
            images = loop.run(self.scheduler, x_unit, generator, copies=1)
            stochastic = not all(map(torch.equal, _states(generator, x_unit.device), before))
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
        )


class _Loop:
    """The scheduler's own loop for any number of stacked copies of the batch."""

    def __init__(self, sampler, template, steps, eta, kwargs, guidance, scheduler_kwargs, set_timesteps_kwargs):
        self.sampler, self.template, self.steps = sampler, template, steps
        self.kwargs, self.guidance = kwargs, guidance
        self.set_timesteps_kwargs = dict(set_timesteps_kwargs or {})
        accepted = inspect.signature(template.step).parameters
        self.step_kwargs = dict(scheduler_kwargs or {})
        if "eta" in accepted:
            self.step_kwargs["eta"] = eta
        elif eta:
            raise ValueError(f"eta={eta} but {type(template).__name__}.step takes no eta")
        self.takes_generator = "generator" in accepted
        self.learned_variance = getattr(template.config, "variance_type", None) in _LEARNED_VARIANCE
        self.model_rows = 0
        self.chunks = 0
        self.bar = None
        template.set_timesteps(steps, **self.set_timesteps_kwargs)

    def run(self, scheduler, x_unit: torch.Tensor, generator, copies: int) -> torch.Tensor:
        """x_0 of ``copies`` stacked copies of the batch (rows copy-major) on ``scheduler``."""
        batch = x_unit.shape[0] // copies
        scheduler.set_timesteps(self.steps, **self.set_timesteps_kwargs)
        x = x_unit * scheduler.init_noise_sigma if hasattr(scheduler, "init_noise_sigma") else x_unit
        kwargs = Denoiser.tile(self.kwargs, batch, copies)
        step_kwargs = dict(self.step_kwargs, **({"generator": generator} if self.takes_generator else {}))
        if self.bar is not None:
            self.bar.total = (self.bar.total or 0) + len(scheduler.timesteps)
            self.bar.refresh()
        for t in scheduler.timesteps:
            out = self._predict(scheduler.scale_model_input(x, t), t, kwargs)
            prediction = out if self.learned_variance else stepped_prediction(out, x)
            x = scheduler.step(prediction, t, x, **step_kwargs).prev_sample
            if self.bar is not None:
                self.bar.update(1)
        return x

    def _predict(self, x, t, kwargs):
        rows = x.shape[0] * (1 if self.guidance is None else 2)
        self.model_rows += rows
        if self.guidance is None:
            return self.sampler.denoiser(x, t, kwargs)
        return self.guidance.forward(self.sampler.denoiser, None, x, t, kwargs, want_head=False)[0]

    def run_copies(self, copies, x_unit, deviations, generator, draw_device, chunk_size, stochastic):
        """x_0 of every copy (stream j, draw k; k None for a stream's MAP trajectory), in chunks."""
        batch = x_unit.shape[0]
        rows = DEFAULT_CHUNK_ROWS if chunk_size is None else chunk_size
        if not isinstance(rows, int) or rows < 1:
            raise ValueError(f"chunk_size must be an integer >= 1 (rows per model call), got {chunk_size!r}")
        per_chunk = max(1, rows // batch)
        seeds = {}
        if stochastic:
            for j in sorted({j for j, _ in copies}):
                streams = ImageStreams.derived(generator, batch, draw_device, "trajectory_noise", j)
                seeds[j] = [g.initial_seed() for g in streams.generators]
        posterior = self.sampler.posterior
        finals = {}
        for first in range(0, len(copies), per_chunk):
            chunk = copies[first : first + per_chunk]
            parts = [deviations[j, k] if k is not None else torch.zeros_like(deviations[0, 0]) for j, k in chunk]
            row_generators = (
                [torch.Generator(device=draw_device).manual_seed(s) for j, _ in chunk for s in seeds[j]]
                if stochastic
                else None
            )
            x = x_unit.repeat(len(chunk), *([1] * (x_unit.dim() - 1)))
            with perturbed_head(posterior.head, posterior.spec, torch.cat(parts).to(x.device)):
                out = self.run(copy.deepcopy(self.template), x, row_generators, copies=len(chunk))
            self.chunks += 1
            for n, key in enumerate(chunk):
                finals[key] = out[n * batch : (n + 1) * batch]
        return finals


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


def _generator_device(generator: Generators, fallback: torch.device) -> torch.device:
    source = generator[0] if isinstance(generator, list) else generator
    return source.device if source is not None else fallback


def _states(generator: Generators, device: torch.device) -> list[torch.Tensor]:
    """The generator states (the global generator of ``device`` for None), to see whether a loop drew."""
    if generator is None:
        if device.type == "cuda":
            return [torch.cuda.get_rng_state(device)]
        return [torch.get_rng_state()]
    sources = generator if isinstance(generator, list) else [generator]
    return [g.get_state() for g in sources]
