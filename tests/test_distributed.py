"""Two processes on gloo give what one process gives: the fitted posterior (to float64 round-off),
the sampled images, maps and scores (bit for bit); a failing process stops the other with its error."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import distributed_workers as workers
from bayesdiff_ext.distributed import (
    RankFailed,
    gather_by_index,
    global_batches,
    one_process,
    rank_and_world,
    shard_batches,
    shard_indices,
)

WORLD = 2
#: the tests that read what the two processes of `ranks` did (~40 s on 2 shared cores, once)
two_processes = pytest.mark.slow


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """Two fresh interpreters (not multiprocessing: its spawn re-runs an unguarded pytest script)."""
    folder = tmp_path_factory.mktemp("two_processes")
    tests = Path(__file__).parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tests), os.environ.get("PYTHONPATH", "")])}
    code = "import sys, distributed_workers as w; w.work(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])"
    processes = [
        subprocess.Popen([sys.executable, "-c", code, str(r), str(WORLD), str(folder)], env=env, stderr=subprocess.PIPE)
        for r in range(WORLD)
    ]
    errors = [p.communicate(timeout=300)[1].decode() for p in processes]
    assert [p.returncode for p in processes] == [0] * WORLD, "\n".join(errors)
    return [torch.load(folder / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


@pytest.fixture(scope="module")
def unet():
    return workers.model()


def _assert_same_fit(ours: dict, expected: dict, rtol: float) -> None:
    assert ours["stats"] == pytest.approx(expected["stats"], rel=rtol)
    assert ours["stats"]["n_images"] == expected["stats"]["n_images"]
    assert ours["sigma"] == pytest.approx(expected["sigma"], rel=rtol)
    assert ours["delta"] == pytest.approx(expected["delta"], rel=rtol)
    assert ours["tensors"].keys() == expected["tensors"].keys()
    for name, tensor in expected["tensors"].items():
        torch.testing.assert_close(ours["tensors"][name], tensor, rtol=rtol, atol=rtol * float(tensor.abs().max()))


@two_processes
@pytest.mark.parametrize("structure, curvature", workers.FITS)
def test_every_process_holds_the_single_process_posterior(ranks, unet, structure, curvature):
    """Same batches, per-image draws, float64 sums over the shards: float64 round-off; kron with the
    empirical Fisher sums in laplace-torch at φ's precision (float32)."""
    expected = workers.summary(workers.fit(unet, structure, curvature, workers.images()))
    rtol = 1e-6 if (structure, curvature) == ("kron", "ef") else 1e-12
    for rank in ranks:
        _assert_same_fit(rank["fits"][f"{structure}/{curvature}"], expected, rtol)


@two_processes
def test_the_other_inferences_statistics_are_those_of_one_process(ranks, unet):
    """VI, MCMC and head ensembles run on (A, B) of the data pass: summed like the curvature."""
    expected = workers.head_statistics(unet)
    for rank in ranks:
        for name in ("gram", "cross"):
            reference = getattr(expected, name)
            torch.testing.assert_close(rank["statistics"][name], reference, rtol=1e-12, atol=1e-12 * float(reference.abs().max()))


@two_processes
def test_a_distributed_sampler_counts_each_image_once(ranks, unet):
    """11 images over 2 processes: the sampler pads to 12 by repeating image 0; the fit counts 11
    (its batches differ from one process's, so the sums agree to float32 round-off)."""
    expected = workers.summary(workers.fit(unet, "diag", "ggn", workers.images()))
    for rank in ranks:
        assert rank["loader"]["stats"]["n_images"] == workers.NUM_FIT
        _assert_same_fit(rank["loader"], expected, 1e-5)


@two_processes
def test_sampling_by_global_index_is_bit_identical(ranks, unet):
    posterior = workers.fit(unet, "diag", "ggn", workers.images())
    parts = [workers.sample(unet, posterior, batch) for batch in global_batches(workers.NUM_SAMPLES, workers.SAMPLE_BATCH)]
    gathered = ranks[0]["samples"]
    for name in ("images", "variance", "scores"):
        assert torch.equal(gathered[name], torch.cat([p[name] for p in parts]))
    assert ranks[1]["samples"] is None


@two_processes
def test_an_accelerate_like_state_gives_the_same_shards(ranks):
    assert ranks[0]["state"] == ((0, 2), [0, 1, 4])
    assert ranks[1]["state"] == ((1, 2), [2, 3])


@two_processes
def test_inside_one_process_each_process_fits_alone_bit_for_bit(ranks, unet):
    expected = workers.summary(workers.fit(unet, "diag", "ggn", workers.images()))
    for rank in ranks:
        assert rank["alone_world"] == (0, 1)
        assert rank["alone"]["stats"] == expected["stats"]
        assert (rank["alone"]["sigma"], rank["alone"]["delta"]) == (expected["sigma"], expected["delta"])
        for name, tensor in expected["tensors"].items():
            assert torch.equal(rank["alone"]["tensors"][name], tensor), name


@two_processes
def test_a_failing_process_stops_the_other_with_its_error(ranks):
    assert ranks[1]["failure"] == ("ValueError", workers.FAILURE)
    kind, message = ranks[0]["failure"]
    assert kind == "RankFailed"
    assert message == f"process 1 of 2 failed: ValueError: {workers.FAILURE}"


def test_one_process_helpers():
    assert rank_and_world() == (0, 1)
    assert global_batches(5, 2) == [range(0, 2), range(2, 4), range(4, 5)]
    assert shard_batches(5, 2) == global_batches(5, 2)
    assert shard_indices(5, 2, workers.AccelerateLikeState(0, 1)) == [0, 1, 2, 3, 4]
    merged = gather_by_index([2, 0, 1], {"x": torch.tensor([20.0, 0.0, 10.0])})
    assert torch.equal(merged["x"], torch.tensor([0.0, 10.0, 20.0]))
    with pytest.raises(ValueError, match="overlap"):
        gather_by_index([1, 1], torch.zeros(2))
    with pytest.raises(ValueError, match="2 rows for 3 indices"):
        gather_by_index([0, 1, 2], torch.zeros(2))
    with pytest.raises(RuntimeError, match="torch.distributed is not initialised"):
        rank_and_world(workers.AccelerateLikeState(0, 2))
    with one_process():
        assert rank_and_world(workers.AccelerateLikeState(1, 2)) == (0, 1)
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        global_batches(3, 0)


def test_a_plain_dataloader_is_read_in_order_by_one_process(unet):
    """Outside a process group a DataLoader numbers its images in the order it yields them: the
    fit equals the one on the tensor."""
    loader = DataLoader(TensorDataset(workers.images()), batch_size=workers.FIT_BATCH)
    ours = workers.summary(workers.fit(unet, "diag", "ggn", loader))
    _assert_same_fit(ours, workers.summary(workers.fit(unet, "diag", "ggn", workers.images())), 1e-12)
    assert not isinstance(RankFailed("x"), ValueError)
