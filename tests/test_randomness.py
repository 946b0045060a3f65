"""The randomness rule: an image's draws depend on (seed, its index, what is drawn), never on its batch."""

import pytest
import torch
from diffusers import DDIMPipeline, DDIMScheduler, DDPMScheduler

from bayesdiff_ext import BayesDiffSampler, LastLayerLaplace
from bayesdiff_ext.randomness import (
    ImageStreams,
    antithetic_randn,
    derived_seed,
    image_generators,
    peek_seed,
    restartable,
)
from tiny_models import tiny_unet

SEED, NUM_IMAGES, STEPS = 11, 4, 4


@pytest.fixture(scope="module")
def unet():
    return tiny_unet(seed=3, add_attention=False)


@pytest.fixture(scope="module")
def posterior(unet):
    images = torch.rand(10, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    return LastLayerLaplace(unet, "diag", sigma_noise=0.1, prior_precision=1e3).fit(
        images, DDPMScheduler(clip_sample=False), batch_size=5, generator=torch.Generator().manual_seed(1), progress=False
    )


def test_derived_seeds_depend_on_every_key_and_nothing_else():
    seeds = {derived_seed(SEED, i, stream, *key) for i in range(3) for stream in ("image", "weights") for key in [(), (1,)]}
    assert len(seeds) == 12
    assert derived_seed(SEED, 2, "weights", 1) == derived_seed(SEED, 2, "weights", 1)
    assert all(0 <= s < 2**63 for s in seeds)
    with pytest.raises(ValueError, match="stream"):
        derived_seed(SEED, 0, "nonsense")
    with pytest.raises(ValueError, match=">= 0"):
        derived_seed(-1, 0, "image")


def test_peek_does_not_consume_and_restart_replays():
    g = torch.Generator().manual_seed(5)
    first = peek_seed(g)
    assert peek_seed(g) == first
    restart = restartable([g, torch.Generator().manual_seed(6)], torch.device("cpu"))
    a, b = restart(), restart()
    assert torch.equal(torch.randn(3, generator=a[1]), torch.randn(3, generator=b[1]))
    assert peek_seed(g) == first


def test_per_image_streams_draw_the_same_rows_in_any_batch():
    like = torch.zeros(4, 2, 3)
    whole = ImageStreams(image_generators(SEED, range(4), stream="monte_carlo"), 4)
    parts = [ImageStreams(image_generators(SEED, idx, stream="monte_carlo"), len(idx)) for idx in (range(1), range(1, 4))]
    drawn = antithetic_randn(5, like, whole)
    pieces = torch.cat([antithetic_randn(5, like[: p.batch], p) for p in parts], dim=1)
    assert drawn.shape == (5, 4, 2, 3)
    assert torch.equal(drawn, pieces)
    assert torch.equal(drawn[:2], -drawn[3:5])


def test_stock_pipeline_with_the_image_generators_equals_the_sampler(unet, posterior):
    pipe = DDIMPipeline(unet=unet, scheduler=DDIMScheduler(clip_sample=False))
    pipe.set_progress_bar_config(disable=True)
    stock = pipe(batch_size=NUM_IMAGES, generator=image_generators(SEED, range(NUM_IMAGES)), eta=1.0,
                 num_inference_steps=STEPS, output_type="pt").images
    ours = BayesDiffSampler(unet, DDIMScheduler(clip_sample=False), posterior).sample(
        batch_size=NUM_IMAGES, generator=image_generators(SEED, range(NUM_IMAGES)), eta=1.0,
        num_inference_steps=STEPS, uq_every=1, mc_samples=4, progress=False,
    )
    assert torch.equal((ours.images / 2 + 0.5).clamp(0, 1), stock)


@pytest.mark.parametrize("scheduler, eta", [(DDIMScheduler, 0.0), (DDPMScheduler, 0.0), (DDIMScheduler, 1.0)])
def test_sampler_scores_and_maps_do_not_depend_on_the_batch(unet, posterior, scheduler, eta):
    def run(indices):
        return BayesDiffSampler(unet, scheduler(clip_sample=False), posterior).sample(
            batch_size=len(indices), generator=image_generators(SEED, indices), eta=eta,
            num_inference_steps=STEPS, uq_every=1, mc_samples=4, progress=False,
        )

    whole = run(range(NUM_IMAGES))
    split = [run(range(0, 1)), run(range(1, NUM_IMAGES))]
    # float32 convolutions round differently in batches of different sizes: equal to round-off
    for field in ("images", "variance", "aleatoric_variance", "scores"):
        joined, expected = torch.cat([getattr(r, field) for r in split]), getattr(whole, field)
        torch.testing.assert_close(joined, expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))


def test_a_single_generator_stays_reproducible(unet, posterior):
    def run():
        return BayesDiffSampler(unet, DDPMScheduler(clip_sample=False), posterior).sample(
            batch_size=2, generator=torch.Generator().manual_seed(3), num_inference_steps=STEPS, progress=False
        )

    a, b = run(), run()
    assert torch.equal(a.images, b.images) and torch.equal(a.variance, b.variance)


def test_fitted_posterior_does_not_depend_on_the_batch_size(unet):
    images = torch.rand(9, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1

    def fit(batch_size):
        return LastLayerLaplace(unet, "diag").fit(
            images, DDPMScheduler(clip_sample=False), batch_size=batch_size,
            generator=torch.Generator().manual_seed(1), progress=False,
        )

    small, large = fit(2), fit(9)
    assert small.sigma_noise == pytest.approx(large.sigma_noise, rel=1e-6)
    assert small.prior_precision == pytest.approx(large.prior_precision, rel=1e-5)
    torch.testing.assert_close(small.posterior.h_weight, large.posterior.h_weight, rtol=1e-6, atol=0)


def test_pixel_moments_of_an_image_do_not_depend_on_its_batch():
    from bayesdiff_ext.latent import pixel_moments

    mean = torch.randn(3, 4, 2, 2, generator=torch.Generator().manual_seed(0))
    var = torch.rand(3, 4, 2, 2, generator=torch.Generator().manual_seed(1))

    def decode(z):
        return z.flatten(1)[:, :3].reshape(-1, 3, 1, 1) * 2

    whole = pixel_moments(decode, mean, var, samples=4, batch_size=5, generator=image_generators(SEED, range(3), stream="decode"))
    part = pixel_moments(decode, mean[1:], var[1:], samples=4, batch_size=2,
                         generator=image_generators(SEED, range(1, 3), stream="decode"))
    torch.testing.assert_close(whole.variance[1:], part.variance)
    torch.testing.assert_close(whole.mean[1:], part.mean)
