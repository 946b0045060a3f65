"""Float64 pure-PyTorch references of every compiled op, written as plainly as the math.

Tests compare the kernels (CPU, CUDA and the emulated CUDA source) against these. They favour
clarity over memory and speed and are not meant for the sampling path.
"""

from __future__ import annotations

import math

import torch


def _f64(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.to(torch.float64)


def _clamp_variance(var):
    """Every op's rule for the variances it returns: negative values (from negative input variances
    or rounding) become 0, NaN stays NaN."""
    return torch.where(var < 0, torch.zeros_like(var), var)


def moment_step(mean_x, var_x, eps_mean, eps_var, cov_x_eps, a, b, c2, clamp=True):
    mean_x, var_x, eps_mean = _f64(mean_x), _f64(var_x), _f64(eps_mean)
    eps_var = torch.zeros_like(mean_x) if eps_var is None else _f64(eps_var)
    cov_x_eps = torch.zeros_like(mean_x) if cov_x_eps is None else _f64(cov_x_eps)
    mean_next = a * mean_x + b * eps_mean
    var_next = a * a * var_x + 2 * a * b * cov_x_eps + b * b * eps_var + c2
    return mean_next, _clamp_variance(var_next) if clamp else var_next


def mc_moments(x, eps_mean, eps_var, mean_x):
    x, eps_mean, mean_x = _f64(x), _f64(eps_mean), _f64(mean_x)
    e_eps = eps_mean.mean(0)
    mean_head_var = torch.zeros_like(e_eps) if eps_var is None else _f64(eps_var).mean(0)
    var_eps = _clamp_variance(mean_head_var + (eps_mean * eps_mean).mean(0) - e_eps * e_eps)
    cov_x_eps = (x * eps_mean).mean(0) - mean_x * e_eps
    return e_eps, var_eps, cov_x_eps


def mc_moment_step(x, eps_mean, eps_var, mean_x, var_x, a, b, c2, clamp=True):
    e_eps, var_eps, cov_x_eps = mc_moments(x, eps_mean, eps_var, mean_x)
    mean_next, var_next = moment_step(mean_x, var_x, e_eps, var_eps, cov_x_eps, a, b, c2, clamp)
    return mean_next, var_next, var_eps


def _unfold_batch(phi, kernel_size, stride, padding, dilation):
    """The (N, D, P) im2col patches of the whole batch, in weight.flatten(1) order, float64."""
    return torch.nn.functional.unfold(_f64(phi), kernel_size, dilation=dilation, padding=padding, stride=stride)


def conv_diag_ggn(phi, kernel_size, stride, padding, dilation):
    patches = _unfold_batch(phi, kernel_size, stride, padding, dilation)
    return (patches * patches).sum((0, 2)).view(phi.shape[1], *kernel_size)


def conv_diag_ef(phi, residual, kernel_size, stride, padding, dilation):
    patches = _unfold_batch(phi, kernel_size, stride, padding, dilation)
    per_image_gradient = torch.einsum("ncp,ndp->ncd", _f64(residual).flatten(2), patches)
    return (per_image_gradient**2).sum(0).view(residual.shape[1], phi.shape[1], *kernel_size)


def conv_patch_gram(phi, kernel_size, stride, padding, dilation):
    patches = _unfold_batch(phi, kernel_size, stride, padding, dilation)
    ones = patches.new_ones(patches.shape[0], 1, patches.shape[2])
    augmented = torch.cat([patches, ones], dim=1)
    return torch.einsum("ndp,nep->de", augmented, augmented)


def _augmented_rows(phi):
    """φ (..., D) as float64 rows (R, D + 1) with the bias feature 1 last."""
    rows = _f64(phi).reshape(math.prod(phi.shape[:-1]), phi.shape[-1])
    return torch.cat([rows, rows.new_ones(rows.shape[0], 1)], dim=1)


def linear_diag_ggn(phi):
    rows = _f64(phi).reshape(math.prod(phi.shape[:-1]), phi.shape[-1])
    return (rows * rows).sum(0)


def linear_diag_ef(phi, residual):
    samples, tokens = phi.shape[0], math.prod(phi.shape[1:-1])
    features = _augmented_rows(phi).reshape(samples, tokens, phi.shape[-1] + 1)
    r = _f64(residual).reshape(samples, tokens, residual.shape[-1])
    per_sample_gradient = torch.einsum("ntc,ntd->ncd", r, features)
    return (per_sample_gradient**2).sum(0)


def linear_gram(phi):
    augmented = _augmented_rows(phi)
    return augmented.T @ augmented


def conv_head_mean_var(phi, weight, bias, weight_var, bias_var, stride, padding, dilation, groups):
    phi = _f64(phi)
    conv = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    mean = torch.nn.functional.conv2d(phi, _f64(weight), _f64(bias), **conv)
    var = torch.nn.functional.conv2d(phi * phi, _f64(weight_var), _f64(bias_var), **conv)
    return mean, _clamp_variance(var)


def linear_head_mean_var(phi, weight, bias, weight_var, bias_var):
    phi = _f64(phi)
    mean = torch.nn.functional.linear(phi, _f64(weight), _f64(bias))
    var = torch.nn.functional.linear(phi * phi, _f64(weight_var), _f64(bias_var))
    return mean, _clamp_variance(var)


def conv_head_var_factored(phi, proj_weight, proj_bias, mix, bias_var, stride, padding, dilation):
    projection = torch.nn.functional.conv2d(
        _f64(phi), _f64(proj_weight), _f64(proj_bias), stride=stride, padding=padding, dilation=dilation
    )
    var = torch.einsum("cr,brhw->bchw", _f64(mix), projection * projection)
    if bias_var is not None:
        var = var + _f64(bias_var).view(1, -1, 1, 1)
    return _clamp_variance(var)
