"""HMC on a small conv head against the exact Gaussian posterior, and the chain diagnostics.

The tolerance of the variance test comes from the chains' own effective sample size: the sample
variance v̂ of n_eff independent Gaussian draws has relative standard error √(2/n_eff), so every
output variance is checked at 4.5 standard errors, using the ESS of the squared centred output
(the statistic whose mean v̂ is). With 60 checked outputs, a correct sampler fails one by chance with
probability about 60·7e-6 = 4e-4; a sampler off by 10% fails at n_eff ≈ 4000.
"""

import math

import pytest
import torch
from test_posterior_models import conv_head, random_features

from bayesdiff_ext.posterior import LastLayerLaplace, LastLayerMCMC
from bayesdiff_ext.posterior.hmc import run_hmc, warmup_windows
from bayesdiff_ext.posterior.linear_gaussian import vector_to_rows
from bayesdiff_ext.posterior.mcmc_diagnostics import effective_sample_size, split_rhat, summary
from bayesdiff_ext.posterior.settings import HMCSettings

CHAINS, DRAWS = 4, 2000
Z = 4.5


def _data():
    return random_features(conv_head(c_in=3, c_out=2, kernel=3, seed=1), batches=2, batch=4)


@pytest.fixture(scope="module")
def mcmc():
    head = conv_head(c_in=3, c_out=2, kernel=3)
    post = LastLayerMCMC(head, chains=CHAINS, warmup=500, draws=DRAWS, sigma_noise=0.5, prior_precision=2.0)
    return post.fit_features(_data())


def _patches(phi):
    """a = [φ_p; 1] of the 3×3 head at every output position, (B, K, P) float64."""
    patches = torch.nn.functional.unfold(phi.double(), 3, padding=1)
    return torch.cat([patches, torch.ones_like(patches[:, :1])], dim=1)


def _outputs_per_chain(post, phi):
    """f = Θ·a at every output of φ for every kept draw, (chains, draws, outputs), float64."""
    rows = vector_to_rows(post.spec, post.distribution.samples).unflatten(0, (DRAWS, CHAINS))  # draw-major
    return torch.einsum("dmck,bkp->mdbcp", rows, _patches(phi)).flatten(2)


def test_output_variance_matches_the_full_closed_form_within_its_ess(mcmc):
    phi = torch.randn(1, 3, 6, 5, generator=torch.Generator().manual_seed(7))
    laplace = LastLayerLaplace(mcmc.head, "full", sigma_noise=0.5, prior_precision=2.0).fit_features(_data())
    _, exact_var = laplace.predict(phi.double())
    mean, var = mcmc.predict(phi.double())
    outputs = _outputs_per_chain(mcmc, phi)
    torch.testing.assert_close(outputs.flatten(0, 1).var(0), var.flatten(), rtol=1e-9, atol=1e-12)
    squared = (outputs - outputs.mean((0, 1))).square()
    ess = effective_sample_size(squared)
    assert float(ess.min()) > 2000
    relative_error = var.flatten() / exact_var.flatten() - 1
    assert bool((relative_error.abs() < Z * (2 / ess).sqrt()).all()), (relative_error, ess)
    # the mean is the posterior mean Θ*·a, within its own standard error
    exact_mean = torch.einsum("ck,bkp->bcp", mcmc.exact.posterior_mean(), _patches(phi)).flatten()
    mean_ess = effective_sample_size(outputs)
    assert bool(((mean.flatten() - exact_mean).abs() < Z * (exact_var.flatten() / mean_ess).sqrt()).all())


def test_chains_report_convergence(mcmc):
    record = mcmc.record
    assert record["rhat_max"] < 1.01 and record["ess_min"] > 1000 and record["divergences"] == 0
    assert 0.6 < record["accept_rate"] < 0.95
    assert record["gradient_evaluations"] > 0 and record["step_size"] > 0
    assert mcmc.distribution.samples.shape == (CHAINS * DRAWS, mcmc.spec.num_params)


def test_sample_returns_stored_draws(mcmc):
    stored = mcmc.distribution.samples
    few = mcmc.sample(10, torch.Generator().manual_seed(0))
    assert few.shape == (10, mcmc.spec.num_params) and few.dtype == torch.float64
    assert all(bool((stored == r).all(1).any()) for r in few)


def test_warmup_follows_stans_windows():
    assert warmup_windows(1000) == (75, [100, 150, 250, 450, 950])
    assert warmup_windows(10) == (10, [])
    initial, ends = warmup_windows(200)
    assert initial == 30 and ends[-1] == 180


def test_thinning_and_seed(mcmc):
    exact = mcmc.exact
    settings = HMCSettings(chains=2, warmup=30, draws=8, thin=3)
    a, record = run_hmc(exact, settings, generator=torch.Generator().manual_seed(1))
    b, _ = run_hmc(exact, settings, generator=torch.Generator().manual_seed(1))
    assert a.shape == (2, 8, *exact.theta_hat.shape) and torch.equal(a, b)
    assert math.isfinite(record["rhat_max"])
    with pytest.raises(ValueError, match="draws"):
        LastLayerMCMC(mcmc.head, draws=2)
    with pytest.raises(ValueError, match="target_accept"):
        HMCSettings(target_accept=1.0)


def test_ess_and_rhat_on_known_chains():
    g = torch.Generator().manual_seed(0)
    iid = torch.randn(4, 1000, 40, generator=g, dtype=torch.float64)
    ess = effective_sample_size(iid)
    assert 0.85 < float(ess.median()) / 4000 < 1.15
    assert float(split_rhat(iid).max()) < 1.01
    # AR(1) with ρ = 0.9: ESS = n·(1 − ρ)/(1 + ρ)
    rho, ar = 0.9, torch.zeros(4, 4000, 40, dtype=torch.float64)
    ar[:, 0] = torch.randn(4, 40, generator=g, dtype=torch.float64)
    for t in range(1, 4000):
        ar[:, t] = rho * ar[:, t - 1] + math.sqrt(1 - rho**2) * torch.randn(4, 40, generator=g, dtype=torch.float64)
    expected = 16000 * (1 - rho) / (1 + rho)
    assert 0.75 < float(effective_sample_size(ar).median()) / expected < 1.25
    # chains that disagree
    apart = iid + torch.arange(4, dtype=torch.float64)[:, None, None]
    assert float(split_rhat(apart).min()) > 1.2
    assert summary(iid)["rhat_max"] < 1.01
