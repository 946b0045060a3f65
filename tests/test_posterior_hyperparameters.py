"""σ by maximum likelihood, δ by MacKay's fixed point and by the evidence, T, and re-tuning."""

import math

import pytest
import torch
from test_posterior_models import conv_head, random_features

from bayesdiff_ext import LastLayerLaplace
from bayesdiff_ext.posterior import hyperparameters as hp


def _spectrum(seed=0, n=50):
    g = torch.Generator().manual_seed(seed)
    values = torch.rand(n, generator=g, dtype=torch.float64) * 100
    counts = torch.randint(1, 4, (n,), generator=g).double()
    return values, counts


def test_mackay_fixed_point_satisfies_its_equation():
    values, counts = _spectrum()
    theta, s = 7.5, 0.3
    delta = hp.mackay_prior_precision(values, counts, theta, s)
    gamma = float((counts * s * values / (s * values + delta)).sum())
    assert delta == pytest.approx(gamma / theta, rel=1e-10)


def test_marglik_and_mackay_find_the_evidence_maximum():
    values, counts = _spectrum(seed=1)
    theta, s = 3.0, 2.0
    kwargs = dict(residual_sum_squares=40.0, residual_elements=100, sigma=1 / math.sqrt(s))
    delta_marglik = hp.marglik_prior_precision(values, counts, theta, s)
    delta_mackay = hp.mackay_prior_precision(values, counts, theta, s)
    assert delta_marglik == pytest.approx(delta_mackay, rel=1e-9)
    best = hp.log_marginal_likelihood(values, counts, theta, delta=delta_marglik, **kwargs)
    for factor in (0.5, 0.99, 1.01, 2.0):
        assert hp.log_marginal_likelihood(values, counts, theta, delta=delta_marglik * factor, **kwargs) < best


def test_evidence_needs_curvature_and_weights():
    with pytest.raises(ValueError, match="nonzero curvature"):
        hp.mackay_prior_precision(torch.zeros(3, dtype=torch.float64), torch.ones(3), 1.0, 1.0)
    with pytest.raises(ValueError, match="nonzero MAP"):
        hp.marglik_prior_precision(torch.ones(3, dtype=torch.float64), torch.ones(3), 0.0, 1.0)


@pytest.mark.parametrize("structure", ["diag", "full", "kron", "isotropic"])
def test_posterior_sigma_ml_and_mackay(structure):
    head = conv_head()
    features = random_features(head)
    post = LastLayerLaplace(head, structure).fit_features(features)
    with torch.no_grad():
        residuals = torch.cat([(head(phi) - target).flatten() for phi, target in features]).double()
    assert post.sigma_noise**2 == pytest.approx(float(residuals.square().mean()), rel=1e-6)
    assert post.fit_stats.residual_elements == residuals.numel()
    values, counts = post.posterior.spectrum()
    s, delta = post.precision_scale, post.prior_precision
    gamma = float((counts * s * values / (s * values + delta)).sum())
    assert delta * post.theta_norm2() == pytest.approx(gamma, rel=1e-9)


def test_fixed_values_temperature_and_retuning():
    head = conv_head()
    post = LastLayerLaplace(head, "diag", sigma_noise=0.5, prior_precision=3.0, temperature=2.0)
    post.fit_features(random_features(head))
    assert (post.sigma_noise, post.prior_precision, post.temperature) == (0.5, 3.0, 2.0)
    assert post.precision_scale == pytest.approx(1 / (0.25 * 2.0))
    phi = torch.randn(1, 5, 4, 4)
    _, var_before = post.predict(phi)
    post.set_hyperparameters(prior_precision=30.0)
    _, var_after = post.predict(phi)
    assert post.prior_precision == 30.0 and (var_after < var_before).all()
    post.set_hyperparameters(sigma_noise="ml", prior_precision="marglik")
    assert post.sigma_choice == "ml" and post.prior_choice == "marglik" and post.prior_precision > 0


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(structure="banana"), "structure must be one of"),
        (dict(structure="full", curvature="ef"), "not available for structure 'full'"),
        (dict(sigma_noise="mackay"), "sigma_noise must be a positive float or one of"),
        (dict(prior_precision=-1.0), "prior_precision must be a positive finite float"),
        (dict(temperature=0.0), "temperature must be a positive finite float"),
    ],
)
def test_constructor_refuses_bad_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LastLayerLaplace(conv_head(), **kwargs)
