"""`bayesdiff sample/fit --method ...`: every uncertainty method from the command line, offline."""

import csv
import json

import pytest
from test_cli import (
    FAST_SAMPLING,
    assert_one_line_error,
    check_run_folder,
    run,
    save_pipeline,
    tiny,
)
from tiny_models import tiny_unet

from bayesdiff_ext import cli

__all__ = ["tiny"]  # the fixture, imported for these tests


def _sample(tiny, out, *options):
    sizes = ["--num-images", "3", "--batch-size", "2"]
    return ["sample", "--model", tiny / "model", *sizes, "--out", out, *FAST_SAMPLING, *options]


def _fit(tiny, structure, out):
    data = ["--data", tiny / "data.pt"]
    return ["fit", "--model", tiny / "model", *data, "--structure", structure, "--out", out, "--no-progress"]


def _split_sums(out):
    rows = list(csv.DictReader((out / "scores.csv").open()))
    return [float(r["aleatoric_sum"]) for r in rows], [float(r["epistemic_sum"]) for r in rows]


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_laplace_run_writes_the_variance_split(tiny, tmp_path, capsys, sampler):
    out = tmp_path / "run"
    posterior = tiny / "posterior.safetensors"
    code, _, err = run(_sample(tiny, out, "--posterior", posterior, "--sampler", sampler), capsys)
    assert code == 0, err
    summary = check_run_folder(out, 3)
    aleatoric, epistemic = _split_sums(out)
    assert summary["settings"]["method"] == "laplace"
    assert summary["variance_split"]["aleatoric_sum"] == pytest.approx(aleatoric)
    for a, e, total in zip(aleatoric, epistemic, summary["scores"]["sum"]):
        assert a + e == pytest.approx(total, rel=1e-5)
    assert all(a == 0 for a in aleatoric) if sampler == "ddim" else all(a > 0 for a in aleatoric)


def test_isotropic_and_hfl_methods(tiny, tmp_path, capsys):
    full = tmp_path / "full.safetensors"
    code, _, err = run(_fit(tiny, "full", full), capsys)
    assert code == 0, err
    for method, posterior in (("isotropic", tiny / "posterior.safetensors"), ("hfl", full)):
        out = tmp_path / method
        options = ["--posterior", posterior, "--method", method, "--probes", "3"]
        code, _, err = run(_sample(tiny, out, *options), capsys)
        assert code == 0, err
        summary = check_run_folder(out, 3)
        assert summary["settings"].get("probes") == (3 if method == "hfl" else None)
        assert summary["settings"]["posterior_structure"] == method
        assert summary["settings"]["sampler_settings"]["posterior_structure"] == method
    diag = tiny / "posterior.safetensors"
    code, _, err = run(_sample(tiny, tmp_path / "bad", "--posterior", diag, "--method", "hfl"), capsys)
    assert_one_line_error(code, err, "needs a posterior of structure hfl or full", "--structure hfl")


def test_fit_hfl_posterior_then_sample_it(tiny, tmp_path, capsys):
    path = tmp_path / "hfl.safetensors"
    code, _, err = run(_fit(tiny, "hfl", path), capsys)
    assert code == 0, err
    code, _, err = run(_sample(tiny, tmp_path / "run", "--posterior", path), capsys)
    assert code == 0, err
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["settings"]["posterior_structure"] == "hfl"


def test_mc_dropout(tmp_path, capsys):
    model = save_pipeline(tmp_path / "dropout-model", tiny_unet(0, channels=1, dropout=0.3))
    out = tmp_path / "run"
    method = ["--method", "mc-dropout", "--passes", "3", "--sampler", "ddpm"]
    argv = ["sample", "--model", model, *method, "--num-images", "2", "--out", out, *FAST_SAMPLING]
    code, _, err = run(argv, capsys)
    assert code == 0, err
    summary = check_run_folder(out, 2)
    assert summary["settings"]["method"] == "mc-dropout" and summary["settings"]["passes"] == 3
    assert summary["settings"]["sampler_settings"]["passes"] == 3
    aleatoric, epistemic = _split_sums(out)
    assert min(aleatoric) > 0 and min(epistemic) > 0
    plain = save_pipeline(tmp_path / "plain", tiny_unet(0, channels=1))
    argv = ["sample", "--model", plain, *method, "--out", tmp_path / "bad", *FAST_SAMPLING]
    code, _, err = run(argv, capsys)
    assert_one_line_error(code, err, "no dropout layer with p > 0")


def test_ensemble(tiny, tmp_path, capsys):
    members = []
    for k in (1, 2):
        members.append(tmp_path / f"member_{k}")
        tiny_unet(k, channels=1).save_pretrained(members[-1])
    out = tmp_path / "run"
    code, _, err = run(_sample(tiny, out, "--method", "ensemble", "--ensemble", *members), capsys)
    assert code == 0, err
    summary = check_run_folder(out, 3)
    assert summary["settings"]["sampler_settings"]["members"] == 3
    assert min(summary["scores"]["sum"]) > 0
    code, _, err = run(_sample(tiny, tmp_path / "bad", "--method", "ensemble"), capsys)
    assert_one_line_error(code, err, "--method ensemble needs --ensemble DIR")


def test_laplace_needs_a_posterior(tiny, tmp_path, capsys):
    code, _, err = run(_sample(tiny, tmp_path / "bad"), capsys)
    assert_one_line_error(code, err, "--method laplace needs --posterior FILE")


def test_help_lists_the_methods(capsys):
    code, out, _ = run(["sample", "--help"], capsys)
    assert code == 0
    for method in cli.METHODS:
        assert method in out


def test_demo_with_the_bundled_dropout_unet_and_given_ensemble_members(tmp_path, capsys):
    fast = ["--num-images", "2", "--steps", "2", "--mc-samples", "2", "--no-progress"]
    argv = ["demo", "--method", "mc-dropout", "--passes", "2", "--out", tmp_path / "dropout", *fast]
    code, _, err = run(argv, capsys)
    assert code == 0, err
    assert "unet_dropout" in check_run_folder(tmp_path / "dropout", 2)["settings"]["model"]
    members = []
    for k in (0, 1):
        members.append(tmp_path / f"member_{k}")
        tiny_unet(k, channels=1).save_pretrained(members[-1])
    argv = ["demo", "--method", "ensemble", "--ensemble", *members, "--out", tmp_path / "ens", *fast]
    code, _, err = run(argv, capsys)
    assert code == 0, err
    assert check_run_folder(tmp_path / "ens", 2)["settings"]["sampler_settings"]["members"] == 2


def test_x0_drift_needs_no_posterior_and_matches_the_python_method(tiny, tmp_path, capsys):
    import torch
    from safetensors.torch import load_file

    from bayesdiff_ext.io.inputs import load_model
    from bayesdiff_ext.methods import sampler_for

    out = tmp_path / "run"
    code, _, err = run(_sample(tiny, out, "--method", "x0-drift", "--last-steps", "3"), capsys)
    assert code == 0, err
    summary = check_run_folder(out, 3)
    settings = summary["settings"]
    assert settings["method"] == "x0-drift" and settings["last_steps"] == 3 and "mc_samples" not in settings
    assert settings["sampler_settings"]["prediction_type"] == "epsilon"
    aleatoric, epistemic = _split_sums(out)
    assert all(a == 0 for a in aleatoric) and min(epistemic) > 0
    unet, scheduler = load_model(tiny / "model", None)
    from diffusers import DDIMScheduler

    from bayesdiff_ext.randomness import image_generators

    expected = [  # the CLI draws image k from (seed, k)
        sampler_for("x0-drift", unet, DDIMScheduler.from_config(scheduler.config, clip_sample=False), last_steps=3)
        .sample(batch_size=len(b), num_inference_steps=4, generator=image_generators(0, b), progress=False)
        .variance
        for b in (range(0, 2), range(2, 3))
    ]
    written = load_file(out / "tensors.safetensors")["variance"]
    torch.testing.assert_close(written, torch.cat(expected).to(written.dtype))
    code, _, err = run(_sample(tiny, tmp_path / "bad", "--method", "x0-drift", "--last-steps", "9"), capsys)
    assert_one_line_error(code, err, "--last-steps 9 compares more steps than the run has (--steps 4)")


def test_demo_with_x0_drift(tmp_path, capsys):
    out = tmp_path / "demo"
    argv = ["demo", "--method", "x0-drift", "--num-images", "2", "--steps", "4", "--no-progress", "--out", out]
    code, _, err = run([*argv, "--last-steps", "3"], capsys)
    assert code == 0, err
    assert check_run_folder(out, 2)["settings"]["last_steps"] == 3
    code, _, err = run([*argv[:-1], tmp_path / "default"], capsys)
    assert_one_line_error(code, err, "--last-steps 5 compares more steps than the run has (--steps 4)")


def test_weight_samples_writes_its_maps_and_both_scores_and_matches_the_python_method(tiny, tmp_path, capsys):
    import torch
    from diffusers import DDIMScheduler
    from safetensors.torch import load_file

    from bayesdiff_ext.io.inputs import load_model
    from bayesdiff_ext.methods import sampler_for
    from bayesdiff_ext.methods.feature_entropy import ClampedFeatures
    from bayesdiff_ext.metrics import RandomConvFeatures
    from bayesdiff_ext.posterior import load_posterior
    from bayesdiff_ext.randomness import image_generators

    posterior_file = tiny / "posterior.safetensors"
    sizes = ["--num-images", "3", "--batch-size", "2", "--steps", "4", "--no-progress"]
    argv = ["sample", "--model", tiny / "model", "--posterior", posterior_file, *sizes, "--method", "weight-samples"]
    out = tmp_path / "run"
    code, _, err = run([*argv, "--samples", "3", "--seed", "5", "--aggregation", "feature_entropy", "--out", out], capsys)
    assert code == 0, err
    names = [f"{i:05d}.png" for i in range(3)]
    assert sorted(p.name for p in (out / "uncertainty").iterdir()) == names
    rows = list(csv.DictReader((out / "scores.csv").open()))
    assert {"sum", "feature_entropy", "kept"} <= set(rows[0])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["primary_aggregation"] == "feature_entropy"
    settings = summary["settings"]
    assert settings["method"] == "weight-samples" and settings["samples"] == 3 and settings["features"] == "random_conv"
    assert settings["sampler_settings"]["draws"] == "independent" and settings["sampler_settings"]["centre"] == "mean"
    assert settings["sampler_settings"]["weight_seed"] == 5

    unet, scheduler = load_model(tiny / "model", None)
    sampler = sampler_for(
        "weight-samples", unet, DDIMScheduler.from_config(scheduler.config, clip_sample=False),
        posterior=load_posterior(posterior_file, unet), samples=3,
        features=ClampedFeatures(RandomConvFeatures(in_channels=1, seed=0)),
    )
    expected = [  # the CLI draws image k from (seed, k), the weights once from seed
        sampler.sample(batch_size=len(b), num_inference_steps=4, generator=image_generators(5, b), progress=False,
                       weight_seed=5)
        for b in (range(0, 2), range(2, 3))
    ]
    written = load_file(out / "tensors.safetensors")
    torch.testing.assert_close(written["variance"], torch.cat([e.variance for e in expected]).to(written["variance"].dtype))
    torch.testing.assert_close(written["scores.feature_entropy"], torch.cat([e.feature_entropy for e in expected]))
    assert [float(r["feature_entropy"]) for r in rows] == pytest.approx(written["scores.feature_entropy"].tolist())
    assert min(float(r["sum"]) for r in rows) > 0

    code, _, err = run([*argv, "--preset", "fast", "--out", tmp_path / "bad"], capsys)
    assert_one_line_error(code, err, "--preset choose(s) the Laplace estimators; --method weight-samples takes none")
    code, _, err = run(["sample", "--model", tiny / "model", *sizes, "--aggregation", "feature_entropy",
                        "--posterior", posterior_file, "--out", tmp_path / "bad2"], capsys)
    assert_one_line_error(code, err, "--aggregation feature_entropy (no parameters) is the score of --method weight-samples")
    code, _, err = run([*argv[:-2], "--method", "laplace", "--features", "random_conv", "--out", tmp_path / "bad3"], capsys)
    assert_one_line_error(code, err, "--features is the feature space of --method weight-samples' entropy")
