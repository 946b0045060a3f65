"""Precision, recall, density and coverage from k-nearest-neighbour balls (Naeem et al., ICML 2020)."""

from __future__ import annotations

import numpy as np

from bayesdiff_ext.metrics._inputs import feature_matrix, same_width
from bayesdiff_ext.metrics.results import PRDC

# Distance-matrix entries per block: bounds memory (32 MiB of float64) for large sets.
_BLOCK_ENTRIES = 1 << 22


def _row_blocks(n_rows: int, n_cols: int):
    step = max(1, _BLOCK_ENTRIES // max(n_cols, 1))
    for start in range(0, n_rows, step):
        yield start, min(start + step, n_rows)


def euclidean_distances(x: np.ndarray, y: np.ndarray, y_sq: np.ndarray) -> np.ndarray:
    """‖x_i − y_j‖ via ‖x‖² + ‖y‖² − 2x·y (what sklearn's ``pairwise_distances`` does), clipped at 0."""
    sq = np.einsum("ij,ij->i", x, x)[:, None] + y_sq[None, :] - 2.0 * (x @ y.T)
    return np.sqrt(np.clip(sq, 0.0, None))


def knn_radii(x: np.ndarray, k: int) -> np.ndarray:
    """Distance from each row of x to its k-th nearest other row of x.

    As in the official ``prdc`` package this is the (k+1)-th smallest distance with the point itself
    (distance 0) included, so exact duplicates count as neighbours.
    """
    x_sq = np.einsum("ij,ij->i", x, x)
    radii = np.empty(x.shape[0])
    for start, stop in _row_blocks(x.shape[0], x.shape[0]):
        dist = euclidean_distances(x[start:stop], x, x_sq)
        # Self-distances are 0 exactly; the expanded formula leaves round-off there.
        dist[np.arange(stop - start), np.arange(start, stop)] = 0.0
        radii[start:stop] = np.partition(dist, k, axis=1)[:, k]
    return radii


def prdc(real, fake, k: int = 5) -> PRDC:
    r"""
    Precision, recall, density and coverage of a generated set against a real one (docs/MATH.md §3).

    The definitions of the official `prdc` package (clovaai/generative-evaluation-prdc), with r(·) the
    distance to the k-th nearest neighbour within the point's own set and strict "<":

    * precision — fraction of fakes inside at least one real ball B(x_i, r(x_i));
    * recall    — fraction of reals inside at least one fake ball B(y_j, r(y_j));
    * density   — (1/(kM)) Σ_j #{i : y_j ∈ B(x_i, r(x_i))};
    * coverage  — fraction of reals whose nearest fake lies inside their own ball.

    Args:
        real (`numpy.ndarray` or `torch.Tensor` of shape `(N, d)`):
            The real features.
        fake (`numpy.ndarray` or `torch.Tensor` of shape `(M, d)`):
            The generated features.
        k (`int`, *optional*, defaults to 5):
            The neighbour that sets each ball's radius; k < N and k < M.

    Returns:
        `PRDC`: `(precision, recall, density, coverage)`, distances computed in float64.
    """
    xr = feature_matrix(real, "real")
    xf = feature_matrix(fake, "fake")
    same_width(xr, xf, "real", "fake")
    if not (isinstance(k, int) and k >= 1):
        raise ValueError(f"k: expected a positive int, got {k!r}")
    if k >= xr.shape[0] or k >= xf.shape[0]:
        raise ValueError(
            f"k: must be smaller than both set sizes "
            f"(real has {xr.shape[0]} rows, fake has {xf.shape[0]}), got {k}"
        )

    real_radii = knn_radii(xr, k)
    fake_radii = knn_radii(xf, k)
    fake_sq = np.einsum("ij,ij->i", xf, xf)

    fake_in_some_real_ball = np.zeros(xf.shape[0], dtype=bool)
    real_balls_per_fake = np.zeros(xf.shape[0], dtype=np.int64)
    real_in_some_fake_ball = np.empty(xr.shape[0], dtype=bool)
    real_ball_has_fake = np.empty(xr.shape[0], dtype=bool)
    for start, stop in _row_blocks(xr.shape[0], xf.shape[0]):
        dist = euclidean_distances(xr[start:stop], xf, fake_sq)
        in_real_ball = dist < real_radii[start:stop, None]
        fake_in_some_real_ball |= in_real_ball.any(axis=0)
        real_balls_per_fake += in_real_ball.sum(axis=0)
        real_in_some_fake_ball[start:stop] = (dist < fake_radii[None, :]).any(axis=1)
        real_ball_has_fake[start:stop] = dist.min(axis=1) < real_radii[start:stop]

    return PRDC(
        precision=float(fake_in_some_real_ball.mean()),
        recall=float(real_in_some_fake_ball.mean()),
        density=float(real_balls_per_fake.sum() / (k * xf.shape[0])),
        coverage=float(real_ball_has_fake.mean()),
    )
