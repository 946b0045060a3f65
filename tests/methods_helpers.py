"""Tiny UNets and the plain diffusers sampling loop, for the MC-dropout and ensemble tests."""

import torch
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel

STEPS = 4


def tiny_unet(seed: int = 0, dropout: float = 0.0) -> UNet2DModel:
    torch.manual_seed(seed)
    return UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        block_out_channels=(8, 16),
        layers_per_block=1,
        norm_num_groups=4,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        dropout=dropout,
    ).eval()


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
