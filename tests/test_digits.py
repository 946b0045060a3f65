"""Tests of the bundled digits model (bayesdiff_ext.digits and bayesdiff_ext/assets/digits)."""

import json
import os

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from bayesdiff_ext import digits  # noqa: E402


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="module")
def data():
    return digits.load_digits_images(16)


@pytest.fixture(scope="module")
def unet():
    return digits.load_bundled_unet()


@pytest.fixture(scope="module")
def scheduler():
    return digits.load_bundled_scheduler()


@pytest.fixture(scope="module")
def classifier():
    return digits.load_bundled_classifier()


def _ddim_sample(unet, scheduler, n, steps, seed):
    from diffusers import DDIMScheduler

    ddim = DDIMScheduler.from_config(scheduler.config)
    ddim.set_timesteps(steps)
    g = torch.Generator().manual_seed(seed)
    r = unet.config.sample_size
    x = torch.randn((n, unet.config.in_channels, r, r), generator=g)
    with torch.no_grad():
        for t in ddim.timesteps:
            x = ddim.step(unet(x, t).sample, t, x).prev_sample
    return x


# ----------------------------------------------------------------------------------- data
def test_load_digits_images_shape_range(data):
    x, y = data
    assert x.shape == (1797, 1, 16, 16)
    assert x.dtype == torch.float32 and y.dtype == torch.int64
    assert y.shape == (1797,)
    assert set(y.tolist()) == set(range(10))
    assert x.min().item() == -1.0
    assert x.max().item() <= 1.0 and x.max().item() > 0.9
    assert torch.isfinite(x).all()


def test_load_digits_images_native_resolution_matches_sklearn():
    from sklearn.datasets import load_digits

    x, y = digits.load_digits_images(8)
    ds = load_digits()
    assert x.shape == (1797, 1, 8, 8)
    np.testing.assert_allclose(x[:, 0].numpy(), ds.images / 8.0 - 1.0, atol=1e-6)
    np.testing.assert_array_equal(y.numpy(), ds.target)
    assert x.min().item() == -1.0 and x.max().item() == 1.0


def test_upsampling_is_bilinear_of_native(data):
    x16, _ = data
    x8, _ = digits.load_digits_images(8)
    ref = torch.nn.functional.interpolate(x8[:10], size=(16, 16), mode="bilinear", align_corners=False)
    torch.testing.assert_close(x16[:10], ref)


# ----------------------------------------------------------------------------------- assets
def test_bundled_dir_layout():
    d = digits.bundled_dir()
    assert d.is_dir(), d
    for rel in (
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors",
        "scheduler/scheduler_config.json",
        "classifier.safetensors",
        "classifier_config.json",
        "MODEL_CARD.md",
        "training_log.json",
    ):
        assert (d / rel).is_file(), rel
    total = sum(p.stat().st_size for p in d.rglob("*") if p.is_file())
    assert total < 20e6, f"bundled assets are {total / 1e6:.1f} MB"
    log = json.loads((d / "training_log.json").read_text())
    assert log["classifier"]["test_accuracy"] > 0.9
    assert log["unet"]["steps"] > 0


def test_bundled_unet_and_scheduler_load_offline(unet, scheduler):
    from diffusers import UNet2DModel

    assert isinstance(unet, UNet2DModel)
    assert not unet.training
    assert unet.config.in_channels == 1 and unet.config.out_channels == 1
    assert unet.config.sample_size == 16
    assert unet.config.time_embedding_type == "positional"
    assert isinstance(unet.conv_out, torch.nn.Conv2d)
    assert unet.conv_out.out_channels == 1
    assert scheduler.config.prediction_type == "epsilon"
    assert scheduler.config.num_train_timesteps == 1000
    assert scheduler.config.clip_sample is False


def test_missing_assets_raise_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="train_digits.py") as e:
        digits.load_bundled_unet(root=tmp_path)
    assert str(tmp_path) in str(e.value)
    with pytest.raises(FileNotFoundError, match="train_digits.py"):
        digits.load_bundled_scheduler(root=tmp_path)
    with pytest.raises(FileNotFoundError, match="classifier"):
        digits.load_bundled_classifier(root=tmp_path)
    with pytest.raises(FileNotFoundError, match="unet_dropout"):
        digits.load_bundled_unet(dropout=True, root=tmp_path)


# ----------------------------------------------------------------------------------- classifier
def test_classifier_accuracy_on_all_digits(classifier, data):
    x, y = data
    with torch.no_grad():
        pred = classifier(x).argmax(1)
    acc = (pred == y).float().mean().item()
    assert acc > 0.9, acc


def test_classifier_features_and_determinism(classifier, data):
    x, _ = data
    with torch.no_grad():
        f1 = classifier.features(x[:32])
        f2 = classifier.features(x[:32])
        logits = classifier(x[:32])
    assert f1.shape == (32, classifier.feature_dim)
    assert 64 <= classifier.feature_dim <= 256
    torch.testing.assert_close(f1, f2, rtol=0, atol=0)
    torch.testing.assert_close(classifier.fc2(f1), logits)
    # the classifier must not be confidently right on pure noise inputs as often as on digits
    g = torch.Generator().manual_seed(0)
    noise = torch.rand((256, 1, 16, 16), generator=g) * 2 - 1
    with torch.no_grad():
        conf_noise = torch.softmax(classifier(noise), 1).max(1).values.mean().item()
        conf_data = torch.softmax(classifier(x[:256]), 1).max(1).values.mean().item()
    assert conf_data > 0.95 and conf_data > conf_noise


def test_untrained_classifier_is_not_accurate(data):
    torch.manual_seed(0)
    x, y = data
    with torch.no_grad():
        acc = (digits.DigitsClassifier()(x).argmax(1) == y).float().mean().item()
    assert acc < 0.5  # so that the accuracy test above measures the bundled weights


# ----------------------------------------------------------------------------------- sampling
def test_ddim_steps_finite_and_shaped(unet, scheduler):
    x = _ddim_sample(unet, scheduler, n=8, steps=5, seed=0)
    assert x.shape == (8, 1, 16, 16)
    assert torch.isfinite(x).all()
    with torch.no_grad():
        eps = unet(torch.zeros(4, 1, 16, 16), torch.tensor([0, 10, 500, 999])).sample
    assert eps.shape == (4, 1, 16, 16) and torch.isfinite(eps).all()


def test_bundled_unet_samples_look_like_digits(unet, scheduler, classifier):
    # 24 images, 10 DDIM steps: ~0.5 s on an idle 2-core CPU. An untrained or broken UNet gives
    # noise/blobs on which the classifier is far less confident (see test_untrained_unet_fails_quality).
    x = _ddim_sample(unet, scheduler, n=24, steps=10, seed=1)
    assert x.abs().max().item() < 3.0
    with torch.no_grad():
        conf = torch.softmax(classifier(x.clamp(-1, 1)), 1).max(1)
    assert conf.values.mean().item() > 0.8, conf.values
    assert len(set(conf.indices.tolist())) >= 6  # not collapsed onto a few classes


def test_untrained_unet_fails_quality(unet, scheduler, classifier):
    """The quality check above must be able to fail: a randomly initialised UNet of the same
    architecture does not pass it."""
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    rand = UNet2DModel.from_config(unet.config).eval()
    x = _ddim_sample(rand, scheduler, n=24, steps=10, seed=1)
    ok = torch.isfinite(x).all() and x.abs().max().item() < 3.0
    if ok:
        with torch.no_grad():
            conf = torch.softmax(classifier(x.clamp(-1, 1)), 1).max(1)
        ok = conf.values.mean().item() > 0.8 and len(set(conf.indices.tolist())) >= 6
    assert not ok
