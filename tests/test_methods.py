"""bayesdiff_ext.methods.sampler_for / laplace_posterior_for: one interface for every method."""

import pytest
import torch
from methods_helpers import STEPS, ddim, noise
from tiny_models import tiny_unet
from test_posterior_models import conv_head, random_features

from bayesdiff_ext import BayesDiffSampler, LastLayerLaplace
from bayesdiff_ext.methods import METHODS, EnsembleSampler, MCDropoutSampler, sampler_for
from bayesdiff_ext.methods.selection import laplace_posterior_for
from bayesdiff_ext.sampler.trajectories import TrajectorySampler


def _fit(head, structure):
    return LastLayerLaplace(head, structure).fit_features(random_features(head))


def test_isotropic_from_a_diag_posterior_equals_fitting_isotropic():
    head = conv_head(c_in=4, c_out=2, kernel=3)
    derived = laplace_posterior_for("isotropic", _fit(head, "diag"))
    direct = _fit(head, "isotropic")
    assert derived.structure == "isotropic"
    assert derived.prior_precision == pytest.approx(direct.prior_precision, rel=1e-12)
    phi = torch.randn(2, 4, 5, 5)
    torch.testing.assert_close(derived.predict(phi), direct.predict(phi))


def test_hfl_from_a_full_posterior_uses_its_gram_matrix():
    head = conv_head(c_in=4, c_out=2, kernel=3)
    full = _fit(head, "full")
    derived = laplace_posterior_for("hfl", full)
    derived.posterior.probes = "basis"
    assert full.structure == "full" and derived.structure == "hfl"
    phi = torch.randn(1, 4, 5, 5, dtype=torch.float64)
    torch.testing.assert_close(derived.predict(phi)[1], full.predict(phi)[1], rtol=1e-6, atol=0)


def test_laplace_methods_refuse_posteriors_they_cannot_use():
    diag = _fit(conv_head(c_in=4, c_out=2, kernel=3), "diag")
    with pytest.raises(ValueError, match="method 'hfl' needs a posterior of structure hfl or full"):
        laplace_posterior_for("hfl", diag)
    with pytest.raises(ValueError, match="needs a fitted posterior"):
        sampler_for("laplace", tiny_unet(channels=1), ddim())
    with pytest.raises(ValueError, match="method must be one of"):
        sampler_for("dropout", tiny_unet(channels=1), ddim())


def test_every_method_samples_with_the_same_outputs():
    unet = tiny_unet(channels=1)
    images = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    full = LastLayerLaplace(unet, "full").fit(images, ddim(), batch_size=4, progress=False)
    diag = LastLayerLaplace(unet, "diag").fit(images, ddim(), batch_size=4, progress=False)
    made = {
        "laplace": sampler_for("laplace", unet, ddim(), posterior=diag),
        "trajectories": sampler_for("trajectories", unet, ddim(), posterior=diag),
        "hfl": sampler_for("hfl", unet, ddim(), posterior=full, probes=5),
        "isotropic": sampler_for("isotropic", unet, ddim(), posterior=diag),
        "mc-dropout": sampler_for("mc-dropout", tiny_unet(channels=1, dropout=0.2), ddim(), passes=2),
        "ensemble": sampler_for("ensemble", unet, ddim(), members=[tiny_unet(channels=1, seed=1)]),
        "x0-drift": sampler_for("x0-drift", unet, ddim(), last_steps=2),
        "weight-samples": sampler_for("weight-samples", unet, ddim(), posterior=full, samples=2),
    }
    assert set(made) == set(METHODS)
    assert isinstance(made["mc-dropout"], MCDropoutSampler) and isinstance(made["ensemble"], EnsembleSampler)
    assert isinstance(made["hfl"], BayesDiffSampler) and made["hfl"].posterior.structure == "hfl"
    assert isinstance(made["trajectories"], TrajectorySampler)
    assert made["hfl"].posterior.posterior.probes == 5 and full.structure == "full"
    for method, sampler in made.items():
        out = sampler.sample(noise=noise(), num_inference_steps=STEPS, progress=False)
        assert out.images.shape == out.variance.shape == out.epistemic_variance.shape == (2, 1, 8, 8), method
        assert out.variance.min() >= 0 and out.scores.shape == (2,), method
