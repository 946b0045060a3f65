"""`bayesdiff sample --model PIPELINE_DIR --method weight-samples|x0-drift` on saved tiny SD 1.5, SDXL, SD3, Flux,
PixArt-Σ and DiT folders with their default schedulers: the run's files, the same results at any --batch-size."""

import csv
import json

import pytest
import torch
from pipeline_components import SIZE, dit_pipeline, with_tokenizers
from safetensors.torch import load_file
from test_cli import assert_one_line_error, run
from test_cli_pipelines import PIPELINES, images

__all__ = ["images"]  # the fixture, imported for these tests

SAMPLING = ["--steps", "2", "--num-images", "2", "--no-progress"]
METHODS = {
    "weight-samples": ["--method", "weight-samples", "--samples", "2", "--aggregation", "feature_entropy"],
    "x0-drift": ["--method", "x0-drift", "--last-steps", "2"],
}


def _finite_nonnegative(t: torch.Tensor) -> None:
    assert bool(torch.isfinite(t).all()) and t.min() >= 0 and (t.flatten(1).sum(1) > 0).all()


@pytest.mark.parametrize("name", list(PIPELINES))
def test_both_methods_write_their_maps_and_scores_for_any_batch_size(name, images, tmp_path, capsys):
    make, options, _ = PIPELINES[name]
    pipe = with_tokenizers(make(), tmp_path / "tokenizers")
    pipe.save_pretrained(tmp_path / "model")
    fit_options = options[:2]  # --prompt or --class-label
    code, _, err = run(
        ["fit", "--model", tmp_path / "model", "--data", images, "--out", tmp_path / "post.safetensors",
         "--batch-size", "2", "--no-progress", *fit_options],
        capsys,
    )
    assert code == 0, err
    written = {}
    for method, method_options in METHODS.items():
        for batch in (1, 2):
            out = tmp_path / f"{method}-{batch}"
            given = ["--posterior", tmp_path / "post.safetensors"] if method == "weight-samples" else []
            argv = ["sample", "--model", tmp_path / "model", *given, *options, *SAMPLING, *method_options]
            code, _, err = run([*argv, "--batch-size", batch, "--out", out], capsys)
            assert code == 0, err
            assert f"method {method}" in err and "pixel maps on the decoded images" in err
            written[method, batch] = load_file(out / "tensors.safetensors")
        summary = json.loads((out / "summary.json").read_text())
        assert summary["settings"]["method"] == method and summary["settings"]["pipeline"] == type(pipe).__name__
        assert summary["settings"]["sampler_settings"]["method"] == method
        rows = list(csv.DictReader((out / "scores.csv").open()))
        assert len(rows) == 2 and ("feature_entropy" in rows[0]) == (method == "weight-samples")
        tensors = written[method, 2]
        assert tensors["images"].shape == tensors["variance"].shape == (2, 3, SIZE, SIZE)
        _finite_nonnegative(tensors["variance"])
        _finite_nonnegative(tensors["latent_variance"])
        alone = written[method, 1]  # the randomness rule: image k's everything from (seed, k)
        for key, value in tensors.items():
            torch.testing.assert_close(alone[key], value, rtol=1e-3, atol=1e-5, msg=f"{method} {key}")
    assert torch.equal(written["weight-samples", 2]["images"], written["x0-drift", 2]["images"])  # both the stock images
    assert bool(torch.isfinite(written["weight-samples", 2]["scores.feature_entropy"]).all())


def test_pipeline_folders_name_the_methods_they_run(tmp_path, capsys):
    dit_pipeline().save_pretrained(tmp_path / "dit")
    sample = ["sample", "--model", tmp_path / "dit", "--class-label", "3", *SAMPLING]
    code, _, err = run([*sample, "--method", "hfl", "--out", tmp_path / "a"], capsys)
    assert_one_line_error(code, err, "--method hfl takes unconditional UNet models", "laplace, weight-samples, x0-drift")
    code, _, err = run([*sample, "--method", "weight-samples", "--out", tmp_path / "b"], capsys)
    assert_one_line_error(code, err, "--method weight-samples needs --posterior FILE")
    code, _, err = run([*sample, *METHODS["x0-drift"], "--preset", "fast", "--out", tmp_path / "c"], capsys)
    assert_one_line_error(code, err, "--preset choose(s) the Laplace estimators; --method x0-drift takes none")
    code, _, err = run([*sample, "--method", "x0-drift", "--last-steps", "3", "--out", tmp_path / "d"], capsys)
    assert_one_line_error(code, err, "--last-steps 3 compares more steps than the run has (--steps 2)")
