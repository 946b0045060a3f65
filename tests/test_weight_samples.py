"""The weight-samples method (issue 18): M head weights fixed per trajectory, against an explicit loop
of M plain runs with those weights written into the head; its feature-space entropy against numpy."""

import math

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, FlowMatchEulerDiscreteScheduler
from test_transformers import conditioning_for, fitted, model_input
from tiny_models import tiny_unet

from bayesdiff_ext import LastLayerLaplace
from bayesdiff_ext.denoiser import Denoiser
from bayesdiff_ext.methods import WeightSamplesSampler, sampler_for
from bayesdiff_ext.methods.feature_entropy import ClampedFeatures, feature_entropy, gaussian_entropy
from bayesdiff_ext.posterior.perturbation import split_parameters
from bayesdiff_ext.randomness import image_generators

STEPS = 4


@pytest.fixture(scope="module")
def unet():
    return tiny_unet(seed=2, add_attention=False)


def _fit(unet, structure):
    images = torch.rand(8, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    return LastLayerLaplace(unet, structure, sigma_noise=0.1, prior_precision=300.0).fit(
        images, DDPMScheduler(clip_sample=False), batch_size=4, generator=torch.Generator().manual_seed(1), progress=False
    )


@pytest.fixture(scope="module")
def posterior(unet):
    return _fit(unet, "diag")


def _plain_run(model, scheduler, noise, model_kwargs=None):
    """The scheduler's own loop with the model as it is (no hook, no wrapper)."""
    denoiser, channels = Denoiser(model), noise.shape[1]
    scheduler.set_timesteps(STEPS)
    x = noise * getattr(scheduler, "init_noise_sigma", 1.0)
    with torch.no_grad():
        for t in scheduler.timesteps:
            scaled = scheduler.scale_model_input(x, t) if hasattr(scheduler, "scale_model_input") else x
            x = scheduler.step(denoiser(scaled, t, model_kwargs)[:, :channels], t, x).prev_sample
    return x


def _runs_with_weights(model, posterior, scheduler, noise, deviations, model_kwargs=None):
    """x_0 (M, B, ...) of M plain runs, run m with θ_head + deviations[m] written into the head."""
    head, spec = posterior.head, posterior.spec
    rows = list(spec.eps_rows) if spec.eps_rows is not None else slice(0, spec.eps_channels)
    weights, biases = split_parameters(spec, deviations)
    finals = []
    for m in range(len(deviations)):
        saved = (head.weight.detach().clone(), head.bias.detach().clone())
        with torch.no_grad():
            head.weight[rows] += weights[m].reshape(head.weight[rows].shape).to(head.weight.dtype)
            head.bias[rows] += biases[m].to(head.bias.dtype)
        try:
            finals.append(_plain_run(model, scheduler, noise, model_kwargs))
        finally:
            with torch.no_grad():
                head.weight.copy_(saved[0])
                head.bias.copy_(saved[1])
    return torch.stack(finals).to(torch.float64)


def _check_against_plain_runs(model, posterior, make_scheduler, noise, samples, model_kwargs=None):
    out = WeightSamplesSampler(model, make_scheduler(), posterior, samples=samples).sample(
        noise=noise, num_inference_steps=STEPS, model_kwargs=model_kwargs, progress=False, return_draws=True
    )
    deviations = out.draws.deviations  # (1, M, B, P): one noise stream, the same M draws for every image
    assert deviations.shape[:3] == (1, samples, len(noise))
    assert torch.equal(deviations[0, :, :1].expand_as(deviations[0]), deviations[0])
    assert float(deviations.abs().min()) > 0
    finals = _runs_with_weights(model, posterior, make_scheduler(), noise, deviations[0, :, 0], model_kwargs)
    assert torch.equal(out.images, _plain_run(model, make_scheduler(), noise, model_kwargs))
    expected = finals.var(dim=0)  # unbiased, around the draws' own mean
    assert float(expected.flatten(1).sum(1).min()) > 0
    torch.testing.assert_close(out.variance.to(torch.float64), expected, rtol=2e-3, atol=1e-6 * float(expected.max()))
    torch.testing.assert_close(out.mean.to(torch.float64), finals.mean(dim=0), rtol=1e-4, atol=1e-4 * float(finals.abs().max()))
    torch.testing.assert_close(out.scores.to(torch.float64), expected.flatten(1).sum(1), rtol=2e-3, atol=0)
    return out


@pytest.mark.parametrize("structure", ["diag", "kron", "full"])
def test_variance_is_that_of_m_plain_runs_with_the_drawn_weights_on_a_unet(unet, structure):
    posterior = _fit(unet, structure)
    noise = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(5))
    _check_against_plain_runs(unet, posterior, lambda: DDIMScheduler(clip_sample=False), noise, samples=3)


def test_variance_is_that_of_m_plain_runs_with_the_drawn_weights_on_a_transformer():
    """SD3's token-wise Linear head, flow matching."""
    sd3 = fitted("sd3")
    _check_against_plain_runs(
        sd3.model,
        sd3,
        lambda: FlowMatchEulerDiscreteScheduler(shift=3.0),
        model_input("sd3"),
        samples=3,
        model_kwargs=conditioning_for("sd3", 2),
    )


def test_per_image_draws_do_not_depend_on_the_batch(unet, posterior):
    sampler = WeightSamplesSampler(unet, DDIMScheduler(clip_sample=False), posterior, samples=2)

    def run(indices):
        return sampler.sample(
            batch_size=len(indices), num_inference_steps=STEPS, generator=image_generators(3, indices),
            progress=False, return_draws=True, weight_seed=None,
        )

    both, second = run(range(0, 2)), run(range(1, 2))
    deviations = both.draws.deviations[0]
    assert not torch.equal(deviations[:, 0], deviations[:, 1])  # each image its own draws
    assert torch.equal(both.draws.deviations[0, :, 1:], second.draws.deviations[0])
    torch.testing.assert_close(both.variance[1:], second.variance, rtol=1e-4, atol=1e-4)  # batch-size round-off


def test_a_stochastic_sampler_adds_its_noise_part_and_needs_an_even_count(unet, posterior):
    sampler = WeightSamplesSampler(unet, DDPMScheduler(clip_sample=False), posterior, samples=4)
    out = sampler.sample(batch_size=2, num_inference_steps=STEPS, generator=image_generators(0, range(2)),
                         progress=False, return_draws=True)
    assert out.draws.finals.shape[:3] == (2, 2, 2)  # M = 4 draws, two in each of 2 noise streams
    assert float(out.aleatoric_variance.sum()) > 0 and float(out.epistemic_variance.sum()) > 0
    with pytest.raises(ValueError, match="samples must be even"):
        WeightSamplesSampler(unet, DDPMScheduler(clip_sample=False), posterior, samples=3).sample(
            batch_size=1, num_inference_steps=STEPS, generator=image_generators(0, range(1)), progress=False
        )


def _numpy_entropy(features: np.ndarray, floor: float) -> np.ndarray:
    """½ Σ_d log(2πe (s_d² + τ)) per image, s² the unbiased variance over the M samples, τ = floor·mean f²."""
    m, b, d = features.shape
    out = np.empty(b)
    for i in range(b):
        f = features[:, i, :]
        s2 = ((f - f.mean(axis=0)) ** 2).sum(axis=0) / (m - 1)
        tau = floor * (f**2).sum() / (m * d)
        out[i] = 0.5 * np.sum(np.log(2 * np.pi * np.e * (s2 + tau)))
    return out


def test_gaussian_entropy_against_numpy():
    rng = np.random.default_rng(0)
    features = rng.normal(size=(5, 4, 7)) * rng.uniform(0.1, 3.0, size=(1, 4, 7))
    features[:, 2, 3] = 1.5  # a feature that does not move: τ keeps H finite
    for floor in (1e-6, 1e-2):
        np.testing.assert_allclose(gaussian_entropy(torch.from_numpy(features), floor).numpy(),
                                   _numpy_entropy(features, floor), rtol=1e-12)
    # scaling the extractor by c shifts every H by d·log c (the ranking does not move)
    shifted = gaussian_entropy(torch.from_numpy(3.0 * features)) - gaussian_entropy(torch.from_numpy(features))
    np.testing.assert_allclose(shifted.numpy(), 7 * math.log(3.0), rtol=1e-9)


def test_the_methods_entropy_reads_the_final_images_through_a_plain_callable(unet, posterior):
    projection = torch.randn(3 * 8 * 8, 6, generator=torch.Generator().manual_seed(0))

    def extractor(images):  # any callable images -> (N, d)
        return torch.tanh(images.flatten(1) / 100) @ projection

    out = sampler_for("weight-samples", unet, DDIMScheduler(clip_sample=False), posterior=posterior,
                      samples=3, features=extractor).sample(batch_size=2, num_inference_steps=STEPS,
                                                            generator=image_generators(0, range(2)),
                                                            progress=False, return_draws=True)
    finals = out.draws.finals.flatten(0, 1)
    features = extractor(finals.flatten(0, 1)).reshape(3, 2, 6).to(torch.float64).numpy()
    assert out.feature_entropy.shape == (2,) and out.feature_entropy.dtype == torch.float64
    np.testing.assert_allclose(out.feature_entropy.numpy(), _numpy_entropy(features, 1e-6), rtol=1e-5)
    assert out.settings["method"] == "weight-samples"
    no_features = WeightSamplesSampler(unet, DDIMScheduler(clip_sample=False), posterior, samples=3)
    assert no_features.sample(batch_size=1, num_inference_steps=STEPS, progress=False).feature_entropy is None


def test_clamped_features_read_the_images_in_minus_one_one():
    seen = []
    clamped = ClampedFeatures(lambda x: seen.append(x) or x.flatten(1))
    samples = torch.linspace(-3, 3, 2 * 2 * 4).reshape(2, 2, 1, 2, 2)
    feature_entropy(samples, clamped)
    assert float(seen[0].max()) == 1.0 and float(seen[0].min()) == -1.0


def test_bad_arguments_are_named(unet, posterior):
    scheduler = DDIMScheduler(clip_sample=False)
    with pytest.raises(ValueError, match="samples must be an integer >= 2"):
        WeightSamplesSampler(unet, scheduler, posterior, samples=1)
    with pytest.raises(TypeError, match="features must map images"):
        WeightSamplesSampler(unet, scheduler, posterior, features=3)
    with pytest.raises(ValueError, match="weight-samples' needs a fitted posterior"):
        sampler_for("weight-samples", unet, scheduler)
    with pytest.raises(ValueError, match="weight_seed must be an integer >= 0"):
        WeightSamplesSampler(unet, scheduler, posterior).sample(batch_size=1, num_inference_steps=STEPS,
                                                                progress=False, weight_seed=-1)
