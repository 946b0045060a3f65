"""DDIMScheduler (any η): x' = √ᾱ_{t'}·x̂_0 + √(1 − ᾱ_{t'} − σ_t²)·ε̂ + σ_t·z (docs/MATH.md §2)."""

from __future__ import annotations

import numpy as np
from diffusers import DDIMScheduler

from bayesdiff_ext.sampler.schedulers.base import AffineStep, SchedulerDescription, vp_prediction_forms

__all__ = ["DDIM"]


class DDIM(SchedulerDescription):
    """ᾱ from the scheduler's table, its previous timestep t − T/N (``final_alpha_cumprod`` past 0)."""

    schedulers = (DDIMScheduler,)
    step_options = {"eta": 0.0}

    def check(self) -> None:
        super().check()
        if self.options["eta"] < 0.0:
            raise ValueError(f"eta must be >= 0, got {self.options['eta']}")

    def affine_steps(self) -> list[AffineStep]:
        scheduler, eta = self.scheduler, self.options["eta"]
        alphas_cumprod = scheduler.alphas_cumprod.double().numpy()
        final = float(scheduler.final_alpha_cumprod)
        stride = self.config.num_train_timesteps // scheduler.num_inference_steps
        steps = []
        for k, t in enumerate(int(t) for t in scheduler.timesteps):
            prev = t - stride
            abar_t = alphas_cumprod[t]
            abar_prev = alphas_cumprod[prev] if prev >= 0 else final
            noise_var = eta**2 * (1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev)
            x0, eps = vp_prediction_forms(self.prediction_type, np.sqrt(abar_t), np.sqrt(1 - abar_t))
            form = np.sqrt(abar_prev) * x0 + np.sqrt(max(1 - abar_prev - noise_var, 0.0)) * eps
            steps.append(AffineStep(k, t, k, float(form[0]), (float(form[1]),), float(noise_var)))
        return steps
