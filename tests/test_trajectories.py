"""Trajectory Monte Carlo: the stock image, the variance against exact and brute-force answers, any scheduler."""

import inspect

import pytest
import torch
from diffusers import (
    DDIMPipeline,
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    PNDMScheduler,
    UniPCMultistepScheduler,
)
from test_posterior_models import dense_covariance
from test_transformers import conditioning_for, fitted, model_input
from tiny_models import tiny_unet
from torch import nn

from bayesdiff_ext import LastLayerLaplace
from bayesdiff_ext.denoiser import Denoiser
from bayesdiff_ext.guidance import ClassifierFreeGuidance
from bayesdiff_ext.posterior.heads import eps_parameter_vector
from bayesdiff_ext.posterior.perturbation import head_perturbation, perturbed_head
from bayesdiff_ext.randomness import image_generators
from bayesdiff_ext.sampler.trajectories import TrajectorySampler

STEPS, SEED = 4, 7


@pytest.fixture(scope="module")
def unet():
    return tiny_unet(seed=2, add_attention=False)


@pytest.fixture(scope="module")
def posterior(unet):
    images = torch.rand(8, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    return LastLayerLaplace(unet, "diag", sigma_noise=0.1, prior_precision=300.0).fit(
        images, DDPMScheduler(clip_sample=False), batch_size=4, generator=torch.Generator().manual_seed(1), progress=False
    )


def _trajectories(unet, scheduler, posterior, **kwargs):
    kwargs.setdefault("num_inference_steps", STEPS)
    kwargs.setdefault("progress", False)
    return TrajectorySampler(unet, scheduler, posterior).sample(**kwargs)


def _plain_loop(unet, scheduler, noise, generator=None, **step_kwargs):
    if "generator" in inspect.signature(scheduler.step).parameters:
        step_kwargs["generator"] = generator
    scheduler.set_timesteps(STEPS)
    x = noise * scheduler.init_noise_sigma
    with torch.no_grad():
        for t in scheduler.timesteps:
            out = unet(scheduler.scale_model_input(x, t), t).sample
            x = scheduler.step(out, t, x, **step_kwargs).prev_sample
    return x


# ------------------------------------------------------------------ the head perturbation


@pytest.mark.parametrize("groups", [1, 3])
def test_head_perturbation_is_each_rows_own_head(groups):
    head = nn.Conv2d(6, 3, 3, padding=1, stride=2, groups=groups)
    post = LastLayerLaplace(head, "diag", sigma_noise=1.0, prior_precision=1.0)
    phi = torch.randn(4, 6, 7, 5)
    deviations = torch.randn(2, post.spec.num_params)
    with torch.no_grad(), perturbed_head(head, post.spec, deviations):
        out = head(phi)  # 4 rows = 2 copies of 2 deviations
    for row in range(4):
        own = nn.Conv2d(6, 3, 3, padding=1, stride=2, groups=groups)
        nn.utils.vector_to_parameters(nn.utils.parameters_to_vector(head.parameters()) + deviations[row % 2], own.parameters())
        torch.testing.assert_close(out[row], own(phi[row : row + 1])[0].detach(), rtol=1e-5, atol=1e-5)


def test_linear_head_perturbation_touches_only_the_eps_outputs():
    head = nn.Linear(5, 6)
    post = LastLayerLaplace(head, "diag", eps_channels=2, sigma_noise=1.0, prior_precision=1.0)
    phi = torch.randn(3, 4, 5)
    deviations = torch.randn(3, post.spec.num_params)
    with torch.no_grad():
        plain = head(phi)
        with perturbed_head(head, post.spec, deviations):
            out = head(phi)
    torch.testing.assert_close(out[..., 2:], plain[..., 2:])
    torch.testing.assert_close(out[..., :2], plain[..., :2] + head_perturbation(post.spec, phi, deviations))


# ------------------------------------------------------------------ the stock image


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_image_is_the_stock_pipelines(unet, posterior, eta):
    pipe = DDIMPipeline(unet=unet, scheduler=DDIMScheduler(clip_sample=False))
    pipe.set_progress_bar_config(disable=True)
    generators = image_generators(SEED, range(2))
    stock = pipe(batch_size=2, generator=generators, eta=eta, num_inference_steps=STEPS, output_type="pt").images
    ours = _trajectories(unet, DDIMScheduler(clip_sample=False), posterior, batch_size=2, eta=eta,
                         generator=image_generators(SEED, range(2)), samples=4)
    assert torch.equal((ours.images / 2 + 0.5).clamp(0, 1), stock)


@pytest.mark.parametrize(
    "make_scheduler",
    [
        lambda: DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2),
        lambda: UniPCMultistepScheduler(),
        lambda: PNDMScheduler(skip_prk_steps=True),
        lambda: EulerAncestralDiscreteScheduler(),
        lambda: DDIMScheduler(clip_sample=True),
        lambda: DDPMScheduler(thresholding=True, sample_max_value=1.0),
    ],
    ids=["dpm++2m", "unipc", "pndm", "euler_ancestral", "ddim_clip", "ddpm_thresholding"],
)
def test_every_scheduler_runs_its_own_loop(unet, posterior, make_scheduler):
    noise = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    expected = _plain_loop(unet, make_scheduler(), noise, torch.Generator().manual_seed(5))
    out = _trajectories(unet, make_scheduler(), posterior, noise=noise, generator=torch.Generator().manual_seed(5),
                        samples=4, draws="independent", centre="mean")
    assert torch.equal(out.images, expected)
    assert bool(torch.isfinite(out.variance).all()) and float(out.variance.min()) >= 0
    assert float(out.epistemic_variance.sum()) > 0
    stochastic = isinstance(out.settings["stochastic_sampler"], bool) and out.settings["stochastic_sampler"]
    assert stochastic == isinstance(make_scheduler(), (EulerAncestralDiscreteScheduler, DDPMScheduler))
    assert (float(out.aleatoric_variance.sum()) > 0) == stochastic


# ------------------------------------------------------------------ against exact answers


class LinearDenoiser(nn.Module):
    """ε = head(C·x + e_t): features linear in x (a fixed 1×1 conv plus a timestep bias), a 3×3 head."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.features = nn.Conv2d(2, 4, 1)
        self.head = nn.Conv2d(4, 2, 3, padding=1)
        with torch.no_grad():
            self.features.weight.mul_(0.5)
            self.head.weight.mul_(0.5)

    def forward(self, sample, timestep):
        t = torch.as_tensor(timestep, dtype=sample.dtype) / 1000
        return self.head(self.features(sample) + t)


def _linear_posterior(model, prior_precision):
    features = [(torch.randn(6, 4, 5, 5, generator=torch.Generator().manual_seed(k)), torch.randn(6, 2, 5, 5)) for k in range(2)]
    return LastLayerLaplace(model, "diag", head=model.head, sigma_noise=1.0, prior_precision=prior_precision).fit_features(features)


def _jacobian_variance(model, posterior, noise):
    """diag(J Σ Jᵀ), J = ∂x_0/∂θ of the whole DDIM loop at θ_MAP (through the feedback of every step)."""
    theta = eps_parameter_vector(model.head, posterior.spec).float()
    weight_numel = model.head.weight.numel()

    def final(vector):
        params = {"head.weight": vector[:weight_numel].reshape(model.head.weight.shape), "head.bias": vector[weight_numel:]}
        scheduler = DDIMScheduler(clip_sample=False)
        scheduler.set_timesteps(STEPS)
        x = noise
        for t in scheduler.timesteps:
            out = torch.func.functional_call(model, params, (x, t))
            x = scheduler.step(out, t, x).prev_sample
        return x

    jacobian = torch.func.jacrev(final)(theta).flatten(0, -2).double()  # (pixels, P)
    return torch.einsum("ip,pq,iq->i", jacobian, dense_covariance(posterior), jacobian).reshape(noise.shape)


@pytest.mark.parametrize("draws", ["independent", "antithetic", "sobol"])
def test_variance_equals_the_jacobian_variance_of_a_linear_denoiser(draws):
    """Small posterior variance: the trajectory is linear in θ to round-off, so its variance is J Σ Jᵀ.

    The estimate is Monte Carlo over M = 512 draws: per-pixel relative standard error √(2/512) = 6%
    for independent draws. Measured over 3 seeds: sums within 1.6% (Sobol 0.8%), pixels within
    0.81–1.21 (Sobol 0.89–1.07). Bounds: sum within 5%, every pixel within 30%. Each image's own
    draws, as measured (shared draws make the two images' errors one realisation, not two).
    """
    model = LinearDenoiser().eval()
    posterior = _linear_posterior(model, prior_precision=1e4)
    noise = torch.randn(2, 2, 5, 5, generator=torch.Generator().manual_seed(1))
    exact = _jacobian_variance(model, posterior, noise)
    out = _trajectories(model, DDIMScheduler(clip_sample=False), posterior, noise=noise, samples=512, draws=draws,
                        centre="mean", generator=image_generators(SEED, range(2)), shared_draws=False)
    ratio = out.variance.double() / exact
    assert abs(float(out.variance.double().sum() / exact.sum()) - 1) < 0.05
    assert float(ratio.min()) > 0.7 and float(ratio.max()) < 1.3


def test_trajectories_converge_in_the_number_of_draws():
    model = LinearDenoiser().eval()
    posterior = _linear_posterior(model, prior_precision=1e4)
    noise = torch.randn(2, 2, 5, 5, generator=torch.Generator().manual_seed(1))
    exact = _jacobian_variance(model, posterior, noise)
    errors = []
    for samples in (4, 32, 256):
        runs = [
            _trajectories(model, DDIMScheduler(clip_sample=False), posterior, noise=noise, samples=samples,
                          draws="independent", centre="mean", generator=image_generators(seed, range(2)),
                          weight_seed=seed).variance
            for seed in range(4)
        ]
        errors.append(float(torch.stack([(r.double() - exact).square().mean() for r in runs]).mean().sqrt()))
    assert errors[0] > errors[1] > errors[2]
    # Monte Carlo: the error of a variance estimate falls like 1/√M (8× fewer draws, ~2.8× the error)
    assert errors[0] / errors[2] > 4


@pytest.mark.parametrize("scheduler, eta", [(DDPMScheduler, 0.0), (DDIMScheduler, 1.0)])
def test_aleatoric_part_equals_brute_force_sampler_noise(unet, posterior, scheduler, eta):
    """The sampler-noise part against the spread of 64 plain runs from one x_T with fresh noise.

    Bar (issue 22): within a factor 1.25 in the mean over pixels. With 16 noise streams the estimate
    has 15 degrees of freedom per pixel and 4·192 pixels; measured ratios 0.98–1.01 over 3 seeds
    (the epistemic part is 4% of the aleatoric one here).
    """
    noise = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    step_kwargs = {"eta": eta} if scheduler is DDIMScheduler else {}
    runs = torch.stack([_plain_loop(unet, scheduler(clip_sample=False), noise, torch.Generator().manual_seed(100 + k), **step_kwargs)
                        for k in range(64)])
    brute = runs.var(dim=0)
    out = _trajectories(unet, scheduler(clip_sample=False), posterior, noise=noise, eta=eta, samples=16, draws="independent",
                        centre="map", generator=image_generators(SEED, range(4)))
    ratio = float(out.aleatoric_variance.mean() / brute.mean())
    assert 1 / 1.25 < ratio < 1.25, f"aleatoric / brute force = {ratio:.3f}"
    assert float(out.epistemic_variance.mean()) < 0.1 * float(out.aleatoric_variance.mean())


# ------------------------------------------------------------------ the randomness rule


@pytest.mark.parametrize("shared_draws", [True, False])
@pytest.mark.parametrize("scheduler", [DDIMScheduler, DDPMScheduler])
def test_results_do_not_depend_on_the_batch_or_the_chunks(unet, posterior, scheduler, shared_draws):
    def run(indices, chunk_size=None):
        return _trajectories(unet, scheduler(clip_sample=False), posterior, batch_size=len(indices), samples=4,
                             generator=image_generators(SEED, indices), chunk_size=chunk_size, shared_draws=shared_draws)

    whole = run(range(3))
    parts = [run(range(0, 1)), run(range(1, 3), chunk_size=2)]
    for field in ("images", "variance", "aleatoric_variance"):
        joined, expected = torch.cat([getattr(p, field) for p in parts]), getattr(whole, field)
        torch.testing.assert_close(joined, expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))


@pytest.mark.parametrize("scheduler, eta", [(DDIMScheduler, 0.0), (DDPMScheduler, 0.0)])
def test_shared_draws_give_every_image_the_same_draws_and_noise(unet, posterior, scheduler, eta):
    """Common random numbers: two images with the same x_T get the same weight deviations, the same
    trajectory noise and so the same trajectories (bit for bit); each image's own draws differ, and
    another weight_seed draws other weights. (DDPM's stock image, and with it the control variate's
    features, follows the image's own noise: its variance is compared without the control.)"""
    noise = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(4)).repeat(2, 1, 1, 1)

    def run(**kwargs):
        return _trajectories(unet, scheduler(clip_sample=False), posterior, noise=noise, eta=eta, samples=4,
                             generator=image_generators(SEED, range(2)), return_draws=True,
                             control_variate=None if scheduler is DDIMScheduler else False, **kwargs)

    shared, own, other = run(), run(shared_draws=False), run(weight_seed=7)
    assert shared.settings["shared_draws"] and shared.settings["weight_seed"] == 0
    deviations, finals, maps = shared.draws.deviations, shared.draws.finals, shared.draws.maps
    assert torch.equal(deviations[:, :, 0], deviations[:, :, 1])
    assert torch.equal(finals[:, :, 0], finals[:, :, 1]) and torch.equal(maps[:, 0], maps[:, 1])
    assert torch.equal(shared.variance[0], shared.variance[1])
    assert torch.equal(shared.aleatoric_variance[0], shared.aleatoric_variance[1])
    assert not torch.equal(own.draws.deviations[:, :, 0], own.draws.deviations[:, :, 1])
    assert not torch.equal(own.variance[0], own.variance[1])
    assert not torch.equal(other.draws.deviations, deviations)
    # an image's shared draws do not depend on which images it is sampled with
    alone = _trajectories(unet, scheduler(clip_sample=False), posterior, noise=noise[:1], eta=eta, samples=4,
                          generator=image_generators(SEED, [5]), return_draws=True)
    assert torch.equal(alone.draws.deviations[:, :, 0], deviations[:, :, 0])


def test_bad_arguments_are_named(unet, posterior):
    def run(**kwargs):
        return _trajectories(unet, DDIMScheduler(clip_sample=False), posterior, batch_size=1, **kwargs)

    with pytest.raises(ValueError, match="even"):
        run(samples=3, draws="antithetic")
    with pytest.raises(ValueError, match="centre"):
        run(samples=4, centre="median")
    with pytest.raises(ValueError, match="noise_samples must be an integer >= 4"):
        _trajectories(unet, DDPMScheduler(clip_sample=False), posterior, batch_size=1, samples=4, noise_samples=2)
    with pytest.raises(ValueError, match="chunk_size"):
        run(samples=4, chunk_size=0)
    with pytest.raises(ValueError, match="draws must be one of"):
        run(samples=4, draws="halton")


# ------------------------------------------------------------------ transformers


@pytest.mark.parametrize("name", ["dit", "sd3"])
def test_transformer_heads_are_perturbed_on_their_eps_rows(name):
    """A patch transformer's Linear head on tokens (DiT: learned σ, ε rows interleaved in every patch):
    a drawn row through the hook equals the model with those head weights written in."""
    posterior = fitted(name)
    model, spec = posterior.model, posterior.spec
    x, kwargs = model_input(name), conditioning_for(name, 2)
    t = torch.tensor([500.0, 500.0])
    deviation = torch.randn(2, spec.num_params, generator=torch.Generator().manual_seed(0)) * 0.05
    with torch.no_grad():
        with perturbed_head(posterior.head, spec, deviation):
            hooked = Denoiser(model)(x, t, kwargs)
        rows = list(spec.eps_rows) if spec.eps_rows is not None else list(range(spec.eps_channels))
        for r in range(2):
            original = (posterior.head.weight.clone(), posterior.head.bias.clone())
            weight_numel = spec.eps_channels * spec.taps
            posterior.head.weight[rows] += deviation[r, :weight_numel].reshape(spec.eps_channels, spec.taps)
            posterior.head.bias[rows] += deviation[r, weight_numel:]
            written = Denoiser(model)(x[r : r + 1], t[r : r + 1], {k: v[r : r + 1] for k, v in kwargs.items()})
            posterior.head.weight.copy_(original[0])
            posterior.head.bias.copy_(original[1])
            torch.testing.assert_close(hooked[r : r + 1], written, rtol=1e-4, atol=1e-5)


def test_trajectories_on_a_dit_with_guidance_and_on_sd3_flow_matching():
    dit = fitted("dit")
    guidance = ClassifierFreeGuidance(4.0, {"class_labels": torch.full((2,), 10)})
    out = _trajectories(dit.model, DDIMScheduler(clip_sample=False), dit, noise=model_input("dit"), samples=4,
                        model_kwargs={"class_labels": torch.tensor([3, 7])}, guidance=guidance)
    assert out.variance.shape == out.images.shape == (2, 4, 8, 8) and float(out.variance.sum()) > 0
    assert out.timings["model_forwards_per_image"] == 2 * 5 * STEPS  # both branches, stock + 4 draws

    sd3 = fitted("sd3")
    out = _trajectories(sd3.model, FlowMatchEulerDiscreteScheduler(shift=3.0), sd3, noise=model_input("sd3"), samples=4,
                        model_kwargs=conditioning_for("sd3", 2))
    assert bool(torch.isfinite(out.variance).all()) and float(out.variance.sum()) > 0
    assert not out.settings["stochastic_sampler"]


def test_the_control_variate_cuts_the_error_where_the_run_allows_it(unet, posterior):
    """Against J Σ Jᵀ of the linear denoiser, 8 independent draws around the MAP trajectory: the
    feedback-free control removes most of the Monte Carlo noise (measured RMS error ratio ≈ 0.3 over
    6 seeds; bound 0.7)."""
    model = LinearDenoiser().eval()
    linear_posterior = _linear_posterior(model, prior_precision=1e4)
    noise = torch.randn(2, 2, 5, 5, generator=torch.Generator().manual_seed(1))
    exact = _jacobian_variance(model, linear_posterior, noise)

    def error(control_variate):
        runs = [
            _trajectories(model, DDIMScheduler(clip_sample=False), linear_posterior, noise=noise, samples=8,
                          draws="independent", control_variate=control_variate, generator=image_generators(seed, range(2)),
                          weight_seed=seed)
            for seed in range(6)
        ]
        assert all(r.settings["control_variate_used"] == (control_variate is not False) for r in runs)
        return float(torch.stack([(r.variance.double() - exact).square().mean() for r in runs]).mean().sqrt())

    assert error(None) < 0.7 * error(False)

    unipc = _trajectories(unet, UniPCMultistepScheduler(), posterior, batch_size=1, samples=2)
    assert not unipc.settings["control_variate_used"]  # a multistep solver: not described, not used
    with pytest.raises(ValueError, match="single-output affine steps"):
        _trajectories(unet, UniPCMultistepScheduler(), posterior, batch_size=1, samples=2, control_variate=True)
    with pytest.raises(ValueError, match="centre='map'"):
        _trajectories(unet, DDIMScheduler(clip_sample=False), posterior, batch_size=1, samples=2, centre="mean",
                      control_variate=True)
