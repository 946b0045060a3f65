"""DPMSolverSinglestepScheduler, orders 1 and 2, midpoint or heun, as diffusers implements them (docs/MATH.md §2)."""

from __future__ import annotations

import numpy as np
from diffusers import DPMSolverSinglestepScheduler

from bayesdiff_ext.sampler.schedulers.base import AffineStep, SchedulerDescription, vp_prediction_forms

__all__ = ["DPMSolverSinglestep"]


class DPMSolverSinglestep(SchedulerDescription):
    """A second-order step k restarts from the sample x_s saved at the first-order step k − 1 (whose
    output x_{s1} is the intermediate point) and combines both model outputs; over the variables
    (x_s, out_s, out_{s1}) everything the scheduler computes is a linear form, x_{s1} included.
    """

    schedulers = (DPMSolverSinglestepScheduler,)

    def check(self) -> None:
        super().check()
        config = self.config
        if config.solver_order not in (1, 2):
            raise ValueError(f"DPMSolverSinglestepScheduler needs solver_order 1 or 2, got {config.solver_order}")
        if config.algorithm_type not in ("dpmsolver", "dpmsolver++"):
            raise ValueError(
                f"DPMSolverSinglestepScheduler algorithm_type={config.algorithm_type!r} is not supported; "
                "use 'dpmsolver' or 'dpmsolver++'"
            )
        if config.get("use_flow_sigmas", False):
            raise ValueError("DPMSolverSinglestepScheduler with use_flow_sigmas=True is not supported")

    def affine_steps(self) -> list[AffineStep]:
        scheduler, config = self.scheduler, self.config
        sigmas = scheduler.sigmas.double().numpy()
        alphas = 1.0 / np.sqrt(sigmas**2 + 1.0)
        stds = sigmas * alphas
        with np.errstate(divide="ignore"):
            lambdas = np.log(alphas) - np.log(stds)  # +inf at a final sigma of 0, handled by exp(-inf) = 0
        data_prediction = config.algorithm_type == "dpmsolver++"

        def converted(k: int, x: np.ndarray, out: np.ndarray) -> np.ndarray:
            """What convert_model_output returns at step k: x̂_0 (dpmsolver++) or ε̂ (dpmsolver)."""
            x0, eps = vp_prediction_forms(self.prediction_type, alphas[k], stds[k])
            form = x0 if data_prediction else eps
            return form[0] * x + form[1] * out

        def first_order(k: int, x: np.ndarray, d: np.ndarray) -> np.ndarray:
            h = lambdas[k + 1] - lambdas[k]
            if data_prediction:
                return stds[k + 1] / stds[k] * x - alphas[k + 1] * np.expm1(-h) * d
            return alphas[k + 1] / alphas[k] * x - stds[k + 1] * np.expm1(h) * d

        def second_order(k: int, x_s: np.ndarray, d_s: np.ndarray, d_mid: np.ndarray) -> np.ndarray:
            t, mid, s = k + 1, k, k - 1
            h = lambdas[t] - lambdas[s]
            r0 = (lambdas[mid] - lambdas[s]) / h
            d0, d1 = d_s, (d_mid - d_s) / r0
            if data_prediction:
                base = stds[t] / stds[s] * x_s - alphas[t] * np.expm1(-h) * d0
                if config.solver_type == "midpoint":
                    return base - 0.5 * alphas[t] * np.expm1(-h) * d1
                return base + alphas[t] * (np.expm1(-h) / h + 1.0) * d1
            base = alphas[t] / alphas[s] * x_s - stds[t] * np.expm1(h) * d0
            if config.solver_type == "midpoint":
                return base - 0.5 * stds[t] * np.expm1(h) * d1
            return base - stds[t] * (np.expm1(h) / h - 1.0) * d1

        steps = []
        for k, t in enumerate(int(t) for t in scheduler.timesteps):
            order = min(scheduler.order_list[k], k + 1)  # diffusers lowers the order until outputs exist
            if order == 1:
                x, out = np.array([1.0, 0.0]), np.array([0.0, 1.0])
                form = first_order(k, x, converted(k, x, out))
                steps.append(AffineStep(k, t, k, float(form[0]), (float(form[1]),), 0.0))
                continue
            if steps[-1].origin != k - 1:
                raise ValueError(
                    f"DPMSolverSinglestepScheduler step {k}: a second-order step must follow a first-order one"
                )
            x_s, out_s, out_mid = np.eye(3)
            x_mid = first_order(k - 1, x_s, converted(k - 1, x_s, out_s))
            form = second_order(k, x_s, converted(k - 1, x_s, out_s), converted(k, x_mid, out_mid))
            steps.append(AffineStep(k, t, k - 1, float(form[0]), (float(form[1]), float(form[2])), 0.0))
        return steps
