"""Bad input through the command line: exit status 2, one line on stderr, nothing written.

The same checks as the Python API (bayesdiff_ext.validation, the posterior file reader, the
scheduler rule), on the tiny pipeline folder of test_cli.py.
"""

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler
from safetensors import safe_open
from safetensors.torch import save_file
from test_cli import FAST_SAMPLING, assert_one_line_error, check_run_folder, run, save_pipeline, tiny
from tiny_models import tiny_unet

from bayesdiff_ext.posterior.serialization import METADATA_KEY

__all__ = ["tiny"]  # the fixture, imported for these tests

MARKER = "unpickled-marker"


class _RunsCodeWhenUnpickled:
    """Unpickling this creates a file: proof that a loader ran code from the file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def _tensor_file(tmp_path, data, name="data.pt"):
    path = tmp_path / name
    if name.endswith(".npy"):
        np.save(path, data, allow_pickle=True)
    else:
        torch.save(data, path)
    return path


def _unet_weights_folder(tmp_path):
    folder = tmp_path / "no_weights"
    save_pipeline(folder, tiny_unet(0, channels=1))
    (folder / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    return folder


DATA = [
    pytest.param(
        lambda tmp: _tensor_file(tmp, torch.rand(4, 1, 8, 8) * 255),
        r"range over \[.*, 25.\]; they must be at model scale \[-1, 1\]",
        id="floats in [0, 255]",
    ),
    pytest.param(
        lambda tmp: _tensor_file(tmp, torch.rand(4, 1, 8, 8)),
        r"never below 0: that looks like \[0, 1\] image data",
        id="floats in [0, 1]",
    ),
    pytest.param(
        lambda tmp: _tensor_file(tmp, torch.zeros(4, 1, 8, 8).index_fill_(0, torch.tensor([2]), float("nan"))),
        "must be finite, but holds 64 NaN/Inf",
        id="a NaN pixel",
    ),
    pytest.param(
        lambda tmp: _tensor_file(tmp, torch.arange(256).reshape(4, 1, 8, 8) + 44),
        r"range over \[44, 299\]; expected 0..255",
        id="integers beyond 255",
    ),
    pytest.param(
        lambda tmp: _tensor_file(tmp, torch.zeros(4, 3, 8, 8)),
        r"the model needs \(N, 1, 8, 8\)",
        id="3 channels for a 1-channel model",
    ),
    pytest.param(
        lambda tmp: _tensor_file(tmp, torch.zeros(4, 1, 16, 16)),
        r"have shape \(4, 1, 16, 16\); the model needs \(N, 1, 8, 8\)",
        id="16x16 for an 8x8 model",
    ),
    pytest.param(
        lambda tmp: _tensor_file(tmp, torch.zeros(0, 1, 8, 8)),
        "with N >= 1",
        id="no images",
    ),
    pytest.param(
        lambda tmp: _tensor_file(tmp, _RunsCodeWhenUnpickled(tmp / MARKER)),
        "cannot read .* as a plain tensor file",
        id="a pickled object",
    ),
    pytest.param(
        lambda tmp: _tensor_file(tmp, np.array([{"a": 1}], dtype=object), "data.npy"),
        "Object arrays cannot be loaded when allow_pickle=False",
        id="an object .npy",
    ),
    pytest.param(
        lambda tmp: _tensor_file(tmp, {"images": torch.zeros(4, 1, 8, 8)}),
        "holds a dict, expected a single tensor",
        id="a dict of tensors",
    ),
]


@pytest.mark.parametrize("make, pattern", DATA)
def test_fit_refuses_bad_data(tiny, tmp_path, capsys, make, pattern):
    out = tmp_path / "p.safetensors"
    argv = ["fit", "--model", tiny / "model", "--data", make(tmp_path), "--out", out, "--no-progress"]
    code, _, err = run(argv, capsys)
    assert_one_line_error(code, err)
    assert re.search(pattern, err), err
    assert not out.exists() and not (tmp_path / MARKER).exists()


@pytest.mark.parametrize(
    "options, fragment",
    [(["--device", "nonsense"], "--device nonsense"), (["--timesteps-per-image", "0"], "must be >= 1")],
)
def test_fit_refuses_bad_options(tiny, tmp_path, capsys, options, fragment):
    out = tmp_path / "p.safetensors"
    argv = ["fit", "--model", tiny / "model", "--data", tiny / "data.pt", "--out", out, "--no-progress"]
    code, _, err = run([*argv, *options], capsys)
    assert_one_line_error(code, err, fragment)
    assert not out.exists()


def test_a_model_folder_without_weights(tmp_path, capsys):
    out = tmp_path / "p.safetensors"
    argv = ["fit", "--model", _unet_weights_folder(tmp_path), "--data", tmp_path, "--out", out]
    code, _, err = run(argv, capsys)
    assert_one_line_error(code, err, "has a config.json but no weights (diffusion_pytorch_model.safetensors)")


def _posterior_with(tiny, tmp_path, change):
    with safe_open(str(tiny / "posterior.safetensors"), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = json.loads(f.metadata()[METADATA_KEY])
    change(meta)
    save_file(tensors, str(tmp_path / "changed.safetensors"), metadata={METADATA_KEY: json.dumps(meta)})
    return tmp_path / "changed.safetensors"


def _cut(tiny, tmp_path):
    data = (tiny / "posterior.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) - 10])
    return tmp_path / "cut.safetensors"


POSTERIORS = [
    pytest.param(
        lambda tiny, tmp: tmp / "nope.safetensors",
        "does not exist (make one with `bayesdiff fit`)",
        id="missing",
    ),
    pytest.param(
        lambda tiny, tmp: tmp,
        "is a folder; give the .safetensors file",
        id="a folder",
    ),
    pytest.param(
        _cut,
        "is not a posterior file: safetensors cannot read it",
        id="truncated",
    ),
    pytest.param(
        lambda tiny, tmp: tiny / "model" / "unet" / "diffusion_pytorch_model.safetensors",
        "is not a saved bayesdiff_ext posterior",
        id="model weights",
    ),
    pytest.param(
        lambda tiny, tmp: _posterior_with(tiny, tmp, lambda m: m.update(format_version=7)),
        "has posterior format version 7, but this bayesdiff_ext",
        id="a newer format",
    ),
    pytest.param(
        lambda tiny, tmp: _posterior_with(tiny, tmp, lambda m: m.pop("structure")),
        "is a damaged posterior file: KeyError 'structure'",
        id="damaged metadata",
    ),
]


@pytest.mark.parametrize("make, fragment", POSTERIORS)
def test_sample_refuses_bad_posterior_files(tiny, tmp_path, capsys, make, fragment):
    out = tmp_path / "out"
    argv = ["sample", "--model", tiny / "model", "--posterior", make(tiny, tmp_path), "--out", out]
    code, _, err = run([*argv, *FAST_SAMPLING], capsys)
    assert_one_line_error(code, err, fragment)
    assert not out.exists()


@pytest.mark.parametrize(
    "options, fragment",
    [
        (["--steps", "500"], "cannot be larger than `self.config.train_timesteps`: 100"),
        (["--eta", "inf"], "argument --eta: must be a finite number >= 0, got inf"),
        (["--eta", "nan"], "argument --eta: must be a finite number >= 0, got nan"),
        (["--eta", "-1"], "argument --eta: must be a finite number >= 0, got -1"),
        (["--mc-samples", "0"], "argument --mc-samples: must be >= 1"),
        (["--batch-size", "0"], "argument --batch-size: must be >= 1"),
        (["--num-images", "2.5"], "argument --num-images: expected an integer"),
    ],
)
def test_sample_refuses_bad_numbers(tiny, tmp_path, capsys, options, fragment):
    out = tmp_path / "out"
    argv = ["sample", "--model", tiny / "model", "--posterior", tiny / "posterior.safetensors", "--out", out]
    code, _, err = run([*argv, "--num-images", "2", *FAST_SAMPLING, *options], capsys)
    assert_one_line_error(code, err, fragment)
    assert not out.exists()


def test_a_clipping_scheduler_is_refused_or_changed_with_the_flag(tiny, tmp_path, capsys):
    stock = tmp_path / "stock"
    stock.mkdir()
    (stock / "unet").symlink_to(tiny / "model" / "unet")
    DDPMScheduler(num_train_timesteps=100).save_pretrained(stock / "scheduler")  # diffusers' clip_sample=True
    argv = ["sample", "--model", stock, "--posterior", tiny / "posterior.safetensors", "--num-images", "2"]
    code, _, err = run([*argv, "--out", tmp_path / "refused", *FAST_SAMPLING], capsys)
    assert_one_line_error(code, err, "DDPMScheduler has clip_sample=True", "pass --no-clipping")
    assert not (tmp_path / "refused").exists()

    code, _, err = run([*argv, "--out", tmp_path / "run", "--no-clipping", *FAST_SAMPLING], capsys)
    assert code == 0, err
    said = [line for line in err.splitlines() if "the model's scheduler changed" in line]
    assert said == [
        "the model's scheduler changed: DDPMScheduler -> DDIMScheduler (--sampler ddim; its noise schedule is "
        "kept); "
        "clip_sample True -> False (--no-clipping)"
    ]
    summary = check_run_folder(tmp_path / "run", 2)
    assert summary["settings"]["scheduler_changes"] == {
        "class": ["DDPMScheduler", "DDIMScheduler"],
        "clip_sample": [True, False],
    }
    assert summary["settings"]["scheduler_config"]["clip_sample"] is False


def test_an_unchanged_scheduler_is_not_reported(tiny, tmp_path, capsys):
    argv = ["sample", "--model", tiny / "model", "--posterior", tiny / "posterior.safetensors"]
    options = ["--num-images", "2", "--sampler", "ddpm", "--out", tmp_path / "run", *FAST_SAMPLING]
    code, _, err = run([*argv, *options], capsys)
    assert code == 0 and "scheduler changed" not in err, err
    assert check_run_folder(tmp_path / "run", 2)["settings"]["scheduler_changes"] == {}


def test_uint8_data_is_converted_by_the_stated_rule(tiny, tmp_path, capsys):
    images = (torch.rand(6, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 255).round()
    torch.save(images.to(torch.uint8), tmp_path / "uint8.pt")
    torch.save(images / 127.5 - 1, tmp_path / "scaled.pt")
    saved = {}
    for name in ("uint8", "scaled"):
        out = tmp_path / f"{name}.safetensors"
        data = tmp_path / f"{name}.pt"
        argv = ["fit", "--model", tiny / "model", "--data", data, "--out", out, "--no-progress"]
        code, _, err = run(argv, capsys)
        assert code == 0, err
        with safe_open(str(out), framework="pt") as f:
            saved[name] = json.loads(f.metadata()[METADATA_KEY])["sigma_noise"]
    assert saved["uint8"] == saved["scaled"]
