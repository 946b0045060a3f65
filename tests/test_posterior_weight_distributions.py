"""The distributions VI, HMC and head ensembles yield: predict through the fused ops against a dense
float64 oracle (var = J·Σ·Jᵀ with the head's Jacobian), sampling, and refusals."""

import pytest
import torch
from test_posterior_models import conv_head

from bayesdiff_ext.posterior.heads import head_spec
from bayesdiff_ext.posterior.linear_gaussian import rows_to_vector, vector_to_rows
from bayesdiff_ext.posterior.weight_distributions import (
    DiagGaussian,
    FactoredGaussian,
    WeightSamples,
    sample_factors,
)

HEADS = {
    "conv": lambda: conv_head(c_in=3, c_out=2, kernel=3),
    "conv_stride2_nobias": lambda: conv_head(c_in=2, c_out=3, kernel=3, stride=2, padding=1, bias=False),
    "linear": lambda: torch.nn.Linear(4, 3),
}


def _phi(head):
    g = torch.Generator().manual_seed(1)
    if isinstance(head, torch.nn.Conv2d):
        return torch.randn(2, head.in_channels, 7, 5, generator=g)
    return torch.randn(2, 3, head.in_features, generator=g)


def _distributions(spec):
    g = torch.Generator().manual_seed(0)
    c, p = spec.eps_channels, spec.num_params
    k = p // c
    mean = torch.randn(c, k, generator=g, dtype=torch.float64)
    proj = torch.randn(k + 2, k, generator=g, dtype=torch.float64)
    mix = torch.rand(c, k + 2, generator=g, dtype=torch.float64)
    samples = torch.randn(6, p, generator=g, dtype=torch.float64) * 0.3
    return {
        "diag": DiagGaussian(spec, mean, torch.rand(c, k, generator=g, dtype=torch.float64)),
        "factored": FactoredGaussian(spec, mean, proj, mix),
        "samples": WeightSamples(spec, samples),
    }


def _dense_covariance(distribution, spec):
    """Σ over θ in laplace-torch's order, from the distribution's own definition."""
    if isinstance(distribution, WeightSamples):
        return torch.cov(distribution.samples.T)
    index = vector_to_rows(spec, torch.arange(spec.num_params))
    dense = torch.zeros(spec.num_params, spec.num_params, dtype=torch.float64)
    if isinstance(distribution, DiagGaussian):
        return torch.diag(rows_to_vector(spec, distribution.variance_rows))
    for c in range(spec.eps_channels):
        block = (distribution.proj.T * distribution.mix[c]) @ distribution.proj
        dense[index[c][:, None], index[c][None, :]] = block
    return dense


def _jacobian(head, spec, phi):
    """d(ε outputs)/dθ, (outputs, P) in float64, by autograd."""
    head = head.double()
    names = [n for n, _ in head.named_parameters()]

    def outputs(*params):
        out = torch.func.functional_call(head, dict(zip(names, params)), (phi.double(),))
        return (out[:, : spec.eps_channels] if spec.is_conv else out[..., : spec.eps_channels]).flatten()

    blocks = torch.autograd.functional.jacobian(outputs, tuple(p.detach() for p in head.parameters()))
    return torch.cat([b.flatten(1) for b in blocks], dim=1)


@pytest.mark.parametrize("name", list(HEADS))
@pytest.mark.parametrize("kind", ["diag", "factored", "samples"])
def test_predict_matches_the_dense_oracle(name, kind):
    head = HEADS[name]()
    spec = head_spec(head, head.out_channels if isinstance(head, torch.nn.Conv2d) else head.out_features)
    distribution = _distributions(spec)[kind]
    phi = _phi(head)
    jac = _jacobian(head, spec, phi)
    mean, var = distribution.predict(phi)
    assert mean.dtype == var.dtype == torch.float32 and (var >= 0).all()
    torch.testing.assert_close(mean.double().flatten(), jac @ distribution.mean_vector(), rtol=1e-4, atol=1e-4)
    expected = ((jac @ _dense_covariance(distribution, spec)) * jac).sum(1)
    torch.testing.assert_close(var.double().flatten(), expected, rtol=1e-4, atol=1e-5)
    mean64, var64 = distribution.predict(phi.double())
    assert var64.dtype == torch.float64
    torch.testing.assert_close(var64.flatten(), expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(
        distribution.marginal_variance(), vector_to_rows(spec, _dense_covariance(distribution, spec).diagonal())
    )


@pytest.mark.parametrize("kind", ["diag", "factored"])
def test_gaussian_draws_have_the_distribution_moments(kind):
    head = conv_head(c_in=2, c_out=2, kernel=1)
    spec = head_spec(head, 2)
    distribution = _distributions(spec)[kind]
    draws = distribution.sample(40000, torch.Generator().manual_seed(3))
    assert draws.shape == (40000, spec.num_params) and draws.dtype == torch.float64
    covariance = _dense_covariance(distribution, spec)
    scale = covariance.diagonal().sqrt()
    # 40000 draws: standard errors ≈ 0.5% of the scales; 4% is > 7 of them
    torch.testing.assert_close(draws.mean(0), distribution.mean_vector(), rtol=0, atol=float(0.04 * scale.max()))
    torch.testing.assert_close(torch.cov(draws.T), covariance, rtol=0, atol=float(0.04 * scale.max() ** 2))


def test_stored_samples_without_replacement_then_cycling():
    spec = head_spec(conv_head(c_in=2, c_out=1, kernel=1), 1)
    stored = torch.arange(15, dtype=torch.float64).reshape(5, 3)
    distribution = WeightSamples(spec, stored)
    few = distribution.sample(4, torch.Generator().manual_seed(0))
    assert len({float(r[0]) for r in few}) == 4 and all(bool((stored == r).all(1).any()) for r in few)
    many = distribution.sample(12, torch.Generator().manual_seed(0))
    counts = torch.bincount((many[:, 0] / 3).long(), minlength=5)
    assert counts.tolist() == [2, 2, 2, 2, 2] or sorted(counts.tolist()) == [2, 2, 2, 3, 3]
    assert int(counts.sum()) == 12 and int(counts.min()) >= 2


def test_sample_factors_both_branches_give_the_sample_covariance():
    spec = head_spec(conv_head(c_in=2, c_out=2, kernel=1), 2)  # K = 3
    index = vector_to_rows(spec, torch.arange(spec.num_params))
    same_channel = torch.zeros(spec.num_params, spec.num_params, dtype=torch.bool)
    for c in range(2):
        same_channel[index[c][:, None], index[c][None, :]] = True
    g = torch.Generator().manual_seed(0)
    for count in (3, 50):  # S ≤ K: the centred samples; S > K: the eigenvectors
        samples = torch.randn(count, spec.num_params, generator=g, dtype=torch.float64)
        mean, proj, mix = sample_factors(spec, samples)
        assert proj.shape[0] == 2 * min(count, 3)
        rebuilt = FactoredGaussian(spec, mean, proj, mix)
        # the factors keep each channel's block; cross-channel covariances never reach an output's variance
        expected = torch.where(same_channel, torch.cov(samples.T), torch.zeros(()))
        torch.testing.assert_close(_dense_covariance(rebuilt, spec), expected, rtol=1e-10, atol=1e-12)


def test_refusals():
    spec = head_spec(conv_head(c_in=2, c_out=2, kernel=1), 2)
    mean = torch.zeros(2, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="mean"):
        DiagGaussian(spec, torch.zeros(3, 3), torch.zeros(3, 3))
    with pytest.raises(ValueError, match="variances"):
        DiagGaussian(spec, mean, -torch.ones(2, 3))
    with pytest.raises(ValueError, match="proj"):
        FactoredGaussian(spec, mean, torch.zeros(4, 2), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="mix"):
        FactoredGaussian(spec, mean, torch.zeros(4, 3), -torch.ones(2, 4))
    with pytest.raises(ValueError, match="samples"):
        WeightSamples(spec, torch.zeros(1, 6))
    with pytest.raises(ValueError, match="n_samples"):
        DiagGaussian(spec, mean, torch.ones(2, 3)).sample(0)
