"""Schedulers, noise and the plain diffusers sampling loop, for the MC-dropout and ensemble tests."""

import torch
from diffusers import DDIMScheduler, DDPMScheduler

STEPS = 4


def ddim():
    return DDIMScheduler(num_train_timesteps=1000, clip_sample=False)


def ddpm():
    return DDPMScheduler(num_train_timesteps=1000, clip_sample=False)


def noise(batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 1, 8, 8, generator=torch.Generator().manual_seed(7))


@torch.no_grad()
def plain_loop(unet, scheduler, x, seed: int = 11) -> torch.Tensor:
    """x_0 from x_T by ``scheduler.step`` (step noise from a generator seeded with ``seed``)."""
    generator = torch.Generator().manual_seed(seed)
    scheduler.set_timesteps(STEPS)
    for t in scheduler.timesteps:
        x = scheduler.step(unet(x, t).sample, t, x, generator=generator).prev_sample
    return x


def c2_only_variance(scheduler, eta: float = 0.0) -> float:
    from bayesdiff_ext.sampler.schedulers import step_coefficients

    scheduler.set_timesteps(STEPS)
    var = 0.0
    for step in step_coefficients(scheduler, eta):
        var = step.a**2 * var + step.c2
    return var
