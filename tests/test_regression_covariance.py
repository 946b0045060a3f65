"""The recurrence's regression (Stein) estimator of Cov(x_t, ε) and the spread of ε (docs/MATH.md §2)."""

import torch
from test_sampler import _ddim, _noise, _posterior
from tiny_models import tiny_unet

from bayesdiff_ext import BayesDiffSampler
from bayesdiff_ext import reference
from bayesdiff_ext.sampler.eps_moments import regression_moments


def test_exact_for_a_locally_linear_response_whatever_the_draws():
    """ε = g·x + c: Cov(x, ε) = g·v and the spread g²·v, for any S ≥ 2 draws (not only antithetic);
    the plain estimator carries the draws' own spread instead of v."""
    g = torch.Generator().manual_seed(0)
    mean, var = torch.randn(3, 4, generator=g, dtype=torch.float64), torch.rand(3, 4, generator=g, dtype=torch.float64)
    slope, offset = torch.randn(3, 4, generator=g, dtype=torch.float64), torch.randn(3, 4, generator=g, dtype=torch.float64)
    x = mean + var.sqrt() * torch.randn(5, 3, 4, generator=g, dtype=torch.float64)
    eps = slope * x + offset
    spread, cov = regression_moments(x, eps, var)
    torch.testing.assert_close(cov, slope * var, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(spread, slope.square() * var, rtol=1e-12, atol=1e-12)
    _, _, plain_cov = reference.mc_moments(x, eps, None, mean)
    assert float((plain_cov - slope * var).abs().max()) > 1e-3


def test_zero_variance_gives_zero_covariance():
    x = torch.zeros(4, 2, 3)
    spread, cov = regression_moments(x, torch.randn(4, 2, 3), torch.zeros(2, 3))
    assert torch.equal(cov, torch.zeros_like(cov)) and bool(torch.isfinite(spread).all())


def test_sampler_with_the_regression_estimator_agrees_with_many_plain_draws():
    """Measured on the tiny UNet (10 DDIM steps): S = 10 regression and S = 200 plain means agree
    within 1%; bound 5%."""
    unet = tiny_unet()
    posterior = _posterior(unet)

    def run(covariance, samples):
        return BayesDiffSampler(unet, _ddim(), posterior).sample(
            noise=_noise(), num_inference_steps=10, uq_every=1, mc_samples=samples, covariance=covariance,
            generator=torch.Generator().manual_seed(1), progress=False,
        )

    ratio = float(run("regression", 10).variance.mean() / run("mc", 200).variance.mean())
    assert abs(ratio - 1) < 0.05, ratio
