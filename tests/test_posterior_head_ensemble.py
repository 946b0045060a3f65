"""Head ensembles: plain members collapse to the one optimum, bootstrap and early stopping give spread."""

import pytest
import torch
from test_posterior_models import conv_head, random_features

from bayesdiff_ext.posterior import LastLayerHeadEnsemble, LastLayerLaplace
from bayesdiff_ext.posterior.head_ensemble import gradient_descent, initial_heads
from bayesdiff_ext.posterior.linear_gaussian import vector_to_rows

OPTIONS = dict(sigma_noise=0.5, prior_precision=2.0)


def _data():
    # 24 images of 6×5 outputs per channel for 28 parameters per channel: the data dominate the prior
    return random_features(conv_head(c_in=3, c_out=2, kernel=3, seed=1), batches=4, batch=6)


def _ensemble(**kwargs):
    return LastLayerHeadEnsemble(conv_head(c_in=3, c_out=2, kernel=3), **OPTIONS, **kwargs).fit_features(_data())


def _members(post):
    return vector_to_rows(post.spec, post.distribution.samples)


def test_gradient_descent_closed_form_is_the_loop():
    post = _ensemble(members=2, bootstrap=False)
    exact = post.exact
    start = initial_heads(3, *exact.theta_hat.shape, fan_in=27, generator=torch.Generator().manual_seed(0))
    step = 1 / float(torch.linalg.eigvalsh(exact.precision).max())
    rows = start.clone()
    for _ in range(25):
        rows = rows + step * exact.gradient(rows)
    torch.testing.assert_close(gradient_descent(exact, start, 25), rows, rtol=1e-10, atol=1e-12)
    # and the loop, run long, reaches the optimum from every start: the members collapse
    for _ in range(3000):
        rows = rows + step * exact.gradient(rows)
    torch.testing.assert_close(rows, exact.posterior_mean().expand_as(rows), rtol=0, atol=1e-9)


def test_plain_members_collapse():
    post = _ensemble(members=4, bootstrap=False)
    members = _members(post)
    optimum = post.exact.posterior_mean()
    assert float((members - optimum).abs().max()) < 1e-12
    _, var = post.predict(torch.randn(1, 3, 6, 5, dtype=torch.float64))
    assert float(var.max()) < 1e-20


def test_bootstrap_members_spread_like_the_posterior():
    post = _ensemble(members=8)
    phi = torch.randn(2, 3, 6, 5, generator=torch.Generator().manual_seed(4))
    _, var = post.predict(phi)
    assert bool((var > 0).all())
    # With σ the data's own noise (0.3), homoscedastic residuals and a weak prior, the bootstrap's
    # sandwich covariance ≈ Λ⁻¹. With 8 members a variance has a relative standard error of
    # √(2/7) ≈ 53%; the mean over 60 outputs (correlated) is checked within a factor 2.
    post = LastLayerHeadEnsemble(post.head, members=8, sigma_noise=0.3, prior_precision=2.0).fit_features(_data())
    _, var = post.predict(phi)
    laplace = LastLayerLaplace(post.head, "full", sigma_noise=0.3, prior_precision=2.0).fit_features(_data())
    _, exact_var = laplace.predict(phi)
    ratio = float(var.mean() / exact_var.mean())
    assert 0.5 < ratio < 2, ratio
    assert post.options.bootstrap and post.laplace.statistics.boot_gram.shape[0] == 8


def test_early_stopping_spread_shrinks_with_the_steps():
    phi = torch.randn(2, 3, 6, 5, generator=torch.Generator().manual_seed(4))
    spreads = [float(_ensemble(members=4, bootstrap=False, steps=k).predict(phi)[1].mean()) for k in (0, 5, 50)]
    assert spreads[0] > spreads[1] > spreads[2] > 0


def test_initialisation_is_pytorchs():
    start = initial_heads(2000, 1, 10, fan_in=25, generator=torch.Generator().manual_seed(0))
    assert float(start.abs().max()) <= 0.2
    layer = torch.nn.Conv2d(1, 2000, 5)  # fan_in 25: weights and biases U(±1/5)
    assert float(start.std()) == pytest.approx(float(layer.weight.detach().std()), rel=0.05)


def test_refusals():
    head = conv_head(c_in=3, c_out=2, kernel=3)
    with pytest.raises(ValueError, match="members"):
        LastLayerHeadEnsemble(head, members=1)
    with pytest.raises(ValueError, match="steps"):
        LastLayerHeadEnsemble(head, steps=-1)
