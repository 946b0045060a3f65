"""Estimators of the per-pixel Var[x_0 | x_T] (docs/MATH.md §2, §14): the moment recurrence
(:class:`BayesDiffSampler`, which also dispatches to the others), trajectory Monte Carlo
(:class:`TrajectorySampler`), and the settings that choose between them."""

from bayesdiff_ext.sampler.results import BayesDiffOutput
from bayesdiff_ext.sampler.sampler import BayesDiffSampler
from bayesdiff_ext.sampler.settings import UncertaintySettings, resolve_settings
from bayesdiff_ext.sampler.trajectories import TrajectorySampler

__all__ = ["BayesDiffOutput", "BayesDiffSampler", "TrajectorySampler", "UncertaintySettings", "resolve_settings"]
