"""BayesDiffSampler on a tiny random-init UNet with a fitted diag LastLayerLaplace.

Parity with diffusers is exact (torch.equal); the propagated variance is checked against brute
force: many independent trajectories from the same x_T in which every UNet call's ε is drawn from
the head's predictive N(out, γ²) (the model the moment recurrence propagates).
"""

import pytest
import torch
from diffusers import (
    DDIMPipeline,
    DDIMScheduler,
    DDPMPipeline,
    DDPMScheduler,
    DPMSolverSinglestepScheduler,
    UNet2DModel,
)
from diffusers.utils.torch_utils import randn_tensor
from tiny_models import tiny_unet

from bayesdiff_ext import BayesDiffOutput, BayesDiffSampler, LastLayerLaplace
from bayesdiff_ext.randomness import ImageStreams
from bayesdiff_ext.sampler.schedulers import step_coefficients
from brute_force import brute_force_variance, correlation, with_output_tracking_input

BATCH, STEPS = 2, 5


def _posterior(unet: UNet2DModel, model_kwargs=None) -> LastLayerLaplace:
    images = torch.rand(12, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    posterior = LastLayerLaplace(unet, "diag", sigma_noise=0.1, prior_precision=1e3)
    scheduler = DDPMScheduler(num_train_timesteps=1000, clip_sample=False)
    return posterior.fit(
        images,
        scheduler,
        batch_size=6,
        generator=torch.Generator().manual_seed(1),
        model_kwargs=model_kwargs,
        progress=False,
    )


@pytest.fixture(scope="module")
def unet():
    return tiny_unet()


@pytest.fixture(scope="module")
def posterior(unet):
    return _posterior(unet)


def _ddim(**overrides):
    return DDIMScheduler(num_train_timesteps=1000, clip_sample=False, **overrides)


def _ddpm(**overrides):
    return DDPMScheduler(num_train_timesteps=1000, clip_sample=False, **overrides)


def _dpm(**overrides):
    return DPMSolverSinglestepScheduler(num_train_timesteps=1000, **overrides)


def _noise(seed: int = 3, batch: int = BATCH) -> torch.Tensor:
    return torch.randn(batch, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


def _sample(unet, scheduler, posterior, **kwargs) -> BayesDiffOutput:
    """The moment recurrence (these tests are about it), at every step unless told otherwise."""
    if "preset" not in kwargs and "estimator" not in kwargs:
        kwargs.setdefault("uq_every", 1)
        kwargs.setdefault("mc_samples", 0 if kwargs.get("covariance") == "none" else 10)
    kwargs.setdefault("num_inference_steps", STEPS)
    kwargs.setdefault("progress", False)
    return BayesDiffSampler(unet, scheduler, posterior).sample(**kwargs)


def _plain_loop(unet, scheduler, x, generator=None, class_labels=None, **step_kwargs):
    """The scheduler loop as a user would write it."""
    scheduler.set_timesteps(STEPS)
    with torch.no_grad():
        for t in scheduler.timesteps:
            out = unet(x, t, class_labels=class_labels).sample
            x = scheduler.step(out, t, x, generator=generator, **step_kwargs).prev_sample
    return x


# ------------------------------------------------------------------ parity with diffusers


@pytest.mark.parametrize("eta", [0.0, 0.5])
def test_deterministic_images_equal_the_ddim_pipeline(unet, posterior, eta):
    pipe = DDIMPipeline(unet=unet, scheduler=_ddim())
    pipe.set_progress_bar_config(disable=True)
    expected = pipe(
        batch_size=BATCH,
        generator=torch.Generator().manual_seed(0),
        eta=eta,
        num_inference_steps=STEPS,
        output_type="pt",
    ).images
    ours = _sample(
        unet, _ddim(), posterior, batch_size=BATCH, generator=torch.Generator().manual_seed(0), eta=eta
    )
    # the pipeline's own post-processing, applied to our x_0
    assert torch.equal((ours.images / 2 + 0.5).clamp(0, 1), expected)


def test_deterministic_images_equal_the_ddpm_pipeline(unet, posterior):
    pipe = DDPMPipeline(unet=unet, scheduler=_ddpm())
    pipe.set_progress_bar_config(disable=True)
    expected = pipe(
        batch_size=BATCH,
        generator=torch.Generator().manual_seed(0),
        num_inference_steps=STEPS,
        output_type="pt",
    ).images
    # uq_every=2 and a Monte Carlo at every other step: the uncertainty draws must not touch the
    # generator the scheduler draws its noise from
    ours = _sample(
        unet,
        _ddpm(),
        posterior,
        batch_size=BATCH,
        generator=torch.Generator().manual_seed(0),
        uq_every=2,
        mc_samples=3,
    )
    assert torch.equal((ours.images / 2 + 0.5).clamp(0, 1), expected)


@pytest.mark.parametrize(
    "make_scheduler,step_kwargs",
    [
        (lambda: _ddim(timestep_spacing="trailing"), {"eta": 1.0}),
        (lambda: _ddpm(variance_type="fixed_large"), {}),
        (lambda: _dpm(algorithm_type="dpmsolver++"), {}),
        (lambda: _dpm(algorithm_type="dpmsolver", final_sigmas_type="sigma_min", solver_type="heun"), {}),
    ],
)
def test_deterministic_images_equal_the_plain_scheduler_loop(unet, posterior, make_scheduler, step_kwargs):
    noise = _noise()
    expected = _plain_loop(unet, make_scheduler(), noise, torch.Generator().manual_seed(4), **step_kwargs)
    ours = _sample(
        unet,
        make_scheduler(),
        posterior,
        noise=noise,
        generator=torch.Generator().manual_seed(4),
        mc_samples=4,
        **step_kwargs,
    )
    assert torch.equal(ours.images, expected)


def test_unet_kwargs_reach_every_call_and_are_tiled_for_the_monte_carlo_batch():
    unet = tiny_unet(num_class_embeds=4)
    labels = torch.tensor([1, 3])
    posterior = _posterior(unet, model_kwargs=lambda x0: {"class_labels": torch.arange(len(x0)) % 4})
    noise = _noise()
    expected = _plain_loop(unet, _ddim(), noise, class_labels=labels)
    ours = _sample(
        unet,
        _ddim(),
        posterior,
        noise=noise,
        mc_samples=3,
        unet_kwargs={"class_labels": labels},
        return_trace=True,
    )
    assert torch.equal(ours.images, expected)
    # At the first step Var[x_T] = 0, so all Monte Carlo samples equal x_T and E[ε] must be the
    # image's own ε; labels interleaved instead of tiled would pair samples with the wrong class.
    scheduler = _ddim()
    scheduler.set_timesteps(STEPS)
    first = step_coefficients(scheduler)[0]
    with torch.no_grad():
        eps = unet(noise, scheduler.timesteps[0], class_labels=labels).sample
    torch.testing.assert_close(
        ours.trace[0]["mean"], first.a * noise + first.b[0] * eps, rtol=1e-5, atol=1e-5
    )


def test_learned_variance_heads_use_the_eps_channels():
    unet = tiny_unet(out_channels=6)
    posterior = _posterior(unet)
    assert posterior.eps_channels == 3
    noise = _noise()
    scheduler = _ddim()
    scheduler.set_timesteps(STEPS)
    x = noise
    with torch.no_grad():
        for t in scheduler.timesteps:
            x = scheduler.step(unet(x, t).sample[:, :3], t, x).prev_sample
    ours = _sample(unet, _ddim(), posterior, noise=noise, mc_samples=3)
    assert torch.equal(ours.images, x)
    assert ours.variance.shape == x.shape and bool((ours.variance > 0).all())


# ------------------------------------------------------------------ the propagated variance


@pytest.fixture(scope="module")
def sensitive_unet():
    return with_output_tracking_input(tiny_unet())


@pytest.fixture(scope="module")
def sensitive_posterior(sensitive_unet):
    return _posterior(sensitive_unet)


@pytest.mark.parametrize(
    "make_scheduler,min_correlation,covariance_matters",
    [
        (_ddim, 0.85, True),
        (_ddpm, 0.7, True),
        (lambda: _dpm(algorithm_type="dpmsolver", final_sigmas_type="sigma_min"), 0.8, False),
        (lambda: _dpm(algorithm_type="dpmsolver++"), 0.7, False),
    ],
)
def test_propagated_variance_agrees_with_brute_force(
    sensitive_unet, sensitive_posterior, make_scheduler, min_correlation, covariance_matters
):
    """Statistic: ratio of summed Var[x_0] (propagated / brute force) and per-pixel correlation.

    Tolerances from measured sampling error (5 steps, batch 2, 384 pixels). The brute force has
    M = 200 trajectories: per-pixel relative standard error √(2/199) ≈ 10%; two brute-force runs
    agree to ~1% in the sum and correlate at 0.96 (DDPM: 0.86, its own noise c² dominates and makes
    the pixels alike). The sampler's Monte Carlo (S = 48, antithetic) added noise: measured ratios
    0.97–1.00 over three Monte Carlo seeds, correlations 0.96 (DDIM), 0.86 (DDPM), 0.93–0.95
    (DPM-Solver), 0.80–0.83 (DPM-Solver++, whose second stage feeds the first stage's ε through
    the intermediate point with a large weight). Bounds: ratio within 15%, correlation at least
    0.05–0.1 below the lowest measured. Dropping the covariance moves the ratio to 1.38 (DDIM) and
    1.48 (DDPM), far outside: checked below where it matters.
    """
    noise = _noise()
    settings = dict(noise=noise, mc_samples=48, uq_every=1, generator=torch.Generator().manual_seed(1))
    ours = _sample(sensitive_unet, make_scheduler(), sensitive_posterior, **settings)
    empirical = brute_force_variance(
        sensitive_unet, sensitive_posterior, make_scheduler(), noise, steps=STEPS, trajectories=200, seed=5
    )
    ratio = float(ours.variance.sum() / empirical.sum())
    assert 0.85 < ratio < 1.15, f"propagated / brute-force variance = {ratio:.3f}"
    r = correlation(ours.variance, empirical)
    assert r > min_correlation, f"per-pixel correlation {r:.3f}"
    if covariance_matters:
        without = _sample(
            sensitive_unet, make_scheduler(), sensitive_posterior, covariance="none", **settings
        )
        ratio_without = float(without.variance.sum() / empirical.sum())
        assert not 0.85 < ratio_without < 1.15, f"the test cannot see the covariance ({ratio_without:.3f})"


def test_skipping_the_covariance_changes_the_variance(unet, posterior):
    noise = _noise()
    full = _sample(
        unet, _ddim(), posterior, noise=noise, mc_samples=8, generator=torch.Generator().manual_seed(1)
    )
    no_cov = _sample(
        unet,
        _ddim(),
        posterior,
        noise=noise,
        mc_samples=8,
        covariance="none",
        generator=torch.Generator().manual_seed(1),
    )
    assert torch.equal(full.images, no_cov.images)
    assert not torch.allclose(full.variance, no_cov.variance, rtol=1e-3)


@pytest.mark.parametrize("make_scheduler", [_ddpm, lambda: _dpm(algorithm_type="dpmsolver++")])
def test_closed_form_only_is_the_head_variance_carried_through_the_steps(unet, posterior, make_scheduler):
    """mc_samples=0: Var' = a²·Var[x_origin] + Σ_j b_j²·γ_j² + c², γ_j² at the image samples."""
    scheduler = make_scheduler()
    noise = _noise()
    out = _sample(
        unet,
        scheduler,
        posterior,
        noise=noise,
        mc_samples=0,
        covariance="none",
        return_trace=True,
        generator=torch.Generator().manual_seed(2),
    )
    assert out.timings["mc_unet_calls"] == 0
    plan = step_coefficients(scheduler)
    replay = make_scheduler()
    replay.set_timesteps(STEPS)
    generator = torch.Generator().manual_seed(2)
    x, variances, head_vars = noise, [torch.zeros_like(noise)], []
    with torch.no_grad():
        for step, record in zip(plan, out.trace):
            t = replay.timesteps[step.index]
            with posterior.capture() as cap:
                eps = unet(x, t).sample
            head_vars.append(posterior.predict(cap.phi)[1])
            var = step.a**2 * variances[step.origin] + step.c2
            for j, b in enumerate(step.b):
                var = var + b**2 * head_vars[step.origin + j]
            variances.append(var)
            torch.testing.assert_close(record["variance"], var, rtol=1e-5, atol=0)
            x = replay.step(eps, t, x, generator=generator).prev_sample
    torch.testing.assert_close(out.variance, variances[-1], rtol=1e-5, atol=0)


@pytest.mark.parametrize("make_scheduler", [_ddim, lambda: _dpm(algorithm_type="dpmsolver++")])
@pytest.mark.parametrize("skip", ["all", "covariance"])
def test_uq_every_runs_the_monte_carlo_only_at_its_steps(unet, posterior, make_scheduler, skip):
    out = _sample(
        unet,
        make_scheduler(),
        posterior,
        batch_size=BATCH,
        num_inference_steps=7,
        uq_every=3,
        mc_samples=4,
        skip=skip,
        return_trace=True,
        generator=torch.Generator().manual_seed(0),
    )
    flags = [r["monte_carlo"] for r in out.trace]
    assert out.timings["mc_unet_calls"] == sum(flags)
    if isinstance(make_scheduler(), DDIMScheduler):
        assert [r["uncertainty_step"] for r in out.trace] == [True, False, False, True, False, False, True]
        # Var[x_T] = 0: the first uncertainty step is the closed form, not a Monte Carlo call.
        assert flags == [False, False, False, True, False, False, True]
    else:  # DPM-Solver-2 steps (1,2)(1,2)(1,2)(1): solver steps 0 and 3 carry both their calls
        assert flags == [r["uncertainty_step"] for r in out.trace]
        assert flags == [True, True, False, False, False, False, True]
    assert [r["timestep"] for r in out.trace] == out.settings["timesteps"]
    for record in out.trace:
        assert bool((record["variance"] >= 0).all())
    assert bool((out.variance > 0).any())


@pytest.mark.parametrize("eps_variance", ["total", "bayesdiff"])
def test_the_first_steps_closed_form_is_the_monte_carlo_it_replaces(unet, posterior, eps_variance):
    from bayesdiff_ext.sampler.eps_moments import (
        closed_form_moments,
        draw_normals,
        monte_carlo_moments,
        monte_carlo_samples,
    )
    from bayesdiff_ext.sampler.model_call import ModelCall

    scheduler = _ddim()
    scheduler.set_timesteps(STEPS)
    first = step_coefficients(scheduler, 0.0)[0]
    t = scheduler.timesteps[0]
    model_call = ModelCall(unet, scheduler, posterior)
    x = _noise()
    out, head_var = model_call(x, t, {}, want_head=True)
    closed = closed_form_moments(first, out, head_var, None)
    zero = torch.zeros_like(x)
    samples = monte_carlo_samples(
        first,
        first,
        x,
        zero,
        None,
        lambda samples: model_call.head_at(samples, t, {}, torch.float32, index=0),
        keep_eps=False,
        normals=draw_normals(first, x, 6, False, ImageStreams(torch.Generator().manual_seed(0), BATCH)),
    )
    drawn = monte_carlo_moments(first, samples, x, zero, None, eps_variance=eps_variance, covariance="mc")
    torch.testing.assert_close(drawn.mean, closed.mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(drawn.var, closed.var, rtol=1e-5, atol=1e-7)
    assert torch.equal(drawn.cov, torch.zeros_like(drawn.cov))


def test_bayesdiff_eps_variance_drops_the_spread_of_the_head_means(unet, posterior):
    common = dict(
        noise=_noise(),
        mc_samples=6,
        covariance="none",
        return_trace=True,
        generator=torch.Generator().manual_seed(0),
    )
    total = _sample(unet, _ddim(), posterior, eps_variance="total", **common)
    head_only = _sample(unet, _ddim(), posterior, eps_variance="bayesdiff", **common)
    # Var[x_T] = 0: all samples coincide, the head means do not spread
    torch.testing.assert_close(total.trace[0]["variance"], head_only.trace[0]["variance"])
    # the same draws at step 1; 'total' adds var_i m^i ≥ 0 to the same mean γ²
    assert bool(
        (total.trace[1]["variance"] >= head_only.trace[1]["variance"] * (1 - 1e-6)).all()
    )  # float32 sums
    assert bool((total.trace[1]["variance"] > head_only.trace[1]["variance"]).any())


def test_skip_covariance_adds_the_closed_form_head_variance_between_uncertainty_steps(unet, posterior):
    common = dict(
        noise=_noise(),
        uq_every=10,
        mc_samples=4,
        return_trace=True,
        generator=torch.Generator().manual_seed(0),
    )
    only_first = _sample(unet, _ddim(), posterior, skip="all", **common)
    with_head = _sample(unet, _ddim(), posterior, skip="covariance", **common)
    # both run the Monte Carlo at step 0 only; afterwards skip='all' only rescales by a²
    for k in range(1, STEPS):
        assert bool((with_head.trace[k]["variance"] > only_first.trace[k]["variance"]).all())


def test_variance_is_never_negative(unet, posterior):
    # two Monte Carlo samples make a noisy covariance: the clamp must keep every variance >= 0
    for clamp in (True, False):
        out = _sample(
            unet,
            _ddim(),
            posterior,
            noise=_noise(),
            mc_samples=2,
            clamp=clamp,
            return_trace=True,
            generator=torch.Generator().manual_seed(0),
        )
        assert bool((out.variance >= 0).all())
        if clamp:
            assert all(bool((r["variance"] >= 0).all()) for r in out.trace)


# ------------------------------------------------------------------ modes, outputs, errors


def test_bayesdiff_mode_differs_from_deterministic_and_is_reproducible(unet, posterior):
    noise = _noise()

    def run(mode, seed):
        return _sample(
            unet,
            _ddim(),
            posterior,
            noise=noise,
            mode=mode,
            mc_samples=3,
            uq_every=2,
            generator=torch.Generator().manual_seed(seed),
        )

    deterministic = run("deterministic", 0)
    first, again, other = run("bayesdiff", 0), run("bayesdiff", 0), run("bayesdiff", 1)
    assert not torch.equal(first.images, deterministic.images)
    assert torch.equal(first.images, again.images) and torch.equal(first.variance, again.variance)
    assert not torch.equal(first.images, other.images)


def test_output_fields(unet, posterior):
    out = _sample(
        unet, _ddpm(), posterior, batch_size=3, mc_samples=2, generator=torch.Generator().manual_seed(0)
    )
    assert out.images.shape == out.variance.shape == out.mean.shape == (3, 3, 8, 8)
    assert out.variance.dtype == torch.float32
    torch.testing.assert_close(out.scores, out.variance.sum(dim=(1, 2, 3)), rtol=1e-6, atol=0)
    assert out.trace is None
    assert out.settings["scheduler"] == "DDPMScheduler" and out.settings["mc_samples"] == 2
    assert out.timings["image_unet_calls"] == STEPS and out.timings["total_s"] > 0
    # E[x_0] of the recurrence is not the sample, but it tracks it
    assert float((out.mean - out.images).abs().mean()) < float(out.images.abs().mean())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_16_bit_unets_keep_their_image_path_and_get_float32_moments(dtype):
    unet = tiny_unet().to(dtype)
    posterior = _posterior(unet)
    noise = _noise().to(dtype)
    ours = _sample(unet, _ddim(), posterior, noise=noise, mc_samples=3)
    assert ours.images.dtype == dtype and torch.equal(ours.images, _plain_loop(unet, _ddim(), noise))
    assert ours.variance.dtype == ours.mean.dtype == torch.float32
    assert bool(torch.isfinite(ours.variance).all()) and bool((ours.variance > 0).all())


def test_batch_of_one(unet, posterior):
    noise = _noise(batch=1)
    out = _sample(unet, _ddim(), posterior, noise=noise, mc_samples=3)
    assert torch.equal(out.images, _plain_loop(unet, _ddim(), noise))
    assert out.scores.shape == (1,)


def test_clip_sample_is_rejected_by_the_recurrence(unet, posterior):
    """x̂_0 clipping makes the step non-affine: the recurrence refuses it (trajectories run it)."""
    for scheduler in (DDIMScheduler(), DDPMScheduler()):
        with pytest.raises(ValueError, match="clip_sample=False"):
            BayesDiffSampler(unet, scheduler, posterior).sample(batch_size=1, preset="paper", progress=False)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(), "batch_size or the initial noise"),
        (dict(batch_size=2, covariance="exact"), "covariance must be one of"),
        (dict(batch_size=2, mode="sampled"), "mode must be one of"),
        (dict(batch_size=2, eps_variance="head"), "eps_variance must be one of"),
        (dict(batch_size=2, uq_every=0), "uq_every must be an integer >= 1"),
        (dict(batch_size=2, mc_samples=0), "covariance='mc' needs mc_samples >= 1"),
        (dict(noise=torch.zeros(2, 4, 8, 8)), r"noise must have shape \(B, 3, H, W\)"),
        (dict(batch_size=3, noise=torch.zeros(2, 3, 8, 8)), "batch_size=3 but noise holds 2"),
        (dict(batch_size=2, eta=0.5, preset="paper"), "eta=0.5 applies to DDIMScheduler only"),
    ],
)
def test_bad_arguments_are_named(unet, posterior, kwargs, match):
    with pytest.raises(ValueError, match=match):
        BayesDiffSampler(unet, _ddpm(), posterior).sample(progress=False, **kwargs)


def test_monte_carlo_draws_do_not_consume_the_generator(unet, posterior):
    generator = torch.Generator().manual_seed(0)
    noise = randn_tensor((BATCH, 3, 8, 8), generator=generator)
    state = generator.get_state()
    _sample(unet, _ddim(), posterior, noise=noise, mc_samples=3, generator=generator)
    assert torch.equal(generator.get_state(), state)
