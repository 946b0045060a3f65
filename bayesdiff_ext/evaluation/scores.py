"""The scores the evaluation compares, each one registered :class:`Score`.

A score is its name (the key in the cache and results), its label (how the report names it), its
source (how it samples and what that costs, ``sources.py``) and its reduction of the source's output
to one number per image (higher = less certain). Several scores may share a source (the aggregations
of one Monte Carlo run, the two readings of the weight-sample trajectories): the source runs once.
Adding a method to the evaluation is one ``register(Score(...))`` — with a new posterior, a
``SamplerRun(name, PosteriorSpec(...), options)`` as its source.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from scipy.stats import rankdata

from bayesdiff_ext import aggregation
from bayesdiff_ext.evaluation.posteriors import DEFAULT, FULL, HFL, ISOTROPIC, PAPER
from bayesdiff_ext.evaluation.registry import SCORES, Score, forwards, register, registered, scored_prefix
from bayesdiff_ext.evaluation.sources import (
    CLOSED_FORM,
    RECORDING,
    Context,
    Derived,
    Repeated,
    SamplerRun,
    SourceOutput,
    WeightSamples,
    X0Drift,
)
from bayesdiff_ext.evaluation.subject import ENSEMBLE_MEMBERS
from bayesdiff_ext.methods.feature_entropy import ClampedFeatures, feature_entropy


__all__ = ["SCORES", "Score", "forwards", "register", "registered", "scored_prefix"]


def _aggregated(name: str, **params) -> Callable:
    return lambda output, context: aggregation.aggregate(output.variance, name, **params)


def _entropy(extractor: str | None) -> Callable:
    """The weight-samples method's entropy of the M final images (clamped to [-1, 1], as a pipeline
    outputs them) in the feature space ``extractor`` (None: the subject's primary one)."""

    def reduce(output: SourceOutput, context: Context) -> torch.Tensor:
        subject = context.subject
        return feature_entropy(output.samples, ClampedFeatures(subject.extractors[extractor or subject.primary]))

    return reduce


def _rank_mean(parts: tuple[str, ...]) -> Callable:
    """The mean of the parts' ranks, each scaled to (0, 1], over the images all parts cover."""

    def combine(scores: dict, config) -> np.ndarray:
        n = min(scored_prefix(scores[p]) for p in parts)
        out = np.full(config.num_images, np.nan)
        out[:n] = np.mean([rankdata(scores[p][:n]) / n for p in parts], axis=0)
        return out

    return combine


def _random(scores: dict, config) -> np.ndarray:
    return np.random.default_rng(config.seed + 2).random(config.num_images)


def _monte_carlo(config) -> dict:
    return dict(mc_samples=config.mc_samples, uq_every=config.uq_every, covariance="mc")


def _skip(config) -> str:
    return f"Skip {config.uq_every}, S = {config.mc_samples}"


# BayesDiff's code: γ² at the samples only (no spread of the head means), images deterministic.
PAPER_RUN = SamplerRun(
    "paper",
    PAPER,
    lambda c: dict(_monte_carlo(c), eps_variance="bayesdiff"),
    costly=True,
    all_images=True,
    keep_maps=True,
    traced=True,
)
DEFAULT_MC = SamplerRun("default_mc", DEFAULT, _monte_carlo, costly=True, keep_maps=True, traced=True)
WEIGHT_SAMPLES = WeightSamples()

register(Score("paper", lambda c: f"paper: diag EF×2, σ = δ = 1, {_skip(c)}, sum", PAPER_RUN))
register(Score("default", lambda c: f"default: diag posterior, {_skip(c)}, sum", DEFAULT_MC))
register(Score("default_mean", lambda c: "default, mean", DEFAULT_MC, _aggregated("mean")))
register(
    Score("default_patch_max", lambda c: "default, patch-max (4×4)", DEFAULT_MC, _aggregated("patch_max", patch=4))
)
register(
    Score("default_percentile", lambda c: "default, 95th percentile", DEFAULT_MC, _aggregated("percentile", q=95.0))
)
register(
    Score("covariance_none", lambda c: "default posterior, covariance='none' (closed form, every step)", RECORDING)
)
register(
    Score("full_ggn", lambda c: "full GGN, closed form, every step", SamplerRun("full_closed", FULL, lambda c: CLOSED_FORM))
)
register(
    Score(
        "hfl",
        lambda c: f"Hessian-free Laplace on the full GGN ({c.hfl_probes} probes, CG), every step",
        SamplerRun("hfl_closed", HFL, lambda c: CLOSED_FORM),
    )
)
register(
    Score(
        "isotropic",
        lambda c: "isotropic (reproduction's baseline), closed form, every step",
        SamplerRun("isotropic_closed", ISOTROPIC, lambda c: CLOSED_FORM),
    )
)
register(Score("x0_drift", lambda c: f"x0-drift: variance of x̂_0 over the last {c.drift_last_steps} steps", X0Drift()))
register(
    Score(
        "weight_samples",
        lambda c: f"weight-samples: {c.weight_samples} diag head-weight draws shared by all images, each fixed along a whole trajectory, pixel variance",
        WEIGHT_SAMPLES,
    )
)
# The random conv net is no oracle's and no judged metric's feature space: entropy there is judged.
register(
    Score(
        "weight_samples_entropy",
        lambda c: f"weight-samples, feature-space entropy of the {c.weight_samples} images (random-conv features)",
        WEIGHT_SAMPLES,
        _entropy("random_conv"),
    )
)
# In the primary features the entropy reads the space of the realism oracle and of FID: shown, not judged.
register(
    Score(
        "weight_samples_entropy_primary",
        lambda c: f"weight-samples, feature-space entropy of the {c.weight_samples} images (primary features: "
        "the realism oracle's and FID's own, not judged)",
        WEIGHT_SAMPLES,
        _entropy(None),
        verdict=False,
        applies=lambda subject: subject.primary != "random_conv",
    )
)
register(
    Score(
        "mc_dropout",
        lambda c: f"MC dropout: {c.dropout_passes} passes of the dropout-trained UNet, same x_T",
        Repeated("mc_dropout", lambda c: c.dropout_passes),
    )
)
register(
    Score(
        "ensemble",
        lambda c: f"deep ensemble: {ENSEMBLE_MEMBERS} independently trained UNets, same x_T",
        Repeated("ensemble", lambda c: ENSEMBLE_MEMBERS),
    )
)
register(
    Score(
        "drift_and_weights",
        lambda c: "rank mean of x0-drift and weight-samples pixel variance",
        Derived("drift_and_weights", _rank_mean(("x0_drift", "weight_samples")), ("x0_drift", "weight_samples")),
    )
)
register(
    Score("random", lambda c: "random score (sanity: AUROC ≈ 0.5)", Derived("random", _random), verdict=False)
)

# VI, HMC and head ensembles register their scores from their own module (imported for that).
from bayesdiff_ext.evaluation import inference_scores  # noqa: E402, F401
