"""Per-image uncertainty scores from a per-pixel variance map, and the rules that filter on them.

Layer 5 of docs/ARCHITECTURE.md: pure functions on tensors (numpy arrays are accepted too); no model,
no files. A variance map is Var[x_0] with shape (B, C, H, W); every score is a float64 tensor (B,)
on the map's device, so long sums over float32/16-bit maps do not lose precision.

Aggregations (docs/MATH.md §3), by name in :data:`AGGREGATIONS`::

    sum          Σ over C, H, W                      (BayesDiff's score)
    mean         mean over C, H, W
    max          max over C, H, W
    percentile   q-th percentile over C, H, W        (q in [0, 100], linear interpolation)
    patch_max    max over non-overlapping p×p patches of the patch mean (channels averaged too)
    masked_mean  Σ w·v / Σ w with a non-negative weight mask broadcastable to the map

:func:`per_channel` applies any of them to each channel separately, giving (B, C).

Filtering rules, by name in :data:`FILTER_RULES`, return a :class:`FilterDecision`::

    mean_plus_std  remove score > μ + k·σ of the batch  (BayesDiff's rule with k = 1, the default)
    top_k          remove the k highest scores
    quantile       keep score ≤ the q-quantile of the batch  (q in [0, 1])
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from bayesdiff_ext.numerics import per_image_sum

__all__ = [
    "AGGREGATIONS",
    "FILTER_RULES",
    "FilterDecision",
    "aggregate",
    "aggregate_many",
    "check_aggregation",
    "check_filter",
    "filter_scores",
    "per_channel",
    "score_masked_mean",
    "score_max",
    "score_mean",
    "score_patch_max",
    "score_percentile",
    "score_sum",
]


# --------------------------------------------------------------------------------------------
# inputs and scalar parameters
# --------------------------------------------------------------------------------------------
def _as_tensor(name: str, x) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x)
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor or numpy array, got {type(x).__name__}")
    return x


def _variance_map(variance) -> torch.Tensor:
    v = _as_tensor("variance", variance)
    if v.dim() != 4:
        raise ValueError(f"`variance` must have shape (B, C, H, W), got {tuple(v.shape)}")
    if v.numel() == 0:
        raise ValueError(f"`variance` must not be empty, got shape {tuple(v.shape)}")
    if not v.is_floating_point():
        raise ValueError(f"`variance` must be a floating-point tensor, got dtype {v.dtype}")
    return v.to(torch.float64)


def _real(name: str, value, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"`{name}` must be a finite number in [{low:g}, {high:g}], got {value!r}")
    if not low <= value <= high:
        raise ValueError(f"`{name}` must be in [{low:g}, {high:g}], got {value!r}")
    return float(value)


def _count(name: str, value, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise ValueError(f"`{name}` must be an integer >= {low}, got {value!r}")
    return int(value)


def _linear_quantile(rows_sorted: torch.Tensor, q: float) -> torch.Tensor:
    """The q-quantile (q in [0, 1]) of each row of an ascending-sorted (R, N) tensor, interpolated
    linearly between order statistics like numpy's default. Written out because torch.quantile
    refuses inputs above 2**24 elements, which a batch of 256x256 RGB maps exceeds."""
    n = rows_sorted.shape[1]
    pos = q * (n - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, n - 1)
    frac = pos - lo
    return rows_sorted[:, lo] + frac * (rows_sorted[:, hi] - rows_sorted[:, lo])


# --------------------------------------------------------------------------------------------
# aggregations: (B, C, H, W) -> (B,)
# --------------------------------------------------------------------------------------------
def score_sum(variance) -> torch.Tensor:
    """Σ of the variance over channels and pixels: BayesDiff's image score."""
    return per_image_sum(_variance_map(variance))


def score_mean(variance) -> torch.Tensor:
    """Mean of the variance over channels and pixels (the sum divided by C·H·W)."""
    return _variance_map(variance).mean(dim=(1, 2, 3))


def score_max(variance) -> torch.Tensor:
    """Largest per-pixel, per-channel variance."""
    return _variance_map(variance).amax(dim=(1, 2, 3))


def score_percentile(variance, q: float = 95.0) -> torch.Tensor:
    """The q-th percentile (q in [0, 100]) of the C·H·W variances of each image, linearly
    interpolated between order statistics (numpy's default); q = 50 is the median, q = 100 the max."""
    q = _real("q", q, 0.0, 100.0)
    v = _variance_map(variance)
    return _linear_quantile(v.flatten(1).sort(dim=1).values, q / 100.0)


def score_patch_max(variance, patch: int = 4) -> torch.Tensor:
    """Mean variance of each non-overlapping ``patch``×``patch`` window (over all channels), then
    the largest window mean: a score for a small, localised region of high uncertainty.

    Windows tile the image from the top-left corner. When H or W is not a multiple of ``patch``,
    the last row/column of windows is cut short and averaged over the pixels it actually covers
    (so no pixel is ignored and no zero padding dilutes a border window). A ``patch`` at least
    as large as the image gives one window: the image mean.
    """
    patch = _count("patch", patch, 1)
    v = _variance_map(variance)
    b, c, h, w = v.shape
    nh, nw = -(-h // patch), -(-w // patch)
    pad = (0, nw * patch - w, 0, nh * patch - h)
    sums = F.pad(v, pad).reshape(b, c, nh, patch, nw, patch).sum(dim=(1, 3, 5))
    ones = torch.ones((1, 1, h, w), dtype=v.dtype, device=v.device)
    counts = F.pad(ones, pad).reshape(1, 1, nh, patch, nw, patch).sum(dim=(1, 3, 5)) * c
    return (sums / counts).flatten(1).amax(dim=1)


def score_masked_mean(variance, mask) -> torch.Tensor:
    """Mask-weighted mean Σ w·v / Σ w per image, w = ``mask`` broadcast to (B, C, H, W).

    ``mask`` holds non-negative weights (a bool or 0/1 foreground mask, or a soft saliency map) of
    any shape that broadcasts to the variance map: (H, W), (1, 1, H, W), (B, 1, H, W), (B, C, H, W).
    The weights are normalised per image, so their scale does not matter; an image whose weights
    are all zero has no masked mean and raises ValueError.
    """
    v = _variance_map(variance)
    m = _as_tensor("mask", mask)
    if m.is_complex():
        raise ValueError(f"`mask` must hold real non-negative weights, got dtype {m.dtype}")
    m = m.to(device=v.device, dtype=torch.float64)
    try:
        shape = torch.broadcast_shapes(m.shape, v.shape)
    except RuntimeError:
        shape = None
    if shape != v.shape:
        raise ValueError(
            f"`mask` of shape {tuple(m.shape)} does not broadcast to the variance map's shape "
            f"{tuple(v.shape)} (B, C, H, W)"
        )
    if not bool(torch.isfinite(m).all()) or bool((m < 0).any()):
        raise ValueError("`mask` must hold finite, non-negative weights")
    w = m.expand(v.shape)
    total = w.sum(dim=(1, 2, 3))
    empty = torch.nonzero(total == 0).flatten().tolist()
    if empty:
        raise ValueError(f"`mask` is all zero for image(s) {empty}: each image needs a positive weight")
    return (w * v).sum(dim=(1, 2, 3)) / total


@dataclass(frozen=True)
class _Entry:
    fn: Callable[..., object]
    description: str
    checks: Mapping[str, Callable[[object], object]] = field(default_factory=dict)


AGGREGATIONS: dict[str, _Entry] = {
    "sum": _Entry(score_sum, "sum over channels and pixels (BayesDiff's score)"),
    "mean": _Entry(score_mean, "mean over channels and pixels"),
    "max": _Entry(score_max, "largest per-pixel variance"),
    "percentile": _Entry(
        score_percentile,
        "q-th percentile of the per-pixel variances (q=95)",
        {"q": lambda q: _real("q", q, 0.0, 100.0)},
    ),
    "patch_max": _Entry(
        score_patch_max,
        "largest mean over non-overlapping patch x patch windows (patch=4)",
        {"patch": lambda p: _count("patch", p, 1)},
    ),
    "masked_mean": _Entry(score_masked_mean, "mask-weighted mean (needs mask=...)"),
}


def _check_entry(kind: str, registry: Mapping[str, _Entry], name: str, params: Mapping) -> _Entry:
    if name not in registry:
        raise ValueError(f"unknown {kind} {name!r}; valid: {', '.join(registry)}")
    entry = registry[name]
    accepted = list(inspect.signature(entry.fn).parameters)[1:]
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        takes = f"its parameters are {', '.join(accepted)}" if accepted else "it takes no parameters"
        raise ValueError(f"{kind} {name!r} got unexpected parameter(s) {', '.join(unknown)}; {takes}")
    try:
        inspect.signature(entry.fn).bind(None, **params)
    except TypeError as err:
        raise ValueError(f"{kind} {name!r}: {err}") from None
    for key, value in params.items():
        if key in entry.checks:
            entry.checks[key](value)
    return entry


def check_aggregation(method: str, params: Mapping | None = None) -> None:
    """Raise ValueError unless ``method`` names an aggregation and ``params`` suit it (without
    needing a variance map: lets a caller reject bad settings before any sampling)."""
    _check_entry("aggregation", AGGREGATIONS, method, params or {})


def aggregate(variance, method: str = "sum", **params) -> torch.Tensor:
    """Per-image scores (B,) float64 of a variance map (B, C, H, W) under the named aggregation.

    ``aggregate(var, "percentile", q=90)``; see :data:`AGGREGATIONS` for the names.
    """
    return _check_entry("aggregation", AGGREGATIONS, method, params).fn(variance, **params)


def aggregate_many(variance, methods: Mapping[str, Mapping]) -> dict[str, torch.Tensor]:
    """Scores under several aggregations at once: ``{name: params}`` -> ``{name: scores (B,)}``."""
    return {name: aggregate(variance, name, **dict(params)) for name, params in methods.items()}


def per_channel(variance, method: str = "sum", **params) -> torch.Tensor:
    """The named aggregation applied to each channel separately: scores (B, C) float64.

    A ``mask`` for ``masked_mean`` is broadcast to the full (B, C, H, W) map first, so a
    per-channel mask selects per channel.
    """
    v = _variance_map(variance)
    b, c, h, w = v.shape
    if "mask" in params:
        mask = _as_tensor("mask", params["mask"]).to(v.device)
        try:
            mask = mask.expand(v.shape)
        except RuntimeError:
            raise ValueError(
                f"`mask` of shape {tuple(mask.shape)} does not broadcast to the variance map's shape "
                f"{tuple(v.shape)} (B, C, H, W)"
            ) from None
        params = {**params, "mask": mask.reshape(b * c, 1, h, w)}
    return aggregate(v.reshape(b * c, 1, h, w), method, **params).reshape(b, c)


# --------------------------------------------------------------------------------------------
# filtering: scores (B,) -> which images to keep
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FilterDecision:
    """Which images a filtering rule keeps. ``kept`` and ``removed`` are ascending int64 index
    tensors that partition ``range(B)``; ``keep`` is the (B,) bool mask; ``threshold`` is the score
    above which images were removed (None for ``top_k``, which cuts by rank)."""

    rule: str
    params: dict
    threshold: float | None
    keep: torch.Tensor

    @property
    def kept(self) -> torch.Tensor:
        return torch.nonzero(self.keep).flatten()

    @property
    def removed(self) -> torch.Tensor:
        return torch.nonzero(~self.keep).flatten()

    def to_dict(self) -> dict:
        """JSON-ready summary: rule, params, threshold, kept and removed indices."""
        return {
            "rule": self.rule,
            "params": dict(self.params),
            "threshold": self.threshold,
            "kept": self.kept.tolist(),
            "removed": self.removed.tolist(),
        }


def _scores(scores) -> torch.Tensor:
    s = _as_tensor("scores", scores)
    if s.dim() != 1 or s.numel() == 0:
        raise ValueError(f"`scores` must be a non-empty 1-D tensor (B,), got shape {tuple(s.shape)}")
    s = s.to(torch.float64)
    bad = torch.nonzero(~torch.isfinite(s)).flatten().tolist()
    if bad:
        raise ValueError(f"`scores` must be finite, but image(s) {bad} have NaN or infinite scores")
    return s


def _mean_plus_std(scores: torch.Tensor, num_std: float = 1.0) -> tuple[float, torch.Tensor]:
    # Population standard deviation (ddof = 0, numpy's default): the batch is the population.
    threshold = float(scores.mean() + num_std * scores.std(correction=0))
    return threshold, scores <= threshold


def _top_k(scores: torch.Tensor, k: int) -> tuple[None, torch.Tensor]:
    if k > scores.numel():
        raise ValueError(f"`k` = {k} exceeds the number of images ({scores.numel()})")
    # Stable descending order: among equal scores the lower index is removed first.
    order = torch.sort(scores, descending=True, stable=True).indices
    keep = torch.ones_like(scores, dtype=torch.bool)
    keep[order[:k]] = False
    return None, keep


def _quantile(scores: torch.Tensor, q: float = 0.84) -> tuple[float, torch.Tensor]:
    threshold = float(_linear_quantile(scores.sort().values[None], q)[0])
    return threshold, scores <= threshold


FILTER_RULES: dict[str, _Entry] = {
    "mean_plus_std": _Entry(
        _mean_plus_std,
        "remove score > mean + num_std * std of the batch (num_std=1, BayesDiff's rule)",
        {"num_std": lambda k: _real("num_std", k, -math.inf, math.inf)},
    ),
    "top_k": _Entry(
        _top_k, "remove the k most uncertain images (needs k=...)", {"k": lambda k: _count("k", k, 0)}
    ),
    "quantile": _Entry(
        _quantile,
        "keep scores <= the q-quantile of the batch (q=0.84)",
        {"q": lambda q: _real("q", q, 0.0, 1.0)},
    ),
}


def check_filter(rule: str, params: Mapping | None = None) -> None:
    """Raise ValueError unless ``rule`` names a filtering rule and ``params`` suit it."""
    _check_entry("filter rule", FILTER_RULES, rule, params or {})


def filter_scores(scores, rule: str = "mean_plus_std", **params) -> FilterDecision:
    """Apply a filtering rule to per-image scores (B,): ``filter_scores(s, "top_k", k=8)``.

    Higher score = more uncertain = removed first. Scores must be finite.
    """
    entry = _check_entry("filter rule", FILTER_RULES, rule, params)
    s = _scores(scores)
    threshold, keep = entry.fn(s, **params)
    return FilterDecision(rule=rule, params=dict(params), threshold=threshold, keep=keep.cpu())
