"""The wrapper and the callback on SD 1.5, SDXL, SD3, Flux, PixArt-Σ and DiT with their default schedulers
(tiny random-init components, offline): images bitwise the stock call's, the callback's moments equal
the wrapper's, the guidance forms' exact variance, pixel maps through each pipeline's own VAE path."""

import inspect

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, EulerAncestralDiscreteScheduler, EulerDiscreteScheduler
from diffusers.utils import BaseOutput
from pipeline_components import (
    dit_pipeline,
    fitted_posterior,
    flux_pipeline,
    pixart_pipeline,
    sd3_pipeline,
    sd15_pipeline,
    sdxl_pipeline,
    text_embeddings,
)

from bayesdiff_ext import BayesDiffOutput, BayesDiffPipeline, UncertaintyCallback
from bayesdiff_ext.guidance import guided_head_moments
from bayesdiff_ext.pipelines import fit_pipeline_posterior
from bayesdiff_ext.sampler.schedulers import step_coefficients

BATCH, STEPS, SCALE, SIZE = 2, 3, 3.0, 16


def seeded(seed=0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _ddim(pipe):
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, clip_sample=False)
    return pipe


# name: (pipeline, the stock call's own arguments besides the embeddings, the callback's guidance_scale)
FAMILIES = {
    "sd15-ddim": (lambda: _ddim(sd15_pipeline()), dict(guidance_scale=SCALE), None),
    "sdxl": (sdxl_pipeline, dict(guidance_scale=SCALE, height=SIZE, width=SIZE), None),
    # two images per prompt and a negative size conditioning: the stock time-id rows alternate by branch
    "sdxl-micro-conditions": (
        sdxl_pipeline,
        dict(guidance_scale=SCALE, height=SIZE, width=SIZE, num_images_per_prompt=2,
             negative_original_size=(8, 8), negative_target_size=(12, 12)),
        None,
    ),
    "sd3": (sd3_pipeline, dict(guidance_scale=SCALE, height=SIZE, width=SIZE), None),
    "flux": (flux_pipeline, dict(height=SIZE, width=SIZE), None),
    "flux-distilled": (lambda: flux_pipeline(guidance_embeds=True), dict(height=SIZE, width=SIZE), None),
    "flux-true-cfg": (flux_pipeline, dict(height=SIZE, width=SIZE, true_cfg_scale=SCALE), SCALE),
    "pixart-ddim": (
        lambda: _ddim(pixart_pipeline()),
        dict(guidance_scale=SCALE, use_resolution_binning=False, negative_prompt=None),
        None,
    ),
    "dit": (dit_pipeline, dict(class_labels=[3, 7], guidance_scale=SCALE), None),
}
CALLBACK_FAMILIES = ["sdxl", "sd3", "flux", "flux-distilled", "flux-true-cfg"]


_BUILT = {}


def family(name):
    """(pipe, posterior, stock call) of a family, built once per test session."""
    if name not in _BUILT:
        make, arguments, _ = FAMILIES[name]
        pipe = make()
        embeddings = {} if name == "dit" else text_embeddings(pipe, BATCH)
        call = dict(num_inference_steps=STEPS, output_type="np", **embeddings, **arguments)
        _BUILT[name] = pipe, fitted_posterior(pipe, embeddings), call
    return _BUILT[name]


def _finite_nonnegative(t: torch.Tensor) -> None:
    assert bool(torch.isfinite(t).all()) and t.min() >= 0 and t.sum() > 0


@pytest.mark.parametrize("name", list(FAMILIES))
def test_images_equal_the_stock_call_with_latent_and_pixel_variance(name):
    pipe, posterior, call = family(name)
    stock = pipe(generator=seeded(), **call).images
    out = BayesDiffPipeline.from_pipe(pipe, posterior)(generator=seeded(), mc_samples=3, decode_samples=3, **call)
    assert np.array_equal(stock, out.images)
    assert isinstance(out, BayesDiffOutput) and isinstance(out, BaseOutput)
    images = len(stock)
    latent_shape = (images, 16, 16) if name.startswith("flux") else (images, 4, 8, 8)  # Flux: packed tokens
    assert out.variance.shape == out.mean.shape == latent_shape and out.variance.dtype == torch.float32
    _finite_nonnegative(out.variance)
    torch.testing.assert_close(out.aleatoric_variance + out.epistemic_variance, out.variance)
    assert out.pixel_variance.shape == (images, 3, SIZE, SIZE)
    _finite_nonnegative(out.pixel_variance)
    torch.testing.assert_close(out.pixel_scores, out.pixel_variance.flatten(1).sum(1))


@pytest.mark.parametrize("name", [name for name in FAMILIES if name != "dit"])  # DiT has no latent output
def test_the_pixel_draws_decode_through_the_stock_decode_path(name):
    """The decoder the pixel draws go through maps the stock call's latents to its images, bit for bit."""
    pipe, posterior, call = family(name)
    wrapper = BayesDiffPipeline.from_pipe(pipe, posterior)
    latents = pipe(generator=seeded(), **{**call, "output_type": "latent"}).images
    decoded = wrapper.decoder(SIZE, SIZE)(latents)
    images = pipe.image_processor.postprocess(decoded, output_type="np")
    assert np.array_equal(images, pipe(generator=seeded(), **call).images)


@pytest.mark.parametrize("name", CALLBACK_FAMILIES)
def test_callback_follows_the_stock_loop_with_the_wrappers_moments(name):
    pipe, posterior, call = family(name)
    settings = dict(mc_samples=3, uq_every=2)
    stock = pipe(generator=seeded(), **call).images
    generator = seeded()
    callback = UncertaintyCallback(
        posterior, generator=generator, guidance_scale=FAMILIES[name][2], return_trace=True, **settings
    )
    images = pipe(generator=generator, callback_on_step_end=callback, **call).images
    assert np.array_equal(stock, images)
    assert not pipe.transformer._forward_hooks if hasattr(pipe, "transformer") else not pipe.unet._forward_hooks
    wrapped = BayesDiffPipeline.from_pipe(pipe, posterior)(
        generator=seeded(), decode_samples=3, decode_generator=seeded(9), **settings, **call
    )
    output = callback.output
    assert isinstance(output, BayesDiffOutput) and len(output.trace) == STEPS
    torch.testing.assert_close(output.mean, wrapped.mean)
    torch.testing.assert_close(output.variance, wrapped.variance)
    torch.testing.assert_close(output.epistemic_variance, wrapped.epistemic_variance)
    assert callback.extra_unet_calls == 1  # the uncertainty steps 0 (closed form at x_T) and 2
    pixels = callback.pixel_moments(pipe, samples=3, generator=seeded(9), height=SIZE, width=SIZE)
    torch.testing.assert_close(pixels.variance, wrapped.pixel_variance)


def test_callback_follows_euler_in_stable_diffusion_too():
    """Euler's model input x/√(σ²+1) is scaled for each step from the scheduler's table."""
    pipe, posterior, call = family("sd15-ddim")
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    try:
        generator = seeded()
        callback = UncertaintyCallback(posterior, generator=generator, mc_samples=2)
        pipe(generator=generator, callback_on_step_end=callback, **call)
        wrapped = BayesDiffPipeline.from_pipe(pipe, posterior)(generator=seeded(), mc_samples=2, decode_samples=0, **call)
    finally:
        _ddim(pipe)
    torch.testing.assert_close(callback.mean, wrapped.mean)
    torch.testing.assert_close(callback.variance, wrapped.variance)


def test_callback_follows_pixart_through_its_legacy_callback():
    pipe, posterior, call = family("pixart-ddim")
    generator = seeded()
    callback = UncertaintyCallback(posterior, generator=generator, mc_samples=2, guidance_scale=SCALE)
    images = pipe(generator=generator, callback=callback.legacy(pipe), **call).images
    assert np.array_equal(images, pipe(generator=seeded(), **call).images)
    wrapped = BayesDiffPipeline.from_pipe(pipe, posterior)(generator=seeded(), mc_samples=2, decode_samples=0, **call)
    torch.testing.assert_close(callback.variance, wrapped.variance)
    with pytest.raises(ValueError, match="does not expose its scale"):
        pipe(callback=UncertaintyCallback(posterior, mc_samples=2).legacy(pipe), **call)


def test_dit_guidance_variance_is_the_heads_at_phi_cfg_with_cond_first_rows():
    pipe, posterior, call = family("dit")
    out = BayesDiffPipeline.from_pipe(pipe, posterior)(
        generator=seeded(), mc_samples=0, covariance="none", return_trace=True, decode_samples=0, **call
    )
    first = step_coefficients(pipe.scheduler)[0]
    x_t = torch.randn(BATCH, 4, 8, 8, generator=seeded())
    labels = torch.tensor(call["class_labels"] + [1000] * BATCH)  # DiTPipeline's [cond; uncond]
    with torch.no_grad(), posterior.capture() as cap:
        pipe.transformer(torch.cat([x_t, x_t]), timestep=torch.full((2 * BATCH,), first.timestep), class_labels=labels)
    phi_cond, phi_uncond = cap.phi.chunk(2)
    _, head_var = guided_head_moments(posterior, torch.cat([phi_uncond, phi_cond]), SCALE)
    torch.testing.assert_close(out.trace[0]["variance"], first.b[0] ** 2 * head_var)


def test_flux_true_cfg_variance_is_the_heads_at_phi_cfg_of_its_two_forwards():
    pipe, posterior, call = family("flux-true-cfg")
    wrapper = BayesDiffPipeline.from_pipe(pipe, posterior)
    out = wrapper(generator=seeded(), mc_samples=0, covariance="none", return_trace=True, decode_samples=0, **call)
    conditioning = wrapper._encode(wrapper.stock_arguments(**call), True, SIZE, SIZE)
    x_t, _ = pipe.prepare_latents(BATCH, 4, SIZE, SIZE, torch.float32, "cpu", seeded(), None)
    first = step_coefficients(pipe.scheduler)[0]
    phis = []
    for kwargs in (conditioning.uncond, conditioning.cond):
        kwargs = {**conditioning.cond, **kwargs}
        with torch.no_grad(), posterior.capture() as cap:
            pipe.transformer(hidden_states=x_t, timestep=torch.full((BATCH,), first.timestep / 1000), **kwargs)
        phis.append(cap.phi)
    _, head_var = guided_head_moments(posterior, torch.cat(phis), SCALE)
    torch.testing.assert_close(out.trace[0]["variance"], first.b[0] ** 2 * head_var)


@pytest.mark.parametrize(
    "name,arguments,match",
    [
        ("sdxl", dict(guidance_rescale=0.7), "guidance_rescale=0.7 is not supported"),
        ("sdxl", dict(denoising_end=0.8), "denoising_end"),
        ("sd3", dict(skip_guidance_layers=[0]), "skip_guidance_layers"),
        ("sd3", dict(callback_on_step_end=lambda *a: {}), "UncertaintyCallback"),
    ],
)
def test_wrappers_refuse_what_is_not_linear_or_not_theirs(name, arguments, match):
    pipe, posterior, call = family(name)
    with pytest.raises(ValueError, match=match):
        BayesDiffPipeline.from_pipe(pipe, posterior)(**call, **arguments)


# SD 1.5 and PixArt-Σ with their default multistep schedulers, and the DDIM family whose weights they share
DEFAULT_SCHEDULERS = {"sd15-pndm": (sd15_pipeline, "sd15-ddim"), "pixart-dpm-solver": (pixart_pipeline, "pixart-ddim")}


def default_scheduler_family(name):
    """(pipe with its default scheduler, the posterior fitted on the same weights, stock call)."""
    make, fitted = DEFAULT_SCHEDULERS[name]
    _, posterior, call = family(fitted)
    pipe = make()
    return pipe, posterior.for_model(getattr(pipe, "unet", None) or pipe.transformer), call


@pytest.mark.parametrize("name", list(DEFAULT_SCHEDULERS))
def test_default_multistep_schedulers_run_through_the_wrapper_with_the_default_preset(name):
    """PNDM (PLMS, skip_prk_steps) and DPM-Solver++ 2M: trajectory Monte Carlo runs their own loop, so the
    images are the stock call's and the maps come through the VAE."""
    pipe, posterior, call = default_scheduler_family(name)
    scheduler = type(pipe.scheduler).__name__
    stock = pipe(generator=seeded(), **call).images
    out = BayesDiffPipeline.from_pipe(pipe, posterior)(generator=seeded(), decode_samples=3, **call)
    assert np.array_equal(stock, out.images)
    assert out.settings["estimator"] == "trajectories" and out.settings["preset"] == "fast"
    assert out.settings["scheduler"] == scheduler and type(pipe.scheduler).__name__ == scheduler
    assert out.variance.shape == out.mean.shape == (BATCH, 4, 8, 8)
    _finite_nonnegative(out.variance)
    assert out.pixel_variance.shape == (BATCH, 3, SIZE, SIZE)
    _finite_nonnegative(out.pixel_variance)
    latents = pipe(generator=seeded(), **{**call, "output_type": "latent"}).images
    decoded = BayesDiffPipeline.from_pipe(pipe, posterior).decoder(SIZE, SIZE)(latents)
    assert np.array_equal(pipe.image_processor.postprocess(decoded, output_type="np"), stock)
    # the linearised estimator's tangents run the same loop inside torch.func (set_timesteps outside it)
    linearised = BayesDiffPipeline.from_pipe(pipe, posterior)(
        generator=seeded(), estimator="linearised", samples=2, decode_samples=0, **call
    )
    assert np.array_equal(stock, linearised.images)
    _finite_nonnegative(linearised.variance)


@pytest.mark.parametrize("name", [*DEFAULT_SCHEDULERS, "sdxl", "flux-true-cfg"])
def test_callback_runs_the_linearised_estimator_with_the_wrappers_moments(name):
    """The callback's tangents, carried step by step through a copy of the pipeline's scheduler, give the
    wrapper's linearised variance (its tangents of the whole trajectory): PNDM, DPM-Solver++ 2M (PixArt-Σ's
    older callback=), Euler and Flux's two forwards per step."""
    pipe, posterior, call = default_scheduler_family(name) if name in DEFAULT_SCHEDULERS else family(name)
    settings = dict(estimator="linearised", samples=3)
    stock = pipe(generator=seeded(), **call).images
    generator = seeded()
    scale = SCALE if name.startswith(("pixart", "flux")) else None
    callback = UncertaintyCallback(posterior, generator=generator, guidance_scale=scale, **settings)
    if name.startswith("pixart"):
        images = pipe(generator=generator, callback=callback.legacy(pipe), **call).images
    else:
        images = pipe(generator=generator, callback_on_step_end=callback, **call).images
    assert np.array_equal(stock, images)
    wrapped = BayesDiffPipeline.from_pipe(pipe, posterior)(
        generator=seeded(), decode_samples=3, decode_generator=seeded(9), **settings, **call
    )
    output = callback.output
    assert output.settings["estimator"] == "linearised"
    assert output.settings["scheduler"] == type(pipe.scheduler).__name__
    torch.testing.assert_close(output.mean, wrapped.mean)
    torch.testing.assert_close(output.variance, wrapped.variance, rtol=1e-4, atol=1e-6)
    _finite_nonnegative(output.variance)
    pixels = callback.pixel_moments(pipe, samples=3, generator=seeded(9), height=SIZE, width=SIZE)
    torch.testing.assert_close(pixels.variance, wrapped.pixel_variance, rtol=1e-3, atol=1e-6)


def test_callback_linearised_refuses_a_step_that_draws_noise():
    pipe, posterior, call = default_scheduler_family("sd15-pndm")
    pipe.scheduler = EulerAncestralDiscreteScheduler.from_config(pipe.scheduler.config)
    callback = UncertaintyCallback(posterior, estimator="linearised", samples=2)
    with pytest.raises(ValueError, match="EulerAncestralDiscreteScheduler draws noise in its step"):
        pipe(generator=seeded(), callback_on_step_end=callback, **call)
    assert not pipe.unet._forward_hooks
    with pytest.raises(ValueError, match="return_trace"):
        UncertaintyCallback(posterior, estimator="linearised", return_trace=True)
    with pytest.raises(ValueError, match="trajectory Monte Carlo use BayesDiffPipeline"):
        UncertaintyCallback(posterior, estimator="trajectories")


def test_default_multistep_schedulers_are_refused_by_name():
    """SD 1.5's PNDM and PixArt-Σ's DPM-Solver++ 2M: the recurrence (preset 'paper') names them and
    trajectory Monte Carlo, which runs them (the default preset)."""
    for family_name in DEFAULT_SCHEDULERS:
        pipe, posterior, call = default_scheduler_family(family_name)
        name = type(pipe.scheduler).__name__
        with pytest.raises(ValueError, match=f"{name} is a multistep scheduler.*estimator='trajectories'"):
            BayesDiffPipeline.from_pipe(pipe, posterior)(preset="paper", **call)


def test_callback_refuses_forms_it_cannot_follow():
    pipe, posterior, call = family("flux-true-cfg")
    with pytest.raises(ValueError, match="guidance_scale=true_cfg_scale"):
        pipe(callback_on_step_end=UncertaintyCallback(posterior, mc_samples=2), **call)
    pipe = sd15_pipeline()  # SD 1.5's PNDM: the callback cannot run the trajectories the refusal names
    _, posterior, call = family("sd15-ddim")
    with pytest.raises(ValueError, match="PNDMScheduler is a multistep.*estimator='linearised'.*run BayesDiffPipeline"):
        pipe(callback_on_step_end=UncertaintyCallback(posterior.for_model(pipe.unet), mc_samples=2), **call)
    pipe, posterior, call = family("sd3")
    with pytest.raises(ValueError, match="skip_guidance_layers"):
        pipe(callback_on_step_end=UncertaintyCallback(posterior, mc_samples=2), skip_guidance_layers=[0],
             skip_layer_guidance_stop=1.0, **call)
    assert not pipe.transformer._forward_hooks


def test_the_wrapper_behaves_as_the_pipeline(monkeypatch):
    pipe, posterior, call = family("sd3")
    wrapper = BayesDiffPipeline.from_pipe(pipe, posterior)
    assert wrapper.to("cpu") is wrapper
    assert wrapper.device == pipe.device and wrapper.dtype == pipe.dtype and wrapper.components == pipe.components
    assert wrapper.vae is pipe.vae and wrapper.scheduler is pipe.scheduler
    wrapper.set_progress_bar_config(disable=False, desc="x")
    assert pipe._progress_bar_config["desc"] == "x"
    pipe.set_progress_bar_config(disable=True)
    offloads = []
    monkeypatch.setattr(pipe, "enable_model_cpu_offload", lambda *a, **k: offloads.append((a, k)))
    wrapper.enable_model_cpu_offload(gpu_id=0)
    assert offloads == [((), {"gpu_id": 0})]
    signature = inspect.signature(wrapper.__call__)
    stock = inspect.signature(pipe.__call__).parameters
    assert list(signature.parameters)[: len(stock)] == list(stock)
    assert {"mc_samples", "uq_every", "guidance_variance", "decode_samples"} <= set(signature.parameters)
    assert signature.parameters["mc_samples"].kind is inspect.Parameter.KEYWORD_ONLY
    doc = inspect.getdoc(wrapper.__call__)
    assert "Args:" in doc and "prompt_3" in doc and "mc_samples" in doc and "Returns:" in doc
    with pytest.raises(TypeError, match="mc_sample"):
        wrapper(mc_sample=3, **call)
    images, variance, pixel_variance = wrapper(mc_samples=2, decode_samples=2, return_dict=False, **call)
    assert images.shape == (BATCH, SIZE, SIZE, 3) and variance.shape == (BATCH, 4, 8, 8)
    assert pixel_variance.shape == (BATCH, 3, SIZE, SIZE)


def test_fit_pipeline_posterior_conditions_each_batch_with_its_rows():
    pipe = sd3_pipeline(seed=3)
    embeddings = text_embeddings(pipe, 4, seed=5)
    seen = []
    handle = pipe.transformer.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["encoder_hidden_states"].clone()), with_kwargs=True
    )
    try:
        posterior = fit_pipeline_posterior(
            pipe, torch.rand(4, 3, SIZE, SIZE, generator=seeded()) * 2 - 1, structure="kron", batch_size=2,
            progress=False, prompt_embeds=embeddings["prompt_embeds"],
            pooled_prompt_embeds=embeddings["pooled_prompt_embeds"],
        )
    finally:
        handle.remove()
    assert posterior.head is pipe.transformer.proj_out and posterior.fit_stats.n_images == 4
    assert torch.equal(torch.cat(seen), embeddings["prompt_embeds"])
