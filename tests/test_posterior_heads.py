"""Locating the head, its geometry and ε channels, and refusing heads whose output is not ε."""

import pytest
import torch
from tiny_models import tiny_condition_unet, tiny_unet
from torch import nn

from bayesdiff_ext import LastLayerLaplace


def test_unet_heads_and_learned_variance():
    assert LastLayerLaplace(tiny_unet()).head is not None
    plain = LastLayerLaplace(tiny_unet())
    assert plain.eps_channels == 3 and plain.spec.kernel_size == (3, 3) and plain.spec.padding == (1, 1)
    learned = LastLayerLaplace(tiny_unet(out_channels=6))
    assert learned.eps_channels == 3 and learned.spec.out_channels == 6
    cond = LastLayerLaplace(tiny_condition_unet())
    assert cond.head is cond.model.conv_out and cond.eps_channels == 4
    assert LastLayerLaplace(tiny_unet(), eps_channels=2).eps_channels == 2


def test_capture_does_not_modify_the_model():
    unet = tiny_unet()
    post = LastLayerLaplace(unet)
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([3, 40])
    with torch.no_grad():
        plain = unet(x, t).sample
        with post.capture() as cap:
            captured = unet(x, t).sample
    assert torch.equal(plain, captured) and cap.phi.shape == (2, 8, 8, 8)
    assert not unet.conv_out._forward_pre_hooks and not unet.conv_out._forward_hooks


def test_geometry_of_bare_heads():
    conv = nn.Conv2d(4, 6, (3, 5), stride=(1, 2), padding=(1, 2), groups=2)
    spec = LastLayerLaplace(conv).spec
    assert (spec.kernel_size, spec.stride, spec.padding, spec.groups, spec.taps) == ((3, 5), (1, 2), (1, 2), 2, 30)
    same = LastLayerLaplace(nn.Conv2d(4, 3, 3, padding="same", dilation=2)).spec
    assert same.padding == (2, 2)
    linear = LastLayerLaplace(nn.Linear(7, 5), eps_channels=4).spec
    assert (linear.kind, linear.in_channels, linear.eps_channels, linear.num_params) == ("linear", 7, 4, 4 * 8)


def test_refuses_fourier_unet():
    unet = tiny_unet(time_embedding_type="fourier", block_out_channels=(8, 16))
    with pytest.raises(ValueError, match="fourier.*divides conv_out's output"):
        LastLayerLaplace(unet)


def test_refuses_skip_unet():
    unet = tiny_unet(
        down_block_types=("SkipDownBlock2D", "SkipDownBlock2D"), up_block_types=("SkipUpBlock2D", "SkipUpBlock2D")
    )
    with pytest.raises(ValueError, match="skip up-blocks.*skip_sample"):
        LastLayerLaplace(unet)


@pytest.mark.parametrize(
    "model,kwargs,match",
    [
        (nn.Conv1d(3, 3, 3), {}, "cannot locate the noise-prediction head of a Conv1d"),
        (nn.Sequential(nn.Conv2d(3, 3, 3)), {}, "cannot locate the noise-prediction head of a Sequential"),
        (
            nn.Sequential(nn.Conv2d(3, 3, 3), nn.GroupNorm(1, 3)),
            "head=1",
            "must be an nn.Conv2d or nn.Linear, got GroupNorm",
        ),
        (nn.Conv2d(3, 3, 3, padding=1, padding_mode="reflect"), {}, "padding_mode='reflect'"),
        (nn.Conv2d(3, 3, 2, padding="same"), {}, "asymmetric padding"),
        (nn.Conv2d(3, 6, 3, groups=3), dict(eps_channels=3), "grouped head"),
        (nn.Linear(3, 4), dict(eps_channels=5), "eps_channels must be in 1..4"),
    ],
)
def test_refuses_unsupported_heads(model, kwargs, match):
    if kwargs == "head=1":
        kwargs = {"head": model[1]}
    with pytest.raises(ValueError, match=match):
        LastLayerLaplace(model, **kwargs)


def test_head_must_belong_to_the_model():
    with pytest.raises(ValueError, match="not a submodule"):
        LastLayerLaplace(tiny_unet(), head=nn.Conv2d(8, 3, 3))
