"""VI, MCMC and head-ensemble posteriors on a tiny UNet: the shared data pass, save/load, one loader."""

import warnings

import pytest
import torch
from test_posterior_models import tiny_scheduler
from tiny_models import tiny_unet

from bayesdiff_ext.posterior import (
    LastLayerHeadEnsemble,
    LastLayerLaplace,
    LastLayerMCMC,
    LastLayerVI,
    load_posterior,
)

KINDS = {
    "vi-diag": lambda unet: LastLayerVI(unet, steps=40),
    "vi-full": lambda unet: LastLayerVI(unet, family="full", steps=40),
    "mcmc": lambda unet: LastLayerMCMC(unet, warmup=30, draws=8, chains=2),
    "head-ensemble": lambda unet: LastLayerHeadEnsemble(unet, members=3),
}


def _images():
    return torch.randn(5, 3, 8, 8, generator=torch.Generator().manual_seed(2))


def _fit(post):
    generator = torch.Generator().manual_seed(0)
    return post.fit(_images(), tiny_scheduler(), batch_size=2, generator=generator, progress=False)


def _phi(post):
    with post.capture() as cap:
        post.model(_images()[:2], torch.tensor([3, 60]))
    return cap.phi


@pytest.fixture(scope="module", params=list(KINDS))
def fitted(request):
    unet = tiny_unet()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="the HMC chains have not converged")  # 8 draws: on purpose
        return _fit(KINDS[request.param](unet))


def test_short_chains_warn():
    with pytest.warns(UserWarning, match="the HMC chains have not converged"):
        _fit(LastLayerMCMC(tiny_unet(), warmup=10, draws=4, chains=2))


def test_the_data_pass_and_hyperparameters_are_the_laplace_fits(fitted):
    laplace = _fit(LastLayerLaplace(fitted.model, "full"))
    assert fitted.sigma_noise == laplace.sigma_noise and fitted.prior_precision == laplace.prior_precision
    torch.testing.assert_close(fitted.laplace.posterior.gram, laplace.posterior.gram, rtol=0, atol=0)
    assert fitted.fit_stats == laplace.fit_stats


def test_save_and_load_restore_the_posterior(fitted, tmp_path):
    path = tmp_path / "posterior.safetensors"
    fitted.save(path)
    for loaded in (load_posterior(path, fitted.model), type(fitted).load(path, fitted.model)):
        assert type(loaded) is type(fitted) and loaded.settings() == fitted.settings()
        assert loaded.structure == fitted.structure and loaded.record == fitted.record
        assert (loaded.sigma_noise, loaded.prior_precision) == (fitted.sigma_noise, fitted.prior_precision)
        phi = _phi(fitted)
        for a, b in zip(loaded.predict(phi), fitted.predict(phi)):
            assert torch.equal(a, b)
        draws = [p.sample(3, torch.Generator().manual_seed(1)) for p in (loaded, fitted)]
        assert torch.equal(*draws) and draws[0].shape == (3, fitted.spec.num_params)
    assert repr(fitted).startswith(type(fitted).__name__)


def test_loaders_refuse_other_kinds_and_other_heads(fitted, tmp_path):
    path = tmp_path / "posterior.safetensors"
    fitted.save(path)
    with pytest.raises(ValueError, match="load_posterior"):
        LastLayerLaplace.load(path, fitted.model)
    other = LastLayerMCMC if not isinstance(fitted, LastLayerMCMC) else LastLayerVI
    with pytest.raises(ValueError, match="not a"):
        other.load(path, fitted.model)
    with pytest.raises(ValueError, match="fitted for the head"):
        load_posterior(path, tiny_unet(out_channels=6))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_posterior(path, tiny_unet(seed=1))
    assert any("head weights differ" in str(w.message) for w in caught)


def test_load_posterior_opens_laplace_files(tmp_path):
    unet = tiny_unet()
    path = tmp_path / "laplace.safetensors"
    _fit(LastLayerLaplace(unet, "diag")).save(path)
    assert isinstance(load_posterior(path, unet), LastLayerLaplace)


def test_unfitted_posterior_refuses_to_predict():
    post = LastLayerVI(tiny_unet())
    with pytest.raises(RuntimeError, match="not fitted"):
        post.sample(2)
    with pytest.raises(ValueError, match="sigma_noise"):
        LastLayerVI(tiny_unet(), sigma_noise="nope")
