"""BayesDiffPipeline and UncertaintyCallback against the stock diffusers pipelines (tiny random-init)."""

import collections
import math

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, DPMSolverSinglestepScheduler, EulerDiscreteScheduler

from bayesdiff_ext import BayesDiffPipeline, UncertaintyCallback, latent
from bayesdiff_ext.guidance import guided_head_moments
from bayesdiff_ext.sampler.schedulers import step_coefficients
from sd_components import (
    DecodeRecorder,
    UNetCalls,
    ddim_pipeline,
    ddpm_pipeline,
    fitted_pixel_posterior,
    fitted_sd_posterior,
    prompt_embeddings,
    sd_pipeline,
    sd_scheduler,
    sd_tokenizer,
)

BATCH, STEPS, SCALE = 2, 4, 3.0


def seeded(seed=0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def sd():
    pipe = sd_pipeline()
    cond, uncond = prompt_embeddings(pipe, BATCH)
    return pipe, fitted_sd_posterior(pipe.unet), cond, uncond


def sd_call(cond, uncond, **overrides) -> dict:
    call = dict(
        prompt_embeds=cond,
        negative_prompt_embeds=uncond,
        num_inference_steps=STEPS,
        guidance_scale=SCALE,
        output_type="np",
    )
    return {**call, **overrides}


def assert_same_images(a, b) -> None:
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    elif isinstance(a, list):
        assert all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a, b, strict=True))
    else:
        assert np.array_equal(a, b)


# ------------------------------------------------------------------ Stable Diffusion wrapper


@pytest.mark.parametrize(
    "scheduler,eta,guidance_scale,output_type,per_prompt",
    [
        ("ddim", 0.0, SCALE, "np", 1),
        ("ddim", 0.5, SCALE, "pt", 1),
        ("ddim", 0.0, 1.0, "latent", 2),
        ("ddpm", 0.0, SCALE, "pil", 1),
    ],
)
@pytest.mark.parametrize("guidance_variance", ["exact", "independent"])
def test_stable_diffusion_images_equal_the_stock_pipeline(
    sd, scheduler, eta, guidance_scale, output_type, per_prompt, guidance_variance
):
    pipe, post, cond, uncond = sd
    config = sd_scheduler().config
    pipe.scheduler = sd_scheduler() if scheduler == "ddim" else DDPMScheduler.from_config(config)
    call = sd_call(
        cond,
        uncond,
        eta=eta,
        output_type=output_type,
        num_images_per_prompt=per_prompt,
        guidance_scale=guidance_scale,
    )
    stock = pipe(generator=seeded(), **call).images
    out = BayesDiffPipeline.from_pipe(pipe, post)(
        generator=seeded(), mc_samples=4, guidance_variance=guidance_variance, decode_samples=3, **call
    )
    assert_same_images(stock, out.images)
    images = BATCH * per_prompt
    assert out.variance.shape == (images, 4, 8, 8) and out.variance.dtype == torch.float32
    assert out.variance.min() >= 0 and out.variance.sum() > 0
    torch.testing.assert_close(out.scores, out.variance.flatten(1).sum(1))
    assert out.pixel_variance.shape == (images, 3, 16, 16) and out.pixel_variance.min() >= 0
    torch.testing.assert_close(out.pixel_scores, out.pixel_variance.flatten(1).sum(1))
    assert out.settings["guidance_variance"] == (guidance_variance if guidance_scale > 1 else None)


@pytest.mark.parametrize("guidance_variance", ["exact", "independent"])
def test_first_step_carries_the_guided_head_variance(sd, guidance_variance):
    """From z_T (Var = 0), the first DDIM step gives Var[z_1] = b²·Var[ε_cfg(z_T)]."""
    pipe, post, cond, uncond = sd
    pipe.scheduler = sd_scheduler()
    z_t = torch.randn(BATCH, 4, 8, 8, generator=seeded(5))
    out = BayesDiffPipeline.from_pipe(pipe, post)(
        latents=z_t,
        mc_samples=0,
        covariance="none",
        guidance_variance=guidance_variance,
        return_trace=True,
        decode_samples=0,
        **sd_call(cond, uncond, output_type="latent"),
    )
    first = step_coefficients(pipe.scheduler)[0]
    with torch.no_grad(), post.capture() as cap:
        pipe.unet(torch.cat([z_t, z_t]), first.timestep, encoder_hidden_states=torch.cat([uncond, cond]))
    _, head_var = guided_head_moments(post, cap.phi, SCALE, guidance_variance)
    torch.testing.assert_close(out.trace[0]["variance"], first.b[0] ** 2 * head_var)
    assert out.pixel_variance is None and out.pixel_scores is None


def test_exact_and_independent_guidance_variances_differ(sd):
    pipe, post, cond, uncond = sd
    pipe.scheduler = sd_scheduler()
    wrapper = BayesDiffPipeline.from_pipe(pipe, post)
    call = sd_call(cond, uncond, output_type="latent", mc_samples=4, decode_samples=0)
    exact = wrapper(generator=seeded(), guidance_variance="exact", **call)
    independent = wrapper(generator=seeded(), guidance_variance="independent", **call)
    assert torch.equal(exact.images, independent.images)
    # With s = 3 the branches' covariance term 2s(1−s)·Cov is large and negative: the paper overstates.
    assert (independent.scores > 1.5 * exact.scores).all()


def test_monte_carlo_runs_both_branches_of_every_sample_in_one_unet_call(sd):
    pipe, post, cond, uncond = sd
    pipe.scheduler = sd_scheduler()
    samples = 3
    with UNetCalls(pipe.unet) as calls:
        BayesDiffPipeline.from_pipe(pipe, post)(
            generator=seeded(), mc_samples=samples, uq_every=2, decode_samples=0, **sd_call(cond, uncond)
        )
    # One image call of [uncond; cond] per step, one Monte Carlo call at the 2 uncertainty steps
    # but the first (Var[x_T] = 0 there: the closed form stands in).
    assert collections.Counter(calls.rows) == {2 * BATCH: STEPS, 2 * samples * BATCH: 1}


def test_pixel_variance_decodes_gaussian_draws_in_batches(sd):
    pipe, post, cond, uncond = sd
    pipe.scheduler = sd_scheduler()
    recorder = DecodeRecorder(pipe.vae)
    try:
        out = BayesDiffPipeline.from_pipe(pipe, post)(
            generator=seeded(),
            mc_samples=2,
            decode_samples=5,
            decode_batch_size=4,
            decode_generator=seeded(9),
            **sd_call(cond, uncond),
        )
    finally:
        del pipe.vae.decode  # back to the class's method
    image_call, *draw_calls = recorder.inputs
    assert len(image_call) == BATCH
    assert len(draw_calls) == math.ceil(5 * BATCH / 4) and all(len(z) <= 4 for z in draw_calls)
    expected = latent.pixel_moments(
        pipe.vae, out.mean, out.variance, samples=5, batch_size=4, generator=seeded(9)
    )
    torch.testing.assert_close(out.pixel_variance, expected.variance)


def test_text_prompts_go_through_the_pipelines_own_encoder(sd, tmp_path):
    pipe, post, _, _ = sd
    pipe.scheduler = sd_scheduler()
    pipe.register_modules(tokenizer=sd_tokenizer(tmp_path))
    try:
        call = dict(
            prompt=["a cat", "a dog"],
            negative_prompt=["blur", "noise"],
            num_inference_steps=STEPS,
            guidance_scale=SCALE,
            output_type="np",
        )
        stock = pipe(generator=seeded(), **call).images
        out = BayesDiffPipeline.from_pipe(pipe, post)(
            generator=seeded(), mc_samples=2, decode_samples=2, **call
        )
    finally:
        pipe.register_modules(tokenizer=None)
    assert_same_images(stock, out.images)
    assert out.variance.shape == (2, 4, 8, 8) and out.variance.sum() > 0


def test_return_dict_false_gives_the_stock_tuple_then_the_maps(sd):
    pipe, post, cond, uncond = sd
    pipe.scheduler = sd_scheduler()
    images, nsfw, variance, pixel_variance = BayesDiffPipeline.from_pipe(pipe, post)(
        generator=seeded(), mc_samples=2, decode_samples=2, return_dict=False, **sd_call(cond, uncond)
    )
    stock_images, stock_nsfw = pipe(generator=seeded(), return_dict=False, **sd_call(cond, uncond))
    assert_same_images(stock_images, images)
    assert nsfw is stock_nsfw is None
    assert variance.shape == (BATCH, 4, 8, 8) and pixel_variance.shape == (BATCH, 3, 16, 16)


def test_wrapper_refuses_what_it_cannot_follow(sd):
    pipe, post, cond, uncond = sd
    pipe.scheduler = sd_scheduler()
    wrapper = BayesDiffPipeline.from_pipe(pipe, post)
    with pytest.raises(ValueError, match="guidance_rescale"):
        wrapper(guidance_rescale=0.7, **sd_call(cond, uncond))
    with pytest.raises(ValueError, match="custom timesteps"):
        wrapper(timesteps=[999, 500], **sd_call(cond, uncond))
    with pytest.raises(ValueError, match="UncertaintyCallback"):
        wrapper(callback_on_step_end=lambda *a: {}, **sd_call(cond, uncond))
    with pytest.raises(TypeError, match="unexpected keyword arguments"):
        wrapper(guidance_scales=2.0, **sd_call(cond, uncond))
    with pytest.raises(ValueError, match="guidance variance must be one of"):
        wrapper(guidance_variance="paper", **sd_call(cond, uncond))
    pipe.scheduler = DDPMScheduler.from_config(sd_scheduler().config, clip_sample=True)
    with pytest.raises(ValueError, match="clip_sample=True"):
        wrapper(**sd_call(cond, uncond))
    with pytest.raises(TypeError, match="wraps a DDPMPipeline, DDIMPipeline or StableDiffusionPipeline"):
        BayesDiffPipeline.from_pipe(object(), post)
    with pytest.raises(TypeError, match="from_pipe"):
        BayesDiffPipeline(pipe, post)
    with pytest.raises(ValueError, match="has other weights than the head the posterior was fitted at"):
        BayesDiffPipeline.from_pipe(sd_pipeline(seed=1), post)


# ------------------------------------------------------------------ pixel-space pipelines


@pytest.mark.parametrize("eta,output_type", [(0.0, "np"), (0.5, "pil")])
def test_ddim_wrapper_images_equal_the_stock_pipeline(eta, output_type):
    pipe = ddim_pipeline()
    post = fitted_pixel_posterior(pipe.unet)
    call = dict(batch_size=BATCH, eta=eta, num_inference_steps=STEPS, output_type=output_type)
    stock = pipe(generator=seeded(), **call).images
    out = BayesDiffPipeline.from_pipe(pipe, post)(generator=seeded(), mc_samples=3, **call)
    assert_same_images(stock, out.images)
    assert out.variance.shape == (BATCH, 3, 8, 8) and out.variance.min() >= 0 and out.variance.sum() > 0
    assert out.pixel_variance is out.variance and out.pixel_scores is out.scores


def test_ddpm_wrapper_images_equal_the_stock_pipeline():
    pipe = ddpm_pipeline()
    post = fitted_pixel_posterior(pipe.unet)
    call = dict(batch_size=1, num_inference_steps=STEPS, output_type="pt")
    stock = pipe(generator=seeded(), **call).images
    out = BayesDiffPipeline.from_pipe(pipe, post)(generator=seeded(), mc_samples=3, uq_every=2, **call)
    assert_same_images(stock, out.images)
    images, variance, pixel_variance = BayesDiffPipeline.from_pipe(pipe, post)(
        generator=seeded(), mc_samples=3, uq_every=2, return_dict=False, **call
    )
    assert torch.equal(images, stock) and torch.equal(variance, out.variance) and pixel_variance is variance


def test_ddim_wrapper_refuses_clipped_model_output():
    pipe = ddim_pipeline()
    with pytest.raises(ValueError, match="use_clipped_model_output"):
        BayesDiffPipeline.from_pipe(pipe, fitted_pixel_posterior(pipe.unet))(use_clipped_model_output=True)


# ------------------------------------------------------------------ the callback in a stock loop


@pytest.mark.parametrize(
    "settings", [dict(mc_samples=3, uq_every=2), dict(mc_samples=0, covariance="none", skip="covariance")]
)
@pytest.mark.parametrize("guidance_scale", [SCALE, 1.0])
def test_callback_leaves_the_images_and_tracks_the_wrappers_moments(sd, settings, guidance_scale):
    pipe, post, cond, uncond = sd
    pipe.scheduler = sd_scheduler()
    call = sd_call(cond, uncond, guidance_scale=guidance_scale)
    stock = pipe(generator=seeded(), **call).images
    generator = seeded()
    callback = UncertaintyCallback(post, generator=generator, return_trace=True, **settings)
    images = pipe(generator=generator, callback_on_step_end=callback, **call).images
    assert_same_images(stock, images)
    assert not pipe.unet._forward_hooks and not post.head._forward_pre_hooks  # removed after the last step

    wrapped = BayesDiffPipeline.from_pipe(pipe, post)(
        generator=seeded(), decode_samples=0, **settings, **call
    )
    torch.testing.assert_close(callback.mean, wrapped.mean)
    torch.testing.assert_close(callback.variance, wrapped.variance)
    torch.testing.assert_close(callback.scores, wrapped.scores)
    assert len(callback.trace) == STEPS
    assert callback.extra_unet_calls == (1 if settings["mc_samples"] else 0)  # none at x_T (Var = 0)
    pixels = callback.pixel_moments(pipe.vae, samples=2, batch_size=4)
    assert pixels.variance.shape == (BATCH, 3, 16, 16)


def test_callback_refuses_steps_it_cannot_follow(sd):
    pipe, post, cond, uncond = sd
    pipe.scheduler = DPMSolverSinglestepScheduler(num_train_timesteps=1000, solver_order=2)
    callback = UncertaintyCallback(post, mc_samples=2)
    with pytest.raises(ValueError, match="two-stage steps"):
        pipe(callback_on_step_end=callback, **sd_call(cond, uncond))
    assert not pipe.unet._forward_hooks and not post.head._forward_pre_hooks  # removed when the step failed
    pipe.scheduler = EulerDiscreteScheduler.from_config(sd_scheduler().config)
    with pytest.raises(ValueError, match="scales the model input"):
        pipe(callback_on_step_end=UncertaintyCallback(post, mc_samples=2), **sd_call(cond, uncond))
    pipe.scheduler = sd_scheduler()
    with (
        UncertaintyCallback(post, mc_samples=2) as callback,
        pytest.raises(ValueError, match="guidance_rescale"),
    ):
        pipe(callback_on_step_end=callback, guidance_rescale=0.5, **sd_call(cond, uncond))
    idle = UncertaintyCallback(post)
    assert pipe.unet._forward_hooks
    idle.close()
    assert not pipe.unet._forward_hooks and not post.head._forward_pre_hooks
    with pytest.raises(RuntimeError, match="create one per pipeline call"):
        pipe(callback_on_step_end=idle, **sd_call(cond, uncond))
    with pytest.raises(ValueError, match="guidance variance must be one of"):
        UncertaintyCallback(post, guidance_variance="paper")
    with pytest.raises(ValueError, match="mc_samples must be"):
        UncertaintyCallback(post, mc_samples=-1)
