"""Transformer denoisers end to end: heads, the unpatchify, the closed forms against references, fit/save/load/sample.

Tiny random-init DiT (learned σ, class labels), PixArt (learned σ, captions, resolution conditions),
SD3 and Flux (packed tokens) from ``tiny_models.py``.
"""

import warnings

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, FlowMatchEulerDiscreteScheduler
from laplace import DiagLaplace, FullLaplace, KronLaplace
from laplace.curvature import CurvlinopsEF, CurvlinopsGGN
from torch import nn
from torch.func import functional_call, jacrev
from torch.utils.data import DataLoader, TensorDataset

from bayesdiff_ext import BayesDiffSampler, LastLayerLaplace
from bayesdiff_ext.denoiser import Denoiser, stepped_prediction
from bayesdiff_ext.guidance import ClassifierFreeGuidance
from bayesdiff_ext.posterior.heads import eps_parameters
from bayesdiff_ext.posterior.training_noise import FlowMatchingNoise, training_noise
from tiny_models import (
    flux_conditioning,
    flux_tokens,
    pixart_conditioning,
    text_conditioning,
    tiny_dit,
    tiny_flux,
    tiny_pixart,
    tiny_sd3,
)

warnings.filterwarnings("ignore", category=FutureWarning, module="torch.jit")
STEPS = 4


def dit_conditioning(batch: int, seed: int = 0) -> dict[str, torch.Tensor]:
    return {"class_labels": torch.randint(0, 10, (batch,), generator=torch.Generator().manual_seed(seed))}


# name: (model builder, conditioning for B rows, clean samples for the fit, training noise)
MODELS = {
    "dit": (tiny_dit, dit_conditioning, lambda: torch.randn(6, 4, 8, 8, generator=torch.Generator().manual_seed(1))),
    "pixart": (tiny_pixart, pixart_conditioning, lambda: torch.randn(6, 4, 8, 8, generator=torch.Generator().manual_seed(1))),
    "sd3": (tiny_sd3, text_conditioning, lambda: torch.randn(6, 4, 8, 8, generator=torch.Generator().manual_seed(1))),
    "flux": (
        tiny_flux,
        flux_conditioning,
        lambda: flux_tokens(torch.randn(6, 2, 8, 8, generator=torch.Generator().manual_seed(1))),
    ),
}


def training(name: str):
    if name == "sd3":
        return FlowMatchingNoise(FlowMatchEulerDiscreteScheduler(shift=3.0), "logit_normal")
    if name == "flux":
        return FlowMatchingNoise(FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True), mu=0.6)
    return training_noise(DDPMScheduler(num_train_timesteps=1000))


def in_dtype(value, dtype: torch.dtype):
    """Floating tensors (in nested dicts too) in ``dtype``."""
    if isinstance(value, dict):
        return {k: in_dtype(v, dtype) for k, v in value.items()}
    return value.to(dtype) if torch.is_tensor(value) and value.is_floating_point() else value


def fitted(name: str, structure: str = "diag", curvature: str = "ggn", model=None, **options) -> LastLayerLaplace:
    make, conditioning, clean = MODELS[name]
    model = make() if model is None else model
    dtype = next(model.parameters()).dtype
    return LastLayerLaplace(model, structure, curvature, **options).fit(
        clean().to(dtype),
        training(name),
        batch_size=6,
        generator=torch.Generator().manual_seed(2),
        model_kwargs=in_dtype(conditioning(6), dtype),
        progress=False,
    )


def model_input(name: str, batch: int = 2, height: int = 8, width: int = 8) -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    if name == "flux":
        return flux_tokens(torch.randn(batch, 2, height, width, generator=g))
    return torch.randn(batch, 4, height, width, generator=g)


def conditioning_for(name: str, batch: int, height: int = 8, width: int = 8) -> dict:
    if name == "flux":
        return flux_conditioning(batch, height, width, seed=4)
    if name == "pixart":
        return pixart_conditioning(batch, 4, height, width)
    return MODELS[name][1](batch, 4)


# ------------------------------------------------------------------ heads


def test_each_transformers_head_is_its_top_level_output_layer():
    dit, pixart, sd3, flux = tiny_dit(), tiny_pixart(), tiny_sd3(), tiny_flux()
    assert LastLayerLaplace(dit).head is dit.proj_out_2  # not proj_out_1, the AdaLN shift/scale
    assert LastLayerLaplace(pixart).head is pixart.proj_out
    assert LastLayerLaplace(sd3).head is sd3.proj_out
    flux_posterior = LastLayerLaplace(flux)
    assert flux_posterior.head is flux.proj_out and flux_posterior.head is not flux.single_transformer_blocks[0].proj_out
    assert flux_posterior.layout is None and flux_posterior.eps_channels == 8


@pytest.mark.parametrize("make", [tiny_dit, tiny_pixart])
def test_learned_sigma_keeps_the_eps_rows_of_every_patch(make):
    model = make()
    posterior = LastLayerLaplace(model)
    assert posterior.eps_channels == 4 and posterior.spec.eps_channels == 16  # 2×2 patch × 4 ε channels
    rows = [pixel * 8 + c for pixel in range(4) for c in range(4)]  # token outputs are (p, q, c), c < 8
    assert list(posterior.spec.eps_rows) == rows
    weight, bias = eps_parameters(posterior.head, posterior.spec)
    assert torch.equal(weight, posterior.head.weight.detach()[rows]) and torch.equal(bias, posterior.head.bias.detach()[rows])
    assert LastLayerLaplace(model, eps_channels=8).spec.eps_rows is None  # all channels as ε


def test_any_token_wise_linear_is_taken_with_head_but_the_fit_checks_it_makes_the_output():
    flux = tiny_flux()
    block_head = flux.single_transformer_blocks[0].proj_out
    posterior = LastLayerLaplace(flux, head=block_head)
    assert posterior.head is block_head and posterior.spec.kind == "linear"
    with pytest.raises(ValueError, match="is not the output of its head"):
        posterior.fit(MODELS["flux"][2](), training("flux"), model_kwargs=flux_conditioning(6), progress=False)


@pytest.mark.parametrize("name,height,width", [("dit", 8, 8), ("pixart", 8, 12), ("sd3", 12, 8), ("flux", 8, 12)])
def test_the_posterior_mean_is_the_models_own_output(name, height, width):
    """φ on the token grid through the head, unpatchified as the model does (non-square too)."""
    posterior = fitted(name)
    x = model_input(name, height=height, width=width)
    with torch.no_grad(), posterior.capture() as cap:
        out = Denoiser(posterior.model)(x, torch.tensor(500.0), conditioning_for(name, 2, height, width))
    if posterior.layout is not None:
        assert cap.phi.shape == (2, height // 2, width // 2, posterior.spec.in_channels)
    mean, var = posterior.predict(cap.phi)
    torch.testing.assert_close(mean, stepped_prediction(out, x), rtol=1e-5, atol=1e-5)
    assert var.shape == mean.shape and bool((var > 0).all())
    with pytest.raises(ValueError, match="phi"):
        posterior.predict(cap.phi.flatten(1, -2) if posterior.layout is not None else cap.phi[..., :3])


# ------------------------------------------------------------------ the closed forms against references


def _jacobian_of_output(posterior, x, timestep, kwargs):
    """∂(model's ε output)/∂(ε rows of the head's weight and bias), through the model's own forward, float64."""
    model, head = posterior.model, posterior.head
    names = {id(p): n for n, p in model.named_parameters()}
    weight_name, bias_name = names[id(head.weight)], names[id(head.bias)]
    rows = torch.tensor(posterior.spec.eps_rows or range(posterior.spec.eps_channels))
    denoiser = Denoiser(model)

    def output(eps_weight, eps_bias):
        weight = head.weight.detach().index_copy(0, rows, eps_weight)
        bias = head.bias.detach().index_copy(0, rows, eps_bias)
        call_kwargs = {**kwargs, denoiser.sample_argument: x, "timestep": denoiser.model_timestep(timestep, len(x))}
        out = functional_call(model, {weight_name: weight, bias_name: bias}, (), call_kwargs).sample
        return stepped_prediction(out, x)

    return jacrev(output, argnums=(0, 1))(*eps_parameters(head, posterior.spec))


@pytest.mark.parametrize("structure", ["diag", "full"])
@pytest.mark.parametrize("name", ["dit", "sd3", "flux"])
def test_closed_form_variance_equals_the_float64_jacobian_through_the_model(name, structure):
    """Var[out_o] = J_o Σ J_oᵀ with J the Jacobian of the model's output (unpatchify included) in the
    head's ε weights, Σ from the fitted curvature: the layout and the closed form checked at once."""
    model = MODELS[name][0]().double()
    posterior = fitted(name, structure, model=model)
    x, kwargs = model_input(name).double(), in_dtype(conditioning_for(name, 2), torch.float64)
    timestep = torch.tensor(700.0)
    with torch.no_grad(), posterior.capture() as cap:
        Denoiser(model)(x, timestep, kwargs)
    _, var = posterior.predict(cap.phi)
    j_weight, j_bias = _jacobian_of_output(posterior, x, timestep, kwargs)  # (*out, R, D), (*out, R)
    s, delta = posterior.precision_scale, posterior.prior_precision
    inputs = posterior.posterior.op_inputs(s, delta)
    if structure == "diag":
        reference = (j_weight**2 * inputs["weight_var"]).sum((-2, -1)) + (j_bias**2 * inputs["bias_var"]).sum(-1)
    else:  # Σ = I_R ⊗ (s·A_aug + δ·I)⁻¹ over [w_r; b_r]
        covariance = torch.linalg.inv(s * posterior.posterior.gram + delta * torch.eye(len(posterior.posterior.gram), dtype=torch.float64))
        jacobian = torch.cat([j_weight, j_bias[..., None]], dim=-1)
        reference = torch.einsum("...rd,de,...re->...", jacobian, covariance, jacobian)
    assert var.dtype == torch.float64
    torch.testing.assert_close(var, reference, rtol=1e-9, atol=1e-12)


def _fitting_features(posterior, name):
    """The (φ tokens (B, N, D), target tokens (B, N·R_ε)) that ``fitted(name)`` accumulated, same draws."""
    _, conditioning, clean = MODELS[name]
    noise = training(name)
    x0 = clean()
    x_t, timestep, target = noise.draw(x0, torch.Generator().manual_seed(2))
    with torch.no_grad(), posterior.capture() as cap:
        Denoiser(posterior.model)(x_t, timestep, conditioning(6))
    target = stepped_prediction(target, x0) if posterior.layout is None else posterior.layout.to_tokens(target)
    return cap.phi.flatten(1, -2), target.flatten(1)


def _la_variance(la, phi):
    _, f_var = la(phi, pred_type="glm")
    return torch.diagonal(f_var, dim1=1, dim2=2)


@pytest.mark.parametrize(
    "structure,curvature,la_class,backend,la_scale",
    [
        ("diag", "ggn", DiagLaplace, CurvlinopsGGN, 1.0),
        ("diag", "ef", DiagLaplace, CurvlinopsEF, 2.0),
        ("full", "ggn", FullLaplace, CurvlinopsGGN, 1.0),
        ("kron", "ggn", KronLaplace, CurvlinopsGGN, 1.0),
    ],
)
@pytest.mark.parametrize("name", ["dit", "sd3"])
def test_fitted_through_the_model_equals_laplace_torch_on_the_flattened_tokens(
    name, structure, curvature, la_class, backend, la_scale
):
    """laplace-torch's own Linear last layer (the head's ε rows) on the tokens the fit saw: a sample is
    an image, its outputs the N·R_ε token outputs, as in the fit."""
    posterior = fitted(name, structure, curvature)
    phi, target = _fitting_features(posterior, name)
    weight, bias = eps_parameters(posterior.head, posterior.spec)
    linear = nn.Linear(*weight.shape[::-1])
    with torch.no_grad():
        linear.weight.copy_(weight)
        linear.bias.copy_(bias)
    la = la_class(nn.Sequential(linear, nn.Flatten()), "regression", backend=backend)
    la.fit(DataLoader(TensorDataset(phi, target), batch_size=len(phi)))
    la.sigma_noise, la.prior_precision = posterior.sigma_noise, posterior.prior_precision
    if structure == "diag":
        tensors = posterior.posterior.tensors()
        ours = torch.cat([tensors["h_weight"].flatten(), tensors["h_bias"]])
        torch.testing.assert_close(la_scale * ours, la.H.double(), rtol=2e-5, atol=1e-4)
        la.H = la.H / la_scale
    with torch.no_grad(), posterior.capture() as cap:
        Denoiser(posterior.model)(model_input(name), torch.tensor(300), conditioning_for(name, 2))
    _, var = posterior.predict(cap.phi)
    ours = posterior.layout.to_tokens(var).flatten(1)
    torch.testing.assert_close(ours.double(), _la_variance(la, cap.phi.flatten(1, -2)).double(), rtol=1e-4, atol=1e-7)


# ------------------------------------------------------------------ every structure, save and load


@pytest.mark.parametrize(
    "structure,curvature",
    [
        ("diag", "ggn"),
        ("diag", "ef"),
        ("diag", "ef_bayesdiff"),
        ("full", "ggn"),
        ("kron", "ggn"),
        ("kron", "ef"),
        ("isotropic", "ggn"),
        ("hfl", "ggn"),
    ],
)
def test_every_structure_fits_saves_and_loads_on_a_learned_sigma_linear_head(tmp_path, structure, curvature):
    posterior = fitted("dit", structure, curvature)
    posterior.save(tmp_path / "dit.safetensors")
    loaded = LastLayerLaplace.load(tmp_path / "dit.safetensors", tiny_dit())
    assert loaded.spec == posterior.spec and loaded.eps_channels == 4
    with torch.no_grad(), posterior.capture() as cap:
        Denoiser(posterior.model)(model_input("dit"), torch.tensor(250), conditioning_for("dit", 2))
    mean, var = posterior.predict(cap.phi)
    loaded_mean, loaded_var = loaded.predict(cap.phi)
    assert var.shape == (2, 4, 8, 8) and bool((var >= 0).all()) and bool((var > 0).any())
    torch.testing.assert_close(loaded_var, var, rtol=1e-6, atol=0)
    torch.testing.assert_close(loaded_mean, mean, rtol=0, atol=0)


# ------------------------------------------------------------------ fit, save, load, sample


def _plain_loop(model, scheduler, x, kwargs, guidance=None, generator=None, set_timesteps=None):
    """The pipelines' own loop: [uncond; cond] under guidance, combined uncond + s·(cond − uncond),
    the ε channels of a learned-σ output, the scheduler's step."""
    scheduler.set_timesteps(STEPS, **(set_timesteps or {}))
    denoiser = Denoiser(model)
    if guidance is not None:
        kwargs = {k: torch.cat([guidance.uncond_kwargs[k], v]) if k in guidance.uncond_kwargs else torch.cat([v, v]) if torch.is_tensor(v) and len(v) == len(x) else v for k, v in kwargs.items()}
    with torch.no_grad():
        for t in scheduler.timesteps:
            rows = torch.cat([x, x]) if guidance is not None else x
            out = denoiser(rows, t, kwargs)
            if guidance is not None:
                uncond, cond = out.chunk(2)
                out = uncond + guidance.scale * (cond - uncond)
            x = scheduler.step(stepped_prediction(out, x), t, x, generator=generator).prev_sample
    return x


def _fit_save_load(name, tmp_path, structure="diag", **options):
    posterior = fitted(name, structure, **options)
    path = tmp_path / f"{name}.safetensors"
    posterior.save(path)
    return LastLayerLaplace.load(path, posterior.model)


def test_dit_with_learned_sigma_fits_saves_loads_and_samples_with_guidance(tmp_path):
    posterior = _fit_save_load("dit", tmp_path)
    labels = torch.tensor([3, 7])
    guidance = ClassifierFreeGuidance(4.0, {"class_labels": torch.full((2,), 10)})  # DiT's null class
    noise = model_input("dit")
    out = BayesDiffSampler(posterior.model, DDIMScheduler(clip_sample=False), posterior).sample(
        noise=noise, num_inference_steps=STEPS, mc_samples=4, model_kwargs={"class_labels": labels},
        guidance=guidance, generator=torch.Generator().manual_seed(0), progress=False,
    )
    expected = _plain_loop(posterior.model, DDIMScheduler(clip_sample=False), noise, {"class_labels": labels}, guidance)
    assert torch.equal(out.images, expected)
    assert out.variance.shape == (2, 4, 8, 8) and bool((out.variance >= 0).all()) and bool((out.variance > 0).any())


def test_sd3_fits_with_flow_matching_saves_loads_and_samples(tmp_path):
    posterior = _fit_save_load("sd3", tmp_path, "full")
    cond, uncond = text_conditioning(2, seed=5), text_conditioning(2, seed=6)
    guidance = ClassifierFreeGuidance(3.0, uncond)
    noise = model_input("sd3")
    for scheduler in (FlowMatchEulerDiscreteScheduler(shift=3.0), FlowMatchEulerDiscreteScheduler(shift=3.0, stochastic_sampling=True)):
        out = BayesDiffSampler(posterior.model, scheduler, posterior).sample(
            noise=noise, num_inference_steps=STEPS, mc_samples=4, model_kwargs=cond, guidance=guidance,
            generator=torch.Generator().manual_seed(0), progress=False,
        )
        expected = _plain_loop(posterior.model, scheduler, noise, cond, guidance, torch.Generator().manual_seed(0))
        assert torch.equal(out.images, expected)
        assert bool((out.variance >= 0).all()) and bool((out.variance > 0).any())
        assert bool((out.aleatoric_variance > 0).any()) == scheduler.config.stochastic_sampling


def test_pixart_tiles_added_cond_kwargs_for_the_monte_carlo_batch(tmp_path):
    posterior = _fit_save_load("pixart", tmp_path, "kron")
    kwargs = pixart_conditioning(2, seed=7)
    rows = []
    handle = posterior.model.register_forward_pre_hook(
        lambda m, args, kw: rows.append((len(kw["hidden_states"]), len(kw["added_cond_kwargs"]["resolution"]), len(kw["encoder_hidden_states"]))),
        with_kwargs=True,
    )
    try:
        out = BayesDiffSampler(posterior.model, DDIMScheduler(clip_sample=False), posterior).sample(
            noise=model_input("pixart"), num_inference_steps=STEPS, mc_samples=3, model_kwargs=kwargs, progress=False,
        )
    finally:
        handle.remove()
    assert set(rows) == {(2, 2, 2), (6, 6, 6)}  # image path 2 rows, Monte Carlo 3 × 2, conditioning alike
    assert bool((out.variance >= 0).all()) and bool((out.variance > 0).any())


def test_flux_samples_packed_tokens_with_dynamic_shifting(tmp_path):
    posterior = _fit_save_load("flux", tmp_path, "diag", curvature="ef")
    kwargs = flux_conditioning(2, seed=8)
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    timesteps = dict(sigmas=[1.0, 0.75, 0.5, 0.25], mu=0.6)  # as FluxPipeline: linspace(1, 1/N, N)
    noise = model_input("flux")
    out = BayesDiffSampler(posterior.model, scheduler, posterior).sample(
        noise=noise, num_inference_steps=STEPS, mc_samples=4, model_kwargs=kwargs, set_timesteps_kwargs=timesteps,
        progress=False,
    )
    expected = _plain_loop(posterior.model, scheduler, noise, kwargs, set_timesteps=timesteps)
    assert torch.equal(out.images, expected)
    assert out.variance.shape == noise.shape and bool((out.variance >= 0).all()) and bool((out.variance > 0).any())
    with pytest.raises(ValueError, match="pass the initial noise"):
        BayesDiffSampler(posterior.model, scheduler, posterior).sample(batch_size=2, progress=False)
