"""x0-drift: the x̂₀ conversion against every scheduler's own, and the method end to end."""

import pytest
import torch
from diffusers import (
    DDIMPipeline,
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    DPMSolverSinglestepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    HeunDiscreteScheduler,
    LMSDiscreteScheduler,
    UNet2DModel,
    UniPCMultistepScheduler,
)

from bayesdiff_ext import methods
from bayesdiff_ext.methods.point import PointPosterior
from bayesdiff_ext.methods.x0_drift import X0DriftSampler, drift_variance, predicted_x0
from bayesdiff_ext.sampler import BayesDiffSampler

TRAIN = dict(num_train_timesteps=100, beta_schedule="squaredcos_cap_v2")


def _unet(seed=0, channels=2):
    torch.manual_seed(seed)
    return UNet2DModel(
        sample_size=8,
        in_channels=channels,
        out_channels=channels,
        block_out_channels=(8, 8),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
    ).eval()


def _walk(scheduler, steps=6, seed=0):
    """(index, t, sample, output, step output) of a loop driven by random outputs."""
    generator = torch.Generator().manual_seed(seed)
    scheduler.set_timesteps(steps)
    x = torch.randn(3, 2, 5, 7, generator=generator, dtype=torch.float64) * getattr(scheduler, "init_noise_sigma", 1.0)
    for index, t in enumerate(scheduler.timesteps):
        out = torch.randn(x.shape, generator=generator, dtype=torch.float64)
        result = scheduler.step(out, t, x)
        yield index, t, x, out, result
        x = result.prev_sample


FAMILIES = {
    "ddim": lambda p: DDIMScheduler(**TRAIN, clip_sample=False, prediction_type=p),
    "ddpm": lambda p: DDPMScheduler(**TRAIN, clip_sample=False, prediction_type=p),
    "euler": lambda p: EulerDiscreteScheduler(**TRAIN, prediction_type=p),
    "euler_ancestral": lambda p: EulerAncestralDiscreteScheduler(**TRAIN, prediction_type=p),
    "lms": lambda p: LMSDiscreteScheduler(**TRAIN, prediction_type=p),
    "heun": lambda p: HeunDiscreteScheduler(**TRAIN, prediction_type=p),
}
# EulerAncestral has no sample prediction (its step raises NotImplementedError), so that pair is not a case.
PAIRS = [
    (name, prediction)
    for name in FAMILIES
    for prediction in ("epsilon", "v_prediction", "sample")
    if (name, prediction) != ("euler_ancestral", "sample")
]


@pytest.mark.parametrize("name,prediction", PAIRS, ids=[f"{n}-{p}" for n, p in PAIRS])
def test_x0_matches_the_schedulers_own_prediction(name, prediction):
    scheduler = FAMILIES[name](prediction)
    for index, t, x, out, result in _walk(scheduler):
        ours = predicted_x0(scheduler, out, x, t, index)
        # The schedulers' tables are float32: agreement to float32 round-off.
        torch.testing.assert_close(ours, result.pred_original_sample, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
@pytest.mark.parametrize(
    "family",
    [
        lambda p: DPMSolverMultistepScheduler(**TRAIN, prediction_type=p),
        lambda p: DPMSolverSinglestepScheduler(**TRAIN, prediction_type=p),
        lambda p: DPMSolverMultistepScheduler(**TRAIN, prediction_type=p, use_karras_sigmas=True),
        lambda p: UniPCMultistepScheduler(**TRAIN, prediction_type=p),
    ],
    ids=["dpm_multistep", "dpm_singlestep", "dpm_karras", "unipc"],
)
def test_x0_matches_the_x0_that_dpm_solvers_keep(family, prediction):
    scheduler = family(prediction)
    for index, t, x, out, _ in _walk(scheduler):
        # After its step, the solver holds its own conversion of the output to x̂₀.
        torch.testing.assert_close(
            predicted_x0(scheduler, out, x, t, index), scheduler.model_outputs[-1], rtol=1e-6, atol=1e-6
        )


def test_x0_of_flow_matching_is_the_point_its_step_interpolates_from():
    for scheduler in (
        FlowMatchEulerDiscreteScheduler(num_train_timesteps=100, shift=3.0),
        DPMSolverMultistepScheduler(
            **TRAIN, use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=3.0
        ),
    ):
        for index, t, x, out, result in _walk(scheduler):
            x0 = predicted_x0(scheduler, out, x, t, index)
            if isinstance(scheduler, FlowMatchEulerDiscreteScheduler):
                # x_next = (1 − σ')·x̂₀ + σ'·ε̂ with ε̂ = x̂₀ + v̂ (v = ε − x₀): Euler's step, rewritten.
                sigma_next = float(scheduler.sigmas[index + 1])
                expected = (1 - sigma_next) * x0 + sigma_next * (x0 + out)
                torch.testing.assert_close(result.prev_sample, expected, rtol=1e-6, atol=1e-6)
            else:
                torch.testing.assert_close(x0, scheduler.model_outputs[-1], rtol=1e-6, atol=1e-6)


def test_unsupported_schedules_and_predictions_are_refused():
    with pytest.raises(ValueError, match="prediction_type"):
        scheduler = DDIMScheduler(**TRAIN)
        scheduler.register_to_config(prediction_type="noise")
        predicted_x0(scheduler, torch.zeros(1), torch.zeros(1), 10, 0)
    from diffusers import EDMEulerScheduler

    with pytest.raises(ValueError, match="EDMEulerScheduler"):
        scheduler = EDMEulerScheduler()
        scheduler.set_timesteps(4)
        predicted_x0(scheduler, torch.zeros(1), torch.zeros(1), scheduler.timesteps[0], 0)


def test_drift_variance_is_the_unbiased_variance_over_the_last_steps():
    a, b, c = (torch.full((1, 1, 2, 2), v) for v in (5.0, 1.0, 3.0))
    variance, mean = drift_variance([a, b, c], last_steps=2)
    assert torch.equal(variance, torch.full_like(variance, 2.0, dtype=torch.float64))  # var(1, 3)
    assert torch.equal(mean, torch.full_like(mean, 2.0, dtype=torch.float64))
    assert torch.equal(drift_variance([a, a, a], 3)[0], torch.zeros_like(variance))
    with pytest.raises(ValueError, match="last_steps must be an integer >= 2"):
        drift_variance([a, b], 1)
    with pytest.raises(ValueError, match="fewer than last_steps=4"):
        drift_variance([a, b, c], 4)


def test_the_method_samples_the_stock_images_and_scores_their_drift():
    unet = _unet()
    scheduler = DDIMScheduler(**TRAIN, clip_sample=False)
    noise = torch.randn(3, 2, 8, 8, generator=torch.Generator().manual_seed(0))
    sampler = methods.sampler_for("x0-drift", unet, scheduler, last_steps=3)
    assert isinstance(sampler, X0DriftSampler)
    out = sampler.sample(noise=noise, num_inference_steps=5, progress=False)
    stock = BayesDiffSampler(unet, scheduler, PointPosterior(unet)).sample(
        noise=noise, num_inference_steps=5, mc_samples=0, covariance="none", progress=False
    )
    assert torch.equal(out.images, stock.images)
    # The drift by hand: the last three x̂₀ of the same loop.
    scheduler.set_timesteps(5)
    x, predictions = noise.clone(), []
    with torch.no_grad():
        for index, t in enumerate(scheduler.timesteps):
            eps = unet(x, t).sample
            abar = scheduler.alphas_cumprod[t].double()
            predictions.append((x.double() - (1 - abar).sqrt() * eps.double()) / abar.sqrt())
            x = scheduler.step(eps, t, x).prev_sample
    expected = torch.stack(predictions[-3:]).var(dim=0)
    torch.testing.assert_close(out.variance, expected)
    torch.testing.assert_close(out.scores, expected.flatten(1).sum(1))
    assert out.timings["image_unet_calls"] == 5 and out.timings["mc_unet_calls"] == 0
    assert torch.equal(out.aleatoric_variance, torch.zeros_like(out.variance))


def test_the_method_runs_the_pipelines_loop_for_any_scheduler_and_seed():
    unet = _unet(channels=3)
    scheduler = DDIMScheduler(**TRAIN, clip_sample=False)
    images = X0DriftSampler(unet, scheduler, last_steps=2).sample(
        batch_size=2, num_inference_steps=4, generator=torch.Generator().manual_seed(7), progress=False
    ).images
    pipe = DDIMPipeline(unet=unet, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    stock = pipe(batch_size=2, num_inference_steps=4, generator=torch.Generator().manual_seed(7), output_type="np")
    torch.testing.assert_close((images / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy(), stock.images, rtol=0, atol=0)
    euler = EulerAncestralDiscreteScheduler(**TRAIN)
    out = X0DriftSampler(unet, euler, last_steps=3).sample(
        batch_size=2, num_inference_steps=4, generator=torch.Generator().manual_seed(0), progress=False
    )
    assert out.variance.shape == (2, 3, 8, 8) and (out.variance >= 0).all() and out.scores.isfinite().all()


def test_bad_settings_name_the_argument():
    unet = _unet()
    with pytest.raises(ValueError, match="last_steps"):
        X0DriftSampler(unet, DDIMScheduler(**TRAIN), last_steps=1)
    sampler = X0DriftSampler(unet, DDPMScheduler(**TRAIN, clip_sample=False), last_steps=3)
    with pytest.raises(ValueError, match="eta=0.5 but DDPMScheduler.step takes no eta"):
        sampler.sample(batch_size=1, num_inference_steps=4, eta=0.5, progress=False)
    with pytest.raises(ValueError, match="fewer than last_steps=3"):
        sampler.sample(batch_size=1, num_inference_steps=2, progress=False)
