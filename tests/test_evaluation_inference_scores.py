"""VI, HMC and head ensembles as methods of the evaluation (bayesdiff_ext.evaluation.inference_scores)."""

from types import SimpleNamespace

import pytest
import torch
from diffusers import DDIMScheduler
from tiny_models import tiny_unet

from bayesdiff_ext.evaluation import EvaluationConfig
from bayesdiff_ext.evaluation.inference_scores import HEAD_ENSEMBLE, MCMC, VI
from bayesdiff_ext.evaluation.posteriors import FULL, Posteriors
from bayesdiff_ext.evaluation.scores import SCORES, forwards
from bayesdiff_ext.evaluation.sources import Batch, Context
from bayesdiff_ext.posterior import LastLayerHeadEnsemble, LastLayerMCMC, LastLayerVI

NAMES = {"vi": (VI, LastLayerVI), "mcmc": (MCMC, LastLayerMCMC), "head_ensemble": (HEAD_ENSEMBLE, LastLayerHeadEnsemble)}
LABELS = {"vi": "VI, mean-field", "mcmc": "HMC (", "head_ensemble": "head ensemble ("}


@pytest.fixture(scope="module")
def context():
    unet = tiny_unet(channels=1, block_out_channels=(8, 8))
    scheduler = DDIMScheduler(num_train_timesteps=100, beta_schedule="squaredcos_cap_v2", clip_sample=False)
    real = torch.rand(32, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    subject = SimpleNamespace(unet=unet, scheduler=scheduler, real=real)
    config = EvaluationConfig(steps=3, drift_last_steps=2, progress=False, fit_batch_size=16)
    return Context(subject, config, Posteriors(subject, config))


def test_each_inference_is_one_registered_closed_form_score():
    by_name = {score.name: score for score in SCORES}
    config = EvaluationConfig(steps=5, progress=False)
    for name, (spec, _) in NAMES.items():
        score = by_name[name]
        assert score.source.posterior is spec
        assert forwards(score, config) == config.steps  # closed form: the image path's calls only
        assert score.verdict and LABELS[name] in score.label(config)


def test_the_posteriors_are_fitted_on_the_shared_features_with_their_fit_time(context):
    posteriors = context.posteriors
    full = posteriors.get(FULL)
    for name, (spec, cls) in NAMES.items():
        posterior = posteriors.get(spec)
        assert isinstance(posterior, cls)
        # σ and δ as the full-GGN Laplace chooses them on the same features
        assert posterior.sigma_noise == pytest.approx(full.sigma_noise, rel=1e-9)
        assert posterior.prior_precision == pytest.approx(full.prior_precision, rel=1e-9)
        assert posteriors.fit_seconds[name] > 0
        assert f"/{posterior.inference}, " in posteriors.descriptions()[name]
        assert "built in" in posteriors.descriptions()[name]
    # the shared data pass ran once, and is not in any posterior's own time
    assert posteriors.features_seconds > 0


def test_the_scores_run_on_the_recorded_path_and_give_positive_variance(context):
    noise = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    by_name = {score.name: score for score in SCORES}
    variances = {}
    for name in NAMES:
        source = by_name[name].source
        variances[name] = source.run(context, Batch(noise)).variance
        assert variances[name].shape == noise.shape and (variances[name] >= 0).all()
    # HMC samples the exact posterior: its output variance is the full GGN's within its Monte Carlo error
    full = by_name["full_ggn"].source.run(context, Batch(noise)).variance
    ratio = variances["mcmc"].sum() / full.sum()
    assert 0.8 < ratio < 1.2, ratio
