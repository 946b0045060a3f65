"""The bundled photo-crops model: its data, its assets, and its posterior reproduced by `bayesdiff fit`."""

import json

import pytest
import torch

from bayesdiff_ext import photos


def test_crops_are_rgb_in_range_with_classes_from_the_photo_and_quadrant():
    x, y = photos.load_photo_crops(num_images=300, resolution=16, seed=3)
    assert x.shape == (300, 3, 16, 16) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1
    assert y.min() >= 0 and y.max() < photos.NUM_CLASSES and len(torch.unique(y)) == photos.NUM_CLASSES
    again, labels = photos.load_photo_crops(num_images=300, resolution=16, seed=3)
    assert torch.equal(again, x) and torch.equal(labels, y)
    assert not torch.equal(photos.load_photo_crops(num_images=300, resolution=16, seed=4)[0], x)
    source = photos.load_photos()
    assert [tuple(p.shape) for p in source] == [(3, 107, 160), (3, 107, 160)]
    # Synthetic photos whose pixels hold their photo and position: each crop's class is the
    # photo and the quadrant its centre lies in.
    rows, cols = torch.meshgrid(torch.arange(20.0), torch.arange(30.0), indexing="ij")
    position = (rows * 100 + cols).expand(3, 20, 30)
    crops, labels = photos.random_crops([position, position + 10000], 200, 4, torch.Generator().manual_seed(0))
    for crop, label in zip(crops, labels.tolist()):
        corner = int(crop[0, 0, 0])
        photo, top, left = corner // 10000, corner % 10000 // 100, corner % 100
        assert torch.equal(crop, position[:, top : top + 4, left : left + 4] + 10000 * photo)
        assert label == photo * 4 + ((top + 2) * 2 // 20) * 2 + (left + 2) * 2 // 30
    with pytest.raises(ValueError, match="resolution"):
        photos.random_crops(source, 1, 200, torch.Generator())


def test_bundled_assets_load_and_stay_small():
    unet = photos.load_bundled_unet()
    assert unet.config.in_channels == unet.config.out_channels == 3 and unet.config.sample_size == 16
    assert photos.load_bundled_scheduler().config.prediction_type == "epsilon"
    classifier = photos.load_bundled_classifier()
    logits = classifier(torch.zeros(2, 3, 16, 16))
    assert logits.shape == (2, photos.NUM_CLASSES) and classifier.features(torch.zeros(1, 3, 16, 16)).shape == (1, 128)
    size = sum(p.stat().st_size for p in photos.bundled_dir().rglob("*") if p.is_file())
    assert size < 5e6
    log = json.loads((photos.bundled_dir() / "training_log.json").read_text())
    assert log["unet"]["wall_time_s"] + log["classifier"]["wall_time_s"] < 20 * 60


def test_the_bundled_posterior_is_what_bayesdiff_fit_makes(tmp_path):
    from bayesdiff_ext import LastLayerLaplace
    from bayesdiff_ext.cli import main

    out = tmp_path / "posterior.safetensors"
    root = photos.bundled_dir()
    assert main(["fit", "--model", str(root), "--data", "builtin:photos", "--out", str(out), "--no-progress"]) == 0
    unet = photos.load_bundled_unet()
    refit, bundled = LastLayerLaplace.load(out, unet), LastLayerLaplace.load(root / "posterior_diag.safetensors", unet)
    assert refit.sigma_noise == pytest.approx(bundled.sigma_noise, rel=1e-5)
    assert refit.prior_precision == pytest.approx(bundled.prior_precision, rel=1e-4)
