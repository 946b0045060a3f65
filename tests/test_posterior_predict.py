"""LastLayerLaplace.predict: the mean is the model's own ε, the variance the closed form of Σ.

The variance is checked against brute-force Monte Carlo over head weights θ ~ N(θ_MAP, Σ) with Σ
built densely from the fitted curvature: with S draws the sample variance has relative standard
error √(2/(S−1)) ≈ 0.7% at S = 40000, so a 5% tolerance is > 7 standard errors per element.
"""

import pytest
import torch
from test_posterior_models import conv_head, monte_carlo_variance, random_features, timesteps
from tiny_models import tiny_unet

from bayesdiff_ext import LastLayerLaplace

STRUCTURES = [("diag", "ggn"), ("diag", "ef"), ("full", "ggn"), ("kron", "ggn"), ("isotropic", "ggn")]
MC_RTOL = 0.05
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def fitted(head, structure, curvature, **kwargs):
    # σ and δ chosen so that prior and data both shape Σ (neither dominates the variance).
    post = LastLayerLaplace(head, structure, curvature, sigma_noise=2.0, prior_precision=0.5, **kwargs)
    return post.fit_features(random_features(head))


@pytest.mark.parametrize("structure,curvature", STRUCTURES)
def test_conv_variance_matches_monte_carlo(structure, curvature):
    head = conv_head(c_in=5, c_out=3, kernel=3)
    post = fitted(head, structure, curvature)
    phi = torch.randn(2, 5, 6, 5)
    mean, var = post.predict(phi)
    with torch.no_grad():
        torch.testing.assert_close(mean, head(phi), rtol=1e-5, atol=1e-5)
    assert var.shape == (2, 3, 6, 5) and var.dtype == torch.float32 and (var >= 0).all()
    torch.testing.assert_close(var.double(), monte_carlo_variance(post, phi), rtol=MC_RTOL, atol=0)


@pytest.mark.parametrize("structure,curvature", STRUCTURES)
def test_strided_dilated_head_without_bias(structure, curvature):
    head = conv_head(c_in=4, c_out=2, kernel=3, stride=2, padding=2, dilation=2, bias=False)
    post = fitted(head, structure, curvature)
    phi = torch.randn(1, 4, 7, 6)
    mean, var = post.predict(phi)
    with torch.no_grad():
        torch.testing.assert_close(mean, head(phi), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(var.double(), monte_carlo_variance(post, phi), rtol=MC_RTOL, atol=0)


@pytest.mark.parametrize("structure,curvature", STRUCTURES)
def test_linear_head_on_tokens(structure, curvature):
    torch.manual_seed(0)
    head = torch.nn.Linear(6, 4).eval()
    post = fitted(head, structure, curvature)
    phi = torch.randn(2, 5, 6)  # (batch, tokens, D)
    mean, var = post.predict(phi)
    with torch.no_grad():
        torch.testing.assert_close(mean, head(phi), rtol=1e-5, atol=1e-5)
    assert var.shape == (2, 5, 4) and (var >= 0).all()
    torch.testing.assert_close(var.double(), monte_carlo_variance(post, phi), rtol=MC_RTOL, atol=0)


def test_grouped_head_diag():
    head = conv_head(c_in=4, c_out=6, kernel=3, groups=2)
    post = fitted(head, "diag", "ef")
    phi = torch.randn(2, 4, 5, 5)
    mean, var = post.predict(phi)
    with torch.no_grad():
        torch.testing.assert_close(mean, head(phi), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(var.double(), monte_carlo_variance(post, phi), rtol=MC_RTOL, atol=0)
    with pytest.raises(ValueError, match="groups=1"):
        LastLayerLaplace(head, "full").fit_features(random_features(head))


@pytest.mark.parametrize("structure", ["diag", "full", "kron", "isotropic"])
@pytest.mark.parametrize("device", DEVICES)
@torch.no_grad()
def test_predict_mean_is_the_unets_own_output(structure, device):
    unet = tiny_unet().to(device)
    post = LastLayerLaplace(unet, structure, sigma_noise=1.0, prior_precision=1.0)
    post.fit_features([(torch.randn(2, 8, 8, 8, device=device), torch.randn(2, 3, 8, 8, device=device))])
    x = torch.randn(3, 3, 8, 8, device=device)
    with post.capture() as cap:
        out = unet(x, timesteps(3).to(device)).sample
    mean, var = post.predict(cap.phi)
    assert mean.shape == var.shape == (3, post.eps_channels, 8, 8)
    torch.testing.assert_close(mean, out, rtol=1e-5, atol=1e-5)
    assert (var > 0).all()


@pytest.mark.parametrize("structure", ["diag", "full", "kron"])
def test_learned_variance_head_uses_first_channels(structure):
    unet = tiny_unet(out_channels=6)
    post = LastLayerLaplace(unet, structure, sigma_noise=2.0, prior_precision=0.5)
    assert post.eps_channels == 3 and post.spec.out_channels == 6
    post.fit_features(random_features(unet.conv_out, size=(8, 8), eps_channels=3))
    with torch.no_grad(), post.capture() as cap:
        out = unet(torch.randn(2, 3, 8, 8), timesteps(2)).sample
    mean, var = post.predict(cap.phi)
    assert mean.shape == var.shape == (2, 3, 8, 8)
    torch.testing.assert_close(mean, out[:, :3], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(var.double(), monte_carlo_variance(post, cap.phi), rtol=MC_RTOL, atol=0)


@pytest.mark.parametrize("structure", ["diag", "full", "kron"])
def test_bfloat16_head_and_phi_return_float32(structure):
    head16 = conv_head().to(torch.bfloat16)
    head32 = conv_head()
    with torch.no_grad():  # the same (bf16-representable) weights in both heads
        head32.weight.copy_(head16.weight.float())
        head32.bias.copy_(head16.bias.float())
    features16 = random_features(head16, dtype=torch.bfloat16)
    features32 = [(phi.float(), target.float()) for phi, target in features16]
    post16 = LastLayerLaplace(head16, structure, sigma_noise=2.0, prior_precision=0.5).fit_features(features16)
    post32 = LastLayerLaplace(head32, structure, sigma_noise=2.0, prior_precision=0.5).fit_features(features32)
    phi = torch.randn(2, 5, 6, 5).to(torch.bfloat16)
    mean16, var16 = post16.predict(phi)
    mean32, var32 = post32.predict(phi.float())
    assert mean16.dtype == var16.dtype == torch.float32
    torch.testing.assert_close(var16, var32, rtol=1e-3, atol=1e-5)
    torch.testing.assert_close(mean16, mean32, rtol=1e-2, atol=1e-2)


def test_non_contiguous_phi():
    head = conv_head()
    post = fitted(head, "full", "ggn")
    phi = torch.randn(2, 6, 5, 5).transpose(2, 3)[:, :5]
    assert not phi.is_contiguous()
    mean, var = post.predict(phi)
    mean_c, var_c = post.predict(phi.contiguous())
    torch.testing.assert_close(mean, mean_c)
    torch.testing.assert_close(var, var_c)


def test_predict_checks_phi_and_fit():
    head = conv_head()
    post = LastLayerLaplace(head, "diag")
    with pytest.raises(RuntimeError, match="not fitted"):
        post.predict(torch.randn(1, 5, 4, 4))
    post.fit_features(random_features(head))
    with pytest.raises(ValueError, match=r"\(B, 5, H, W\)"):
        post.predict(torch.randn(1, 4, 4, 4))
