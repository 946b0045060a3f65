"""EnsembleSampler: K UNets from the same x_T (and the same sampler noise), against the plain loop."""

import pytest
import torch
from methods_helpers import STEPS, c2_only_variance, ddim, ddpm, noise, plain_loop
from tiny_models import tiny_unet

from bayesdiff_ext.methods import EnsembleSampler

MEMBERS = 3


@pytest.fixture(scope="module")
def members():
    return [tiny_unet(channels=1, seed=k) for k in range(MEMBERS)]


@pytest.mark.parametrize("make_scheduler", [ddim, ddpm], ids=["ddim", "ddpm"])
def test_variance_is_the_spread_of_the_members_plus_the_sampler_noise(members, make_scheduler):
    out = EnsembleSampler(members, make_scheduler()).sample(
        noise=noise(), num_inference_steps=STEPS, generator=torch.Generator().manual_seed(11), progress=False
    )
    samples = torch.stack([plain_loop(unet, make_scheduler(), noise()) for unet in members])
    assert torch.equal(out.images, samples[0])
    torch.testing.assert_close(out.epistemic_variance, samples.var(dim=0), rtol=1e-5, atol=1e-10)
    torch.testing.assert_close(out.mean, samples.mean(dim=0))
    aleatoric = torch.full_like(out.variance, c2_only_variance(make_scheduler()))
    torch.testing.assert_close(out.aleatoric_variance, aleatoric, rtol=1e-5, atol=0)
    assert out.variance.min() > 0 and out.scores.shape == (2,)
    assert out.settings["members"] == MEMBERS and out.settings["method"] == "ensemble"


def test_identical_members_have_zero_epistemic_variance(members):
    out = EnsembleSampler([members[0], members[0]], ddim()).sample(
        noise=noise(1), num_inference_steps=STEPS, progress=False
    )
    assert torch.equal(out.variance, torch.zeros_like(out.variance))


def test_refuses_one_member_and_mismatched_members(members):
    with pytest.raises(ValueError, match="at least 2 UNets"):
        EnsembleSampler(members[:1], ddim())
    other = tiny_unet(channels=1)
    other.register_to_config(sample_size=16)
    with pytest.raises(ValueError, match="must share"):
        EnsembleSampler([members[0], other], ddim())


def test_monte_carlo_aleatoric_part_is_the_reference_models_zero_variance_propagation(members):
    from bayesdiff_ext import BayesDiffSampler
    from bayesdiff_ext.methods import PointPosterior

    settings = dict(noise=noise(), num_inference_steps=STEPS, uq_every=2, mc_samples=4, progress=False)
    out = EnsembleSampler(members, ddpm()).sample(generator=torch.Generator().manual_seed(11), **settings)
    point = BayesDiffSampler(members[0], ddpm(), PointPosterior(members[0]))
    expected = point.sample(generator=torch.Generator().manual_seed(11), **settings).variance
    assert torch.equal(out.aleatoric_variance, expected)
    assert not torch.allclose(expected, torch.full_like(expected, c2_only_variance(ddpm())))
    assert out.timings["mc_unet_calls"] == STEPS // 2 - 1  # none at x_T, whose variance is 0
    deterministic = EnsembleSampler(members, ddim()).sample(**settings)
    assert deterministic.timings["mc_unet_calls"] == 0
    assert torch.equal(deterministic.aleatoric_variance, torch.zeros_like(deterministic.variance))
