"""Heads, features, schedulers and oracles shared by the posterior tests (tiny UNets: tiny_models.py)."""

import torch
from diffusers import DDPMScheduler


def tiny_scheduler(steps=100) -> DDPMScheduler:
    return DDPMScheduler(num_train_timesteps=steps, clip_sample=False)


def timesteps(batch, steps=100, seed=1) -> torch.Tensor:
    return torch.randint(0, steps, (batch,), generator=torch.Generator().manual_seed(seed))


def conv_head(c_in=5, c_out=3, kernel=3, seed=0, **kwargs) -> torch.nn.Conv2d:
    torch.manual_seed(seed)
    kwargs.setdefault("padding", kernel // 2)
    return torch.nn.Conv2d(c_in, c_out, kernel, **kwargs).eval()


def random_features(head, batches=3, batch=4, size=(6, 5), seed=0, dtype=torch.float32, eps_channels=None):
    """(φ, target) batches for a head: φ ~ N(0, 1), target = the first `eps_channels` head outputs + noise."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(batches):
        if isinstance(head, torch.nn.Conv2d):
            phi = torch.randn(batch, head.in_channels, *size, generator=g, dtype=dtype)
        else:
            phi = torch.randn(batch, size[0], head.in_features, generator=g, dtype=dtype)
        with torch.no_grad():
            f = head.to(dtype)(phi)
        f = f[:, :eps_channels] if eps_channels else f
        out.append((phi, f + 0.3 * torch.randn(f.shape, generator=g, dtype=dtype)))
    return out


def dense_covariance(post) -> torch.Tensor:
    """Σ = (s·H + δ)⁻¹ built densely from the structure's curvature, in laplace-torch's parameter
    order [vec(W) row-major, b] — an oracle independent of the op-input formulas."""
    spec, tensors = post.spec, post.posterior.tensors()
    s, delta = post.precision_scale, post.prior_precision
    c, d = spec.eps_channels, spec.taps
    eye = lambda n: torch.eye(n, dtype=torch.float64)  # noqa: E731
    if post.structure == "diag":
        h = torch.cat([tensors["h_weight"].flatten()] + ([tensors["h_bias"]] if spec.has_bias else []))
        return torch.diag(1.0 / (s * h + delta))
    if post.structure == "isotropic":
        return eye(spec.num_params) / (s * float(tensors["mean_curvature"]) + delta)
    if post.structure == "kron":
        blocks = [torch.linalg.inv(s * torch.kron(tensors["G"], tensors["A"]) + delta * eye(c * d))]
        if spec.has_bias:
            blocks.append(torch.linalg.inv(s * tensors["G_bias"] + delta * eye(c)))
        return torch.block_diag(*blocks)
    gram = tensors["gram"]
    own_order = torch.block_diag(*[torch.linalg.inv(s * gram + delta * eye(len(gram)))] * c)  # per channel [W_c, b_c]
    if not spec.has_bias:
        return own_order
    per = d + 1
    order = [ch * per + j for ch in range(c) for j in range(d)] + [ch * per + d for ch in range(c)]
    order = torch.tensor(order)
    return own_order[order][:, order]


def monte_carlo_variance(post, phi, samples=40000, seed=0) -> torch.Tensor:
    """Per-output variance of the head over θ ~ N(θ_MAP, Σ), by brute-force sampling (float64)."""
    spec = post.spec
    weight = post.head.weight.detach()[: spec.eps_channels].double()
    bias = post.head.bias.detach()[: spec.eps_channels].double() if spec.has_bias else None
    theta = torch.cat([weight.flatten()] + ([bias] if bias is not None else []))
    chol = torch.linalg.cholesky(dense_covariance(post))
    z = torch.randn(samples, len(theta), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    draws = theta + z @ chol.T
    n_w = weight.numel()
    w = draws[:, :n_w].reshape(samples, spec.eps_channels, -1)
    if spec.groups > 1:  # a dense weight that is zero outside each output channel's group
        per_in, per_out = spec.in_channels // spec.groups, spec.eps_channels // spec.groups
        dense = torch.zeros(samples, spec.eps_channels, spec.in_channels, w.shape[-1] // per_in, dtype=torch.float64)
        for g in range(spec.groups):
            out = slice(g * per_out, (g + 1) * per_out)
            dense[:, out, g * per_in : (g + 1) * per_in] = w[:, out].reshape(samples, per_out, per_in, -1)
        w = dense.flatten(2)
    b = draws[:, n_w:] if bias is not None else torch.zeros(samples, spec.eps_channels, dtype=torch.float64)
    if spec.is_conv:
        patches = torch.nn.functional.unfold(
            phi.double(), spec.kernel_size, dilation=spec.dilation, padding=spec.padding, stride=spec.stride
        )  # (B, D, P)
        out = torch.einsum("scd,bdp->sbcp", w, patches) + b[:, None, :, None]
        var = out.var(0)
        h_out = (phi.shape[2] + 2 * spec.padding[0] - spec.dilation[0] * (spec.kernel_size[0] - 1) - 1) // spec.stride[
            0
        ] + 1
        return var.reshape(phi.shape[0], spec.eps_channels, h_out, -1)
    rows = phi.double().reshape(-1, spec.in_channels)
    out = torch.einsum("scd,md->smc", w, rows) + b[:, None, :]
    return out.var(0).reshape(*phi.shape[:-1], spec.eps_channels)
