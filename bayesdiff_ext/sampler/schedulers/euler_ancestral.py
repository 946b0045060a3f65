"""EulerAncestralDiscreteScheduler: an Euler step to σ_down plus noise of variance σ_up² (docs/MATH.md §2).

σ_up = √(σ_{k+1}²(σ_k² − σ_{k+1}²)/σ_k²), σ_down = √(σ_{k+1}² − σ_up²); the model sees
``scale_model_input(x) = x/√(σ²+1)``. diffusers does not implement ``prediction_type='sample'`` here.
"""

from __future__ import annotations

import math

import numpy as np
from diffusers import EulerAncestralDiscreteScheduler

from bayesdiff_ext.sampler.schedulers.base import AffineStep, SchedulerDescription
from bayesdiff_ext.sampler.schedulers.euler import predicted_original

__all__ = ["EulerAncestral"]


class EulerAncestral(SchedulerDescription):
    schedulers = (EulerAncestralDiscreteScheduler,)
    scales_model_input = True
    prediction_types = ("epsilon", "v_prediction")

    def affine_steps(self) -> list[AffineStep]:
        scheduler = self.scheduler
        sigmas = scheduler.sigmas.double().numpy()
        x, out = np.eye(2)
        steps = []
        for k, t in enumerate(scheduler.timesteps.tolist()):
            sigma, sigma_to = sigmas[k], sigmas[k + 1]
            sigma_up = math.sqrt(sigma_to**2 * (sigma**2 - sigma_to**2) / sigma**2)
            sigma_down = math.sqrt(sigma_to**2 - sigma_up**2)
            derivative = (x - predicted_original(self.prediction_type, x, out, sigma, sigma)) / sigma
            form = x + derivative * (sigma_down - sigma)
            steps.append(AffineStep(k, t, k, float(form[0]), (float(form[1]),), sigma_up**2))
        return steps
