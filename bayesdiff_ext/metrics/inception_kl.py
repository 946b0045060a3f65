"""Inception Score: exp(E_x KL(p(y|x) ‖ p(y))) from class probabilities, mean ± std over splits."""

from __future__ import annotations

import numpy as np
from scipy.special import rel_entr

from bayesdiff_ext.metrics._inputs import feature_matrix
from bayesdiff_ext.metrics.results import MeanStd

# Softmax outputs in float16/float32 sum to 1 only up to their precision.
_ROW_SUM_TOLERANCE = 1e-3


def inception_score(probs, splits: int = 10) -> MeanStd:
    r"""
    The Inception Score of class probabilities (docs/MATH.md §3).

    The N rows are cut into `splits` contiguous parts (boundaries ⌊iN/splits⌋, as in the original code of
    Salimans et al.); in each, p(y) is the part's mean row and the score is exp(mean KL(p(y|x) ‖ p(y))) with
    0·log 0 = 0. The score lies in [1, C]: 1 when every row is the same, C for confident, balanced classes.

    Args:
        probs (`numpy.ndarray` or `torch.Tensor` of shape `(N, C)`):
            Rows p(y|x) (e.g. a softmax): non-negative, each summing to 1.
        splits (`int`, *optional*, defaults to 10):
            Parts, in [1, N].

    Returns:
        `MeanStd`: the mean and the population std of the score over the parts.
    """
    p = feature_matrix(probs, "probs")
    if (p < 0).any():
        raise ValueError(
            "probs: expected probabilities, found negative entries (pass softmax outputs, not logits)"
        )
    row_sums = p.sum(axis=1)
    if not np.allclose(row_sums, 1.0, rtol=0.0, atol=_ROW_SUM_TOLERANCE):
        worst = row_sums[np.argmax(np.abs(row_sums - 1.0))]
        raise ValueError(
            f"probs: every row must sum to 1 (a distribution over classes); found a row summing to {worst}"
        )
    n = p.shape[0]
    if not (isinstance(splits, int) and 1 <= splits <= n):
        raise ValueError(f"splits: expected an int in [1, N = {n}], got {splits!r}")

    scores = np.empty(splits)
    for i in range(splits):
        part = p[i * n // splits : (i + 1) * n // splits]
        marginal = part.mean(axis=0, keepdims=True)
        scores[i] = np.exp(rel_entr(part, marginal).sum(axis=1).mean())
    return MeanStd(float(scores.mean()), float(scores.std()))
