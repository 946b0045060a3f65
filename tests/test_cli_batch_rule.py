"""The randomness rule for the methods with random numbers of their own: HFL's probes and MC dropout's
masks come from each image's streams, so a run's maps and scores do not depend on --batch-size."""

import torch
from safetensors.torch import load_file
from test_cli import run


def _same_run_at_batch_sizes(argv, tmp_path, capsys, sizes=(2, 3)):
    written = []
    for batch in sizes:
        code, _, err = run([*argv, "--batch-size", batch, "--out", tmp_path / f"b{batch}"], capsys)
        assert code == 0, err
        written.append(load_file(tmp_path / f"b{batch}" / "tensors.safetensors"))
    first, second = written
    # float32 convolutions round differently in batches of 2 and 3 (test_cli's tolerance)
    for key in first:
        torch.testing.assert_close(second[key], first[key], rtol=1e-3, atol=1e-6, msg=key)
    return first


def test_hessian_free_probes_follow_the_image_not_the_batch(tmp_path, capsys):
    argv = ["demo", "--method", "hfl", "--probes", "2", "--num-images", "3", "--steps", "3", "--uq-every", "1",
            "--mc-samples", "2", "--no-progress"]
    first = _same_run_at_batch_sizes(argv, tmp_path, capsys)
    assert first["variance"].sum() > 0


def test_dropout_masks_follow_the_image_not_the_batch(tmp_path, capsys):
    argv = ["demo", "--method", "mc-dropout", "--passes", "2", "--num-images", "3", "--steps", "3", "--no-progress"]
    first = _same_run_at_batch_sizes(argv, tmp_path, capsys)
    assert first["variance"].sum() > 0
