"""Generate the N images once and score them by every registered score, batch by batch.

Per batch: the recording run samples the images with the real UNet; every other source runs on
the rows it scores (replaying the recorded calls where it can) and each score reduces its source's
output; derived scores are combined at the end. The first batch also feeds the hyperparameter sweep
and the per-timestep trace, and times every source on real work to refine the run-time estimate.

A batch depends on nothing but its images' indices and the settings: image k's x_T and draws come
from (seed, k) (:mod:`bayesdiff_ext.randomness`). So the batches go through
:func:`~bayesdiff_ext.batch_runner.run_batches` — kept in a work folder as they finish (a killed run
resumes), shared by the processes of a ``torchrun`` launch — and the result is the same however
they were computed.
"""

from __future__ import annotations

import time
import types
from dataclasses import dataclass, field

import numpy as np
import torch

from bayesdiff_ext.batch_runner import run_batches
from bayesdiff_ext.distributed import global_batches, is_main_process
from bayesdiff_ext.evaluation.posteriors import DEFAULT
from bayesdiff_ext.evaluation.progress import RunClock
from bayesdiff_ext.evaluation.sources import RECORDING, Batch, Derived, SamplerRun, SourceOutput, batch_sources, rows_of
from bayesdiff_ext.evaluation.sweep import hyperparameter_sweep
from bayesdiff_ext.randomness import image_generators

__all__ = ["NOISE_RULE", "Generated", "generate", "initial_noise"]

#: How the run drew x_T, recorded in its cache (a cache without it drew all N from one stream).
NOISE_RULE = "image k from image_generators(seed, [k])"


@dataclass
class Generated:
    images: np.ndarray  # (N, C, H, W) model scale
    scores: dict[str, np.ndarray]  # name -> (N,) float64, NaN where the score did not run
    maps: dict[str, np.ndarray]  # source -> per-pixel map (N, C, H, W) for the figures (NaN where not run)
    trace_timesteps: np.ndarray  # (K,)
    traces: dict[str, np.ndarray]  # source -> (K, B0) per-image Σ Var[x_t] after each step, first batch
    sweep: dict[str, np.ndarray]
    seconds: dict[str, float] = field(default_factory=dict)  # wall time per source (with replay)


def initial_noise(config, shape, indices: range) -> torch.Tensor:
    """x_T (len(indices), *shape) of the images ``indices``: image k's from its own generator (seed, k),
    as ``bayesdiff sample --seed`` and a diffusers pipeline given ``image_generators`` draw it."""
    return torch.stack([torch.randn(shape, generator=g) for g in image_generators(config.seed, indices)])


def generate(context, scores, clock: RunClock, run=run_batches) -> Generated | None:
    """Every batch of the run through ``run(score_batch, num_images, batch_size)`` (a
    :func:`~bayesdiff_ext.batch_runner.run_batches`); the images and scores on process 0, None on
    the others."""
    config = context.config
    sources = batch_sources(scores)
    maps = [s.name for s in sources if isinstance(s, SamplerRun) and s.keep_maps]
    first_done = False

    def score_batch(indices: range):
        nonlocal first_done
        speaks = is_main_process()  # process 0 tells the progress of the run
        if speaks:
            number, total = indices.start // config.batch_size + 1, -(-config.num_images // config.batch_size)
            clock.say(f"batch {number}/{total}: images {indices.start}..{indices.stop - 1}")
        batch = _score_batch(context, scores, sources, maps, indices, clock)
        if speaks and not first_done:
            clock.first_batch_done(batch.timings.get("sweep", 0.0))
        first_done = True
        return batch

    results = run(score_batch, config.num_images, config.batch_size)
    clock.close()
    if results is None:
        return None
    return _assembled(config, scores, maps, results)


def _score_batch(context, scores, sources, maps, indices: range, clock):
    """One batch's tensors (images, each score's values, the kept maps; the first batch's traces and
    sweep) and the seconds each source took, as a :func:`run_batches` batch."""
    config, subject = context.config, context.subject
    start, first = indices.start, indices.start == 0
    x_t = initial_noise(config, subject.shape, indices)
    seconds: dict[str, float] = {}

    def timed(name: str, images: int, job):
        started = time.perf_counter()
        result = job()
        elapsed = time.perf_counter() - started
        seconds[name] = seconds.get(name, 0.0) + elapsed
        clock.done(name, images, elapsed)
        return result

    recorded, calls = timed(
        RECORDING.name, len(indices), lambda: RECORDING.record(context, x_t, trace=first, start=start)
    )
    outputs = {RECORDING.name: SourceOutput(recorded.variance, trace=recorded.trace)}
    for source in sources[1:]:
        rows = rows_of(source, config, start, indices.stop)
        if rows.stop > 0:
            batch = Batch(x_t[rows], calls, rows, recorded.images[rows], trace=first, start=start)
            outputs[source.name] = timed(source.name, rows.stop, lambda: source.run(context, batch))
    tensors = {"images": recorded.images.to(torch.float32)}
    for name, output in outputs.items():
        if name in maps:
            tensors[f"map__{name}"] = output.variance.to(torch.float32)
        if output.trace is not None:
            tensors["trace_timesteps"] = torch.from_numpy(np.array([step["timestep"] for step in output.trace]))
            tensors[f"trace__{name}"] = torch.stack([step["variance_sum"] for step in output.trace])
    for score in scores:
        if isinstance(score.source, Derived):
            continue
        values = torch.full((len(indices),), torch.nan, dtype=torch.float64)
        if score.source.name in outputs:
            reduced = score.reduce(outputs[score.source.name], context)
            values[: len(reduced)] = reduced.to(torch.float64)
        tensors[f"score__{score.name}"] = values
    if first:
        rows = slice(0, min(config.sweep_images, len(indices)))
        started = time.perf_counter()
        sweep = hyperparameter_sweep(
            config, subject.unet, subject.scheduler, context.posteriors.fresh(DEFAULT), calls, x_t[rows], rows
        )
        seconds["sweep"] = time.perf_counter() - started
        tensors.update({f"sweep__{name}": torch.from_numpy(np.asarray(value)) for name, value in sweep.items()})
    return types.SimpleNamespace(**tensors, settings={}, timings=seconds)


def _parts(result, prefix: str) -> dict[str, torch.Tensor]:
    return {name[len(prefix) :]: value for name, value in vars(result).items() if name.startswith(prefix)}


def _assembled(config, scores, maps, results) -> Generated:
    """The run's arrays from its batches (in order)."""
    n, first = config.num_images, results[0]
    images = torch.cat([r.images for r in results]).numpy()
    kept = {name: np.full((n, *images.shape[1:]), np.nan, np.float32) for name in maps}
    values = {}
    for batch, result in zip(global_batches(n, config.batch_size), results):
        for name, variance in _parts(result, "map__").items():
            kept[name][batch.start : batch.start + len(variance)] = variance.numpy()
    for score in scores:
        if not isinstance(score.source, Derived):
            values[score.name] = torch.cat([getattr(r, f"score__{score.name}") for r in results]).numpy()
    for score in scores:
        if isinstance(score.source, Derived):
            values[score.name] = score.source.combine(values, config)
    values = {score.name: values[score.name] for score in scores}
    seconds: dict[str, float] = {}
    for result in results:
        for name, elapsed in result.timings.items():
            seconds[name] = seconds.get(name, 0.0) + elapsed
    return Generated(
        images=images,
        scores=values,
        maps=kept,
        trace_timesteps=first.trace_timesteps.numpy(),
        traces={name: trace.numpy() for name, trace in _parts(first, "trace__").items()},
        sweep={name: value.numpy() for name, value in _parts(first, "sweep__").items()},
        seconds=seconds,
    )
