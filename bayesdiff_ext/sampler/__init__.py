"""The BayesDiff sampler: the scheduler loop with per-pixel moments carried alongside (docs/MATH.md §2)."""

from bayesdiff_ext.sampler.results import BayesDiffOutput
from bayesdiff_ext.sampler.sampler import BayesDiffSampler

__all__ = ["BayesDiffOutput", "BayesDiffSampler"]
