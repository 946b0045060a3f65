"""The epistemic/aleatoric split of BayesDiffSampler's Var[x_0] (bayesdiff_ext.sampler.variance_split)."""

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverSinglestepScheduler
from tiny_models import tiny_unet

from bayesdiff_ext import BayesDiffSampler, LastLayerLaplace
from bayesdiff_ext.sampler.schedulers import step_coefficients

STEPS = 6


@pytest.fixture(scope="module")
def unet():
    return tiny_unet(channels=2)


@pytest.fixture(scope="module")
def posterior(unet):
    images = torch.rand(8, 2, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    posterior = LastLayerLaplace(unet, "diag", sigma_noise=0.1, prior_precision=1e3)
    scheduler = DDPMScheduler(num_train_timesteps=1000, clip_sample=False)
    generator = torch.Generator().manual_seed(1)
    return posterior.fit(images, scheduler, batch_size=4, generator=generator, progress=False)


class ZeroVariancePosterior:
    """The fitted posterior's head mean with its variance set to 0: a point estimate of the weights."""

    def __init__(self, posterior):
        self.inner = posterior
        self.eps_channels = posterior.eps_channels

    def capture(self):
        return self.inner.capture()

    def predict(self, phi):
        mean, var = self.inner.predict(phi)
        return mean, torch.zeros_like(var)


def _noise(batch=2):
    return torch.randn(batch, 2, 8, 8, generator=torch.Generator().manual_seed(3))


def _sample(unet, scheduler, posterior, **kwargs):
    sampler = BayesDiffSampler(unet, scheduler, posterior)
    generator = torch.Generator().manual_seed(5)
    return sampler.sample(
        noise=_noise(), num_inference_steps=STEPS, generator=generator, progress=False, **kwargs
    )


def _c2_only_recurrence(scheduler, eta=0.0):
    """Var' = a²·Var + c² from Var[x_T] = 0: the sampler's noise propagated on its own."""
    scheduler.set_timesteps(STEPS)
    var = torch.zeros((), dtype=torch.float64)
    for step in step_coefficients(scheduler, eta):
        var = step.a**2 * var + step.c2
    return float(var)


@pytest.mark.parametrize(
    "scheduler, eta",
    [
        (DDIMScheduler(num_train_timesteps=1000, clip_sample=False), 0.0),
        (DPMSolverSinglestepScheduler(num_train_timesteps=1000, solver_order=2), 0.0),
    ],
    ids=["ddim-eta0", "dpm-solver-2"],
)
def test_deterministic_samplers_have_no_aleatoric_part(unet, posterior, scheduler, eta):
    out = _sample(unet, scheduler, posterior, eta=eta, mc_samples=4)
    assert out.variance.max() > 0
    assert torch.equal(out.aleatoric_variance, torch.zeros_like(out.variance))
    assert torch.equal(out.epistemic_variance, out.variance)


@pytest.mark.parametrize("mc_samples, covariance", [(0, "none"), (6, "mc")])
def test_ddpm_with_a_zero_variance_posterior_is_all_aleatoric(unet, posterior, mc_samples, covariance):
    scheduler = DDPMScheduler(num_train_timesteps=1000, clip_sample=False)
    point = ZeroVariancePosterior(posterior)
    out = _sample(unet, scheduler, point, mc_samples=mc_samples, covariance=covariance)
    assert out.variance.min() > 0
    torch.testing.assert_close(out.aleatoric_variance, out.variance, rtol=1e-6, atol=0)
    assert out.epistemic_variance.abs().max() <= 1e-6 * out.variance.max()
    if mc_samples == 0:
        expected = torch.full_like(out.variance, _c2_only_recurrence(scheduler))
        torch.testing.assert_close(out.aleatoric_variance, expected, rtol=1e-5, atol=0)


def test_closed_form_aleatoric_part_is_the_c2_propagation_whatever_the_posterior(unet, posterior):
    scheduler = DDIMScheduler(num_train_timesteps=1000, clip_sample=False)
    out = _sample(unet, scheduler, posterior, eta=0.7, mc_samples=0, covariance="none")
    expected = torch.full_like(out.variance, _c2_only_recurrence(scheduler, eta=0.7))
    torch.testing.assert_close(out.aleatoric_variance, expected, rtol=1e-5, atol=0)
    assert out.epistemic_variance.min() > 0


@pytest.mark.parametrize(
    "scheduler, eta",
    [
        (DDPMScheduler(num_train_timesteps=1000, clip_sample=False), 0.0),
        (DDIMScheduler(num_train_timesteps=1000, clip_sample=False), 0.5),
    ],
    ids=["ddpm", "ddim-eta0.5"],
)
def test_parts_are_nonnegative_and_add_up_to_the_variance(unet, posterior, scheduler, eta):
    out = _sample(unet, scheduler, posterior, eta=eta, mc_samples=6, uq_every=2, return_trace=True)
    assert out.aleatoric_variance.min() >= 0 and out.epistemic_variance.min() >= 0
    assert out.aleatoric_variance.max() > 0 and out.epistemic_variance.max() > 0
    total = out.aleatoric_variance + out.epistemic_variance
    torch.testing.assert_close(total, out.variance, rtol=1e-6, atol=1e-9)
    assert torch.equal(out.trace[-1]["aleatoric_variance"], out.aleatoric_variance)
    # The posterior's variance comes on top of the sampler's noise.
    point = _sample(unet, scheduler, ZeroVariancePosterior(posterior), eta=eta, mc_samples=6, uq_every=2)
    assert out.variance.sum() > point.variance.sum()
