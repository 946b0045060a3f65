"""Brute-force trajectories for the propagated variance, and a UNet whose output tracks its input.

The moment recurrence assumes the head's noise is independent at every model call (BayesDiff's
assumption, what ``mode='bayesdiff'`` samples). Its own ground truth is therefore many independent
trajectories from one x_T in which every call's prediction is drawn from the head's predictive
N(out, γ²); this checks the recurrence against that assumption, not against trajectories that
share one weight draw (trajectory Monte Carlo does that).
"""

import torch
from diffusers import UNet2DModel

from bayesdiff_ext.denoiser import Denoiser, stepped_prediction


def brute_force_variance(
    model, posterior, scheduler, noise, *, steps: int, trajectories: int, seed: int, model_kwargs=None,
    set_timesteps_kwargs=None,
) -> torch.Tensor:
    """Per-element Var[x_0] over ``trajectories`` runs from ``noise`` (unit draw, × init_noise_sigma)."""
    generator = torch.Generator().manual_seed(seed)
    scheduler.set_timesteps(steps, **(set_timesteps_kwargs or {}))
    denoiser = Denoiser(model)
    x = noise.repeat(trajectories, *([1] * (noise.dim() - 1)))
    if hasattr(scheduler, "init_noise_sigma"):
        x = x * scheduler.init_noise_sigma
    kwargs = Denoiser.tile(model_kwargs, noise.shape[0], trajectories)
    scale = getattr(scheduler, "scale_model_input", lambda sample, t: sample)  # flow matching has none
    with torch.no_grad():
        for t in scheduler.timesteps:
            with posterior.capture() as cap:
                out = stepped_prediction(denoiser(scale(x, t), t, kwargs), x)
            _, head_var = posterior.predict(cap.phi)
            drawn = out + head_var.sqrt() * torch.randn(out.shape, generator=generator)
            x = scheduler.step(drawn, t, x, generator=generator).prev_sample
    return x.unflatten(0, (trajectories, noise.shape[0])).var(dim=0)


def correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1])


def with_output_tracking_input(unet: UNet2DModel) -> UNet2DModel:
    """Give a random 3-channel UNet a trained denoiser's trait: its output at a pixel depends strongly on x_t there.

    A random UNet's output barely depends on x_t pixel by pixel, so Cov(x_t, ε) ≈ 0 and a test could
    not tell a correct covariance from a missing one. Adding an identity path conv_in → skip connection
    of the last resnet → conv_out (it keeps the GroupNorm and SiLU on the way) makes the covariance
    term change Var[x_0] by ~40% (measured, DDIM).
    """
    eye = torch.eye(3)
    with torch.no_grad():
        unet.conv_in.weight[:3, :, 1, 1] += eye
        unet.up_blocks[-1].resnets[-1].conv_shortcut.weight[:3, 8:11, 0, 0] += eye  # skip channels follow 8 hidden
        unet.conv_out.weight[:, :3, 1, 1] += eye
    return unet
