"""capture_head_input: records the head's input on every forward, leaves the model untouched."""

import pytest
import torch
from test_posterior_models import timesteps
from tiny_models import tiny_condition_unet, tiny_unet

from bayesdiff_ext.posterior import capture_head_input


@torch.no_grad()
def test_capture_records_head_input_and_keeps_output():
    unet = tiny_unet()
    x = torch.randn(3, 3, 8, 8)
    t = timesteps(3)
    plain = unet(x, t).sample
    with capture_head_input(unet.conv_out) as cap:
        captured = unet(x, t).sample
    assert torch.equal(plain, captured)
    assert cap.calls == 1 and cap.phi.shape == (3, 8, 8, 8)
    # φ is exactly what conv_out consumed: the head applied to it reproduces the model output.
    assert torch.equal(unet.conv_out(cap.phi), plain)


@torch.no_grad()
def test_capture_keeps_the_latest_call():
    unet = tiny_unet()
    with capture_head_input(unet.conv_out) as cap:
        unet(torch.randn(2, 3, 8, 8), timesteps(2))
        x = torch.randn(1, 3, 8, 8)
        out = unet(x, timesteps(1, seed=5)).sample
    assert cap.calls == 2 and cap.phi.shape[0] == 1
    assert torch.equal(unet.conv_out(cap.phi), out)


@torch.no_grad()
def test_capture_on_condition_unet():
    unet = tiny_condition_unet()
    x, ctx = torch.randn(2, 4, 8, 8), torch.randn(2, 5, 8)
    with capture_head_input(unet.conv_out) as cap:
        out = unet(x, timesteps(2), encoder_hidden_states=ctx).sample
    assert torch.equal(unet.conv_out(cap.phi), out)


def test_capture_removes_its_hook_even_on_error():
    unet = tiny_unet()
    with pytest.raises(RuntimeError, match="boom"):
        with capture_head_input(unet.conv_out):
            assert len(unet.conv_out._forward_pre_hooks) == 1
            raise RuntimeError("boom")
    assert len(unet.conv_out._forward_pre_hooks) == 0
    with capture_head_input(unet.conv_out) as cap:
        pass
    assert len(unet.conv_out._forward_pre_hooks) == 0
    unet.conv_out(torch.randn(1, 8, 8, 8))
    assert cap.calls == 0 and cap.phi is None
