"""The model's own variance as the aleatoric part (bayesdiff_ext.sampler.learned_variance, docs/MATH.md §15):
a tiny random-init 2·C UNet with DDPMScheduler(variance_type='learned_range'|'learned')."""

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler
from tiny_models import tiny_unet

from bayesdiff_ext import BayesDiffSampler, LastLayerLaplace
from bayesdiff_ext.guidance import ClassifierFreeGuidance
from bayesdiff_ext.methods.point import PointPosterior
from bayesdiff_ext.sampler.learned_variance import aleatoric_source, learned_step_variance

CHANNELS, STEPS, BATCH = 2, 8, 2


@pytest.fixture(scope="module")
def unet():
    return tiny_unet(seed=4, channels=CHANNELS, out_channels=2 * CHANNELS)


@pytest.fixture(scope="module")
def posterior(unet):
    images = torch.rand(8, CHANNELS, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    scheduler = DDPMScheduler(num_train_timesteps=1000, clip_sample=False, variance_type="learned_range")
    posterior = LastLayerLaplace(unet, "diag", sigma_noise=0.1, prior_precision=1e3)
    return posterior.fit(images, scheduler, batch_size=4, generator=torch.Generator().manual_seed(1), progress=False)


def _scheduler(variance_type="learned_range"):
    scheduler = DDPMScheduler(num_train_timesteps=1000, clip_sample=False, variance_type=variance_type)
    scheduler.set_timesteps(STEPS)
    return scheduler


def _noise(batch=BATCH, seed=3):
    return torch.randn(batch, CHANNELS, 8, 8, generator=torch.Generator().manual_seed(seed))


def _sample(unet, posterior, scheduler, **kwargs):
    return BayesDiffSampler(unet, scheduler, posterior).sample(
        noise=_noise(), num_inference_steps=STEPS, generator=torch.Generator().manual_seed(5), progress=False, **kwargs
    )


@pytest.mark.parametrize("variance_type", ["learned_range", "learned"])
def test_step_variance_is_the_schedulers_own(variance_type):
    """c² per element against DDPMScheduler._get_variance at every timestep (log-variance for learned_range)."""
    scheduler = _scheduler(variance_type)
    generator = torch.Generator().manual_seed(0)
    for t in scheduler.timesteps:
        predicted = torch.rand(3, CHANNELS, 5, 7, generator=generator) * 2 - 1
        if variance_type == "learned":
            predicted = predicted.abs() * 0.02
        output = torch.cat([torch.randn(predicted.shape, generator=generator), predicted], dim=1)
        ours = learned_step_variance(scheduler, t, output, CHANNELS)
        assert ours.dtype == torch.float64 and ours.shape == predicted.shape
        if int(t) == 0:
            assert torch.count_nonzero(ours) == 0  # DDPMScheduler.step adds no noise to t = 0
            continue
        theirs = scheduler._get_variance(int(t), predicted_variance=predicted)
        theirs = theirs.exp() if variance_type == "learned_range" else theirs
        torch.testing.assert_close(ours, theirs.double(), rtol=2e-6, atol=0)


def test_step_variance_needs_the_variance_channels():
    with pytest.raises(ValueError, match="2·C = 4 output channels"):
        learned_step_variance(_scheduler(), 10, torch.zeros(1, CHANNELS, 4, 4), CHANNELS)


def test_image_path_is_the_diffusers_loop(unet, posterior):
    """The images are bit-identical to DDPMPipeline's loop: the full 2·C output into scheduler.step."""
    out = _sample(unet, posterior, _scheduler(), mc_samples=4, uq_every=2)
    scheduler, generator = _scheduler(), torch.Generator().manual_seed(5)
    x = _noise() * scheduler.init_noise_sigma
    with torch.no_grad():
        for t in scheduler.timesteps:
            x = scheduler.step(unet(x, t).sample, t, x, generator=generator).prev_sample
    assert torch.equal(out.images, x)


def test_first_step_aleatoric_is_the_predicted_variance(unet, posterior):
    """From Var[x_T] = 0 the first step's aleatoric part is exactly exp(_get_variance) at x_T."""
    out = _sample(unet, posterior, _scheduler(), mc_samples=4, return_trace=True)
    scheduler = _scheduler()
    t = scheduler.timesteps[0]
    with torch.no_grad():
        predicted = unet(_noise() * scheduler.init_noise_sigma, t).sample[:, CHANNELS:]
    expected = scheduler._get_variance(int(t), predicted_variance=predicted).exp()
    torch.testing.assert_close(out.trace[0]["aleatoric_variance"], expected, rtol=2e-6, atol=0)
    assert (out.trace[0]["variance"] >= out.trace[0]["aleatoric_variance"]).all()


def test_point_weights_are_all_aleatoric(unet):
    out = _sample(unet, PointPosterior(unet), _scheduler(), mc_samples=4)
    torch.testing.assert_close(out.aleatoric_variance, out.variance)
    assert out.variance.sum() > 0
    assert "learned variance" in out.settings["aleatoric_source"]


def test_split_with_a_posterior(unet, posterior):
    out = _sample(unet, posterior, _scheduler(), mc_samples=4)
    assert (out.aleatoric_variance >= 0).all() and (out.epistemic_variance >= 0).all()
    assert out.aleatoric_variance.sum() > 0 and out.epistemic_variance.sum() > 0
    torch.testing.assert_close(out.aleatoric_variance + out.epistemic_variance, out.variance)


def test_aleatoric_part_against_fresh_noise_runs(unet):
    """Brute force: the variance of x_0 over 512 runs of the diffusers loop from the same x_T with fresh
    step noise and fixed weights is the aleatoric part. Per-image sums agree within 10% (the
    Monte Carlo error of 512 runs is ~1% on a sum of 128 elements; the rest is the recurrence's
    Gaussian closure of x_t, docs/MATH.md §2)."""
    runs = 512
    recurrence = _sample(unet, PointPosterior(unet), _scheduler(), mc_samples=32)
    scheduler = _scheduler()
    generator = torch.Generator().manual_seed(11)
    x = (_noise() * scheduler.init_noise_sigma).repeat(runs, 1, 1, 1)
    with torch.no_grad():
        for t in scheduler.timesteps:
            x = scheduler.step(unet(x, t).sample, t, x, generator=generator).prev_sample
    brute = x.unflatten(0, (runs, BATCH)).double().var(dim=0).flatten(1).sum(dim=1)
    ours = recurrence.aleatoric_variance.double().flatten(1).sum(dim=1)
    torch.testing.assert_close(ours, brute, rtol=0.10, atol=0)


def test_refusals(unet, posterior):
    plain = tiny_unet(seed=4, channels=CHANNELS)
    plain_posterior = LastLayerLaplace(plain, "diag", sigma_noise=0.1, prior_precision=1e3)
    with pytest.raises(ValueError, match="outputs no variance"):
        _sample(plain, plain_posterior, _scheduler())
    guidance = ClassifierFreeGuidance(2.0, {})
    with pytest.raises(ValueError, match="guidance"):
        _sample(unet, posterior, _scheduler(), guidance=guidance)


def test_the_output_says_where_the_aleatoric_part_comes_from(unet):
    plain = tiny_unet(seed=4, channels=CHANNELS)
    assert "predicts no variance" in aleatoric_source(DDPMScheduler(), plain, stochastic=True)
    dropped = aleatoric_source(DDIMScheduler(), unet, stochastic=False)
    assert "deterministic" in dropped and "drops" in dropped
    assert "learned variance" in aleatoric_source(_scheduler(), unet, stochastic=True)


def test_trajectories_sample_the_learned_variance_as_diffusers_does(unet, posterior):
    """Trajectory Monte Carlo runs scheduler.step on the full output: its aleatoric part (the spread of
    fresh-noise MAP trajectories) is positive and the run says where it came from."""
    out = _sample(unet, posterior, _scheduler(), estimator="trajectories", samples=2, noise_samples=4)
    assert out.aleatoric_variance.sum() > 0 and (out.epistemic_variance >= 0).all()
    assert "learned variance" in out.settings["aleatoric_source"]
