"""weight-samples and x0-drift through the pipeline wrappers: SD 1.5, SDXL, SD3, Flux, PixArt-Σ and DiT with
their default schedulers (tiny random-init components, offline). The stock images, maps on the decoded
images, the batch-size rule, x̂₀ of the pipelines' own loops, and the refusals."""

import pytest
import torch
from pipeline_components import (
    SIZE,
    dit_pipeline,
    fitted_posterior,
    flux_pipeline,
    pixart_pipeline,
    sd3_pipeline,
    sd15_pipeline,
    sdxl_pipeline,
    text_embeddings,
)

from bayesdiff_ext import BayesDiffPipeline
from bayesdiff_ext.methods.feature_entropy import ClampedFeatures
from bayesdiff_ext.metrics import RandomConvFeatures
from bayesdiff_ext.randomness import image_generators

BATCH, STEPS, SCALE = 2, 2, 3.0

# name: (pipeline with its default scheduler, the stock call's arguments besides the embeddings)
FAMILIES = {
    "sd15-pndm": (sd15_pipeline, dict(guidance_scale=SCALE)),
    "sdxl-euler": (sdxl_pipeline, dict(guidance_scale=SCALE, height=SIZE, width=SIZE)),
    "sd3": (sd3_pipeline, dict(guidance_scale=SCALE, height=SIZE, width=SIZE)),
    "flux": (flux_pipeline, dict(height=SIZE, width=SIZE)),
    "pixart-dpm-solver": (pixart_pipeline, dict(guidance_scale=SCALE, use_resolution_binning=False, negative_prompt=None)),
    "dit": (dit_pipeline, dict(class_labels=[3, 7], guidance_scale=SCALE)),
}
METHODS = {
    "weight-samples": dict(samples=2, features=ClampedFeatures(RandomConvFeatures(in_channels=3, seed=0)), weight_seed=4),
    "x0-drift": dict(last_steps=2),
}
_BUILT = {}


def family(name):
    """(pipe, posterior, the stock call for BATCH images), built once per test session."""
    if name not in _BUILT:
        make, arguments = FAMILIES[name]
        pipe = make()
        embeddings = {} if name == "dit" else text_embeddings(pipe, BATCH)
        if name == "flux":  # no true CFG: the negative embeddings would switch it on
            embeddings = {k: v for k, v in embeddings.items() if not k.startswith("negative")}
        call = dict(num_inference_steps=STEPS, output_type="pt", **embeddings, **arguments)
        _BUILT[name] = pipe, fitted_posterior(pipe, embeddings), call
    return _BUILT[name]


def _image(call: dict, k: int) -> dict:
    """The call for image k alone: every per-image argument's row k."""
    return {
        name: value[k : k + 1] if isinstance(value, (torch.Tensor, list)) else value for name, value in call.items()
    }


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("name", list(FAMILIES))
def test_stock_images_and_maps_on_the_decoded_images_for_any_batch(name, method):
    pipe, posterior, call = family(name)
    stock = pipe(generator=image_generators(0, range(BATCH)), **call).images
    wrapper = BayesDiffPipeline.from_pipe(pipe, posterior if method == "weight-samples" else None, method=method, **METHODS[method])
    out = wrapper(generator=image_generators(0, range(BATCH)), **call)
    assert torch.equal(out.images, stock)  # the method's loop is the stock one
    latent_shape = (BATCH, 16, 16) if name == "flux" else (BATCH, 4, 8, 8)  # Flux: packed tokens
    assert out.variance.shape == out.mean.shape == latent_shape
    assert out.pixel_variance.shape == out.pixel_mean.shape == (BATCH, 3, SIZE, SIZE)
    for variance in (out.variance, out.pixel_variance):
        assert bool(torch.isfinite(variance).all()) and variance.min() >= 0 and (variance.flatten(1).sum(1) > 0).all()
    torch.testing.assert_close(out.pixel_scores, out.pixel_variance.flatten(1).sum(1))
    assert out.settings["method"] == method
    if method == "weight-samples":
        assert out.feature_entropy.shape == (BATCH,) and bool(torch.isfinite(out.feature_entropy).all())
        assert out.settings["feature_entropy"] and out.settings["pixel_maps_from"] == "the M final latents"
    else:
        assert out.feature_entropy is None and out.settings["last_steps"] == 2
    # image 1 alone, from its own generator: the same image, map and score (the randomness rule)
    alone = wrapper(generator=image_generators(0, [1]), **_image(call, 1))
    torch.testing.assert_close(alone.images, out.images[1:], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(alone.pixel_variance, out.pixel_variance[1:], rtol=1e-3, atol=1e-6)
    if method == "weight-samples":
        torch.testing.assert_close(alone.feature_entropy, out.feature_entropy[1:], rtol=1e-4, atol=1e-4)


# Flow matching (SD3, Flux's packed tokens and shifted σ's) and Euler with ε (SDXL): both step
# x' = x + (σ' − σ)·d with x̂₀ = x − σ·d, so x̂₀ follows from two consecutive latents of the stock loop.
@pytest.mark.parametrize("name", ["sdxl-euler", "sd3", "flux"])
def test_x0_drift_is_the_drift_of_the_stock_loops_own_x0(name):
    pipe, _, call = family(name)
    steps, last = 3, 3
    call = dict(call, num_inference_steps=steps)
    wrapper = BayesDiffPipeline.from_pipe(pipe, method="x0-drift", last_steps=last)
    latents = []

    def keep(pipeline, index, t, tensors):
        latents.append(tensors["latents"].clone())
        return {}

    shape = (BATCH, 16, 16) if name == "flux" else (BATCH, 4, 8, 8)
    x_t = torch.randn(shape, generator=torch.Generator().manual_seed(5))
    out = wrapper(latents=x_t, **call)
    pipe(latents=x_t, callback_on_step_end=keep, **call)
    sigmas = pipe.scheduler.sigmas.double()
    trajectory = [x_t.double() * getattr(pipe.scheduler, "init_noise_sigma", 1.0)] + [x.double() for x in latents]
    x0 = [
        trajectory[k] - sigmas[k] * (trajectory[k + 1] - trajectory[k]) / (sigmas[k + 1] - sigmas[k])
        for k in range(steps)
    ]
    decode = wrapper.decoder(SIZE, SIZE)
    decoded = torch.stack([decode(x.float()).double() for x in x0[-last:]])
    torch.testing.assert_close(out.pixel_variance.double(), decoded.var(dim=0), rtol=1e-3, atol=1e-6)
    torch.testing.assert_close(out.variance.double(), torch.stack(x0[-last:]).var(dim=0), rtol=1e-3, atol=1e-6)


def test_unsupported_combinations_name_the_argument():
    pipe, posterior, call = family("sd3")
    with pytest.raises(ValueError, match="method must be one of .*'laplace', 'weight-samples', 'x0-drift'.* got 'mc-dropout'"):
        BayesDiffPipeline.from_pipe(pipe, posterior, method="mc-dropout")
    with pytest.raises(TypeError, match="method 'x0-drift' takes last_steps; got samples"):
        BayesDiffPipeline.from_pipe(pipe, method="x0-drift", samples=3)
    with pytest.raises(ValueError, match="method 'weight-samples' needs a fitted posterior"):
        BayesDiffPipeline.from_pipe(pipe, method="weight-samples")
    with pytest.raises(ValueError, match="weight_seed must be an integer >= 0"):
        BayesDiffPipeline.from_pipe(pipe, posterior, method="weight-samples", weight_seed=-1)
    drift = BayesDiffPipeline.from_pipe(pipe, method="x0-drift", last_steps=2)
    with pytest.raises(ValueError, match="preset choose\\(s\\) the Laplace estimators; method 'x0-drift' takes none"):
        drift(preset="fast", **call)
    with pytest.raises(ValueError, match="return_trace choose"):
        drift(return_trace=True, **call)
    weights = BayesDiffPipeline.from_pipe(pipe, posterior, method="weight-samples", samples=2)
    with pytest.raises(ValueError, match="samples choose\\(s\\) the Laplace estimators; method 'weight-samples'"):
        weights(samples=3, **call)
    with pytest.raises(ValueError, match="fewer than last_steps=3"):
        BayesDiffPipeline.from_pipe(pipe, method="x0-drift", last_steps=3)(**call)
