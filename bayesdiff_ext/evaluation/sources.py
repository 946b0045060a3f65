"""How the scores sample: one computation per batch of images, shared by every score that reads it.

A :class:`Source` runs once per batch (or, for the cost column, once on its own) and returns a
:class:`SourceOutput`; the scores registered on it (``scores.py``) reduce that output to one number
per image. Kinds:

* :class:`SamplerRun` — ``BayesDiffSampler`` with a posterior and options. In the evaluation one
  run (:data:`RECORDING`) samples the images with the real UNet and records its calls; every other
  run replays them (Monte Carlo draws go through the real UNet) and must reproduce the same images
  bit for bit.
* :class:`X0Drift` — the recorded ε predictions' x̂₀ over the last L steps (no extra model call).
* :class:`WeightSamples` — the weight-samples method (:mod:`bayesdiff_ext.methods.weight_samples`): M
  head-weight draws, each held along its own trajectory from the same x_T.
* :class:`Repeated` — other UNets from the same x_T (MC dropout, a deep ensemble) where they exist.
* :class:`Derived` — computed from other scores after generation (a random score, rank averages).

``forwards(config)`` is a source's load-independent cost: model forwards per image for a user who
runs it as a method (the image path included).
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from bayesdiff_ext.evaluation.posteriors import DEFAULT, PosteriorSpec
from bayesdiff_ext.evaluation.replay import RecordingUNet, ReplayUNet
from bayesdiff_ext.methods.weight_samples import WeightSamplesSampler
from bayesdiff_ext.methods.x0_drift import drift_variance, predicted_x0
from bayesdiff_ext.posterior.hfl import seed_image_probes
from bayesdiff_ext.randomness import image_generators
from bayesdiff_ext.sampler import BayesDiffSampler
from bayesdiff_ext.sampler.schedulers import step_coefficients
from bayesdiff_ext.sampler.engine import step_kinds

__all__ = [
    "CLOSED_FORM",
    "RECORDING",
    "Batch",
    "Context",
    "Derived",
    "Repeated",
    "SamplerRun",
    "Source",
    "SourceOutput",
    "WeightSamples",
    "X0Drift",
    "batch_sources",
    "rows_of",
]

#: Closed-form head variance at every step, no covariance: no UNet calls beyond the image path.
CLOSED_FORM = dict(mc_samples=0, covariance="none", uq_every=1)


@dataclass
class Context:
    """One evaluation run: the subject, its settings and its posteriors."""

    subject: object
    config: object
    posteriors: object


@dataclass
class Batch:
    """What a source sees of a batch: x_T of the rows it scores, and the recording run's calls
    (``calls`` None: the source runs on its own, e.g. to be timed); ``start`` the index of its first
    image in the run (image k's draws come from (seed, k), so a batch repeats exactly alone, resumed
    or on another process)."""

    noise: torch.Tensor
    calls: list | None = None
    rows: slice = field(default_factory=lambda: slice(None))
    reference: torch.Tensor | None = None
    trace: bool = False
    start: int = 0


@dataclass
class SourceOutput:
    """``variance`` (B, C, H, W): the source's per-pixel map; ``samples`` (M, B, C, H, W) where the
    source draws several images per x_T; ``trace`` the sampler's per-step trace (first batch)."""

    variance: torch.Tensor
    samples: torch.Tensor | None = None
    trace: list | None = None


class Source(abc.ABC):
    """A computation that scores take their values from. ``costly``: it needs extra model calls, so
    only the first ``costly_images`` images get it (unless ``all_images``). ``shares_path``: in the
    evaluation it reuses the recorded image path, so it costs there its time on its own less plain
    sampling's."""

    name: str
    costly: bool = False
    all_images: bool = False
    shares_path: bool = True

    def available(self, subject) -> bool:
        return True

    @abc.abstractmethod
    def forwards(self, config) -> int:
        """Model forwards per image when run as a method (the image path included)."""

    @abc.abstractmethod
    def run(self, context: Context, batch: Batch) -> SourceOutput:
        """The source's output for the batch's images."""


@dataclass(frozen=True, eq=False)
class SamplerRun(Source):
    """``BayesDiffSampler`` with ``posterior`` and ``options(config)``; ``keep_maps``: the report's
    figures show its Var[x_0] maps; ``traced``: its per-step trace is kept for the first batch."""

    name: str
    posterior: PosteriorSpec
    options: Callable[[object], dict]
    costly: bool = False
    all_images: bool = False
    keep_maps: bool = False
    traced: bool = False

    def forwards(self, config) -> int:
        options = self.options(config)
        return config.steps + options["mc_samples"] * _monte_carlo_steps(config.steps, options)

    def sampler(self, context: Context, unet) -> BayesDiffSampler:
        return BayesDiffSampler(unet, context.subject.scheduler, context.posteriors.get(self.posterior))

    def sample(self, context: Context, unet, batch: Batch):
        seed, sampler = context.config.seed, self.sampler(context, unet)
        indices = range(batch.start, batch.start + len(batch.noise))
        seed_image_probes(sampler.posterior, seed, indices)
        # DDIM η = 0 draws no step noise: the generators seed the Monte Carlo streams only.
        return sampler.sample(
            noise=batch.noise,
            num_inference_steps=context.config.steps,
            generator=image_generators(seed, indices),
            return_trace=batch.trace and self.traced,
            progress=False,
            **self.options(context.config),
        )

    def record(self, context: Context, noise: torch.Tensor, trace: bool = False, start: int = 0):
        """Sample ``noise`` with the real UNet, recording its calls: (output, calls)."""
        posterior = context.posteriors.get(self.posterior)
        recorder = RecordingUNet(context.subject.unet, posterior.head)
        out = self.sample(context, recorder, Batch(noise, trace=trace, start=start))
        return out, recorder.calls

    def run(self, context: Context, batch: Batch) -> SourceOutput:
        if batch.calls is None:
            out = self.sample(context, context.subject.unet, batch)
        else:
            head = context.posteriors.get(self.posterior).head
            replay = ReplayUNet(context.subject.unet, head, batch.calls, batch.rows)
            out = self.sample(context, replay, batch)
            if replay.replayed != len(batch.calls) or not torch.equal(out.images, batch.reference):
                raise RuntimeError(
                    f"run {self.name!r} left the recorded image path: the methods would rank different images"
                )
        return SourceOutput(out.variance, trace=out.trace)


def _monte_carlo_steps(steps: int, options: dict) -> int:
    """How many of a DDIM run's ``steps`` draw Monte Carlo samples (the sampler's own rule)."""
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler(clip_sample=False)
    scheduler.set_timesteps(steps)
    kinds = step_kinds(step_coefficients(scheduler), options["uq_every"], options["mc_samples"], "all")
    return sum(kind.monte_carlo for kind in kinds)


#: The run whose UNet calls are recorded and replayed by the others: the default posterior's closed form.
RECORDING = SamplerRun("default_closed", DEFAULT, lambda config: CLOSED_FORM, keep_maps=True, traced=True)


@dataclass(frozen=True, eq=False)
class X0Drift(Source):
    """x̂₀ drift (:mod:`bayesdiff_ext.methods.x0_drift`) from the image path's own calls."""

    name: str = "x0_drift"

    def forwards(self, config) -> int:
        return config.steps

    def run(self, context: Context, batch: Batch) -> SourceOutput:
        calls = batch.calls if batch.calls is not None else RECORDING.record(context, batch.noise)[1]
        scheduler, channels = context.subject.scheduler, batch.noise.shape[1]
        last = context.config.drift_last_steps
        # The recorded input is the scaled model input, which DDIM leaves equal to x_t.
        predictions = [
            predicted_x0(scheduler, c.output[batch.rows, :channels], c.x[batch.rows], c.timestep, index)
            for index, c in enumerate(calls)
            if index >= len(calls) - last
        ]
        return SourceOutput(drift_variance(predictions, last)[0])


@dataclass(frozen=True, eq=False)
class WeightSamples(Source):
    """The weight-samples method with the default posterior: M head-weight draws, each fixed along its
    own trajectory from the shared x_T — the same M draws for every image of the run, from
    ``seed + 1``. The method's stock image must be the recorded one."""

    name: str = "weight_samples"
    costly: bool = True

    def forwards(self, config) -> int:
        return (config.weight_samples + 1) * config.steps

    def run(self, context: Context, batch: Batch) -> SourceOutput:
        config = context.config
        sampler = WeightSamplesSampler(
            context.subject.unet, context.subject.scheduler, context.posteriors.get(DEFAULT), samples=config.weight_samples
        )
        out = sampler.sample(
            noise=batch.noise, num_inference_steps=config.steps, progress=False, return_draws=True, weight_seed=config.seed + 1
        )
        if batch.reference is not None and not torch.equal(out.images, batch.reference):
            raise RuntimeError(f"run {self.name!r} left the recorded image path: the methods would rank different images")
        return SourceOutput(out.variance.to(torch.float64), samples=out.draws.finals.flatten(0, 1).to(torch.float64))


@dataclass(frozen=True, eq=False)
class Repeated(Source):
    """Other UNets from the same x_T (the subject's ``repeated[name]``); ``passes(config)`` of them."""

    name: str
    passes: Callable[[object], int]
    costly: bool = True
    shares_path: bool = False

    def available(self, subject) -> bool:
        return self.name in subject.repeated

    def forwards(self, config) -> int:
        return (self.passes(config) + 1) * config.steps

    def run(self, context: Context, batch: Batch) -> SourceOutput:
        sampler = context.subject.repeated[self.name](context.config, context.subject.scheduler)
        # per-image generators: MC dropout's masks come from each image's stream, whatever the batch
        indices = range(batch.start, batch.start + len(batch.noise))
        out = sampler.sample(
            noise=batch.noise, num_inference_steps=context.config.steps, progress=False,
            generator=image_generators(context.config.seed, indices),
        )
        return SourceOutput(out.epistemic_variance)


@dataclass(frozen=True, eq=False)
class Derived(Source):
    """A score computed from other scores after generation: ``combine(scores, config)`` -> (N,)
    (NaN where not scored); ``parts`` name the scores it reads, whose sources' extra forwards it adds."""

    name: str
    combine: Callable[[dict, object], np.ndarray]
    parts: tuple[str, ...] = ()

    def forwards(self, config) -> int:
        raise TypeError("a derived score's forwards are its parts' (see scores.forwards)")

    def run(self, context: Context, batch: Batch) -> SourceOutput:
        raise TypeError("a derived score is combined after generation, not run per batch")


def batch_sources(scores) -> list:
    """The distinct per-batch sources of ``scores``, the recording run first."""
    sources = [RECORDING]
    for score in scores:
        if not isinstance(score.source, Derived) and score.source not in sources:
            sources.append(score.source)
    return sources


def rows_of(source, config, start: int, stop: int) -> slice:
    """The rows of the batch [start, stop) that ``source`` scores."""
    if source.costly and not source.all_images:
        return slice(0, max(0, min(stop, config.costly_count) - start))
    return slice(0, stop - start)
