"""Generate the N images once and score them by every method, batch by batch.

Per batch: the recording run (default posterior, closed form) samples the images with the real
UNet; every other sampler run replays its calls (Monte Carlo samples go through the real UNet) and
must reproduce the same images bit for bit; the free baseline reads the recorded ε predictions; the
fixed-weight baseline runs its own M trajectories. The first batch also feeds the hyperparameter
sweep and the per-timestep trace.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from bayesdiff_ext import aggregation
from bayesdiff_ext.evaluation.free_baseline import free_scores
from bayesdiff_ext.evaluation.methods import RECORDING_RUN, sampler_runs, score_specs
from bayesdiff_ext.evaluation.repeated import available_repeated, repeated_scores
from bayesdiff_ext.evaluation.replay import RecordingUNet, ReplayUNet
from bayesdiff_ext.evaluation.sweep import hyperparameter_sweep
from bayesdiff_ext.evaluation.weight_samples import fixed_weight_scores
from bayesdiff_ext.sampler import BayesDiffSampler

__all__ = ["Generated", "generate", "initial_noise"]

#: Runs whose per-step variance sums are kept (first batch) for the timestep figure.
TRACED = (RECORDING_RUN, "paper", "default_mc")


@dataclass
class Generated:
    images: np.ndarray  # (N, C, H, W) model scale
    scores: dict[str, np.ndarray]  # name -> (N,) float64, NaN where the method did not score
    maps: dict[str, np.ndarray]  # run -> Var[x_0] (N, C, H, W) for the figures (NaN where not run)
    trace_timesteps: np.ndarray  # (K,)
    traces: dict[str, np.ndarray]  # run -> (K, B0) per-image Σ Var[x_t] after each step, first batch
    sweep: dict[str, np.ndarray]
    seconds: dict[str, float] = field(default_factory=dict)  # wall time per phase (with replay)


def initial_noise(config, shape) -> torch.Tensor:
    generator = torch.Generator().manual_seed(config.seed)
    return torch.randn((config.num_images, *shape), generator=generator)


@contextlib.contextmanager
def _timer(seconds: dict, name: str):
    started = time.perf_counter()
    try:
        yield
    finally:
        seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - started


def generate(config, unet, scheduler, posteriors, sweep_posterior) -> Generated:
    runs = sampler_runs(config)
    specs = score_specs(config)
    head = posteriors["default"].head
    size = unet.config.sample_size
    shape = (unet.config.in_channels, size, size)
    noise = initial_noise(config, shape)
    n, costly_n = config.num_images, config.costly_count
    images = np.zeros((n, *shape), np.float32)
    maps = {name: np.full((n, *shape), np.nan, np.float32) for name in runs}
    scores = {spec.name: np.full(n, np.nan) for spec in specs}
    traces: dict[str, list] = {}
    timesteps = None
    sweep = None
    seconds: dict[str, float] = {}
    alphas = scheduler.alphas_cumprod

    batch_starts = range(0, n, config.batch_size)
    for number, start in enumerate(batch_starts):
        stop = min(start + config.batch_size, n)
        x_t = noise[start:stop]
        first = number == 0
        costly_rows = slice(0, max(0, min(stop, costly_n) - start))
        print(f"batch {number + 1}/{len(batch_starts)}: images {start}..{stop - 1}", flush=True)
        recorder = RecordingUNet(unet, head)
        outputs = {}
        with _timer(seconds, RECORDING_RUN):
            outputs[RECORDING_RUN] = BayesDiffSampler(recorder, scheduler, posteriors["default"]).sample(
                noise=x_t,
                num_inference_steps=config.steps,
                return_trace=first,
                progress=config.progress,
                **runs[RECORDING_RUN].options,
            )
        reference = outputs[RECORDING_RUN].images
        for name, run in runs.items():
            rows = costly_rows if run.costly and not run.all_images else slice(0, stop - start)
            if name == RECORDING_RUN or rows.stop == 0:
                continue
            replay = ReplayUNet(unet, head, recorder.calls, rows)
            with _timer(seconds, name):
                outputs[name] = BayesDiffSampler(replay, scheduler, posteriors[run.posterior]).sample(
                    noise=x_t[rows],
                    num_inference_steps=config.steps,
                    return_trace=first and name in TRACED,
                    progress=config.progress,
                    **run.options,
                )
            if replay.replayed != len(recorder.calls) or not torch.equal(
                outputs[name].images, reference[rows]
            ):
                raise RuntimeError(
                    f"run {name!r} left the recorded image path: the methods would rank different images"
                )

        images[start:stop] = reference.numpy()
        for name, out in outputs.items():
            maps[name][start : start + len(out.variance)] = out.variance.numpy()
            if out.trace is not None:
                timesteps = np.array([step["timestep"] for step in out.trace])
                traces[name] = np.stack([step["variance_sum"].numpy() for step in out.trace])
        for spec in specs:
            if spec.source in outputs:
                values = aggregation.aggregate(outputs[spec.source].variance, spec.aggregation, **spec.params)
                scores[spec.name][start : start + len(values)] = values.numpy()
        with _timer(seconds, "free"):
            scores["free"][start:stop] = free_scores(
                recorder.calls, alphas, config.free_last_steps, shape[0]
            ).numpy()
        if costly_rows.stop > 0:
            costly = slice(start, start + costly_rows.stop)
            with _timer(seconds, "weight_samples"):
                scores["weight_samples"][costly] = fixed_weight_scores(
                    BayesDiffSampler(unet, scheduler, posteriors["default"]),
                    x_t[costly_rows],
                    samples=config.weight_samples,
                    seed=config.seed + 1,
                    steps=config.steps,
                    progress=config.progress,
                ).numpy()
            for name in available_repeated():
                with _timer(seconds, name):
                    scores[name][costly] = repeated_scores(
                        name, config, scheduler, x_t[costly_rows], config.progress
                    ).numpy()
        if first:
            rows = slice(0, min(config.sweep_images, stop - start))
            with _timer(seconds, "sweep"):
                sweep = hyperparameter_sweep(
                    config, unet, scheduler, sweep_posterior, recorder.calls, x_t[rows], rows
                )
    scores["random"] = np.random.default_rng(config.seed + 2).random(n)
    return Generated(
        images=images,
        scores=scores,
        maps={name: maps[name] for name in (RECORDING_RUN, "paper", "default_mc")},
        trace_timesteps=timesteps,
        traces=traces,
        sweep=sweep,
        seconds=seconds,
    )
