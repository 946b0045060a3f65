"""`bayesdiff fit --inference vi|mcmc|head-ensemble` writes one posterior file that `bayesdiff sample` uses."""

import contextlib
import json

import pytest
from test_cli import FAST_SAMPLING, assert_one_line_error, check_run_folder, run, tiny

from bayesdiff_ext.posterior import LastLayerHeadEnsemble, LastLayerMCMC, LastLayerVI, load_posterior
from bayesdiff_ext.io.inputs import load_model

__all__ = ["tiny"]  # the fixture, imported for these tests

FAST = {
    "vi": (["--vi-steps", "30", "--structure", "full"], LastLayerVI),
    "mcmc": (["--chains", "2", "--warmup", "20", "--draws", "6", "--leapfrog-steps", "4"], LastLayerMCMC),
    "head-ensemble": (["--members", "3", "--train-steps", "40"], LastLayerHeadEnsemble),
}


def _fit(tiny, out, *options):
    data = ["--data", tiny / "data.pt", "--batch-size", "5"]
    return ["fit", "--model", tiny / "model", *data, "--out", out, "--no-progress", *options]


@pytest.mark.parametrize("inference", list(FAST))
def test_fit_then_sample(tiny, tmp_path, capsys, inference):
    options, cls = FAST[inference]
    path = tmp_path / f"{inference}.safetensors"
    # 2 chains of 6 draws are far from converged, and say so
    warns = pytest.warns(UserWarning, match="not converged") if inference == "mcmc" else contextlib.nullcontext()
    with warns:
        code, out, err = run(_fit(tiny, path, "--inference", inference, *options), capsys)
    assert code == 0, err
    assert out.strip() == str(path)
    posterior = load_posterior(path, load_model(tiny / "model", None)[0])
    assert isinstance(posterior, cls) and posterior.fit_stats.n_images == 12
    if inference == "vi":
        assert posterior.settings()["family"] == "full" and posterior.structure == "factored"
    if inference == "mcmc":
        assert "ess_min" in err and posterior.distribution.samples.shape[0] == 12
    if inference == "head-ensemble":
        assert posterior.settings()["steps"] == 40 and posterior.settings()["bootstrap"] is True
    run_dir = tmp_path / "run"
    sample = ["sample", "--model", tiny / "model", "--posterior", path, "--num-images", "3", "--out", run_dir]
    code, _, err = run([*sample, *FAST_SAMPLING], capsys)
    assert code == 0, err
    summary = check_run_folder(run_dir, 3)
    assert summary["settings"]["posterior_inference"] == inference
    assert all(s > 0 for s in summary["scores"]["sum"])
    assert json.loads((run_dir / "summary.json").read_text())["settings"]["method"] == "laplace"


@pytest.mark.parametrize(
    "options, fragment",
    [
        (["--inference", "vi", "--chains", "2"], "--chains applies to --inference mcmc, not vi"),
        (["--inference", "mcmc", "--no-bootstrap"], "--no-bootstrap applies to --inference head-ensemble"),
        (["--vi-steps", "10"], "--vi-steps applies to --inference vi, not laplace"),
        (["--inference", "mcmc", "--structure", "diag"], "--structure diag does not apply to --inference mcmc"),
        (["--inference", "vi", "--structure", "kron"], "--structure kron does not apply to --inference vi"),
        (["--inference", "head-ensemble", "--curvature", "ef"], "--curvature applies to --inference laplace"),
        (["--inference", "gibbs"], "invalid choice: 'gibbs'"),
        (["--inference", "mcmc", "--draws", "2"], "argument --draws: must be >= 4"),
    ],
)
def test_options_of_another_inference_are_refused(tiny, tmp_path, capsys, options, fragment):
    code, _, err = run(_fit(tiny, tmp_path / "p.safetensors", *options), capsys)
    assert_one_line_error(code, err, fragment)
    assert not (tmp_path / "p.safetensors").exists()


def test_derived_methods_need_a_laplace_posterior(tiny, tmp_path, capsys):
    path = tmp_path / "vi.safetensors"
    assert run(_fit(tiny, path, "--inference", "vi", "--vi-steps", "10"), capsys)[0] == 0
    sample = ["sample", "--model", tiny / "model", "--posterior", path, "--out", tmp_path / "run"]
    code, _, err = run([*sample, "--method", "isotropic", *FAST_SAMPLING], capsys)
    assert_one_line_error(code, err, "derives its posterior from a Laplace one, got a 'vi' posterior")
