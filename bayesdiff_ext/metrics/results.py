"""Named result tuples shared by the metrics."""

from __future__ import annotations

from typing import NamedTuple


class MeanStd(NamedTuple):
    """A metric averaged over subsets or splits: the mean and the (population) standard deviation."""

    mean: float
    std: float


class PRDC(NamedTuple):
    """Precision, recall, density and coverage of a fake set against a real set (Naeem et al. 2020)."""

    precision: float
    recall: float
    density: float
    coverage: float
