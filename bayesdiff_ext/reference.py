"""Float64 pure-PyTorch references of every compiled op, written as plainly as the math.

Tests compare the kernels (CPU, CUDA and the emulated CUDA source) against these. They favour
clarity over memory and speed and are not meant for the sampling path.
"""

from __future__ import annotations

import torch


def _f64(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.to(torch.float64)


def moment_step(mean_x, var_x, eps_mean, eps_var, cov_x_eps, a, b, c2, clamp=True):
    mean_x, var_x, eps_mean = _f64(mean_x), _f64(var_x), _f64(eps_mean)
    eps_var = torch.zeros_like(mean_x) if eps_var is None else _f64(eps_var)
    cov_x_eps = torch.zeros_like(mean_x) if cov_x_eps is None else _f64(cov_x_eps)
    mean_next = a * mean_x + b * eps_mean
    var_next = a * a * var_x + 2 * a * b * cov_x_eps + b * b * eps_var + c2
    if clamp:
        var_next = torch.where(var_next < 0, torch.zeros_like(var_next), var_next)
    return mean_next, var_next


def mc_moments(x, eps_mean, eps_var, mean_x):
    x, eps_mean, mean_x = _f64(x), _f64(eps_mean), _f64(mean_x)
    e_eps = eps_mean.mean(0)
    mean_head_var = torch.zeros_like(e_eps) if eps_var is None else _f64(eps_var).mean(0)
    var_eps = mean_head_var + (eps_mean * eps_mean).mean(0) - e_eps * e_eps
    cov_x_eps = (x * eps_mean).mean(0) - mean_x * e_eps
    return e_eps, var_eps, cov_x_eps
