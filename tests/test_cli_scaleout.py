"""``torchrun --nproc-per-node 2 -m bayesdiff_ext ...`` on gloo: the same posterior file and the same
output folder as one process; a process that fails stops both, leaves no output, and the run resumes."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import cli_failing_process
from test_cli_eval import _run_plain, folder  # noqa: F401  (the tiny model folder fixture)
from test_cli_eval_resume import assert_same_cache, eval_argv

from bayesdiff_ext import LastLayerLaplace, cli, digits

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
DEMO = ["demo", "--num-images", "10", "--batch-size", "2", "--steps", "3", "--no-progress"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "BAYESDIFF_TIMEOUT_S": "300"}

pytestmark = pytest.mark.slow  # each launch starts two interpreters (~10-30 s on 2 shared cores)


def launch(argv) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in argv], capture_output=True, text=True, env=ENV, timeout=900)


def assert_same_output(folder: Path, reference: Path) -> None:
    ours, expected = load_file(folder / "tensors.safetensors"), load_file(reference / "tensors.safetensors")
    assert ours.keys() == expected.keys()
    for name in expected:
        assert torch.equal(ours[name], expected[name]), name
    assert (folder / "scores.csv").read_bytes() == (reference / "scores.csv").read_bytes()


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    out = tmp_path_factory.mktemp("one") / "run"
    assert cli.main([*DEMO, "--out", str(out)]) == 0
    return out


def test_torchrun_sample_writes_the_single_process_output(one_process, tmp_path):
    out = tmp_path / "run"
    result = launch([*TORCHRUN, "-m", "bayesdiff_ext", *DEMO, "--out", out])
    assert result.returncode == 0, result.stderr
    assert_same_output(out, one_process)
    assert not Path(f"{out}.work").exists()
    assert result.stdout.strip() == str(out)  # process 0 alone reports


def test_torchrun_fit_saves_the_single_process_posterior(tmp_path):
    np.save(tmp_path / "images.npy", digits.load_digits_images(resolution=16)[0][:30].numpy())
    fit = ["fit", "--model", digits.bundled_dir(), "--data", tmp_path / "images.npy", "--batch-size", "4", "--no-progress"]
    assert cli.main([str(a) for a in [*fit, "--out", tmp_path / "one.safetensors"]]) == 0
    result = launch([*TORCHRUN, "-m", "bayesdiff_ext", *fit, "--out", tmp_path / "two.safetensors"])
    assert result.returncode == 0, result.stderr
    unet = digits.load_bundled_unet()
    one, two = (LastLayerLaplace.load(tmp_path / f"{n}.safetensors", unet) for n in ("one", "two"))
    assert two.fit_stats == one.fit_stats  # 30 images, each counted once
    assert two.sigma_noise == pytest.approx(one.sigma_noise, rel=1e-12)
    assert two.prior_precision == pytest.approx(one.prior_precision, rel=1e-10)
    for name, tensor in one.posterior.tensors().items():
        torch.testing.assert_close(two.posterior.tensors()[name], tensor, rtol=1e-12, atol=0)


def test_torchrun_eval_writes_the_single_process_cache(folder, tmp_path):  # noqa: F811
    """Two processes share the generation's batches (process r takes batches r, r + 2, ...); process 0
    gathers them and writes the cache and the report: the same images and scores as one process."""
    code, _, err = _run_plain(eval_argv(folder, tmp_path / "one"))
    assert code == 0, err
    result = launch([*TORCHRUN, "-m", "bayesdiff_ext", *eval_argv(folder, tmp_path / "two")])
    assert result.returncode == 0, result.stderr
    assert_same_cache(tmp_path / "two", tmp_path / "one")
    assert result.stdout.strip().splitlines()[-1] == str(tmp_path / "two" / "EVALUATION.md")  # process 0 reports
    assert not Path(f"{tmp_path / 'two'}.work").exists()


def test_a_failing_process_stops_both_leaves_no_output_and_the_run_resumes(one_process, tmp_path):
    out = tmp_path / "run"
    result = launch([*TORCHRUN, Path(cli_failing_process.__file__), *DEMO, "--out", out])
    assert result.returncode != 0
    message = cli_failing_process.MESSAGE
    assert f"bayesdiff: error (process 1 of 2): {message}" in result.stderr
    assert f"bayesdiff: error (process 0 of 2): process 1 of 2 failed: RuntimeError: {message}" in result.stderr
    assert not out.exists()
    kept = sorted(p.name for p in Path(f"{out}.work/batches").iterdir())
    assert kept == ["000000.safetensors", "000001.safetensors"]  # the first round, before process 1 failed
    assert "--resume" in result.stderr
    assert cli.main([*DEMO, "--out", str(out), "--resume"]) == 0
    assert_same_output(out, one_process)
