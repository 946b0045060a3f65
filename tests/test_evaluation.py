"""The filtering evaluation (issue 7): its parts on known inputs, and the pipeline end to end."""

import json

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler
from scipy.stats import spearmanr
from tiny_models import tiny_unet

from bayesdiff_ext.evaluation import EvaluationConfig, run_evaluation
from bayesdiff_ext.evaluation.analysis import REFERENCE, analyse
from bayesdiff_ext.evaluation.ranking import advantage, detection, kept_by_score, kept_count, random_subsets
from bayesdiff_ext.evaluation.replay import RecordingUNet, ReplayUNet
from bayesdiff_ext.evaluation.scores import SCORES, forwards
from bayesdiff_ext.evaluation.sources import CLOSED_FORM, Batch, Context, WeightSamples, X0Drift
from bayesdiff_ext.methods import WeightSamplesSampler, X0DriftSampler
from bayesdiff_ext.posterior import LastLayerLaplace
from bayesdiff_ext.sampler import BayesDiffSampler


def _scheduler():
    return DDIMScheduler(num_train_timesteps=100, beta_schedule="squaredcos_cap_v2", clip_sample=False)


@pytest.fixture(scope="module")
def tiny():
    unet, scheduler = tiny_unet(channels=1, block_out_channels=(8, 8)), _scheduler()
    images = torch.rand(16, 1, 8, 8) * 2 - 1
    posterior = LastLayerLaplace(unet, "diag").fit(images, scheduler, batch_size=8, progress=False)
    return unet, scheduler, posterior


def test_replay_reproduces_the_recorded_images_and_variance_of_another_posterior(tiny):
    unet, scheduler, posterior = tiny
    noise = torch.randn(5, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    recorder = RecordingUNet(unet, posterior.head)
    recorded = BayesDiffSampler(recorder, scheduler, posterior).sample(
        noise=noise, num_inference_steps=4, progress=False, **CLOSED_FORM
    )
    other = LastLayerLaplace(unet, "diag").fit(torch.zeros(4, 1, 8, 8), scheduler, progress=False)
    rows = slice(0, 3)
    replay = ReplayUNet(unet, posterior.head, recorder.calls, rows)
    replayed = BayesDiffSampler(replay, scheduler, other).sample(
        noise=noise[rows], num_inference_steps=4, progress=False, **CLOSED_FORM
    )
    direct = BayesDiffSampler(unet, scheduler, other).sample(
        noise=noise[rows], num_inference_steps=4, progress=False, **CLOSED_FORM
    )
    assert (replay.replayed, replay.computed) == (4, 0)
    assert torch.equal(replayed.images, recorded.images[rows])
    torch.testing.assert_close(replayed.variance, direct.variance, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("steps, uq_every", [(7, 3), (6, 3), (5, 6), (5, 1)])
def test_the_reported_unet_forwards_are_the_samplers_own_calls(tiny, steps, uq_every):
    unet, scheduler, posterior = tiny
    config = EvaluationConfig(steps=steps, uq_every=uq_every, mc_samples=3, drift_last_steps=2, progress=False)
    by_name = {score.name: score for score in SCORES}
    for name in ("paper", "full_ggn"):
        out = BayesDiffSampler(unet, scheduler, posterior).sample(
            batch_size=2, num_inference_steps=steps, progress=False, **by_name[name].source.options(config)
        )
        calls = out.timings["image_unet_calls"] + out.timings["mc_unet_calls"] * config.mc_samples
        assert forwards(by_name[name], config) == calls, name
    assert forwards(by_name["x0_drift"], config) == steps
    # A rank mean of x0-drift (the image path) and weight samples pays for the image path once.
    assert forwards(by_name["drift_and_weights"], config) == forwards(by_name["weight_samples"], config)


def test_replay_runs_the_real_unet_for_inputs_off_the_recorded_path(tiny):
    unet, scheduler, posterior = tiny
    noise = torch.randn(2, 1, 8, 8)
    recorder = RecordingUNet(unet, posterior.head)
    BayesDiffSampler(recorder, scheduler, posterior).sample(
        noise=noise, num_inference_steps=3, progress=False, **CLOSED_FORM
    )
    replay = ReplayUNet(unet, posterior.head, recorder.calls)
    out = BayesDiffSampler(replay, scheduler, posterior).sample(
        noise=noise, num_inference_steps=3, mc_samples=2, uq_every=2, progress=False
    )
    assert replay.replayed == 3 and replay.computed == 1  # the Monte Carlo call of step 2 (none at x_T)
    assert out.variance.min() >= 0


def test_the_evaluations_weight_samples_are_the_methods_own_on_the_recorded_images(tiny):
    """The evaluation runs the weight-samples method (the same M draws for every image, from seed + 1),
    its stock image is the recorded one, and the model's head is left as it was."""
    unet, scheduler, posterior = tiny
    noise = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    recorded = BayesDiffSampler(unet, scheduler, posterior).sample(
        noise=noise, num_inference_steps=3, progress=False, **CLOSED_FORM
    )
    head_before = unet.conv_out.weight.clone()

    class Posteriors:
        def get(self, spec):
            return posterior

    class Subject:
        pass

    subject = Subject()
    subject.unet, subject.scheduler = unet, scheduler
    config = EvaluationConfig(steps=3, weight_samples=3, seed=4, drift_last_steps=2, progress=False)
    out = WeightSamples().run(Context(subject, config, Posteriors()), Batch(noise, [], reference=recorded.images))
    method = WeightSamplesSampler(unet, scheduler, posterior, samples=3).sample(
        noise=noise, num_inference_steps=3, progress=False, return_draws=True, weight_seed=5
    )
    assert out.samples.shape == (3, 3, 1, 8, 8) and bool((out.variance.flatten(1).sum(1) > 0).all())
    torch.testing.assert_close(out.variance, method.variance.to(torch.float64))
    torch.testing.assert_close(out.samples, method.draws.finals.flatten(0, 1).to(torch.float64))
    assert torch.equal(unet.conv_out.weight, head_before) and not unet.conv_out._forward_hooks
    with pytest.raises(RuntimeError, match="left the recorded image path"):
        WeightSamples().run(Context(subject, config, Posteriors()), Batch(noise, [], reference=recorded.images + 1))


def test_the_evaluations_x0_drift_is_the_methods_own_from_the_recorded_calls(tiny):
    unet, scheduler, posterior = tiny
    noise = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    recorder = RecordingUNet(unet, posterior.head)
    BayesDiffSampler(recorder, scheduler, posterior).sample(
        noise=noise, num_inference_steps=5, progress=False, **CLOSED_FORM
    )

    class Subject:
        pass

    subject = Subject()
    subject.scheduler = scheduler
    config = EvaluationConfig(steps=5, drift_last_steps=3, progress=False)
    rows = slice(1, 3)
    drift = X0Drift().run(Context(subject, config, None), Batch(noise[rows], recorder.calls, rows))
    method = X0DriftSampler(unet, scheduler, last_steps=3).sample(noise=noise[rows], num_inference_steps=5, progress=False)
    torch.testing.assert_close(drift.variance, method.variance)


def test_ranking_keeps_the_lowest_scores_and_random_subsets_have_the_kept_size():
    scores = np.array([5.0, 1.0, 3.0, 2.0, 4.0])
    assert kept_by_score(scores, 0.6).tolist() == [1, 2, 3]
    subsets = random_subsets(50, 0.84, seeds=6)
    assert {len(s) for s in subsets} == {kept_count(50, 0.84)} == {42}
    assert all(len(np.unique(s)) == 42 for s in subsets)
    assert len({tuple(s) for s in subsets}) == 6
    assert advantage("fid", 8.0, [10.0, 12.0]) == pytest.approx((11 - 8) / np.std([10, 12], ddof=1))
    assert advantage("precision", 0.5, [0.6, 0.7]) < 0


def test_detection_of_the_oracles_worst_images():
    quality = np.arange(100.0)
    exact = {"auroc_std": 0.0, "spearman_std": 0.0}
    assert detection(-quality, quality, 0.1) == pytest.approx({"auroc": 1.0, "spearman": 1.0, **exact})
    assert detection(quality, quality, 0.1) == pytest.approx({"auroc": 0.0, "spearman": -1.0, **exact})


def test_detection_std_matches_the_hanley_mcneil_standard_error():
    rng = np.random.default_rng(1)
    quality = rng.random(2000)
    scores = -quality + rng.normal(scale=0.6, size=2000)
    found = detection(scores, quality, 0.1)
    a, n_bad, n_good = found["auroc"], 200, 1800
    q1, q2 = a / (2 - a), 2 * a**2 / (1 + a)
    hanley_mcneil = np.sqrt((a * (1 - a) + (n_bad - 1) * (q1 - a**2) + (n_good - 1) * (q2 - a**2)) / (n_bad * n_good))
    assert 0.6 < a < 0.9
    assert found["auroc_std"] == pytest.approx(hanley_mcneil, rel=0.25)
    assert found["spearman_std"] == pytest.approx((1 - found["spearman"] ** 2) / np.sqrt(2000), rel=0.35)


def test_a_planted_score_that_ranks_known_bad_images_last_beats_random_removal():
    rng = np.random.default_rng(0)
    real = rng.normal(size=(300, 6))
    bad = np.zeros(200, bool)
    bad[rng.choice(200, 40, replace=False)] = True
    fake = rng.normal(size=(200, 6)) + 3.0 * bad[:, None]
    config = EvaluationConfig(num_images=200, random_seeds=5, progress=False)
    planted = bad + 0.01 * rng.random(200)
    results = analyse(
        config,
        {"planted": planted, "inverted": -planted},
        {"classifier": fake},
        {"classifier": real},
        {"confidence": -planted, "realism": -planted},
        "confidence",
    )
    random = results["random"]["200"]["classifier"]
    assert {f: len(v["fid"]) for f, v in random.items()} == {str(f): 5 for f in config.fractions}
    planted_fid = results["methods"]["planted"]["filtering"]["classifier"]["0.8"]["fid"]
    assert advantage("fid", planted_fid, random["0.8"]["fid"]) > 2
    inverted_fid = results["methods"]["inverted"]["filtering"]["classifier"]["0.8"]["fid"]
    assert advantage("fid", inverted_fid, random["0.8"]["fid"]) < -2
    assert results["methods"]["planted"]["detection"]["confidence"]["auroc"] == pytest.approx(1.0)


def test_config_rejects_settings_that_cannot_give_a_comparison():
    with pytest.raises(ValueError, match="random_seeds"):
        EvaluationConfig(random_seeds=1)
    with pytest.raises(ValueError, match="drift_last_steps"):
        EvaluationConfig(steps=3, drift_last_steps=5)
    with pytest.raises(ValueError, match="costly_images"):
        EvaluationConfig(num_images=100, costly_images=200)
    with pytest.raises(ValueError, match="pass data"):
        EvaluationConfig(model="some/folder")
    with pytest.raises(ValueError, match="builtin:digits, builtin:photos"):
        EvaluationConfig(model="builtin:cats")


def tiny_config(tmp_path, **changes) -> EvaluationConfig:
    """A run small enough for the fast tests (every score, every phase)."""
    settings = dict(
        out_dir=tmp_path / "run",
        docs_dir=tmp_path / "docs",
        num_images=24,
        steps=3,
        batch_size=12,
        costly_images=12,
        mc_samples=2,
        uq_every=2,
        weight_samples=2,
        drift_last_steps=3,
        hfl_probes=8,
        random_seeds=3,
        cost_images=2,
        cost_repeats=1,
        fit_images=32,
        sweep_images=3,
        sweep_sigmas=(0.1, 1.0),
        sweep_priors=(1.0, 100.0),
        progress=False,
    )
    return EvaluationConfig(**{**settings, **changes})


@pytest.mark.slow
def test_pipeline_end_to_end_on_the_bundled_digits(tmp_path):
    config = tiny_config(tmp_path)
    report = run_evaluation(config)
    assert report == tmp_path / "docs" / "EVALUATION.md"
    for name in (
        "filtering_curves_classifier",
        "filtering_curves_random_conv",
        "hyperparameter_sweep",
        "uncertainty_vs_timestep",
        "extremes",
    ):
        png = tmp_path / "docs" / "evaluation" / "digits" / f"{name}.png"
        assert png.stat().st_size > 1000
        assert f"(evaluation/digits/{name}.png)" in report.read_text()
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    methods = results["methods"]
    assert methods["paper"]["n"] == methods["covariance_none"]["n"] == methods["x0_drift"]["n"] == 24
    assert methods["default"]["n"] == methods["weight_samples"]["n"] == methods["mc_dropout"]["n"] == 12
    assert methods["hfl"]["n"] == 24
    # HFL estimates the full GGN's variance: summed over an image the probe noise averages out.
    with np.load(tmp_path / "run" / "filtering_run.npz", allow_pickle=False) as cached:
        hfl, full = cached["score__hfl"], cached["score__full_ggn"]
    assert spearmanr(hfl, full).statistic > 0.9
    assert np.allclose(hfl, full, rtol=0.25)
    assert set(results["random"]) == {"12", "24"}
    for name, entry in methods.items():
        all_images = entry["filtering"]["classifier"]["1.0"]
        reference = results["random"][str(entry["n"])]["classifier"]["1.0"]
        assert all(all_images[m] == v for m, vs in reference.items() for v in vs), name
    text = report.read_text()
    assert "N = 24" in text and "### Conclusion" in text and "## The goal" in text
    tables = text.split("### Filtering")[1].split("### Figures")[0]
    assert "score the first 12 of the 24 images" in text and "3 seeds" in text and "σ)" not in tables
    assert text.count("| random removal (mean ± std over seeds) | 12 |") == 7
    assert REFERENCE in methods

    # The cached run renders the same numbers again without sampling.
    again = run_evaluation(config, reuse=True)
    rerun = json.loads((tmp_path / "run" / "results.json").read_text())
    assert rerun["methods"] == methods and rerun["random"] == results["random"]
    assert again.read_text().split("### Methods")[1] == text.split("### Methods")[1]


def test_detection_statistics_are_sklearns_auroc_and_scipys_spearman():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(4)
    quality = rng.integers(0, 30, 300).astype(float)  # ties in both
    scores = np.round(-quality + rng.normal(scale=8, size=300))
    found = detection(scores, quality, 0.1)
    bad = np.zeros(300, bool)
    bad[np.argsort(quality, kind="stable")[:30]] = True
    assert found["auroc"] == pytest.approx(roc_auc_score(bad, scores), abs=1e-12)
    assert found["spearman"] == pytest.approx(spearmanr(scores, -quality).statistic, abs=1e-12)


def test_a_monte_carlo_run_repeats_exactly_and_depends_on_the_batchs_place(tiny):
    from types import SimpleNamespace

    from bayesdiff_ext.evaluation.posteriors import DEFAULT
    from bayesdiff_ext.evaluation.sources import SamplerRun

    unet, scheduler, posterior = tiny
    context = Context(
        SimpleNamespace(unet=unet, scheduler=scheduler),
        EvaluationConfig(steps=4, drift_last_steps=2, progress=False),
        SimpleNamespace(get=lambda spec: posterior),
    )
    run = SamplerRun("mc", DEFAULT, lambda c: dict(mc_samples=3, uq_every=2, covariance="mc"))
    noise = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(5))
    first, again = (run.run(context, Batch(noise, start=10)).variance for _ in range(2))
    assert torch.equal(first, again)
    assert not torch.equal(first, run.run(context, Batch(noise, start=12)).variance)
    # image 11's Monte Carlo draws are its own (seed, 11): alone it gets the same variance (up to the
    # float32 rounding of another batch size)
    alone = run.run(context, Batch(noise[1:], start=11)).variance
    torch.testing.assert_close(alone[0], first[1], rtol=1e-4, atol=1e-7)
