"""Filtering by a score against removing random images, and detection of the oracle's worst images.

Kept set at fraction f: the round(f·n) images with the lowest score (most certain), ties broken by
index. Its metrics against the real data are compared with random subsets of the same size drawn
from the same n images (one per seed); ``advantage`` is the method's improvement over the random
mean in units of the random-subset std (positive = better than random removal).
"""

from __future__ import annotations

import numpy as np
from scipy.stats import rankdata

from bayesdiff_ext import metrics

__all__ = [
    "LOWER_IS_BETTER",
    "METRICS",
    "advantage",
    "detection",
    "kept_by_score",
    "kept_count",
    "random_subsets",
    "set_metrics",
]

METRICS = ("fid", "kid", "cmmd", "precision", "recall", "density", "coverage")
LOWER_IS_BETTER = {"fid": True, "kid": True, "cmmd": True}


def kept_count(n: int, fraction: float) -> int:
    return max(2, int(round(fraction * n)))


def kept_by_score(scores: np.ndarray, fraction: float) -> np.ndarray:
    """Indices (into ``scores``) of the kept set: the lowest scores, stable order."""
    order = np.argsort(scores, kind="stable")
    return np.sort(order[: kept_count(len(scores), fraction)])


def random_subsets(n: int, fraction: float, seeds: int, base_seed: int = 0) -> list[np.ndarray]:
    """One random subset of size kept_count(n, fraction) per seed, without replacement."""
    size = kept_count(n, fraction)
    return [
        np.sort(np.random.default_rng(base_seed + s).choice(n, size, replace=False)) for s in range(seeds)
    ]


def set_metrics(real: np.ndarray, fake: np.ndarray, *, k: int, full: bool = True) -> dict[str, float]:
    """FID and CMMD of one fake feature set against the real one; with ``full`` also KID (one subset
    of min(N_real, N_fake) rows: the unbiased MMD² on nearly all samples) and PRDC."""
    values = {"fid": metrics.frechet_distance(real, fake), "cmmd": metrics.cmmd(real, fake)}
    if full:
        values["kid"] = metrics.kid(real, fake, subsets=1, subset_size=min(len(real), len(fake)), seed=0).mean
        values.update(metrics.prdc(real, fake, k=k)._asdict())
    return values


def advantage(metric: str, value: float, random_values) -> float:
    """(random mean − value)/std for lower-is-better metrics, (value − mean)/std otherwise."""
    random_values = np.asarray(random_values, np.float64)
    mean, std = random_values.mean(), random_values.std(ddof=1)
    gain = mean - value if LOWER_IS_BETTER.get(metric, False) else value - mean
    if std == 0:
        return 0.0 if gain == 0 else float(np.sign(gain) * np.inf)
    return float(gain / std)


#: Bootstrap resamples of the images behind the detection stds (fixed seed: the report is reproducible).
BOOTSTRAP = 200


def _rank_statistics(bad: np.ndarray, scores: np.ndarray, quality: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """AUROC of ``scores`` for ``bad`` and Spearman ρ(scores, −quality), per row of (R, n) arrays.

    AUROC by the Mann–Whitney U statistic on mid-ranks (ties count one half, as in
    ``sklearn.metrics.roc_auc_score``); NaN for a row without both classes. Spearman is the Pearson
    correlation of the mid-ranks (as ``scipy.stats.spearmanr``).
    """
    n = scores.shape[1]
    score_ranks = rankdata(scores, axis=1)
    positives = bad.sum(axis=1)
    negatives = n - positives
    u = (score_ranks * bad).sum(axis=1) - positives * (positives + 1) / 2
    with np.errstate(invalid="ignore", divide="ignore"):
        auroc = np.where((positives > 0) & (negatives > 0), u / (positives * negatives), np.nan)
    a = score_ranks - score_ranks.mean(axis=1, keepdims=True)
    b = rankdata(-quality, axis=1)
    b = b - b.mean(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        rho = (a * b).sum(axis=1) / np.sqrt((a * a).sum(axis=1) * (b * b).sum(axis=1))
    return auroc, rho


def detection(scores: np.ndarray, quality: np.ndarray, bad_fraction: float) -> dict[str, float]:
    """AUROC of the score for the ``bad_fraction`` lowest-quality images, and Spearman ρ(score, −quality),
    each with its std over ``BOOTSTRAP`` resamples of the images (with replacement).

    Both read 'higher = the score finds worse images'; AUROC 0.5 and ρ 0 are chance. The bad set is
    fixed before resampling, so the std is that of the statistic over the images, not of the oracle.
    """
    scores, quality = np.asarray(scores, np.float64), np.asarray(quality, np.float64)
    bad = np.zeros(len(quality), bool)
    bad[np.argsort(quality, kind="stable")[: max(1, int(round(bad_fraction * len(quality))))]] = True
    auroc, rho = _rank_statistics(bad[None], scores[None], quality[None])
    rows = np.random.default_rng(0).integers(0, len(scores), (BOOTSTRAP, len(scores)))
    resampled_auroc, resampled_rho = _rank_statistics(bad[rows], scores[rows], quality[rows])
    return {
        "auroc": float(auroc[0]),
        "auroc_std": float(np.nanstd(resampled_auroc, ddof=1)),
        "spearman": float(rho[0]),
        "spearman_std": float(np.nanstd(resampled_rho, ddof=1)),
    }
