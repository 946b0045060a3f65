"""Forward-mode linearisation: the tangents of the one trajectory against J Σ Jᵀ and the trajectories."""

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler
from test_trajectories import LinearDenoiser, _jacobian_variance, _linear_posterior

from bayesdiff_ext.randomness import image_generators
from bayesdiff_ext.sampler.linearised import LinearisedSampler
from bayesdiff_ext.sampler.trajectories import TrajectorySampler

STEPS = 4


def _run(sampler_class, model, scheduler, posterior, **kwargs):
    return sampler_class(model, scheduler, posterior).sample(num_inference_steps=STEPS, progress=False, **kwargs)


@pytest.mark.parametrize("prior_precision", [1e4, 1.0])
def test_tangent_variance_is_the_jacobian_variance(prior_precision):
    """The linearisation is J Σ Jᵀ whatever the posterior's width: M = 256 Sobol directions,
    measured over 3 seeds and both widths: sums within 1.3%, pixels within 0.87–1.18; bounds 5%
    and 0.7–1.3."""
    model = LinearDenoiser().eval()
    posterior = _linear_posterior(model, prior_precision=prior_precision)
    noise = torch.randn(2, 2, 5, 5, generator=torch.Generator().manual_seed(1))
    exact = _jacobian_variance(model, posterior, noise)
    out = _run(LinearisedSampler, model, DDIMScheduler(clip_sample=False), posterior, noise=noise, samples=256,
               draws="sobol", generator=image_generators(3, range(2)), chunk_size=64)
    ratio = out.variance.double() / exact
    assert abs(float(out.variance.double().sum() / exact.sum()) - 1) < 0.05
    assert float(ratio.min()) > 0.7 and float(ratio.max()) < 1.3
    assert out.timings["tangent_passes"] == 4


def test_image_is_the_stock_loops_and_stochastic_samplers_get_their_noise_part():
    model = LinearDenoiser().eval()
    posterior = _linear_posterior(model, prior_precision=1e4)
    noise = torch.randn(2, 2, 5, 5, generator=torch.Generator().manual_seed(1))
    common = dict(noise=noise, samples=8)
    linear = _run(LinearisedSampler, model, DDPMScheduler(clip_sample=False), posterior, noise_samples=16,
                  generator=image_generators(3, range(2)), **common)
    full = _run(TrajectorySampler, model, DDPMScheduler(clip_sample=False), posterior,
                generator=image_generators(3, range(2)), **common)
    assert torch.equal(linear.images, full.images)
    ratio = float(linear.aleatoric_variance.mean() / full.aleatoric_variance.mean())
    assert 0.7 < ratio < 1.4, ratio  # 15 and 7 degrees of freedom per pixel, 50 pixels
    with pytest.raises(ValueError, match="antithetic"):
        _run(LinearisedSampler, model, DDIMScheduler(clip_sample=False), posterior, draws="antithetic", **common)
    with pytest.raises(ValueError, match="noise_samples"):
        _run(LinearisedSampler, model, DDPMScheduler(clip_sample=False), posterior, noise_samples=1, **common)


def test_directions_are_shared_by_every_image_unless_asked_otherwise():
    """Two images with the same x_T: the same M directions give the same variance; each image's own differ."""
    model = LinearDenoiser().eval()
    posterior = _linear_posterior(model, prior_precision=1.0)
    noise = torch.randn(1, 2, 5, 5, generator=torch.Generator().manual_seed(1)).repeat(2, 1, 1, 1)
    common = dict(noise=noise, samples=4, generator=image_generators(3, range(2)))
    shared = _run(LinearisedSampler, model, DDIMScheduler(clip_sample=False), posterior, **common)
    own = _run(LinearisedSampler, model, DDIMScheduler(clip_sample=False), posterior, shared_draws=False, **common)
    assert torch.equal(shared.variance[0], shared.variance[1])
    assert not torch.equal(own.variance[0], own.variance[1])
