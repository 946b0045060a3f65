"""The tiny random-init diffusers models the tests share, built offline from configs, in eval mode."""

import torch
from diffusers import UNet2DConditionModel, UNet2DModel


def tiny_unet(seed: int = 0, channels: int = 3, **config) -> UNet2DModel:
    """A UNet2DModel on 8×8 images with ``channels`` in and out: two levels of 8 and 16 channels,
    one layer each, GroupNorm of 4 groups. ``config`` overrides any UNet2DModel argument (e.g.
    ``out_channels=2 * channels`` for a learned-variance head, ``dropout=0.3``); the weights depend
    on ``seed`` and the config only."""
    torch.manual_seed(seed)
    base = dict(
        sample_size=8,
        in_channels=channels,
        out_channels=channels,
        block_out_channels=(8, 16),
        layers_per_block=1,
        norm_num_groups=4,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
    )
    return UNet2DModel(**{**base, **config}).eval()


def tiny_condition_unet(seed: int = 0, cross_attention_dim: int = 8) -> UNet2DConditionModel:
    """A UNet2DConditionModel on 8×8×4 latents with cross-attention to ``cross_attention_dim``-wide text."""
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(8, 16),
        norm_num_groups=4,
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=2,
    ).eval()
