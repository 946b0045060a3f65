"""EulerDiscreteScheduler: x' = x̂ + (σ_{k+1} − σ̂)·(x̂ − x̂_0)/σ̂ in the scheduler's σ-space (docs/MATH.md §2).

The model sees ``scale_model_input(x) = x/√(σ²+1)``; the step itself works on the unscaled sample.
With ``s_churn = 0`` (the default) x̂ = x and σ̂ = σ. With churn, diffusers adds fresh noise after
the model call, x̂ = x + s_noise·√(σ̂² − σ²)·z with σ̂ = σ·(1 + γ), and steps from x̂ with σ̂: still
affine in (x, output, z), so it is followed too (the churn noise is c²).
"""

from __future__ import annotations

import math

import numpy as np
from diffusers import EulerDiscreteScheduler

from bayesdiff_ext.sampler.schedulers.base import AffineStep, SchedulerDescription

__all__ = ["Euler", "predicted_original"]


def predicted_original(prediction_type: str, sample, out, sigma_hat: float, sigma: float):
    """x̂_0 as the Euler schedulers form it, on linear forms (or values) of the sample and the output."""
    if prediction_type == "epsilon":
        return sample - sigma_hat * out
    if prediction_type == "v_prediction":
        return out * (-sigma / math.sqrt(sigma**2 + 1)) + sample / (sigma**2 + 1)
    return out  # "sample" / "original_sample"


class Euler(SchedulerDescription):
    schedulers = (EulerDiscreteScheduler,)
    scales_model_input = True
    prediction_types = ("epsilon", "v_prediction", "sample", "original_sample")
    step_options = {"s_churn": 0.0, "s_tmin": 0.0, "s_tmax": float("inf"), "s_noise": 1.0}

    def affine_steps(self) -> list[AffineStep]:
        scheduler = self.scheduler
        s_churn, s_tmin, s_tmax, s_noise = (self.options[k] for k in ("s_churn", "s_tmin", "s_tmax", "s_noise"))
        sigmas = scheduler.sigmas.double().numpy()
        x, out, z = np.eye(3)
        steps = []
        for k, t in enumerate(scheduler.timesteps.tolist()):
            sigma = sigmas[k]
            # compared in the table's float32, as diffusers compares
            churned = s_tmin <= scheduler.sigmas[k] <= s_tmax
            gamma = min(s_churn / (len(sigmas) - 1), 2**0.5 - 1) if churned else 0.0
            sigma_hat = sigma * (gamma + 1)
            sample = x + s_noise * math.sqrt(sigma_hat**2 - sigma**2) * z if gamma > 0 else x
            derivative = (sample - predicted_original(self.prediction_type, sample, out, sigma_hat, sigma)) / sigma_hat
            form = sample + derivative * (sigmas[k + 1] - sigma_hat)
            steps.append(AffineStep(k, t, k, float(form[0]), (float(form[1]),), float(form[2] ** 2)))
        return steps
