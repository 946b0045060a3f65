"""DDPMScheduler: the posterior mean of x_{t'} given x̂_0, plus its noise (docs/MATH.md §2, §15).

A fixed variance is the step's c²; a learned one (``'learned_range'``, ``'learned'``) is per element
and comes from the model's output at each step (:mod:`~bayesdiff_ext.sampler.learned_variance`), so
its steps carry c² = 0 here and the caller adds the learned part.
"""

from __future__ import annotations

import numpy as np
from diffusers import DDPMScheduler

from bayesdiff_ext.sampler.learned_variance import LEARNED_VARIANCE_TYPES
from bayesdiff_ext.sampler.schedulers.base import AffineStep, SchedulerDescription, vp_prediction_forms

__all__ = ["DDPM"]

_FIXED_VARIANCES = ("fixed_small", "fixed_small_log", "fixed_large")


class DDPM(SchedulerDescription):
    """ᾱ from the scheduler's table and its own ``previous_timestep``; c² the fixed variance (0 for a learned one)."""

    schedulers = (DDPMScheduler,)

    def check(self) -> None:
        super().check()
        if self.config.variance_type not in _FIXED_VARIANCES + LEARNED_VARIANCE_TYPES:
            raise ValueError(
                f"DDPMScheduler variance_type={self.config.variance_type!r} is not supported: the step noise must "
                f"be one of {_FIXED_VARIANCES + LEARNED_VARIANCE_TYPES}"
            )

    def affine_steps(self) -> list[AffineStep]:
        scheduler = self.scheduler
        alphas_cumprod = scheduler.alphas_cumprod.double().numpy()
        steps = []
        for k, t in enumerate(int(t) for t in scheduler.timesteps):
            prev = int(scheduler.previous_timestep(t))
            abar_t = alphas_cumprod[t]
            abar_prev = alphas_cumprod[prev] if prev >= 0 else 1.0
            alpha_t = abar_t / abar_prev
            beta_t = 1 - alpha_t
            x0, _ = vp_prediction_forms(self.prediction_type, np.sqrt(abar_t), np.sqrt(1 - abar_t))
            form = np.sqrt(abar_prev) * beta_t / (1 - abar_t) * x0
            form[0] += np.sqrt(alpha_t) * (1 - abar_prev) / (1 - abar_t)
            if t == 0 or self.config.variance_type in LEARNED_VARIANCE_TYPES:
                # diffusers adds no noise on the step to t = 0; a learned c² the caller adds per element
                noise_var = 0.0
            elif self.config.variance_type == "fixed_large":
                noise_var = beta_t
            else:  # fixed_small and fixed_small_log: the posterior variance, floored as diffusers does
                noise_var = max((1 - abar_prev) / (1 - abar_t) * beta_t, 1e-20)
            steps.append(AffineStep(k, t, k, float(form[0]), (float(form[1]),), float(noise_var)))
        return steps
