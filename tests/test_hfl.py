"""Hessian-free Laplace (structure='hfl') against the exact full-GGN closed form (structure='full').

'basis' probes must reproduce the closed form to the CG tolerance; Rademacher probes are
unbiased with an error that shrinks like 1/√K (K probes).
"""

import pytest
import torch
from test_posterior_models import conv_head, random_features

from bayesdiff_ext import LastLayerLaplace
from bayesdiff_ext.posterior.hfl import HessianFreePosterior


def fitted_pair(head, **fit):
    # σ and δ chosen so that prior and data both shape Σ (neither dominates the variance).
    features = random_features(head, **fit)
    return [
        LastLayerLaplace(head, structure, sigma_noise=2.0, prior_precision=0.5).fit_features(features)
        for structure in ("full", "hfl")
    ]


def relative_error(estimate, exact):
    return float(((estimate.double() - exact.double()).abs() / exact.double()).mean())


HEADS = {
    "conv": (lambda: conv_head(c_in=4, c_out=2, kernel=3), (2, 4, 6, 5)),
    "strided-dilated-no-bias": (
        lambda: conv_head(c_in=3, c_out=2, kernel=3, stride=2, padding=2, dilation=2, bias=False),
        (1, 3, 7, 6),
    ),
    "linear-tokens": (lambda: torch.nn.Linear(6, 3).eval(), (2, 5, 6)),
}


@pytest.mark.parametrize("name", HEADS)
def test_basis_probes_reproduce_the_full_ggn_closed_form(name):
    make_head, phi_shape = HEADS[name]
    head = make_head()
    full, hfl = fitted_pair(head)
    hfl.posterior.probes = "basis"
    phi = torch.randn(*phi_shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    full_mean, full_var = full.predict(phi)
    hfl_mean, hfl_var = hfl.predict(phi)
    assert hfl_var.shape == full_var.shape and hfl_var.dtype == torch.float64
    torch.testing.assert_close(hfl_mean, full_mean)
    torch.testing.assert_close(hfl_var, full_var, rtol=1e-6, atol=0)
    assert 0 < hfl.posterior.last_iterations <= 2 * (full.spec.taps + int(full.spec.has_bias))


def test_random_probes_converge_to_the_closed_form():
    head = conv_head(c_in=4, c_out=2, kernel=3)
    full, hfl = fitted_pair(head)
    phi = torch.randn(1, 4, 5, 5, generator=torch.Generator().manual_seed(2))
    exact = full.predict(phi)[1]
    errors = {}
    for probes in (8, 2048):
        hfl.posterior.probes = probes
        errors[probes] = relative_error(hfl.predict(phi)[1], exact)
    # Standard error ∝ 1/√K: 16× smaller at 256× the probes; 4× leaves room for the seed.
    assert errors[2048] < errors[8] / 4
    assert errors[2048] < 0.1


def test_float32_phi_gives_float32_nonnegative_variance_and_probes_follow_the_seed():
    head = conv_head(c_in=4, c_out=2, kernel=3)
    phi = torch.randn(2, 4, 6, 5, generator=torch.Generator().manual_seed(3)).transpose(-1, -2)
    runs = []
    for _ in range(2):
        hfl = fitted_pair(head)[1]
        hfl.posterior.probes = 4
        mean, var = hfl.predict(phi)
        assert mean.dtype == var.dtype == torch.float32 and (var >= 0).all()
        runs.append(var)
    assert torch.equal(runs[0], runs[1])


def test_save_and_load_keep_the_hfl_structure(tmp_path):
    head = conv_head(c_in=4, c_out=2, kernel=3)
    hfl = fitted_pair(head)[1]
    hfl.save(tmp_path / "hfl.safetensors")
    loaded = LastLayerLaplace.load(tmp_path / "hfl.safetensors", head)
    assert loaded.structure == "hfl" and isinstance(loaded.posterior, HessianFreePosterior)
    torch.testing.assert_close(loaded.posterior.gram, hfl.posterior.gram, rtol=0, atol=0)
    assert loaded.prior_precision == hfl.prior_precision and loaded.sigma_noise == hfl.sigma_noise


def test_evidence_and_mackay_match_full():
    full, hfl = fitted_pair(conv_head(c_in=4, c_out=2, kernel=3))
    full.set_hyperparameters(prior_precision="mackay")
    hfl.set_hyperparameters(prior_precision="mackay")
    assert hfl.prior_precision == pytest.approx(full.prior_precision, rel=1e-10)


@pytest.mark.parametrize("probes", [0, -3, "all", 2.5])
def test_bad_probe_counts_are_refused(probes):
    hfl = fitted_pair(conv_head(c_in=4, c_out=2, kernel=3))[1]
    with pytest.raises(ValueError, match="probes must be an integer >= 1 or 'basis'"):
        HessianFreePosterior(hfl.spec, hfl.posterior.gram, probes=probes)


def test_images_solved_in_groups_get_the_same_variance_as_one_solve(monkeypatch):
    from bayesdiff_ext.posterior import hfl as hfl_module

    head = conv_head(c_in=4, c_out=2, kernel=3)
    _, hfl = fitted_pair(head)
    hfl.posterior.probes = 3
    phi = torch.randn(5, 4, 6, 5, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    hfl.posterior.generator.manual_seed(7)
    together = hfl.predict(phi)[1]
    # 3 probes × 2 channels = 6 rows per image: groups of 2 images, the last one alone.
    monkeypatch.setattr(hfl_module, "SOLVE_ROWS", 12)
    hfl.posterior.generator.manual_seed(7)
    grouped = hfl.predict(phi)[1]
    torch.testing.assert_close(grouped, together, rtol=1e-7, atol=0)


def test_per_image_probes_give_an_image_its_variance_in_any_batch():
    """Seeded per image, row r of a prediction (sample-major: r = s·B + b) draws from image b's stream."""
    hfl = fitted_pair(conv_head(c_in=4, c_out=2, kernel=3))[1]
    hfl.posterior.probes = 3
    phi = torch.randn(2, 2, 4, 6, 5, generator=torch.Generator().manual_seed(3), dtype=torch.float64)  # (S, B, ...)
    hfl.posterior.seed_probes([11, 12])
    both = hfl.predict(phi.flatten(0, 1))[1].unflatten(0, (2, 2))
    hfl.posterior.seed_probes([12])
    alone = hfl.predict(phi[:, 1])[1]
    torch.testing.assert_close(alone, both[:, 1], rtol=1e-10, atol=0)
    hfl.posterior.seed_probes([13])
    assert not torch.equal(hfl.predict(phi[:, 1])[1], alone)  # the probes are the seed's
    hfl.posterior.seed_probes([11, 12, 13])
    with pytest.raises(ValueError, match="rows must be a multiple of the images"):
        hfl.predict(phi.flatten(0, 1))
