"""The fused head and curvature ops applied to a conv or Linear head described by a HeadSpec.

Conv heads call the conv ops with the head's own geometry. A Linear head on φ (..., D) is a 1×1
conv on rows: the factored-variance op runs on φ viewed as (rows, D, 1, 1); its curvature sums are
the Linear accumulators (float64, no float64 copy of φ, no per-token Jacobians).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bayesdiff_ext import ops
from bayesdiff_ext.numerics import accumulation_dtype
from bayesdiff_ext.posterior.heads import HeadSpec


def check_phi(spec: HeadSpec, phi: torch.Tensor) -> None:
    if not isinstance(phi, torch.Tensor):
        raise TypeError(f"`phi` must be a tensor, got {type(phi).__name__}")
    if spec.is_conv:
        if phi.dim() != 4 or phi.shape[1] != spec.in_channels:
            raise ValueError(
                f"`phi` must be (B, {spec.in_channels}, H, W) for the head {spec.shape_text()}, got {tuple(phi.shape)}"
            )
    elif phi.dim() < 1 or phi.shape[-1] != spec.in_channels:
        raise ValueError(
            f"`phi` must be (..., {spec.in_channels}) for the head {spec.shape_text()}, got {tuple(phi.shape)}"
        )


def head_mean(spec: HeadSpec, phi: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The ordinary forward of the ε channels, returned in the accumulation dtype."""
    if spec.is_conv:
        out = F.conv2d(phi, weight, bias, spec.stride, spec.padding, spec.dilation, spec.groups)
    else:
        out = F.linear(phi, weight, bias)
    return out.to(accumulation_dtype(phi))


def mean_and_diag_var(spec, phi, weight, bias, weight_var, bias_var) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and variance of a diagonal posterior in one pass over φ."""
    if spec.is_conv:
        return ops.conv_head_mean_var(phi, weight, bias, weight_var, bias_var, **spec.geometry, groups=spec.groups)
    return ops.linear_head_mean_var(phi, weight, bias, weight_var, bias_var)


def factored_var(spec, phi, proj_weight, proj_bias, mix, bias_var) -> torch.Tensor:
    """var = Σ_r mix[c,r]·(proj_r·φ_p + β_r)² + bias_var[c] (docs/MATH.md §1.1).

    ``proj_weight`` is (R, D) or (R, *w).
    """
    if spec.is_conv:
        proj_weight = proj_weight.reshape(-1, *spec.eps_weight_shape[1:])
        return ops.conv_head_var_factored(phi, proj_weight, proj_bias, mix, bias_var, **spec.geometry)
    rows = phi.reshape(-1, spec.in_channels, 1, 1)
    var = ops.conv_head_var_factored(rows, proj_weight.reshape(-1, spec.in_channels, 1, 1), proj_bias, mix, bias_var)
    return var.reshape(*phi.shape[:-1], mix.shape[0])


def output_positions(spec: HeadSpec, phi: torch.Tensor) -> int:
    """Outputs per channel in the batch: B·H_out·W_out for a conv, the number of rows for a Linear."""
    if not spec.is_conv:
        return phi.numel() // spec.in_channels
    sizes = [
        (n + 2 * p - d * (k - 1) - 1) // s + 1
        for n, k, s, p, d in zip(phi.shape[2:], spec.kernel_size, spec.stride, spec.padding, spec.dilation)
    ]
    return phi.shape[0] * sizes[0] * sizes[1]


def diag_ggn(spec: HeadSpec, phi: torch.Tensor) -> torch.Tensor:
    """Σ_{n,p} φ_{n,p}[j]² per weight of the ε channels (docs/MATH.md §1.2).

    Shape ``spec.eps_weight_shape``.
    """
    if not spec.is_conv:
        return ops.linear_diag_ggn(phi).expand(spec.eps_weight_shape)
    per_tap = ops.conv_diag_ggn(phi, list(spec.kernel_size), **spec.geometry)  # (C_in, kh, kw)
    per_group = per_tap.reshape(spec.groups, -1, *spec.kernel_size)
    channels_per_group = spec.eps_channels // spec.groups
    return per_group.repeat_interleave(channels_per_group, dim=0)


def diag_ef(spec: HeadSpec, phi: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Σ_n g_n², the squared per-sample gradients of ½‖r‖² for the weights and the biases.

    ``residual`` is f − y of the ε channels in the head's output layout; a sample is one leading
    index of φ (an image; for a Linear head on tokens, all its tokens together).
    """
    n = phi.shape[0]
    if not spec.is_conv:
        tokens = phi.reshape(n, -1, spec.in_channels)
        return ops.linear_diag_ef(tokens, residual.reshape(n, -1, spec.eps_channels), with_bias=True)
    bias_ef = residual.reshape(n, spec.eps_channels, -1).sum(-1).to(torch.float64).square().sum(0)
    if spec.groups == 1:
        return ops.conv_diag_ef(phi, residual, list(spec.kernel_size), **spec.geometry), bias_ef
    in_per_group, out_per_group = spec.in_channels // spec.groups, spec.eps_channels // spec.groups
    per_group = [
        ops.conv_diag_ef(
            phi[:, g * in_per_group : (g + 1) * in_per_group],
            residual[:, g * out_per_group : (g + 1) * out_per_group],
            list(spec.kernel_size),
            **spec.geometry,
        )
        for g in range(spec.groups)
    ]
    return torch.cat(per_group, dim=0), bias_ef


def patch_gram(spec: HeadSpec, phi: torch.Tensor) -> torch.Tensor:
    """A_aug = Σ_{n,p} [φ_p; 1][φ_p; 1]ᵀ, (D+1)×(D+1), bias last (docs/MATH.md §1.1)."""
    if spec.is_conv:
        return ops.conv_patch_gram(phi, list(spec.kernel_size), **spec.geometry)
    return ops.linear_gram(phi)
