"""One settings object: presets, explicit overrides, refusals that name the arguments, the paper preset unchanged."""

import pytest
import torch
from diffusers import DDIMScheduler
from test_sampler import _noise, _posterior
from tiny_models import tiny_unet

from bayesdiff_ext import BayesDiffSampler, UncertaintyCallback
from bayesdiff_ext.sampler.settings import DEFAULT_PRESET, PRESETS, UncertaintySettings, resolve_settings


def test_nothing_given_is_the_default_preset_and_presets_resolve():
    default = resolve_settings()
    assert default.preset == DEFAULT_PRESET and default.estimator == PRESETS[DEFAULT_PRESET]["estimator"]
    paper = resolve_settings(preset="paper")
    assert (paper.estimator, paper.uq_every, paper.mc_samples, paper.covariance) == ("recurrence", 5, 10, "mc")
    assert resolve_settings(preset="accurate").estimator == "trajectories"


def test_explicit_arguments_override_the_preset():
    assert resolve_settings(preset="accurate", samples=32).samples == 32
    assert resolve_settings(preset="paper", uq_every=1).uq_every == 1
    switched = resolve_settings(preset="fast", estimator="recurrence")
    assert switched.estimator == "recurrence" and switched.preset is None and switched.uq_every == 5
    again = resolve_settings(settings=resolve_settings(preset="accurate"), draws="independent")
    assert (again.samples, again.draws, again.preset) == (PRESETS["accurate"]["samples"], "independent", "accurate")


def test_draws_are_shared_by_default_from_weight_seed_and_per_image_on_request():
    default = resolve_settings()
    assert (default.shared_draws, default.weight_seed) == (True, 0)
    assert resolve_settings(preset="accurate", weight_seed=9).weight_seed == 9
    own = resolve_settings(preset="fast", shared_draws=False)
    assert (own.shared_draws, own.weight_seed) == (False, None)
    again = resolve_settings(settings=own, shared_draws=True)
    assert (again.shared_draws, again.weight_seed) == (True, 0)
    assert resolve_settings(estimator="linearised").shared_draws


def test_recurrence_arguments_alone_mean_the_recurrence_with_the_papers_values():
    implied = resolve_settings(mc_samples=4)
    assert implied.estimator == "recurrence" and implied.uq_every == 5 and implied.mc_samples == 4
    closed = resolve_settings(covariance="none")
    assert closed.mc_samples == 0  # the closed form: no Monte Carlo, no cost


@pytest.mark.parametrize(
    "arguments,fragment",
    [
        (dict(preset="fast", uq_every=2), "uq_every is not an argument of the 'trajectories' estimator"),
        (dict(preset="paper", samples=4), "samples is not an argument of the 'recurrence' estimator"),
        (dict(estimator="linearised", centre="mean"), "centre is not an argument of the 'linearised'"),
        (dict(covariance="none", skip="covariance"), "skip='covariance'"),
        (dict(covariance="none", eps_variance="bayesdiff"), "eps_variance='bayesdiff'"),
        (dict(covariance="regression", mc_samples=1), "needs mc_samples >= 2"),
        (dict(covariance="mc", mc_samples=0), "needs mc_samples >= 1"),
        (dict(samples=3, draws="antithetic"), "even number of samples"),
        (dict(estimator="linearised", draws="antithetic"), "antithetic"),
        (dict(uq_every=0), "uq_every must be an integer >= 1"),
        (dict(shared_draws=False, weight_seed=3), "weight_seed seeds the draws every image shares"),
        (dict(weight_seed=-1), "weight_seed must be an integer >= 0"),
        (dict(shared_draws="yes"), "shared_draws must be True or False"),
        (dict(preset="paper", weight_seed=1), "weight_seed is not an argument of the 'recurrence' estimator"),
        (dict(preset="best"), "preset must be one of"),
        (dict(estimator="ensemble"), "estimator must be one of"),
    ],
)
def test_combinations_that_mean_nothing_are_refused_by_name(arguments, fragment):
    with pytest.raises(ValueError, match=fragment.replace("(", r"\(")):
        resolve_settings(**arguments)


def test_unknown_arguments_and_settings_types():
    with pytest.raises(TypeError, match="samples must be an integer"):
        resolve_settings(samples=True)
    with pytest.raises(TypeError, match="unknown uncertainty argument"):
        resolve_settings(uq_everyy=2)
    with pytest.raises(TypeError, match="UncertaintySettings"):
        resolve_settings(settings={"estimator": "recurrence"})
    with pytest.raises(ValueError, match="estimator must be one of"):
        UncertaintySettings(estimator="nope")


@pytest.fixture(scope="module")
def unet_and_posterior():
    unet = tiny_unet()
    return unet, _posterior(unet)


def test_paper_preset_is_the_recurrence_with_the_papers_arguments_bit_for_bit(unet_and_posterior):
    unet, posterior = unet_and_posterior

    def run(**uncertainty):
        return BayesDiffSampler(unet, DDIMScheduler(clip_sample=False), posterior).sample(
            noise=_noise(), num_inference_steps=10, generator=torch.Generator().manual_seed(2), progress=False,
            **uncertainty,
        )

    preset = run(preset="paper")
    explicit = run(uq_every=5, mc_samples=10, covariance="mc", eps_variance="total", skip="all", mode="deterministic")
    for field in ("images", "variance", "mean", "aleatoric_variance"):
        assert torch.equal(getattr(preset, field), getattr(explicit, field))
    assert preset.settings["preset"] == "paper" and preset.timings["mc_unet_calls"] == 1  # steps 5 (not 0)


def test_default_runs_the_default_presets_estimator(unet_and_posterior):
    unet, posterior = unet_and_posterior
    out = BayesDiffSampler(unet, DDIMScheduler(clip_sample=False), posterior).sample(
        noise=_noise(), num_inference_steps=3, progress=False
    )
    assert out.settings["estimator"] == PRESETS[DEFAULT_PRESET]["estimator"] and out.settings["preset"] == DEFAULT_PRESET


def test_callback_defaults_to_the_paper_preset_and_refuses_trajectories(unet_and_posterior):
    unet, posterior = unet_and_posterior
    callback = UncertaintyCallback(posterior)
    assert callback.settings["preset"] == "paper" and callback.settings["uq_every"] == 5
    callback.close()
    with pytest.raises(ValueError, match=r"mode='deterministic' or the linearised estimator \(got estimator='trajectories'\)"):
        UncertaintyCallback(posterior, preset="accurate")
    with pytest.raises(ValueError, match=r"\(got estimator='recurrence', mode='bayesdiff'\)"):
        UncertaintyCallback(posterior, mode="bayesdiff")


def test_clamped_pixels_are_counted_and_the_default_preset_has_none():
    """The bundled digits model at the paper's settings clamps some estimates to 0 (13–17 of 256
    pixels per image at 10 DDIM steps); every exact zero is counted; the trajectories clamp nothing."""
    from bayesdiff_ext import LastLayerLaplace, digits
    from bayesdiff_ext.randomness import image_generators

    unet = digits.load_bundled_unet()
    posterior = LastLayerLaplace.load(digits.bundled_dir() / "posterior_diag.safetensors", unet)

    def run(**uncertainty):
        return BayesDiffSampler(unet, DDIMScheduler.from_config(digits.load_bundled_scheduler().config), posterior).sample(
            batch_size=2, generator=image_generators(0, range(2)), num_inference_steps=10, progress=False, **uncertainty
        )

    paper = run(preset="paper")
    assert int(paper.clamped_pixels.sum()) > 0
    assert torch.equal(paper.clamped_pixels, (paper.variance == 0).flatten(1).sum(1))
    default = run(samples=2)
    assert int(default.clamped_pixels.sum()) == 0 and bool((default.variance > 0).all())
