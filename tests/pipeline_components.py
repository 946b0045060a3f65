"""Tiny random-init pipelines with their default schedulers, offline, from configs: SD 1.5 (PNDM),
SDXL (Euler), SD3 (flow matching), Flux (flow matching, dynamic shift), PixArt-Σ (DPM-Solver++ 2M)
and DiT (DDIM). The text encoders are one-layer CLIP/T5 models of width 8–16; the tokenizers are
character-level vocabularies written by ``tokenizers(directory)`` (most tests pass the embeddings
directly). Every latent is 8×8 (16×16 images through a 2-level VAE).
"""

import string

import torch
from diffusers import (
    DDIMScheduler,
    DiTPipeline,
    DiTTransformer2DModel,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    PixArtSigmaPipeline,
    PixArtTransformer2DModel,
    PNDMScheduler,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from sd_components import TOKENS, VOCAB, sd_tokenizer, sd_unet, sd_vae, text_encoder
from tokenizers import Tokenizer, models
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    T5Config,
    T5EncoderModel,
    T5TokenizerFast,
)

T5_WIDTH, T5_TOKENS = 16, 6
SIZE = 16  # pixels; latents 8×8
_SD_BETAS = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, num_train_timesteps=1000)


def _clip(seed: int, width: int, projection: int | None = None):
    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=VOCAB, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=TOKENS, bos_token_id=VOCAB - 2, eos_token_id=VOCAB - 1, pad_token_id=0,
        projection_dim=projection or width,
    )
    return (CLIPTextModel(config) if projection is None else CLIPTextModelWithProjection(config)).eval()


def _t5(seed: int):
    torch.manual_seed(seed)
    config = T5Config(
        vocab_size=32, d_model=T5_WIDTH, d_ff=2 * T5_WIDTH, d_kv=8, num_layers=1, num_heads=2,
        decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
    )
    return T5EncoderModel(config).eval()


def t5_tokenizer(directory) -> T5TokenizerFast:
    """A T5 tokenizer over single letters (the tiny T5's 32 ids), saved in ``directory`` and loaded back."""
    pieces = ["<pad>", "</s>", "<unk>", *string.ascii_lowercase, "▁"]
    tokenizer = T5TokenizerFast(
        tokenizer_object=Tokenizer(models.Unigram([(p, -1.0) for p in pieces], unk_id=2)),
        pad_token="<pad>", eos_token="</s>", unk_token="<unk>", extra_ids=0, model_max_length=T5_TOKENS,
    )
    tokenizer.save_pretrained(directory)
    return T5TokenizerFast.from_pretrained(directory)


def with_tokenizers(pipe, directory):
    """``pipe`` with tiny tokenizers (written under ``directory``) in every tokenizer slot it has."""
    for name in ("tokenizer", "tokenizer_2", "tokenizer_3"):
        encoder = getattr(pipe, name.replace("tokenizer", "text_encoder"), None)
        if encoder is None:
            continue
        folder = directory / name
        folder.mkdir(parents=True, exist_ok=True)
        tokenizer = t5_tokenizer(folder) if isinstance(encoder, T5EncoderModel) else sd_tokenizer(folder)
        pipe.register_modules(**{name: tokenizer})
    return pipe


def _quiet(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sd15_pipeline(seed: int = 0) -> StableDiffusionPipeline:
    """Stable Diffusion 1.5's layout with its default scheduler, PNDM (PLMS, skip_prk_steps)."""
    scheduler = PNDMScheduler(**_SD_BETAS, skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1)
    return _quiet(StableDiffusionPipeline(
        vae=sd_vae(seed), text_encoder=text_encoder(seed), tokenizer=None, unet=sd_unet(seed), scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    ))


def sdxl_pipeline(seed: int = 0) -> StableDiffusionXLPipeline:
    """Two CLIP encoders (8 + 8 wide, the second with an 8-wide projection), ``text_time`` micro-conditioning, Euler."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16), norm_num_groups=4,
        layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16, attention_head_dim=2,
        addition_embed_type="text_time", addition_time_embed_dim=4, projection_class_embeddings_input_dim=4 * 6 + 8,
    ).eval()
    scheduler = EulerDiscreteScheduler(**_SD_BETAS, steps_offset=1, timestep_spacing="leading")
    return _quiet(StableDiffusionXLPipeline(
        vae=sd_vae(seed, scaling_factor=0.13025), text_encoder=_clip(seed, 8), text_encoder_2=_clip(seed + 1, 8, 8),
        tokenizer=None, tokenizer_2=None, unet=unet, scheduler=scheduler, add_watermarker=False,
    ))


def sd3_pipeline(seed: int = 0) -> StableDiffusion3Pipeline:
    """Two CLIP encoders (8 + 8 wide, 4-wide projections: pooled 8) and a 16-wide T5, joint attention 16."""
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=1, attention_head_dim=4, num_attention_heads=2,
        joint_attention_dim=16, caption_projection_dim=8, pooled_projection_dim=8, out_channels=4, pos_embed_max_size=8,
    ).eval()
    return _quiet(StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=sd_vae(seed, scaling_factor=1.5305, shift_factor=0.0609),
        text_encoder=_clip(seed, 8, 4), tokenizer=None, text_encoder_2=_clip(seed + 1, 8, 4), tokenizer_2=None,
        text_encoder_3=_t5(seed), tokenizer_3=None,
    ))


def flux_pipeline(seed: int = 0, guidance_embeds: bool = False) -> FluxPipeline:
    """4 latent channels packed 2×2 into 16-wide tokens; CLIP (pooled 8) and T5 (16 wide); dynamic shift."""
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=T5_WIDTH, pooled_projection_dim=8, guidance_embeds=guidance_embeds, axes_dims_rope=(2, 2, 4),
    ).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    return _quiet(FluxPipeline(
        transformer=transformer, scheduler=scheduler, vae=sd_vae(seed, scaling_factor=0.3611, shift_factor=0.1159),
        text_encoder=_clip(seed, 8), tokenizer=None, text_encoder_2=_t5(seed), tokenizer_2=None,
    ))


def pixart_pipeline(seed: int = 0) -> PixArtSigmaPipeline:
    """Learned σ (8 output channels), a 16-wide T5, no micro-conditions (as PixArt-Σ), DPM-Solver++ 2M."""
    torch.manual_seed(seed)
    transformer = PixArtTransformer2DModel(
        num_attention_heads=2, attention_head_dim=6, in_channels=4, out_channels=8, num_layers=1,
        cross_attention_dim=12, sample_size=8, patch_size=2, caption_channels=T5_WIDTH, norm_num_groups=1,
        use_additional_conditions=False,
    ).eval()
    scheduler = DPMSolverMultistepScheduler(beta_schedule="linear", beta_start=0.0001, beta_end=0.02)
    return _quiet(PixArtSigmaPipeline(
        tokenizer=None, text_encoder=_t5(seed), vae=sd_vae(seed, scaling_factor=0.13025), transformer=transformer,
        scheduler=scheduler,
    ))


def dit_pipeline(seed: int = 0) -> DiTPipeline:
    """Class-conditional over 1000 classes (DiTPipeline's null class is 1000), learned σ, DDIM."""
    torch.manual_seed(seed)
    transformer = DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=4, in_channels=4, out_channels=8, num_layers=1, sample_size=8,
        patch_size=2, num_embeds_ada_norm=1000, norm_num_groups=1,
    ).eval()
    scheduler = DDIMScheduler(beta_schedule="linear", beta_start=0.0001, beta_end=0.02, clip_sample=False)
    return _quiet(DiTPipeline(transformer=transformer, vae=sd_vae(seed), scheduler=scheduler))


def fitted_posterior(pipe, embeddings: dict[str, torch.Tensor]):
    """A diag posterior fitted by ``fit_pipeline_posterior`` on 4 random images, conditioned like the calls
    that use ``embeddings`` (their conditional rows, twice; DiT: classes 1–4)."""
    from bayesdiff_ext.pipelines import fit_pipeline_posterior

    if type(pipe).__name__ == "DiTPipeline":
        conditioning = {"class_labels": [1, 2, 3, 4]}
    else:
        conditioning = {k: torch.cat([v, v]) for k, v in embeddings.items() if not k.startswith("negative")}
    images = torch.rand(4, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1)) * 2 - 1
    generator = torch.Generator().manual_seed(2)
    return fit_pipeline_posterior(pipe, images, batch_size=2, generator=generator, progress=False, **conditioning)


def text_embeddings(pipe, batch: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """The stock prompt-embedding arguments of ``pipe``'s call (both branches), from its own text
    encoders on random token ids, as ``encode_prompt`` would build them from text."""
    g = torch.Generator().manual_seed(seed)
    name = type(pipe).__name__

    def clip(encoder, pooled_output: bool):
        ids = torch.randint(1, VOCAB - 2, (batch, TOKENS), generator=g)
        out = encoder(ids, output_hidden_states=True)
        pooled = out.text_embeds if hasattr(out, "text_embeds") else out.pooler_output
        return out.hidden_states[-2] if pooled_output else out.last_hidden_state, pooled

    def t5():
        ids = torch.randint(3, 32, (batch, T5_TOKENS), generator=g)
        return pipe.text_encoder_3(ids)[0] if name == "StableDiffusion3Pipeline" else pipe.text_encoder(ids)[0]

    embeddings = {}
    with torch.no_grad():
        for prefix in ("", "negative_"):
            if name == "StableDiffusionPipeline":
                embeddings[f"{prefix}prompt_embeds"] = pipe.text_encoder(torch.randint(1, VOCAB - 2, (batch, TOKENS), generator=g))[0]
            elif name == "StableDiffusionXLPipeline":
                (first, _), (second, pooled) = clip(pipe.text_encoder, True), clip(pipe.text_encoder_2, True)
                embeddings[f"{prefix}prompt_embeds"] = torch.cat([first, second], dim=-1)
                embeddings[f"{prefix}pooled_prompt_embeds"] = pooled
            elif name == "StableDiffusion3Pipeline":
                (first, pooled_1), (second, pooled_2) = clip(pipe.text_encoder, True), clip(pipe.text_encoder_2, True)
                embeddings[f"{prefix}prompt_embeds"] = torch.cat([torch.cat([first, second], dim=-1), t5()], dim=-2)
                embeddings[f"{prefix}pooled_prompt_embeds"] = torch.cat([pooled_1, pooled_2], dim=-1)
            elif name == "FluxPipeline":
                embeddings[f"{prefix}pooled_prompt_embeds"] = clip(pipe.text_encoder, False)[1]
                ids = torch.randint(3, 32, (batch, T5_TOKENS), generator=g)
                embeddings[f"{prefix}prompt_embeds"] = pipe.text_encoder_2(ids)[0]
            elif name == "PixArtSigmaPipeline":
                embeddings[f"{prefix}prompt_embeds"] = t5()
                embeddings[f"{prefix}prompt_attention_mask"] = torch.ones(batch, T5_TOKENS, dtype=torch.long)
    return embeddings
