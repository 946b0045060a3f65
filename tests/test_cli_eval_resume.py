"""`bayesdiff eval` survives being stopped: its generation keeps every finished batch beside --out, a
SIGKILLed run resumes to the cache an uninterrupted run writes (every array equal), SIGINT/SIGTERM
exit 130/143 naming the resume command."""

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from test_cli_eval import _run_plain, folder  # noqa: F401  (the tiny model folder fixture)
from test_cli_resume import kept_batches, wait_for

from bayesdiff_ext.evaluation.cache import CACHE_NAME

TINY_EVAL = [
    "--num-images", "24", "--batch-size", "4", "--steps", "3", "--costly-images", "12", "--mc-samples", "2",
    "--uq-every", "2", "--weight-samples", "2", "--drift-last-steps", "3", "--hfl-probes", "4",
    "--random-seeds", "2", "--no-progress",
]  # fmt: skip
NUM_BATCHES = 6
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def eval_argv(folder: Path, out: Path) -> list[str]:
    return ["eval", "--model", str(folder / "model"), "--data", str(folder / "data.pt"), *TINY_EVAL, "--out", str(out)]


def assert_same_cache(out: Path, reference: Path) -> None:
    """Every generated array of the two caches is equal (images, scores, maps, traces, sweep); only
    the run's description (its timings) differs."""
    with np.load(out / CACHE_NAME, allow_pickle=False) as ours, np.load(reference / CACHE_NAME, allow_pickle=False) as expected:
        assert set(ours.files) == set(expected.files)
        arrays = [name for name in expected.files if name != "meta"]
        assert {"images", "score__paper", "score__hfl", "map__paper", "sweep__scores"} <= set(arrays)
        for name in arrays:
            assert ours[name].dtype == expected[name].dtype, name
            assert np.array_equal(ours[name], expected[name], equal_nan=True), name


@pytest.fixture(scope="module")
def uninterrupted(folder, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("eval_whole") / "out"
    code, _, err = _run_plain(eval_argv(folder, out))
    assert code == 0, err
    assert not Path(f"{out}.work").exists()  # removed once the cache is written
    return out


def test_a_sigkilled_eval_resumes_to_the_same_cache(folder, uninterrupted, tmp_path):  # noqa: F811
    out = tmp_path / "out"
    run = subprocess.Popen(
        [sys.executable, "-m", "bayesdiff_ext", *eval_argv(folder, out)],
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    wait_for(lambda: kept_batches(out) or run.poll() is not None, "the first kept batch")
    run.kill()
    run.communicate()
    kept = kept_batches(out)
    assert run.returncode == -signal.SIGKILL and 1 <= len(kept) < NUM_BATCHES, (run.returncode, kept)
    assert not (out / CACHE_NAME).exists()
    code, _, err = _run_plain([*eval_argv(folder, out), "--resume"])
    assert code == 0, err
    assert f"was killed (pid {run.pid} on" in err and "bayesdiff: resuming:" in err
    assert_same_cache(out, uninterrupted)
    assert not Path(f"{out}.work").exists()


def test_sigterm_stops_eval_with_143_and_the_resume_line(folder, uninterrupted, tmp_path):  # noqa: F811
    out = tmp_path / "out"

    def terminate_after_the_first_batch():
        wait_for(lambda: kept_batches(out), "the first kept batch")
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=terminate_after_the_first_batch, daemon=True).start()
    code, _, err = _run_plain(eval_argv(folder, out))
    assert code == 143
    lines = err.strip().splitlines()
    assert lines[-2] == "bayesdiff: stopped (SIGTERM)"
    assert lines[-1].endswith(f"to continue: bayesdiff {' '.join(eval_argv(folder, out))} --resume"), lines[-1]
    assert 1 <= len(kept_batches(out)) < NUM_BATCHES
    code, _, err = _run_plain([*eval_argv(folder, out), "--steps", "4", "--resume"])
    assert code == 2 and "cannot resume: --steps was 3 in the interrupted run and is 4 now" in err
    code, _, err = _run_plain([*eval_argv(folder, out), "--resume"])
    assert code == 0, err
    assert_same_cache(out, uninterrupted)


def test_an_eval_into_an_out_another_run_holds_is_refused(folder, tmp_path):  # noqa: F811
    from bayesdiff_ext.io.work_folder import WorkFolder

    out = tmp_path / "out"
    holder = WorkFolder.open(out, {"command": "eval"}, resume=False, command="bayesdiff eval (the first run)")
    try:
        code, _, err = _run_plain(eval_argv(folder, out))
        assert code == 2 and f"another run is writing this output (pid {os.getpid()} on" in err, err
        assert not out.exists()
    finally:
        holder.close()
