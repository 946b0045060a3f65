"""x̂₀ drift: how much the model's prediction of the final image still moves over the last steps.

At every step the model's output converts to a prediction x̂₀ of the final image. Along one
trajectory the predictions settle as t → 0; an image whose x̂₀ still changes over the last L steps
is one the model has not made up its mind about. The score is the per-pixel variance of the last
L predictions (unbiased, over the L steps), summed over the image.

It needs no posterior and no head — only the model's own outputs along the stock sampling loop
(the trajectory estimators' :class:`~bayesdiff_ext.sampler.scheduler_loop.SchedulerLoop`, with
classifier-free guidance and any conditioning: x̂₀ is that of the guided prediction the scheduler
steps with) — so it works on any denoiser (UNets and transformers, conv or Linear heads alike) at
the cost of plain sampling. For a latent model the map can be taken on the decoded predictions
(:func:`drift_variance` of ``draws`` decoded by :func:`~bayesdiff_ext.latent.decode_each`, as the
pipeline wrappers do). The prediction is converted with the scheduler's own noise schedule:

* ᾱ-schedulers (DDIM, DDPM, PNDM): x_t = α·x₀ + σ·ε with α = √ᾱ_t, σ = √(1 − ᾱ_t);
* σ-table VP solvers (DPM-Solver single/multistep, UniPC, DEIS, SA-Solver): (α, σ) of step k from
  the scheduler's ``sigmas[k]`` by its own ``_sigma_to_alpha_sigma_t`` (flow σ's included);
* Euler-type schedulers (Euler, Euler ancestral, Heun, LMS, KDPM2): the sample is x₀ + σ_k·ε, which
  is the VP form above after scaling by 1/√(σ_k² + 1) (the model input they hand the model);
* flow matching (FlowMatchEuler…): x_t = (1 − σ)·x₀ + σ·ε with σ = ``sigmas[k]``.

With that (α, σ): ε-prediction x̂₀ = (x − σ·ε̂)/α, v-prediction x̂₀ = α·x − σ·v̂, sample prediction
x̂₀ = the output, flow prediction x̂₀ = x − σ·v̂ (v = ε − x₀).
"""

from __future__ import annotations

import time
from typing import Any

import torch
from tqdm.auto import tqdm

from bayesdiff_ext.denoiser import Denoiser
from bayesdiff_ext.guidance import ClassifierFreeGuidance
from bayesdiff_ext.randomness import Generators
from bayesdiff_ext.sampler.initial_noise import initial_noise
from bayesdiff_ext.sampler.learned_variance import check_learned_variance
from bayesdiff_ext.sampler.results import BayesDiffOutput
from bayesdiff_ext.sampler.scheduler_loop import SchedulerLoop

__all__ = ["DEFAULT_LAST_STEPS", "X0DriftSampler", "drift_variance", "predicted_x0", "prediction_type"]

#: L, the final predictions x0-drift compares, unless a caller says otherwise.
DEFAULT_LAST_STEPS = 5

_EULER_TYPE = (
    "EulerDiscreteScheduler",
    "EulerAncestralDiscreteScheduler",
    "HeunDiscreteScheduler",
    "LMSDiscreteScheduler",
    "KDPM2DiscreteScheduler",
    "KDPM2AncestralDiscreteScheduler",
)
_PREDICTIONS = ("epsilon", "v_prediction", "sample", "flow_prediction")


def _is_flow(scheduler) -> bool:
    return type(scheduler).__name__.startswith("FlowMatch") or bool(scheduler.config.get("use_flow_sigmas", False))


def prediction_type(scheduler) -> str:
    """What the model predicts: the scheduler's ``prediction_type``; flow-matching schedulers have
    none and take the flow (velocity) prediction."""
    default = "flow_prediction" if _is_flow(scheduler) else "epsilon"
    return scheduler.config.get("prediction_type") or default


def _schedule_at(scheduler, timestep, index: int) -> tuple[float, float, float]:
    """(α, σ, input scale) of the k-th model call: x_t·scale = α·x₀ + σ·ε (flow: α = 1 − σ)."""
    name = type(scheduler).__name__
    if name.startswith(("EDM", "Cosine", "Consistency")):
        raise ValueError(f"x0-drift does not support {name} (its outputs are preconditioned by c_skip/c_out)")
    sigmas = getattr(scheduler, "sigmas", None)
    if _is_flow(scheduler) and not hasattr(scheduler, "_sigma_to_alpha_sigma_t"):
        sigma = float(sigmas[index])
        return 1.0 - sigma, sigma, 1.0
    if hasattr(scheduler, "_sigma_to_alpha_sigma_t") and sigmas is not None:
        alpha, sigma = scheduler._sigma_to_alpha_sigma_t(sigmas[index])
        return float(alpha), float(sigma), 1.0
    if name in _EULER_TYPE:
        sigma = float(sigmas[index])
        scale = 1.0 / (sigma**2 + 1.0) ** 0.5
        return scale, sigma * scale, scale
    if hasattr(scheduler, "alphas_cumprod"):
        alpha_bar = float(scheduler.alphas_cumprod[int(timestep)])
        return alpha_bar**0.5, (1.0 - alpha_bar) ** 0.5, 1.0
    raise ValueError(f"x0-drift cannot read the noise schedule of {name}")


def predicted_x0(scheduler, model_output: torch.Tensor, sample: torch.Tensor, timestep, index: int) -> torch.Tensor:
    """The model's prediction of x₀ at the ``index``-th model call, in float64.

    Args:
        scheduler: the diffusers scheduler of the loop, after ``set_timesteps``.
        model_output (`torch.Tensor` of shape `(B, C, H, W)`): the raw prediction's first C channels.
        sample (`torch.Tensor` of shape `(B, C, H, W)`): the loop's sample x_t (not the scaled model input).
        timestep: the scheduler's timestep of that call.
        index (`int`): the position of the call in ``scheduler.timesteps``.

    Returns:
        `torch.Tensor` of shape `(B, C, H, W)`, float64: x̂₀.
    """
    prediction = prediction_type(scheduler)
    if prediction not in _PREDICTIONS:
        raise ValueError(f"prediction_type must be one of {_PREDICTIONS}, got {prediction!r}")
    out, x = model_output.to(torch.float64), sample.to(torch.float64)
    if prediction == "sample":
        return out
    alpha, sigma, scale = _schedule_at(scheduler, timestep, index)
    if prediction == "flow_prediction":
        return x - sigma * out
    x = x * scale
    if prediction == "epsilon":
        return (x - sigma * out) / alpha
    return alpha * x - sigma * out


def drift_variance(predictions: list[torch.Tensor], last_steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pixel (variance, mean) of the last ``last_steps`` x̂₀ predictions, each (B, C, H, W).

    The variance is the unbiased one over the steps (needs ``last_steps`` ≥ 2), in float64, ≥ 0.
    """
    if not isinstance(last_steps, int) or last_steps < 2:
        raise ValueError(f"last_steps must be an integer >= 2 (a variance needs two predictions), got {last_steps!r}")
    if len(predictions) < last_steps:
        raise ValueError(f"the trajectory has {len(predictions)} model calls, fewer than last_steps={last_steps}")
    stacked = torch.stack([p.to(torch.float64) for p in predictions[-last_steps:]])
    return stacked.var(dim=0).clamp_min(0), stacked.mean(dim=0)


class X0DriftSampler:
    """Sample with the scheduler's own loop and score each image by its x̂₀ drift.

    Args:
        model (`nn.Module`): any diffusers denoiser (see :class:`~bayesdiff_ext.denoiser.Denoiser`).
        scheduler: any diffusers scheduler whose noise schedule :func:`predicted_x0` reads.
        last_steps (`int`, defaults to 5): L, the number of final predictions compared.
    """

    method = "x0-drift"
    posterior = None  # none: the loop's model is the model as it is

    def __init__(self, model, scheduler, last_steps: int = DEFAULT_LAST_STEPS) -> None:
        if not isinstance(last_steps, int) or last_steps < 2:
            raise ValueError(f"last_steps must be an integer >= 2, got {last_steps!r}")
        self.denoiser = Denoiser(model)
        self.model = model
        self.scheduler = scheduler
        self.last_steps = last_steps

    @torch.no_grad()
    def sample(
        self,
        batch_size: int | None = None,
        noise: torch.Tensor | None = None,
        num_inference_steps: int = 50,
        generator: Generators = None,
        eta: float = 0.0,
        model_kwargs: dict[str, Any] | None = None,
        progress: bool = True,
        *,
        guidance: ClassifierFreeGuidance | None = None,
        scheduler_kwargs: dict[str, Any] | None = None,
        set_timesteps_kwargs: dict[str, Any] | None = None,
        return_draws: bool = False,
    ) -> BayesDiffOutput:
        """Run the stock loop from x_T (``noise``, the unit-variance draw, or drawn with ``generator``)
        and score the images.

        Args:
            batch_size, noise, num_inference_steps, generator, eta, model_kwargs, guidance,
                scheduler_kwargs, set_timesteps_kwargs, progress: as for
                :meth:`~bayesdiff_ext.sampler.trajectories.TrajectorySampler.sample` (x_T is scaled by the
                scheduler's ``init_noise_sigma`` where it has one, as the pipelines do).
            return_draws (`bool`): keep the last L predictions x̂₀ (L, B, ...) in ``draws``.

        Returns:
            :class:`~bayesdiff_ext.BayesDiffOutput`: ``images`` the stock loop's samples (B, ...);
            ``variance`` the per-element variance of the last L x̂₀ predictions (float64, ≥ 0);
            ``mean`` their mean; no sampler-noise part (``aleatoric_variance`` is 0).
        """
        started = time.perf_counter()
        check_learned_variance(self.scheduler, self.model, guidance)
        x_unit = initial_noise(self.denoiser, batch_size, noise, generator)
        kwargs = dict(model_kwargs or {})
        if guidance is not None:
            kwargs = guidance.branch_kwargs(kwargs)
        loop = SchedulerLoop(
            self, self.scheduler, num_inference_steps, eta, kwargs, guidance, scheduler_kwargs, set_timesteps_kwargs
        )
        calls = len(self.scheduler.timesteps)
        if calls < self.last_steps:
            raise ValueError(f"{calls} model calls are fewer than last_steps={self.last_steps}")
        predictions = []

        def keep_the_last(index, t, x, prediction):
            if index >= calls - self.last_steps:
                predictions.append(predicted_x0(self.scheduler, prediction, x, t, index))

        with tqdm(desc=self.method, disable=not progress, unit="step") as loop.bar:
            images = loop.run(self.scheduler, x_unit, generator, copies=1, observe=keep_the_last)
        variance, mean = drift_variance(predictions, self.last_steps)
        settings = dict(
            method=self.method,
            last_steps=self.last_steps,
            num_inference_steps=num_inference_steps,
            eta=float(eta),
            scheduler=type(self.scheduler).__name__,
            prediction_type=prediction_type(self.scheduler),
            timesteps=self.scheduler.timesteps.tolist(),
            guidance=None if guidance is None else dict(scale=guidance.scale),
        )
        timings = dict(
            total_s=time.perf_counter() - started,
            image_unet_calls=calls,
            mc_unet_calls=0,
            mc_unet_batch=0,
            model_forwards_per_image=loop.model_rows / x_unit.shape[0],
        )
        draws = torch.stack(predictions) if return_draws else None
        return BayesDiffOutput(images=images, variance=variance, mean=mean, settings=settings, timings=timings, draws=draws)
