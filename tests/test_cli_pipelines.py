"""`bayesdiff fit|sample --model PIPELINE_DIR` on saved tiny SD 1.5, SDXL, SD3, Flux, PixArt-Σ and DiT folders,
each with its default scheduler (SD 1.5's PNDM and PixArt-Σ's DPM-Solver++ 2M through the default preset)."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from pipeline_components import (
    SIZE,
    dit_pipeline,
    flux_pipeline,
    pixart_pipeline,
    sd3_pipeline,
    sd15_pipeline,
    sdxl_pipeline,
    with_tokenizers,
)
from safetensors.torch import load_file
from bayesdiff_ext.randomness import image_generators
from test_cli import run

# name: (pipeline, its conditioning options, --sampler where its default scheduler is multistep)
PIPELINES = {
    "sd15": (sd15_pipeline, ["--prompt", "a cat", "--negative-prompt", "blur", "--guidance-scale", "3"], "ddim"),
    "sdxl": (sdxl_pipeline, ["--prompt", "a cat", "--guidance-scale", "3"], None),
    "sd3": (sd3_pipeline, ["--prompt", "a cat", "--guidance-scale", "3"], None),
    "flux": (flux_pipeline, ["--prompt", "a cat", "--height", str(SIZE), "--width", str(SIZE)], None),
    "pixart": (pixart_pipeline, ["--prompt", "a cat", "--guidance-scale", "3"], "ddim"),
    "dit": (dit_pipeline, ["--class-label", "3", "--guidance-scale", "3"], None),
}
SAMPLING = ["--steps", "2", "--uq-every", "1", "--mc-samples", "2", "--num-images", "2", "--batch-size", "2",
            "--decode-samples", "2", "--no-progress"]


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("photos")
    pixels = np.random.default_rng(0).integers(0, 256, (3, SIZE, SIZE, 3), dtype=np.uint8)
    for i, picture in enumerate(pixels):
        Image.fromarray(picture).save(folder / f"{i}.png")
    return folder


@pytest.mark.parametrize("name", list(PIPELINES))
def test_fit_and_sample_a_pipeline_folder(name, images, tmp_path, capsys):
    make, options, sampler = PIPELINES[name]
    pipe = with_tokenizers(make(), tmp_path / "tokenizers")
    pipe.save_pretrained(tmp_path / "model")
    pairs = dict(zip(options[::2], options[1::2]))
    fit_options = [x for flag, value in pairs.items() if flag not in ("--negative-prompt", "--guidance-scale") for x in (flag, value)]
    code, out, err = run(
        ["fit", "--model", tmp_path / "model", "--data", images, "--out", tmp_path / "post.safetensors",
         "--batch-size", "2", "--no-progress", *fit_options],
        capsys,
    )
    assert code == 0, err
    sampled = ["sample", "--model", tmp_path / "model", "--posterior", tmp_path / "post.safetensors", *options, *SAMPLING]
    if sampler:  # multistep: the recurrence options refuse it by name (the default preset runs it, below)
        code, _, err = run([*sampled, "--out", tmp_path / "refused"], capsys)
        assert code == 2 and "is a multistep scheduler" in err and "--sampler ddim" in err
        assert not (tmp_path / "refused").exists()
        sampled += ["--sampler", sampler]
    code, out, err = run([*sampled, "--out", tmp_path / "run"], capsys)
    assert code == 0, err
    run_dir = tmp_path / "run"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["settings"]["pipeline"] == type(pipe).__name__
    assert sorted(p.name for p in (run_dir / "samples").iterdir()) == ["00000.png", "00001.png"]
    tensors = load_file(run_dir / "tensors.safetensors")
    assert tensors["images"].shape == tensors["variance"].shape == (2, 3, SIZE, SIZE)
    assert tensors["latent_variance"].shape[0] == 2 and tensors["latent_variance"].min() >= 0
    variance = tensors["variance"]
    assert bool(torch.isfinite(variance).all()) and variance.min() >= 0 and variance.sum() > 0


# name: (pipeline, the estimator options): SDXL with the recurrence (its Euler is affine); SD 1.5 and
# PixArt-Σ with the default preset, trajectory Monte Carlo, which runs their multistep schedulers
STOCK_RUNS = {
    "sdxl-euler-recurrence": (sdxl_pipeline, ["--uq-every", "1", "--mc-samples", "2"]),
    "sd15-pndm-default-preset": (sd15_pipeline, ["--samples", "2"]),
    "pixart-dpm-solver-default-preset": (pixart_pipeline, ["--samples", "2"]),
}


@pytest.mark.parametrize("name", list(STOCK_RUNS))
def test_the_command_lines_images_are_the_stock_pipelines(name, tmp_path, capsys):
    """Each pipeline with its own scheduler (no --sampler: nothing swapped): the run's images are the stock
    call's with the same seed, and the latent moments the pixel maps come from are kept."""
    make, estimator = STOCK_RUNS[name]
    pipe = with_tokenizers(make(), tmp_path / "tokenizers")
    pipe.save_pretrained(tmp_path / "model")
    scheduler = type(pipe.scheduler).__name__
    from bayesdiff_ext import BayesDiffPipeline
    from bayesdiff_ext.pipelines import fit_pipeline_posterior

    posterior = fit_pipeline_posterior(pipe, torch.rand(2, 3, SIZE, SIZE) * 2 - 1, progress=False)
    posterior.save(tmp_path / "post.safetensors")
    code, _, err = run(
        ["sample", "--model", tmp_path / "model", "--posterior", tmp_path / "post.safetensors", "--prompt", "a cat",
         "--guidance-scale", "3", "--steps", "2", "--num-images", "2", "--batch-size", "2", "--decode-samples", "2",
         "--no-progress", *estimator, "--out", tmp_path / "run"],
        capsys,
    )
    assert code == 0, err
    assert f"sampling 2 images: {scheduler}, 2 steps" in err and "scheduler changed" not in err
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["settings"]["sampler"] is None and summary["settings"]["scheduler_changes"] == {}
    assert summary["settings"]["sampler_settings"]["scheduler"] == scheduler
    assert summary["settings"]["estimator"] == ("recurrence" if "--uq-every" in estimator else "trajectories")
    stock = pipe(
        prompt=["a cat"] * 2, guidance_scale=3.0, num_inference_steps=2, output_type="pt",
        generator=image_generators(0, range(2)),  # the command line's rule: image k from (seed, k)
        **BayesDiffPipeline.from_pipe(pipe, posterior).command_line_arguments(),
    ).images
    tensors = load_file(tmp_path / "run" / "tensors.safetensors")
    assert torch.equal(tensors["images"], stock * 2 - 1)
    assert tensors["latent_mean"].shape == tensors["latent_variance"].shape == (2, 4, 8, 8)  # the 8×8 latents
    latent_variance = tensors["latent_variance"]
    assert bool(torch.isfinite(latent_variance).all()) and latent_variance.min() >= 0 and latent_variance.sum() > 0
    assert summary["latent_moments"]["latent_variance"] == [2, 4, 8, 8]


def test_pipeline_options_name_what_they_apply_to(tmp_path, capsys):
    pipe = dit_pipeline()
    pipe.save_pretrained(tmp_path / "dit")
    code, _, err = run(["fit", "--model", tmp_path / "dit", "--data", tmp_path, "--prompt", "a cat"], capsys)
    assert code == 2 and "class-conditional: pass --class-label" in err
    code, _, err = run(
        ["sample", "--model", tmp_path / "dit", "--posterior", tmp_path / "p.safetensors", "--method", "mc-dropout"],
        capsys,
    )
    assert code == 2 and "--method mc-dropout takes unconditional UNet models" in err
