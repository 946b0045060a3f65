import math

import pytest
import torch

from bayesdiff_ext import latent
from sd_components import DecodeRecorder, sd_vae


@pytest.mark.parametrize("shift_factor", [None, 0.1159])
def test_latent_conventions_follow_the_pipelines(shift_factor):
    vae = sd_vae(scaling_factor=0.3611, shift_factor=shift_factor)
    latents = torch.randn(2, 4, 8, 8)
    expected_vae_input = latents / 0.3611 if shift_factor is None else latents / 0.3611 + shift_factor
    assert torch.equal(latent.to_vae_latents(latents, vae), expected_vae_input)
    torch.testing.assert_close(latent.to_model_latents(latent.to_vae_latents(latents, vae), vae), latents)
    with torch.no_grad():
        expected = vae.decode(expected_vae_input, return_dict=False)[0]
        assert torch.equal(latent.decode_latents(vae, latents), expected)
        images = torch.rand(2, 3, 16, 16) * 2 - 1
        mode = vae.encode(images).latent_dist.mode()
        torch.testing.assert_close(
            latent.to_vae_latents(latent.encode_images(vae, images, sample=False), vae), mode
        )


def test_decode_draws_are_gaussian_with_the_latent_moments():
    vae = sd_vae()
    recorder = DecodeRecorder(vae)
    mean = torch.randn(2, 4, 6, 6)
    variance = torch.rand(2, 4, 6, 6) * 0.5 + 0.05
    samples = 200
    latent.pixel_moments(
        vae, mean, variance, samples=samples, batch_size=64, generator=torch.Generator().manual_seed(1)
    )
    drawn = latent.to_model_latents(torch.cat(recorder.inputs), vae).double().reshape(samples, *mean.shape)
    standardized = (drawn - mean.double()) / variance.double().sqrt()
    flat = standardized.flatten()
    assert abs(flat.mean()) < 0.02
    assert abs(flat.var() - 1) < 0.03
    assert abs((flat**3).mean()) < 0.06  # skewness
    # Excess kurtosis: 0 for Gaussian draws, −1.2 for the uniform draws of the paper's script.
    assert abs((flat**4).mean() - 3) < 0.15
    per_element = standardized.var(dim=0)
    assert per_element.min() > 0.6 and per_element.max() < 1.5


@pytest.mark.parametrize("images,samples,batch_size", [(3, 5, 2), (2, 4, 8), (1, 7, 3)])
def test_decodes_are_batched_and_the_variance_is_that_of_the_decodes(images, samples, batch_size):
    vae = sd_vae(seed=1)
    recorder = DecodeRecorder(vae)
    mean = torch.randn(images, 4, 5, 7)
    variance = torch.rand(images, 4, 5, 7)
    variance[0, 0, 0, 0] = 0.0
    out = latent.pixel_moments(vae, mean, variance, samples=samples, batch_size=batch_size)
    assert recorder.calls == math.ceil(samples * images / batch_size)
    assert all(len(z) <= batch_size for z in recorder.inputs)
    with torch.no_grad():
        decoded = torch.cat([recorder._decode(z, return_dict=False)[0] for z in recorder.inputs])
    per_image = decoded.double().reshape(samples, images, *decoded.shape[1:])
    torch.testing.assert_close(out.variance.double(), per_image.var(dim=0), rtol=1e-5, atol=1e-10)
    torch.testing.assert_close(out.mean.double(), per_image.mean(dim=0), rtol=1e-5, atol=1e-7)
    assert out.variance.shape == (images, 3, 10, 14) and out.variance.dtype == torch.float32
    assert out.variance.min() >= 0
    torch.testing.assert_close(out.scores, out.variance.flatten(1).sum(1))


def test_small_latent_variance_decodes_to_the_linearised_pixel_variance():
    """For a small Var[z_0] the decoded variance is J·diag(Var[z_0])·Jᵀ on the diagonal (delta method)."""
    vae = sd_vae(seed=2, dtype=torch.float64)
    mean = torch.randn(1, 4, 3, 3, dtype=torch.float64)
    variance = torch.rand(1, 4, 3, 3, dtype=torch.float64) * 1e-6
    jacobian = torch.autograd.functional.jacobian(lambda z: latent.decode_latents(vae, z), mean).reshape(
        3 * 6 * 6, -1
    )
    linearised = (jacobian.square() @ variance.flatten()).reshape(1, 3, 6, 6)
    out = latent.pixel_moments(
        vae, mean, variance, samples=3000, batch_size=1000, generator=torch.Generator().manual_seed(0)
    )
    assert out.variance.dtype == torch.float64
    ratio = out.variance / linearised
    assert (ratio - 1).abs().max() < 0.2  # 3000 draws: the std of each ratio is √(2/2999) ≈ 2.6%
    assert abs(float(out.variance.sum() / linearised.sum()) - 1) < 0.03


def test_pixel_moments_errors_name_the_argument():
    vae = sd_vae()
    mean = torch.zeros(1, 4, 4, 4)
    with pytest.raises(ValueError, match="latent_variance must have the shape"):
        latent.pixel_moments(vae, mean, torch.zeros(1, 4, 4, 5))
    with pytest.raises(ValueError, match=r"latent_mean must be \(B, C, h, w\)"):
        latent.pixel_moments(vae, mean[0], mean[0])
    with pytest.raises(ValueError, match="samples must be an integer >= 2"):
        latent.pixel_moments(vae, mean, mean, samples=1)
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1"):
        latent.pixel_moments(vae, mean, mean, batch_size=0)
