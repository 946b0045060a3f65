"""Scheduler families, each described once as affine steps for the moment recurrence (docs/MATH.md §2).

``describe(scheduler, eta=..., **options)`` returns the description of ``scheduler``'s family
(:class:`~bayesdiff_ext.sampler.schedulers.base.SchedulerDescription`); its ``steps()`` are the
:class:`AffineStep` s the step engine runs. Supporting another scheduler means adding one module
here with one description class and listing it in ``DESCRIPTIONS``.
"""

from __future__ import annotations

from typing import Any

from bayesdiff_ext.sampler.schedulers.base import AffineStep, SchedulerDescription
from bayesdiff_ext.sampler.schedulers.ddim import DDIM
from bayesdiff_ext.sampler.schedulers.ddpm import DDPM
from bayesdiff_ext.sampler.schedulers.dpm_singlestep import DPMSolverSinglestep
from bayesdiff_ext.sampler.schedulers.euler import Euler
from bayesdiff_ext.sampler.schedulers.euler_ancestral import EulerAncestral
from bayesdiff_ext.sampler.schedulers.flow_match_euler import FlowMatchEuler

__all__ = ["DESCRIPTIONS", "AffineStep", "SchedulerDescription", "check_supported", "describe", "step_coefficients"]

DESCRIPTIONS: tuple[type[SchedulerDescription], ...] = (
    DDIM,
    DDPM,
    DPMSolverSinglestep,
    Euler,
    EulerAncestral,
    FlowMatchEuler,
)


def describe(scheduler, eta: float = 0.0, **options: Any) -> SchedulerDescription:
    """The description of ``scheduler``'s family with these ``scheduler.step`` settings; ValueError if unsupported."""
    for description in DESCRIPTIONS:
        if isinstance(scheduler, description.schedulers):
            return description(scheduler, {"eta": eta, **options})
    names = ", ".join(cls.__name__ for d in DESCRIPTIONS for cls in d.schedulers)
    raise ValueError(f"scheduler must be one of {names}; got {type(scheduler).__name__}")


def check_supported(scheduler, eta: float = 0.0, **options: Any) -> None:
    """Raise ValueError unless every step of ``scheduler`` (with these step settings) is affine."""
    describe(scheduler, eta, **options)


def step_coefficients(scheduler, eta: float = 0.0, **options: Any) -> list[AffineStep]:
    """The affine form of every step of ``scheduler.timesteps`` (call ``set_timesteps`` first)."""
    return describe(scheduler, eta, **options).steps()
