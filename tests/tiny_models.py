"""The tiny random-init diffusers models the tests share, built offline from configs, in eval mode:
UNets, and the transformers (DiT, PixArt, SD3, Flux) with conditioning for them."""

import torch
from diffusers import (
    DiTTransformer2DModel,
    FluxPipeline,
    FluxTransformer2DModel,
    PixArtTransformer2DModel,
    SD3Transformer2DModel,
    UNet2DConditionModel,
    UNet2DModel,
)


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


TEXT_TOKENS, TEXT_DIM, POOLED_DIM = 3, 6, 5


def tiny_dit(seed: int = 0) -> DiTTransformer2DModel:
    """Class-conditional, learned σ (8 output channels for 4 input channels), as DiT-XL/2."""
    torch.manual_seed(seed)
    return DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=4, in_channels=4, out_channels=8, num_layers=1,
        sample_size=8, patch_size=2, num_embeds_ada_norm=10, norm_num_groups=1,
    ).eval()


def tiny_pixart(seed: int = 0, additional_conditions: bool = True) -> PixArtTransformer2DModel:
    """Learned σ, caption cross-attention and (PixArt-α 1024's) resolution/aspect-ratio conditions
    (their embeddings split the width in three: 12 = 2 heads × 6)."""
    torch.manual_seed(seed)
    return PixArtTransformer2DModel(
        num_attention_heads=2, attention_head_dim=6, in_channels=4, out_channels=8, num_layers=1,
        cross_attention_dim=12, sample_size=8, patch_size=2, caption_channels=TEXT_DIM, norm_num_groups=1,
        use_additional_conditions=additional_conditions,
    ).eval()


def tiny_sd3(seed: int = 0) -> SD3Transformer2DModel:
    torch.manual_seed(seed)
    return SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=1, attention_head_dim=4, num_attention_heads=2,
        joint_attention_dim=TEXT_DIM, caption_projection_dim=8, pooled_projection_dim=POOLED_DIM, out_channels=4,
        pos_embed_max_size=8,
    ).eval()


def tiny_flux(seed: int = 0) -> FluxTransformer2DModel:
    """Tokens of 8 = 2 latent channels packed 2×2 (Flux.1: 16 channels, 64)."""
    torch.manual_seed(seed)
    return FluxTransformer2DModel(
        patch_size=1, in_channels=8, num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=TEXT_DIM, pooled_projection_dim=POOLED_DIM, guidance_embeds=False, axes_dims_rope=(2, 2, 4),
    ).eval()


def text_conditioning(batch: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """``encoder_hidden_states`` and ``pooled_projections`` for SD3 and Flux."""
    g = torch.Generator().manual_seed(seed)
    return {
        "encoder_hidden_states": torch.randn(batch, TEXT_TOKENS, TEXT_DIM, generator=g),
        "pooled_projections": torch.randn(batch, POOLED_DIM, generator=g),
    }


def pixart_conditioning(batch: int, seed: int = 0, height: int = 8, width: int = 8) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "encoder_hidden_states": torch.randn(batch, TEXT_TOKENS, TEXT_DIM, generator=g),
        "added_cond_kwargs": {
            "resolution": torch.tensor([[height * 8.0, width * 8.0]]).repeat(batch, 1),
            "aspect_ratio": torch.tensor([[height / width]]).repeat(batch, 1),
        },
    }


def flux_conditioning(batch: int, height: int = 8, width: int = 8, seed: int = 0) -> dict[str, torch.Tensor]:
    """Text conditioning and the position ids of a (height, width) latent packed 2×2, as FluxPipeline builds them."""
    return {
        **text_conditioning(batch, seed),
        "img_ids": FluxPipeline._prepare_latent_image_ids(batch, height // 2, width // 2, "cpu", torch.float32),
        "txt_ids": torch.zeros(TEXT_TOKENS, 3),
    }


def flux_tokens(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) latents packed 2×2 into (B, H/2·W/2, 4·C) tokens, as FluxPipeline packs them."""
    batch, channels, height, width = latents.shape
    return FluxPipeline._pack_latents(latents, batch, channels, height, width)
