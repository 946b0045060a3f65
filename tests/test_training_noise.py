"""The fit's training noise: diffusion (ε, v, x_0 targets) and flow matching (σ as the scheduler shifts it)."""

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler

from bayesdiff_ext import LastLayerLaplace
from bayesdiff_ext.denoiser import Denoiser
from bayesdiff_ext.posterior.training_noise import DiffusionNoise, FlowMatchingNoise, training_noise
from tiny_models import text_conditioning, tiny_sd3, tiny_unet


def _x0(batch=4, channels=3):
    return torch.randn(batch, channels, 8, 8, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_diffusion_noise_is_the_ddpm_forward_process_with_its_target(prediction_type):
    scheduler = DDPMScheduler(num_train_timesteps=100, prediction_type=prediction_type)
    x0 = _x0()
    x_t, t, target = DiffusionNoise(scheduler).draw(x0, torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)  # t first, then ε, as the fit has always drawn them
    expected_t = torch.randint(0, 100, (4,), generator=g)
    noise = torch.randn(x0.shape, generator=g)
    assert torch.equal(t, expected_t)
    assert torch.equal(x_t, scheduler.add_noise(x0, noise, t))
    expected = {"epsilon": noise, "v_prediction": scheduler.get_velocity(x0, noise, t), "sample": x0}
    assert torch.equal(target, expected[prediction_type])


def test_euler_models_are_fitted_on_the_scaled_forward_process_they_were_trained_on():
    """EulerDiscreteScheduler.add_noise is x_0 + σ·ε (its sampling space); the model was trained on
    √ᾱ·x_0 + √(1−ᾱ)·ε = (x_0 + σ·ε)/√(σ²+1), which is what the fit draws."""
    euler = EulerDiscreteScheduler(num_train_timesteps=1000)
    x_t, t, _ = training_noise(euler).draw(_x0(), torch.Generator().manual_seed(5))
    reference, _, _ = DiffusionNoise(DDIMScheduler(num_train_timesteps=1000)).draw(_x0(), torch.Generator().manual_seed(5))
    assert torch.equal(x_t, reference)


@pytest.mark.parametrize(
    "config,mu",
    [
        (dict(shift=3.0), None),
        (dict(use_dynamic_shifting=True), 0.8),
        (dict(use_dynamic_shifting=True, time_shift_type="linear"), 1.3),
    ],
)
def test_flow_matching_sigmas_are_shifted_as_the_scheduler_shifts_them(config, mu):
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, **config)
    u = np.linspace(0.95, 0.05, 7)
    scheduler.set_timesteps(sigmas=u.tolist(), mu=mu)
    ours = FlowMatchingNoise(scheduler, mu=mu).sigmas(torch.tensor(u))
    torch.testing.assert_close(ours.float(), scheduler.sigmas[:-1], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("distribution", ["uniform", "logit_normal"])
def test_flow_matching_draws_x_t_between_the_image_and_the_noise_with_the_velocity_target(distribution):
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    noising = FlowMatchingNoise(scheduler, distribution, logit_mean=0.5, logit_std=0.8)
    x0 = _x0()
    x_t, timestep, target = noising.draw(x0, torch.Generator().manual_seed(6))
    g = torch.Generator().manual_seed(6)
    if distribution == "uniform":
        u = torch.rand(4, generator=g, dtype=torch.float64)
    else:
        u = torch.sigmoid(0.5 + 0.8 * torch.randn(4, generator=g, dtype=torch.float64))
    sigma = 3 * u / (1 + 2 * u)
    noise = torch.randn(x0.shape, generator=g)
    torch.testing.assert_close(timestep, (1000 * sigma).float())
    s = sigma.float()[:, None, None, None]
    torch.testing.assert_close(x_t, (1 - s) * x0 + s * noise)
    assert torch.equal(target, noise - x0)


def test_the_fit_takes_its_residuals_against_the_training_target():
    """σ by maximum likelihood from Σ(f − target)²: v for a v-prediction model, ε − x_0 for flow matching."""
    unet = tiny_unet()
    scheduler = DDPMScheduler(num_train_timesteps=100, prediction_type="v_prediction")
    post = LastLayerLaplace(unet).fit(_x0(), scheduler, batch_size=4, generator=torch.Generator().manual_seed(7), progress=False)
    x_t, t, v = DiffusionNoise(scheduler).draw(_x0(), torch.Generator().manual_seed(7))
    with torch.no_grad():
        out = unet(x_t, t).sample
    assert post.fit_stats.residual_sum_squares == pytest.approx(float((out - v).double().square().sum()), rel=1e-6)

    sd3, cond = tiny_sd3(), text_conditioning(4)
    noising = FlowMatchingNoise(FlowMatchEulerDiscreteScheduler(shift=3.0), "logit_normal")
    x0 = _x0(channels=4)
    post = LastLayerLaplace(sd3).fit(x0, noising, batch_size=4, generator=torch.Generator().manual_seed(8), model_kwargs=cond, progress=False)
    x_t, timestep, velocity = noising.draw(x0, torch.Generator().manual_seed(8))
    with torch.no_grad():
        out = Denoiser(sd3)(x_t, timestep, cond)
    assert post.fit_stats.residual_sum_squares == pytest.approx(float((out - velocity).double().square().sum()), rel=1e-6)
    assert post.sigma_noise**2 == pytest.approx(post.fit_stats.residual_sum_squares / out.numel(), rel=1e-9)


def test_refusals_name_the_setting():
    with pytest.raises(ValueError, match="pass mu"):
        FlowMatchingNoise(FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True))
    with pytest.raises(ValueError, match="distribution must be one of"):
        FlowMatchingNoise(FlowMatchEulerDiscreteScheduler(), "beta")
    with pytest.raises(TypeError, match="FlowMatchEulerDiscreteScheduler"):
        FlowMatchingNoise(DDPMScheduler())
    with pytest.raises(TypeError, match="diffusers scheduler"):
        training_noise(object())
