"""What describing a scheduler family means: its steps as affine maps, its settings, its checks.

For every supported scheduler, step ``k`` (the ``k``-th model call) is

    x_{k+1} = a·x_{origin} + Σ_j b_j·out_j + c·z,      z ~ N(0, I),

where ``out_j`` are the raw model outputs at the steps ``origin … k``. ``origin == k`` except for
the second stage of a two-stage step (DPM-Solver-2), which restarts from the sample at ``k − 1`` and
uses both outputs. Coefficients are computed in float64 from the scheduler's *own* tables after
``scheduler.set_timesteps``, following its own arithmetic, so the moment recurrence follows the
exact path diffusers takes (docs/MATH.md §2). The model output may be ε, v, x̂_0 or a flow
velocity: every conversion between them is affine in (x, output), so each step stays affine in
the raw output that the head's posterior describes. Settings that make a step non-linear are
refused with a ValueError that names them.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from bayesdiff_ext.validation import nonlinear_scheduler_settings

__all__ = ["AffineStep", "SchedulerDescription", "vp_prediction_forms"]


@dataclass(frozen=True)
class AffineStep:
    """Step ``index``: x_{index+1} = a·x_{origin} + Σ_j b[j]·out_{origin+j} + c·z, with c² = ``c2``."""

    index: int
    timestep: float
    origin: int
    a: float
    b: tuple[float, ...]
    c2: float


class SchedulerDescription(abc.ABC):
    """One scheduler family, described once: which diffusers classes, which settings, the affine steps.

    Args:
        scheduler: a diffusers scheduler of one of ``schedulers``.
        options (`dict`, *optional*): keyword arguments of ``scheduler.step`` the family takes
            (``step_options``, e.g. DDIM's ``eta``); missing ones take their defaults.

    Subclasses set ``schedulers``, ``prediction_types``, ``step_options`` and
    ``scales_model_input``, extend :meth:`check`
    with the family's own refusals and implement :meth:`affine_steps`. Adding a scheduler to the
    package means adding one subclass (and its tests); the step engine needs nothing else.
    """

    schedulers: ClassVar[tuple[type, ...]]
    prediction_types: ClassVar[tuple[str, ...]] = ("epsilon", "v_prediction", "sample")
    step_options: ClassVar[dict[str, float]] = {}
    # The model sees scale_model_input(x, t) ≠ x (Euler: x/√(σ²+1)), with σ at the scheduler's
    # current step index: whoever calls the model must do so before the scheduler steps.
    scales_model_input: ClassVar[bool] = False

    def __init__(self, scheduler, options: Mapping[str, Any] | None = None) -> None:
        self.scheduler = scheduler
        self.name = type(scheduler).__name__
        self.options = self._check_options(dict(options or {}))
        self.check()

    @property
    def config(self):
        return self.scheduler.config

    @property
    def prediction_type(self) -> str:
        """What the model outputs, as the scheduler's config names it."""
        return self.config.prediction_type

    def check(self) -> None:
        """Raise ValueError unless every step is affine in (sample, model output) with fixed noise."""
        for setting, effect in nonlinear_scheduler_settings(self.config).items():
            raise ValueError(
                f"{self.name} has {setting}=True, which {effect} and makes the step non-linear: the moment "
                f"recurrence needs affine steps; pass {setting}=False "
                f"(e.g. {self.name}.from_config(scheduler.config, {setting}=False))"
            )
        if self.prediction_type not in self.prediction_types:
            raise ValueError(
                f"{self.name} has prediction_type={self.prediction_type!r}; expected one of {self.prediction_types}"
            )

    def _check_options(self, options: dict[str, Any]) -> dict[str, Any]:
        for key, value in options.items():
            if key in self.step_options:
                continue
            if key == "eta" and value == 0.0:  # every sampler call passes eta; 0 means "not used"
                continue
            if key == "eta":
                raise ValueError(f"eta={value} applies to DDIMScheduler only; {self.name} takes eta=0")
            raise ValueError(
                f"{key}={value!r} is not a setting of {self.name}.step that the sampler follows; "
                f"it takes {sorted(self.step_options) or 'none'}"
            )
        return {key: options.get(key, default) for key, default in self.step_options.items()}

    def step_kwargs(self) -> dict[str, Any]:
        """The keyword arguments to pass to ``scheduler.step`` besides the output, timestep and sample."""
        return dict(self.options)

    def steps(self) -> list[AffineStep]:
        """The affine form of every step of ``scheduler.timesteps`` (call ``set_timesteps`` first)."""
        scheduler = self.scheduler
        if getattr(scheduler, "num_inference_steps", None) is None and not getattr(
            scheduler, "custom_timesteps", False
        ):
            raise ValueError(f"call scheduler.set_timesteps(num_inference_steps) before describing {self.name}'s steps")
        return self.affine_steps()

    @abc.abstractmethod
    def affine_steps(self) -> list[AffineStep]:
        """The steps' coefficients from the scheduler's tables (``set_timesteps`` has been called)."""


def vp_prediction_forms(prediction_type: str, alpha: float, sigma: float) -> tuple[np.ndarray, np.ndarray]:
    """x̂_0 and ε̂ as linear forms over (x, model output) for x = α·x_0 + σ·ε, as the VP schedulers convert them."""
    if prediction_type == "epsilon":
        return np.array([1.0 / alpha, -sigma / alpha]), np.array([0.0, 1.0])
    if prediction_type == "v_prediction":
        return np.array([alpha, -sigma]), np.array([sigma, alpha])
    return np.array([0.0, 1.0]), np.array([1.0 / sigma, -alpha / sigma])
