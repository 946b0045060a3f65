"""FlowMatchEulerDiscreteScheduler: the model predicts the velocity v = ε − x_0 (docs/MATH.md §2).

Deterministic: x' = x + (σ_{k+1} − σ_k)·v. With ``stochastic_sampling``: x̂_0 = x − σ_k·v and
x' = (1 − σ_{k+1})·x̂_0 + σ_{k+1}·z, so a = 1 − σ_{k+1}, b = −σ_k·(1 − σ_{k+1}), c² = σ_{k+1}².
σ comes from the scheduler's table after ``set_timesteps`` (shift, dynamic shifting with ``mu``,
Karras/exponential/beta conversions, ``invert_sigmas`` all change only the table). It has no
``scale_model_input`` scaling and no ``init_noise_sigma``. Its ``step`` accepts ``s_churn``,
``s_tmin``, ``s_tmax`` and ``s_noise`` but ignores them.
"""

from __future__ import annotations

from diffusers import FlowMatchEulerDiscreteScheduler

from bayesdiff_ext.sampler.schedulers.base import AffineStep, SchedulerDescription

__all__ = ["FlowMatchEuler"]


class FlowMatchEuler(SchedulerDescription):
    schedulers = (FlowMatchEulerDiscreteScheduler,)
    prediction_types = ("flow_prediction",)

    @property
    def prediction_type(self) -> str:
        return "flow_prediction"

    def affine_steps(self) -> list[AffineStep]:
        sigmas = self.scheduler.sigmas.double().tolist()
        stochastic = self.config.stochastic_sampling
        steps = []
        for k, t in enumerate(self.scheduler.timesteps.tolist()):
            sigma, sigma_next = sigmas[k], sigmas[k + 1]
            if stochastic:
                a, b, c2 = 1.0 - sigma_next, -sigma * (1.0 - sigma_next), sigma_next**2
            else:
                a, b, c2 = 1.0, sigma_next - sigma, 0.0
            steps.append(AffineStep(k, t, k, a, (b,), c2))
        return steps
