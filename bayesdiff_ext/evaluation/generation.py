"""Generate the N images once and score them by every registered score, batch by batch.

Per batch: the recording run samples the images with the real UNet; every other source runs on
the rows it scores (replaying the recorded calls where it can) and each score reduces its source's
output; derived scores are combined at the end. The first batch also feeds the hyperparameter sweep
and the per-timestep trace, and times every source on real work to refine the run-time estimate.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from bayesdiff_ext.evaluation.posteriors import DEFAULT
from bayesdiff_ext.evaluation.progress import RunClock
from bayesdiff_ext.evaluation.sources import RECORDING, Batch, Derived, SamplerRun, SourceOutput, batch_sources, rows_of
from bayesdiff_ext.evaluation.sweep import hyperparameter_sweep

__all__ = ["Generated", "generate", "initial_noise"]


@dataclass
class Generated:
    images: np.ndarray  # (N, C, H, W) model scale
    scores: dict[str, np.ndarray]  # name -> (N,) float64, NaN where the score did not run
    maps: dict[str, np.ndarray]  # source -> per-pixel map (N, C, H, W) for the figures (NaN where not run)
    trace_timesteps: np.ndarray  # (K,)
    traces: dict[str, np.ndarray]  # source -> (K, B0) per-image Σ Var[x_t] after each step, first batch
    sweep: dict[str, np.ndarray]
    seconds: dict[str, float] = field(default_factory=dict)  # wall time per source (with replay)


def initial_noise(config, shape) -> torch.Tensor:
    generator = torch.Generator().manual_seed(config.seed)
    return torch.randn((config.num_images, *shape), generator=generator)


def generate(context, scores, clock: RunClock) -> Generated:
    config, subject = context.config, context.subject
    sources = batch_sources(scores)
    noise = initial_noise(config, subject.shape)
    n = config.num_images
    images = np.zeros((n, *subject.shape), np.float32)
    kept = [s for s in sources if isinstance(s, SamplerRun) and s.keep_maps]
    maps = {s.name: np.full((n, *subject.shape), np.nan, np.float32) for s in kept}
    values = {score.name: np.full(n, np.nan) for score in scores}
    traces, timesteps, sweep = {}, None, None
    seconds: dict[str, float] = {}

    def timed(name: str, images: int, job):
        started = time.perf_counter()
        result = job()
        elapsed = time.perf_counter() - started
        seconds[name] = seconds.get(name, 0.0) + elapsed
        clock.done(name, images, elapsed)
        return result

    for start in range(0, n, config.batch_size):
        stop = min(start + config.batch_size, n)
        x_t, first = noise[start:stop], start == 0
        clock.say(f"batch {start // config.batch_size + 1}/{-(-n // config.batch_size)}: images {start}..{stop - 1}")
        recorded, calls = timed(
            RECORDING.name, stop - start, lambda: RECORDING.record(context, x_t, trace=first, start=start)
        )
        outputs = {RECORDING.name: SourceOutput(recorded.variance, trace=recorded.trace)}
        for source in sources[1:]:
            rows = rows_of(source, config, start, stop)
            if rows.stop > 0:
                batch = Batch(x_t[rows], calls, rows, recorded.images[rows], trace=first, start=start)
                outputs[source.name] = timed(source.name, rows.stop, lambda: source.run(context, batch))
        for name, output in outputs.items():
            if name in maps:
                maps[name][start : start + len(output.variance)] = output.variance.numpy()
            if output.trace is not None:
                timesteps = np.array([step["timestep"] for step in output.trace])
                traces[name] = np.stack([step["variance_sum"].numpy() for step in output.trace])
        for score in scores:
            if score.source.name in outputs:
                reduced = score.reduce(outputs[score.source.name], context).numpy()
                values[score.name][start : start + len(reduced)] = reduced
        images[start:stop] = recorded.images.numpy()
        if first:
            rows = slice(0, min(config.sweep_images, stop - start))
            started = time.perf_counter()
            sweep = hyperparameter_sweep(
                config, subject.unet, subject.scheduler, context.posteriors.fresh(DEFAULT), calls, x_t[rows], rows
            )
            seconds["sweep"] = time.perf_counter() - started
            clock.first_batch_done(seconds["sweep"])
    for score in scores:
        if isinstance(score.source, Derived):
            values[score.name] = score.source.combine(values, config)
    clock.close()
    return Generated(
        images=images,
        scores=values,
        maps=maps,
        trace_timesteps=timesteps,
        traces=traces,
        sweep=sweep,
        seconds=seconds,
    )
