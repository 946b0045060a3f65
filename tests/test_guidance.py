import pytest
import torch
import torch.nn.functional as F

from bayesdiff_ext.denoiser import Denoiser
from bayesdiff_ext.guidance import (
    ClassifierFreeGuidance,
    combine,
    guided_head_moments,
    split_branches,
    stack_branches,
)
from sd_components import fitted_sd_posterior, sd_pipeline, prompt_embeddings

SCALE = 3.0


@pytest.fixture(scope="module")
def guided_call():
    """The tiny SD UNet on one [uncond; cond] batch: (posterior per structure, φ of its 2B rows, output)."""
    torch.manual_seed(0)
    pipe = sd_pipeline()
    cond, uncond = prompt_embeddings(pipe, batch=2)
    x = torch.randn(2, 4, 8, 8)
    posteriors = {s: fitted_sd_posterior(pipe.unet, s) for s in ("diag", "full")}
    with torch.no_grad(), posteriors["diag"].capture() as cap:
        out = pipe.unet(torch.cat([x, x]), 500, encoder_hidden_states=torch.cat([uncond, cond])).sample
    return posteriors, cap.phi, out


def shared_weight_draws(post, samples: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """θ ~ N(θ_MAP, Σ) for a diag or full posterior, from its op inputs: (W (K, C, D), b (K, C)), float64."""
    spec = post.spec
    g = torch.Generator().manual_seed(seed)
    weight = post.head.weight.detach()[: spec.eps_channels].double().flatten(1)
    bias = post.head.bias.detach()[: spec.eps_channels].double()
    inputs = post.posterior.op_inputs(post.precision_scale, post.prior_precision)
    if post.structure == "diag":
        w = weight + inputs["weight_var"].flatten(1).sqrt() * torch.randn(
            samples, *weight.shape, generator=g, dtype=torch.float64
        )
        b = bias + inputs["bias_var"].sqrt() * torch.randn(
            samples, *bias.shape, generator=g, dtype=torch.float64
        )
        return w, b
    # full: per channel, [w_c; b_c] = θ_c + Q·diag(√mix)·z with Q = projᵀ (the eigenvectors of A_aug).
    q = torch.cat([inputs["proj_weight"], inputs["proj_bias"][:, None]], dim=1).T  # (D+1, R)
    z = torch.randn(samples, spec.eps_channels, q.shape[1], generator=g, dtype=torch.float64)
    offsets = torch.einsum("dr,kcr->kcd", q, z * inputs["mix"].sqrt())
    theta = torch.cat([weight, bias[:, None]], dim=1) + offsets
    return theta[..., :-1], theta[..., -1]


def head_outputs(post, phi: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """head_θ(φ) for every drawn θ: (K, B, C, H·W)."""
    spec = post.spec
    patches = F.unfold(
        phi.double(), spec.kernel_size, dilation=spec.dilation, padding=spec.padding, stride=spec.stride
    )
    return torch.einsum("kcd,bdp->kbcp", w, patches) + b[:, None, :, None]


@pytest.mark.parametrize("structure", ["diag", "full"])
def test_exact_guidance_variance_is_monte_carlo_over_weights_shared_by_both_branches(guided_call, structure):
    posteriors, phi, _ = guided_call
    post = posteriors[structure]
    phi = phi[[0, 2]]  # image 0: its uncond and cond rows
    mean, var = guided_head_moments(post, phi, SCALE, "exact")
    samples = 8000
    w, b = shared_weight_draws(post, samples, seed=1)
    outputs = head_outputs(post, phi, w, b)
    shared = combine(outputs[:, 0], outputs[:, 1], SCALE).var(dim=0).reshape(var.shape)
    # 8000 draws: the relative std of each variance estimate is √(2/7999) ≈ 1.6%.
    torch.testing.assert_close(var.double(), shared, rtol=0.08, atol=0)
    assert abs(float(var.sum() / shared.sum()) - 1) < 0.02

    # Drawing θ separately per branch is what the paper's formula assumes; it is not the model.
    w2, b2 = shared_weight_draws(post, samples, seed=2)
    apart = (
        combine(outputs[:, 0], head_outputs(post, phi[1:], w2, b2)[:, 0], SCALE).var(dim=0).reshape(var.shape)
    )
    _, independent = guided_head_moments(post, phi, SCALE, "independent")
    torch.testing.assert_close(independent.double(), apart, rtol=0.08, atol=0)
    assert (independent / var).min() > 2.0


def test_independent_option_is_the_papers_formula(guided_call):
    posteriors, phi, _ = guided_call
    post = posteriors["diag"]
    uncond, cond = phi.chunk(2)
    mean_u, var_u = post.predict(uncond)
    mean_c, var_c = post.predict(cond)
    mean, var = guided_head_moments(post, phi, SCALE, "independent")
    torch.testing.assert_close(var, (1 - SCALE) ** 2 * var_u + SCALE**2 * var_c)
    torch.testing.assert_close(mean, mean_u + SCALE * (mean_c - mean_u))
    assert not torch.allclose(var, guided_head_moments(post, phi, SCALE, "exact")[1], rtol=0.1)


@pytest.mark.parametrize("structure", ["diag", "full"])
def test_head_mean_at_the_guided_features_is_the_guided_prediction(guided_call, structure):
    """The bias coefficients (1−s) + s sum to 1, so head(φ_cfg) = (1−s)·ε_u + s·ε_c exactly."""
    posteriors, phi, out = guided_call
    mean, _ = guided_head_moments(posteriors[structure], phi, SCALE, "exact")
    torch.testing.assert_close(mean, combine(*out.chunk(2), SCALE), rtol=1e-4, atol=1e-5)


def test_guided_forward_is_one_unet_call_on_both_branches(guided_call):
    posteriors, _, _ = guided_call
    post = posteriors["full"]
    pipe_unet = post.model
    x = torch.randn(3, 4, 8, 8)
    cond, uncond = torch.randn(3, 5, 16), torch.randn(3, 5, 16)
    calls = []
    handle = pipe_unet.register_forward_pre_hook(lambda m, a, k: calls.append((a, k)), with_kwargs=True)
    try:
        guidance = ClassifierFreeGuidance(SCALE, {"encoder_hidden_states": uncond})
        branches = guidance.branch_kwargs({"encoder_hidden_states": cond})
        with torch.no_grad():
            denoiser = Denoiser(pipe_unet)
            out, head_mean, head_var = guidance.forward(denoiser, post, x, 700, branches, want_head=True)
            plain, none_mean, none_var = guidance.forward(denoiser, post, x, 700, branches, want_head=False)
    finally:
        handle.remove()
    assert len(calls) == 2 and none_mean is None and none_var is None
    _, kwargs = calls[0]
    assert torch.equal(kwargs["sample"], torch.cat([x, x]))
    assert torch.equal(kwargs["encoder_hidden_states"], torch.cat([uncond, cond]))
    with torch.no_grad():
        raw = pipe_unet(torch.cat([x, x]), 700, encoder_hidden_states=torch.cat([uncond, cond])).sample
    u, c = raw.chunk(2)
    assert torch.equal(out, u + SCALE * (c - u)) and torch.equal(plain, out)
    assert head_var.shape == (3, 4, 8, 8) and head_var.min() >= 0
    torch.testing.assert_close(head_mean, out, rtol=1e-4, atol=1e-5)


def test_stack_and_split_branches_concatenate_batches_and_keep_shared_values():
    flags = {"scale": 0.5}
    u, c = torch.zeros(2, 3), torch.ones(2, 3)
    broadcast = torch.ones(1, 3)
    stacked = stack_branches(
        {"h": u, "extra": {"e": u[:, :1]}, "attn": flags, "b": broadcast},
        {"h": c, "extra": {"e": c[:, :1]}, "attn": flags, "b": broadcast},
        rows=2,
    )
    assert torch.equal(stacked["h"], torch.cat([u, c])) and stacked["extra"]["e"].shape == (4, 1)
    assert stacked["attn"] == flags and stacked["b"] is broadcast
    uncond, cond = split_branches(stacked, rows=2)
    assert torch.equal(uncond["h"], u) and torch.equal(cond["extra"]["e"], c[:, :1])
    assert uncond["attn"] == flags and cond["b"] is broadcast
    with pytest.raises(ValueError, match="differs from the conditional one"):
        stack_branches({"attn": {"scale": 0.5}}, {"attn": {"scale": 0.7}}, rows=2)
    with pytest.raises(ValueError, match="unconditional kwargs have keys"):
        stack_branches({"h": u}, {"h": c, "t": c}, rows=2)


def test_guidance_settings_are_checked():
    with pytest.raises(ValueError, match="guidance variance must be one of"):
        ClassifierFreeGuidance(2.0, variance="paper")
    with pytest.raises(ValueError, match="guidance scale must be a finite number"):
        ClassifierFreeGuidance(float("nan"))
    with pytest.raises(ValueError, match="even number of rows"):
        guided_head_moments(None, torch.zeros(3, 8, 4, 4), 2.0)
