"""Long runs survive being stopped: SIGKILL loses at most the batch in flight and --resume finishes the
run bit for bit; SIGINT/SIGTERM exit 130/143 naming the resume command; a second run into the same
--out is refused while the first is alive, and a killed run's lock is taken over."""

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from bayesdiff_ext import cli

DEMO = ["demo", "--num-images", "48", "--batch-size", "8", "--steps", "4", "--no-progress"]
NUM_BATCHES = 6
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def kept_batches(out: Path) -> list[str]:
    """The finished batches: a batch being written sits under a hidden temporary name until it is whole,
    and a stop then removes it (a test that counted it raced the write)."""
    return sorted(p.name for p in Path(f"{out}.work/batches").glob("*.safetensors"))


def wait_for(condition, what: str, timeout: float = 600.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout:.0f} s for {what}")
        time.sleep(0.02)


def assert_same_tensors(out: Path, reference: Path) -> None:
    ours, expected = load_file(out / "tensors.safetensors"), load_file(reference / "tensors.safetensors")
    assert ours.keys() == expected.keys()
    for name in expected:
        assert torch.equal(ours[name], expected[name]), name


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted") / "run"
    assert cli.main([*DEMO, "--out", str(out)]) == 0
    assert not Path(f"{out}.work").exists()  # removed once the output is written
    return out


def start_run(out: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "bayesdiff_ext", *DEMO, "--out", str(out)],
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def test_a_sigkilled_run_resumes_to_the_same_tensors(uninterrupted, tmp_path, capsys):
    out = tmp_path / "run"
    run = start_run(out)
    wait_for(lambda: kept_batches(out) or run.poll() is not None, "the first kept batch")
    run.kill()
    run.communicate()
    kept = kept_batches(out)
    assert run.returncode == -signal.SIGKILL and 1 <= len(kept) < NUM_BATCHES, (run.returncode, kept)
    assert not out.exists()
    assert cli.main([*DEMO, "--out", str(out), "--resume"]) == 0
    err = capsys.readouterr().err
    assert f"was killed (pid {run.pid} on" in err  # its lock, found stale and taken over
    assert "bayesdiff: resuming:" in err
    assert_same_tensors(out, uninterrupted)
    assert not Path(f"{out}.work").exists()


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_stops_the_run_cleanly_and_it_resumes(uninterrupted, tmp_path, capsys, signum, code):
    out = tmp_path / "run"

    def interrupt_after_the_first_batch():
        wait_for(lambda: kept_batches(out), "the first kept batch")
        os.kill(os.getpid(), signum)

    threading.Thread(target=interrupt_after_the_first_batch, daemon=True).start()
    assert cli.main([*DEMO, "--out", str(out)]) == code
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-2] == f"bayesdiff: stopped ({signal.Signals(signum).name})"
    assert err[-1].endswith(f"to continue: bayesdiff {' '.join(DEMO)} --out {out} --resume"), err[-1]
    assert not out.exists() and 1 <= len(kept_batches(out)) < NUM_BATCHES
    assert cli.main([*DEMO, "--out", str(out), "--resume"]) == 0
    assert_same_tensors(out, uninterrupted)


def test_hessian_free_probes_are_drawn_per_image(tmp_path, capsys):
    """HFL's random probes come from generators the sampler calls share; the run seeds one per image
    from (seed, index), so a resumed run draws the probes the uninterrupted one drew."""
    hfl = ["demo", "--method", "hfl", "--probes", "4", "--num-images", "12", "--batch-size", "4", "--steps", "3", "--no-progress"]
    assert cli.main([*hfl, "--out", str(tmp_path / "whole")]) == 0
    out = tmp_path / "run"

    def interrupt_after_the_first_batch():
        wait_for(lambda: kept_batches(out), "the first kept batch")
        os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=interrupt_after_the_first_batch, daemon=True).start()
    assert cli.main([*hfl, "--out", str(out)]) == 130
    assert cli.main([*hfl, "--out", str(out), "--resume"]) == 0
    capsys.readouterr()
    assert_same_tensors(out, tmp_path / "whole")


def test_a_second_run_into_the_same_out_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    first = start_run(out)
    try:
        lock = Path(f"{out}.work/lock")
        wait_for(lambda: lock.is_file() and lock.stat().st_size > 0 or first.poll() is not None, "the first run's lock")
        assert cli.main([*DEMO, "--out", str(out)]) == 2  # refused: bad input
        err = capsys.readouterr().err
        assert f"another run is writing this output (pid {first.pid} on" in err
        assert cli.main([*DEMO, "--out", str(out), "--resume"]) == 2  # not while it is alive either
        assert first.poll() is None, "the first run ended before the second started: nothing was tested"
    finally:
        first.kill()
        first.communicate()


def test_a_resume_with_other_settings_is_refused_naming_the_setting(tmp_path, capsys):
    out = tmp_path / "run"
    settings = {"command": "demo", "--steps": 4}
    from bayesdiff_ext.io.work_folder import WorkFolder

    WorkFolder.open(out, settings, resume=False, command="first").close()  # no batch: nothing kept
    assert not Path(f"{out}.work").exists()
    work = WorkFolder.open(out, settings, resume=False, command="first")
    work.save_batch(0, {"images": torch.zeros(2, 1, 4, 4)}, {"settings": {}, "timings": {}})
    work.close()
    with pytest.raises(FileExistsError, match="pass --resume to continue it"):
        WorkFolder.open(out, settings, resume=False, command="second")
    with pytest.raises(ValueError, match='--steps was 4 in the interrupted run and is 6 now'):
        WorkFolder.open(out, {**settings, "--steps": 6}, resume=True, command="second")
    resumed = WorkFolder.open(out, settings, resume=True, command="second")
    assert resumed.resumed and resumed.finished() == [0]
    tensors, meta = resumed.load_batch(0)
    assert torch.equal(tensors["images"], torch.zeros(2, 1, 4, 4)) and meta == {"settings": {}, "timings": {}}
    resumed.remove()
    assert not Path(f"{out}.work").exists()
