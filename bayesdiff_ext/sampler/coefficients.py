"""Each scheduler step as an affine map of the sample and the model outputs (docs/MATH.md §2).

For every supported scheduler, step ``k`` (the ``k``-th UNet call) is

    x_{k+1} = a·x_{origin} + Σ_j b_j·out_j + c·z,      z ~ N(0, I),

where ``out_j`` are the raw model outputs at the steps ``origin … k`` and ``origin == k`` except
for the second stage of a DPM-Solver-2 step, which restarts from the sample at ``k − 1`` and uses
both outputs. Coefficients are computed in float64 from the scheduler's *own* tables (``ᾱ`` for
DDIM/DDPM, ``sigmas`` for DPM-Solver) and its own previous-timestep rule, after
``scheduler.set_timesteps``, so the moment recurrence follows the exact path diffusers takes.

The model output may be ε, v or x̂_0 (``prediction_type``): every conversion between them is
affine in (x, output), so each step stays affine in the raw output that the head's posterior
describes. Non-linear steps (``clip_sample``, ``thresholding``) and stochastic or learned-variance
variants whose noise is not a fixed c² are rejected with a ValueError.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverSinglestepScheduler

__all__ = ["AffineStep", "check_supported", "step_coefficients"]

_PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


@dataclass(frozen=True)
class AffineStep:
    """Step ``index``: x_{index+1} = a·x_{origin} + Σ_j b[j]·out_{origin+j} + c·z, with c² = ``c2``."""

    index: int
    timestep: int
    origin: int
    a: float
    b: tuple[float, ...]
    c2: float


def check_supported(scheduler, eta: float = 0.0) -> None:
    """Raise ValueError unless every step of ``scheduler`` (with DDIM's ``eta``) is affine."""
    config = scheduler.config
    name = type(scheduler).__name__
    if not isinstance(scheduler, (DDIMScheduler, DDPMScheduler, DPMSolverSinglestepScheduler)):
        raise ValueError(
            f"scheduler must be a DDIMScheduler, DDPMScheduler or DPMSolverSinglestepScheduler, got {name}"
        )
    if config.get("clip_sample", False):
        raise ValueError(
            f"{name} has clip_sample=True, which clips x̂_0 and makes the step non-linear; "
            f"pass clip_sample=False (e.g. {name}.from_config(scheduler.config, clip_sample=False))"
        )
    if config.get("thresholding", False):
        raise ValueError(
            f"{name} has thresholding=True, which makes the step non-linear; pass thresholding=False"
        )
    if config.prediction_type not in _PREDICTION_TYPES:
        raise ValueError(
            f"{name} has prediction_type={config.prediction_type!r}; expected one of {_PREDICTION_TYPES}"
        )
    if eta != 0.0 and not isinstance(scheduler, DDIMScheduler):
        raise ValueError(f"eta={eta} applies to DDIMScheduler only; {name} takes eta=0")
    if eta < 0.0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    if isinstance(scheduler, DDPMScheduler) and config.variance_type not in (
        "fixed_small",
        "fixed_small_log",
        "fixed_large",
    ):
        raise ValueError(
            f"DDPMScheduler variance_type={config.variance_type!r} is not supported: the step noise must be a "
            "fixed c² ('fixed_small', 'fixed_small_log' or 'fixed_large')"
        )
    if isinstance(scheduler, DPMSolverSinglestepScheduler):
        if config.solver_order not in (1, 2):
            raise ValueError(
                f"DPMSolverSinglestepScheduler needs solver_order 1 or 2, got {config.solver_order}"
            )
        if config.algorithm_type not in ("dpmsolver", "dpmsolver++"):
            raise ValueError(
                f"DPMSolverSinglestepScheduler algorithm_type={config.algorithm_type!r} is not supported; "
                "use 'dpmsolver' or 'dpmsolver++'"
            )
        if config.get("use_flow_sigmas", False):
            raise ValueError("DPMSolverSinglestepScheduler with use_flow_sigmas=True is not supported")


def step_coefficients(scheduler, eta: float = 0.0) -> list[AffineStep]:
    """The affine form of every step of ``scheduler.timesteps`` (call ``set_timesteps`` first)."""
    check_supported(scheduler, eta)
    if scheduler.num_inference_steps is None and not getattr(scheduler, "custom_timesteps", False):
        raise ValueError("call scheduler.set_timesteps(num_inference_steps) before step_coefficients")
    if isinstance(scheduler, DDIMScheduler):
        return _ddim(scheduler, eta)
    if isinstance(scheduler, DDPMScheduler):
        return _ddpm(scheduler)
    return _dpm_solver_singlestep(scheduler)


def _as_x0_and_eps(prediction_type: str, alpha: float, sigma: float) -> tuple[np.ndarray, np.ndarray]:
    """x̂_0 and ε̂ as linear forms over (x, model output), as the schedulers convert them."""
    if prediction_type == "epsilon":
        return np.array([1.0 / alpha, -sigma / alpha]), np.array([0.0, 1.0])
    if prediction_type == "v_prediction":
        return np.array([alpha, -sigma]), np.array([sigma, alpha])
    return np.array([0.0, 1.0]), np.array([1.0 / sigma, -alpha / sigma])


def _ddim(scheduler, eta: float) -> list[AffineStep]:
    config = scheduler.config
    alphas_cumprod = scheduler.alphas_cumprod.double().numpy()
    final = float(scheduler.final_alpha_cumprod)
    stride = config.num_train_timesteps // scheduler.num_inference_steps
    steps = []
    for k, t in enumerate(int(t) for t in scheduler.timesteps):
        prev = t - stride
        abar_t = alphas_cumprod[t]
        abar_prev = alphas_cumprod[prev] if prev >= 0 else final
        noise_var = eta**2 * (1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev)
        x0, eps = _as_x0_and_eps(config.prediction_type, np.sqrt(abar_t), np.sqrt(1 - abar_t))
        form = np.sqrt(abar_prev) * x0 + np.sqrt(max(1 - abar_prev - noise_var, 0.0)) * eps
        steps.append(AffineStep(k, t, k, float(form[0]), (float(form[1]),), float(noise_var)))
    return steps


def _ddpm(scheduler) -> list[AffineStep]:
    config = scheduler.config
    alphas_cumprod = scheduler.alphas_cumprod.double().numpy()
    steps = []
    for k, t in enumerate(int(t) for t in scheduler.timesteps):
        prev = int(scheduler.previous_timestep(t))
        abar_t = alphas_cumprod[t]
        abar_prev = alphas_cumprod[prev] if prev >= 0 else 1.0
        alpha_t = abar_t / abar_prev
        beta_t = 1 - alpha_t
        x0, _ = _as_x0_and_eps(config.prediction_type, np.sqrt(abar_t), np.sqrt(1 - abar_t))
        form = np.sqrt(abar_prev) * beta_t / (1 - abar_t) * x0
        form[0] += np.sqrt(alpha_t) * (1 - abar_prev) / (1 - abar_t)
        if t == 0:  # diffusers adds no noise on the step to t = 0
            noise_var = 0.0
        elif config.variance_type == "fixed_large":
            noise_var = beta_t
        else:  # fixed_small and fixed_small_log: the posterior variance, floored as diffusers does
            noise_var = max((1 - abar_prev) / (1 - abar_t) * beta_t, 1e-20)
        steps.append(AffineStep(k, t, k, float(form[0]), (float(form[1]),), float(noise_var)))
    return steps


def _dpm_solver_singlestep(scheduler) -> list[AffineStep]:
    """DPM-Solver(++) singlestep, orders 1 and 2, midpoint or heun, as diffusers implements them.

    A second-order step k restarts from the sample x_s saved at the first-order step k − 1 (whose
    output x_{s1} is the intermediate point) and combines both model outputs; over the variables
    (x_s, out_s, out_{s1}) everything the scheduler computes is a linear form, x_{s1} included.
    """
    config = scheduler.config
    sigmas = scheduler.sigmas.double().numpy()
    alphas = 1.0 / np.sqrt(sigmas**2 + 1.0)
    stds = sigmas * alphas
    with np.errstate(divide="ignore"):
        lambdas = np.log(alphas) - np.log(stds)  # +inf at a final sigma of 0, handled by exp(-inf) = 0
    data_prediction = config.algorithm_type == "dpmsolver++"

    def converted(k: int, x: np.ndarray, out: np.ndarray) -> np.ndarray:
        """What convert_model_output returns at step k: x̂_0 (dpmsolver++) or ε̂ (dpmsolver)."""
        x0, eps = _as_x0_and_eps(config.prediction_type, alphas[k], stds[k])
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
