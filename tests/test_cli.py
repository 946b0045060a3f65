import csv
import json

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, UNet2DModel
from PIL import Image
from tiny_models import tiny_unet

from bayesdiff_ext import LastLayerLaplace, cli

FAST_SAMPLING = ["--steps", "4", "--uq-every", "2", "--mc-samples", "3", "--no-progress"]


def save_pipeline(folder, unet):
    unet.save_pretrained(folder / "unet")
    DDPMScheduler(num_train_timesteps=100, clip_sample=False).save_pretrained(folder / "scheduler")
    return folder


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random-init pipeline folder, fitting data for it and a posterior fitted with the CLI."""
    root = tmp_path_factory.mktemp("tiny")
    save_pipeline(root / "model", tiny_unet(0, channels=1))
    torch.save(torch.rand(12, 1, 8, 8) * 2 - 1, root / "data.pt")
    code = cli.main(
        [
            "fit",
            "--model",
            str(root / "model"),
            "--data",
            str(root / "data.pt"),
            "--out",
            str(root / "posterior.safetensors"),
            "--batch-size",
            "5",
            "--no-progress",
        ]
    )
    assert code == 0
    return root


def run(argv, capsys):
    """Exit status and the stdout/stderr of `bayesdiff argv`, argparse's exits included."""
    try:
        code = cli.main([str(a) for a in argv])
    except SystemExit as exit_:
        code = exit_.code
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, err, *fragments):
    assert code == 2, (code, err)  # bad input
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("bayesdiff: error: "), err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def check_run_folder(out, num_images):
    names = [f"{i:05d}.png" for i in range(num_images)]
    assert sorted(p.name for p in (out / "samples").iterdir()) == names
    assert sorted(p.name for p in (out / "uncertainty").iterdir()) == names
    assert (out / "grid_sorted.png").is_file() and (out / "tensors.safetensors").is_file()
    rows = list(csv.DictReader((out / "scores.csv").open()))
    assert len(rows) == num_images
    assert set(rows[0]) == {"index", *cli.REPORTED_SCORES, "aleatoric_sum", "epistemic_sum", "kept"}
    for part in ("aleatoric", "epistemic"):
        assert sorted(p.name for p in (out / f"uncertainty_{part}").iterdir()) == names
    summary = json.loads((out / "summary.json").read_text())
    assert {"scores", "filter", "settings", "versions", "timings", "uncertainty_maps"} <= set(summary)
    assert set(summary["scores"]) == set(cli.REPORTED_SCORES)
    kept = [int(r["index"]) for r in rows if r["kept"] == "1"]
    assert summary["filter"]["kept"] == kept
    assert sorted(p.name for p in (out / "kept").iterdir()) == [names[i] for i in kept]
    for row in rows:  # the scores are those of the written variance maps
        assert float(row["sum"]) == pytest.approx(summary["scores"]["sum"][int(row["index"])])
    assert all(s >= 0 for s in summary["scores"]["sum"])
    return summary


def test_demo_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    code, stdout, err = run(["demo", "--num-images", 4, "--steps", 5, "--no-progress", "--out", out], capsys)
    assert code == 0, err
    assert stdout.strip() == str(out)
    summary = check_run_folder(out, 4)
    settings = summary["settings"]
    assert settings["command"] == "demo" and settings["steps"] == 5 and settings["sampler"] == "ddim"
    assert settings["preset"] == cli.DEFAULT_PRESET and settings["estimator"] == "trajectories"
    assert summary["clamped_pixels"]["total"] == 0  # the default preset clamps nothing
    assert summary["filter"]["rule"] == "mean_plus_std"
    with Image.open(out / "samples" / "00000.png") as picture:
        assert picture.size == (64, 64)  # 16x16 digits enlarged 4x


def test_fit_writes_a_loadable_posterior(tiny):
    unet = UNet2DModel.from_pretrained(tiny / "model" / "unet")
    posterior = LastLayerLaplace.load(tiny / "posterior.safetensors", unet)
    assert posterior.structure == "diag" and posterior.fit_stats.n_images == 12
    mean, var = posterior.predict(torch.randn(2, 8, 8, 8))
    assert mean.shape == var.shape == (2, 1, 8, 8) and bool((var >= 0).all())


def test_fit_reads_image_folders_and_npy(tiny, tmp_path, capsys):
    folder = tmp_path / "pngs"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(np.full((20, 12), 40 * i, dtype=np.uint8)).save(folder / f"{i}.png")
    (folder / "notes.txt").write_text("not an image")
    code, stdout, err = run(
        [
            "fit",
            "--model",
            tiny / "model",
            "--data",
            folder,
            "--out",
            tmp_path / "a.safetensors",
            "--structure",
            "full",
            "--no-progress",
        ],
        capsys,
    )
    assert code == 0, err
    assert stdout.strip() == str(tmp_path / "a.safetensors")
    np.save(tmp_path / "data.npy", np.random.randint(0, 256, (4, 1, 8, 8), dtype=np.uint8))
    code, _, err = run(
        [
            "fit",
            "--model",
            tiny / "model",
            "--data",
            tmp_path / "data.npy",
            "--out",
            tmp_path / "b.safetensors",
            "--sigma",
            "1",
            "--prior-precision",
            "10",
            "--no-progress",
        ],
        capsys,
    )
    assert code == 0, err
    unet = UNet2DModel.from_pretrained(tiny / "model" / "unet")
    full = LastLayerLaplace.load(tmp_path / "a.safetensors", unet)
    assert full.structure == "full" and full.fit_stats.n_images == 3
    fixed = LastLayerLaplace.load(tmp_path / "b.safetensors", unet)
    assert fixed.sigma_noise == 1.0 and fixed.prior_precision == 10.0


def test_sample_from_a_pipeline_folder(tiny, tmp_path, capsys):
    out = tmp_path / "run"
    code, stdout, err = run(
        [
            "sample",
            "--model",
            tiny / "model",
            "--posterior",
            tiny / "posterior.safetensors",
            "--num-images",
            5,
            "--batch-size",
            2,
            "--filter",
            "top_k:k=2",
            "--aggregation",
            "percentile:q=50",
            "--out",
            out,
            *FAST_SAMPLING,
        ],
        capsys,
    )
    assert code == 0, err
    assert stdout.strip() == str(out)
    summary = check_run_folder(out, 5)
    assert summary["filter"]["num_removed"] == 2 and summary["filter"]["applied_to"] == "percentile"
    assert summary["aggregations"]["percentile"] == {"q": 50}
    removed = summary["filter"]["removed"]
    scores = summary["scores"]["percentile"]
    assert min(scores[i] for i in removed) >= max(s for i, s in enumerate(scores) if i not in removed)
    assert summary["settings"]["num_images"] == 5 and summary["timings"]["model_forwards_per_image"] > 0


def test_sample_from_a_bare_unet_folder_with_dpm2(tiny, tmp_path, capsys):
    out = tmp_path / "run"
    code, _, err = run(
        [
            "sample",
            "--model",
            tiny / "model" / "unet",
            "--scheduler",
            tiny / "model" / "scheduler",
            "--posterior",
            tiny / "posterior.safetensors",
            "--num-images",
            2,
            "--sampler",
            "dpm2",
            "--out",
            out,
            *FAST_SAMPLING,
        ],
        capsys,
    )
    assert code == 0, err
    summary = check_run_folder(out, 2)
    assert summary["settings"]["sampler_settings"]["scheduler"] == "DPMSolverSinglestepScheduler"


def test_same_seed_same_images(tiny, tmp_path, capsys):
    args = [
        "sample",
        "--model",
        tiny / "model",
        "--posterior",
        tiny / "posterior.safetensors",
        "--num-images",
        2,
        "--seed",
        7,
        *FAST_SAMPLING,
    ]
    assert run([*args, "--out", tmp_path / "a"], capsys)[0] == 0
    assert run([*args, "--out", tmp_path / "b"], capsys)[0] == 0
    for name in ("samples/00001.png", "uncertainty/00001.png", "scores.csv"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_presets_and_their_refusals(tiny, tmp_path, capsys):
    base = ["sample", "--model", tiny / "model", "--posterior", tiny / "posterior.safetensors", "--num-images", 2,
            "--steps", 3, "--no-progress"]
    assert run([*base, "--preset", "paper", "--out", tmp_path / "paper"], capsys)[0] == 0
    paper = json.loads((tmp_path / "paper" / "summary.json").read_text())
    assert (paper["settings"]["estimator"], paper["settings"]["uq_every"], paper["settings"]["mc_samples"]) == ("recurrence", 5, 10)
    assert "per_image" in paper["clamped_pixels"]
    assert run([*base, "--method", "trajectories", "--samples", 2, "--out", tmp_path / "traj"], capsys)[0] == 0
    traj = json.loads((tmp_path / "traj" / "summary.json").read_text())
    assert traj["settings"]["samples"] == 2 and traj["settings"]["estimator"] == "trajectories"
    assert traj["settings"]["shared_draws"] and traj["settings"]["weight_seed"] == traj["settings"]["seed"]  # drawn from --seed
    own = [*base, "--method", "trajectories", "--samples", 2, "--per-image-draws", "--seed", 3]
    assert run([*own, "--out", tmp_path / "own"], capsys)[0] == 0
    own_settings = json.loads((tmp_path / "own" / "summary.json").read_text())["settings"]
    assert (own_settings["shared_draws"], own_settings["weight_seed"]) == (False, None)
    code, _, err = run([*base, "--preset", "paper", "--per-image-draws", "--out", tmp_path / "bad"], capsys)
    assert_one_line_error(code, err, "shared_draws is not an argument of the 'recurrence' estimator")
    code, _, err = run([*base, "--preset", "fast", "--uq-every", 2, "--out", tmp_path / "bad"], capsys)
    assert_one_line_error(code, err, "uq_every is not an argument of the 'trajectories' estimator")
    code, _, err = run([*base, "--covariance", "none", "--mc-samples", 0, "--uq-every", 1, "--out", tmp_path / "cf"], capsys)
    assert code == 0, err


def test_sample_and_demo_agree_for_one_seed_at_any_batch_size(tmp_path, capsys):
    from safetensors.torch import load_file

    from bayesdiff_ext import digits

    common = ["--num-images", 3, "--steps", 3, "--uq-every", 1, "--mc-samples", 4, "--seed", 5, "--no-progress"]
    assert run(["demo", *common, "--batch-size", 3, "--out", tmp_path / "demo"], capsys)[0] == 0
    root = digits.bundled_dir()
    bundled = ["--model", root, "--posterior", root / "posterior_diag.safetensors"]
    assert run(["sample", *bundled, *common, "--batch-size", 2, "--out", tmp_path / "sample"], capsys)[0] == 0
    demo, sample = (load_file(tmp_path / name / "tensors.safetensors") for name in ("demo", "sample"))
    torch.testing.assert_close(sample["images"], demo["images"], rtol=1e-5, atol=1e-5)
    # float32 convolutions round differently in batches of 2 and 3; the Monte Carlo covariance is a
    # difference of O(1) float32 moments, so each pixel keeps an absolute round-off of ~1e-7, and a
    # per-image sum of ~1e-2 over 256 pixels a relative one of ~1e-4; the batch dependence this test
    # guards against moved scores by 7%
    variance = demo["variance"]
    torch.testing.assert_close(sample["variance"], variance, rtol=1e-3, atol=1e-6)
    torch.testing.assert_close(sample["variance"].sum((1, 2, 3)), variance.sum((1, 2, 3)), rtol=1e-3, atol=0)


# ------------------------------------------------------------------------------------------------
# bad input: exit status 2 and one line, never a traceback
# ------------------------------------------------------------------------------------------------
def test_missing_model_folder(tmp_path, capsys):
    code, _, err = run(
        [
            "sample",
            "--model",
            tmp_path / "nope",
            "--posterior",
            tmp_path / "p.safetensors",
            "--out",
            tmp_path / "out",
        ],
        capsys,
    )
    assert_one_line_error(code, err, "model folder", "does not exist")
    assert not (tmp_path / "out").exists()


def test_folder_that_is_not_a_model(tmp_path, capsys):
    code, _, err = run(["fit", "--model", tmp_path, "--data", tmp_path], capsys)
    assert_one_line_error(code, err, "is not a diffusers model folder")


def test_bare_unet_folder_needs_a_scheduler(tiny, tmp_path, capsys):
    code, _, err = run(
        [
            "sample",
            "--model",
            tiny / "model" / "unet",
            "--posterior",
            tiny / "posterior.safetensors",
            "--out",
            tmp_path / "out",
        ],
        capsys,
    )
    assert_one_line_error(code, err, "--scheduler")


@pytest.mark.parametrize(
    "config, fragment",
    [
        ({"_class_name": "UNet2DConditionModel"}, "holds a UNet2DConditionModel"),
        ({"_class_name": "UNet2DModel", "num_class_embeds": 10}, "is a class-conditioned UNet2DModel"),
    ],
)
def test_conditioned_models_are_refused(tmp_path, capsys, config, fragment):
    (tmp_path / "model" / "unet").mkdir(parents=True)
    (tmp_path / "model" / "unet" / "config.json").write_text(json.dumps(config))
    DDPMScheduler().save_pretrained(tmp_path / "model" / "scheduler")
    code, _, err = run(["fit", "--model", tmp_path / "model", "--data", tmp_path], capsys)
    assert_one_line_error(code, err, fragment, "unconditional")


def test_unwritable_output_folder(tiny, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    code, _, err = run(
        [
            "sample",
            "--model",
            tiny / "model",
            "--posterior",
            tiny / "posterior.safetensors",
            "--out",
            blocker / "run",
            *FAST_SAMPLING,
        ],
        capsys,
    )
    assert_one_line_error(code, err, "cannot create output folder", "is a file")
    code, _, err = run(["demo", "--out", blocker], capsys)
    assert_one_line_error(code, err, "exists and is not a folder")


def test_non_empty_output_folder(tiny, tmp_path, capsys):
    (tmp_path / "old.txt").write_text("x")
    code, _, err = run(
        [
            "sample",
            "--model",
            tiny / "model",
            "--posterior",
            tiny / "posterior.safetensors",
            "--out",
            tmp_path,
        ],
        capsys,
    )
    assert_one_line_error(code, err, "already exists and is not empty")


def test_missing_and_empty_data(tiny, tmp_path, capsys):
    code, _, err = run(
        [
            "fit",
            "--model",
            tiny / "model",
            "--data",
            tmp_path / "missing",
            "--out",
            tmp_path / "p.safetensors",
        ],
        capsys,
    )
    assert_one_line_error(code, err, "data path", "does not exist")
    (tmp_path / "empty").mkdir()
    code, _, err = run(
        ["fit", "--model", tiny / "model", "--data", tmp_path / "empty", "--out", tmp_path / "p.safetensors"],
        capsys,
    )
    assert_one_line_error(code, err, "no PNG/JPG/JPEG images in")
    torch.save(torch.rand(3, 1, 9, 9), tmp_path / "wrong.pt")
    code, _, err = run(
        [
            "fit",
            "--model",
            tiny / "model",
            "--data",
            tmp_path / "wrong.pt",
            "--out",
            tmp_path / "p.safetensors",
        ],
        capsys,
    )
    assert_one_line_error(code, err, "the model needs (N, 1, 8, 8)")
    assert not (tmp_path / "p.safetensors").exists()


def test_head_the_method_cannot_handle(tmp_path, capsys):
    unet = tiny_unet(0, channels=1, time_embedding_type="fourier")
    save_pipeline(tmp_path / "fourier", unet)
    torch.save(torch.zeros(2, 1, 8, 8), tmp_path / "data.pt")
    code, _, err = run(
        [
            "fit",
            "--model",
            tmp_path / "fourier",
            "--data",
            tmp_path / "data.pt",
            "--out",
            tmp_path / "p.safetensors",
        ],
        capsys,
    )
    assert_one_line_error(code, err, "time_embedding_type='fourier'")


def test_posterior_for_another_model(tiny, tmp_path, capsys):
    save_pipeline(tmp_path / "other_weights", tiny_unet(1, channels=1))
    code, _, err = run(
        [
            "sample",
            "--model",
            tmp_path / "other_weights",
            "--posterior",
            tiny / "posterior.safetensors",
            "--out",
            tmp_path / "out1",
            *FAST_SAMPLING,
        ],
        capsys,
    )
    assert_one_line_error(code, err, "is a posterior for another model")
    other_shape = tiny_unet(0, channels=1, block_out_channels=(4, 8), norm_num_groups=2)
    save_pipeline(tmp_path / "other_shape", other_shape)
    code, _, err = run(
        [
            "sample",
            "--model",
            tmp_path / "other_shape",
            "--posterior",
            tiny / "posterior.safetensors",
            "--out",
            tmp_path / "out2",
            *FAST_SAMPLING,
        ],
        capsys,
    )
    assert_one_line_error(code, err, "was fitted for the head")
    assert not (tmp_path / "out1").exists() and not (tmp_path / "out2").exists()


def test_not_a_posterior_file(tiny, tmp_path, capsys):
    (tmp_path / "p.safetensors").write_bytes(b"not safetensors")
    code, _, err = run(
        [
            "sample",
            "--model",
            tiny / "model",
            "--posterior",
            tmp_path / "p.safetensors",
            "--out",
            tmp_path / "out",
        ],
        capsys,
    )
    assert_one_line_error(code, err, "is not a posterior file")


@pytest.mark.parametrize(
    "options, fragment",
    [
        (["--filter", "random"], "unknown filter rule 'random'; valid: mean_plus_std, top_k, quantile"),
        (["--filter", "top_k:k=9"], "removes more images than --num-images"),
        (["--aggregation", "median"], "unknown aggregation 'median'; valid: sum, mean, max"),
        (["--aggregation", "percentile:q=500"], "`q` must be in [0, 100]"),
        (["--aggregation", "masked_mean"], "needs a mask"),
        (["--steps", "0"], "argument --steps: must be >= 1"),
        (["--filter", "top_k:k"], "write NAME or NAME:KEY=NUMBER"),
        (["--sampler", "euler"], "invalid choice: 'euler'"),
        (["--eta", "0.5", "--sampler", "ddpm"], "applies to DDIMScheduler only"),
    ],
)
def test_bad_options(tiny, tmp_path, capsys, options, fragment):
    code, _, err = run(
        [
            "sample",
            "--model",
            tiny / "model",
            "--posterior",
            tiny / "posterior.safetensors",
            "--num-images",
            2,
            "--out",
            tmp_path / "out",
            *FAST_SAMPLING,
            *options,
        ],
        capsys,
    )
    assert_one_line_error(code, err, fragment)
    assert not (tmp_path / "out").exists()


def test_fit_refuses_to_overwrite(tiny, tmp_path, capsys):
    target = tmp_path / "p.safetensors"
    target.write_text("keep me")
    code, _, err = run(
        ["fit", "--model", tiny / "model", "--data", tiny / "data.pt", "--out", target], capsys
    )
    assert_one_line_error(code, err, "already exists; pass --overwrite")
    assert target.read_text() == "keep me"


def test_debug_shows_the_traceback(tmp_path, capsys):
    code, _, err = run(
        ["sample", "--model", tmp_path / "nope", "--posterior", tmp_path / "p", "--debug"], capsys
    )
    assert code == 2 and "Traceback" in err and err.strip().splitlines()[-1].startswith("bayesdiff: error: ")


@pytest.mark.parametrize("command", [[], ["demo"], ["sample"], ["fit"]])
def test_help(command, capsys):
    code, out, _ = run([*command, "--help"], capsys)
    assert code == 0 and "usage: bayesdiff" in out and "example" in out
