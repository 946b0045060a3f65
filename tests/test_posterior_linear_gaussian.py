"""The head's linear-Gaussian statistics and exact posterior, against a dense Jacobian built by autograd.

For a head with parameters θ (laplace-torch's order) and the data's stacked outputs f = J·θ, the exact
posterior at (s, δ) is N((s·JᵀJ + δ)⁻¹·s·Jᵀy, (s·JᵀJ + δ)⁻¹): an oracle that shares nothing with the
Gram/cross accumulators, the row layout or the closed-form mean.
"""

import math

import pytest
import torch
from test_posterior_models import conv_head

from bayesdiff_ext.posterior.heads import head_spec
from bayesdiff_ext.posterior.linear_gaussian import (
    HeadStatistics,
    LinearGaussianHead,
    head_rows,
    rows_to_vector,
    vector_to_rows,
)

HEADS = {
    "conv": lambda: conv_head(c_in=3, c_out=2, kernel=3),
    "conv_stride2_nobias": lambda: conv_head(c_in=2, c_out=3, kernel=3, stride=2, padding=1, bias=False),
    "linear_tokens": lambda: torch.nn.Linear(4, 3),
}
S, DELTA = 1.7, 0.6


def _data(head, batches=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(batches):
        if isinstance(head, torch.nn.Conv2d):
            phi = torch.randn(4, head.in_channels, 7, 5, generator=g, dtype=torch.float64)
        else:
            phi = torch.randn(4, 3, head.in_features, generator=g, dtype=torch.float64)
        with torch.no_grad():
            f = head(phi)
        out.append((phi, f + 0.5 * torch.randn(f.shape, generator=g, dtype=torch.float64) + 0.3))
    return out


def _jacobian(head, phi):
    params = dict(head.named_parameters())
    names = list(params)

    def outputs(*flat):
        return torch.func.functional_call(head, dict(zip(names, flat)), (phi,)).flatten()

    blocks = torch.autograd.functional.jacobian(outputs, tuple(p.detach() for p in params.values()))
    return torch.cat([b.flatten(1) for b in blocks], dim=1)  # weight (row-major) then bias


def _statistics(head, data, **kwargs):
    spec = head_spec(head, head.out_channels if isinstance(head, torch.nn.Conv2d) else head.out_features)
    stats = HeadStatistics(spec, **kwargs)
    rss, elements = 0.0, 0
    for phi, target in data:
        with torch.no_grad():
            residual = head(phi) - target
        stats.update(phi, residual)
        rss += float(residual.square().sum())
        elements += residual.numel()
    return spec, stats, rss, elements


@pytest.fixture(params=list(HEADS))
def head(request):
    return HEADS[request.param]().double()


def test_exact_posterior_matches_dense_jacobian(head):
    data = _data(head)
    spec, stats, rss, elements = _statistics(head, data)
    jac = torch.cat([_jacobian(head, phi) for phi, _ in data])
    y = torch.cat([t.flatten() for _, t in data])
    precision = S * jac.T @ jac + DELTA * torch.eye(jac.shape[1], dtype=torch.float64)
    mean = torch.linalg.solve(precision, S * jac.T @ y)
    model = LinearGaussianHead(
        spec, stats.gram, stats.cross, head_rows(head, spec), s=S, delta=DELTA,
        residual_sum_squares=rss, residual_elements=elements,
    )
    torch.testing.assert_close(rows_to_vector(spec, model.posterior_mean()), mean, rtol=1e-9, atol=1e-11)
    dense = torch.linalg.inv(precision)
    index = vector_to_rows(spec, torch.arange(spec.num_params))  # (C, K): where row entries sit in θ
    for c in range(spec.eps_channels):
        torch.testing.assert_close(dense[index[c]][:, index[c]], model.covariance(), rtol=1e-9, atol=1e-12)
    assert dense[index[0]][:, index[1]].abs().max() < 1e-12  # the channels are independent


def test_log_density_and_gradient_match_brute_force(head):
    data = _data(head)
    spec, stats, rss, elements = _statistics(head, data)
    jac = torch.cat([_jacobian(head, phi) for phi, _ in data])
    y = torch.cat([t.flatten() for _, t in data])
    temperature = 1.5
    model = LinearGaussianHead(
        spec, stats.gram, stats.cross, head_rows(head, spec), s=S, delta=DELTA,
        residual_sum_squares=rss, residual_elements=elements, temperature=temperature,
    )
    theta = torch.randn(2, spec.num_params, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    sigma = 1 / math.sqrt(S * temperature)
    expected = (
        -0.5 * S * (y - theta @ jac.T).square().sum(1)
        - elements / temperature * math.log(sigma * math.sqrt(2 * math.pi))
        - 0.5 * DELTA * theta.square().sum(1)
        + 0.5 * spec.num_params * math.log(DELTA / (2 * math.pi))
    )
    rows = vector_to_rows(spec, theta)
    torch.testing.assert_close(model.log_density(rows), expected, rtol=1e-10, atol=1e-8)
    rows.requires_grad_(True)
    (autograd,) = torch.autograd.grad(model.log_density(rows).sum(), rows)
    torch.testing.assert_close(model.gradient(rows.detach()), autograd, rtol=1e-10, atol=1e-10)


def test_bootstrap_replicates_weight_every_data_point_by_its_poisson_count(head):
    data = _data(head, batches=2)
    spec, stats, _, _ = _statistics(head, data, bootstrap=3, generator=torch.Generator().manual_seed(5))
    replay = torch.Generator().manual_seed(5)
    expected_gram = torch.zeros_like(stats.boot_gram)
    expected_cross = torch.zeros_like(stats.boot_cross)
    for phi, target in data:
        counts = torch.poisson(torch.ones(3, len(phi), dtype=torch.float64), replay)
        for n in range(len(phi)):
            _, single, _, _ = _statistics(head, [(phi[n : n + 1], target[n : n + 1])])
            expected_gram += counts[:, n, None, None] * single.gram
            expected_cross += counts[:, n, None, None] * single.cross
    torch.testing.assert_close(stats.boot_gram, expected_gram, rtol=1e-12, atol=1e-10)
    torch.testing.assert_close(stats.boot_cross, expected_cross, rtol=1e-12, atol=1e-10)
    assert not torch.equal(stats.boot_gram[0], stats.boot_gram[1])


def test_grouped_head_is_refused():
    head = torch.nn.Conv2d(4, 4, 3, groups=2)
    with pytest.raises(ValueError, match="ungrouped"):
        HeadStatistics(head_spec(head, 4))
