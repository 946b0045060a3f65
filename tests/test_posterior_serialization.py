"""save → load: identical predictions and metadata, head checks, atomic writes."""

import json
import os

import pytest
import torch
from safetensors import safe_open
from test_posterior_models import conv_head, random_features
from tiny_models import tiny_unet

from bayesdiff_ext import LastLayerLaplace
from bayesdiff_ext.posterior.serialization import METADATA_KEY


@pytest.mark.parametrize(
    "structure,curvature", [("diag", "ef"), ("full", "ggn"), ("kron", "ggn"), ("isotropic", "ggn")]
)
def test_round_trip_predicts_identically(tmp_path, structure, curvature):
    unet = tiny_unet(out_channels=6)
    post = LastLayerLaplace(unet, structure, curvature, prior_precision="marglik", temperature=0.5)
    post.fit_features(random_features(unet.conv_out, size=(8, 8), eps_channels=3))
    path = tmp_path / "posterior.safetensors"
    post.save(path)
    assert [p.name for p in tmp_path.iterdir()] == ["posterior.safetensors"]  # no temporary file left
    assert path.stat().st_mode & 0o777 == 0o644

    loaded = LastLayerLaplace.load(path, tiny_unet(out_channels=6))
    for name in ("structure", "curvature", "sigma_noise", "prior_precision", "temperature", "eps_channels", "spec"):
        assert getattr(loaded, name) == getattr(post, name), name
    assert loaded.fit_stats == post.fit_stats
    phi = torch.randn(2, 8, 8, 8)
    for a, b in zip(post.predict(phi), loaded.predict(phi)):
        assert torch.equal(a, b)


def test_metadata_is_readable_json(tmp_path):
    head = conv_head()
    post = LastLayerLaplace(head, "diag").fit_features(random_features(head))
    path = tmp_path / "p.safetensors"
    post.save(path)
    with safe_open(path, framework="pt") as f:
        meta = json.loads(f.metadata()[METADATA_KEY])
        keys = set(f.keys())
    assert keys == {"curvature.h_weight", "curvature.h_bias"}
    assert meta["structure"] == "diag" and meta["prior_precision_choice"] == "mackay"
    assert meta["head"]["in_channels"] == 5 and meta["head"]["kernel_size"] == [3, 3]
    assert meta["fit"]["n_samples"] == 12 and set(meta["versions"]) == {"bayesdiff_ext", "torch", "diffusers", "python"}
    assert meta["date"].endswith("+00:00")


def test_overwrite_is_atomic_replacement(tmp_path):
    head = conv_head()
    path = tmp_path / "p.safetensors"
    LastLayerLaplace(head, "diag").fit_features(random_features(head)).save(path)
    LastLayerLaplace(head, "full").fit_features(random_features(head)).save(path)
    assert LastLayerLaplace.load(path, head).structure == "full"
    assert os.listdir(tmp_path) == ["p.safetensors"]


def test_load_into_a_mismatched_model_names_both_heads(tmp_path):
    post = LastLayerLaplace(tiny_unet()).fit_features(random_features(tiny_unet().conv_out, size=(8, 8)))
    path = tmp_path / "p.safetensors"
    post.save(path)
    other = tiny_unet(block_out_channels=(16, 32))
    with pytest.raises(ValueError, match=r"fitted for the head Conv2d\(8->3.*this model's head is Conv2d\(16->3"):
        LastLayerLaplace.load(path, other)


def test_load_warns_when_head_weights_differ(tmp_path):
    post = LastLayerLaplace(tiny_unet()).fit_features(random_features(tiny_unet().conv_out, size=(8, 8)))
    path = tmp_path / "p.safetensors"
    post.save(path)
    with pytest.warns(UserWarning, match="head weights differ"):
        LastLayerLaplace.load(path, tiny_unet(seed=1))


def test_load_refuses_other_files(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "weights.safetensors"
    save_file({"x": torch.zeros(2)}, path)
    with pytest.raises(ValueError, match="not a saved bayesdiff_ext posterior"):
        LastLayerLaplace.load(path, conv_head())
