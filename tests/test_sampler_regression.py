"""The moments the sampler and the callback produce, pinned: a refactor of the step engine must not move them.

``tests/data/sampler_moments.pt`` holds the images, E[x_0], Var[x_0] and its aleatoric part of
DDIM (η = 0 and 0.5), DDPM and DPM-Solver-2 (both algorithms) runs in every mode the step engine
has (Monte Carlo at every step, the paper's settings with its sampled image path, Skip with the
closed form between, the closed form only), of guided runs, and of UncertaintyCallback in a stock
Stable Diffusion loop, on tiny random-init models. They were written before the step engine was
introduced. On the platform that wrote them (same torch version, same CPU capability) the runs must
match bit for bit; elsewhere float32 rounding of the convolutions and of the ops' vector code (another
instruction set: other lane widths, FMA) may differ, and they must agree to 1e-4 relative, 1e-6 absolute
(the size of the change when the CPU kernels were vectorised: at most 4.7e-5 relative). Rewrite the file (``python tests/test_sampler_regression.py``) only for an intended change
of the moments, and say so in the commit.
"""

from pathlib import Path

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverSinglestepScheduler

from bayesdiff_ext import BayesDiffSampler, LastLayerLaplace, UncertaintyCallback
from bayesdiff_ext.guidance import ClassifierFreeGuidance
from sd_components import fitted_sd_posterior, prompt_embeddings, sd_pipeline, sd_scheduler
from tiny_models import tiny_condition_unet, tiny_unet

PINNED = Path(__file__).parent / "data" / "sampler_moments.pt"
STEPS = 4

SCHEDULERS = {
    "ddim": lambda: DDIMScheduler(num_train_timesteps=1000, clip_sample=False),
    "ddim_eta": lambda: DDIMScheduler(num_train_timesteps=1000, clip_sample=False, timestep_spacing="trailing"),
    "ddpm": lambda: DDPMScheduler(num_train_timesteps=1000, clip_sample=False),
    "dpm2++": lambda: DPMSolverSinglestepScheduler(num_train_timesteps=1000, algorithm_type="dpmsolver++"),
    "dpm2": lambda: DPMSolverSinglestepScheduler(
        num_train_timesteps=1000, algorithm_type="dpmsolver", solver_type="heun", final_sigmas_type="sigma_min"
    ),
}
MODES = {
    "mc": dict(mc_samples=4, uq_every=1),
    "paper": dict(mc_samples=4, uq_every=2, eps_variance="bayesdiff", mode="bayesdiff"),
    "skip": dict(mc_samples=3, uq_every=3, skip="covariance"),
    "closed": dict(mc_samples=0, covariance="none", uq_every=1),
}


def _posterior(unet, **fit) -> LastLayerLaplace:
    shape = (8, unet.config.in_channels, 8, 8)
    images = torch.rand(shape, generator=torch.Generator().manual_seed(0)) * 2 - 1
    posterior = LastLayerLaplace(unet, "diag", sigma_noise=0.1, prior_precision=1e3)
    return posterior.fit(
        images, DDPMScheduler(num_train_timesteps=1000, clip_sample=False), batch_size=8,
        generator=torch.Generator().manual_seed(1), progress=False, **fit,
    )


def _fields(out) -> dict[str, torch.Tensor]:
    return dict(images=out.images, mean=out.mean, variance=out.variance, aleatoric=out.aleatoric_variance)


def sampler_runs() -> dict[str, torch.Tensor]:
    runs = {}
    unet = tiny_unet(add_attention=False)  # the model the pins were written with
    posterior = _posterior(unet)
    noise = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    for name, make in SCHEDULERS.items():
        for mode, settings in MODES.items():
            out = BayesDiffSampler(unet, make(), posterior).sample(
                noise=noise, num_inference_steps=STEPS, eta=0.5 if name == "ddim_eta" else 0.0,
                generator=torch.Generator().manual_seed(4), progress=False, **settings,
            )
            runs.update({f"{name}/{mode}/{k}": v for k, v in _fields(out).items()})

    conditional = tiny_condition_unet()
    states = torch.randn(2, 3, 8, generator=torch.Generator().manual_seed(5))
    cond_posterior = _posterior(conditional, model_kwargs={"encoder_hidden_states": torch.randn(8, 3, 8, generator=torch.Generator().manual_seed(8))})
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(6))
    for variance in ("exact", "independent"):
        guidance = ClassifierFreeGuidance(3.0, {"encoder_hidden_states": torch.zeros_like(states)}, variance)
        out = BayesDiffSampler(conditional, SCHEDULERS["ddim"](), cond_posterior).sample(
            noise=latents, num_inference_steps=STEPS, generator=torch.Generator().manual_seed(7),
            mc_samples=4, uq_every=1, unet_kwargs={"encoder_hidden_states": states}, guidance=guidance, progress=False,
        )
        runs.update({f"guided_{variance}/{k}": v for k, v in _fields(out).items()})
    return runs


def callback_runs() -> dict[str, torch.Tensor]:
    runs = {}
    pipe = sd_pipeline()
    cond, uncond = prompt_embeddings(pipe, 2)
    posterior = fitted_sd_posterior(pipe.unet)
    for name, settings in dict(mc=dict(mc_samples=3, uq_every=1), skip=dict(mc_samples=3, uq_every=2, skip="covariance")).items():
        pipe.scheduler = sd_scheduler()
        callback = UncertaintyCallback(posterior, generator=torch.Generator().manual_seed(0), **settings)
        pipe(
            prompt_embeds=cond, negative_prompt_embeds=uncond, num_inference_steps=STEPS, guidance_scale=3.0,
            output_type="latent", generator=torch.Generator().manual_seed(0), callback_on_step_end=callback,
        )
        runs[f"callback_{name}/mean"], runs[f"callback_{name}/variance"] = callback.mean, callback.variance
    return runs


def _platform() -> str:
    return f"torch {torch.__version__}, {torch.backends.cpu.get_cpu_capability()}"


@pytest.fixture(scope="module")
def pinned():
    return torch.load(PINNED, weights_only=True)


@pytest.mark.parametrize("runs", [sampler_runs, callback_runs])
def test_moments_are_the_pinned_ones(pinned, runs):
    exact = pinned["platform"] == _platform()
    for key, value in runs().items():
        expected = pinned["runs"][key]
        if exact:
            assert torch.equal(value, expected), f"{key} moved (max |Δ| {float((value - expected).abs().max()):.3g})"
        else:
            torch.testing.assert_close(value, expected, rtol=1e-4, atol=1e-6, msg=key)


if __name__ == "__main__":
    PINNED.parent.mkdir(exist_ok=True)
    torch.set_num_threads(1)
    torch.save({"platform": _platform(), "runs": {**sampler_runs(), **callback_runs()}}, PINNED)
    print(f"wrote {PINNED}")
