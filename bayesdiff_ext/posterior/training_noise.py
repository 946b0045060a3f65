"""How the model was trained to denoise: the (x_t, timestep, target) the fit draws (docs/MATH.md §9).

The posterior is on the model's raw output, so the fit noises its images the way the model was
trained and takes the residual against the training target:

* :class:`DiffusionNoise` (DDPM-family schedulers: DDPM, DDIM, DPM-Solver, Euler, …): t ~ U{0..T−1},
  x_t = √ᾱ_t·x_0 + √(1−ᾱ_t)·ε from the scheduler's ᾱ table, target ε, v = √ᾱ_t·ε − √(1−ᾱ_t)·x_0
  or x_0 by its ``prediction_type``; the model gets t. (Euler's own ``add_noise`` is the unscaled
  x_0 + σ·ε of its sampling space; the model was trained on the scaled one, which this is.)
* :class:`FlowMatchingNoise` (``FlowMatchEulerDiscreteScheduler``): σ = shift(u) with u uniform or
  logit-normal (the distribution the model was trained with; SD3 used logit-normal(0, 1)),
  shifted as the scheduler shifts σ (``shift``, or dynamic shifting with ``mu``),
  x_t = (1−σ)·x_0 + σ·ε, target v = ε − x_0; the model gets σ·T (as the scheduler's timesteps).

The random draws of a batch come from the fit's generator in a fixed order (timestep, then ε).
"""

from __future__ import annotations

import abc

import torch
from diffusers import FlowMatchEulerDiscreteScheduler

__all__ = ["DiffusionNoise", "FlowMatchingNoise", "TrainingNoise", "training_noise"]

SIGMA_DISTRIBUTIONS = ("uniform", "logit_normal")


class TrainingNoise(abc.ABC):
    """Draws (x_t, timestep, target) for a batch of clean samples x_0."""

    def __init__(self, scheduler) -> None:
        config = getattr(scheduler, "config", None)
        if config is None or not hasattr(config, "num_train_timesteps"):
            raise TypeError(f"`scheduler` must be a diffusers scheduler, got {type(scheduler).__name__}")
        self.scheduler = scheduler
        self.num_train_timesteps = int(config.num_train_timesteps)

    @abc.abstractmethod
    def draw(
        self, x0: torch.Tensor, generator: torch.Generator | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(x_t, timestep (B,), target) for ``x0`` (B, ...) on its device and in its dtype."""

    def _draw_device(self, generator: torch.Generator | None) -> torch.device:
        return generator.device if generator is not None else torch.device("cpu")

    def _noise(self, x0: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        noise = torch.randn(x0.shape, generator=generator, device=self._draw_device(generator), dtype=torch.float32)
        return noise.to(x0.device, x0.dtype)

    def describe(self) -> dict:
        return {"kind": type(self).__name__, "scheduler": type(self.scheduler).__name__}


class DiffusionNoise(TrainingNoise):
    """x_t = √ᾱ_t·x_0 + √(1−ᾱ_t)·ε with t ~ U{0..T−1}; target by the scheduler's ``prediction_type``."""

    PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")

    def __init__(self, scheduler) -> None:
        super().__init__(scheduler)
        if not hasattr(scheduler, "alphas_cumprod"):
            raise TypeError(f"{type(scheduler).__name__} has no alphas_cumprod table: not a DDPM-family scheduler")
        self.prediction_type = scheduler.config.get("prediction_type", "epsilon")
        if self.prediction_type not in self.PREDICTION_TYPES:
            raise ValueError(
                f"the scheduler has prediction_type={self.prediction_type!r}; the fit follows {self.PREDICTION_TYPES}"
            )

    def draw(self, x0, generator):
        t = torch.randint(0, self.num_train_timesteps, (len(x0),), generator=generator, device=self._draw_device(generator))
        t = t.to(x0.device)
        noise = self._noise(x0, generator)
        # DDPMScheduler.add_noise's arithmetic, so that the fit is the same for every VP scheduler
        alphas_cumprod = self.scheduler.alphas_cumprod.to(device=x0.device, dtype=x0.dtype)
        signal = _per_sample(alphas_cumprod[t] ** 0.5, x0)
        spread = _per_sample((1 - alphas_cumprod[t]) ** 0.5, x0)
        x_t = signal * x0 + spread * noise
        if self.prediction_type == "epsilon":
            target = noise
        elif self.prediction_type == "v_prediction":
            target = signal * noise - spread * x0
        else:
            target = x0
        return x_t, t, target

    def describe(self) -> dict:
        return {**super().describe(), "prediction_type": self.prediction_type}


class FlowMatchingNoise(TrainingNoise):
    """x_t = (1−σ)·x_0 + σ·ε, target ε − x_0, σ = shift(u) with u ~ ``distribution``.

    Args:
        scheduler: a ``FlowMatchEulerDiscreteScheduler`` (its ``shift``, or its dynamic shifting).
        distribution (`str`): ``'uniform'`` (u ~ U(0, 1)) or ``'logit_normal'`` (u = sigmoid(m + s·n),
            n ~ N(0, 1)): the distribution the model was trained with.
        logit_mean, logit_std (`float`): m and s of the logit-normal.
        mu (`float`, *optional*): the dynamic shift (required when the scheduler has
            ``use_dynamic_shifting=True``, e.g. Flux: the pipeline's ``mu`` for the training resolution).
    """

    def __init__(
        self,
        scheduler,
        distribution: str = "uniform",
        *,
        logit_mean: float = 0.0,
        logit_std: float = 1.0,
        mu: float | None = None,
    ) -> None:
        super().__init__(scheduler)
        if not isinstance(scheduler, FlowMatchEulerDiscreteScheduler):
            raise TypeError(f"flow matching needs a FlowMatchEulerDiscreteScheduler, got {type(scheduler).__name__}")
        if distribution not in SIGMA_DISTRIBUTIONS:
            raise ValueError(f"distribution must be one of {SIGMA_DISTRIBUTIONS}, got {distribution!r}")
        if not logit_std > 0:
            raise ValueError(f"logit_std must be > 0, got {logit_std}")
        if scheduler.config.use_dynamic_shifting and mu is None:
            raise ValueError("the scheduler shifts σ dynamically (use_dynamic_shifting=True): pass mu")
        self.distribution = distribution
        self.logit_mean, self.logit_std, self.mu = float(logit_mean), float(logit_std), mu

    def sigmas(self, u: torch.Tensor) -> torch.Tensor:
        """σ = shift(u), as ``set_timesteps`` shifts its σ grid."""
        if self.scheduler.config.use_dynamic_shifting:
            return self.scheduler.time_shift(self.mu, 1.0, u)
        shift = self.scheduler.shift
        return shift * u / (1 + (shift - 1) * u)

    def draw(self, x0, generator):
        device = self._draw_device(generator)
        if self.distribution == "uniform":
            u = torch.rand(len(x0), generator=generator, device=device, dtype=torch.float64)
        else:
            n = torch.randn(len(x0), generator=generator, device=device, dtype=torch.float64)
            u = torch.sigmoid(self.logit_mean + self.logit_std * n)
        sigma = self.sigmas(u).to(x0.device)
        noise = self._noise(x0, generator)
        s = _per_sample(sigma.to(x0.dtype), x0)
        x_t = (1 - s) * x0 + s * noise
        return x_t, (sigma * self.num_train_timesteps).to(torch.float32), noise - x0

    def describe(self) -> dict:
        return {
            **super().describe(),
            "distribution": self.distribution,
            "logit_mean": self.logit_mean,
            "logit_std": self.logit_std,
            "mu": self.mu,
        }


def training_noise(scheduler) -> TrainingNoise:
    """``scheduler`` as it is when it is a :class:`TrainingNoise`, else its family's default:
    uniform flow matching for a ``FlowMatchEulerDiscreteScheduler``, diffusion noise otherwise."""
    if isinstance(scheduler, TrainingNoise):
        return scheduler
    if isinstance(scheduler, FlowMatchEulerDiscreteScheduler):
        return FlowMatchingNoise(scheduler)
    return DiffusionNoise(scheduler)


def _per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B,) values broadcast over the trailing dimensions of ``like``."""
    values = values.flatten()
    while values.dim() < like.dim():
        values = values.unsqueeze(-1)
    return values
