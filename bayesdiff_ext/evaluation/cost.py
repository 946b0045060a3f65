"""The cost column: every source timed on its own (no replay) on the same small batch with the real UNet."""

from __future__ import annotations

import time

import numpy as np

from bayesdiff_ext.evaluation.posteriors import DEFAULT
from bayesdiff_ext.evaluation.sources import Batch, Derived, SamplerRun

__all__ = ["PLAIN", "PLAIN_RUN", "measure_costs", "score_costs", "seconds"]

#: The reference row's name in the costs.
PLAIN = "plain sampling (reference)"
#: The reference job: the default posterior with the head variance asked for at the first step only.
PLAIN_RUN = SamplerRun(
    PLAIN, DEFAULT, lambda config: dict(mc_samples=0, covariance="none", uq_every=config.steps)
)


def seconds(fn) -> float:
    """Wall seconds of one call of ``fn``."""
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def measure_costs(context, sources, noise) -> dict[str, float]:
    """Seconds per image of each source and of plain sampling on ``noise`` (the same batch for all).

    Median of ``cost_repeats`` rounds; the sources take turns within a round, so load from other
    processes on a shared machine falls on all of them alike.
    """
    jobs = [PLAIN_RUN, *sources]
    rounds = {source.name: [] for source in jobs}
    for _ in range(context.config.cost_repeats):
        for source in jobs:
            rounds[source.name].append(seconds(lambda: source.run(context, Batch(noise))))
    return {name: float(np.median(values)) / len(noise) for name, values in rounds.items()}


def score_costs(scores, source_costs: dict[str, float]) -> dict[str, float]:
    """Seconds per image of each score: its source's; a derived score pays plain sampling once and
    each distinct source of its parts' extra over plain."""
    plain = source_costs[PLAIN]
    by_name = {score.name: score for score in scores}
    costs = {PLAIN: plain}
    for score in scores:
        if isinstance(score.source, Derived):
            parts = {by_name[p].source.name for p in score.source.parts if p in by_name}
            costs[score.name] = plain + sum(source_costs[name] - plain for name in parts)
        else:
            costs[score.name] = source_costs[score.source.name]
    return costs
