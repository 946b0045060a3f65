"""M head-weight samples held fixed along whole trajectories (the 2025 successor's approach).

Each draw θ_m ~ N(θ_MAP, Σ_diag) of the head's ε weights drives its own deterministic trajectory
from the shared x_T; the scores of an image are read from its M final images (their per-pixel
variance, their entropy in a feature space). The M trajectories run as one batch of M·B images
through the sampler; a forward hook on the head (removed on exit, the model is never modified)
gives chunk m the output of draw m.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from bayesdiff_ext.posterior.heads import eps_parameters

__all__ = ["draw_head_weights", "fixed_weight_samples"]


def draw_head_weights(posterior, samples: int, seed: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``samples`` draws of the ε weights (M, C_eps, C_in, k, k) and bias (M, C_eps) of a diag posterior."""
    if posterior.structure != "diag":
        raise ValueError(f"weight samples need a diag posterior, got structure {posterior.structure!r}")
    inputs = posterior.posterior.op_inputs(posterior.precision_scale, posterior.prior_precision)
    weight, bias = eps_parameters(posterior.head, posterior.spec)
    generator = torch.Generator().manual_seed(seed)

    def draw(mean, var):
        noise = torch.randn((samples, *mean.shape), generator=generator, dtype=torch.float64)
        return (mean.to(torch.float64) + var.sqrt() * noise).to(mean.dtype)

    bias_draws = None if bias is None else draw(bias, inputs["bias_var"])
    return draw(weight, inputs["weight_var"]), bias_draws


@contextlib.contextmanager
def _per_chunk_head(head, weights, biases, eps_channels: int):
    samples = len(weights)

    def hook(module, args, output):
        chunks = args[0].chunk(samples)
        eps = torch.cat(
            [
                F.conv2d(
                    c,
                    weights[m],
                    None if biases is None else biases[m],
                    module.stride,
                    module.padding,
                    module.dilation,
                    module.groups,
                )
                for m, c in enumerate(chunks)
            ]
        )
        output = output.clone()
        output[:, :eps_channels] = eps
        return output

    handle = head.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def fixed_weight_samples(
    sampler, noise, *, samples: int, seed: int, steps: int, progress: bool
) -> torch.Tensor:
    """The final images (M, B, C, H, W), float64, of ``samples`` = M fixed-weight trajectories per x_T."""
    posterior = sampler.posterior
    if not isinstance(posterior.head, torch.nn.Conv2d):
        raise ValueError("fixed weight samples are implemented for Conv2d heads")
    weights, biases = draw_head_weights(posterior, samples, seed)
    batch = len(noise)
    with _per_chunk_head(posterior.head, weights, biases, posterior.eps_channels):
        # uq_every = steps: only the first step asks for the head variance (no extra UNet calls).
        out = sampler.sample(
            noise=noise.repeat(samples, 1, 1, 1),
            num_inference_steps=steps,
            mc_samples=0,
            covariance="none",
            uq_every=steps,
            progress=progress,
        )
    return out.images.to(torch.float64).unflatten(0, (samples, batch))
