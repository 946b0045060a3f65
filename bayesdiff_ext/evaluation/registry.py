"""The registry of the evaluation's scores: :class:`Score`, :func:`register` and the lookups.

The scores themselves are defined in ``scores.py`` (the built-in ones) and ``inference_scores.py``
(VI, HMC and head ensembles); each module registers its scores when it is imported.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from bayesdiff_ext import aggregation
from bayesdiff_ext.evaluation.sources import Context, Derived, Source, SourceOutput

__all__ = ["SCORES", "Score", "forwards", "register", "registered", "scored_prefix", "summed_variance"]


def summed_variance(output: SourceOutput, context: Context) -> torch.Tensor:
    return aggregation.score_sum(output.variance)


@dataclass(frozen=True)
class Score:
    """A per-image score: ``reduce(output, context)`` -> (B,) from its ``source``'s output.
    ``verdict``: judged in the conclusion and the goal (False for sanity rows such as the random
    score, and for scores that read the oracle's own features); ``applies(subject)``: whether the
    score means something on the subject (beyond its source being able to run)."""

    name: str
    label: Callable[[object], str]
    source: Source
    reduce: Callable[[SourceOutput, Context], torch.Tensor] = summed_variance
    verdict: bool = True
    applies: Callable[[object], bool] = lambda subject: True


#: Every score, in report order.
SCORES: list[Score] = []


def register(score: Score) -> Score:
    if any(s.name == score.name for s in SCORES):
        raise ValueError(f"a score named {score.name!r} is registered already")
    SCORES.append(score)
    return score


def registered(subject) -> list[Score]:
    """The registered scores whose source can run on ``subject``."""
    return [score for score in SCORES if score.source.available(subject) and score.applies(subject)]


def forwards(score: Score, config) -> int:
    """Model forwards per image of ``score`` run as a method; a derived score pays for each distinct
    source of its parts once, on top of the one image path they share."""
    if not isinstance(score.source, Derived):
        return score.source.forwards(config)
    sources = {s.source for s in SCORES if s.name in score.source.parts}
    return config.steps + sum(source.forwards(config) - config.steps for source in sources)


def scored_prefix(values: np.ndarray) -> int:
    """How many leading images a score covers (the rest are NaN)."""
    finite = np.isfinite(values)
    n = int(finite.sum())
    if not finite[:n].all():
        raise ValueError("a score must cover a prefix of the images")
    return n
