"""The model's own reverse-step variance: the aleatoric noise of a learned-variance DDPM step (docs/MATH.md §15).

A model with a learned variance (ADM, DiT, PixArt, DeepFloyd IF: 2·C output channels, the last C
predict the variance) sampled with ``DDPMScheduler(variance_type='learned_range')`` (or
``'learned'``) adds noise of a per-element variance c²(x_t) that the model predicts:

* ``learned_range``: log c² = f·log β_t + (1 − f)·log β̃_t with f = (v + 1)/2, v the variance
  channels, β_t = 1 − ᾱ_t/ᾱ_prev and β̃_t = (1 − ᾱ_prev)/(1 − ᾱ_t)·β_t floored at 1e-20;
* ``learned``: c² = v.

No noise is added on the step to t = 0, as in ``DDPMScheduler.step``. Every other scheduler (DDIM,
DPM-Solver, Euler, flow matching) drops the variance channels, as the DiT and PixArt pipelines do;
the run's ``settings['aleatoric_source']`` says which case a run is.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "LEARNED_VARIANCE_TYPES",
    "aleatoric_source",
    "check_learned_variance",
    "learned_step_variance",
    "model_predicts_variance",
    "uses_learned_variance",
]

#: ``variance_type`` values with which ``scheduler.step`` reads the model's variance channels.
LEARNED_VARIANCE_TYPES = ("learned", "learned_range")


def uses_learned_variance(scheduler) -> bool:
    """Whether ``scheduler.step`` takes its noise variance from the model's variance channels."""
    return getattr(scheduler.config, "variance_type", None) in LEARNED_VARIANCE_TYPES


def model_predicts_variance(model) -> bool:
    """Whether ``model`` (a diffusers UNet or transformer) outputs 2·C channels: ε and a variance."""
    config = getattr(model, "config", None)
    in_channels = getattr(config, "in_channels", None)
    out_channels = getattr(config, "out_channels", None) or in_channels  # DiT's None means "as in_channels"
    return in_channels is not None and out_channels == 2 * in_channels


def check_learned_variance(scheduler, model, guidance) -> None:
    """ValueError where a learned-variance scheduler cannot step: no variance channels, or guidance."""
    if not uses_learned_variance(scheduler):
        return
    variance_type = scheduler.config.variance_type
    if not model_predicts_variance(model):
        raise ValueError(
            f"{type(scheduler).__name__} has variance_type={variance_type!r}, which reads the model's variance "
            f"channels, but {type(model).__name__} outputs no variance (out_channels must be 2·in_channels): use "
            "a fixed variance_type ('fixed_small', 'fixed_small_log' or 'fixed_large')"
        )
    if guidance is not None:
        raise ValueError(
            f"variance_type={variance_type!r} with classifier-free guidance: the guided variance channels are not "
            "defined (the DiT and PixArt pipelines drop them); use a fixed variance_type or no guidance"
        )


def learned_step_variance(scheduler, timestep, output: torch.Tensor, channels: int) -> torch.Tensor:
    """The per-element variance c² of the noise ``scheduler.step(output, timestep, ...)`` adds, float64.

    Args:
        scheduler: a ``DDPMScheduler`` (or a scheduler with its tables) with a learned ``variance_type``.
        timestep: the step's timestep (``scheduler.timesteps[k]``).
        output (`torch.Tensor` of shape `(B, 2·C, ...)`): the model's full output at the image sample.
        channels (`int`): C, the sample's channels.

    Returns:
        `torch.Tensor` of shape `(B, C, ...)`: c², float64 (zeros on the step to t = 0; NaN where
        ``'learned'`` predicts a negative variance, whose square root diffusers' step takes).
    """
    if output.shape[1] != 2 * channels:
        raise ValueError(
            f"variance_type={scheduler.config.variance_type!r} needs the model's 2·C = {2 * channels} output channels "
            f"(ε and the variance), got an output of shape {tuple(output.shape)}"
        )
    predicted = output[:, channels:].to(torch.float64)
    t = int(timestep)
    if t == 0:
        return torch.zeros_like(predicted)
    if scheduler.config.variance_type == "learned":
        return torch.where(predicted >= 0, predicted, torch.full_like(predicted, float("nan")))
    alphas_cumprod = scheduler.alphas_cumprod.to(torch.float64)
    prev = int(scheduler.previous_timestep(t))
    abar_t = float(alphas_cumprod[t])
    abar_prev = float(alphas_cumprod[prev]) if prev >= 0 else 1.0
    beta_t = 1.0 - abar_t / abar_prev
    posterior_variance = max((1.0 - abar_prev) / (1.0 - abar_t) * beta_t, 1e-20)
    fraction = (predicted + 1) / 2
    return torch.exp(fraction * math.log(beta_t) + (1 - fraction) * math.log(posterior_variance))


def aleatoric_source(scheduler, model, stochastic: bool) -> str:
    """One line for a run's settings: where its aleatoric variance comes from, and whether the model
    predicts a variance the sampler leaves unused."""
    name = type(scheduler).__name__
    if uses_learned_variance(scheduler):
        return (
            f"the model's learned variance ({name} variance_type={scheduler.config.variance_type!r}: the step "
            "noise's variance comes from the model's variance channels; docs/MATH.md §15)"
        )
    source = f"the sampler's own fixed noise ({name})" if stochastic else f"none: {name} is deterministic here"
    if model_predicts_variance(model):
        return (
            f"{source}; the model predicts a variance, which this sampler drops (only DDPMScheduler with "
            "variance_type='learned_range' or 'learned' uses it)"
        )
    return f"{source}; the model predicts no variance"
