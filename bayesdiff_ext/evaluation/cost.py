"""The cost column: every method timed on the same small batch with the real UNet (no replay)."""

from __future__ import annotations

import time

import numpy as np

from bayesdiff_ext.evaluation.free_baseline import free_scores
from bayesdiff_ext.evaluation.methods import sampler_runs, score_specs
from bayesdiff_ext.evaluation.repeated import available_repeated, repeated_scores
from bayesdiff_ext.evaluation.replay import RecordingUNet
from bayesdiff_ext.evaluation.weight_samples import fixed_weight_scores
from bayesdiff_ext.sampler import BayesDiffSampler

__all__ = ["PLAIN", "measure_costs", "plain_sampling", "seconds"]

#: The reference row: the same loop with the head variance asked for at the first step only.
PLAIN = "plain sampling (reference)"


def seconds(fn) -> float:
    """Wall seconds of one call of ``fn``."""
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def plain_sampling(config, scheduler, noise):
    """The reference job: the bundled model and posterior, head variance at the first step only."""
    from bayesdiff_ext.digits import bundled_dir, load_bundled_unet
    from bayesdiff_ext.posterior import LastLayerLaplace

    unet = load_bundled_unet()
    posterior = LastLayerLaplace.load(bundled_dir() / "posterior_diag.safetensors", unet)
    return BayesDiffSampler(unet, scheduler, posterior).sample(
        noise=noise,
        num_inference_steps=config.steps,
        mc_samples=0,
        covariance="none",
        uq_every=config.steps,
        progress=False,
    )


def measure_costs(config, unet, scheduler, posteriors, noise) -> dict[str, float]:
    """Seconds per image of each score (and of plain sampling) on ``noise`` (the same batch for all).

    Median of ``config.cost_repeats`` rounds; the methods take turns within a round, so load from
    other processes on a shared machine falls on all of them alike.
    """
    steps, batch = config.steps, len(noise)
    default = posteriors["default"]
    jobs = {
        PLAIN: lambda: BayesDiffSampler(unet, scheduler, default).sample(
            noise=noise,
            num_inference_steps=steps,
            mc_samples=0,
            covariance="none",
            uq_every=steps,
            progress=False,
        )
    }
    for name, run in sampler_runs(config).items():
        jobs[name] = lambda run=run: BayesDiffSampler(unet, scheduler, posteriors[run.posterior]).sample(
            noise=noise, num_inference_steps=steps, progress=False, **run.options
        )

    def free():
        recorder = RecordingUNet(unet, default.head)
        BayesDiffSampler(recorder, scheduler, default).sample(
            noise=noise,
            num_inference_steps=steps,
            mc_samples=0,
            covariance="none",
            uq_every=steps,
            progress=False,
        )
        free_scores(recorder.calls, scheduler.alphas_cumprod, config.free_last_steps, noise.shape[1])

    jobs["free"] = free
    jobs["weight_samples"] = lambda: fixed_weight_scores(
        BayesDiffSampler(unet, scheduler, default),
        noise,
        samples=config.weight_samples,
        seed=0,
        steps=steps,
        progress=False,
    )
    for name in available_repeated():
        jobs[name] = lambda name=name: repeated_scores(name, config, scheduler, noise, progress=False)
    rounds = {name: [] for name in jobs}
    for _ in range(config.cost_repeats):
        for name, job in jobs.items():
            rounds[name].append(seconds(job))
    run_seconds = {name: float(np.median(values)) for name, values in rounds.items()}
    run_seconds["random"] = run_seconds[PLAIN]
    costs = {PLAIN: run_seconds[PLAIN] / batch}
    for spec in score_specs(config):
        costs[spec.name] = run_seconds[spec.source] / batch
    return costs
