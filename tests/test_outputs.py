import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from bayesdiff_ext import aggregation
from bayesdiff_ext.io import RunRecord, check_output_dir, images, outputs, timestamped_out_dir, write_run

SPECS = {"sum": {}, "max": {}, "percentile": {"q": 90.0}}


def make_record(batch=5, channels=1, size=8, rule="top_k", **rule_params) -> RunRecord:
    imgs = torch.rand(batch, channels, size, size) * 2 - 1
    var = torch.rand(batch, channels, size, size) * torch.arange(1.0, batch + 1).view(-1, 1, 1, 1)
    scores = aggregation.aggregate_many(var, SPECS)
    decision = aggregation.filter_scores(scores["sum"], rule, **(rule_params or {"k": min(2, batch)}))
    return RunRecord(imgs, var, scores, SPECS, "sum", decision, {"steps": 3}, {"sample_s": 0.5}, mean=imgs)


def read_png(path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im)


def test_folder_is_complete_and_consistent(tmp_path):
    record = make_record()
    out = write_run(tmp_path / "run", record)
    assert out == tmp_path / "run"
    assert sorted(p.name for p in out.iterdir()) == [
        "grid_sorted.png",
        "kept",
        "samples",
        "scores.csv",
        "summary.json",
        "tensors.safetensors",
        "uncertainty",
    ]
    names = [f"{i:05d}.png" for i in range(5)]
    assert sorted(p.name for p in (out / "samples").iterdir()) == names
    assert sorted(p.name for p in (out / "uncertainty").iterdir()) == names
    kept = record.decision.kept.tolist()
    assert sorted(p.name for p in (out / "kept").iterdir()) == [names[i] for i in kept]
    for i in kept:
        assert (out / "kept" / names[i]).read_bytes() == (out / "samples" / names[i]).read_bytes()

    rows = list(csv.DictReader((out / "scores.csv").open()))
    assert [int(r["index"]) for r in rows] == list(range(5))
    assert [int(r["kept"]) for r in rows] == record.decision.keep.int().tolist()
    assert [float(r["percentile"]) for r in rows] == record.scores["percentile"].tolist()

    summary = json.loads((out / "summary.json").read_text())
    assert {"scores", "aggregations", "filter", "settings", "versions", "timings", "uncertainty_maps"} <= set(
        summary
    )
    assert summary["scores"]["sum"] == record.scores["sum"].tolist()
    assert summary["aggregations"]["percentile"] == {"q": 90.0}
    assert summary["filter"]["kept"] == kept and summary["filter"]["rule"] == "top_k"
    assert summary["filter"]["num_removed"] == 2
    assert summary["settings"] == {"steps": 3}
    assert set(summary["versions"]) >= {"bayesdiff_ext", "torch", "diffusers"}
    assert summary["timings"]["sample_s"] == 0.5 and summary["timings"]["write_s"] > 0
    assert summary["per_channel_sum"] == [[s] for s in record.scores["sum"].tolist()]

    saved = load_file(str(out / "tensors.safetensors"))
    assert torch.equal(saved["variance"], record.variance) and torch.equal(saved["images"], record.images)
    assert torch.equal(saved["scores.max"], record.scores["max"])
    assert not list(tmp_path.glob(".*"))  # no staging folder left behind


def test_sample_pngs_hold_the_native_pixels_enlarged(tmp_path):
    record = make_record(batch=2, size=8)
    record.images[0, 0, 0, :3] = torch.tensor([-1.0, 0.0, 1.0])
    out = write_run(tmp_path / "run", record)
    factor = images.display_factor(8, 8)
    assert factor == 8
    png = read_png(out / "samples" / "00000.png")
    assert png.shape == (64, 64) and png.dtype == np.uint8
    assert png[0, : 3 * factor : factor].tolist() == [0, 128, 255]
    native = png[::factor, ::factor]
    assert np.array_equal(native, images.to_uint8(record.images)[0, ..., 0])
    assert np.array_equal(png, np.kron(native, np.ones((factor, factor), dtype=np.uint8)))


def test_rgb_images_are_written_as_rgb(tmp_path):
    out = write_run(tmp_path / "run", make_record(batch=3, channels=3, size=70))
    assert read_png(out / "samples" / "00002.png").shape == (70, 70, 3)  # large enough: not enlarged
    assert read_png(out / "uncertainty" / "00002.png").shape == (70, 70, 3)


def test_heatmaps_share_one_scale(tmp_path):
    record = make_record(batch=2, size=10)
    record.variance.zero_()
    record.variance[0, 0, :5] = 1.0  # 50 of the 200 pixels: the 99th percentile, and the top colour
    record.variance[0, 0, 9, 9] = 7.0  # far above the scale: saturates
    record.variance[1] = 0.5  # image 1: uniform, half the scale, not stretched to full brightness
    out = write_run(tmp_path / "run", record)
    scale = json.loads((out / "summary.json").read_text())["uncertainty_maps"]
    assert (
        scale["vmin"] == 0.0
        and scale["vmax"] == 1.0
        and scale["max"] == 7.0
        and scale["colormap"] == "inferno"
    )
    top, middle, bottom = (tuple(images.INFERNO_ANCHORS[i]) for i in (-1, 16, 0))
    first = read_png(out / "uncertainty" / "00000.png")  # 10x10 enlarged 7x
    assert tuple(first[0, 0]) == top and tuple(first[-1, -1]) == top and tuple(first[-8, 0]) == bottom
    second = read_png(out / "uncertainty" / "00001.png")
    assert tuple(second[0, 0]) == middle and (second == second[0, 0]).all()


def test_mostly_certain_runs_scale_to_the_maximum(tmp_path):
    record = make_record(batch=1, size=20)
    record.variance.zero_()
    record.variance[0, 0, 0, 0] = 2.0  # one pixel in 400: the 99th percentile is 0
    out = write_run(tmp_path / "run", record)
    assert json.loads((out / "summary.json").read_text())["uncertainty_maps"]["vmax"] == 2.0
    assert tuple(read_png(out / "uncertainty" / "00000.png")[0, 0]) == tuple(images.INFERNO_ANCHORS[-1])


def test_heatmaps_average_channels(tmp_path):
    record = make_record(batch=1, channels=3, size=70)
    record.variance.zero_()
    record.variance[0, :, 0, 0] = torch.tensor([3.0, 0.0, 0.0])  # channel mean 1: the maximum
    record.variance[0, :, 0, 1] = torch.tensor([1.0, 1.0, 1.0])  # channel mean 1 as well
    record.variance[0, :, 0, 2] = torch.tensor([1.5, 0.0, 0.0])  # channel mean 0.5
    out = write_run(tmp_path / "run", record)
    row = read_png(out / "uncertainty" / "00000.png")[0]
    top, middle = tuple(images.INFERNO_ANCHORS[-1]), tuple(images.INFERNO_ANCHORS[16])
    assert [tuple(p) for p in row[:3]] == [top, top, middle]


def test_a_run_without_variance_gets_the_bottom_colour():
    rgb = images.colorize(torch.zeros(1, 2, 2), vmax=0.0)
    assert (rgb == images.INFERNO_ANCHORS[0]).all()


def test_a_failure_mid_write_leaves_no_folder(tmp_path, monkeypatch):
    real_encode = outputs.encode_png
    calls = []

    def failing_encode(pixels):
        calls.append(1)
        if len(calls) == 4:
            raise OSError("disk full (injected)")
        return real_encode(pixels)

    monkeypatch.setattr(outputs, "encode_png", failing_encode)
    with pytest.raises(OSError, match="injected"):
        write_run(tmp_path / "run", make_record())
    assert len(calls) == 4
    assert list(tmp_path.iterdir()) == []


def test_a_failure_in_the_last_file_leaves_no_folder(tmp_path, monkeypatch):
    def failing_summary(*args, **kwargs):
        raise TypeError("not serialisable (injected)")

    monkeypatch.setattr(outputs, "_summary", failing_summary)
    with pytest.raises(TypeError, match="injected"):
        write_run(tmp_path / "deep" / "run", make_record())
    assert list((tmp_path / "deep").iterdir()) == []


def test_existing_empty_folder_is_filled(tmp_path):
    (tmp_path / "run").mkdir()
    out = write_run(tmp_path / "run", make_record())
    assert (out / "summary.json").is_file()


def test_output_dir_errors(tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x.txt").write_text("x")
    with pytest.raises(FileExistsError, match="already exists and is not empty"):
        check_output_dir(tmp_path / "full")
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match="exists and is not a folder"):
        check_output_dir(tmp_path / "file")
    with pytest.raises(NotADirectoryError, match="is a file, not a folder"):
        write_run(tmp_path / "file" / "sub" / "run", make_record())
    assert check_output_dir(tmp_path / "new" / "run") == tmp_path / "new" / "run"
    assert not (tmp_path / "new").exists()  # checking creates nothing


def test_timestamped_out_dir_never_reuses_a_folder(tmp_path):
    first = timestamped_out_dir(tmp_path)
    first.mkdir()
    second = timestamped_out_dir(tmp_path)
    assert second != first and second.parent == tmp_path and not second.exists()


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda r: setattr(r, "variance", r.variance[:, :, :4]), "variance has shape"),
        (lambda r: setattr(r, "primary", "mean"), "primary score 'mean' is not among"),
        (
            lambda r: setattr(r, "scores", {**r.scores, "max": r.scores["max"][:3]}),
            r"scores\['max'\] has shape",
        ),
        (lambda r: setattr(r, "images", r.images[0]), r"images must have shape \(B, C, H, W\)"),
    ],
)
def test_inconsistent_records_are_rejected(tmp_path, change, message):
    record = make_record()
    change(record)
    with pytest.raises(ValueError, match=message):
        write_run(tmp_path / "run", record)
    assert not (tmp_path / "run").exists()


def test_images_without_a_picture_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="C = 1 .* or 3"):
        write_run(tmp_path / "run", make_record(channels=2))
    assert list(tmp_path.iterdir()) == []
