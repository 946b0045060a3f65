"""LastLayerLaplace.sample: draws of the ε head's parameters against the dense covariance and laplace-torch."""

import warnings

import pytest
import torch
from laplace import DiagLaplace, FullLaplace, KronLaplace
from laplace.curvature import CurvlinopsGGN
from test_posterior_laplace_parity import _oracle_on_head
from test_posterior_models import conv_head, dense_covariance, random_features
from torch import nn

from bayesdiff_ext import LastLayerLaplace

warnings.filterwarnings("ignore", category=FutureWarning, module="torch.jit")
STRUCTURES = ("diag", "full", "kron", "isotropic", "hfl")


def _fitted(structure, bias=True, linear=False):
    head = nn.Linear(4, 3, bias=bias) if linear else conv_head(c_in=3, c_out=2, kernel=3, bias=bias)
    return LastLayerLaplace(head, structure, sigma_noise=0.5, prior_precision=2.0).fit_features(
        random_features(head, size=(5, 4))
    )


@pytest.mark.parametrize("linear", [False, True])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("structure", STRUCTURES)
def test_square_root_reproduces_the_dense_covariance(structure, bias, linear):
    """Σ^{1/2} applied to the identity: its rows' Gram matrix is Σ, to float64 round-off."""
    post = _fitted(structure, bias, linear)
    num = post.spec.num_params
    roots = post.posterior.scale_normal(torch.eye(num, dtype=torch.float64), post.precision_scale, post.prior_precision)
    torch.testing.assert_close(roots.T @ roots, dense_covariance(post), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("structure", STRUCTURES)
def test_draws_have_the_posterior_mean_and_covariance(structure):
    post = _fitted(structure)
    draws = post.sample(40000, generator=torch.Generator().manual_seed(0)).double()
    dense = dense_covariance(post)
    assert draws.shape == (40000, post.spec.num_params)
    scale = float(dense.diagonal().max())
    # Monte Carlo error of a covariance entry with 40000 draws: ≈ √(2/40000)·scale = 0.007·scale
    assert float((torch.cov(draws.T) - dense).abs().max()) < 0.04 * scale
    assert float((draws.mean(0) - post.map_vector()).abs().max()) < 0.04 * scale**0.5


def test_map_vector_is_parameters_to_vector_order():
    post = _fitted("diag")
    torch.testing.assert_close(post.map_vector(), nn.utils.parameters_to_vector(post.head.parameters()).double())


def test_diag_draws_equal_laplace_torch_with_the_same_generator():
    head = conv_head(c_in=3, c_out=2, kernel=3).double()
    la = _oracle_on_head(DiagLaplace, CurvlinopsGGN, head, random_features(head, batch=3, size=(5, 4), dtype=torch.float64))
    ours = LastLayerLaplace.from_laplace_torch(la, head).sample(5, generator=torch.Generator().manual_seed(3))
    theirs = la.sample(5, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("la_class", [FullLaplace, KronLaplace])
def test_full_and_kron_draws_match_laplace_torchs_in_distribution(la_class):
    """laplace-torch takes another square root of Σ (Cholesky, or its Kron eigenbasis), so the draws
    differ one by one; their covariances agree with each other and with laplace-torch's Σ."""
    head = conv_head(c_in=3, c_out=2, kernel=3).double()
    la = _oracle_on_head(la_class, CurvlinopsGGN, head, random_features(head, batch=3, size=(5, 4), dtype=torch.float64))
    post = LastLayerLaplace.from_laplace_torch(la, head)
    ours = post.sample(40000, generator=torch.Generator().manual_seed(1))
    theirs = la.sample(40000, generator=torch.Generator().manual_seed(2))
    if la_class is FullLaplace:
        covariance = la.posterior_covariance
    else:
        covariance = la.posterior_precision.to_matrix(exponent=-1)
    scale = float(covariance.diagonal().max())
    for draws in (ours, theirs):
        assert float((torch.cov(draws.T) - covariance).abs().max()) < 0.04 * scale
    roots = post.posterior.scale_normal(torch.eye(post.spec.num_params, dtype=torch.float64), post.precision_scale,
                                        post.prior_precision)
    torch.testing.assert_close(roots.T @ roots, covariance, rtol=1e-8, atol=1e-12)


def test_bad_arguments_are_named():
    post = _fitted("diag")
    with pytest.raises(ValueError, match="n_samples"):
        post.sample(0)
    with pytest.raises(ValueError, match="z must have shape"):
        post.sample_from_normal(torch.zeros(2, 3))
    with pytest.raises(RuntimeError, match="not fitted"):
        LastLayerLaplace(conv_head(), "diag").sample(2)
