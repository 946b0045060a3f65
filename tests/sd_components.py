"""Tiny random-init diffusers components for the latent, guidance and pipeline tests (offline, from configs).

A Stable Diffusion pipeline with an 8×8×4 latent UNet2DConditionModel, a 2-level AutoencoderKL
(16×16 RGB images), a one-layer CLIPTextModel and no tokenizer: most tests pass prompt embeddings
directly; ``sd_tokenizer`` writes a character-level vocabulary for the tests of text prompts. Plus
a pixel-space UNet2DModel for DDPMPipeline/DDIMPipeline.
"""

import json
import string

import torch
from diffusers import (
    AutoencoderKL,
    DDIMPipeline,
    DDIMScheduler,
    DDPMPipeline,
    DDPMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
    UNet2DModel,
)
from tiny_models import tiny_condition_unet, tiny_unet
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from bayesdiff_ext import LastLayerLaplace

TEXT_DIM = 16
TOKENS = 5
VOCAB = 64


def sd_unet(seed=0) -> UNet2DConditionModel:
    return tiny_condition_unet(seed, cross_attention_dim=TEXT_DIM)


def sd_vae(seed=0, scaling_factor=0.18215, shift_factor=None, dtype=torch.float32) -> AutoencoderKL:
    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=4,
        layers_per_block=1,
        sample_size=16,
        scaling_factor=scaling_factor,
        shift_factor=shift_factor,
    )
    return (vae if dtype == torch.float32 else vae.to(dtype=dtype)).eval()


def text_encoder(seed=0) -> CLIPTextModel:
    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=VOCAB,
        hidden_size=TEXT_DIM,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=TOKENS,
        bos_token_id=VOCAB - 2,
        eos_token_id=VOCAB - 1,
        pad_token_id=0,
    )
    return CLIPTextModel(config).eval()


def sd_tokenizer(directory) -> CLIPTokenizer:
    """A character-level CLIPTokenizer over the text encoder's vocabulary, written into ``directory``."""
    letters = string.ascii_lowercase
    tokens = list(letters) + [c + "</w>" for c in letters]
    tokens += [f"<unused{i}>" for i in range(VOCAB - 2 - len(tokens))] + ["<|startoftext|>", "<|endoftext|>"]
    (directory / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (directory / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(
        str(directory / "vocab.json"),
        str(directory / "merges.txt"),
        model_max_length=TOKENS,
        pad_token="<|endoftext|>",
    )


def sd_scheduler() -> DDIMScheduler:
    """Stable Diffusion's DDIM settings (clip_sample is already off there)."""
    return DDIMScheduler(
        num_train_timesteps=1000,
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )


def sd_pipeline(scheduler=None, seed=0, vae=None) -> StableDiffusionPipeline:
    pipe = StableDiffusionPipeline(
        vae=vae or sd_vae(seed),
        text_encoder=text_encoder(seed),
        tokenizer=None,
        unet=sd_unet(seed),
        scheduler=scheduler or sd_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def prompt_embeddings(pipe, batch, seed=0) -> tuple[torch.Tensor, torch.Tensor]:
    """(prompt_embeds, negative_prompt_embeds) from the pipeline's text encoder on random token ids."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB - 2, (2 * batch, TOKENS), generator=g)
    with torch.no_grad():
        states = pipe.text_encoder(ids).last_hidden_state
    return states[:batch], states[batch:]


def fitted_sd_posterior(unet, structure="diag", images=6, seed=0) -> LastLayerLaplace:
    """A posterior fitted on random latents with random text conditioning (what fit does, small)."""
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(images, 4, 8, 8, generator=g)
    states = torch.randn(images, TOKENS, TEXT_DIM, generator=g)
    return LastLayerLaplace(unet, structure).fit(
        latents,
        DDPMScheduler(num_train_timesteps=1000),
        batch_size=images,
        generator=g,
        model_kwargs={"encoder_hidden_states": states},
        progress=False,
    )


def pixel_unet(seed=0) -> UNet2DModel:
    return tiny_unet(seed=seed)


def ddpm_pipeline(seed=0, steps=100) -> DDPMPipeline:
    pipe = DDPMPipeline(
        unet=pixel_unet(seed), scheduler=DDPMScheduler(num_train_timesteps=steps, clip_sample=False)
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def ddim_pipeline(seed=0, steps=100) -> DDIMPipeline:
    pipe = DDIMPipeline(
        unet=pixel_unet(seed), scheduler=DDIMScheduler(num_train_timesteps=steps, clip_sample=False)
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def fitted_pixel_posterior(unet, structure="diag", images=6, seed=0) -> LastLayerLaplace:
    g = torch.Generator().manual_seed(seed)
    return LastLayerLaplace(unet, structure).fit(
        torch.randn(images, 3, 8, 8, generator=g).clamp(-1, 1),
        DDPMScheduler(num_train_timesteps=100),
        batch_size=images,
        generator=g,
        progress=False,
    )


class DecodeRecorder:
    """Wraps the real ``vae.decode``: counts the calls and keeps the latents each call received."""

    def __init__(self, vae):
        self.inputs: list[torch.Tensor] = []
        self._decode = vae.decode
        vae.decode = self

    def __call__(self, z, *args, **kwargs):
        self.inputs.append(z.detach().clone())
        return self._decode(z, *args, **kwargs)

    @property
    def calls(self) -> int:
        return len(self.inputs)


class UNetCalls:
    """Rows of every UNet call inside a ``with`` block (a forward pre-hook, removed on exit)."""

    def __init__(self, unet):
        self.unet = unet
        self.rows: list[int] = []

    def __enter__(self):
        self._handle = self.unet.register_forward_pre_hook(
            lambda module, args, kwargs: self.rows.append((args[0] if args else kwargs["sample"]).shape[0]),
            with_kwargs=True,
        )
        return self

    def __exit__(self, *exc):
        self._handle.remove()
        return False
