"""Tiny random-init diffusers UNets and heads shared by the posterior tests (built offline from configs)."""

import torch
from diffusers import DDPMScheduler, UNet2DConditionModel, UNet2DModel


def tiny_unet(out_channels=3, in_channels=3, seed=0, **config) -> UNet2DModel:
    torch.manual_seed(seed)
    base = dict(
        sample_size=8,
        in_channels=in_channels,
        out_channels=out_channels,
        block_out_channels=(8, 16),
        norm_num_groups=4,
        layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        add_attention=False,
    )
    base.update(config)
    return UNet2DModel(**base).eval()


def tiny_condition_unet(seed=0) -> UNet2DConditionModel:
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
        cross_attention_dim=8,
        attention_head_dim=2,
    ).eval()


def tiny_scheduler(steps=100) -> DDPMScheduler:
    return DDPMScheduler(num_train_timesteps=steps, clip_sample=False)


def timesteps(batch, steps=100, seed=1) -> torch.Tensor:
    return torch.randint(0, steps, (batch,), generator=torch.Generator().manual_seed(seed))
