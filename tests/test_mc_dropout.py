"""MCDropoutSampler: T passes of a dropout UNet from the same x_T, against the plain diffusers loop."""

import pytest
import torch
from methods_helpers import STEPS, c2_only_variance, ddim, ddpm, noise, plain_loop
from tiny_models import tiny_unet

from bayesdiff_ext.methods import MCDropoutSampler, active_dropout

PASSES, SEED = 3, 5


@pytest.fixture(scope="module")
def unet():
    return tiny_unet(channels=1, dropout=0.3)


def _sample(unet, scheduler, **kwargs):
    sampler = MCDropoutSampler(unet, scheduler, passes=PASSES, seed=SEED)
    generator = torch.Generator().manual_seed(11)
    return sampler.sample(noise=noise(), num_inference_steps=STEPS, generator=generator, progress=False, **kwargs)


def _brute_force_passes(unet, scheduler):
    samples = []
    for k in range(PASSES):
        torch.manual_seed(SEED + k)
        with active_dropout(unet):
            samples.append(plain_loop(unet, scheduler, noise()))
    return torch.stack(samples)


@pytest.mark.parametrize("make_scheduler", [ddim, ddpm], ids=["ddim", "ddpm"])
def test_variance_is_the_spread_of_dropout_passes_plus_the_sampler_noise(unet, make_scheduler):
    rng = torch.get_rng_state()
    out = _sample(unet, make_scheduler())
    assert torch.equal(torch.get_rng_state(), rng)  # the masks' seeds do not leak into the global RNG
    assert not any(m.training for m in unet.modules())
    assert torch.equal(out.images, plain_loop(unet, make_scheduler(), noise()))  # dropout off
    passes = _brute_force_passes(unet, make_scheduler())
    torch.testing.assert_close(out.epistemic_variance, passes.var(dim=0), rtol=1e-5, atol=1e-10)
    torch.testing.assert_close(out.mean, passes.mean(dim=0))
    assert out.epistemic_variance.min() > 0
    aleatoric = torch.full_like(out.variance, c2_only_variance(make_scheduler()))
    torch.testing.assert_close(out.aleatoric_variance, aleatoric, rtol=1e-5, atol=0)
    torch.testing.assert_close(out.variance, out.epistemic_variance + out.aleatoric_variance)
    torch.testing.assert_close(out.scores, out.variance.flatten(1).sum(1))
    assert out.settings["method"] == "mc-dropout" and out.settings["passes"] == PASSES
    assert out.timings["image_unet_calls"] == (PASSES + 1) * STEPS


def test_same_seed_same_result_and_batch_of_one(unet):
    sampler = MCDropoutSampler(unet, ddim(), passes=2, seed=1)
    runs = [
        sampler.sample(noise=noise(1), num_inference_steps=STEPS, generator=generator, progress=False)
        for generator in (torch.Generator().manual_seed(0), torch.Generator().manual_seed(0))
    ]
    assert runs[0].variance.shape == (1, 1, 8, 8)
    assert torch.equal(runs[0].variance, runs[1].variance)


def test_refuses_a_unet_without_dropout_and_too_few_passes(unet):
    with pytest.raises(ValueError, match="no dropout layer with p > 0"):
        MCDropoutSampler(tiny_unet(channels=1, dropout=0.0), ddim())
    with pytest.raises(ValueError, match="passes must be an integer >= 2"):
        MCDropoutSampler(unet, ddim(), passes=1)


def test_per_image_generators_give_each_image_its_own_masks_in_any_batch(unet):
    from bayesdiff_ext.randomness import image_generators

    sampler = MCDropoutSampler(unet, ddim(), passes=2, seed=1)
    x_t = noise(3)
    rng = torch.get_rng_state()
    together = sampler.sample(noise=x_t, num_inference_steps=STEPS, generator=image_generators(4, range(3)), progress=False)
    assert torch.equal(torch.get_rng_state(), rng) and not any(m.training for m in unet.modules())
    assert not any(m._forward_hooks for m in unet.modules())
    for k in range(3):
        alone = sampler.sample(noise=x_t[k : k + 1], num_inference_steps=STEPS, generator=image_generators(4, [k]), progress=False)
        # float32 convolutions round differently in batches of 1 and 3
        torch.testing.assert_close(alone.variance, together.variance[k : k + 1], rtol=1e-3, atol=1e-6)
    assert (together.epistemic_variance.flatten(1).sum(1) > 0).all()
    other_seed = MCDropoutSampler(unet, ddim(), passes=2, seed=2).sample(
        noise=x_t, num_inference_steps=STEPS, generator=image_generators(4, range(3)), progress=False
    )
    assert not torch.equal(other_seed.variance, together.variance)  # the masks are the seed's
