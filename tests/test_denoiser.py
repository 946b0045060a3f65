"""Denoiser: one call convention for UNets and transformers, checked against each model's own call."""

import pytest
import torch

from bayesdiff_ext.denoiser import Denoiser, model_prediction, repeat_batch, stepped_prediction
from tiny_models import tiny_condition_unet, tiny_dit, tiny_flux, tiny_sd3, tiny_unet


@torch.no_grad()
def test_unet_is_called_as_its_pipeline_calls_it():
    unet = tiny_unet()
    x, t = torch.randn(2, 3, 8, 8), torch.tensor(7)
    assert torch.equal(Denoiser(unet)(x, t), unet(x, t).sample)
    cond = tiny_condition_unet()
    z, states = torch.randn(2, 4, 8, 8), torch.randn(2, 3, 8)
    expected = cond(z, t, encoder_hidden_states=states).sample
    assert torch.equal(Denoiser(cond)(z, t, {"encoder_hidden_states": states}), expected)


@torch.no_grad()
def test_dit_gets_the_timestep_expanded_to_the_batch():
    dit = tiny_dit()
    x, labels = torch.randn(3, 4, 8, 8), torch.tensor([1, 2, 3])
    denoiser = Denoiser(dit)
    assert denoiser.sample_argument == "hidden_states"
    expected = dit(x, timestep=torch.tensor(5)[None].expand(3), class_labels=labels).sample
    out = denoiser(x, torch.tensor(5), {"class_labels": labels})
    assert out.shape == (3, 8, 8, 8)  # learned σ: all channels come back
    assert torch.equal(out, expected)


@torch.no_grad()
def test_sd3_and_flux_keywords_and_flux_timestep_per_mille():
    sd3 = tiny_sd3()
    x, states, pooled = torch.randn(2, 4, 8, 8), torch.randn(2, 3, 6), torch.randn(2, 5)
    kwargs = {"encoder_hidden_states": states, "pooled_projections": pooled}
    t = torch.tensor(900.0)
    expected = sd3(hidden_states=x, timestep=t.expand(2), **kwargs).sample
    assert torch.equal(Denoiser(sd3)(x, t, kwargs), expected)

    flux = tiny_flux()
    tokens = torch.randn(2, 16, 8)
    img_ids, txt_ids = torch.zeros(16, 3), torch.zeros(3, 3)
    kwargs = {"encoder_hidden_states": states, "pooled_projections": pooled, "img_ids": img_ids, "txt_ids": txt_ids}
    expected = flux(hidden_states=tokens, timestep=t.expand(2) / 1000, **kwargs).sample
    assert torch.equal(Denoiser(flux)(tokens, t, kwargs), expected)


def test_repeat_batch_tiles_copy_major_and_passes_the_rest():
    states = torch.arange(6.0).reshape(2, 3)
    tiled = repeat_batch({"a": states, "flag": True, "ids": torch.zeros(16, 3), "n": {"b": states}}, 2, 3)
    assert torch.equal(tiled["a"], torch.cat([states] * 3))
    assert torch.equal(tiled["n"]["b"], torch.cat([states] * 3))
    assert tiled["flag"] is True and tiled["ids"].shape == (16, 3)
    assert Denoiser.tile(None, 2, 3) == {}
    ids = torch.zeros(2, 3)  # Flux's img_ids for 2 tokens, with a batch of 2: not a batch
    assert Denoiser.tile({"img_ids": ids, "a": states}, 2, 3)["img_ids"] is ids


def test_refusals_name_the_problem():
    with pytest.raises(TypeError, match="nn.Module"):
        Denoiser(lambda x, t: x)
    with pytest.raises(ValueError, match="timestep"):
        Denoiser(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="cannot read the prediction"):
        model_prediction({"x": 1})


def test_stepped_prediction_drops_learned_variance_channels():
    sample, out = torch.randn(2, 4, 8, 8), torch.randn(2, 8, 8, 8)
    assert torch.equal(stepped_prediction(out, sample), out[:, :4])
    tokens = torch.randn(2, 16, 8)
    assert stepped_prediction(tokens, tokens) is tokens
    with pytest.raises(ValueError, match="neither shaped like its sample"):
        stepped_prediction(torch.randn(2, 5, 8, 8), sample)
