"""x̂₀ drift: how much the model's prediction of the final image still moves over the last steps.

At every step the model's output converts to a prediction x̂₀ of the final image. Along one
trajectory the predictions settle as t → 0; an image whose x̂₀ still changes over the last L steps
is one the model has not made up its mind about. The score is the per-pixel variance of the last
L predictions (unbiased, over the L steps), summed over the image.

It needs no posterior and no head — only the model's own outputs along the stock sampling loop —
so it works on any denoiser (UNets and transformers, conv or Linear heads alike) at the cost of
plain sampling. The prediction is converted with the scheduler's own noise schedule:

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

import inspect
import time
from typing import Any

import torch
from diffusers.utils.torch_utils import randn_tensor

from bayesdiff_ext.denoiser import Denoiser
from bayesdiff_ext.sampler.results import BayesDiffOutput

__all__ = ["X0DriftSampler", "drift_variance", "predicted_x0", "prediction_type"]

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

    def __init__(self, model, scheduler, last_steps: int = 5) -> None:
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
        generator: torch.Generator | None = None,
        eta: float = 0.0,
        model_kwargs: dict[str, Any] | None = None,
        progress: bool = True,
    ) -> BayesDiffOutput:
        """Run the stock loop from x_T (``noise`` or drawn with ``generator``) and score the images.

        Returns:
            :class:`~bayesdiff_ext.BayesDiffOutput`: ``images`` the stock loop's samples (B, C, H, W);
            ``variance`` the per-pixel variance of the last L x̂₀ predictions (float64, ≥ 0);
            ``mean`` their mean; no sampler-noise part (``aleatoric_variance`` is 0).
        """
        from tqdm.auto import tqdm

        started = time.perf_counter()
        scheduler = self.scheduler
        x = self._initial_noise(batch_size, noise, generator)
        channels = x.shape[1]
        scheduler.set_timesteps(num_inference_steps)
        if len(scheduler.timesteps) < self.last_steps:
            raise ValueError(
                f"{len(scheduler.timesteps)} model calls are fewer than last_steps={self.last_steps}"
            )
        accepted = inspect.signature(scheduler.step).parameters
        step_kwargs = {"eta": eta} if "eta" in accepted else {}
        if eta and "eta" not in accepted:
            raise ValueError(f"eta={eta} applies to DDIM-type schedulers; {type(scheduler).__name__} has none")
        if "generator" in accepted:
            step_kwargs["generator"] = generator
        predictions = []
        for index, t in enumerate(tqdm(scheduler.timesteps, desc=self.method, disable=not progress)):
            out = self.denoiser(scheduler.scale_model_input(x, t), t, model_kwargs)[:, :channels]
            if index >= len(scheduler.timesteps) - self.last_steps:
                predictions.append(predicted_x0(scheduler, out, x, t, index))
            x = scheduler.step(out, t, x, **step_kwargs).prev_sample
        variance, mean = drift_variance(predictions, self.last_steps)
        settings = dict(
            method=self.method,
            last_steps=self.last_steps,
            num_inference_steps=num_inference_steps,
            eta=float(eta),
            scheduler=type(scheduler).__name__,
            prediction_type=prediction_type(scheduler),
            timesteps=scheduler.timesteps.tolist(),
        )
        timings = dict(
            total_s=time.perf_counter() - started,
            image_unet_calls=len(scheduler.timesteps),
            mc_unet_calls=0,
            mc_unet_batch=0,
        )
        return BayesDiffOutput(images=x, variance=variance, mean=mean, settings=settings, timings=timings)

    def _initial_noise(self, batch_size, noise, generator) -> torch.Tensor:
        """x_T: ``noise``, or a draw as the pipelines make it, times the scheduler's ``init_noise_sigma``."""
        config = self.denoiser.config
        if noise is None:
            if batch_size is None:
                raise ValueError("pass batch_size or the initial noise x_T as noise")
            size = config.sample_size
            shape = (config.in_channels, *((size, size) if isinstance(size, int) else size))
            noise = randn_tensor(
                (batch_size, *shape), generator=generator, device=self.denoiser.device, dtype=self.denoiser.dtype
            )
        elif batch_size is not None and batch_size != noise.shape[0]:
            raise ValueError(f"batch_size={batch_size} but noise holds {noise.shape[0]} images")
        noise = noise.to(device=self.denoiser.device, dtype=self.denoiser.dtype)
        # Flow-matching schedulers have no init_noise_sigma: their pipelines start from the plain draw.
        return noise * getattr(self.scheduler, "init_noise_sigma", 1.0)
