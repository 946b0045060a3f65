"""The fitted posteriors against laplace-torch 0.3 fitted on the same (φ, ε) data (docs/MATH.md §1.1–1.3).

laplace-torch is the oracle: DiagLaplace/FullLaplace/KronLaplace on Sequential(head, Flatten) fed
the captured features, its predictive variance the diagonal of its GLM covariance (tiny shapes).
"""

import warnings

import pytest
import torch
from laplace import DiagLaplace, FullLaplace, KronLaplace
from laplace.curvature import CurvlinopsEF, CurvlinopsGGN
from test_posterior_models import conv_head, random_features, tiny_scheduler
from tiny_models import tiny_unet
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from bayesdiff_ext import LastLayerLaplace

warnings.filterwarnings("ignore", category=FutureWarning, module="torch.jit")


def la_variance(la, phi):
    """Per-output predictive variance of laplace-torch's GLM predictive, in the head's NCHW shape."""
    _, f_var = la(phi, pred_type="glm")
    return torch.diagonal(f_var, dim1=1, dim2=2)


def fitting_features(unet, images, scheduler, batch_size, seed):
    """The (φ, ε) pairs LastLayerLaplace.fit draws with a generator seeded `seed`: per batch, t then ε."""
    g = torch.Generator().manual_seed(seed)
    phis, targets = [], []
    handle = unet.conv_out.register_forward_pre_hook(lambda m, args: phis.append(args[0]))
    with torch.no_grad():
        for x0 in images.split(batch_size):
            t = torch.randint(0, scheduler.config.num_train_timesteps, (len(x0),), generator=g)
            noise = torch.randn(x0.shape, generator=g)
            unet(scheduler.add_noise(x0, noise, t), t)
            targets.append(noise.flatten(1))
    handle.remove()
    return torch.cat(phis), torch.cat(targets)


def fit_unet_and_oracle(structure, curvature, la_class, backend):
    unet, scheduler = tiny_unet(), tiny_scheduler()
    images = torch.randn(6, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    post = LastLayerLaplace(unet, structure, curvature).fit(
        images, scheduler, batch_size=3, generator=torch.Generator().manual_seed(11), progress=False
    )
    phi, target = fitting_features(unet, images, scheduler, 3, seed=11)
    la = la_class(nn.Sequential(unet.conv_out, nn.Flatten()), "regression", backend=backend)
    la.fit(DataLoader(TensorDataset(phi, target), batch_size=3))
    la.sigma_noise, la.prior_precision = post.sigma_noise, post.prior_precision
    return post, la, phi


@pytest.mark.parametrize(
    "curvature,backend,la_scale",
    [("ggn", CurvlinopsGGN, 1.0), ("ef", CurvlinopsEF, 2.0), ("ef_bayesdiff", CurvlinopsEF, 1.0)],
)
def test_fitted_diag_curvature_and_variance_match_diag_laplace(curvature, backend, la_scale):
    post, la, phi = fit_unet_and_oracle("diag", curvature, DiagLaplace, backend)
    tensors = post.posterior.tensors()
    ours = torch.cat([tensors["h_weight"].flatten(), tensors["h_bias"]])
    torch.testing.assert_close(la_scale * ours, la.H.double(), rtol=2e-5, atol=1e-4)
    if curvature == "ef_bayesdiff":
        assert post.sigma_noise == 1.0 and post.prior_precision == 1.0
    else:  # σ by maximum likelihood: laplace-torch's loss is ½·RSS over n_data·n_outputs residuals
        torch.testing.assert_close(
            post.sigma_noise**2, 2 * float(la.loss) / (la.n_data * la.n_outputs), rtol=1e-5, atol=0
        )
    la.H = la.H / la_scale  # the same posterior as ours, to compare the predictive
    _, var = post.predict(phi[:2])
    torch.testing.assert_close(var.flatten(1).double(), la_variance(la, phi[:2]).double(), rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("structure,la_class", [("full", FullLaplace), ("kron", KronLaplace)])
def test_fitted_full_and_kron_variance_match_laplace(structure, la_class):
    post, la, phi = fit_unet_and_oracle(structure, "ggn", la_class, CurvlinopsGGN)
    _, var = post.predict(phi[:1])
    torch.testing.assert_close(var.flatten(1).double(), la_variance(la, phi[:1]).double(), rtol=1e-4, atol=1e-7)
    if structure == "kron":
        for ours, theirs in zip(post.posterior.tensors().values(), [f for F in la.H_facs.kfacs for f in F]):
            torch.testing.assert_close(ours, theirs.double(), rtol=1e-5, atol=1e-6)


def _oracle_on_head(la_class, backend, head, features):
    phi = torch.cat([p for p, _ in features])
    target = torch.cat([t.flatten(1) for _, t in features])
    la = la_class(
        nn.Sequential(head, nn.Flatten()),
        "regression",
        sigma_noise=0.8,
        prior_precision=0.3,
        temperature=1.5,
        backend=backend,
    )
    la.fit(DataLoader(TensorDataset(phi, target), batch_size=len(features[0][0])))
    return la


@pytest.mark.parametrize("la_class", [DiagLaplace, FullLaplace, KronLaplace])
@pytest.mark.parametrize("bias", [True, False])
def test_from_laplace_torch_equals_functional_variance(la_class, bias):
    head = conv_head(c_in=3, c_out=2, kernel=3, bias=bias).double()
    features = random_features(head, batch=3, size=(5, 4), dtype=torch.float64)
    la = _oracle_on_head(la_class, CurvlinopsGGN, head, features)
    post = LastLayerLaplace.from_laplace_torch(la, head)
    assert post.structure == {DiagLaplace: "diag", FullLaplace: "full", KronLaplace: "kron"}[la_class]
    assert (post.sigma_noise, post.prior_precision, post.temperature) == (0.8, 0.3, 1.5)
    phi = torch.randn(2, 3, 5, 4, dtype=torch.float64)
    mean, var = post.predict(phi)
    assert var.dtype == torch.float64
    torch.testing.assert_close(var.flatten(1), la_variance(la, phi), rtol=1e-9, atol=1e-12)
    with torch.no_grad():
        torch.testing.assert_close(mean, head(phi))


@pytest.mark.parametrize("structure,la_class", [("diag", DiagLaplace), ("full", FullLaplace), ("kron", KronLaplace)])
def test_evidence_equals_laplace_torch_and_marglik_maximises_it(structure, la_class):
    head = conv_head(c_in=3, c_out=2, kernel=3).double()
    features = random_features(head, batch=3, size=(5, 4), dtype=torch.float64)
    la = _oracle_on_head(la_class, CurvlinopsGGN, head, features)
    post = LastLayerLaplace(head, structure, prior_precision="marglik", sigma_noise=0.8, temperature=1.5)
    post.fit_features(features)
    for delta in (0.05, 1.0, 20.0):
        expected = la.log_marginal_likelihood(prior_precision=torch.tensor(delta, dtype=torch.float64))
        assert post.log_marginal_likelihood(prior_precision=delta) == pytest.approx(float(expected), rel=1e-9)
    best = post.prior_precision
    at_best = float(la.log_marginal_likelihood(prior_precision=torch.tensor(best, dtype=torch.float64)))
    for factor in (0.9, 1.1):
        nearby = la.log_marginal_likelihood(prior_precision=torch.tensor(best * factor, dtype=torch.float64))
        assert float(nearby) < at_best


def test_from_laplace_torch_refuses_non_ggn_full_and_wrong_head():
    head = conv_head(c_in=3, c_out=2, kernel=3).double()
    features = random_features(head, batch=3, size=(5, 4), dtype=torch.float64)
    la = _oracle_on_head(FullLaplace, CurvlinopsEF, head, features)
    with pytest.raises(ValueError, match="not I_C ⊗ A_aug"):
        LastLayerLaplace.from_laplace_torch(la, head)
    other = conv_head(c_in=4, c_out=2, kernel=3).double()
    la_diag = _oracle_on_head(DiagLaplace, CurvlinopsGGN, head, features)
    with pytest.raises(ValueError, match="parameters"):
        LastLayerLaplace.from_laplace_torch(la_diag, other)
    with pytest.raises(ValueError, match="not fitted"):
        LastLayerLaplace.from_laplace_torch(DiagLaplace(nn.Sequential(head, nn.Flatten()), "regression"), head)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("curvature,backend", [("ggn", CurvlinopsGGN), ("ef", CurvlinopsEF)])
@pytest.mark.parametrize("make_head", ["conv", "linear"])
def test_fitted_kron_factors_equal_kron_laplace(bias, curvature, backend, make_head):
    if make_head == "conv":
        head = conv_head(c_in=3, c_out=2, kernel=3, stride=2, bias=bias).double()
    else:
        torch.manual_seed(0)
        head = nn.Linear(4, 3, bias=bias).double()
    features = random_features(head, batch=3, size=(5, 4), dtype=torch.float64)
    post = LastLayerLaplace(head, "kron", curvature, sigma_noise=0.8, prior_precision=0.3, temperature=1.5)
    post.fit_features(features)
    la = _oracle_on_head(KronLaplace, backend, head, features)
    theirs = [f for block in la.H_facs.kfacs for f in block]
    ours = list(post.posterior.tensors().values())
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    phi = features[0][0][:2]
    torch.testing.assert_close(post.predict(phi)[1].flatten(1), la_variance(la, phi), rtol=1e-9, atol=1e-12)
