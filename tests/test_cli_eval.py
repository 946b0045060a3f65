"""`bayesdiff eval` on a user's model folder, its cache and --reuse, and what every --help shows."""

import argparse
import json
import warnings

import numpy as np
import pytest
import torch
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel
from test_cli import assert_one_line_error, run

from bayesdiff_ext import cli

TINY_RUN = [
    "--num-images", "24", "--steps", "3", "--batch-size", "12", "--costly-images", "12",
    "--mc-samples", "2", "--uq-every", "2", "--weight-samples", "2", "--drift-last-steps", "3",
    "--hfl-probes", "4", "--random-seeds", "3", "--no-progress",
]  # fmt: skip


class _Classifier(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.fc = torch.nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).mean(dim=(2, 3)))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    torch.manual_seed(0)
    unet = UNet2DModel(
        sample_size=8,
        in_channels=3,
        out_channels=3,
        block_out_channels=(8, 8),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
    )
    scheduler = DDPMScheduler(num_train_timesteps=100, beta_schedule="squaredcos_cap_v2", clip_sample=False)
    DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(root / "model")
    torch.save(torch.rand(40, 3, 8, 8) * 2 - 1, root / "data.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.trace(_Classifier().eval(), torch.zeros(1, 3, 8, 8)), str(root / "classifier.pt"))
    return root


@pytest.fixture(scope="module")
def evaluated(folder, tmp_path_factory):
    """One tiny evaluation of the folder model (module-wide: the reuse tests start from its cache)."""
    out = tmp_path_factory.mktemp("run") / "out"
    argv = ["eval", "--model", folder / "model", "--data", folder / "data.pt", "--classifier", folder / "classifier.pt"]
    code, stdout, err = _run_plain([*argv, "--out", out, *TINY_RUN])
    return out, code, stdout, err


def _run_plain(argv):
    import contextlib
    import io

    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = cli.main([str(a) for a in argv])
    return code, stdout.getvalue(), stderr.getvalue()


def test_eval_runs_on_a_model_folder_with_its_data_and_states_its_time(evaluated):
    out, code, stdout, err = evaluated
    assert code == 0, err
    assert "estimated generation time:" in stdout and "first batch:" in stdout
    text = (out / "EVALUATION.md").read_text()
    assert "<!-- BEGIN generated section: model -->" in text and "## The goal" in text
    assert "AUROC classifier confidence" in text and "AUROC k-NN realism" in text
    results = json.loads((out / "results.json").read_text())
    methods = results["methods"]
    assert {"x0_drift", "weight_samples", "weight_samples_entropy", "drift_and_weights", "paper"} <= set(methods)
    assert "mc_dropout" not in methods  # no dropout weights for a user's folder
    assert set(methods["x0_drift"]["detection"]) == {"confidence", "realism"}
    assert results["meta"]["subject"]["primary"] == "random_conv"
    # The report gives no σ and no verdict from 3 seeds, and says why.
    assert "σ)" not in text.split("### Filtering")[1] and "fewer than 5 seeds" in text
    assert (out / "evaluation" / "model" / "extremes.png").stat().st_size > 1000


def test_reuse_takes_the_cached_settings_and_names_a_differing_one(evaluated, capsys):
    out, code, _, err = evaluated
    assert code == 0, err
    before = json.loads((out / "results.json").read_text())["methods"]
    code, _, err = run(["eval", "--out", out, "--reuse", "--no-progress"], capsys)
    assert code == 0, err
    assert json.loads((out / "results.json").read_text())["methods"] == before
    code, _, err = run(["eval", "--out", out, "--reuse", "--num-images", "2000"], capsys)
    assert_one_line_error(code, err, "the cached run used num_images=24 but this call asks for 2000")
    # Analysis settings may change: with 5 seeds the tables measure advantages in σ.
    code, _, err = run(["eval", "--out", out, "--reuse", "--random-seeds", "5", "--no-progress"], capsys)
    assert code == 0, err
    assert "σ)" in (out / "EVALUATION.md").read_text().split("### Filtering")[1]
    code, _, err = run(["eval", "--out", out.parent / "nothing", "--reuse"], capsys)
    assert_one_line_error(code, err, "no cached run at")


def test_eval_refuses_a_folder_without_data_and_data_for_a_bundled_model(folder, tmp_path, capsys):
    code, _, err = run(["eval", "--model", folder / "model", "--out", tmp_path / "a"], capsys)
    assert_one_line_error(code, err, "pass data (its real images) as well")
    code, _, err = run(["eval", "--data", folder / "data.pt", "--out", tmp_path / "b"], capsys)
    assert_one_line_error(code, err, "builtin:digits brings its own scheduler, data")
    bare = ["eval", "--model", folder / "model" / "unet", "--data", folder / "data.pt", "--out", tmp_path / "c"]
    code, _, err = run(bare, capsys)
    assert_one_line_error(code, err, "name its scheduler folder with --scheduler DIR")


def _subparsers(parser):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices
    return {}


def test_every_help_shows_every_options_default():
    parser = cli.build_parser()
    for name, sub in _subparsers(parser).items():
        formatter = sub._get_formatter()
        for action in sub._actions:
            flag = action.nargs == 0  # --debug, --no-bootstrap: their help says what they switch
            if not action.option_strings or action.required or flag or action.default is argparse.SUPPRESS:
                continue
            shown = formatter._expand_help(action) if action.help else ""
            assert "default" in shown, (name, action.option_strings, shown)
    defaults = _subparsers(parser)["eval"].format_help()
    assert "(default: 2000)" in defaults and "(default: builtin:digits)" in defaults


def test_unknown_aggregation_lists_only_the_names_the_command_takes(tmp_path, capsys):
    code, _, err = run(["demo", "--aggregation", "median", "--out", tmp_path / "x"], capsys)
    assert_one_line_error(code, err, "unknown aggregation 'median'; valid: sum, mean, max, percentile, patch_max")
    assert "masked_mean" not in err


def test_a_new_method_is_one_registered_score_and_a_cached_run_gains_it(evaluated, monkeypatch):
    from bayesdiff_ext import LastLayerLaplace
    from bayesdiff_ext.evaluation import EvaluationConfig, run_evaluation
    from bayesdiff_ext.evaluation.cache import cached_settings
    from bayesdiff_ext.evaluation.posteriors import DEFAULT, PosteriorSpec
    from bayesdiff_ext.evaluation.registry import SCORES, Score
    from bayesdiff_ext.evaluation.sources import CLOSED_FORM, SamplerRun

    out, code, _, err = evaluated
    assert code == 0, err
    strong_prior = PosteriorSpec(
        "strong_prior",
        lambda p: LastLayerLaplace(p.subject.unet, "diag", prior_precision=1e4).fit_features(p.features()),
    )
    score = Score("strong_prior", lambda c: "diag, δ = 1e4, closed form", SamplerRun("strong_closed", strong_prior, lambda c: CLOSED_FORM))
    # the run's own closed form again: supplemented on the cached images' x_T, it gives their scores
    again = Score("closed_again", lambda c: "covariance_none again", SamplerRun("closed_again", DEFAULT, lambda c: CLOSED_FORM))
    monkeypatch.setattr("bayesdiff_ext.evaluation.registry.SCORES", [*SCORES, score, again])
    config = EvaluationConfig(**cached_settings(out), out_dir=out, progress=False)
    run_evaluation(config, reuse=True)
    results = json.loads((out / "results.json").read_text())
    assert results["methods"]["strong_prior"]["n"] == 24
    with np.load(out / "filtering_run.npz", allow_pickle=False) as cache:
        np.testing.assert_allclose(cache["score__closed_again"], cache["score__covariance_none"], rtol=1e-6)
    assert "strong_closed" in results["meta"]["supplemented"]
    assert "diag, δ = 1e4, closed form" in (out / "EVALUATION.md").read_text()
